"""Device time of one fused op's forward + backward, kernel by kernel, next to eager PyTorch's.

    python benchmarks/profile_ops.py [--ops bn linear] [--steps 20]

bench_batch_norm_act and bench_layers say how long a graphed step of each contender takes; this says
which kernels that time goes to: per problem and contender, torch.profiler's kernels with their
device time per step (eager steps: each kernel is its own row; a graph replays the same kernels).
On a CPU machine the same tables show self CPU time per op.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fastgan from this tree

import bench_batch_norm_act as bn_bench  # noqa: E402
import bench_layers as layer_bench  # noqa: E402
import common  # noqa: E402


def _bn_problems(device):
    for channels, size, layout in bn_bench.SHAPES:
        x, grad = bn_bench._inputs(channels, size, layout, device)
        for name in ("eager", "fastgan"):
            module, params, _ = bn_bench._contender(name, channels, device)
            yield (f"{bn_bench._problem(channels, size, layout)} {name}",
                   lambda m=module, p=params: bn_bench._step(m, p, x, grad))


def _linear_problems(device):
    for batch, features in ((64, 256), (256, 1024), (512, 1024)):
        eager = layer_bench._linear_eager(features)
        x = torch.randn(batch, features, device=device, requires_grad=True)
        grad = torch.randn(batch, features, device=device)
        for name in ("eager", "fastgan", "bare_matmul"):
            model = layer_bench._contender(name, eager)
            params = [x] + list(model.parameters())
            yield (f"linear+lrelu B={batch} F={features} {name}",
                   lambda m=model, ps=params: torch.autograd.grad(m(x), ps, grad))


OPS = {"bn": _bn_problems, "linear": _linear_problems}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args(argv)
    device = common.select_device()
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    summary = []
    for op in args.ops:
        for label, step in OPS[op](device):
            for _ in range(3):  # warm-up: Triton compiles, cuDNN / cuBLAS pick their algorithms
                step()
            if cuda:
                torch.cuda.synchronize()
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(args.steps):
                    step()
                if cuda:
                    torch.cuda.synchronize()
            events = prof.key_averages()
            kernels = [e for e in events if not cuda or e.device_type == torch.autograd.DeviceType.CUDA]
            kernels.sort(key=lambda e: -getattr(e, sort_key))
            per_step = sum(getattr(e, sort_key) for e in kernels) / args.steps
            summary.append((label, per_step, len(kernels)))
            print(f"== {label}: {per_step:.1f} us per step")
            for e in kernels[:args.rows]:
                print(f"   {getattr(e, sort_key) / args.steps:8.2f} us x{e.count // args.steps}  {e.key[:110]}")
    print("\nper step (us of self device time, kernels):")
    print("\n".join(f"{t:9.1f}  {n:3d}  {label}" for label, t, n in summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
