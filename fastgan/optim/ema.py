"""Exponential moving average of a model's weights (e.g. G's weights for sampling).

``shadow = beta * shadow + (1 - beta) * param`` after each optimizer step, computed as torch's
``lerp(shadow, param, 1 - beta)``; buffers (BatchNorm running statistics) are copied, as StyleGAN's
G_ema does. Shadows of bf16/fp16 parameters are kept in float32: with beta = 0.999 each update moves a
shadow by 1e-3 of the gap, below bf16's resolution, so a low-precision shadow would never move.

Usable on its own (``ema.update()`` after ``opt.step()``) or passed to ``FusedAdam(..., ema=ema)`` /
``FusedSGD(..., ema=ema)``, which then update the shadows in the same pass as the parameters.
"""
from __future__ import annotations

import copy
import numbers
from typing import Any

import torch
from torch import nn

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class EMA:
    """Moving average of ``model``'s parameters (and a copy of its buffers).

    Args:
        model: the module whose weights are averaged. The EMA keeps references to its parameter and
            buffer tensors, so build it after moving the model to its device.
        beta: decay in [0, 1]; ``beta = 0`` tracks the parameters exactly, ``beta = 1`` freezes the
            average. May be changed between steps (``ema.beta = ...``).
    """

    def __init__(self, model: nn.Module, beta: float = 0.999):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.beta = beta
        self.model = model
        named = list(model.named_parameters())
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._index = {id(p): j for j, p in enumerate(self.params)}
        with torch.no_grad():
            self.shadow_params = [p.detach().to(_shadow_dtype(p.dtype), copy=True) for p in self.params]
        named_buffers = list(model.named_buffers())
        self.buffer_names = [n for n, _ in named_buffers]
        self.buffers = [b for _, b in named_buffers]
        self.shadow_buffers = [b.detach().clone() for b in self.buffers]
        # Indices of params whose shadow a fused optimizer updates in its own pass.
        self._fused: set[int] = set()

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"beta must be a number in [0, 1], got {value!r}")
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {value}")
        self._beta = value

    # ---- updates ---------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self) -> None:
        """shadow <- lerp(shadow, param, 1 - beta) for every parameter; buffers copied."""
        self._lerp(range(len(self.params)), 1.0 - self.beta)
        self.copy_buffers()

    def copy_buffers(self) -> None:
        """Copy the model's buffers (e.g. BatchNorm running statistics) into the shadow buffers."""
        if not self.buffers:
            return
        with torch.no_grad():
            torch._foreach_copy_(self.shadow_buffers, self.buffers)

    def _lerp(self, indices, weight) -> None:
        shadows, params = [], []
        for j in indices:
            shadows.append(self.shadow_params[j])
            p = self.params[j].detach()
            params.append(p if p.dtype == shadows[-1].dtype else p.to(shadows[-1].dtype))
        if not shadows:
            return
        if isinstance(weight, torch.Tensor):
            for s, p in zip(shadows, params):
                s.lerp_(p, weight.to(s.dtype))
        else:
            torch._foreach_lerp_(shadows, params, weight)

    def _after_fused_step(self, found_inf: torch.Tensor, stale_params=()) -> None:
        """Called by the fused optimizers at the end of their step (grad mode already off there): the
        shadows they did not update in their pass -- those not in a flat buffer, and those of
        ``stale_params`` (parameters the step skipped for want of a gradient) -- get the same
        (skip-aware, sync-free) update; buffers are copied."""
        rest = []
        if len(self._fused) < len(self.params):
            rest = [j for j in range(len(self.params)) if j not in self._fused]
        rest += [self._index[id(p)] for p in stale_params if id(p) in self._index]
        if rest:
            weight = (1.0 - found_inf) * (1.0 - self.beta)
            self._lerp(rest, weight)
        self.copy_buffers()

    def _adopt_flat(self, params: list[torch.Tensor], offsets: list[int], flat_param: torch.Tensor) -> torch.Tensor | None:
        """Move the shadows of ``params`` (one flat parameter buffer) into one float32 flat buffer laid
        out like ``flat_param``, so a kernel can update them in the parameters' pass. Parts belonging
        to parameters this EMA does not average are scratch. Returns None if none of them is averaged."""
        index = self._index
        if not any(id(p) in index for p in params):
            return None
        from fastgan.optim.fused import flat_zeros  # late: fused imports this module

        flat = flat_zeros(flat_param.numel(), torch.float32, flat_param.device)
        with torch.no_grad():
            for p, off in zip(params, offsets):
                seg = flat[off:off + p.numel()]
                j = index.get(id(p))
                if j is None:
                    seg.copy_(p.detach().reshape(-1))
                    continue
                seg.copy_(self.shadow_params[j].reshape(-1))
                self.shadow_params[j] = seg.view(p.shape)
                self._fused.add(j)
        return flat

    # ---- using the average -----------------------------------------------------------------------
    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        """Copy the averaged weights and the buffers into ``module`` (same architecture) and return it."""
        own = dict(module.named_parameters())
        own_buffers = dict(module.named_buffers())
        for name, shadow in zip(self.param_names, self.shadow_params):
            if name not in own:
                raise ValueError(f"module has no parameter {name!r}")
            own[name].copy_(shadow)
        for name, shadow in zip(self.buffer_names, self.shadow_buffers):
            if name not in own_buffers:
                raise ValueError(f"module has no buffer {name!r}")
            own_buffers[name].copy_(shadow)
        return module

    @torch.no_grad()
    def averaged_model(self) -> nn.Module:
        """A copy of the model carrying the averaged weights (for sampling); the model is untouched.

        The copy's parameters are fresh, contiguous tensors (not views of an optimizer's flat buffer)
        and have no gradients."""
        clone = copy.deepcopy(self.model)
        for p in clone.parameters():
            p.grad = None
        own = dict(clone.named_parameters())
        for name, shadow in zip(self.param_names, self.shadow_params):
            p = own[name]
            p.data = shadow.detach().to(dtype=p.dtype, copy=True).reshape(p.shape)
        own_buffers = dict(clone.named_buffers())
        for name, shadow in zip(self.buffer_names, self.shadow_buffers):
            own_buffers[name].copy_(shadow)
        return clone

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"beta", "params": {name: shadow}, "buffers": {name: shadow}}`` (tensors are references)."""
        return {
            "beta": self.beta,
            "params": dict(zip(self.param_names, self.shadow_params)),
            "buffers": dict(zip(self.buffer_names, self.shadow_buffers)),
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load shadows saved by :meth:`state_dict` (copied in place, so a fused optimizer keeps them)."""
        missing = set(self.param_names) - set(state_dict["params"])
        if missing:
            raise ValueError(f"EMA state_dict lacks parameters {sorted(missing)}")
        self.beta = state_dict["beta"]
        for name, shadow in zip(self.param_names, self.shadow_params):
            shadow.copy_(state_dict["params"][name])
        for name, shadow in zip(self.buffer_names, self.shadow_buffers):
            if name in state_dict.get("buffers", {}):
                shadow.copy_(state_dict["buffers"][name])

    def __repr__(self) -> str:
        return f"EMA(beta={self.beta}, params={len(self.params)}, buffers={len(self.buffers)})"
