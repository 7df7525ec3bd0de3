"""fastgan: fast GAN training for PyTorch."""
__version__ = "0.1.0"

from fastgan import ops  # noqa: E402,F401
from fastgan.info import info  # noqa: E402,F401
from fastgan.trainer import Trainer  # noqa: E402,F401
from fastgan.nn.fuse import fuse  # noqa: E402,F401
