"""Fused ops: each module holds the plain-PyTorch reference beside its fast paths."""
from fastgan.ops.losses import LOSS_KINDS, DLoss, d_loss, d_loss_reference, g_loss, g_loss_reference  # noqa: F401
