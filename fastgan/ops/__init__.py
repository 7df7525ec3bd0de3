"""Fused ops: each module holds the plain-PyTorch reference beside its fast paths."""
from fastgan.ops.losses import LOSS_KINDS, DLoss, d_loss, d_loss_reference, g_loss, g_loss_reference  # noqa: F401
from fastgan.ops.activations import ACTIVATIONS, Activation, resolve_act  # noqa: F401
from fastgan.ops.bias_act import bias_act, bias_act_reference  # noqa: F401
from fastgan.ops.linear_act import linear_act, linear_act_reference  # noqa: F401
from fastgan.ops.batch_norm_act import batch_norm_act, batch_norm_act_reference  # noqa: F401
