"""What each of fastgan.Trainer's speed features is worth: the whole training step with one feature
switched off at a time, against the Trainer with all of them on, in one run.

Problems: the step benchmarks' ``mlp-b64``, ``dcgan-*`` and ``toy2d-b256`` (``common.problems``).
Contenders (``benchmark.extra_info["contender"]``), all ``fastgan.Trainer`` on the same networks and
inputs:

* ``fastgan``               – the defaults (every feature on);
* ``no-fused-layers``       – ``fuse=False``: the user's nn.Linear / Conv / BatchNorm / activation modules;
* ``no-fused-optimizer``    – torch's ``Adam(fused=True)`` steps G and D instead of fastgan's flat-buffer
  FusedAdam (there is no public switch: the Trainer runs every torch optimizer as its fused twin, so
  the benchmark swaps the optimizers after construction);
* ``no-frozen-D``           – D's parameters stay trainable in the G step, so its backward also computes
  D's weight gradients (then discarded, as the example's loop does);
* ``separate-D-forwards``   – ``joint_d_forward=False`` (only where the default is the joint forward:
  D without batch-dependent layers);
* ``no-channels-last``      – ``channels_last=False`` (only for convolutional problems on CPU);
* ``no-cuda-graphs``        – ``cuda_graphs=False`` (only on CUDA).

report.py's speed-up column then reads as the feature's worth: (step time without it) / (step time
with everything on). Every variant must compute the same step (``common.check_equivalent``) before
it is timed; the timing is interleaved (``common.paired_step_times``).

    python -m pytest benchmarks/bench_ablation.py --benchmark-enable
"""
from __future__ import annotations

import os
import statistics
import warnings

import pytest
import torch

import common

DEVICE = common.select_device()
PROBLEMS = [p for p in common.problems(DEVICE) if p.name != "mlp-b512"]
STEPS_PER_ROUND = 10 if DEVICE.type == "cuda" else 1
# Untimed rounds before each contender's timed round (common.paired_step_times): on CPU one step, so that
# the timed step finds its state in cache as the next step of a training loop does; a CUDA round's ten
# steps already do.
WARM_ROUNDS = 0 if DEVICE.type == "cuda" else 1
PAIRED_BUDGET_S = float(os.environ.get("FASTGAN_BENCH_PAIRED_BUDGET_S", 30.0 if DEVICE.type == "cpu" else 10.0))
CHECK_STEPS = 3


class FastganVariant(common.Contender):
    """fastgan.Trainer with the defaults, or with one speed feature off (see the module docstring)."""

    def __init__(self, variant: str, generator, discriminator, device, latent_shape):
        import fastgan
        self.name = variant
        latent = latent_shape[0] if len(latent_shape) == 1 else tuple(latent_shape)
        options = {"fuse": variant != "no-fused-layers"}
        if variant == "separate-D-forwards":
            options["joint_d_forward"] = False
        if variant == "no-channels-last":
            options["channels_last"] = False
        if variant == "no-cuda-graphs":
            options["cuda_graphs"] = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # D's final Sigmoid: the Trainer says so once
            trainer = fastgan.Trainer(generator, discriminator, latent_dim=latent, loss="nonsaturating",
                                      lr=common.LR, betas=common.BETAS, device=device, seed=0, **options)
        if variant == "no-fused-optimizer":
            fused = torch.device(device).type in ("cpu", "cuda")
            for name, net, trainable in (("g", generator, trainer._g_trainable), ("d", discriminator, trainer._d_trainable)):
                setattr(trainer, f"{name}_optimizer",
                        # capturable on CUDA, so the step is still captured in the Trainer's CUDA graph and
                        # only the optimizer differs
                        torch.optim.Adam(trainable, lr=common.LR, betas=common.BETAS, fused=fused,
                                         capturable=torch.device(device).type == "cuda"))
                setattr(trainer, f"_{name}_fused", False)
        if variant == "no-frozen-D":
            trainer._d_trainable = []  # the G update freezes exactly these
        self.trainer, self.generator, self.discriminator = trainer, generator, discriminator

    def step(self, real, z):
        stats = self.trainer.step(real, z)
        return stats["d_loss"], stats["g_loss"]


def _copies(initial):
    import copy
    return copy.deepcopy(initial[0]).to(DEVICE), copy.deepcopy(initial[1]).to(DEVICE)


def variants(problem: common.Problem) -> list[str]:
    """The variants that switch off something this problem's default Trainer actually uses on DEVICE
    (decided at collection: no benchmark case exists for a switch that does not apply)."""
    initial = problem.models(seed=0)
    names = ["fastgan", "no-fused-layers", "no-fused-optimizer", "no-frozen-D"]
    probe = FastganVariant("fastgan", *_copies(initial), DEVICE, problem.latent_shape)
    if probe.trainer.joint_d_forward:
        names.append("separate-D-forwards")
    if DEVICE.type == "cpu" and any(isinstance(m, torch.nn.Conv2d) for m in initial[1].modules()):
        names.append("no-channels-last")
    if DEVICE.type == "cuda":
        names.append("no-cuda-graphs")
    return names


VARIANTS = {p.name: variants(p) for p in PROBLEMS}


class AblationRun:
    """One problem: its inputs, every variant prepared and checked, the interleaved medians."""

    def __init__(self, problem: common.Problem):
        self.problem = problem
        self.inputs = common.InputSets(problem, DEVICE)
        initial = problem.models(seed=0)
        self.names = VARIANTS[problem.name]
        self.prepared = {
            name: common.prepare(lambda name=name: FastganVariant(name, *_copies(initial), DEVICE,
                                                                  problem.latent_shape),
                                 self.inputs, steps=CHECK_STEPS, initial=initial)
            for name in self.names
        }
        rtol, atol = common.default_tolerance(DEVICE)
        common.check_equivalent({n: p.losses for n, p in self.prepared.items()}, reference="fastgan",
                                rtol=rtol, atol=atol, updates={n: p.updates for n, p in self.prepared.items()},
                                update_rtol=common.default_update_tolerance(DEVICE))
        self.paired: dict[str, float] | None = None

    def measure_paired(self, enabled: bool) -> None:
        contenders = {n: p.contender for n, p in self.prepared.items()}
        rounds = 1
        if enabled:
            per_round = sum(common.median_step_time(c, self.inputs, steps=2) for c in contenders.values())
            rounds = max(7, min(51, int(PAIRED_BUDGET_S / max(per_round * STEPS_PER_ROUND * (1 + WARM_ROUNDS), 1e-9))))
        times = common.paired_step_times(contenders, self.inputs, rounds, STEPS_PER_ROUND, warm=WARM_ROUNDS)
        self.paired = {n: statistics.median(t) for n, t in times.items()}
        self.rounds = rounds


_runs: dict[str, AblationRun] = {}


def ablation_run(problem: common.Problem) -> AblationRun:
    if problem.name not in _runs:
        _runs.clear()
        _runs[problem.name] = AblationRun(problem)
    return _runs[problem.name]


CASES = [(p.name, v) for p in PROBLEMS for v in VARIANTS[p.name]]


@pytest.mark.filterwarnings("ignore:fastgan.Trainer. the discriminator ends in nn.Sigmoid")
@pytest.mark.parametrize("problem_name,variant", CASES, ids=[f"{p}-{v}" for p, v in CASES])
def bench_ablation(benchmark, problem_name, variant):
    problem = next(p for p in PROBLEMS if p.name == problem_name)
    run = ablation_run(problem)
    if run.paired is None:
        run.measure_paired(enabled=not benchmark.disabled)
    contender, inputs = run.prepared[variant].contender, run.inputs

    def one_round():
        for _ in range(STEPS_PER_ROUND):
            contender.step(*inputs.next())
        common.synchronize(DEVICE)

    benchmark.group = f"ablation {problem.name} ({DEVICE.type})"
    benchmark.extra_info.update(contender=variant, problem=problem.name, device=DEVICE.type,
                                steps_per_round=STEPS_PER_ROUND, paired_median_s=run.paired[variant],
                                paired_rounds=run.rounds)
    benchmark(one_round)
