"""Where a contender's training step spends its time: torch.profiler over a few steady-state steps.

    python benchmarks/profile_step.py mlp-b64 fastgan tuned [--steps 20] [--rows 25]

Prints, per contender, the median step time and the ops with the most self CPU time (CUDA time too
on a GPU), so that a missed target can be traced to an op, a copy or Python overhead (the gap between
the step time and the sum of op self times).

``--gemm-floor`` (problems whose networks are nn.Linear layers: mlp-*, toy2d-*) first times the step's
matrix products alone -- G's forward, D's joint forward of real and fake, D's weight and input
gradients, D's forward on the fake batch and input gradients in the G step, G's gradients -- in the
order fastgan's step runs them, with nothing else: no implementation of the step that computes those
products can be faster, so it says how far a speed target is reachable.

``--phases`` (CPU) instead times the phases of the step in place: G's and D's forward calls, the
backward passes, the optimizer steps and zero_grad calls, the loss functions (the time each takes
within a step, median over the steps; "rest" is the median of what a step spends outside them). fastgan's C++ layers run their GEMMs outside torch's
op profiler, so the op table cannot show them; the phases can.
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
    parser.add_argument("--phases", action="store_true", help="time the phases of the step instead (CPU)")
    parser.add_argument("--gemm-floor", action="store_true",
                        help="first time the step's matrix products alone (networks of nn.Linear layers)")
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
    if args.gemm_floor:
        print_gemm_floor(problem, initial, device, args.steps)
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in args.contenders:
        contender = common.make_contender(name, problem, device, initial)
        for _ in range(5):
            contender.step(*inputs.next())
        if args.phases:
            print_phases(name, problem, contender, inputs, args.steps)
            continue
        common.synchronize(device)
        median = common.median_step_time(contender, inputs, args.steps)
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                contender.step(*inputs.next())
            common.synchronize(device)
        events = prof.key_averages()
        op_total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
        print(f"\n=== {problem.name} / {name}: median step {median * 1e3:.3f} ms "
              f"(unprofiled), op self CPU time {op_total:.3f} ms/step (profiled) ===")
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=args.rows))
    return 0


def print_gemm_floor(problem, models, device, steps: int) -> None:
    """Median time of the products of one training step (see the module docstring), in fastgan's order."""
    generator, discriminator = models
    g_layers = [m for m in generator.modules() if isinstance(m, torch.nn.Linear)]
    d_layers = [m for m in discriminator.modules() if isinstance(m, torch.nn.Linear)]
    if not g_layers or not d_layers or any(isinstance(m, torch.nn.modules.conv._ConvNd)
                                           for m in (*generator.modules(), *discriminator.modules())):
        raise SystemExit("--gemm-floor: the networks must be made of nn.Linear layers (mlp-*, toy2d-* problems)")
    g_w = [m.weight.detach().to(device) for m in g_layers]
    d_w = [m.weight.detach().to(device) for m in d_layers]
    b = problem.batch

    def forward(weights, x):
        acts = [x]
        for w in weights:
            acts.append(x := x @ w.t())
        return acts

    def backward(weights, acts, grad, weight_grads=True, first_input_grad=False):
        for i in reversed(range(len(weights))):
            if weight_grads:
                grad.t() @ acts[i]
            if i > 0 or first_input_grad:
                grad = grad @ weights[i]
        return grad

    z = torch.randn(b, g_w[0].shape[1], device=device)
    real = torch.randn(b, d_w[0].shape[1], device=device)
    ones2, ones = torch.ones(2 * b, d_w[-1].shape[0], device=device), torch.ones(b, d_w[-1].shape[0], device=device)

    def products():
        g_acts = forward(g_w, z)                                                 # G(z), reused by the G step
        backward(d_w, forward(d_w, torch.cat([real, g_acts[-1]])), ones2)        # D step: joint forward, grads
        grad_fake = backward(d_w, forward(d_w, g_acts[-1]), ones, weight_grads=False, first_input_grad=True)
        backward(g_w, g_acts, grad_fake)                                         # G step: D frozen, then G

    for _ in range(5):
        products()
    times = []
    for _ in range(max(steps, 20)):
        common.synchronize(device)
        t0 = time.perf_counter()
        products()
        common.synchronize(device)
        times.append(time.perf_counter() - t0)
    print(f"\n=== {problem.name}: the step's matrix products alone (fastgan's order, nothing else): median "
          f"{statistics.median(times) * 1e3:.3f} ms, fastest {min(times) * 1e3:.3f} ms ===")


def _phase_targets(contender) -> list[tuple[object, str, str]]:
    """(object, method name, phase label) of what to time in place for this contender."""
    targets = [(contender.generator, "forward", "G forward"), (contender.discriminator, "forward", "D forward"),
               (torch.Tensor, "backward", "backward")]
    trainer = getattr(contender, "trainer", None)
    if trainer is not None:
        targets += [(trainer.d_optimizer, "step", "D optimizer step"), (trainer.g_optimizer, "step", "G optimizer step"),
                    (trainer.d_optimizer, "zero_grad", "D zero_grad"), (trainer.g_optimizer, "zero_grad", "G zero_grad"),
                    (trainer, "_d_loss_fn", "d_loss"), (trainer, "_g_loss_fn", "g_loss")]
    else:
        targets += [(contender.opt_d, "step", "D optimizer step"), (contender.opt_g, "step", "G optimizer step")]
    return targets


def print_phases(name: str, problem, contender, inputs, steps: int) -> None:
    """Median wall time per step of each phase (see the module docstring), timed in place."""
    from collections import defaultdict
    current: dict[str, float] = defaultdict(float)  # phase -> wall time within the running step
    undo = []
    for obj, attr, label in _phase_targets(contender):
        original = getattr(obj, attr)
        had_own = attr in vars(obj)  # an instance attribute to restore, else a class attribute to reveal

        def timed(*a, _original=original, _label=label, **k):
            t0 = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                current[_label] += time.perf_counter() - t0

        setattr(obj, attr, timed)
        undo.append((obj, attr, original if had_own or isinstance(obj, type) else None))
    try:
        step_times, per_step = [], []
        for _ in range(steps):
            current.clear()
            t0 = time.perf_counter()
            contender.step(*inputs.next())
            step_times.append(time.perf_counter() - t0)
            per_step.append(dict(current))
    finally:
        for obj, attr, original in reversed(undo):
            if original is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, original)
    print(f"\n=== {problem.name} / {name}: median step {statistics.median(step_times) * 1e3:.3f} ms; "
          "phases (median over steps of the time spent in each per step) ===")
    for label in per_step[0]:
        print(f"  {label:18s} {statistics.median(p.get(label, 0.0) for p in per_step) * 1e3:8.3f} ms")
    rest = statistics.median(t - sum(p.values()) for t, p in zip(step_times, per_step))
    print(f"  {'rest':18s} {rest * 1e3:8.3f} ms  (step minus its phases: Python, stats, other ops)")


if __name__ == "__main__":
    sys.exit(main())
