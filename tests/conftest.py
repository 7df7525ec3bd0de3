"""Test configuration. Triton kernels run on CPU tensors through Triton's interpreter here, so
TRITON_INTERPRET=1 must be set before anything imports triton (the interpreter is chosen at import)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_report_header(config):
    from fastgan import _dispatch
    return (f"fastgan: _C {'built' if _dispatch.extension() is not None else 'missing'}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, torch {torch.__version__}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
