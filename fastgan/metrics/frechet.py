"""Fréchet distance between Gaussians fitted to two feature sets (the distance behind FID)."""
from __future__ import annotations

import numpy as np
import torch


def _zero_below_rank(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with those below its numerical-rank tolerance (as in
    ``np.linalg.matrix_rank``) set to 0: eigh returns the zero eigenvalues of a singular covariance as
    ±eps·max, whose square roots (≈ 1e-8·max each) would otherwise add up to a visible error."""
    tolerance = values.max(initial=0.0) * values.shape[0] * np.finfo(np.float64).eps
    return np.where(values > tolerance, values, 0.0)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(_zero_below_rank(values))) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½) between Gaussians fitted to ``(n, d)`` features.

    Computed in float64 through symmetric eigendecompositions (Σa^½ Σb Σa^½ is symmetric PSD and
    has the same trace of square root as Σa Σb), which stays real and stable for singular covariances.
    """
    a = torch.as_tensor(features_a).detach().to("cpu", torch.float64).numpy()
    b = torch.as_tensor(features_b).detach().to("cpu", torch.float64).numpy()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (n, d) arrays with the same d, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("each feature set needs at least 2 samples to estimate a covariance")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    sqrt_a = _sqrt_psd(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    middle = (middle + middle.T) / 2  # remove rounding asymmetry before eigvalsh
    trace_sqrt = np.sqrt(_zero_below_rank(np.linalg.eigvalsh(middle))).sum()
    distance = float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
    return max(distance, 0.0)
