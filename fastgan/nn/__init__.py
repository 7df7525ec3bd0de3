"""fastgan.nn"""
from fastgan.nn.batch_norm_act import BatchNormAct1d, BatchNormAct2d  # noqa: F401
from fastgan.nn.layers import (BiasAct, Conv1dAct, Conv2dAct, Conv3dAct, ConvTranspose1dAct,  # noqa: F401
                               ConvTranspose2dAct, ConvTranspose3dAct, FusedLinear)
from fastgan.nn.fuse import fuse  # noqa: F401
