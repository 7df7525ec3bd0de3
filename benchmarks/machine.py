"""Describe the machine a benchmark ran on: CPU model and cores or GPU, driver, library versions.

    python benchmarks/machine.py [out.json]     # prints the JSON, or writes it to out.json

Benchmarks on shared machines are noisy, so the description includes the load average at the time.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - a missing or broken optional package is just reported
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> str | None:
    """HEAD, with "+dirty" when tracked files differ from it: a run of an uncommitted tree must not be
    filed under the commit it started from."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              check=True, cwd=here).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, timeout=10, check=True, cwd=here).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + "+dirty" if changed else head) or None


def describe() -> dict:
    """A JSON-serialisable description of this machine and software stack."""
    import torch
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fastgan": _version("fastgan"),
        "fastgan_commit": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        info["memory_gib"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device="cuda",
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            nvidia_driver=_nvidia_driver(),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["device"] = "cpu"
    return info


def short_name(info: dict) -> str:
    """One line for report headers, e.g. 'NVIDIA H100 80GB HBM3 (driver 550.54)' or 'AMD EPYC (2 cores)'."""
    if info.get("device") == "cuda":
        return f"{info['gpu_name']} (driver {info.get('nvidia_driver')}, CUDA {info.get('torch_cuda')})"
    return f"{info['cpu_model']} ({info['cpu_count']} cores)"


def main(argv: list[str]) -> int:
    import argparse
    parser = argparse.ArgumentParser(description="Describe this machine (CPU/GPU, driver, versions) as JSON.")
    parser.add_argument("out", nargs="?", help="write the JSON to this file (default: print it)")
    args = parser.parse_args(argv[1:])
    text = json.dumps(describe(), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
