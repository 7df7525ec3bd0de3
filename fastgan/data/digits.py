"""scikit-learn's 8×8 handwritten digits (shipped inside scikit-learn: no download)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: within each class, every HELDOUT_EVERY-th image in file order (rank % 5 == 4) is held out for
#: evaluation: a fixed, class-balanced split that needs no random generator, so it is the same on
#: every machine and every library version.
HELDOUT_EVERY = 5


@dataclass(frozen=True)
class DigitsSplit:
    """Images as ``(N, 1, 8, 8)`` float32 in [-1, 1] and their labels as int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_digits_splits() -> tuple[DigitsSplit, DigitsSplit]:
    """The fixed (train, held-out) split of the 1797 digits: 1442 train, 355 held out (a fifth of each class)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float32)  # (1797, 8, 8), values 0..16
    images = torch.from_numpy(pixels / 8.0 - 1.0).unsqueeze(1).contiguous()  # 0..16 -> [-1, 1]
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    heldout = torch.zeros(images.shape[0], dtype=torch.bool)
    for digit in range(10):
        members = (labels == digit).nonzero().flatten()
        rank = torch.arange(members.numel())
        heldout[members[rank % HELDOUT_EVERY == HELDOUT_EVERY - 1]] = True
    return (DigitsSplit(images[~heldout], labels[~heldout]),
            DigitsSplit(images[heldout], labels[heldout]))
