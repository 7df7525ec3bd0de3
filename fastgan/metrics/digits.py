"""Scores for generated 8×8 digits from a small classifier trained on the real training split."""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fastgan.data.digits import load_digits_splits
from fastgan.metrics.frechet import frechet_distance
from fastgan.metrics.modes import kl_from_uniform

NUM_CLASSES = 10
#: a class counts as covered when at least this share of the samples is classified as it (a tenth of
#: its uniform share), so that a handful of stray samples does not count as covering a class
COVERED_MIN_SHARE = 0.01

# Everything that determines the trained weights; part of the cache key.
_SETUP = {"arch": "mlp-64-128-64-10-relu", "optimizer": "adam", "lr": 3e-3, "weight_decay": 1e-4,
          "steps": 300, "seed": 0, "batch": "full", "version": 1}


class DigitsClassifier(nn.Module):
    """MLP 64 → 128 → 64 → 10 on flattened 8×8 digits in [-1, 1]; ``features`` gives the 64-d
    penultimate activations used for the Fréchet distance."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(x.shape[0], 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cache_dir() -> Path:
    """``$FASTGAN_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastgan``, else ``~/.cache/fastgan``."""
    if os.environ.get("FASTGAN_CACHE_DIR"):
        return Path(os.environ["FASTGAN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastgan"


def _setup_hash(images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256(repr(sorted(_SETUP.items())).encode())
    digest.update(images.contiguous().numpy().tobytes())
    digest.update(labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def train_digits_classifier(images: torch.Tensor, labels: torch.Tensor) -> DigitsClassifier:
    """Train the classifier deterministically (fixed seed, full-batch Adam, single thread)."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # callers may be under no_grad
        torch.manual_seed(_SETUP["seed"])
        torch.set_num_threads(1)  # a fixed reduction order: the same weights on every run
        try:
            model = DigitsClassifier()
            optimizer = torch.optim.Adam(model.parameters(), lr=_SETUP["lr"], weight_decay=_SETUP["weight_decay"])
            x = images.reshape(images.shape[0], 64).float()
            for _ in range(_SETUP["steps"]):
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), labels).backward()
                optimizer.step()
        finally:
            torch.set_num_threads(threads)
    return model.eval()


def load_digits_classifier(cache: str | os.PathLike | None = None) -> DigitsClassifier:
    """The classifier, trained on the digits training split the first time and cached on disk
    as ``digits_classifier-<hash of data and training setup>.pt``."""
    train, _ = load_digits_splits()
    directory = Path(cache) if cache is not None else cache_dir()
    path = directory / f"digits_classifier-{_setup_hash(train.images, train.labels)}.pt"
    model = DigitsClassifier()
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception as exc:  # a truncated or foreign file: retrain and overwrite it
            warnings.warn(f"ignoring unreadable cached digits classifier {path}: {exc}", stacklevel=2)
    model = train_digits_classifier(train.images, train.labels)
    temporary = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
            temporary = handle.name
            torch.save(model.state_dict(), handle)
        os.replace(temporary, path)  # atomic: concurrent runs never read half a file
    except OSError as exc:
        if temporary is not None:  # a full disk must not also leave half a file behind
            Path(temporary).unlink(missing_ok=True)
        warnings.warn(f"could not cache the digits classifier in {directory}: {exc}", stacklevel=2)
    return model


@dataclass(frozen=True)
class DigitsMetrics:
    """Scores of generated digits.

    * ``classes_covered``: classes (of 10) predicted for at least ``COVERED_MIN_SHARE`` of samples.
    * ``kl_from_uniform``: KL(predicted-class histogram ‖ uniform over 10), nats; 0 is even.
    * ``mean_confidence``: mean of the classifier's top softmax probability (NaN when a sample is
      not finite; such samples count in no class).
    * ``frechet_distance``: between penultimate features of the samples and of the held-out split.
    * ``frechet_floor``: the same distance between the real training and held-out splits.
    """

    num_samples: int
    classes_covered: int
    kl_from_uniform: float
    mean_confidence: float
    frechet_distance: float
    frechet_floor: float
    class_counts: tuple[int, ...]
    heldout_accuracy: float

    def as_dict(self) -> dict:
        out = asdict(self)
        out["class_counts"] = list(self.class_counts)
        for key in ("kl_from_uniform", "mean_confidence", "frechet_distance", "frechet_floor"):
            if not math.isfinite(out[key]):
                out[key] = None  # strict JSON has no NaN / inf
        return out


@torch.no_grad()
def digits_metrics(samples: torch.Tensor, classifier: DigitsClassifier | None = None) -> DigitsMetrics:
    """Score generated digits ``(n, 1, 8, 8)`` or ``(n, 64)`` in [-1, 1] (n ≥ 2)."""
    # the size of one sample from the shape, not samples[0], which does not exist when n = 0
    if not isinstance(samples, torch.Tensor) or samples.dim() < 2 or math.prod(samples.shape[1:]) != 64:
        raise ValueError(f"samples must be (n, 1, 8, 8) or (n, 64) digits, got {getattr(samples, 'shape', samples)}")
    if samples.shape[0] < 2:
        raise ValueError("samples must hold at least 2 digits")
    classifier = classifier if classifier is not None else load_digits_classifier()
    train, heldout = load_digits_splits()
    x = samples.detach().to("cpu", torch.float32).reshape(-1, 64)
    features = classifier.features(x)
    probabilities = torch.softmax(classifier.head(features), dim=1)
    confidence, predicted = probabilities.max(dim=1)
    # a non-finite sample is no digit: max() would report it as class 0 (the index of its first NaN)
    classified = torch.isfinite(probabilities).all(dim=1)
    counts = torch.bincount(predicted[classified], minlength=NUM_CLASSES)
    heldout_features = classifier.features(heldout.images)
    heldout_accuracy = (classifier.head(heldout_features).argmax(1) == heldout.labels).float().mean()
    return DigitsMetrics(
        num_samples=int(x.shape[0]),
        classes_covered=int((counts >= max(1, math.ceil(COVERED_MIN_SHARE * x.shape[0]))).sum()),
        kl_from_uniform=kl_from_uniform(counts),
        mean_confidence=float(confidence.mean()),
        frechet_distance=frechet_distance(features, heldout_features),
        frechet_floor=frechet_distance(classifier.features(train.images), heldout_features),
        class_counts=tuple(int(c) for c in counts),
        heldout_accuracy=float(heldout_accuracy),
    )
