"""Datasets for ``fastgan train``: the 2-D mixtures ``ring8`` / ``grid25``, scikit-learn's
``digits``, and user data (a ``.npy`` / ``.pt`` tensor file or a folder of images).

``load_data(spec)`` resolves a ``--data`` value into a :class:`TrainingData`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

import torch

from fastgan.data.digits import DigitsSplit, load_digits_splits
from fastgan.data.mixtures import MIXTURES, GaussianMixture2D, MixtureBatches, grid25, ring8
from fastgan.data.user import DataError, load_image_folder, load_tensor_file

BUILTIN = ("ring8", "grid25", "digits")


@dataclass
class TrainingData:
    """What a training run needs to know about its data.

    ``kind`` is ``"mixture"`` (2-D Gaussian mixture, fresh samples each batch), ``"images"``
    (``(N, C, H, W)`` tensors) or ``"vectors"`` (``(N, D)`` tensors). ``train`` holds the samples
    for tensor data; ``mixture`` the mixture for mixture data; ``heldout`` the evaluation split
    where there is one (digits).
    """

    name: str
    kind: str
    sample_shape: tuple[int, ...]
    train: torch.Tensor | None = None
    heldout: torch.Tensor | None = None
    mixture: GaussianMixture2D | None = None
    labels: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def value_range(self) -> tuple[float, float]:
        """(min, max) of the training samples (for mixtures: the span of the modes ± 4 std)."""
        if self.mixture is not None:
            return (float(self.mixture.modes.min()) - 4 * self.mixture.std,
                    float(self.mixture.modes.max()) + 4 * self.mixture.std)
        assert self.train is not None
        return float(self.train.min()), float(self.train.max())

    @property
    def num_samples(self) -> int | None:
        return None if self.train is None else int(self.train.shape[0])

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterable | torch.Tensor:
        """What to hand to ``Trainer.fit``: an endless batch iterable for mixtures (starting at
        batch ``start`` so a resumed run continues the stream), the sample tensor otherwise."""
        if self.mixture is not None:
            return MixtureBatches(self.mixture, batch_size, seed=seed, start=start)
        assert self.train is not None
        return self.train

    def describe(self) -> str:
        if self.mixture is not None:
            return (f"{self.name}: 2-D mixture of {self.mixture.num_modes} Gaussians "
                    f"(std {self.mixture.std}), fresh samples each batch")
        held = f", {self.heldout.shape[0]} held out" if self.heldout is not None else ""
        return f"{self.name}: {self.num_samples} samples of shape {self.sample_shape}{held}"


def load_data(spec: str, image_size: int = 32) -> TrainingData:
    """Resolve ``--data``: ``ring8``, ``grid25``, ``digits``, a ``.npy`` / ``.pt`` file or an image folder.

    Raises :class:`DataError` (a ``ValueError``) with a message naming the path and the problem.
    """
    if spec in MIXTURES:
        mixture = MIXTURES[spec]()
        return TrainingData(spec, "mixture", (2,), mixture=mixture)
    if spec == "digits":
        train, heldout = load_digits_splits()
        return TrainingData("digits", "images", tuple(train.images.shape[1:]), train=train.images,
                            heldout=heldout.images, labels={"train": train.labels, "heldout": heldout.labels})
    if os.path.isdir(spec):
        images = load_image_folder(spec, image_size)
        return TrainingData(spec, "images", tuple(images.shape[1:]), train=images)
    if os.path.isfile(spec):
        tensor = load_tensor_file(spec)
        kind = "images" if tensor.dim() == 4 else "vectors"
        return TrainingData(spec, kind, tuple(tensor.shape[1:]), train=tensor)
    raise DataError(f"--data: {spec!r} is neither a built-in dataset ({', '.join(BUILTIN)}) "
                    "nor an existing file or folder")


__all__ = [
    "BUILTIN", "DataError", "DigitsSplit", "GaussianMixture2D", "MixtureBatches", "TrainingData",
    "grid25", "load_data", "load_digits_splits", "load_image_folder", "load_tensor_file", "ring8",
]
