"""User data: a ``.npy`` / ``.pt`` tensor file, or a folder of images."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

TENSOR_SUFFIXES = (".npy", ".pt", ".pth")


class DataError(ValueError):
    """User data that cannot be used, with a message that names the file and the problem."""


def _image_suffixes() -> set[str]:
    from PIL import Image

    return {suffix.lower() for suffix in Image.registered_extensions()}


def load_tensor_file(path: str | os.PathLike) -> torch.Tensor:
    """Samples from a ``.npy`` or ``.pt`` file as float32, first dimension = samples.

    uint8 data (e.g. raw pixels) is scaled from [0, 255] to [-1, 1]; float data is used as stored.
    ``(N, H, W)`` arrays are read as one-channel images ``(N, 1, H, W)``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data: no such file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise DataError(f"--data: {path} is not a .npy or .pt file")
    except DataError:
        raise
    except Exception as exc:  # numpy / torch raise many types for a corrupt file
        raise DataError(f"--data: cannot read {path}: {exc}") from exc
    if not isinstance(data, torch.Tensor):
        raise DataError(f"--data: {path} holds a {type(data).__name__}, expected one tensor of samples")
    if data.dim() < 2 or data.shape[0] < 1 or data.numel() == 0:
        raise DataError(f"--data: {path} has shape {tuple(data.shape)}; expected (samples, features...) "
                        "with at least one sample")
    if data.dtype == torch.uint8:
        data = data.float() / 127.5 - 1.0
    elif data.is_floating_point() or data.dtype in (torch.int16, torch.int32, torch.int64, torch.int8):
        data = data.float()
    else:
        raise DataError(f"--data: {path} has dtype {data.dtype}; expected floating point or uint8")
    if not torch.isfinite(data).all():
        raise DataError(f"--data: {path} contains NaN or infinite values")
    if data.dim() == 3:
        data = data.unsqueeze(1)
    return data.contiguous()


def load_image_folder(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Every image under ``path`` (recursively), centre-cropped to a square, resized to
    ``image_size``² and scaled to [-1, 1]: ``(N, C, S, S)`` float32, C = 1 when every image is
    greyscale, else 3 (RGB). Files with an image suffix that Pillow cannot read are an error that
    names them; files without an image suffix are ignored."""
    from PIL import Image, ImageOps

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"--data: no such folder: {path}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"--image-size must be a positive integer, got {image_size!r}")
    suffixes = _image_suffixes()
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)
    if not files:
        raise DataError(f"--data: folder {path} contains no image files "
                        f"(looked for {', '.join(sorted({'.png', '.jpg', '.jpeg', '.bmp', '.gif'}))} ...)")
    images, unreadable = [], []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                images.append(image.copy())
        except Exception as exc:  # Pillow raises several types for broken files
            unreadable.append(f"{file} ({type(exc).__name__}: {exc})")
    if unreadable:
        shown = "\n  ".join(unreadable[:20])
        more = f"\n  ... and {len(unreadable) - 20} more" if len(unreadable) > 20 else ""
        raise DataError(f"--data: {len(unreadable)} of {len(files)} image files in {path} "
                        f"cannot be read:\n  {shown}{more}")
    greyscale = all(image.mode in ("1", "L", "LA", "I", "I;16", "F") for image in images)
    mode = "L" if greyscale else "RGB"
    arrays = []
    for image in images:
        if image.mode in ("RGBA", "LA", "P"):
            # Composite transparency over white instead of letting it turn black.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        image = ImageOps.fit(image.convert(mode), (image_size, image_size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32)
        arrays.append(array[None] if greyscale else array.transpose(2, 0, 1))
    stacked = torch.from_numpy(np.stack(arrays))
    return (stacked / 127.5 - 1.0).contiguous()
