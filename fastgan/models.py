"""Small generator / discriminator pairs that ``fastgan train`` uses: an MLP for 2-D and flat data
(also usable on images, flattened), and a DCGAN-style convolutional pair for square images whose
side is a power of two (8×8 digits, image folders). Every generator exposes ``latent_dim``.

Discriminators take ``pack`` (PacGAN): they judge ``pack`` samples concatenated along dimension 1,
so their first layer takes ``pack`` times the data's channels or features.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class MLPGenerator(nn.Module):
    """z (latent_dim) → Linear/ReLU × len(hidden) → Linear → reshape to ``sample_shape``,
    with a final ``tanh`` when ``bounded`` (data in [-1, 1])."""

    def __init__(self, latent_dim: int, sample_shape: tuple[int, ...], hidden: tuple[int, ...] = (256, 256),
                 bounded: bool = True):
        super().__init__()
        _check_positive("latent_dim", latent_dim)
        self.latent_dim = latent_dim
        self.sample_shape = tuple(int(s) for s in sample_shape)
        layers: list[nn.Module] = []
        width = latent_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, math.prod(self.sample_shape)))
        if bounded:
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], -1)).reshape(z.shape[0], *self.sample_shape)


class MLPDiscriminator(nn.Module):
    """x (flattened, ``pack`` samples side by side) → Linear/LeakyReLU(0.2) × len(hidden) → one logit."""

    def __init__(self, sample_shape: tuple[int, ...], hidden: tuple[int, ...] = (256, 256), pack: int = 1):
        super().__init__()
        _check_positive("pack", pack)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.pack = pack
        layers: list[nn.Module] = []
        width = math.prod(self.sample_shape) * pack
        for size in hidden:
            layers += [nn.Linear(width, size), nn.LeakyReLU(0.2)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1)).squeeze(1)


def _check_image_size(image_size: int) -> int:
    if not isinstance(image_size, int) or image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"the dcgan model needs square images whose side is a power of two >= 8, "
                         f"got {image_size!r} (use --image-size, or --model mlp)")
    return int(math.log2(image_size)) - 2  # number of 2× up/down-sampling stages from 4×4


class DCGANGenerator(nn.Module):
    """DCGAN generator (Radford et al., 2016) for ``channels``×S×S images, S a power of two ≥ 8:
    z → ConvTranspose to 4×4 → (ConvTranspose stride 2, BatchNorm, ReLU) × log2(S/4) → tanh."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int = 64):
        super().__init__()
        _check_positive("latent_dim", latent_dim)
        _check_positive("channels", channels)
        stages = _check_image_size(image_size)
        self.latent_dim = latent_dim
        top = width * 2 ** (stages - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, top, 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(top), nn.ReLU()]
        for stage in range(stages - 1):
            out = top // 2 ** (stage + 1)
            layers += [nn.ConvTranspose2d(top // 2 ** stage, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], -1, 1, 1))


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator for ``channels``×S×S images (``pack`` of them stacked on the channels):
    (Conv stride 2, LeakyReLU(0.2)) × log2(S/4) (BatchNorm after all but the first) → Conv 4×4 → logit."""

    def __init__(self, channels: int, image_size: int, width: int = 64, pack: int = 1):
        super().__init__()
        _check_positive("channels", channels)
        _check_positive("pack", pack)
        stages = _check_image_size(image_size)
        self.pack = pack
        layers: list[nn.Module] = [nn.Conv2d(channels * pack, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        current = width
        for _ in range(stages - 1):
            layers += [nn.Conv2d(current, current * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(current * 2),
                       nn.LeakyReLU(0.2)]
            current *= 2
        layers.append(nn.Conv2d(current, 1, 4, 1, 0))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(x.shape[0])


def default_model(kind: str, sample_shape: tuple[int, ...]) -> str:
    """The model that suits the data: DCGAN for square power-of-two images, else the MLP."""
    if kind == "images" and len(sample_shape) == 3 and sample_shape[1] == sample_shape[2]:
        side = sample_shape[1]
        if side >= 8 and side & (side - 1) == 0:
            return "dcgan"
    return "mlp"


def build_models(model: str, sample_shape: tuple[int, ...], *, latent_dim: int, pack: int = 1,
                 bounded: bool = True, width: int | None = None) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) of kind ``model`` ("mlp" | "dcgan") for samples of ``sample_shape``.

    ``width``: hidden units per MLP layer (default 256; 128 for 2-D data), or the DCGAN base channels
    (default 64). ``bounded``: the generator ends in tanh (data in [-1, 1]).
    """
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be a positive integer or None (the default), got {width!r}")
    if model == "mlp":
        size = width or (128 if math.prod(sample_shape) <= 2 else 256)
        hidden = (size, size) if math.prod(sample_shape) > 2 else (size, size, size)
        return (MLPGenerator(latent_dim, sample_shape, hidden, bounded=bounded),
                MLPDiscriminator(sample_shape, hidden, pack=pack))
    if model == "dcgan":
        if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
            raise ValueError(f"the dcgan model needs square images (channels, S, S), got samples of shape "
                             f"{tuple(sample_shape)}; use --model mlp")
        channels, side = sample_shape[0], sample_shape[1]
        return (DCGANGenerator(latent_dim, channels, side, width=width or 64),
                DCGANDiscriminator(channels, side, width=width or 64, pack=pack))
    raise ValueError(f"model must be 'mlp' or 'dcgan', got {model!r}")
