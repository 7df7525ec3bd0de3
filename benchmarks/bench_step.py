"""Whole training steps (one D update + one G update), four contenders side by side in one run:
naive eager (the PyTorch DCGAN example's loop), tuned eager, torch.compile of the eager step, and
fastgan.Trainer.step. Problems, contenders and hyperparameters: benchmarks/common.py.

    python -m pytest benchmarks/bench_step.py --benchmark-enable --benchmark-json out.json
    python benchmarks/report.py out.json --out-dir results/

Before any timing, every contender of a problem runs its first steps from the same weights on the same
inputs and the losses and parameter updates must agree (common.check_equivalent); the first steps also
give each contender's peak memory and, for torch.compile, the compile time (reported apart from step
time). Two timings per contender: pytest-benchmark's own (contenders one after another), and paired
rounds that interleave all contenders of a problem (common.paired_step_times; extra_info
"paired_median_s"), which report.py prefers because load drift on a shared machine cancels out. Each benchmark
records in extra_info: the contender, peak memory, compile time, the step's matmul + conv FLOPs, the
device's matmul rate measured in this run and the resulting limit time, and (on the last contender of a
problem) fastgan's speed-up over each other contender.
"""
from __future__ import annotations

import os
import statistics

import pytest
import torch
import torch._dynamo

import common

DEVICE = common.select_device()
PROBLEMS = common.problems(DEVICE)
# One timed call runs this many steps, then synchronises: on CUDA a sync per step would stall the
# host-side launch pipeline that eager PyTorch relies on; CUDA events time the same calls.
STEPS_PER_ROUND = 10 if DEVICE.type == "cuda" else 1
# Untimed rounds before each contender's timed round (common.paired_step_times): on CPU one step, so that
# the timed step finds its state in cache as the next step of a training loop does; a CUDA round's ten
# steps already do.
WARM_ROUNDS = 0 if DEVICE.type == "cuda" else 1
# Time for the interleaved rounds per problem (more rounds narrow the ratios on a noisy machine).
PAIRED_BUDGET_S = float(os.environ.get("FASTGAN_BENCH_PAIRED_BUDGET_S", 30.0 if DEVICE.type == "cpu" else 10.0))
CHECK_STEPS = 3


class ProblemRun:
    """Everything prepared for one problem: inputs, prepared contenders, FLOPs, measured medians."""

    def __init__(self, problem: common.Problem):
        self.problem = problem
        self.inputs = common.InputSets(problem, DEVICE)
        initial = problem.models(seed=0)
        self.prepared = {
            name: common.prepare(lambda name=name: common.make_contender(name, problem, DEVICE, initial),
                                 self.inputs, steps=CHECK_STEPS, initial=initial)
            for name in common.CONTENDERS
        }
        rtol, atol = common.default_tolerance(DEVICE)
        common.check_equivalent({n: p.losses for n, p in self.prepared.items()}, reference="naive",
                                rtol=rtol, atol=atol,
                                updates={n: p.updates for n, p in self.prepared.items()},
                                update_rtol=common.default_update_tolerance(DEVICE))
        for p in self.prepared.values():
            p.updates = None  # only needed for the check
        self.flops = common.step_flops(problem, DEVICE, initial)
        self.medians: dict[str, float] = {}
        self.paired: dict[str, float] | None = None

    def measure_paired(self, enabled: bool) -> None:
        """Interleaved timing of all contenders (common.paired_step_times), once per problem; a single
        round when benchmarks are disabled (the code path still runs)."""
        contenders = {n: p.contender for n, p in self.prepared.items()}
        if enabled:
            per_round = sum(common.median_step_time(c, self.inputs, steps=2) for c in contenders.values())
            rounds = int(os.environ.get("FASTGAN_BENCH_PAIRED_ROUNDS", 0)) or \
                max(7, min(51, int(PAIRED_BUDGET_S / max(per_round * STEPS_PER_ROUND * (1 + WARM_ROUNDS), 1e-9))))
        else:
            rounds = 1
        times = common.paired_step_times(contenders, self.inputs, rounds, STEPS_PER_ROUND, warm=WARM_ROUNDS)
        self.paired = {n: statistics.median(t) for n, t in times.items()}
        self.paired_rounds = rounds
        # spread of fastgan's per-round speed-up over each contender: (25th, 50th, 75th percentile)
        self.paired_ratio_quartiles = common.speedup_quartiles(times)


_current: dict[str, ProblemRun] = {}


def problem_run(problem: common.Problem) -> ProblemRun:
    """The prepared run of ``problem``, built on first use; the previous problem's is dropped."""
    if problem.name not in _current:
        _current.clear()
        torch._dynamo.reset()  # the previous problem's compiled graphs would count against recompile limits
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        _current[problem.name] = ProblemRun(problem)
    return _current[problem.name]


PROBLEMS_BY_NAME = {p.name: p for p in PROBLEMS}
CASES = [(p.name, c) for p in PROBLEMS for c in common.CONTENDERS]  # problem-major: fastgan last per problem


@pytest.mark.filterwarnings("ignore:fastgan.Trainer. the discriminator ends in nn.Sigmoid")
@pytest.mark.parametrize("problem_name,contender", CASES, ids=[f"{p}-{c}" for p, c in CASES])
def bench_step(benchmark, problem_name, contender, matmul_rate, matmul_rates):
    problem = PROBLEMS_BY_NAME[problem_name]
    run = problem_run(problem)
    if run.paired is None:
        run.measure_paired(enabled=not benchmark.disabled)
    prepared = run.prepared[contender]
    step, inputs = prepared.contender.step, run.inputs

    # Warm-up (steady state) and a quick step time.
    quick = common.median_step_time(prepared.contender, inputs, steps=3)
    # Compile time: the compiled contender's construction + first steps beyond the tuned eager one's
    # (the same work uncompiled, measured minutes apart at most rather than against a later median).
    compile_time = (max(0.0, prepared.first_steps_s - run.prepared["tuned"].first_steps_s)
                    if contender == "compile" else None)

    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def one_round():
        if DEVICE.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(STEPS_PER_ROUND):
                step(*inputs.next())
            end.record()
            torch.cuda.synchronize(DEVICE)
            events.append((start, end))
        else:
            for _ in range(STEPS_PER_ROUND):
                step(*inputs.next())

    benchmark.group = f"step {problem.name} ({DEVICE.type})"
    benchmark.extra_info.update(
        contender=contender, problem=problem.name, batch=problem.batch, device=DEVICE.type,
        steps_per_round=STEPS_PER_ROUND,
        peak_memory_bytes=prepared.peak_memory_bytes, memory_method=prepared.memory_method,
        compile_time_s=compile_time, first_losses=prepared.losses,
        fastgan_fuse=getattr(prepared.contender, "fuse", None),
        graphs_compiled=prepared.graphs_compiled,
        step_flops=run.flops, matmul_rate_flops=matmul_rate, matmul_rates=matmul_rates,
        limit_s=run.flops / matmul_rate,
        paired_median_s=run.paired[contender], paired_rounds=run.paired_rounds,
    )
    benchmark(one_round)

    if events:
        per_step = [s.elapsed_time(e) / 1e3 / STEPS_PER_ROUND for s, e in events]
        benchmark.extra_info["event_median_s"] = statistics.median(per_step)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        run.medians[contender] = benchmark.extra_info.get("event_median_s",
                                                          stats.stats.median / STEPS_PER_ROUND)
    else:  # --benchmark-disable: the one call above ran; keep the quick estimate
        run.medians[contender] = quick
    if contender == common.CONTENDERS[-1] and "fastgan" in run.medians:
        ours = run.medians["fastgan"]
        benchmark.extra_info["fastgan_speedup_vs"] = {
            name: t / ours for name, t in run.medians.items() if name != "fastgan"}
        benchmark.extra_info["fastgan_paired_speedup_vs"] = {
            name: t / run.paired["fastgan"] for name, t in run.paired.items() if name != "fastgan"}
        benchmark.extra_info["fastgan_paired_speedup_quartiles"] = run.paired_ratio_quartiles
