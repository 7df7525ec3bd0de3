"""Pictures of a training run: ``samples.png`` and ``training.png`` (matplotlib, Agg backend)."""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: torch.Tensor, columns: int | None = None, pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in [-1, 1] into one ``(rows·(H+pad), cols·(W+pad)[, 3])`` array in
    [0, 1], separated by ``pad`` pixels of ``pad_value``."""
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"images must have shape (N, C, H, W) with N >= 1, got {tuple(images.shape)}")
    images = images.detach().to("cpu", torch.float32).clamp(-1, 1)
    n, channels, height, width = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.full((channels, rows * (height + pad) + pad, columns * (width + pad) + pad), pad_value, dtype=np.float32)
    pixels = ((images + 1) / 2).numpy()
    for i in range(n):
        r, c = divmod(i, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[:, top:top + height, left:left + width] = pixels[i]
    return grid[0] if channels == 1 else grid.transpose(1, 2, 0)


def save_samples(path: str | os.PathLike, samples: torch.Tensor, *, modes: torch.Tensor | None = None,
                 std: float | None = None, real: torch.Tensor | None = None, title: str = "",
                 dark_on_light: bool = False) -> None:
    """Write a picture of generated samples.

    Images ``(N, C, H, W)``: a grid on white; ``dark_on_light`` draws greyscale images with -1 as
    white and 1 as black (ink on paper, as the digits are usually shown).
    2-D points: a scatter of the samples over the true ``modes`` (with their 3-std circles) or over
    ``real`` samples. Other vectors: a scatter of their first two coordinates beside ``real``'s.
    """
    plt = _pyplot()
    samples = samples.detach().to("cpu", torch.float32)
    if samples.dim() == 4 and samples.shape[1] not in (1, 3, 4):
        # imshow draws grey, RGB or RGBA pixels: of other channel counts, show the first channel
        title = f"{title} (channel 0 of {samples.shape[1]})" if title else f"channel 0 of {samples.shape[1]}"
        samples = samples[:, :1]
    if samples.dim() == 4:
        greyscale = samples.shape[1] == 1
        grid = image_grid(samples, pad_value=0.0 if greyscale and dark_on_light else 1.0)
        figure, axis = plt.subplots(figsize=(6, 6))
        if grid.ndim == 2:
            axis.imshow(grid, cmap="gray_r" if dark_on_light else "gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            axis.imshow(grid, interpolation="nearest")
        axis.axis("off")
    else:
        points = samples.reshape(samples.shape[0], -1)
        figure, axis = plt.subplots(figsize=(6, 6))
        if real is not None:
            reference = real.detach().to("cpu", torch.float32).reshape(real.shape[0], -1)
            axis.scatter(reference[:, 0], reference[:, 1 % reference.shape[1]], s=4, c="tab:gray", alpha=0.4,
                         label="real")
        axis.scatter(points[:, 0], points[:, 1 % points.shape[1]], s=4, c="tab:blue", alpha=0.5, label="generated")
        if modes is not None:
            modes = modes.detach().cpu()
            axis.scatter(modes[:, 0], modes[:, 1], marker="x", s=40, c="tab:red", label="true modes")
            if std is not None:
                for mode in modes:
                    axis.add_patch(plt.Circle((float(mode[0]), float(mode[1])), 3 * std, fill=False,
                                              color="tab:red", lw=0.6))
            span = float(modes.abs().max()) * 1.5 + 3 * (std or 0)
            axis.set_xlim(-span, span)
            axis.set_ylim(-span, span)
        axis.set_aspect("equal")
        axis.legend(loc="upper right", fontsize=8)
        if points.shape[1] > 2:
            axis.set_xlabel("coordinate 0")
            axis.set_ylabel("coordinate 1")
    if title:
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=110)
    finally:  # a failed write (full disk, bad path) must not leave the figure open in pyplot's registry
        plt.close(figure)


# (panel title, [(history key, label)], reference lines)
_PANELS = (
    ("losses", [("d_loss", "D loss"), ("g_loss", "G loss")], ()),
    ("V(G, D)", [("value", "V(G, D)")], ((-math.log(4), "-log 4 (optimum)"),)),
    ("JSD estimate (V + log 4) / 2", [("jsd", "JSD estimate")], ((0.0, "0"),)),
    ("discriminator outputs", [("d_real", "mean D(x)"), ("d_fake", "mean D(G(z))")], ((0.5, "1/2"),)),
)


def save_training(path: str | os.PathLike, history: Mapping[str, Sequence[float]], title: str = "") -> None:
    """Plot the logged statistics over steps. ``history`` maps ``"step"`` and statistic names
    (``d_loss``, ``g_loss``, ``value``, ``jsd``, ``d_real``, ``d_fake``) to equal-length lists;
    missing statistics leave their panel saying so."""
    plt = _pyplot()
    steps = np.asarray(history.get("step", []), dtype=np.float64)
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for axis, (name, series, references) in zip(axes.flat, _PANELS):
        drawn = False
        for key, label in series:
            values = history.get(key)
            if values is not None and len(values) == len(steps) and len(steps):
                axis.plot(steps, np.asarray(values, dtype=np.float64), label=label, lw=1.2)
                drawn = True
        if drawn:
            for level, label in references:
                axis.axhline(level, color="gray", ls="--", lw=0.8, label=label)
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(name, fontsize=10)
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("step")
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=110)
    finally:  # a failed write (full disk, bad path) must not leave the figure open in pyplot's registry
        plt.close(figure)
