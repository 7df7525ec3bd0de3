"""Build fastgan._C by driving CMake (CMakeLists.txt is the one description of the native build).

Install with ``pip install --no-build-isolation -e .`` so the extension compiles against the torch
that will import it. Environment:

* ``FASTGAN_BUILD_EXT=0`` skips the extension (fastgan then runs on its Triton and reference paths).
* ``FASTGAN_CMAKE_ARGS`` adds arguments to the CMake configure step (e.g. ``-DFASTGAN_ASAN=ON``).
* ``MAX_JOBS`` caps the parallel compile jobs.
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", str(ROOT),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if _which("ninja"):
            configure += ["-G", "Ninja"]
        configure += shlex.split(os.environ.get("FASTGAN_CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        # A generator switch (Makefiles -> Ninja) in an old build folder makes CMake refuse.
        cache = build_dir / "CMakeCache.txt"
        if cache.exists() and ("Ninja" in configure) != ("CMAKE_GENERATOR:INTERNAL=Ninja" in cache.read_text()):
            cache.unlink()
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


def _which(name: str) -> bool:
    from shutil import which
    return which(name) is not None


ext_modules = [] if os.environ.get("FASTGAN_BUILD_EXT", "1") == "0" else [CMakeExtension("fastgan._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
