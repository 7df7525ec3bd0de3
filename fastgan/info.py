"""`fastgan info`: what this installation can run, and which implementation `auto` picks."""
from __future__ import annotations

import importlib
import platform

import torch

from fastgan import _dispatch


def _triton_version() -> str:
    if not _dispatch.triton_installed():
        return "not installed"
    try:
        return importlib.import_module("triton").__version__
    except Exception as exc:  # a broken triton install must not break `fastgan info`
        return f"installed but fails to import ({exc})"


def info() -> str:
    """A human-readable report of versions, devices, the extension and the per-op dispatch."""
    import fastgan
    import fastgan.ops  # noqa: F401  (registers the ops)
    for extra in ("fastgan.nn", "fastgan.optim"):
        try:  # modules that register ops of their own
            importlib.import_module(extra)
        except ImportError:
            pass

    ext = _dispatch.extension()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    lines = [
        f"fastgan {fastgan.__version__}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton {_triton_version()}",
        "Triton interpreter (TRITON_INTERPRET=1): " + ("on" if _dispatch.interpreter_enabled() else "off"),
        "fastgan._C: " + ("built, " + ("with CUDA" if getattr(ext, "with_cuda", False) else "CPU only")
                          if ext is not None else f"not available ({_dispatch.extension_error()})"),
        "devices: " + ", ".join(
            str(d) + (f" ({torch.cuda.get_device_name(d)})" if d.type == "cuda" else "") for d in devices),
        "",
        "impl='auto' picks:",
    ]
    width = max([len(op) for op in _dispatch.registered_ops()] + [2])
    lines.append("  " + "op".ljust(width) + "  " + "  ".join(str(d).ljust(8) for d in devices))
    for op in _dispatch.registered_ops():
        picks = [_dispatch.auto_impl(op, d) for d in devices]
        lines.append("  " + op.ljust(width) + "  " + "  ".join(p.ljust(8) for p in picks))
    return "\n".join(lines)
