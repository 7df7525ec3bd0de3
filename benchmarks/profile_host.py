"""Where the host time of one eager op call goes: cProfile over forward + backward calls of a fused layer.

    python benchmarks/profile_host.py bn [--calls 200] [--rows 25]
    python benchmarks/profile_host.py linear

On a GPU an eager call of a fused op at GAN layer sizes is bound by the host (Python, autograd,
dispatch, kernel launches), not by its kernels: this prints the wall time per call of the fused layer
and of its eager torch twin, then the fused call's functions with the most own time (cProfile's
"tottime"), so that the host cost can be traced to validation, autograd Functions, allocations or the
Triton launcher.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # fastgan from this tree, installed or not
import common  # noqa: E402

import fastgan  # noqa: E402
from fastgan.nn import BatchNormAct2d  # noqa: E402


def _layers(kind: str, device):
    torch.manual_seed(0)
    if kind == "bn":
        eager = nn.Sequential(nn.BatchNorm2d(128), nn.LeakyReLU(0.2, inplace=True)).to(device)
        fused = BatchNormAct2d(128, act="lrelu", alpha=0.2).to(device)
        x = torch.randn(64, 128, 16, 16, device=device, requires_grad=True)
    else:
        eager = nn.Sequential(nn.Linear(512, 512), nn.LeakyReLU(0.2)).to(device)
        fused = fastgan.fuse(nn.Sequential(nn.Linear(512, 512), nn.LeakyReLU(0.2)).to(device))
        x = torch.randn(64, 512, device=device, requires_grad=True)
    return eager, fused, x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["bn", "linear"])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    device = common.select_device()
    eager, fused, x = _layers(args.kind, device)
    grad = torch.randn_like(eager(x))

    def step(module):
        params = [p for p in module.parameters()]
        return torch.autograd.grad(module(x), [x, *params], grad)

    for name, module in (("eager", eager), ("fastgan", fused)):
        for _ in range(10):
            step(module)
        common.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            step(module)
        host = (time.perf_counter() - t0) / args.calls
        common.synchronize(device)
        total = (time.perf_counter() - t0) / args.calls
        print(f"{args.kind} {name}: {host * 1e6:.1f} us of host time per forward + backward call "
              f"({total * 1e6:.1f} us including the final sync), {device}")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.calls):
        step(fused)
    common.synchronize(device)
    profiler.disable()
    stats = pstats.Stats(profiler).sort_stats("tottime")
    print(f"\n== fastgan {args.kind}: functions by own time over {args.calls} calls")
    stats.print_stats(args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
