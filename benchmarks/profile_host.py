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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # fastgan from this tree, installed or not
import bench_batch_norm_act as bn_bench  # noqa: E402
import bench_layers as layer_bench  # noqa: E402
import common  # noqa: E402


def _steps(kind: str, device) -> dict:
    """{contender: one forward + backward call}, built by the benchmark suites' own builders: BatchNorm +
    LeakyReLU on 64 x 128 x 16x16, or linear + LeakyReLU with 64 rows of 512 features."""
    if kind == "bn":
        x, grad = bn_bench._inputs(128, 16, "nchw", device)
        steps = {}
        for name in ("eager", "fastgan"):
            module, params, _ = bn_bench._contender(name, 128, device)
            steps[name] = lambda m=module, p=params: bn_bench._step(m, p, x, grad)
        return steps
    eager = layer_bench._linear_eager(512)
    x = torch.randn(64, 512, device=device, requires_grad=True)
    grad = torch.randn(64, 512, device=device)
    steps = {}
    for name in ("eager", "fastgan"):
        model = layer_bench._contender(name, eager)
        params = [x, *model.parameters()]
        steps[name] = lambda m=model, ps=params: torch.autograd.grad(m(x), ps, grad)
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["bn", "linear"])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    device = common.select_device()
    steps = _steps(args.kind, device)

    for name, step in steps.items():
        for _ in range(10):
            step()
        common.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            step()
        host = (time.perf_counter() - t0) / args.calls
        common.synchronize(device)
        total = (time.perf_counter() - t0) / args.calls
        print(f"{args.kind} {name}: {host * 1e6:.1f} us of host time per forward + backward call "
              f"({total * 1e6:.1f} us including the final sync), {device}")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.calls):
        steps["fastgan"]()
    common.synchronize(device)
    profiler.disable()
    stats = pstats.Stats(profiler).sort_stats("tottime")
    print(f"\n== fastgan {args.kind}: functions by own time over {args.calls} calls")
    stats.print_stats(args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
