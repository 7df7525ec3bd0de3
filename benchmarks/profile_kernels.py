"""Device time of one Trainer step, kernel by kernel, for variants of the Trainer side by side.

    python benchmarks/profile_kernels.py dcgan-w64-b128 [--variants fused unfused] [--steps 10] [--rows 20]

bench_ablation says *that* a feature costs or saves time (e.g. fused layers in the DCGAN step on an
H100); this says *where*: per variant, torch.profiler's table of the ops and kernels with the most self
device time over ``--steps`` eager steps (CUDA graphs off, so each kernel is its own row; the graphed
step replays the same kernels), and the device time per step. On a CPU machine the same tables
show self CPU time.

Variants: ``fused`` (the Trainer's defaults), ``unfused`` (fuse=False), ``fused-nchw``
(channels_last=False).
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = {"fused": {}, "unfused": {"fuse": False}, "fused-nchw": {"channels_last": False}}


def main(argv: list[str] | None = None) -> int:
    import fastgan
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("problem", help="a problem name from common.problems(), e.g. dcgan-w64-b128")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["fused", "unfused"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--stack", type=int, default=0, metavar="N",
                        help="also group the ops by their N innermost Python frames and input shapes")
    args = parser.parse_args(argv)
    device = common.select_device()
    problems = {p.name: p for p in common.problems(device)}
    if args.problem not in problems:
        parser.error(f"problem must be one of {sorted(problems)}, got {args.problem!r}")
    problem = problems[args.problem]
    gen = torch.Generator().manual_seed(0)
    real, z = problem.real_batch(gen).to(device), problem.noise(gen).to(device)
    initial = problem.models(seed=0)
    latent = problem.latent_shape[0] if len(problem.latent_shape) == 1 else tuple(problem.latent_shape)
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    summary = []
    for name in args.variants:
        g, d = copy.deepcopy(initial[0]).to(device), copy.deepcopy(initial[1]).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # D's final Sigmoid
            trainer = fastgan.Trainer(g, d, latent_dim=latent, loss="nonsaturating", lr=common.LR,
                                      betas=common.BETAS, device=device, seed=0, cuda_graphs=False,
                                      **VARIANTS[name])
        for _ in range(3):  # warm-up: Triton compiles, cuDNN picks its algorithms
            trainer.step(real, z)
        if cuda:
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities, with_stack=args.stack > 0,
                                    record_shapes=args.stack > 0) as prof:
            for _ in range(args.steps):
                trainer.step(real, z)
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        # Kernels only on CUDA: an op's row repeats the device time of the kernels it launched.
        kernels = [e for e in events if not cuda or e.device_type == torch.autograd.DeviceType.CUDA]
        per_step_ms = sum(getattr(e, sort_key) for e in kernels) / args.steps / 1e3
        summary.append((name, per_step_ms))
        print(f"== {args.problem} {name}: {per_step_ms:.3f} ms of self {'device' if cuda else 'CPU'} time per step")
        print(events.table(sort_by=sort_key, row_limit=args.rows))
        if args.stack:
            print(prof.key_averages(group_by_input_shape=True, group_by_stack_n=args.stack)
                  .table(sort_by=sort_key, row_limit=args.rows, max_name_column_width=40))
    print("\n".join(f"{n}: {t:.3f} ms per step" for n, t in summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
