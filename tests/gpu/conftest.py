"""tests/gpu runs only where CUDA is present (benchmarks/gpu_check.sh runs it on a lent GPU).

Without CUDA every test here is skipped at collection with one reason -- the one skip the project
allows -- so a GPU test file needs no boilerplate of its own. On a CUDA machine tests/conftest.py
leaves TRITON_INTERPRET unset, so the Triton kernels compile for the GPU.
"""
from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    here = str(config.rootpath / "tests" / "gpu")
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cuda_device() -> torch.device:
    """The current CUDA device."""
    if not CUDA:
        pytest.skip("needs a CUDA device")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(autouse=True)
def _cuda_seed_and_sync():
    """Seed the CUDA generator too, and surface asynchronous kernel errors in the test that caused them."""
    if CUDA:
        torch.cuda.manual_seed_all(0)
    yield
    if CUDA:
        torch.cuda.synchronize()
