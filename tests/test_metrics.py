"""fastgan.metrics on constructed samples with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastgan.data import grid25, load_digits_splits, ring8
from fastgan.metrics import (NUM_EVAL_SAMPLES, digits_metrics, frechet_distance, kl_from_uniform,
                             load_digits_classifier, mode_metrics)
from fastgan.metrics.digits import DigitsClassifier, train_digits_classifier


# ---------------------------------------------------------------------------------------------
# KL from uniform
# ---------------------------------------------------------------------------------------------

def test_kl_from_uniform_known_values():
    assert kl_from_uniform(torch.tensor([5, 5, 5, 5])) == pytest.approx(0.0, abs=1e-12)
    assert kl_from_uniform(torch.tensor([7, 0, 0, 0, 0, 0, 0, 0])) == pytest.approx(math.log(8))
    # two of four bins equally: KL = log(4 / 2)
    assert kl_from_uniform(torch.tensor([3, 3, 0, 0])) == pytest.approx(math.log(2))
    # p = (3/4, 1/4) against (1/2, 1/2), written out
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_from_uniform(torch.tensor([3, 1])) == pytest.approx(expected)
    assert math.isnan(kl_from_uniform(torch.zeros(4)))
    with pytest.raises(ValueError):
        kl_from_uniform(torch.tensor([1, -1]))


# ---------------------------------------------------------------------------------------------
# 2-D mixtures
# ---------------------------------------------------------------------------------------------

def _around(modes, per_mode, spread, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = modes.repeat_interleave(per_mode, dim=0)
    return centres + spread * torch.randn(centres.shape, generator=gen)


@pytest.mark.parametrize("make", [ring8, grid25])
def test_all_modes_evenly(make):
    mixture = make()
    samples = _around(mixture.modes, 100, mixture.std * 0.5)
    m = mode_metrics(samples, mixture.modes, mixture.std)
    assert m.modes_captured == mixture.num_modes
    assert m.high_quality_fraction > 0.99
    assert m.kl_from_uniform == pytest.approx(0.0, abs=1e-3)
    assert m.num_samples == 100 * mixture.num_modes


def test_true_samples_score_like_the_papers():
    mixture = grid25()
    m = mode_metrics(mixture.sample(NUM_EVAL_SAMPLES, torch.Generator().manual_seed(1)), mixture.modes, mixture.std)
    assert m.modes_captured == 25
    # within 3 std in 2-D: P(chi2_2 <= 9) = 1 - exp(-4.5) = 0.9889
    assert abs(m.high_quality_fraction - (1 - math.exp(-4.5))) < 0.01
    assert m.kl_from_uniform < 0.02


def test_one_mode():
    mixture = ring8()
    samples = _around(mixture.modes[3:4], 500, mixture.std * 0.5)
    m = mode_metrics(samples, mixture.modes, mixture.std)
    assert m.modes_captured == 1
    assert m.mode_counts[3] == m.high_quality_fraction * 500 and sum(m.mode_counts) == m.mode_counts[3]
    assert m.kl_from_uniform == pytest.approx(math.log(8))


def test_none_high_quality():
    mixture = ring8()
    samples = torch.zeros(200, 2)  # the centre of the ring: 1 away from every mode, 100 std
    m = mode_metrics(samples, mixture.modes, mixture.std)
    assert m.modes_captured == 0 and m.high_quality_fraction == 0.0
    assert math.isnan(m.kl_from_uniform)
    assert m.as_dict()["kl_from_uniform"] is None


def test_threshold_is_three_std():
    mixture = ring8()
    mode = mixture.modes[0]
    radial = mode / mode.norm()
    inside = mode + radial * (2.9 * mixture.std)
    outside = mode + radial * (3.1 * mixture.std)
    m = mode_metrics(torch.stack([inside, outside]), mixture.modes, mixture.std)
    assert m.high_quality_fraction == 0.5 and m.modes_captured == 1


def test_half_modes_kl():
    mixture = ring8()
    samples = _around(mixture.modes[::2], 50, mixture.std * 0.3)
    m = mode_metrics(samples, mixture.modes, mixture.std)
    assert m.modes_captured == 4
    assert m.kl_from_uniform == pytest.approx(math.log(2), abs=1e-3)


def test_mode_metrics_nonfinite_samples_are_not_high_quality():
    mixture = ring8()
    samples = torch.cat([mixture.modes, torch.full((8, 2), float("nan"))])
    m = mode_metrics(samples, mixture.modes, mixture.std)
    assert m.high_quality_fraction == 0.5 and m.modes_captured == 8


def test_mode_metrics_errors():
    with pytest.raises(ValueError, match="samples"):
        mode_metrics(torch.zeros(5), ring8().modes, 0.01)
    with pytest.raises(ValueError, match="modes"):
        mode_metrics(torch.zeros(5, 2), torch.zeros(3, 3), 0.01)
    with pytest.raises(ValueError, match="std"):
        mode_metrics(torch.zeros(5, 2), ring8().modes, 0.0)
    with pytest.raises(ValueError, match="modes must hold"):
        mode_metrics(torch.zeros(5, 2), torch.zeros(0, 2), 0.01)  # was an IndexError from min()
    for threshold in (float("nan"), -3.0):  # were accepted: no sample high-quality, silently
        with pytest.raises(ValueError, match="threshold"):
            mode_metrics(torch.zeros(5, 2), ring8().modes, 0.01, threshold=threshold)


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------

def test_frechet_distance_known_gaussians():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(20000, 3)))
    # same distribution: ~0; shifted mean: |shift|^2; scaled: tr((s1 - s2)^2 I) = d (s1 - s2)^2
    assert frechet_distance(a, torch.from_numpy(rng.normal(size=(20000, 3)))) < 0.01
    shifted = torch.from_numpy(rng.normal(size=(20000, 3)) + np.array([1.0, 2.0, 0.0]))
    assert frechet_distance(a, shifted) == pytest.approx(5.0, rel=0.02)
    scaled = torch.from_numpy(rng.normal(size=(20000, 3)) * 3.0)
    assert frechet_distance(a, scaled) == pytest.approx(3 * (3.0 - 1.0) ** 2, rel=0.03)


def test_frechet_distance_matches_scipy_on_correlated_features():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(ca @ cb).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * covmean)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_exact_for_singular_covariances():
    # Rank-1 features in 64-d (a collapsed generator, dead ReLU units): the distance is that of the
    # 1-d Gaussians along w, (Δμ)² + (σa − σb)², while 63 eigenvalues of each covariance are zero.
    # Square roots of their rounding noise (±eps) once summed to a 2.5% error here, different each way.
    rng = np.random.default_rng(0)
    w = rng.normal(size=64)
    w /= np.linalg.norm(w)
    za, zb = rng.normal(size=5000), rng.normal(size=5000)
    expected = (za.mean() - zb.mean()) ** 2 + (za.std(ddof=1) - zb.std(ddof=1)) ** 2
    a, b = torch.from_numpy(np.outer(za, w)), torch.from_numpy(np.outer(zb, w))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_errors_and_nonfinite():
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(1, 2), torch.zeros(5, 2))
    assert frechet_distance(torch.full((4, 2), float("nan")), torch.zeros(4, 2)) == float("inf")


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def classifier(classifier_cache):
    return load_digits_classifier(cache=classifier_cache)


def test_classifier_is_accurate_cached_and_deterministic(classifier_cache, classifier):
    _, heldout = load_digits_splits()
    with torch.no_grad():
        accuracy = (classifier(heldout.images).argmax(1) == heldout.labels).float().mean()
    assert accuracy > 0.93
    first = classifier
    (cached,) = list(classifier_cache.glob("digits_classifier-*.pt"))
    assert len(cached.stem.split("-")[1]) == 16  # content hash in the name
    mtime = cached.stat().st_mtime_ns
    second = load_digits_classifier(cache=classifier_cache)  # loaded, not retrained
    assert cached.stat().st_mtime_ns == mtime
    for p, q in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(p, q)
    # deterministic: a fresh training gives the cached weights
    train, _ = load_digits_splits()
    with torch.no_grad():  # as inside digits_metrics: training must still work
        fresh = train_digits_classifier(train.images, train.labels)
    for p, q in zip(first.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(p, q)


def test_classifier_cache_survives_a_corrupt_file(tmp_path, monkeypatch):
    import fastgan.metrics.digits as digits_module
    retrained = []

    def fake_training(images, labels):  # the real one is tested above; here only the cache logic
        retrained.append(len(images))
        return DigitsClassifier().eval()

    monkeypatch.setattr(digits_module, "train_digits_classifier", fake_training)
    load_digits_classifier(cache=tmp_path)
    (cached,) = list(tmp_path.glob("digits_classifier-*.pt"))
    cached.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cached"):
        model = load_digits_classifier(cache=tmp_path)
    assert isinstance(model, DigitsClassifier) and len(retrained) == 2
    load_digits_classifier(cache=tmp_path)  # rewritten: read back without training again
    assert len(retrained) == 2


def test_classifier_cache_write_failure_leaves_no_temporary_file(tmp_path, monkeypatch):
    import fastgan.metrics.digits as digits_module
    monkeypatch.setattr(digits_module, "train_digits_classifier", lambda images, labels: DigitsClassifier().eval())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(digits_module.os, "replace", disk_full)
    with pytest.warns(UserWarning, match="could not cache"):
        assert isinstance(load_digits_classifier(cache=tmp_path), DigitsClassifier)
    assert list(tmp_path.iterdir()) == []  # the .tmp file was left behind


def test_digits_metrics_on_real_heldout_digits(classifier):
    _, heldout = load_digits_splits()
    m = digits_metrics(heldout.images, classifier)
    assert m.classes_covered == 10
    assert m.kl_from_uniform < 0.01
    assert m.mean_confidence > 0.8
    assert m.frechet_distance == pytest.approx(0.0, abs=1e-6)  # the held-out split against itself
    assert m.frechet_floor > 0 and m.heldout_accuracy > 0.93


def test_digits_metrics_one_class(classifier):
    train, _ = load_digits_splits()
    sevens = train.images[train.labels == 7]
    m = digits_metrics(sevens, classifier)
    assert m.classes_covered == 1
    assert m.class_counts[7] == len(sevens) - sum(c for i, c in enumerate(m.class_counts) if i != 7)
    assert m.class_counts[7] >= 0.98 * len(sevens)
    assert m.kl_from_uniform == pytest.approx(math.log(10), rel=0.02)
    # one class is far from the held-out feature distribution of all ten
    assert m.frechet_distance > 3 * m.frechet_floor


def test_digits_metrics_noise_is_far_and_unsure(classifier):
    _, heldout = load_digits_splits()
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noisy = digits_metrics(noise, classifier)
    real = digits_metrics(heldout.images, classifier)
    assert noisy.frechet_distance > 20 * real.frechet_floor
    assert noisy.mean_confidence < real.mean_confidence
    assert noisy.as_dict()["num_samples"] == 500


def test_digits_metrics_accepts_flat_and_rejects_wrong_shapes(classifier):
    _, heldout = load_digits_splits()
    flat = digits_metrics(heldout.images.reshape(-1, 64), classifier)
    assert flat.classes_covered == 10
    with pytest.raises(ValueError, match="digits"):
        digits_metrics(torch.zeros(4, 3, 8, 8), classifier)
    with pytest.raises(ValueError, match="at least 2"):
        digits_metrics(torch.zeros(1, 64), classifier)
    with pytest.raises(ValueError, match="at least 2"):
        digits_metrics(torch.zeros(0, 1, 8, 8), classifier)  # was an IndexError from samples[0]


def test_digits_metrics_nonfinite_samples_count_in_no_class(classifier):
    # a diverged generator's NaN samples were all counted as class 0 (a class covered)
    _, heldout = load_digits_splits()
    sevens = heldout.images[heldout.labels == 7]
    broken = torch.full((len(sevens), 1, 8, 8), float("nan"))
    m = digits_metrics(torch.cat([sevens, broken]), classifier)
    assert m.num_samples == 2 * len(sevens)
    assert m.class_counts == digits_metrics(sevens, classifier).class_counts  # the NaNs add to no class
    assert m.class_counts[0] == 0
    assert math.isnan(m.mean_confidence) and m.frechet_distance == float("inf")
    d = m.as_dict()
    assert d["mean_confidence"] is None and d["frechet_distance"] is None  # strict JSON
    assert digits_metrics(broken, classifier).classes_covered == 0
