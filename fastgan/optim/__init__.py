"""fastgan.optim: the batched optimizer update over flat buffers (C++/CUDA in ``fastgan._C``).

* :class:`FusedAdam` (Adam / AdamW) and :class:`FusedSGD`: ``torch.optim.Optimizer`` subclasses with
  torch's math, one pass per step (unscale, non-finite skip, update, EMA), state_dicts in torch's layout.
* :class:`EMA`: moving average of a model's weights (and copy of its buffers), standalone or fused.
* :func:`fused_twin`: the fused twin of a torch Adam / AdamW / SGD; :func:`twin_of`: the twin made earlier.
"""
from fastgan.optim.ema import EMA
from fastgan.optim.fused import FusedAdam, FusedSGD, fused_twin, twin_of

__all__ = ["EMA", "FusedAdam", "FusedSGD", "fused_twin", "twin_of"]
