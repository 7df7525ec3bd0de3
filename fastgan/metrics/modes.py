"""Mode coverage on 2-D Gaussian mixtures, with the definitions of VEEGAN (Srivastava et al., 2017)
and PacGAN (Lin et al., 2018)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

#: the number of generated samples the papers evaluate on
NUM_EVAL_SAMPLES = 2500


@dataclass(frozen=True)
class ModeMetrics:
    """Scores of generated samples against a mixture's modes.

    * ``modes_captured``: modes that are the nearest mode of at least one high-quality sample.
    * ``high_quality_fraction``: share of samples within ``3 std`` of their nearest mode (0..1).
    * ``kl_from_uniform``: KL(p ‖ uniform) where p is the histogram of the nearest modes of the
      high-quality samples; 0 when they spread evenly over all modes, log K when all sit in one;
      NaN when there is no high-quality sample (the histogram is then undefined).
    """

    num_samples: int
    num_modes: int
    modes_captured: int
    high_quality_fraction: float
    kl_from_uniform: float
    mode_counts: tuple[int, ...]

    @property
    def high_quality_percent(self) -> float:
        return 100.0 * self.high_quality_fraction

    def as_dict(self) -> dict:
        out = asdict(self)
        out["mode_counts"] = list(self.mode_counts)
        out["high_quality_percent"] = self.high_quality_percent
        if math.isnan(self.kl_from_uniform):
            out["kl_from_uniform"] = None  # strict JSON has no NaN
        return out


def kl_from_uniform(counts: torch.Tensor) -> float:
    """KL(p ‖ uniform over len(counts) bins) in nats for a histogram of counts; NaN for an empty one."""
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if counts.numel() == 0:
        raise ValueError("counts must have at least one bin")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    total = counts.sum()
    if total == 0:
        return math.nan
    p = counts / total
    nonzero = p > 0
    return float((p[nonzero] * torch.log(p[nonzero] * counts.numel())).sum())


def mode_metrics(samples: torch.Tensor, modes: torch.Tensor, std: float,
                 threshold: float = 3.0) -> ModeMetrics:
    """Score ``samples`` ``(n, 2)`` against mixture ``modes`` ``(K, 2)`` of standard deviation ``std``.

    A sample is high-quality when its Euclidean distance to the nearest mode is at most
    ``threshold * std`` (3 in the papers).
    """
    if not isinstance(samples, torch.Tensor) or samples.dim() != 2:
        raise ValueError(f"samples must be a (n, d) tensor, got {getattr(samples, 'shape', type(samples))}")
    if not isinstance(modes, torch.Tensor) or modes.dim() != 2 or modes.shape[1] != samples.shape[1]:
        raise ValueError(f"modes must be a (K, {samples.shape[1]}) tensor, got {getattr(modes, 'shape', modes)}")
    if samples.shape[0] < 1:
        raise ValueError("samples must hold at least one sample")
    if modes.shape[0] < 1:
        raise ValueError("modes must hold at least one mode")
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    if not threshold > 0:  # a NaN or negative threshold would silently make no sample high-quality
        raise ValueError(f"threshold must be positive, got {threshold}")
    samples = samples.detach().to("cpu", torch.float64)
    modes = modes.detach().to("cpu", torch.float64)
    distances = torch.cdist(samples, modes)  # (n, K)
    nearest_distance, nearest = distances.min(dim=1)
    finite = torch.isfinite(samples).all(dim=1)
    high_quality = finite & (nearest_distance <= threshold * std)
    counts = torch.bincount(nearest[high_quality], minlength=modes.shape[0])
    return ModeMetrics(
        num_samples=int(samples.shape[0]),
        num_modes=int(modes.shape[0]),
        modes_captured=int((counts > 0).sum()),
        high_quality_fraction=float(high_quality.double().mean()),
        kl_from_uniform=kl_from_uniform(counts),
        mode_counts=tuple(int(c) for c in counts),
    )
