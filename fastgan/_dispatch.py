"""The one place that decides which implementation of an op runs, and argument validation helpers.

Every fused op has three implementations that compute the same function:

* ``"ref"``    – plain PyTorch (the specification; autograd by torch),
* ``"cpu"``    – the C++ extension ``fastgan._C`` (CPU tensors),
* ``"triton"`` – Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).

``impl="auto"`` picks Triton on CUDA, C++ on CPU, and the reference where neither is available,
saying so once per op and device with a warning.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

import torch

IMPLS = ("auto", "triton", "cpu", "ref")

# The extension is loaded once, here, so that dispatch under torch.compile only reads plain globals.
try:
    _EXT: ModuleType | None = importlib.import_module("fastgan._C")
    _EXT_ERROR: str | None = None
except ImportError as _exc:
    _EXT, _EXT_ERROR = None, str(_exc)

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

# op name -> whether fastgan._C has its forward function
_CPU_KERNEL: dict[str, bool] = {}
_warned: set[tuple[str, str]] = set()


def register_op(name: str, cpu_symbol: str | None) -> None:
    """Declare an op (and the name of its forward in fastgan._C, if it has a C++ implementation)
    so that ``fastgan info`` and ``impl="auto"`` know about it."""
    _CPU_KERNEL[name] = cpu_symbol is not None and _EXT is not None and hasattr(_EXT, cpu_symbol)


def registered_ops() -> tuple[str, ...]:
    return tuple(_CPU_KERNEL)


def extension() -> ModuleType | None:
    """``fastgan._C`` if it was built and imports, else None (fastgan still works without it)."""
    return _EXT


def extension_error() -> str | None:
    """Why ``fastgan._C`` is unavailable (None when it imports)."""
    return _EXT_ERROR


def interpreter_enabled() -> bool:
    """Whether Triton kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_supports(device: torch.device) -> bool:
    if not triton_installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def cpu_supports(op: str, device: torch.device) -> bool:
    return device.type == "cpu" and _CPU_KERNEL.get(op, False)


def auto_impl(op: str, device: torch.device) -> str:
    """The implementation ``impl="auto"`` runs for ``op`` on ``device``."""
    if device.type == "cuda" and triton_supports(device):
        return "triton"
    if cpu_supports(op, device):
        return "cpu"
    return "ref"


def check_impl(impl) -> str:
    """``impl`` if it names an implementation choice, else a ValueError naming it."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def resolve_impl(op: str, impl: str, device: torch.device) -> str:
    """Validate ``impl`` for ``op`` on ``device`` and return the concrete implementation. Inside a
    ``torch.func`` transform (grad, vjp, jacrev, vmap ...) that is ``"ref"``: the kernels' autograd
    nodes (C++ ones on CPU) are not functorch-aware, the reference's torch ops are."""
    check_impl(impl)
    if functorch_active():
        return "ref"
    if impl == "auto":
        chosen = auto_impl(op, device)
        if chosen == "ref" and (op, str(device)) not in _warned:
            _warned.add((op, str(device)))
            if device.type == "cpu":
                why = "fastgan._C is not built"
            elif device.type == "cuda":
                why = "Triton is not installed"
            else:
                why = f"fastgan has no kernels for {device.type} tensors"
            warnings.warn(f"fastgan: {op} on {device} runs the plain-PyTorch reference ({why}); "
                          "see `fastgan info`", RuntimeWarning, stacklevel=3)
        return chosen
    if impl == "triton" and not triton_supports(device):
        if not triton_installed():
            raise ValueError(f"impl='triton' for {op}: triton is not installed")
        raise ValueError(f"impl='triton' for {op} needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                         f"got tensors on {device}")
    if impl == "cpu" and not cpu_supports(op, device):
        if device.type != "cpu":
            raise ValueError(f"impl='cpu' for {op} needs CPU tensors; got tensors on {device}")
        raise ValueError(f"impl='cpu' for {op}: fastgan._C is not available ({extension_error()})")
    return impl


# torch's own check (torch.autograd.Function.apply asks it); absent from a torch that has no functorch
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def functorch_active() -> bool:
    """Whether a torch.func transform is running (never asked while torch.compile traces)."""
    return not torch.compiler.is_compiling() and _transforms_active()


def tensor_arg(name: str, value, *, floating: bool = True) -> torch.Tensor:
    """Check that argument ``name`` is a tensor (a floating one by default)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def same_device(**tensors: torch.Tensor) -> torch.device:
    """Check that all named tensors share one device and return it."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    device = items[0][1].device
    for name, t in items[1:]:
        if t.device != device:
            first = items[0][0]
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}; they must share a device")
    return device


def triton_module(name: str) -> ModuleType:
    """Import ``fastgan.ops.triton.<name>`` on first use (importing triton is slow and optional)."""
    return importlib.import_module(f"fastgan.ops.triton.{name}")
