"""BatchNorm + activation modules: drop-in replacements for ``nn.BatchNorm1d/2d`` followed by an
activation, running ``fastgan.ops.batch_norm_act``.

They subclass the torch modules, so parameters and buffers keep torch's names (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``): state_dicts load both ways, and
``from_batchnorm`` wraps an existing BatchNorm sharing its very tensors (what ``fastgan.fuse`` does).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastgan.nn.layers import _ActMixin, _adopt
from fastgan.ops.batch_norm_act import batch_norm_act


class _BatchNormActMixin(_ActMixin):
    """forward() of nn.BatchNorm (same training / running-statistics logic) through the fused op."""

    _torch_base: type = nn.modules.batchnorm._BatchNorm

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        momentum = self.momentum
        num_batches_tracked = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average: factor 1 / num_batches_tracked
                num_batches_tracked = self.num_batches_tracked
        # As nn.BatchNorm: batch statistics in training, or always when there are no running stats;
        # running stats are updated only in training (and only if tracked).
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update_stats = self.training and self.track_running_stats
        running_mean = self.running_mean if (not self.training or update_stats) else None
        running_var = self.running_var if (not self.training or update_stats) else None
        return batch_norm_act(input, self.weight, self.bias, running_mean, running_var, use_batch_stats,
                              momentum=momentum, eps=self.eps, act=self.act, alpha=self.alpha, impl=self.impl,
                              num_batches_tracked=num_batches_tracked)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._act_repr()}"  # alpha only where the activation has one

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, act: str = "linear",
                       alpha: Optional[float] = None, impl: str = "auto"):
        """A module computing act(bn(x)) that SHARES bn's parameters and buffers (the same tensor
        objects: training one trains the other; bn's state_dict keys are kept)."""
        if type(bn) is not cls._torch_base:
            raise TypeError(f"{cls.__name__}.from_batchnorm expects an {cls._torch_base.__name__} "
                            f"(exactly that class), got {type(bn).__name__}")
        # All of bn's state -- its parameter and buffer objects, and whatever else the instance carries
        # (extra buffers, non-persistent flags, hooks) -- as the fused linear and conv layers adopt theirs.
        module = _adopt(cls, bn)
        module._set_act(act, alpha, impl)
        return module


def _bias_kwarg(bias: bool) -> dict:
    """nn.BatchNorm's keyword-only ``bias`` (affine weight without a shift), passed only when False:
    torch versions before it keep working with the default, and refuse bias=False themselves."""
    return {} if bias else {"bias": False}


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    """``act(nn.BatchNorm1d(x))`` for (N, C) or (N, C, L) input, fused (``fastgan.ops.batch_norm_act``)."""

    _torch_base = nn.BatchNorm1d

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, act: str = "linear",
                 alpha: Optional[float] = None, impl: str = "auto", *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **_bias_kwarg(bias))
        self._set_act(act, alpha, impl)


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    """``act(nn.BatchNorm2d(x))`` for (N, C, H, W) input (NCHW or channels_last), fused
    (``fastgan.ops.batch_norm_act``)."""

    _torch_base = nn.BatchNorm2d

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, act: str = "linear",
                 alpha: Optional[float] = None, impl: str = "auto", *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **_bias_kwarg(bias))
        self._set_act(act, alpha, impl)
