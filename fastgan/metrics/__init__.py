"""Metrics for generated samples, usable from Python on your own runs.

* 2-D mixtures (VEEGAN / PacGAN definitions): :func:`mode_metrics`.
* 8×8 digits: :func:`digits_metrics` (a small cached classifier: classes covered, KL from uniform,
  confidence, Fréchet distance with its real-vs-real floor).
* :func:`frechet_distance` between two feature sets, :func:`kl_from_uniform` of a histogram.
"""
from fastgan.metrics.digits import (DigitsClassifier, DigitsMetrics, digits_metrics,
                                    load_digits_classifier)
from fastgan.metrics.frechet import frechet_distance
from fastgan.metrics.modes import NUM_EVAL_SAMPLES, ModeMetrics, kl_from_uniform, mode_metrics

__all__ = [
    "DigitsClassifier", "DigitsMetrics", "ModeMetrics", "NUM_EVAL_SAMPLES", "digits_metrics",
    "frechet_distance", "kl_from_uniform", "load_digits_classifier", "mode_metrics",
]
