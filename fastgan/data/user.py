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

    uint8 data (e.g. raw pixels) is scaled from [0, 255] to [-1, 1]; float and other integer data is used
    as stored.
    ``(N, H, W)`` arrays are read as one-channel images ``(N, 1, H, W)``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data: no such file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if not isinstance(array, np.ndarray):  # an .npz archive (an open NpzFile) under a .npy name
                array.close()
                raise DataError(f"--data: {path} is an .npz archive; expected one array saved with np.save")
            # torch.from_numpy refuses non-native byte order (a valid .npy written on another machine)
            data = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))
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
    # a saved Parameter or a tensor saved with requires_grad: samples are data, not a graph leaf that
    # D's backward would fill with a dataset-sized .grad
    data = data.detach()
    if data.layout != torch.strided:  # sparse samples: training indexes and stacks dense batches
        data = data.to_dense()
    if data.dim() < 2 or data.shape[0] < 1 or data.numel() == 0:
        raise DataError(f"--data: {path} has shape {tuple(data.shape)}; expected (samples, features...) "
                        "with at least one sample")
    if data.dtype == torch.uint8:
        data = data.float() / 127.5 - 1.0
    elif data.is_floating_point() or data.dtype in (torch.int16, torch.int32, torch.int64, torch.int8):
        data = data.float()
    else:
        raise DataError(f"--data: {path} has dtype {data.dtype}; expected a floating-point or integer dtype")
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
    # Hidden files and everything under hidden folders (.thumbnails, .ipynb_checkpoints, ...) are not
    # samples: a thumbnail cache would add a second, smaller copy of each image.
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"--data: folder {path} contains no image files "
                        f"(looked for {', '.join(sorted({'.png', '.jpg', '.jpeg', '.bmp', '.gif'}))} ...)")
    images, formats, unreadable = [], [], []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                images.append(image.copy())  # (a copy has no format: keep it beside)
                formats.append(image.format)
        except Exception as exc:  # Pillow raises several types for broken files
            unreadable.append(f"{file} ({type(exc).__name__}: {exc})")
    if unreadable:
        shown = "\n  ".join(unreadable[:20])
        more = f"\n  ... and {len(unreadable) - 20} more" if len(unreadable) > 20 else ""
        raise DataError(f"--data: {len(unreadable)} of {len(files)} image files in {path} "
                        f"cannot be read:\n  {shown}{more}")
    greyscale = all(image.mode in ("1", "L", "LA", "I", "F") or image.mode.startswith("I;16") for image in images)
    mode = "L" if greyscale else "RGB"
    arrays = []
    for file, image, file_format in zip(files, images, formats):
        if image.mode == "I" or image.mode.startswith("I;16"):
            # 16-bit greyscale (PNG, TIFF: I;16; a 16-bit PGM: I): Pillow's convert to L / RGB clips at 255
            # instead of rescaling, which turned such images white; map 0..65535 to 0..255 ourselves.
            # Other 32-bit integer images (a TIFF of int32) have no known range: 0..255 is taken as 8-bit
            # (Pillow's conversion), anything else is refused rather than clipped.
            sixteen_bit = image.mode != "I" or file_format == "PPM"
            pixels = np.asarray(image)
            if pixels.min() < 0 or pixels.max() > (65535 if sixteen_bit else 255):
                raise DataError(f"--data: {file} has {image.mode} pixels in [{pixels.min()}, {pixels.max()}]; "
                                f"expected {'16' if sixteen_bit else '8'}-bit values")
            if sixteen_bit:
                image = Image.fromarray(np.round(pixels / 257.0).astype(np.uint8))
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
