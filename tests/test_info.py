"""`fastgan info` and `python -m fastgan info`."""
import subprocess
import sys

import torch

import fastgan
from fastgan.cli import main


def test_info_reports_versions_extension_interpreter_and_dispatch():
    text = fastgan.info()
    assert torch.__version__ in text
    assert "triton" in text and "interpreter" in text.lower()
    assert "fastgan._C: built" in text
    lines = text.splitlines()
    d_loss_row = next(line for line in lines if line.strip().startswith("d_loss"))
    assert d_loss_row.split()[1] == "cpu"  # the C++ kernel on CPU tensors


def test_info_command(capsys):
    assert main(["info"]) == 0
    assert "impl='auto' picks" in capsys.readouterr().out


def test_python_dash_m_fastgan_info():
    result = subprocess.run([sys.executable, "-m", "fastgan", "info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "fastgan " + fastgan.__version__ in result.stdout
