"""The C++ extension's tests under AddressSanitizer (issue 8: "never memory corruption in the C++
extension; run its tests once under AddressSanitizer in CI").

``scripts/asan_check.sh`` builds fastgan._C with ``-DFASTGAN_ASAN=ON`` in ``build/asan`` (never
touching the in-tree extension) and runs tests against that build with the ASan runtime preloaded.
Here: first a canary (a planted heap overflow) proves that a report fails the check, then a focused
set of the tests that call the extension (every C++ path; the Triton interpreter adds nothing).
The first run compiles the extension (a few minutes on 2 cores); later runs rebuild only what changed.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "asan_check.sh"

# Files whose tests reach fastgan._C; -k keeps their reference and C++ cases.
EXTENSION_TESTS = ["tests/test_losses.py", "tests/test_properties.py", "tests/test_properties_layers.py",
                   "tests/test_optim*.py",
                   "tests/test_fused_optim*.py", "tests/test_linear_act*.py", "tests/test_bias_act*.py",
                   "tests/test_batch_norm_act*.py", "tests/test_layers*.py"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the ASan check is written for Linux (gcc's libasan)"),
]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, **env}, timeout=1800)


def test_asan_check_fails_on_a_planted_heap_overflow():
    """The check cannot pass by accident: a heap overflow in the test process is reported and fails it."""
    result = _run(["tests/test_info.py", "-q"], FASTGAN_ASAN_CANARY="1")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-4000:]
    assert "AddressSanitizer: heap-buffer-overflow" in out, out[-4000:]
    assert "asan_check: FAILED" in out


def test_extension_tests_pass_under_asan():
    files = sorted({f for pattern in EXTENSION_TESTS for f in glob.glob(str(REPO / pattern))})
    assert files, "no extension tests found"
    # torch.compile cases are left out: they exercise the compiler (slow under ASan), not our C++.
    result = _run([os.path.relpath(f, REPO) for f in files] + ["-k", "not triton and not compile", "-x"])
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-8000:]
    assert "asan_check: OK" in out and " passed" in out, out[-4000:]
