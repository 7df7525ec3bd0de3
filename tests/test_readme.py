"""The README's Python examples run as written: each ```python block of README.md is executed, in
order, in a namespace holding the objects its prose assumes (a small G and D, a dataset, logits,
layer inputs), in a temporary folder (the Trainer example trains its 10,000 steps and writes runs/a). An example that drifts from
the API fails here."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def _namespace() -> dict:
    """What the examples take as given, small enough to run in seconds on CPU."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(100, 32), nn.LeakyReLU(0.2), nn.Linear(32, 8))
    D = nn.Sequential(nn.Linear(8, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    return {
        "G": G, "D": D,
        "images": torch.randn(512, 8), "real_batch": torch.randn(64, 8),
        "real_logits": torch.randn(64, requires_grad=True), "fake_logits": torch.randn(64, requires_grad=True),
        "x": torch.randn(64, 32), "weight": torch.randn(16, 32), "bias": torch.randn(16),
        "conv_out": torch.randn(4, 16, 8, 8), "conv_bias": torch.randn(16),
        "h": torch.randn(64, 16), "bn": nn.BatchNorm1d(16),
    }


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 4, "the README's ```python blocks were not found"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: BLOCKS[i].splitlines()[0][:40])
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _namespace()
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    if "trainer" in namespace:   # 10,000 steps of the small GAN: some seconds
        from fastgan.checkpoint import checkpoint_step, list_checkpoints
        assert [checkpoint_step(p) for p in list_checkpoints(tmp_path / "runs" / "a")] == [10_000, 9_000]
        assert namespace["trainer"].step_count == 10_000 and namespace["samples"].shape == (64, 8)
    if "opt" in namespace:
        assert float(namespace["opt"].found_inf) == 0.0
