"""FusedAdam and FusedSGD: one pass over flat buffers per step (``fastgan._C``), torch's exact math.

Layout. At construction the parameters of each param group are split by (dtype, device) into
*buckets*; a bucket's parameters are copied into one contiguous buffer and become views of it
(``p.data = flat[off:off + n].view_as(p)``), and their gradients are views of one flat gradient
buffer. Autograd then accumulates straight into that buffer and ``zero_grad(set_to_none=False)`` is
one fill. Optimizer state (exp_avg, exp_avg_sq, momentum) lives in float32 flat buffers beside it
(float32 also for bf16 parameters), the step count in a float32 device tensor.

Gradients that are not views of the buffer are detected at each step (an identity check per
parameter) and handled:

* ``p.grad = None`` (``zero_grad()`` / ``zero_grad(set_to_none=True)``, or user code): the parameter
  is skipped, exactly as torch's optimizers skip it. A post-accumulate-grad hook puts the next
  gradient autograd produces back into the buffer (one copy, while it is hot in cache).
* ``p.grad = tensor`` assigned by hand: copied into the buffer and the view re-attached.
* Parameters skipped while others step get their own step counts; from then on that bucket runs one
  kernel call per parameter (still exact, slower).
* ``optimizer.state`` changed by hand -- cleared or replaced (``opt.state.clear()``,
  ``opt.state = defaultdict(dict)``: a reset of the moments), an entry deleted or set, or a tensor of an
  entry replaced -- is taken into the flat state at the next step (or ``state_dict``), as torch's optimizers
  read ``self.state`` at each step: a parameter left without state starts afresh. The entries' tensors are
  views of the flat buffers, so changing them in place needs nothing. (A change count, checked once a step.)
* With ``adopt_gradient_buckets()`` (``fastgan.Trainer`` turns it on under DDP): gradients that all
  live in one storage of another owner, laid end to end -- DDP's bucket, which
  ``gradient_as_bucket_view=True`` makes ``.grad`` views of -- make that storage the bucket's flat
  gradient buffer. The parameters and the state are re-laid out once in its order; from then on no
  gradient is copied.

A step: (1) gradients gathered as above; (2) when the step covers several buffers, a read-only
non-finite check over all of them first (a step that touches one buffer checks inside its kernel
call); (3) one call per buffer doing unscale by ``inv_scale``, the Adam/AdamW or SGD update and the
EMA shadow update, skipping everything when ``found_inf`` is set; (4) buffers of the EMA copied.
Nothing is read back to the host, so on CUDA a step is capturable in a CUDA graph (after a warm-up
step has allocated the state).

Without ``fastgan._C`` (or for dtypes/devices it does not cover: fp16, fp64, CUDA without the CUDA
build) the same math runs as torch ops on the flat buffers, with a one-time warning.
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
import warnings
import weakref
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

from fastgan._dispatch import extension
from fastgan.optim.ema import EMA

__all__ = ["FusedAdam", "FusedSGD", "fused_twin"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _kernels(device: torch.device, dtype: torch.dtype):
    """fastgan._C when it can run the update for this device and dtype, else None (torch fallback)."""
    ext = extension()
    if ext is None or not hasattr(ext, "optim_adam_step"):
        _warn_once("no-ext", "fastgan.optim: fastgan._C is not built; the fused optimizers run their update "
                             "as plain torch ops (correct, slower). See `fastgan info`.")
        return None
    if device.type == "cuda" and not getattr(ext, "with_cuda", False):
        _warn_once("no-cuda-ext", "fastgan.optim: fastgan._C was built without CUDA; the fused optimizers run "
                                  "their CUDA update as plain torch ops (correct, slower).")
        return None
    if device.type not in ("cpu", "cuda") or dtype not in _KERNEL_DTYPES:
        _warn_once(f"dtype-{device.type}-{dtype}", f"fastgan.optim: no fused kernel for {dtype} parameters on "
                                                  f"{device.type}; that bucket runs as plain torch ops.")
        return None
    return ext


@functools.lru_cache(maxsize=None)
def _zeroes_in_pass(kernels) -> bool:
    """Whether this build of the update kernels takes ``zero_grad`` (a build older than that option,
    not rebuilt since, does not: its buckets zero the gradients in a fill after the update)."""
    return "zero_grad" in (kernels.optim_adam_step.__doc__ or "")


def flat_zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled 1-D buffer for a flat parameter / gradient / state / EMA buffer. On CPU with
    fastgan._C, buffers from 2 MB up live on 2 MB pages where the OS allows it (see
    ``optim_flat_buffer`` in csrc/cpu/optim.cpp: a step streams every buffer once, and on 4 KB pages
    its TLB misses cost as much as 30 % of the step here); elsewhere ``torch.zeros``."""
    device = torch.device(device)
    if device.type == "cpu":
        ext = extension()
        if ext is not None and hasattr(ext, "optim_flat_buffer"):
            return ext.optim_flat_buffer(int(numel), dtype)
    return torch.zeros(numel, dtype=dtype, device=device)


class _Changes:
    """A count of hand-made changes to an optimizer's ``state`` (shared by the container and its entries)."""
    __slots__ = ("n",)

    def __init__(self):
        self.n = 0


class _CountsWrites:
    """The mutating dict methods of a tracked ``optimizer.state`` container or entry: each calls ``_touch``
    (which counts the change) before doing what dict does."""
    __slots__ = ()

    def _touch(self) -> None:
        raise NotImplementedError

    def __setitem__(self, key, value):
        self._touch()
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        self._touch()
        dict.__delitem__(self, key)

    def __ior__(self, other):
        self._touch()
        return dict.__ior__(self, other)

    def clear(self):
        self._touch()
        dict.clear(self)

    def pop(self, *args):
        self._touch()
        return dict.pop(self, *args)

    def popitem(self):
        self._touch()
        return dict.popitem(self)

    def setdefault(self, key, default=None):
        self._touch()
        return dict.setdefault(self, key, default)

    def update(self, *args, **kwargs):
        self._touch()
        dict.update(self, *args, **kwargs)


class _StateEntry(_CountsWrites, dict):
    """``optimizer.state[p]`` as a fused optimizer publishes it (views of its flat buffers). Writing into it
    (``entry[key] = tensor``, ``del``, ``clear``, ...) is counted, so the next step takes the new values in,
    as torch's optimizers use whatever tensors the entry holds. Copied or pickled, it is a plain dict."""
    __slots__ = ("_changes", "clean")

    def __init__(self, changes: _Changes, values: dict):
        dict.__init__(self, values)
        self._changes = changes
        self.clean = True

    def _touch(self) -> None:
        self.clean = False
        self._changes.n += 1

    def __reduce_ex__(self, protocol):
        return dict, (dict(self),)

    def __deepcopy__(self, memo):
        return copy.deepcopy(dict(self), memo)


class _TrackedState(_CountsWrites, defaultdict):
    """``optimizer.state`` of a fused optimizer: torch's ``defaultdict(dict)``, counting entries set, deleted
    or cleared by hand (``opt.state.clear()``, ``del opt.state[p]``, ``opt.state[p] = {}``), so the next step
    resets or takes in those parameters' state as torch's optimizers do. Copied or pickled, it is a plain
    ``defaultdict(dict)``."""

    def __init__(self, changes: _Changes, *args):
        defaultdict.__init__(self, dict, *args)
        self._changes = changes

    def _touch(self) -> None:
        self._changes.n += 1

    def __missing__(self, key):  # reading a parameter without state changes nothing; writing into it counts
        value = _StateEntry(self._changes, {})
        dict.__setitem__(self, key, value)
        return value

    def _plain(self) -> defaultdict:
        return defaultdict(dict, {k: dict(v) for k, v in self.items()})

    def copy(self):  # a copy is no optimizer's state: plain containers (defaultdict's would call __init__ wrong)
        return self._plain()

    __copy__ = copy

    def __or__(self, other):
        return self._plain() | other

    def __ror__(self, other):
        return other | self._plain()

    def __reduce_ex__(self, protocol):
        return defaultdict, (dict,), None, None, iter(self._plain().items())

    def __deepcopy__(self, memo):
        return copy.deepcopy(self._plain(), memo)


class _Bucket:
    """The parameters of one param group that share dtype and device, flattened into one buffer."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.numels = [p.numel() for p in params]
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.total = total
        # Optimizer state: float32, also for bf16/fp16 parameters; float64 parameters keep float64.
        self.state_dtype = self.dtype if self.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            self.flat_param = flat_zeros(total, self.dtype, self.device)
            self.flat_grad = flat_zeros(total, self.dtype, self.device)
            for p, off, n in zip(params, self.offsets, self.numels):
                self.flat_param[off:off + n].copy_(p.detach().reshape(-1))
            for p, off, n in zip(params, self.offsets, self.numels):
                p.data = self.flat_param[off:off + n].view(p.shape)
            self.shapes = [p.shape for p in params]
            self.data_ptrs = [p.data_ptr() if n else None for p, n in zip(params, self.numels)]
            self.grad_views = [self.flat_grad[off:off + n].view(p.shape)
                               for p, off, n in zip(params, self.offsets, self.numels)]
            for p, view in zip(params, self.grad_views):
                if p.grad is not None:
                    view.copy_(p.grad)
                    p.grad = view
        # Per-parameter step counts (float32, on the device: read by the kernels, never by the host).
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        self.uniform_steps = True  # all counts equal: one kernel call over the whole buffer
        self.state: dict[str, torch.Tensor] = {}  # flat float32 state buffers, allocated at the first step
        self.published: list[_StateEntry] | None = None  # this bucket's entries of optimizer.state, when published
        self.shadow: torch.Tensor | None = None  # flat EMA shadow (float32), when an EMA is attached
        self.kernels = _kernels(self.device, self.dtype)
        self.adopt_external = False  # see _FusedOptimizer.adopt_gradient_buckets
        self.relaid_out = False      # set when the layout changed; the optimizer re-publishes its views
        self._declined: tuple | None = None  # (storage, offsets) last found not to tile this bucket
        self.hook_handles = []
        ref = weakref.ref(self)
        for i, p in enumerate(params):
            if p.requires_grad:
                self.hook_handles.append(p.register_post_accumulate_grad_hook(_reattach_hook(ref, i)))

    def gather_grads(self) -> list[bool] | None:
        """Make every present gradient a view of the flat buffer. Returns None when all parameters
        have a gradient, else a per-parameter list of which ones do."""
        present = None
        try_adopting = self.adopt_external
        for i, (p, view) in enumerate(zip(self.params, self.grad_views)):
            if self.data_ptrs[i] is not None and p.data_ptr() != self.data_ptrs[i]:
                self._reattach_param(i)
            g = p.grad
            if g is view:
                continue
            if try_adopting:  # once per call, at the first gradient that is not ours
                try_adopting = False
                if g is not None and self._adopt_grad_storage():
                    return None
            if g is None:
                if present is None:
                    present = [True] * len(self.params)
                present[i] = False
                continue
            if g.is_sparse:
                raise RuntimeError("fastgan.optim: sparse gradients are not supported")
            view.copy_(g)
            if not g.requires_grad:  # a differentiable .grad (create_graph=True) is left to its owner
                p.grad = view
        return present

    @torch.no_grad()
    def _reattach_param(self, i: int) -> None:
        """Parameter i no longer lives in the flat buffer: its ``.data`` was replaced after the optimizer
        was built (``p.data = ...``; ``module.to(memory_format=...)`` does it). A step would update the
        abandoned buffer while the model kept its new, never-updated tensor, so take the new values
        into the buffer and make the parameter a view of it again; refuse changes of dtype, device or
        shape, which the optimizer's state cannot follow."""
        p, off, n = self.params[i], self.offsets[i], self.numels[i]
        if p.dtype != self.dtype or p.device != self.device or p.shape != self.shapes[i]:
            raise RuntimeError(
                f"fastgan.optim: parameter {i} of a param group was replaced after the optimizer was built "
                f"(now {p.dtype}, {p.device}, shape {tuple(p.shape)}; was {self.dtype}, {self.device}, "
                f"shape {tuple(self.shapes[i])}); build the optimizer after converting the model")
        view = self.flat_param[off:off + n].view(self.shapes[i])
        view.copy_(p.detach())
        p.data = view
        self.data_ptrs[i] = p.data_ptr()
        _warn_once("reattach", "fastgan.optim: a parameter's tensor was replaced after the optimizer was built "
                   "(p.data = ..., or module.to(memory_format=...)); its values were copied back into the "
                   "optimizer's flat buffer and it is a contiguous view of that buffer again (the flat "
                   "buffers hold every parameter contiguously: a memory format such as channels_last is not "
                   "kept). Build the optimizer after converting the model to avoid this copy.")

    def _adopt_grad_storage(self) -> bool:
        """Make the one storage all gradients of this bucket live in, laid end to end (DDP's bucket
        under ``gradient_as_bucket_view=True``), this bucket's flat gradient buffer, re-laying the
        parameters and the state out in that storage's order. False (the caller copies instead) if
        the gradients do not tile one storage exactly."""
        grads = [p.grad for p in self.params]
        for g in grads:
            if (g is None or g.is_sparse or g.requires_grad or g.dtype != self.dtype or g.device != self.device
                    or not g.is_contiguous()):
                return False
        storage = grads[0].untyped_storage()
        starts = [g.storage_offset() for g in grads]
        key = (storage.data_ptr(), tuple(starts))
        if key == self._declined:
            return False
        if any(g.untyped_storage().data_ptr() != key[0] for g in grads):
            return False
        base = min(starts)
        end = base
        for start, n in sorted(zip(starts, self.numels)):
            if start != end:  # a gap or an overlap: not one flat buffer of exactly these gradients
                self._declined = key
                return False
            end += n
        offsets = [s - base for s in starts]
        flat_grad = torch.empty(0, dtype=self.dtype, device=self.device).set_(storage, base, (self.total,))
        if offsets != self.offsets:
            self._relayout(offsets)
        self.flat_grad = flat_grad
        self.grad_views = grads
        self.relaid_out = True
        return True

    @torch.no_grad()
    def _relayout(self, offsets: list[int]) -> None:
        """Move every parameter and every flat state buffer to the given offsets (new buffers)."""
        flat_param = flat_zeros(self.total, self.dtype, self.device)
        for p, off, n in zip(self.params, offsets, self.numels):
            flat_param[off:off + n].copy_(p.detach().reshape(-1))
            p.data = flat_param[off:off + n].view(p.shape)
        self.data_ptrs = [p.data_ptr() if n else None for p, n in zip(self.params, self.numels)]
        for key, buf in self.state.items():
            if isinstance(buf, torch.Tensor):
                moved = flat_zeros(self.total, buf.dtype, buf.device)
                for old, new, n in zip(self.offsets, offsets, self.numels):
                    moved[new:new + n].copy_(buf[old:old + n])
                self.state[key] = moved
        self.flat_param = flat_param
        self.offsets = list(offsets)

    def segments(self, present: list[bool] | None):
        """(lo, hi, steps) ranges for the kernel calls of one step."""
        if present is None and not self.uniform_steps and self.device.type == "cpu":
            # On CPU the counts can be re-read for free: all equal again -> back to one call.
            self.uniform_steps = bool((self.steps == self.steps[0]).all())
        if present is None and self.uniform_steps:
            return [(0, self.total, self.steps)]
        self.uniform_steps = False
        # Zero-size parameters get their (empty) call too: torch counts their steps, and counts left
        # behind would keep this bucket on per-parameter calls for good.
        return [(off, off + n, self.steps[i:i + 1])
                for i, (off, n) in enumerate(zip(self.offsets, self.numels))
                if present is None or present[i]]

    def view_of(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        off, n = self.offsets[i], self.numels[i]
        return flat[off:off + n].view(self.params[i].shape)


def _reattach_hook(bucket_ref, i: int):
    def hook(p: torch.Tensor) -> None:
        bucket = bucket_ref()
        if bucket is None:
            return
        view = bucket.grad_views[i]
        g = p.grad
        if g is None or g is view or g.requires_grad:
            return
        with torch.no_grad():
            view.copy_(g)
        p.grad = view
    return hook


def _as_float(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor")
        return float(value)
    return float(value)


def _check_hyper(name: str, value, low: float | None = None, high: float | None = None, *, high_open: bool = False,
                 tensor_ok: bool = False, where: str = "") -> None:
    """A hyperparameter must be a finite real number in [low, high] (``high_open``: [low, high)), or with
    ``tensor_ok`` a one-element floating-point tensor holding one; else a ValueError naming it."""
    if isinstance(value, torch.Tensor) and tensor_ok:
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a number or a one-element floating-point tensor, got a tensor of "
                             f"shape {tuple(value.shape)} and dtype {value.dtype}{where}")
        number = float(value)  # host read: validation runs when groups are added or loaded, not per step
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"{name} must be a number, got {value!r}{where}")
    ok = math.isfinite(number) and (low is None or number >= low)
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        span = f" in [{low}, {high}{')' if high_open else ']'}" if high is not None else f" >= {low}"
        raise ValueError(f"{name} must be a finite number{span if low is not None else ''}, got {value!r}{where}")


def _group_value(group: dict[str, Any], defaults: dict[str, Any], key: str, missing: Any = None) -> Any:
    """group[key], else the optimizer's default (a saved group of an older torch may lack a key)."""
    return group[key] if key in group else defaults.get(key, missing)


class _FusedOptimizer(Optimizer):
    """Shared machinery of FusedAdam / FusedSGD (flat buckets, found_inf, EMA, state_dict)."""

    _state_keys: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict[str, Any], ema: EMA | None):
        if ema is not None and not isinstance(ema, EMA):
            raise TypeError(f"ema must be a fastgan.optim.EMA or None, got {type(ema).__name__}")
        self._buckets: list[list[_Bucket]] = []  # per param group
        self._device: torch.device | None = None
        self._device_lr: list[list] | None = None  # per group position; see use_device_lr
        self.ema = ema
        self._changes = _Changes()
        super().__init__(params, defaults)
        self.state = _TrackedState(self._changes, self.state)
        self._synced = (self.state, self._changes.n)  # (container, change count) the flat state agrees with
        self.found_inf = torch.zeros((), dtype=torch.float32, device=self._device or "cpu")

    # ---- groups and buckets ----------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if params is not None and not isinstance(params, (torch.Tensor, set)):  # (torch rejects sets itself)
            params = param_group["params"] = list(params)  # a generator can be read only once
            # (named parameters, accepted by torch >= 2.6, come as (name, tensor) pairs)
            if len({id(p[1] if isinstance(p, tuple) else p) for p in params}) != len(params):
                # torch only warns (and updates such a parameter twice per step); one flat buffer cannot
                # hold one parameter twice.
                raise ValueError("params: a parameter appears more than once in a param group")
        self._ensure_buckets()
        super().add_param_group(param_group)
        try:  # a rejected group leaves nothing behind (later groups would take its place and settings)
            self._bucket_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise

    def _ensure_buckets(self) -> None:
        """Bucket the groups that reached ``param_groups`` without ``add_param_group`` of ours: fused_twin
        shares its list with the torch optimizer, whose ``add_param_group`` appends to it. Without this
        such a group would never be stepped."""
        while len(self._buckets) < len(self.param_groups):
            group = self.param_groups[len(self._buckets)]
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            if len({id(p) for p in group["params"]}) != len(group["params"]):
                raise ValueError(f"params: a parameter appears more than once in param group {len(self._buckets)}")
            self._bucket_group(group)

    def _bucket_group(self, group: dict[str, Any]) -> None:
        """Validate the last param group and move its parameters into flat buckets."""
        self._validate_group(group, where=f" (param group {len(self._buckets)})")
        device = self._device
        for p in group["params"]:
            device = device or p.device
            if p.device != device:
                raise ValueError(f"params: all parameters must be on one device; got {device} and {p.device}")
            if not p.is_floating_point():
                raise ValueError(f"params: parameters must be floating point, got {p.dtype}")
        self._device = device
        by_key: dict[tuple, list] = defaultdict(list)
        for p in group["params"]:
            by_key[(p.dtype, p.device)].append(p)
        buckets = [_Bucket(ps) for ps in by_key.values()]
        for b in buckets:
            b.group_index = len(self._buckets)
        self._buckets.append(buckets)
        if self.ema is not None:
            for b in buckets:
                if b.kernels is not None:  # buckets on the torch fallback keep the EMA's own shadows
                    b.shadow = self.ema._adopt_flat(b.params, b.offsets, b.flat_param)
        if hasattr(self, "found_inf") and self.found_inf.device != self._device:
            self.found_inf = torch.zeros((), dtype=torch.float32, device=self._device)

    def _validate_group(self, group: dict[str, Any], where: str = "") -> None:
        """Raise a ValueError naming the first hyperparameter of ``group`` out of range (keys a group
        lacks are taken from the defaults)."""
        raise NotImplementedError

    def __reduce_ex__(self, protocol):
        # torch's Optimizer pickles only defaults, state and param_groups; the copy would have no flat
        # buffers (its step would fail on a missing attribute), and parameters that are views of
        # buffers shared with a model cannot be copied apart from that model anyway.
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied (copy.deepcopy, torch.save of the "
                        f"optimizer): its parameters live in flat buffers shared with the model. Save "
                        f"optimizer.state_dict() and load it into a {type(self).__name__} built over the "
                        f"model's parameters.")

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch.optim.Optimizer.load_state_dict ends here too. Param groups saved by older torch lack
        # keys added since (Adam's decoupled_weight_decay came with torch 2.6): fill them from this
        # optimizer's defaults, as torch's own __setstate__ fills its (so AdamW checkpoints loaded into
        # FusedAdam(decoupled_weight_decay=True) stay AdamW).
        shared = self.__dict__.get("param_groups")
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if shared is not None and shared is not self.param_groups:
            # The same list object as before: fused_twin shares it with a torch optimizer (whose LR
            # scheduler must keep reaching these groups after a load).
            shared[:] = self.param_groups
            self.param_groups = shared

    # ---- gradients -------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch documents it: ``set_to_none=True`` sets every ``.grad`` to None (the parameter is then
        skipped by the next step unless backward reaches it; the gradient autograd produces is put back
        into the flat buffer by a hook); ``set_to_none=False`` zeroes the flat gradient buffer in one
        fill and keeps the ``.grad`` views (a parameter whose ``.grad`` is None keeps None).
        ``step(zero_grad=True)`` does the latter inside the update's pass."""
        self._ensure_buckets()
        if set_to_none:
            for buckets in self._buckets:
                for b in buckets:
                    for p in b.params:
                        p.grad = None
            return
        self._zero_grad_buffers(zeroed=())

    def _zero_grad_buffers(self, zeroed) -> None:
        """zero_grad(set_to_none=False), where the buckets in ``zeroed`` (ids) were zeroed by the step."""
        for buckets in self._buckets:
            for b in buckets:
                if id(b) not in zeroed:
                    if b.kernels is not None:
                        b.kernels.optim_zero(b.flat_grad)
                    else:
                        b.flat_grad.zero_()
                for p, view in zip(b.params, b.grad_views):
                    # A gradient of another tensor is zeroed by pointing .grad at the (zeroed) view; a
                    # missing one stays None, as torch leaves it, so the next step skips that parameter.
                    if p.grad is not None and p.grad is not view:
                        p.grad = view

    def gather_grads_in_step(self) -> None:
        """Stop copying each new gradient into the flat buffer from a post-accumulate-grad hook as
        autograd produces it: ``step`` (and ``flat_grad_buffers``) gathers the gradients instead, in one
        loop right before the update reads them. Same results. For callers that run backward and then
        ``step`` (``fastgan.Trainer`` does): no Python call from inside backward per parameter, and the
        buffer is written just before the kernel reads it (measured ~2.5% of an MLP batch-64 GAN
        training step on CPU, 1 thread). Until then ``.grad`` is the tensor autograd made."""
        for buckets in self._buckets:
            for b in buckets:
                for handle in b.hook_handles:
                    handle.remove()
                b.hook_handles.clear()

    def adopt_gradient_buckets(self, enabled: bool = True) -> None:
        """Let the flat gradient buffers be taken over from another owner: when every gradient of a
        bucket is a view of one storage, laid end to end (DDP's bucket, which
        ``gradient_as_bucket_view=True`` makes ``.grad`` point into), that storage becomes the
        bucket's flat gradient buffer and the parameters and state are re-laid out in its order (once,
        and again if the owner re-buckets). From then on the step reads the gradients where the owner
        left them -- no copy per step. Otherwise (other layouts) gradients are copied as usual."""
        for buckets in self._buckets:
            for b in buckets:
                b.adopt_external = bool(enabled)

    def _after_relayout(self, group, b: _Bucket) -> None:
        """A bucket moved its parameters and state: re-point the EMA's shadows and ``self.state``'s views."""
        b.relaid_out = False
        if b.shadow is not None:
            b.shadow = self.ema._adopt_flat(b.params, b.offsets, b.flat_param)
        if b.state:
            self._publish_state(b, group)

    # ---- flat buffers (for data-parallel training) ------------------------------------------------
    @torch.no_grad()
    def flat_grad_buffers(self) -> list[torch.Tensor]:
        """The flat gradient buffers the next ``step`` reads (one per param group and (dtype,
        device)), after making every present ``.grad`` a view of its buffer (a no-op when autograd
        already wrote there). Reducing them in place (e.g. ``torch.distributed.all_reduce``) before
        ``step`` changes the gradients the step applies; entries of parameters without a gradient
        are stale and ignored by the step."""
        if self._state_changed():  # a re-layout below republishes the state: take hand-made changes in first
            self._sync_state()
        buffers = []
        for group, buckets in zip(self.param_groups, self._buckets):
            for b in buckets:
                b.gather_grads()
                if b.relaid_out:
                    self._after_relayout(group, b)
                buffers.append(b.flat_grad)
        return buffers

    def flat_state_buffers(self) -> list[torch.Tensor]:
        """Every tensor of the optimizer's state in its flat form: the moment / momentum buffers (once
        allocated by the first step or ``load_state_dict``), the per-parameter step counts and the
        fused EMA shadow. Broadcasting them in place synchronises the optimizer across processes."""
        buffers = []
        for buckets in self._buckets:
            for b in buckets:
                buffers.extend(t for t in b.state.values() if isinstance(t, torch.Tensor))
                buffers.append(b.steps)
                if b.shadow is not None:
                    buffers.append(b.shadow)
        return buffers

    # ---- step ------------------------------------------------------------------------------------
    @staticmethod
    def profile_hook_step(func):
        """torch wraps every optimizer's ``step`` in a profiler range plus the step-hook loops (~10 us a
        call, a measurable share of a step over 0.5 M parameters). Take that wrapper only while
        something needs it: a registered step pre/post hook (this optimizer's or global) or an
        active profiler; otherwise call ``step`` directly. (torch.optim.Optimizer applies this to
        the class's ``step`` once, in ``_patch_step_function``.)"""
        full = Optimizer.profile_hook_step(func)

        @functools.wraps(func)
        def wrapper(self, *args, **kwargs):
            if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                    or _torch_optimizer._global_optimizer_pre_hooks or _torch_optimizer._global_optimizer_post_hooks
                    or torch._C._autograd._profiler_enabled()):
                return full(self, *args, **kwargs)
            return func(self, *args, **kwargs)

        return wrapper

    def step(self, closure: Callable[[], Any] | None = None, *, inv_scale: torch.Tensor | None = None,
             zero_grad: bool = False):
        """One update of every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (run with grad enabled).
            inv_scale: optional 0-d float tensor ``1 / loss_scale`` on the parameters' device; the
                gradients are multiplied by it inside the update (they are left scaled in ``.grad``).
            zero_grad: leave the gradients zeroed, exactly as ``step(); zero_grad(set_to_none=False)``
                would (also when the step is skipped), but in the update's own pass over the gradient
                buffer on CPU: each chunk is zeroed right after the update read it, still in cache,
                instead of a second pass over memory (measured ~5-10% of a 5 M-parameter Adam step
                here, ``benchmarks/bench_optim.py``). Loop as ``loss.backward(); opt.step(zero_grad=True)``:
                autograd then accumulates into the zeroed buffer, and no ``zero_grad`` call is needed.

        After the step ``self.found_inf`` (0-d float32 on the device) is 1.0 if some gradient was
        inf/NaN -- then nothing (parameters, state, step counts, EMA shadows) changed -- else 0.0.
        It is never read back to the host here."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # As @torch.no_grad(), at a tenth of its per-call cost.
        grad_was_enabled = torch.is_grad_enabled()
        if grad_was_enabled:
            torch._C._set_grad_enabled(False)
        try:
            self._step(inv_scale, bool(zero_grad))
        finally:
            if grad_was_enabled:
                torch._C._set_grad_enabled(True)
        return loss

    def _step(self, inv_scale, zero_grad: bool = False) -> None:
        if len(self._buckets) != len(self.param_groups):
            self._ensure_buckets()
        if self._state_changed():
            self._sync_state()
        if inv_scale is not None:
            inv_scale = self._check_inv_scale(inv_scale)
        work = []
        stale_shadows = []  # parameters whose fused EMA shadow this step's kernel calls do not reach
        for group, buckets in zip(self.param_groups, self._buckets):
            for b in buckets:
                present = b.gather_grads()
                if b.relaid_out:
                    self._after_relayout(group, b)
                if present is not None and b.shadow is not None:
                    stale_shadows.extend(p for p, has in zip(b.params, present) if not has)
                if present is not None and not any(present):
                    continue
                if not b.state:
                    self._init_state(group, b)
                work.append((group, b, b.segments(present)))
        found_inf = self.found_inf
        calls = sum(len(segs) for _, _, segs in work)
        check_inside = calls == 1 and work[0][1].kernels is not None
        if not check_inside:
            found_inf.zero_()
            for _, b, segs in work:
                for lo, hi, _ in segs:
                    _nonfinite_check(b, b.flat_grad[lo:hi], inv_scale, found_inf)
        zeroed = set()  # ids of the buckets whose kernel call zeroes the gradients in its pass
        for group, b, segs in work:
            # In the pass only where one call covers the whole buffer (a bucket stepped parameter by
            # parameter, or by torch ops, gets zero_grad's fill after its update).
            zero_in_pass = (zero_grad and b.kernels is not None and len(segs) == 1
                            and segs[0][1] - segs[0][0] == b.total and _zeroes_in_pass(b.kernels))
            if zero_in_pass:
                zeroed.add(id(b))
            for lo, hi, steps in segs:
                self._update(group, b, lo, hi, steps, inv_scale, found_inf, check_inside, zero_in_pass)
        if self.ema is not None:
            # The EMA averages every parameter after every step, also those without a gradient (as
            # ema.update() after a torch optimizer's step does): their shadows are updated here.
            self.ema._after_fused_step(found_inf, stale_shadows)
        if zero_grad:
            self._zero_grad_buffers(zeroed)

    def _check_inv_scale(self, inv_scale) -> torch.Tensor:
        if not isinstance(inv_scale, torch.Tensor):
            raise TypeError(f"inv_scale must be a 0-d float tensor or None, got {type(inv_scale).__name__}")
        if inv_scale.numel() != 1 or not inv_scale.is_floating_point():
            raise ValueError(f"inv_scale must be a one-element float tensor, got shape {tuple(inv_scale.shape)} "
                             f"dtype {inv_scale.dtype}")
        if self._device is not None and inv_scale.device != self._device:
            raise ValueError(f"inv_scale is on {inv_scale.device} but the parameters are on {self._device}")
        if inv_scale.dtype != torch.float32:
            inv_scale = inv_scale.float()
        return inv_scale.reshape(())

    # ---- CUDA graphs -----------------------------------------------------------------------------
    def use_device_lr(self, enabled: bool = True) -> None:
        """From now on (``enabled``) the CUDA kernels read each param group's learning rate from a 0-d
        float64 device tensor this optimizer owns, one per group position (float64 as the Python float of
        an eager step: with the extension's kernels a replayed step then repeats an eager one bit for bit;
        a CUDA tensor ``group["lr"]`` is best float64 too, as other dtypes are converted at each step).
        A captured CUDA graph replays the arguments it was captured with: a float ``group["lr"]`` would stay what it was at capture,
        and a tensor one replaced by another (or the group replaced, as ``load_state_dict`` does) would
        go unseen. :meth:`sync_device_lr` (call it before each replay; ``fastgan.Trainer`` does) copies
        each group's current learning rate in. ``enabled=False`` goes back to reading ``group["lr"]``
        at each call. No effect on CPU, whose kernels read floats."""
        if not enabled:
            self._device_lr = None
            return
        if self._device is None or self._device.type != "cuda":
            return
        if self._device_lr is None:
            self._device_lr = []
        self.sync_device_lr()

    def sync_device_lr(self) -> None:
        """Set the device learning rates of :meth:`use_device_lr` from ``group["lr"]``: a fill on the device
        when the value changed (an LR scheduler stepped), a device copy for a CUDA tensor, nothing
        otherwise; no host synchronisation (a CPU tensor lr is read on the host)."""
        entries = self._device_lr
        if entries is None:
            return
        for i, group in enumerate(self.param_groups):
            if i == len(entries):
                entries.append([torch.empty((), dtype=torch.float64, device=self._device), None])
            entry, lr = entries[i], group["lr"]
            if isinstance(lr, torch.Tensor) and lr.device.type == "cuda":
                entry[0].copy_(lr.reshape(()))
                entry[1] = None
                continue
            value = float(lr)
            if value != entry[1]:
                entry[0].fill_(value)
                entry[1] = value

    def _lr_args(self, group, b: _Bucket):
        """(lr_tensor, lr_float) for a kernel call: a tensor lr on the parameters' device is read by the
        kernel (graph capture sees scheduler updates); otherwise a float."""
        if self._device_lr is not None and b.device.type == "cuda" and b.group_index < len(self._device_lr):
            return self._device_lr[b.group_index][0], 0.0
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.device == b.device and b.device.type == "cuda":
                return (lr if lr.dtype == torch.float64 else lr.double()).reshape(()), 0.0
            return None, float(lr)
        return None, float(lr)

    def _ema_beta(self) -> float:
        return self.ema.beta if self.ema is not None else 0.0

    # ---- state -----------------------------------------------------------------------------------
    def _init_state(self, group, b: _Bucket) -> None:
        raise NotImplementedError

    def _publish_state(self, b: _Bucket, group=None) -> None:
        """Expose the flat state as torch's per-parameter ``self.state[p]`` (views), for state_dict."""
        raise NotImplementedError

    def _publish(self, b: _Bucket, entries: list[dict]) -> None:
        """Make ``entries`` (one per parameter of ``b``) the bucket's ``self.state[p]``; not counted as a change.
        The entry objects published before are refilled, not replaced: a dict a user holds across steps
        (``held = opt.state[p]``) stays the parameter's state, as in torch."""
        published = []
        for i, values in enumerate(entries):
            entry = b.published[i] if b.published is not None else dict.get(self.state, b.params[i])
            if not (isinstance(entry, _StateEntry) and entry._changes is self._changes):
                entry = _StateEntry(self._changes, values)
            else:
                dict.clear(entry)
                dict.update(entry, values)
                entry.clean = True
            published.append(entry)
        b.published = published
        for p, entry in zip(b.params, b.published):
            dict.__setitem__(self.state, p, entry)

    def _state_changed(self) -> bool:
        """Whether ``self.state`` was replaced or changed by hand since the flat state last agreed with it."""
        return self.state is not self._synced[0] or self._changes.n != self._synced[1]

    def _take_entries(self, group, b: _Bucket, entries: dict[int, dict | None]) -> None:
        """Load the entries of ``self.state`` set by hand since the last step, parameter index -> entry
        (None or empty: no state, the parameter starts afresh, as torch's optimizers start it)."""
        raise NotImplementedError

    @torch.no_grad()
    def _sync_state(self) -> None:
        """``self.state`` was changed by hand (an entry set, deleted or written into, the container cleared or
        replaced): take the changes into the flat state, as torch's optimizers read ``self.state`` at each step."""
        state = self.state
        if not isinstance(state, _TrackedState):
            state = self.state = _TrackedState(self._changes, state)
        for group, buckets in zip(self.param_groups, self._buckets):
            for b in buckets:
                current = [dict.get(state, p) for p in b.params]
                if b.published is None:
                    changed = {i: e for i, e in enumerate(current) if e}
                else:
                    changed = {i: e for i, (e, mine) in enumerate(zip(current, b.published))
                               if e is not mine or not mine.clean}
                if changed:
                    # snapshots: taking them in republishes (refills) the bucket's entry objects
                    self._take_entries(group, b, {i: dict(e) if e else None for i, e in changed.items()})
                    counts = b.steps.tolist()  # host read: only after a change by hand
                    b.uniform_steps = all(c == counts[0] for c in counts)
                    self._publish_state(b, group)
        self._synced = (state, self._changes.n)

    @staticmethod
    def _entry_value(entry: dict, key: str, like: torch.Tensor) -> torch.Tensor:
        value = entry[key]  # a KeyError for an entry without it, as torch's step raises one
        if isinstance(value, torch.Tensor) and value.shape != like.shape:
            raise ValueError(f"optimizer.state entry {key!r} has shape {tuple(value.shape)}, but its parameter has "
                             f"shape {tuple(like.shape)}")
        return value

    def state_dict(self) -> dict[str, Any]:
        """torch's layout (``state[i]`` per parameter, ``param_groups``), so torch.optim loads it. Tensors
        are views of the flat buffers: copy (or ``torch.save``) before stepping again if you keep it.

        As in torch's, a parameter has an entry once a step has updated it (for SGD: its momentum). The
        flat buffers hold zeros for the others, which torch's SGD would read as a momentum buffer to
        blend the next gradient into instead of copying it."""
        self._ensure_buckets()
        if self._state_changed():
            self._sync_state()
        saved = super().state_dict()
        saved["state"] = {k: dict(v) if isinstance(v, _StateEntry) else v for k, v in saved["state"].items()}
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for buckets in self._buckets:
            for b in buckets:
                if not b.state:
                    continue
                counts = b.steps.tolist()  # host read: saving is not a training step
                for p, count in zip(b.params, counts):
                    if count == 0:
                        saved["state"].pop(index[id(p)], None)
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this class or of torch's Adam/AdamW (FusedAdam) / SGD (FusedSGD).

        As torch's: load-state-dict pre-hooks may return a rewritten state_dict (its state is the one
        loaded), post-hooks run last. State tensors must have their parameter's shape."""
        self._ensure_buckets()
        state_dict = state_dict.copy()  # shallow, as torch's: a pre-hook may edit it
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        for hook in list(pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for k, g in enumerate(state_dict["param_groups"]):
            self._validate_group(g, where=f" (saved param group {k})")
        self._check_state_shapes(state_dict)
        # torch's load (group checks, param_groups, __setstate__) without running the hooks a second time.
        self._optimizer_load_state_dict_pre_hooks = type(pre_hooks)()
        self._optimizer_load_state_dict_post_hooks = type(post_hooks)()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        ours = [p for g in self.param_groups for p in g["params"]]
        by_param = {id(p): saved_state.get(i) for p, i in zip(ours, saved_ids)}
        self.state = _TrackedState(self._changes)
        with torch.no_grad():
            for group, buckets in zip(self.param_groups, self._buckets):
                for b in buckets:
                    entries = [by_param.get(id(p)) for p in b.params]
                    if not any(entries):
                        b.state = {}
                        b.published = None
                        b.steps.zero_()
                        b.uniform_steps = True
                        continue
                    self._init_state(group, b, zero=True)
                    self._load_bucket(group, b, entries)
                    counts = b.steps.tolist()  # host read: loading is not a training step
                    b.uniform_steps = all(c == counts[0] for c in counts)
        self._synced = (self.state, self._changes.n)
        for hook in list(post_hooks.values()):
            hook(self)

    def _check_state_shapes(self, state_dict: dict[str, Any]) -> None:
        """Refuse, before anything is loaded, state tensors whose shape is not their parameter's (a
        checkpoint of another model): copied into the flat buffers they would be broadcast silently.
        Mismatched group sizes are left to torch's own check, which names them."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(ours["params"]) for g, ours in zip(groups, self.param_groups)):
            return
        for k, (g, ours) in enumerate(zip(groups, self.param_groups)):
            for i, p in zip(g["params"], ours["params"]):
                entry = state_dict["state"].get(i) or {}
                for key in self._state_keys:
                    if key == "step":  # a count, not a per-element tensor
                        continue
                    value = entry.get(key)
                    if isinstance(value, torch.Tensor) and value.shape != p.shape:
                        raise ValueError(
                            f"load_state_dict: state[{i}][{key!r}] (param group {k}) has shape {tuple(value.shape)}, "
                            f"but its parameter has shape {tuple(p.shape)}: a state_dict of another model?")

    def _load_bucket(self, group, b: _Bucket, entries: list) -> None:
        raise NotImplementedError

    @classmethod
    def from_torch(cls, optimizer: Optimizer, *, ema: EMA | None = None) -> "_FusedOptimizer":
        """The fused twin of a torch optimizer (same parameters, groups, hyperparameters and state)."""
        twin = fused_twin(optimizer, ema=ema)
        if not isinstance(twin, cls):
            raise TypeError(f"{cls.__name__}.from_torch: got a {type(optimizer).__name__}, whose twin is "
                            f"{type(twin).__name__}")
        return twin


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def _slicer(lo: int, hi: int, total: int):
    """t[lo:hi], without making views (microseconds each) in the common whole-buffer case."""
    if lo == 0 and hi == total:
        return _whole
    return lambda t: t[lo:hi]


def _nonfinite_check(b: _Bucket, grad: torch.Tensor, inv_scale, found_inf: torch.Tensor) -> None:
    if b.kernels is not None:
        b.kernels.optim_nonfinite_check(grad, inv_scale, found_inf)
        return
    g = grad.float()
    if inv_scale is not None:
        g = g * inv_scale
    bad = torch.logical_not(torch.isfinite(g)).any().to(torch.float32)
    torch.maximum(found_inf, bad, out=found_inf)


class FusedAdam(_FusedOptimizer):
    """Adam / AdamW over flat buffers, with torch.optim.Adam's math, one pass per step.

    Args:
        params: parameters or param groups (as torch.optim.Adam).
        lr: learning rate (float or tensor; tensors on the parameters' CUDA device are read by the kernel).
        betas: (beta1, beta2).
        eps: added to the denominator.
        weight_decay: L2 penalty (Adam) or decoupled decay (AdamW, see next).
        decoupled_weight_decay: True gives AdamW (``param *= 1 - lr * weight_decay``).
        ema: a :class:`fastgan.optim.EMA` whose shadows are updated in the same pass.

    ``step(closure=None, *, inv_scale=None)``; ``found_inf`` as described in :mod:`fastgan.optim.fused`.
    """

    _state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False, ema: EMA | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=False,
                        foreach=None, capturable=False, differentiable=False, fused=None,
                        decoupled_weight_decay=bool(decoupled_weight_decay))
        self._validate_group(defaults)  # betas too: then a pair
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults, ema)

    def _validate_group(self, group, where: str = "") -> None:
        get = functools.partial(_group_value, group, getattr(self, "defaults", {}))
        _check_hyper("lr", get("lr"), 0.0, tensor_ok=True, where=where)
        _check_hyper("eps", get("eps"), 0.0, where=where)
        _check_hyper("weight_decay", get("weight_decay"), 0.0, where=where)
        betas = get("betas")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}{where}")
        for beta in betas:
            _check_hyper("betas", beta, 0.0, 1.0, high_open=True, tensor_ok=True, where=where)
        for key in ("amsgrad", "maximize", "differentiable"):
            if get(key, False):
                raise ValueError(f"FusedAdam does not support {key}=True{where}")

    def _init_state(self, group, b: _Bucket, zero: bool = True) -> None:
        b.state = {"exp_avg": flat_zeros(b.total, b.state_dtype, b.device),
                   "exp_avg_sq": flat_zeros(b.total, b.state_dtype, b.device)}
        self._publish_state(b)

    def _publish_state(self, b: _Bucket, group=None) -> None:
        self._publish(b, [{"step": b.steps[i], "exp_avg": b.view_of(b.state["exp_avg"], i),
                           "exp_avg_sq": b.view_of(b.state["exp_avg_sq"], i)} for i in range(len(b.params))])

    def _take_entries(self, group, b: _Bucket, entries) -> None:
        if not b.state:
            self._init_state(group, b)
        for i, entry in entries.items():
            exp_avg, exp_avg_sq = b.view_of(b.state["exp_avg"], i), b.view_of(b.state["exp_avg_sq"], i)
            if not entry:
                exp_avg.zero_()
                exp_avg_sq.zero_()
                b.steps[i] = 0.0
                continue
            values = [self._entry_value(entry, key, exp_avg) for key in ("exp_avg", "exp_avg_sq")]
            step = entry["step"]
            exp_avg.copy_(values[0])
            exp_avg_sq.copy_(values[1])
            b.steps[i] = float(step)

    def _load_bucket(self, group, b: _Bucket, entries) -> None:
        for i, entry in enumerate(entries):
            if not entry:  # no saved state: a fresh start for this parameter (its moments are zero)
                b.steps[i] = 0.0
                continue
            b.view_of(b.state["exp_avg"], i).copy_(entry["exp_avg"])
            b.view_of(b.state["exp_avg_sq"], i).copy_(entry["exp_avg_sq"])
            b.steps[i] = float(entry["step"])

    def _update(self, group, b: _Bucket, lo: int, hi: int, steps, inv_scale, found_inf, check_inside,
                zero_grad: bool = False) -> None:
        beta1, beta2 = group["betas"]
        beta1, beta2 = _as_float(beta1, "betas"), _as_float(beta2, "betas")
        lr_tensor, lr = self._lr_args(group, b)
        cut = _slicer(lo, hi, b.total)
        shadow = cut(b.shadow) if b.shadow is not None else None
        args = (cut(b.flat_param), cut(b.flat_grad), cut(b.state["exp_avg"]), cut(b.state["exp_avg_sq"]),
                steps, found_inf, inv_scale)
        eps, weight_decay = float(group["eps"]), float(group["weight_decay"])
        decoupled, ema_beta = bool(group["decoupled_weight_decay"]), self._ema_beta()
        if b.kernels is not None:
            # Positional: pybind11 matches keyword arguments by name on every call (microseconds).
            b.kernels.optim_adam_step(*args, lr_tensor, lr, beta1, beta2, eps, weight_decay, decoupled, shadow,
                                      ema_beta, check_inside, *((True,) if zero_grad else ()))
        else:
            _adam_torch(*args, lr=lr_tensor if lr_tensor is not None else group["lr"], beta1=beta1, beta2=beta2,
                        eps=eps, weight_decay=weight_decay, decoupled=decoupled, ema_shadow=shadow,
                        ema_beta=ema_beta)


class FusedSGD(_FusedOptimizer):
    """SGD with momentum, dampening, Nesterov and weight decay over flat buffers (torch.optim.SGD's math).

    Args as torch.optim.SGD (``lr`` required), plus ``ema`` (see :class:`FusedAdam`).
    """

    _state_keys = ("momentum_buffer",)

    def __init__(self, params, lr: float | torch.Tensor, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, ema: EMA | None = None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=False, foreach=None, differentiable=False, fused=None)
        self._validate_group(defaults)
        super().__init__(params, defaults, ema)

    def _validate_group(self, group, where: str = "") -> None:
        get = functools.partial(_group_value, group, getattr(self, "defaults", {}))
        _check_hyper("lr", get("lr"), 0.0, tensor_ok=True, where=where)
        _check_hyper("momentum", get("momentum"), 0.0, where=where)
        _check_hyper("dampening", get("dampening"), where=where)
        _check_hyper("weight_decay", get("weight_decay"), 0.0, where=where)
        if get("nesterov", False) and (get("momentum") <= 0 or get("dampening") != 0):
            raise ValueError(f"nesterov momentum requires a momentum and zero dampening{where}")
        for key in ("maximize", "differentiable"):
            if get(key, False):
                raise ValueError(f"FusedSGD does not support {key}=True{where}")

    def _init_state(self, group, b: _Bucket, zero: bool = True) -> None:
        # Without momentum SGD has no state; the entry marks the bucket as initialised.
        b.state = {"momentum_buffer": None}
        if group["momentum"] != 0:
            self._ensure_momentum_buffer(group, b)

    def _ensure_momentum_buffer(self, group, b: _Bucket) -> None:
        # SGD's step counts count momentum updates (the kernels advance them only when momentum != 0), so
        # they are all 0 here: the first update of each parameter copies its gradient, as torch's does.
        if b.state.get("momentum_buffer") is None:
            b.state["momentum_buffer"] = flat_zeros(b.total, b.state_dtype, b.device)
            self._publish_state(b, group)

    def _publish_state(self, b: _Bucket, group=None) -> None:
        # As in torch, a parameter has a momentum buffer once momentum has updated it (or one was loaded),
        # also while its group's momentum is 0; state_dict leaves out those with a count of 0.
        if b.state.get("momentum_buffer") is None:
            return
        self._publish(b, [{"momentum_buffer": b.view_of(b.state["momentum_buffer"], i)} for i in range(len(b.params))])

    def _take_entries(self, group, b: _Bucket, entries) -> None:
        for i, entry in entries.items():
            buf = entry.get("momentum_buffer") if entry else None
            if buf is None:  # torch's next momentum update starts the buffer as a copy of the gradient
                b.steps[i] = 0.0
                continue
            if b.state.get("momentum_buffer") is None:
                b.state["momentum_buffer"] = flat_zeros(b.total, b.state_dtype, b.device)
            view = b.view_of(b.state["momentum_buffer"], i)
            view.copy_(self._entry_value(entry, "momentum_buffer", view))
            b.steps[i] = 1.0

    def _load_bucket(self, group, b: _Bucket, entries) -> None:
        if b.state.get("momentum_buffer") is None:
            b.state["momentum_buffer"] = flat_zeros(b.total, b.state_dtype, b.device)
            self._publish_state(b, group)
        for i, entry in enumerate(entries):
            buf = entry.get("momentum_buffer") if entry else None
            if buf is None:
                b.steps[i] = 0.0
                continue
            b.view_of(b.state["momentum_buffer"], i).copy_(buf)
            b.steps[i] = 1.0

    def _update(self, group, b: _Bucket, lo: int, hi: int, steps, inv_scale, found_inf, check_inside,
                zero_grad: bool = False) -> None:
        momentum = float(group["momentum"])
        if momentum != 0 and b.state.get("momentum_buffer") is None:
            self._ensure_momentum_buffer(group, b)  # momentum switched on after the first step
        lr_tensor, lr = self._lr_args(group, b)
        cut = _slicer(lo, hi, b.total)
        shadow = cut(b.shadow) if b.shadow is not None else None
        buf = cut(b.state["momentum_buffer"]) if momentum != 0 else None
        args = (cut(b.flat_param), cut(b.flat_grad), buf, steps, found_inf, inv_scale)
        dampening, nesterov = float(group["dampening"]), bool(group["nesterov"])
        weight_decay, ema_beta = float(group["weight_decay"]), self._ema_beta()
        if b.kernels is not None:
            b.kernels.optim_sgd_step(*args, lr_tensor, lr, momentum, dampening, nesterov, weight_decay, shadow,
                                     ema_beta, check_inside, *((True,) if zero_grad else ()))
        else:
            kw = dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                      ema_shadow=shadow, ema_beta=ema_beta)
            _sgd_torch(*args, lr=lr_tensor if lr_tensor is not None else group["lr"], **kw)


# ---- the same math as plain torch ops (no fastgan._C, or dtypes/devices it does not cover) ---------
# Written to follow torch.optim's single-tensor code op by op. The step is computed out of place and
# selected with found_inf, so the fallback too never synchronises with the device.

def _select(skip: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
    old.copy_(torch.where(skip, old, new.to(old.dtype)))


def _adam_torch(param, grad, exp_avg, exp_avg_sq, steps, found_inf, inv_scale, *, lr, beta1, beta2, eps,
                weight_decay, decoupled, ema_shadow, ema_beta) -> None:
    g = grad.to(exp_avg.dtype) if grad.dtype != exp_avg.dtype else grad.clone()
    if inv_scale is not None:
        g = g * inv_scale
    p = param.to(exp_avg.dtype) if param.dtype != exp_avg.dtype else param.clone()
    if weight_decay != 0:
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    m = exp_avg.lerp(g, 1 - beta1)
    v = (exp_avg_sq * beta2).addcmul_(g, g, value=1 - beta2)
    step = steps[0].double() + 1
    bias_correction1 = 1 - torch.pow(step.new_full((), beta1), step)
    bias_correction2 = 1 - torch.pow(step.new_full((), beta2), step)
    step_size = (lr / bias_correction1).to(m.dtype)
    denom = (v.sqrt() / bias_correction2.sqrt().to(m.dtype)).add_(eps)
    p = p + (-step_size) * m / denom
    skip = found_inf != 0
    _select(skip, param, p)
    _select(skip, exp_avg, m)
    _select(skip, exp_avg_sq, v)
    steps.add_(1 - found_inf)
    if ema_shadow is not None:
        _select(skip, ema_shadow, ema_shadow.lerp(param.to(ema_shadow.dtype), 1 - ema_beta))


def _sgd_torch(param, grad, momentum_buffer, steps, found_inf, inv_scale, *, lr, momentum, dampening, nesterov,
               weight_decay, ema_shadow, ema_beta) -> None:
    opmath = torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype
    g = grad.to(opmath) if grad.dtype != opmath else grad.clone()
    if inv_scale is not None:
        g = g * inv_scale
    p = param.to(opmath)
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    skip = found_inf != 0
    if momentum != 0:
        first = steps[0] == 0
        buf = torch.where(first, g, (momentum_buffer * momentum).add_(g, alpha=1 - dampening).to(g.dtype))
        _select(skip, momentum_buffer, buf)
        g = g.add(buf, alpha=momentum) if nesterov else buf
        steps.add_(1 - found_inf)  # SGD counts momentum updates (the first one copies the gradient)
    _select(skip, param, p - lr * g if isinstance(lr, torch.Tensor) else p.add(g, alpha=-lr))
    if ema_shadow is not None:
        _select(skip, ema_shadow, ema_shadow.lerp(param.to(ema_shadow.dtype), 1 - ema_beta))


# ---- twins of torch optimizers ---------------------------------------------------------------------

def twin_of(optimizer: Optimizer) -> _FusedOptimizer | None:
    """The fused twin ``fused_twin`` made of the torch optimizer ``optimizer`` earlier, or None."""
    earlier = getattr(getattr(optimizer, "state_dict", None), "__self__", None)
    return earlier if isinstance(earlier, _FusedOptimizer) and earlier is not optimizer else None


def fused_twin(optimizer: Optimizer, *, ema: EMA | None = None) -> _FusedOptimizer:
    """The fused twin of a torch ``Adam`` / ``AdamW`` (-> FusedAdam) or ``SGD`` (-> FusedSGD): same
    parameters, param groups, hyperparameters and (if it has stepped) state. A fused optimizer is
    returned as is. The torch optimizer should not be stepped afterwards (its parameters now live in
    the twin's flat buffers). The two share their param groups, so an LR scheduler of either (made
    before or after) sets the twin's learning rate, and the torch optimizer's ``state_dict`` /
    ``load_state_dict`` are the twin's (torch's layout), so code that saves or restores the optimizer
    it built saves and restores the state that trains. Called again on that torch optimizer (a second
    Trainer given it), it returns the same twin."""
    earlier = twin_of(optimizer)
    if earlier is not None:
        optimizer = earlier  # its parameters and state live in that twin now; a second twin would start afresh
    if isinstance(optimizer, _FusedOptimizer):
        if ema is not None and optimizer.ema is not ema:
            raise ValueError("fused_twin: the optimizer is already fused and has a different ema")
        return optimizer
    is_adamw = isinstance(optimizer, torch.optim.AdamW)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        groups = []
        for g in optimizer.param_groups:
            if g.get("amsgrad") or g.get("maximize"):
                raise ValueError("fused_twin: amsgrad / maximize have no fused twin")
            extra = {k: v for k, v in g.items() if k not in ("params",)}
            extra["decoupled_weight_decay"] = bool(g.get("decoupled_weight_decay", False) or is_adamw)
            extra.update(foreach=None, fused=None, capturable=False, differentiable=False)
            groups.append({"params": list(g["params"]), **extra})
        d = optimizer.defaults  # the twin's defaults too: for groups added later, and keys older checkpoints lack
        twin = FusedAdam(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
                         decoupled_weight_decay=bool(d.get("decoupled_weight_decay", False) or is_adamw), ema=ema)
    elif isinstance(optimizer, torch.optim.SGD):
        groups = []
        for g in optimizer.param_groups:
            if g.get("maximize"):
                raise ValueError("fused_twin: maximize has no fused twin")
            extra = {k: v for k, v in g.items() if k not in ("params",)}
            extra.update(foreach=None, fused=None, differentiable=False)
            groups.append({"params": list(g["params"]), **extra})
        d = optimizer.defaults
        twin = FusedSGD(groups, lr=d["lr"], momentum=d["momentum"], dampening=d["dampening"],
                        nesterov=d["nesterov"], weight_decay=d["weight_decay"], ema=ema)
    else:
        raise TypeError(f"fused_twin: no fused twin for {type(optimizer).__name__} (Adam, AdamW and SGD have one)")
    if any(len(s) for s in optimizer.state.values()):
        sd = optimizer.state_dict()
        sd["param_groups"] = twin.state_dict()["param_groups"]  # ids are the same; keep the twin's groups
        twin.load_state_dict(sd)
    # One set of param groups for both: an LR scheduler attached to the torch optimizer (before or after)
    # sets the learning rate the twin uses, and reading its param_groups shows the twin's values. torch's
    # schedulers warn when their optimizer's own step never ran, which is now the case by design.
    optimizer.param_groups = twin.param_groups
    optimizer._opt_called = True
    # Its own state stays empty (the twin's lives in flat buffers): saving it would save no moments, and
    # loading into it would replace the shared param groups and reach nothing that trains.
    optimizer.state_dict = twin.state_dict
    optimizer.load_state_dict = twin.load_state_dict
    return twin
