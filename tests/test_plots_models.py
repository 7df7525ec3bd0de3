"""fastgan.plots and fastgan.models: argument checks, and no figure left open when a write fails."""
import pytest
import torch

from fastgan.models import build_models
from fastgan.plots import image_grid, save_samples, save_training


def test_image_grid_refuses_no_images():
    with pytest.raises(ValueError, match=r"images must have shape \(N, C, H, W\) with N >= 1, got \(0, 1, 8, 8\)"):
        image_grid(torch.zeros(0, 1, 8, 8))
    grid = image_grid(torch.zeros(3, 1, 8, 8), pad=1)
    assert grid.shape == (2 * 9 + 1, 2 * 9 + 1)


def test_failed_writes_close_their_figures(tmp_path):
    import matplotlib.pyplot as plt
    plt.close("all")
    missing = tmp_path / "no" / "such" / "folder" / "x.png"
    with pytest.raises(OSError):
        save_samples(missing, torch.zeros(4, 1, 8, 8))
    with pytest.raises(OSError):
        save_training(missing, {"d_loss": [1.0, 0.5], "g_loss": [0.7, 0.8], "step": [1, 2]})
    assert plt.get_fignums() == []


@pytest.mark.parametrize("width", [0, -3, True, 2.5])
@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_build_models_refuses_a_bad_width(model, width):
    with pytest.raises(ValueError, match="width must be a positive integer or None"):
        build_models(model, (1, 8, 8), latent_dim=16, width=width)
    generator, _ = build_models(model, (1, 8, 8), latent_dim=16, width=8)
    assert generator(torch.randn(2, 16)).shape == (2, 1, 8, 8)
