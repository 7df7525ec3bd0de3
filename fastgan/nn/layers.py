"""Layers on the fused ops, with the parameter names of the torch modules they stand for, so
state_dicts load both ways: ``FusedLinear`` (``nn.Linear`` + activation, one ``linear_act``),
``BiasAct`` (``bias_act`` as a module) and ``Conv{1,2,3}dAct`` / ``ConvTranspose{1,2,3}dAct`` (the
convolution without its bias, then bias + activation in one ``bias_act`` pass).

Each subclasses the torch module it replaces (``isinstance(m, nn.Conv2d)`` stays true, weight
initialisers keep working) and has ``from_<module>(module, act, alpha)``, which builds the fused
layer around the SAME parameter tensors (what ``fastgan.fuse`` uses).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgan.ops.activations import ACTIVATIONS, resolve_act
from fastgan._dispatch import check_impl
from fastgan.ops.bias_act import _check_clamp, _check_gain, autocast_dtype, bias_act, bias_act_fresh_
from fastgan.ops.linear_act import linear_act

__all__ = ["FusedLinear", "BiasAct", "Conv1dAct", "Conv2dAct", "Conv3dAct",
           "ConvTranspose1dAct", "ConvTranspose2dAct", "ConvTranspose3dAct"]


def _adopt(cls, module: nn.Module) -> nn.Module:
    """An instance of ``cls`` holding ``module``'s state: the same parameter and buffer tensors,
    its own copies of the registries (so later registrations on one do not show on the other)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    return new


class _ActMixin:
    """The activation settings shared by the fused layers."""

    act: str
    alpha: float
    impl: str

    def _set_act(self, act: str, alpha: float | None, impl: str = "auto") -> None:
        spec, alpha = resolve_act(act, alpha)  # validated at construction, not at the first forward
        self.act, self.alpha, self.impl = spec.name, alpha, check_impl(impl)

    def _act_repr(self) -> str:
        return f"act={self.act!r}" + (f", alpha={self.alpha}" if ACTIVATIONS[self.act].alpha_meaning else "")


class FusedLinear(_ActMixin, nn.Linear):
    """``act(nn.Linear(x))`` in one fused op (``fastgan.ops.linear_act``).

    Same constructor arguments, parameters (``weight``, ``bias``) and initialisation as
    ``nn.Linear``, plus ``act`` / ``alpha`` (see ``fastgan.ops.activations``) and ``impl``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: str = "linear",
                 alpha: float | None = None, device=None, dtype=None, impl: str = "auto") -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._set_act(act, alpha, impl)

    @classmethod
    def from_linear(cls, linear: nn.Linear, act: str = "linear", alpha: float | None = None,
                    impl: str = "auto") -> "FusedLinear":
        """A FusedLinear around ``linear``'s own weight and bias tensors."""
        fused = _adopt(cls, linear)
        fused._set_act(act, alpha, impl)
        return fused

    def forward(self, x: Tensor) -> Tensor:
        return linear_act(x, self.weight, self.bias, self.act, self.alpha, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._act_repr()}"


class BiasAct(_ActMixin, nn.Module):
    """``clamp(act(x + bias) * gain)`` with a learnable bias of ``num_features`` along ``dim``
    (``fastgan.ops.bias_act``). ``bias=False``: activation (and gain / clamp) only."""

    def __init__(self, num_features: int, bias: bool = True, dim: int = 1, act: str = "linear",
                 alpha: float | None = None, gain: float = 1.0, clamp: float | None = None,
                 device=None, dtype=None, impl: str = "auto") -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 0:
            raise ValueError(f"num_features must be an int >= 0, got {num_features!r}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"dim must be an int (the dimension the bias runs along), got {dim!r}")
        _check_gain(gain)
        _check_clamp(clamp)
        self.num_features, self.dim, self.gain, self.clamp = num_features, dim, gain, clamp
        self._set_act(act, alpha, impl)
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """The bias back to its initial zeros (what re-initialising a model calls on each module)."""
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return bias_act(x, self.bias, self.dim, self.act, self.alpha, self.gain, self.clamp, impl=self.impl)

    def extra_repr(self) -> str:
        extra = f", gain={self.gain}" if self.gain != 1 else ""
        extra += f", clamp={self.clamp}" if self.clamp is not None else ""
        return f"{self.num_features}, bias={self.bias is not None}, dim={self.dim}, {self._act_repr()}{extra}"


class _ConvActMixin(_ActMixin):
    """A convolution module whose forward runs the convolution without bias, then bias + activation
    in one ``bias_act`` pass (NCHW or channels_last, as the convolution returns it); in bf16 / fp16
    the convolution adds the bias (see ``_bias_in_conv``)."""

    @classmethod
    def from_conv(cls, conv: nn.Module, act: str = "linear", alpha: float | None = None, impl: str = "auto"):
        """The fused layer around ``conv``'s own weight and bias tensors."""
        if type(conv) is not cls._base:
            raise TypeError(f"{cls.__name__}.from_conv needs an nn.{cls._base.__name__}, got {type(conv).__name__}")
        fused = _adopt(cls, conv)
        fused._set_act(act, alpha, impl)
        return fused

    def _bias_in_conv(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
        """Whether the convolution adds the bias itself: when it computes in bfloat16 / float16
        (under autocast, which casts the bias with x and weight as for torch's conv, or not). There
        the conv adds the bias to its float32 accumulator before its one rounding, as torch's conv;
        added afterwards by bias_act it would meet an already rounded output: a second rounding,
        which flips relu kinks of outputs near 0 (more often than torch's) and so moves gradients.
        In float32 / float64 bias_act adds it, fused with the activation."""
        if bias is None:
            return False
        low = autocast_dtype(input.device.type)
        dtype = low if low is not None and weight.dtype != torch.float64 else weight.dtype
        return dtype in (torch.bfloat16, torch.float16)

    def _bias_act(self, y: Tensor, bias: Tensor | None) -> Tensor:
        if y.dim() == len(self.kernel_size) + 1:
            # An unbatched input ((C, L), (C, H, W), ...), which torch's convolutions accept: channels on dim 0.
            return bias_act(y, bias, 0, self.act, self.alpha, impl=self.impl)
        # y is the convolution's fresh output: the activation may overwrite it (bias_act_fresh_).
        return bias_act_fresh_(y, bias, self.act, self.alpha, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._act_repr()}"


def _conv_act_class(base: type, doc: str) -> type:
    def __init__(self, *args, act: str = "linear", alpha: float | None = None, impl: str = "auto", **kwargs):
        base.__init__(self, *args, **kwargs)
        self._set_act(act, alpha, impl)

    if issubclass(base, nn.modules.conv._ConvTransposeNd):
        fn = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
              nn.ConvTranspose3d: F.conv_transpose3d}[base]

        def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
            # nn.ConvTranspose*d.forward, with the bias left to bias_act (float32 / float64)
            if self.padding_mode != "zeros":
                raise ValueError(f"Only 'zeros' padding mode is supported for {type(self).__name__}")
            spatial = len(self.kernel_size)
            output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                                  spatial, self.dilation)
            # Each read of a parametrized weight runs its parametrization (spectral_norm: a power
            # iteration that updates u and v in training): one read per forward, as torch's conv.
            weight, bias = self.weight, self.bias
            in_conv = self._bias_in_conv(input, weight, bias)
            y = fn(input, weight, bias if in_conv else None, self.stride, self.padding, output_padding,
                   self.groups, self.dilation)
            return self._bias_act(y, None if in_conv else bias)
    else:
        def forward(self, input: Tensor) -> Tensor:
            weight, bias = self.weight, self.bias  # one read each (see the transposed forward above)
            in_conv = self._bias_in_conv(input, weight, bias)
            y = self._conv_forward(input, weight, bias if in_conv else None)
            return self._bias_act(y, None if in_conv else bias)

    name = base.__name__ + "Act"
    return type(name, (_ConvActMixin, base), {"__init__": __init__, "forward": forward, "__doc__": doc, "_base": base,
                                              "__module__": __name__, "__qualname__": name})


_CONV_DOC = ("``act(nn.{base}(x))``: the convolution without bias, then bias + activation in one fused "
             "pass (in bfloat16 / float16, autocast included, the convolution adds the bias as torch's "
             "does, then the activation pass). Same constructor arguments, parameters and initialisation as ``nn.{base}``, plus "
             "keyword-only ``act`` / ``alpha`` / ``impl``.")
Conv1dAct = _conv_act_class(nn.Conv1d, _CONV_DOC.format(base="Conv1d"))
Conv2dAct = _conv_act_class(nn.Conv2d, _CONV_DOC.format(base="Conv2d"))
Conv3dAct = _conv_act_class(nn.Conv3d, _CONV_DOC.format(base="Conv3d"))
ConvTranspose1dAct = _conv_act_class(nn.ConvTranspose1d, _CONV_DOC.format(base="ConvTranspose1d"))
ConvTranspose2dAct = _conv_act_class(nn.ConvTranspose2d, _CONV_DOC.format(base="ConvTranspose2d"))
ConvTranspose3dAct = _conv_act_class(nn.ConvTranspose3d, _CONV_DOC.format(base="ConvTranspose3d"))

# torch conv type -> its fused twin (fastgan.fuse uses this)
CONV_ACT_OF: dict[type, type] = {nn.Conv1d: Conv1dAct, nn.Conv2d: Conv2dAct, nn.Conv3d: Conv3dAct,
                                 nn.ConvTranspose1d: ConvTranspose1dAct, nn.ConvTranspose2d: ConvTranspose2dAct,
                                 nn.ConvTranspose3d: ConvTranspose3dAct}
