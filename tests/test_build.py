"""The native build: the extension imports, and every CUDA source compiles with nvcc for sm_90
(even here, with a CPU-only torch: the .cu files include no torch headers, only a small C ABI)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _nvcc():
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        if os.environ.get("FASTGAN_REQUIRE_NVCC") == "1":
            pytest.fail("nvcc is required (FASTGAN_REQUIRE_NVCC=1) but was not found")
        pytest.skip("nvcc not found: CUDA sources cannot be compiled on this machine")
    return nvcc


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "csrc/cuda/ must hold the CUDA kernels (*.cu)"


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])  # CMakeLists.txt's CUDA architectures
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm90(source, arch, tmp_path):
    text = source.read_text()
    assert "torch/" not in text and "ATen/" not in text, f"{source.name} must not include torch headers"
    result = subprocess.run([_nvcc(), f"-arch={arch}", "-std=c++17", "-O3", "-c", str(source), "-Xptxas", "-v",
                             "-o", str(tmp_path / (source.stem + ".o"))], capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"
    # ptxas's report per kernel: no register spills (a spilling kernel is much slower on the GPU).
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    assert spills, f"no ptxas resource report for {source.name}:\n{result.stderr}"
    assert all(stores == "0" and loads == "0" for stores, loads in spills), result.stderr


def test_extension_is_built_and_imports():
    if os.environ.get("FASTGAN_BUILD_EXT") == "0":
        pytest.skip("built without the extension (FASTGAN_BUILD_EXT=0)")
    import fastgan._C as ext
    assert isinstance(ext.with_cuda, bool)
    assert hasattr(ext, "d_loss_forward") and hasattr(ext, "g_loss_forward")


def test_fastgan_imports_and_falls_back_without_the_extension(tmp_path):
    # Run in a child process where importing fastgan._C fails, as for a user without a compiler.
    code = (
        "import sys, warnings, torch\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fastgan._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fastgan\n"
        "from fastgan.ops import d_loss\n"
        "assert fastgan._dispatch.extension() is None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    d_loss(torch.randn(4), torch.randn(4)); d_loss(torch.randn(4), torch.randn(4))\n"
        "msgs = [str(x.message) for x in w if 'reference' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print(fastgan.info())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "not available" in result.stdout and "ref" in result.stdout
