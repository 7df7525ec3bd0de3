"""fastgan.data: embedded datasets (shape, range, statistics) and user data loading + errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastgan.data import (DataError, grid25, load_data, load_digits_splits, load_image_folder,
                          load_tensor_file, ring8)


def test_ring8_modes_on_unit_circle():
    mixture = ring8()
    assert mixture.modes.shape == (8, 2) and mixture.std == 0.01
    assert torch.allclose(mixture.modes.norm(dim=1), torch.ones(8), atol=1e-6)
    angles = torch.atan2(mixture.modes[:, 1], mixture.modes[:, 0]) % (2 * math.pi)
    expected = torch.arange(8) * 2 * math.pi / 8
    assert torch.allclose(torch.sort(angles).values, expected.float(), atol=1e-5)


def test_grid25_modes():
    mixture = grid25()
    assert mixture.modes.shape == (25, 2) and mixture.std == 0.05
    assert sorted(set(mixture.modes[:, 0].tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]
    assert len({tuple(m) for m in mixture.modes.tolist()}) == 25


@pytest.mark.parametrize("make", [ring8, grid25])
def test_mixture_sample_statistics(make):
    mixture = make()
    x = mixture.sample(20000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (20000, 2) and x.dtype == torch.float32
    distance, nearest = torch.cdist(x.double(), mixture.modes.double()).min(dim=1)
    # Residuals from the nearest mode are N(0, std^2) per coordinate.
    residual = x.double() - mixture.modes.double()[nearest]
    assert abs(residual.std().item() - mixture.std) < 0.03 * mixture.std
    assert abs(residual.mean().item()) < 0.05 * mixture.std
    # Modes are chosen uniformly.
    counts = torch.bincount(nearest, minlength=mixture.num_modes).double()
    expected = 20000 / mixture.num_modes
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()


def test_mixture_batches_fresh_seeded_and_resumable():
    mixture = ring8()
    stream = iter(mixture.batches(32, seed=3))
    first = [next(stream) for _ in range(5)]
    assert all(b.shape == (32, 2) for b in first)
    assert not torch.equal(first[0], first[1])  # fresh samples each batch
    again = iter(mixture.batches(32, seed=3))
    assert all(torch.equal(a, next(again)) for a in first)  # reproducible from the seed
    resumed = iter(mixture.batches(32, seed=3, start=3))
    assert torch.equal(next(resumed), first[3])  # a resumed run continues the stream
    other = iter(mixture.batches(32, seed=4))
    assert not torch.equal(next(other), first[0])


def test_mixture_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        ring8().batches(0)
    with pytest.raises(ValueError, match="n must be"):
        ring8().sample(0)


def test_digits_splits():
    train, heldout = load_digits_splits()
    assert len(train) + len(heldout) == 1797
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.float32
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert heldout.images.min() >= -1.0 and heldout.images.max() <= 1.0
    # every class in both splits, roughly in proportion
    counts = torch.bincount(heldout.labels, minlength=10)
    assert counts.min() >= 30 and counts.max() <= 40  # a fifth of each class
    assert len(heldout) == 355
    assert torch.bincount(train.labels, minlength=10).min() >= 120
    # fixed split: the same on every call, and disjoint
    train2, heldout2 = load_digits_splits()
    assert torch.equal(train.images, train2.images) and torch.equal(heldout.labels, heldout2.labels)
    flat_train = {tuple(r) for r in train.images.reshape(len(train), -1).tolist()}
    overlap = sum(tuple(r) in flat_train for r in heldout.images.reshape(len(heldout), -1).tolist())
    assert overlap < 5  # a few digits of the 1797 are pixel-identical duplicates; the split is not shuffled


def test_load_data_builtins():
    digits = load_data("digits")
    assert digits.kind == "images" and digits.sample_shape == (1, 8, 8) and digits.heldout is not None
    assert digits.batches(64) is digits.train
    ring = load_data("ring8")
    assert ring.kind == "mixture" and ring.sample_shape == (2,)
    assert next(iter(ring.batches(16))).shape == (16, 2)


def test_tensor_files(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    data = load_data(str(tmp_path / "v.npy"))
    assert data.kind == "vectors" and data.sample_shape == (3,)
    assert torch.allclose(data.train, torch.from_numpy(vectors))

    pixels = torch.randint(0, 256, (10, 12, 12), dtype=torch.uint8)
    torch.save(pixels, tmp_path / "p.pt")
    images = load_tensor_file(tmp_path / "p.pt")
    assert images.shape == (10, 1, 12, 12)
    assert torch.allclose(images, pixels.float().unsqueeze(1) / 127.5 - 1)
    assert load_data(str(tmp_path / "p.pt")).kind == "images"


def test_tensor_file_big_endian_npy(tmp_path):
    # a valid .npy in non-native byte order (written on another machine) was 'cannot read'
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "be.npy", values.astype(">f4"))
    assert torch.equal(load_tensor_file(tmp_path / "be.npy"), torch.from_numpy(values))
    np.save(tmp_path / "be8.npy", (values * 20).astype(">i8").reshape(4, 3))
    assert torch.equal(load_tensor_file(tmp_path / "be8.npy"), torch.from_numpy(values * 20))


def test_tensor_file_is_plain_data(tmp_path):
    # a tensor saved with requires_grad (or as a Parameter) came back as a leaf requiring grad
    values = torch.randn(6, 3)
    torch.save(values.clone().requires_grad_(), tmp_path / "grad.pt")
    torch.save(torch.nn.Parameter(values.clone()), tmp_path / "param.pt")
    # a sparse tensor was a NotImplementedError from isfinite; its samples are the dense ones
    torch.save(values.to_sparse(), tmp_path / "sparse.pt")
    for name in ("grad.pt", "param.pt", "sparse.pt"):
        data = load_tensor_file(tmp_path / name)
        assert data.layout == torch.strided
        assert type(data) is torch.Tensor and not data.requires_grad
        assert torch.equal(data, values)


def test_tensor_file_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_tensor_file(tmp_path / "missing.npy")
    (tmp_path / "broken.npy").write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match="broken.npy"):
        load_tensor_file(tmp_path / "broken.npy")
    torch.save({"x": torch.zeros(3, 2)}, tmp_path / "dict.pt")
    with pytest.raises(DataError, match="dict.pt holds a dict"):
        load_tensor_file(tmp_path / "dict.pt")
    np.savez(tmp_path / "archive.npz", x=np.zeros((3, 2)))
    (tmp_path / "archive.npz").rename(tmp_path / "archive.npy")
    with pytest.raises(DataError, match="archive.npy is an .npz archive"):
        load_tensor_file(tmp_path / "archive.npy")
    np.save(tmp_path / "flat.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(DataError, match=r"shape \(5,\)"):
        load_tensor_file(tmp_path / "flat.npy")
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan]], dtype=np.float32))
    with pytest.raises(DataError, match="NaN"):
        load_tensor_file(tmp_path / "nan.npy")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="not a .npy or .pt"):
        load_tensor_file(tmp_path / "x.csv")
    with pytest.raises(DataError, match="neither a built-in dataset"):
        load_data(str(tmp_path / "nowhere"))


def _write_images(folder, count, mode="L", size=(20, 14)):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(folder / f"img{i}.png")


def test_image_folder_greyscale_and_rgb(tmp_path):
    _write_images(tmp_path / "grey", 4, "L")
    (tmp_path / "grey" / "notes.txt").write_text("not an image, ignored")
    images = load_image_folder(tmp_path / "grey", 16)
    assert images.shape == (4, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.1

    _write_images(tmp_path / "rgb" / "sub", 3, "RGB")
    data = load_data(str(tmp_path / "rgb"), image_size=8)
    assert data.kind == "images" and data.sample_shape == (3, 8, 8) and data.num_samples == 3


def test_image_folder_pixel_scaling(tmp_path):
    from PIL import Image
    tmp_path.joinpath("f").mkdir()
    Image.new("L", (8, 8), color=0).save(tmp_path / "f" / "black.png")
    Image.new("L", (8, 8), color=255).save(tmp_path / "f" / "white.png")
    images = load_image_folder(tmp_path / "f", 8)
    assert torch.equal(images[0], -torch.ones(1, 8, 8))  # sorted: black.png first
    assert torch.equal(images[1], torch.ones(1, 8, 8))


def test_image_folder_skips_hidden_files_and_folders(tmp_path):
    """Images in sub-folders are samples; hidden files and whatever lies under a hidden folder (a
    thumbnail cache, .ipynb_checkpoints) are not. The folder given may itself be hidden."""
    from PIL import Image
    root = tmp_path / ".data"
    for folder in ("a", "a/b", ".thumbnails", "a/.cache"):
        (root / folder).mkdir(parents=True)
    Image.new("L", (8, 8), color=0).save(root / "a" / "one.png")
    Image.new("L", (8, 8), color=255).save(root / "a" / "b" / "two.png")
    for hidden in (".thumbnails/one.png", "a/.cache/two.png", "a/.three.png"):
        Image.new("L", (8, 8), color=128).save(root / hidden)
    images = load_image_folder(root, 8)
    assert images.shape == (2, 1, 8, 8)
    assert sorted(float(image.mean()) for image in images) == [-1.0, 1.0]  # no 128-grey hidden one


def test_image_folder_16_bit_greyscale_is_rescaled(tmp_path):
    from PIL import Image
    tmp_path.joinpath("f").mkdir()
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "f" / "a.png")  # opens as I;16
    # a 16-bit PGM opens as mode I
    (tmp_path / "f" / "b.pgm").write_bytes(b"P5\n16 16\n65535\n" + ramp.astype(">u2").tobytes())
    images = load_image_folder(tmp_path / "f", 16)
    expected = torch.from_numpy(ramp / 65535.0 * 2 - 1).float()
    assert images.shape == (2, 1, 16, 16)
    # was clipped at 255 of 65535: nearly all white (mean 0.99 instead of 0)
    for image in images:
        assert torch.allclose(image[0], expected, atol=1 / 127.5)
    # 32-bit integer images have no known range: 0..255 reads as 8-bit, wider values are an error
    # naming the file, not clipped
    tmp_path.joinpath("g").mkdir()
    Image.fromarray(np.full((8, 8), 255, dtype=np.int32)).save(tmp_path / "g" / "byte.tif")
    assert torch.equal(load_image_folder(tmp_path / "g", 8), torch.ones(1, 1, 8, 8))
    Image.fromarray(np.full((8, 8), 300, dtype=np.int32)).save(tmp_path / "g" / "wide.tif")
    with pytest.raises(DataError, match=r"wide.tif has I pixels in \[300, 300\]; expected 8-bit"):
        load_image_folder(tmp_path / "g", 8)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no image files"):
        load_data(str(tmp_path / "empty"))
    _write_images(tmp_path / "bad", 2)
    (tmp_path / "bad" / "corrupt.png").write_bytes(b"\x89PNG\r\n garbage")
    (tmp_path / "bad" / "truncated.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(DataError) as info:
        load_image_folder(tmp_path / "bad", 8)
    message = str(info.value)
    assert "corrupt.png" in message and "truncated.jpg" in message and "2 of 4" in message
    with pytest.raises(DataError, match="no such folder"):
        load_image_folder(tmp_path / "missing", 8)
