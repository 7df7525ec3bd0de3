"""Where a contender's training step spends its time: torch.profiler over a few steady-state steps.

    python benchmarks/profile_step.py mlp-b64 fastgan tuned [--steps 20] [--rows 25]

Prints, per contender, the median step time and the ops with the most self CPU time (CUDA time too
on a GPU), so that a missed target can be traced to an op, a copy or Python overhead (the gap between
the step time and the sum of op self times).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("problem", help="a problem name from common.problems(), e.g. mlp-b64")
    parser.add_argument("contenders", nargs="+", choices=common.CONTENDERS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.select_device()
    problems = {p.name: p for p in common.problems(device)}
    if args.problem not in problems:
        parser.error(f"unknown problem {args.problem!r}; choose from {sorted(problems)}")
    problem = problems[args.problem]
    initial = problem.models(seed=0)
    inputs = common.InputSets(problem, device)
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in args.contenders:
        contender = common.make_contender(name, problem, device, initial)
        for _ in range(5):
            contender.step(*inputs.next())
        common.synchronize(device)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            contender.step(*inputs.next())
            common.synchronize(device)
            times.append(time.perf_counter() - t0)
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                contender.step(*inputs.next())
            common.synchronize(device)
        events = prof.key_averages()
        op_total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
        print(f"\n=== {problem.name} / {name}: median step {statistics.median(times) * 1e3:.3f} ms "
              f"(unprofiled), op self CPU time {op_total:.3f} ms/step (profiled) ===")
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
