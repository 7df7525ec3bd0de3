"""One shared definition of the whole-training-step benchmarks: problems, data, contenders, checks.

Every contender of a problem trains the *same* networks (deep copies of one initialisation), on the
*same* rotating input sets, with the *same* hyperparameters (Adam, lr 2e-4, betas (0.5, 0.999), the
non-saturating GAN loss written as binary cross-entropy as in the PyTorch DCGAN example). Nobody gets
a smaller problem, and :func:`check_equivalent` refuses to time a contender whose losses or parameter
updates differ.

Problems (``problems(device)``):

* ``mlp-b64`` / ``mlp-b512`` – MLP GAN: latent 64 -> 256 -> 512 -> 784 (Tanh) and
  784 -> 512 -> 256 -> 1 (Sigmoid), LeakyReLU(0.2), batch 64 and 512.
* ``dcgan`` – the PyTorch examples' DCGAN at 64x64 (``examples/dcgan/main.py``: ConvTranspose/BatchNorm/
  ReLU generator, Conv/BatchNorm/LeakyReLU discriminator ending in Sigmoid, N(0, 0.02) init; D's
  (N, 1, 1, 1) logit is flattened before the Sigmoid, as fastgan.Trainer wants one value per sample).
  Full widths (ngf = ndf = 64) and batch 128 on CUDA; widths 16 and batch 32 on CPU, where the full
  model takes seconds per step.
* ``toy2d`` – a 2-D toy GAN (latent 2, three hidden layers of 128, ReLU / LeakyReLU) on a ring of
  eight Gaussians, batch 256.

Contenders (``CONTENDERS``), each a :class:`Contender` with ``step(real, z) -> (d_loss, g_loss)``:

* ``naive``   – the PyTorch DCGAN example's loop verbatim: ``zero_grad()``, ``BCELoss`` on D's Sigmoid
  output, two backward passes for D, ``torch.optim.Adam`` defaults, D's weight gradients computed
  during the G step.
* ``tuned``   – tuned eager: ``Adam(fused=True)``, ``zero_grad(set_to_none=True)``, one backward for
  D's two loss terms, D's parameters frozen (``requires_grad_(False)``) during the G step.
* ``compile`` – ``torch.compile`` of the tuned eager step function (compile time is measured and
  reported apart from step time).
* ``fastgan`` – ``fastgan.Trainer(...).step(real, z)`` with its defaults (fused kernels, batched update,
  CUDA graphs where available); it finds D's final Sigmoid and uses the logit (softplus losses).

Conventions for every benchmark file (``report.py`` relies on them): put the problem in
``benchmark.group`` and the contender's name in ``benchmark.extra_info["contender"]``; optional
extra_info keys are ``peak_memory_bytes``, ``memory_method``, ``compile_time_s``, ``limit_s``,
``steps_per_round`` (the timed function runs that many steps), ``event_median_s`` (CUDA events) and
``paired_median_s`` (interleaved with the group's other contenders; see :func:`paired_step_times`).
"""
from __future__ import annotations

import copy
import gc
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

LR = 2e-4
BETAS = (0.5, 0.999)
N_INPUT_SETS = 8           # input sets rotated through while timing (see InputSets)
CONTENDERS = ("naive", "tuned", "compile", "fastgan")


def select_device() -> torch.device:
    """Where the suites run: the current GPU when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Problems: models and data
# ---------------------------------------------------------------------------------------------

def mlp_gan(latent_dim: int = 64, data_dim: int = 784, hidden: tuple[int, int] = (256, 512)):
    """MLP generator and discriminator (LeakyReLU(0.2); G ends in Tanh, D in Sigmoid as the examples)."""
    h1, h2 = hidden
    generator = nn.Sequential(
        nn.Linear(latent_dim, h1), nn.LeakyReLU(0.2),
        nn.Linear(h1, h2), nn.LeakyReLU(0.2),
        nn.Linear(h2, data_dim), nn.Tanh(),
    )
    discriminator = nn.Sequential(
        nn.Linear(data_dim, h2), nn.LeakyReLU(0.2),
        nn.Linear(h2, h1), nn.LeakyReLU(0.2),
        nn.Linear(h1, 1), nn.Sigmoid(),
    )
    return generator, discriminator


def _dcgan_weights_init(m: nn.Module) -> None:
    # as examples/dcgan/main.py: conv weights N(0, 0.02), BatchNorm weight N(1, 0.02), bias 0
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def dcgan(nz: int = 100, ngf: int = 64, ndf: int = 64, nc: int = 3):
    """The PyTorch examples' DCGAN (64x64 images), layer for layer, with its weight initialisation."""
    generator = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
    )
    discriminator = nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
        # The example's D returns (N, 1, 1, 1) and its loop calls .view(-1); fastgan.Trainer wants one
        # value per sample as (N,) or (N, 1), so the logit is flattened before the (unchanged) Sigmoid.
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Flatten(), nn.Sigmoid(),
    )
    generator.apply(_dcgan_weights_init)
    discriminator.apply(_dcgan_weights_init)
    return generator, discriminator


def toy2d_gan(latent_dim: int = 2, hidden: int = 128):
    """The 2-D toy GAN of mixture experiments: three hidden layers each side."""
    generator = nn.Sequential(
        nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2),
    )
    discriminator = nn.Sequential(
        nn.Linear(2, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1), nn.Sigmoid(),
    )
    return generator, discriminator


def ring_of_gaussians(n: int, generator: torch.Generator, modes: int = 8, radius: float = 2.0,
                      std: float = 0.02) -> torch.Tensor:
    """``n`` samples of the classic ring of ``modes`` Gaussians in the plane."""
    k = torch.randint(modes, (n,), generator=generator)
    angle = k.to(torch.float32) * (2 * math.pi / modes)
    centres = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return centres + std * torch.randn(n, 2, generator=generator)


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: the networks, the batch and the shapes of real data and noise."""
    name: str
    batch: int
    latent_shape: tuple[int, ...]
    data_shape: tuple[int, ...]
    build: Callable[[], tuple[nn.Module, nn.Module]] = field(compare=False, repr=False)

    def models(self, seed: int = 0) -> tuple[nn.Module, nn.Module]:
        """G and D, initialised from ``seed`` (every contender starts from copies of these)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build()

    def real_batch(self, generator: torch.Generator) -> torch.Tensor:
        if self.name.startswith("toy2d"):
            return ring_of_gaussians(self.batch, generator)
        # Real data in G's output range [-1, 1]; step time does not depend on its content.
        return torch.rand((self.batch, *self.data_shape), generator=generator) * 2 - 1

    def noise(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((self.batch, *self.latent_shape), generator=generator)


def problems(device: torch.device | str) -> list[Problem]:
    """The step-benchmark problems for ``device`` (DCGAN at full size only on CUDA)."""
    on_cuda = torch.device(device).type == "cuda"
    width, dcgan_batch = (64, 128) if on_cuda else (16, 32)
    return [
        Problem("mlp-b64", 64, (64,), (784,), mlp_gan),
        Problem("mlp-b512", 512, (64,), (784,), mlp_gan),
        Problem(f"dcgan-w{width}-b{dcgan_batch}", dcgan_batch, (100, 1, 1), (3, 64, 64),
                lambda: dcgan(ngf=width, ndf=width)),
        Problem("toy2d-b256", 256, (2,), (2,), toy2d_gan),
    ]


class InputSets:
    """``count`` different (real, z) pairs on the device, handed out in rotation.

    Rotating through several batches keeps a small problem's inputs from sitting in cache from one
    timed step to the next, which would flatter whoever touches them (and would not happen in training).
    """

    def __init__(self, problem: Problem, device: torch.device | str, count: int = N_INPUT_SETS,
                 seed: int = 1234, dtype: torch.dtype = torch.float32):
        gen = torch.Generator().manual_seed(seed)
        self.sets = [(problem.real_batch(gen).to(device, dtype), problem.noise(gen).to(device, dtype))
                     for _ in range(count)]
        self._next = 0

    def __len__(self) -> int:
        return len(self.sets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sets[i]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.sets[self._next]
        self._next = (self._next + 1) % len(self.sets)
        return pair


# ---------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------

class Contender:
    """A training-step implementation: ``step(real, z)`` does one D update then one G update (G's
    forward on z shared by both, as the DCGAN example) and returns (d_loss, g_loss) as device tensors,
    d_loss = BCE(D(real), 1) + BCE(D(G(z)), 0), g_loss = BCE(D(G(z)), 1) with D already updated."""

    name = "?"

    def step(self, real: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def networks(self) -> tuple[nn.Module, nn.Module]:
        """(G, D) whose parameters this contender trains."""
        return self.generator, self.discriminator


class NaiveEager(Contender):
    """The PyTorch DCGAN example's training loop (examples/dcgan/main.py), noise passed in."""

    name = "naive"

    def __init__(self, generator: nn.Module, discriminator: nn.Module, device):
        self.generator, self.discriminator = generator, discriminator
        self.criterion = nn.BCELoss()
        self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=LR, betas=BETAS)
        self.opt_g = torch.optim.Adam(generator.parameters(), lr=LR, betas=BETAS)

    def step(self, real, z):
        net_g, net_d, criterion = self.generator, self.discriminator, self.criterion
        # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
        net_d.zero_grad()
        label = torch.full((real.size(0),), 1.0, dtype=real.dtype, device=real.device)
        output = net_d(real).view(-1)
        err_d_real = criterion(output, label)
        err_d_real.backward()
        fake = net_g(z)
        label.fill_(0.0)
        output = net_d(fake.detach()).view(-1)
        err_d_fake = criterion(output, label)
        err_d_fake.backward()
        err_d = err_d_real + err_d_fake
        self.opt_d.step()
        # (2) Update G: maximize log(D(G(z)))
        net_g.zero_grad()
        label.fill_(1.0)
        output = net_d(fake).view(-1)
        err_g = criterion(output, label)
        err_g.backward()
        self.opt_g.step()
        return err_d.detach(), err_g.detach()


def _tuned_step(net_g, net_d, opt_g, opt_d, d_params, ones, zeros, real, z):
    """Tuned eager step; a free function so that ``torch.compile`` can take it as it is."""
    bce = nn.functional.binary_cross_entropy
    fake = net_g(z)
    opt_d.zero_grad(set_to_none=True)
    err_d = bce(net_d(real).view(-1), ones) + bce(net_d(fake.detach()).view(-1), zeros)
    err_d.backward()
    opt_d.step()
    for p in d_params:          # D frozen: no weight gradients for D during the G step
        p.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    err_g = bce(net_d(fake).view(-1), ones)
    err_g.backward()
    opt_g.step()
    for p in d_params:
        p.requires_grad_(True)
    return err_d.detach(), err_g.detach()


class TunedEager(Contender):
    """Eager PyTorch as a performance-aware user writes it."""

    name = "tuned"

    def __init__(self, generator, discriminator, device, batch: int):
        self.generator, self.discriminator = generator, discriminator
        self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=LR, betas=BETAS, fused=True)
        self.opt_g = torch.optim.Adam(generator.parameters(), lr=LR, betas=BETAS, fused=True)
        self.d_params = [p for p in discriminator.parameters() if p.requires_grad]
        self.ones = torch.ones(batch, device=device)
        self.zeros = torch.zeros(batch, device=device)
        self._fn = _tuned_step

    def step(self, real, z):
        return self._fn(self.generator, self.discriminator, self.opt_g, self.opt_d, self.d_params,
                        self.ones, self.zeros, real, z)


class CompiledEager(TunedEager):
    """``torch.compile`` of the tuned eager step (default mode). The first calls compile (the first
    step's optimizer-state initialisation and the frozen D each need graphs); the time the first steps
    take beyond steady-state steps is reported as the compile time."""

    name = "compile"

    def __init__(self, generator, discriminator, device, batch: int):
        super().__init__(generator, discriminator, device, batch)
        import torch._dynamo
        for flag in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
            if hasattr(torch._dynamo.config, flag):  # silently falling back to eager would time eager
                setattr(torch._dynamo.config, flag, True)
        self._fn = torch.compile(_tuned_step)


class FastganTrainer(Contender):
    """``fastgan.Trainer`` with its defaults for this loss and these hyperparameters."""

    name = "fastgan"

    def __init__(self, generator, discriminator, device, latent_shape):
        import fastgan
        latent = latent_shape[0] if len(latent_shape) == 1 else tuple(latent_shape)
        # fuse=True (the default) needs fastgan.fuse; until the fused layers exist the Trainer runs the
        # user's layers. Which one ran is recorded in the benchmark's extra_info ("fastgan_fuse").
        self.fuse = fuse_available()
        with warnings.catch_warnings():
            # D ends in nn.Sigmoid as in the example; the Trainer says once that it uses the logit.
            warnings.simplefilter("ignore", UserWarning)
            self.trainer = fastgan.Trainer(generator, discriminator, latent_dim=latent, loss="nonsaturating",
                                           lr=LR, betas=BETAS, device=device, seed=0, fuse=self.fuse)
        self.generator, self.discriminator = generator, discriminator

    def step(self, real, z):
        stats = self.trainer.step(real, z)
        return stats["d_loss"], stats["g_loss"]


def fuse_available() -> bool:
    """Whether this build of fastgan has ``fastgan.fuse`` (the fused layers), which Trainer(fuse=True) needs."""
    import fastgan
    if hasattr(fastgan, "fuse"):
        return True
    import fastgan.nn
    return hasattr(fastgan.nn, "fuse")


def make_contender(name: str, problem: Problem, device, initial: tuple[nn.Module, nn.Module]) -> Contender:
    """Contender ``name`` training its own deep copies of ``initial`` (G, D) on ``device``."""
    generator = copy.deepcopy(initial[0]).to(device)
    discriminator = copy.deepcopy(initial[1]).to(device)
    if name == "naive":
        return NaiveEager(generator, discriminator, device)
    if name == "tuned":
        return TunedEager(generator, discriminator, device, problem.batch)
    if name == "compile":
        return CompiledEager(generator, discriminator, device, problem.batch)
    if name == "fastgan":
        return FastganTrainer(generator, discriminator, device, problem.latent_shape)
    raise ValueError(f"unknown contender {name!r}; expected one of {CONTENDERS}")


# ---------------------------------------------------------------------------------------------
# Checks and measurements
# ---------------------------------------------------------------------------------------------

class ContenderMismatch(AssertionError):
    """A contender's step computes something else than the reference contender's."""


def default_tolerance(device) -> tuple[float, float]:
    """(rtol, atol) for the losses of the first steps. Two correct fp32 implementations drift apart
    through Adam: its first steps are ~lr * sign(g), which rounding flips for gradients near zero
    (measured on the CPU DCGAN: torch.compile vs naive 1.4e-4 relative in the second g_loss, 5e-4 in
    the third, while in float64 the two agree to 1e-15). On CUDA, cuDNN and Triton's tl.dot may use TF32."""
    return (1e-3, 1e-5) if torch.device(device).type == "cpu" else (2e-2, 1e-3)


def default_update_tolerance(device) -> float:
    """Relative-norm tolerance on parameter updates (see check_equivalent). Measured on the CPU DCGAN
    after three steps: tuned eager vs naive 1.7e-3, torch.compile vs naive 0.10 (G) and 0.02 (D) in fp32,
    2e-13 in float64; a doubled learning rate or a skipped update gives 1.0."""
    return 0.25 if torch.device(device).type == "cpu" else 0.5


def check_equivalent(losses: dict[str, Sequence[tuple[float, float]]], reference: str = "naive",
                     rtol: float = 1e-3, atol: float = 1e-5,
                     updates: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                     update_rtol: float = 0.25) -> None:
    """Raise :class:`ContenderMismatch` unless every contender computes the reference contender's step
    (all started from the same weights and saw the same inputs):

    * its (d_loss, g_loss) of every checked step match (``rtol``, ``atol``). Check at least two steps:
      the first step's g_loss is computed by the updated D, the second step's d_loss sees the updated G;
    * its total parameter updates of G and of D over those steps (``updates[name] = (dG, dD)``, flat
      tensors: parameters after minus before) match in relative norm, ||u - u_ref|| <= update_rtol
      ||u_ref||. Losses alone barely notice a wrong learning rate (a step moves them by ~lr); the update
      vectors do (a doubled learning rate or a skipped update differs by 1.0). Not elementwise: Adam's
      first step is lr * g / (|g| + eps), which rounding flips for gradients near zero, so single
      elements may differ by 2 lr while the update as a whole agrees (see default_update_tolerance).
    """
    want_steps = losses[reference]
    for name, got_steps in losses.items():
        if len(got_steps) != len(want_steps):
            raise ContenderMismatch(f"contender {name!r} ran {len(got_steps)} steps, {reference!r} {len(want_steps)}")
        for i, (got, want) in enumerate(zip(got_steps, want_steps)):
            for what, g, w in (("d_loss", got[0], want[0]), ("g_loss", got[1], want[1])):
                if not math.isfinite(g) or abs(g - w) > atol + rtol * abs(w):
                    raise ContenderMismatch(
                        f"contender {name!r} step {i}: {what} = {g:.7g} but {reference!r} gives {w:.7g} "
                        f"(rtol {rtol}, atol {atol}); refusing to time a contender that computes a "
                        "different training step")
    if updates is None:
        return
    want_g, want_d = updates[reference]
    for name, (got_g, got_d) in updates.items():
        for what, got, want in (("G", got_g, want_g), ("D", got_d, want_d)):
            if got.shape != want.shape:
                raise ContenderMismatch(f"contender {name!r} trains {got.numel()} parameters of {what}, "
                                        f"{reference!r} {want.numel()}")
            err = float(torch.linalg.vector_norm((got - want).double()))
            size = float(torch.linalg.vector_norm(want.double()))
            if not math.isfinite(err) or err > update_rtol * size:
                raise ContenderMismatch(
                    f"contender {name!r}: its update of {what}'s parameters differs from {reference!r}'s by "
                    f"{err / max(size, 1e-30):.3g} in relative norm (allowed {update_rtol}); refusing to time "
                    "a contender that computes a different training step")


def flat_parameters(module: nn.Module, names: Sequence[str]) -> torch.Tensor:
    """The named parameters of ``module``, flattened into one float64 CPU vector in ``names``' order."""
    params = dict(module.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ContenderMismatch(f"parameters {missing[:3]} are missing from the trained network")
    return torch.cat([params[n].detach().reshape(-1).double().cpu() for n in names])


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


MEMORY_METHOD_CUDA = ("torch.cuda.max_memory_allocated over construction + first steps, minus memory "
                      "allocated before construction (parameters, gradients, optimizer state, activations, "
                      "CUDA-graph pools; not the caching allocator's reserve)")
MEMORY_METHOD_CPU = ("peak of the running sum of torch.profiler(profile_memory=True) CPU allocation events "
                     "over construction + first steps (every tensor torch's allocator hands out: parameters, "
                     "gradients, optimizer state, activations, copies of the models; not malloc arenas, "
                     "the Python heap or compiled code)")


@dataclass
class Prepared:
    """A contender after its first steps, with what those steps showed."""
    contender: Contender
    losses: list[tuple[float, float]]   # (d_loss, g_loss) of each first step, on inputs[0], inputs[1], ...
    peak_memory_bytes: int
    memory_method: str
    first_steps_s: float                # wall time of construction + the first steps (compiles, if any)
    updates: tuple[torch.Tensor, torch.Tensor] | None = None   # (G, D) parameters after - before
    graphs_compiled: int = 0            # torch.compile (dynamo) graphs made during those steps


def prepare(build: Callable[[], Contender], inputs: InputSets, steps: int = 3,
            initial: tuple[nn.Module, nn.Module] | None = None) -> Prepared:
    """Build a contender and run its first ``steps`` steps on ``inputs[0..steps-1]``, measuring the peak
    memory it allocates meanwhile and recording its losses for :func:`check_equivalent`.

    CUDA: ``max_memory_allocated`` above what was allocated before. CPU: torch's allocator reports
    every allocation and free to the profiler under ``profile_memory=True``; the peak of their running
    sum is the CPU analogue of ``max_memory_allocated`` (tracemalloc cannot see torch's allocations,
    and ru_maxrss would mix in the interpreter, compiled code and malloc's caching).

    With ``initial`` (the (G, D) the contender copied), also records the parameter updates for
    :func:`check_equivalent`.
    """
    device = inputs[0][0].device
    gc.collect()
    from torch._dynamo.utils import counters
    graphs_before = counters["stats"]["unique_graphs"]

    def run() -> tuple[Contender, list[tuple[float, float]], float]:
        start = time.perf_counter()
        contender = build()
        raw = [contender.step(*inputs[i % len(inputs)]) for i in range(steps)]
        synchronize(device)
        elapsed = time.perf_counter() - start
        return contender, [(float(d), float(g)) for d, g in raw], elapsed

    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        contender, losses, elapsed = run()
        peak, method = torch.cuda.max_memory_allocated(device) - base, MEMORY_METHOD_CUDA
    else:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            contender, losses, elapsed = run()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        running = peak = 0
        for _, nbytes in events:
            running += nbytes
            peak = max(peak, running)
        method = MEMORY_METHOD_CPU
    updates = None
    if initial is not None:
        updates = tuple(
            flat_parameters(now, names) - flat_parameters(before, names)
            for now, before in zip(contender.networks(), initial)
            for names in [[n for n, _ in before.named_parameters()]])
    return Prepared(contender, losses, peak, method, elapsed, updates,
                    counters["stats"]["unique_graphs"] - graphs_before)


def paired_step_times(contenders: dict[str, Contender], inputs: InputSets, rounds: int,
                      steps_per_round: int = 1, warm: int = 0) -> dict[str, list[float]]:
    """Per-step wall times of every contender, measured interleaved: each round runs every contender
    once (``steps_per_round`` steps, then a device sync), in an order rotated from round to round,
    each contender's timed steps preceded by ``warm`` untimed rounds of its own.

    On a shared or throttling machine, load drifts over the minutes a benchmark file takes; timing
    contenders one after another lets that drift decide their ratio. Interleaved rounds expose all of
    them to the same conditions, so the ratio of their medians is a paired comparison. Without warm
    rounds, a single timed CPU step starts after the other contenders have pushed its parameters,
    gradients and optimizer state out of the caches, which a training loop (the same step again and
    again) never does; on CPU pass ``warm=1`` to time the step a loop runs.
    """
    device = inputs[0][0].device

    def round_of(contender: Contender) -> Callable[[], None]:
        def run():
            for _ in range(steps_per_round):
                contender.step(*inputs.next())
            synchronize(device)
        return run

    synchronize(device)
    times = interleaved_times({n: round_of(c) for n, c in contenders.items()}, rounds, warm=warm)
    return {n: [t / steps_per_round for t in ts] for n, ts in times.items()}


def interleaved_times(calls: dict[str, Callable[[], object]], rounds: int, iterations: int = 1,
                      warm: int = 0) -> dict[str, list[float]]:
    """Per-call wall times of ``calls`` (each ends synchronised with the device), interleaved: each round
    runs every call ``iterations`` times, in an order rotated from round to round (see
    :func:`paired_step_times` for why), each contender's turn after ``warm`` untimed calls (so that an
    op of a few hundred microseconds is timed with its data back in cache, as pytest-benchmark's
    back-to-back rounds time it, not just after another contender evicted it)."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            call = calls[name]
            for _ in range(warm):
                call()
            t0 = time.perf_counter()
            for _ in range(iterations):
                call()
            times[name].append((time.perf_counter() - t0) / iterations)
    return times


def speedup_quartiles(times: dict[str, list[float]], ours: str = "fastgan") -> dict[str, list[float]]:
    """For each other contender: the 25th, 50th and 75th percentile of ``ours``'s per-round speed-up
    over it (its round time / ours) in interleaved rounds."""
    quartiles = {}
    for name, t in times.items():
        if name != ours and ours in times:
            ratios = sorted(a / b for a, b in zip(t, times[ours]))
            quartiles[name] = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return quartiles


@dataclass
class PairedOpGroup:
    """The contenders of one op benchmark group, built together and timed interleaved.

    ``calls[name]``: the timed callable (one op step, synchronised; in graphed mode one call in
    ``iterations`` replays the graph) that the group's benchmarks also hand to pytest-benchmark,
    ``iterations`` calls per timed turn, each turn after as many untimed ones (one graph replay in
    graphed mode); ``info[name]``: whatever the builder reported (e.g. a compile time); ``errors[name]``:
    why a contender could not be built (its benchmark raises it; the others are timed without it);
    ``medians`` / ``quartiles``: from :func:`interleaved_times` and :func:`speedup_quartiles`."""
    calls: dict[str, Callable[[], object]]
    iterations: int
    info: dict[str, dict]
    errors: dict[str, BaseException] = field(default_factory=dict)
    rounds: int = 0
    medians: dict[str, float] = field(default_factory=dict)
    quartiles: dict[str, list[float]] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)

    def extra_info(self, contender: str) -> dict:
        """What a contender's benchmark records: its paired median (report.py prefers it when every
        contender of the group has one) and, for fastgan, the spread of its per-round speed-ups."""
        extra = {"paired_median_s": self.medians[contender], "paired_rounds": self.rounds, **self.info[contender]}
        if contender == "fastgan":
            extra["fastgan_paired_speedup_quartiles"] = self.quartiles
        return extra


_PAIRED_OP_GROUPS: dict[str, PairedOpGroup] = {}
_PAIRED_OP_GROUPS_ALIVE = 2  # a problem's "call" and "graphed" groups; older ones (e.g. left partial by -k) go
# interleaved rounds per op group: about this many seconds, 7 to 101 rounds
PAIRED_OP_BUDGET_S = float(os.environ.get("FASTGAN_BENCH_PAIRED_OP_BUDGET_S", 4.0))


def paired_op_group(group: str, contenders: Sequence[str],
                    build: Callable[[str], tuple[Callable[[], object], int, dict]], enabled: bool) -> PairedOpGroup:
    """The group's contenders, each built by ``build(name) -> (call, iterations, info)`` (warm-up,
    compilation and capture included) the first time any of its benchmarks asks, then timed in
    interleaved rounds (one round when benchmarks are disabled: the code path still runs). A group is
    dropped once each contender has taken it with :func:`take_paired_op`, or when newer groups
    replace it."""
    if group not in _PAIRED_OP_GROUPS:
        while len(_PAIRED_OP_GROUPS) >= _PAIRED_OP_GROUPS_ALIVE:
            del _PAIRED_OP_GROUPS[next(iter(_PAIRED_OP_GROUPS))]  # the oldest (its graphs and memory with it)
        built, errors = {}, {}
        # torch.compile contenders are built (compiled, warmed up, captured) before the others: on an H100
        # (torch 2.11, 2026-11-26) eager BatchNorm's CUDA graph, captured before a torch.compile
        # contender was built and captured, faulted (illegal memory access) when replayed afterwards;
        # captured after it, every graph replayed cleanly, as it did when each contender was built
        # and timed on its own.
        for name in sorted(contenders, key=lambda n: n != "torch_compile"):
            try:
                built[name] = build(name)
            except Exception as exc:  # that contender's benchmark fails with it; the others still run
                errors[name] = exc
        iterations = {it for _, it, _ in built.values()}
        if len(iterations) > 1:
            raise ValueError(f"{group}: contenders must run the same number of iterations per round, got {iterations}")
        entry = PairedOpGroup({n: b[0] for n, b in built.items()}, iterations.pop() if iterations else 1,
                              {n: b[2] for n, b in built.items()}, errors, pending=set(contenders))
        rounds = 1
        if enabled and entry.calls:
            per_round = sum(statistics.median(t) for t in
                            interleaved_times(entry.calls, 1, entry.iterations).values()) * entry.iterations * 2
            rounds = max(7, min(101, int(PAIRED_OP_BUDGET_S / max(per_round, 1e-9))))
        times = interleaved_times(entry.calls, rounds, entry.iterations, warm=entry.iterations)
        entry.rounds = rounds
        entry.medians = {n: statistics.median(t) for n, t in times.items()}
        entry.quartiles = speedup_quartiles(times)
        _PAIRED_OP_GROUPS[group] = entry
    return _PAIRED_OP_GROUPS[group]


def take_paired_op(group: str, contender: str) -> PairedOpGroup:
    """The built group for one contender's benchmark (raising why that contender could not be built);
    the last contender to take it frees it."""
    entry = _PAIRED_OP_GROUPS[group]
    entry.pending.discard(contender)
    if not entry.pending:
        del _PAIRED_OP_GROUPS[group]
    if contender in entry.errors:
        raise entry.errors[contender]
    return entry


def median_step_time(contender: Contender, inputs: InputSets, steps: int = 5) -> float:
    """Median wall time of ``steps`` synchronised steps (a quick estimate, e.g. to subtract from the
    first steps' time to get a compile time)."""
    device = inputs[0][0].device
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        contender.step(*inputs.next())
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_flops(problem: Problem, device, initial: tuple[nn.Module, nn.Module]) -> int:
    """Matmul + convolution FLOPs of one training step (the tuned eager step: no D weight gradients
    during the G step, the least work any contender has to do), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    contender = make_contender("tuned", problem, device, initial)
    real, z = InputSets(problem, device, count=1)[0]
    with FlopCounterMode(display=False) as counter:
        contender.step(real, z)
    return int(counter.get_total_flops())


def measure_matmul_rates(device) -> dict[str, float]:
    """The rates the "limit" line may assume, in FLOP/s: fp32 everywhere, and on CUDA also fp32 with
    TF32 tensor cores (cuDNN convolutions use TF32 by default, and so may Triton's tl.dot)."""
    rates = {"fp32": measure_matmul_rate(device)}
    if torch.device(device).type == "cuda":
        before = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = True
            rates["tf32"] = measure_matmul_rate(device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    return rates


def measure_copy_bandwidth(device, nbytes: int | None = None, repeats: int = 5) -> float:
    """The device's memory bandwidth in bytes/s, counting bytes read plus bytes written: the best of
    ``repeats`` timings of a large float32 copy (one stream in, one out) and of an in-place ``addcmul_``
    (three in, one out), past the caches (256 MiB per buffer on CPU, 1 GiB on CUDA), after a warm-up.
    Memory-bound benchmarks divide the bytes a step must move by it ("limit"). On a GPU both reach
    about the same rate; a CPU's cores draw more with more concurrent streams, so a kernel with more
    (Adam: four in, three out) can beat the limit there by a few tens of percent."""
    device = torch.device(device)
    nbytes = nbytes or (2 ** 30 if device.type == "cuda" else 2 ** 28)
    a, b = torch.rand(nbytes // 4, device=device), torch.rand(nbytes // 4, device=device)
    out = torch.empty_like(a)
    per_byte = a.element_size() * a.numel()
    kernels = [(lambda: out.copy_(a), 2 * per_byte), (lambda: out.addcmul_(a, b, value=0.5), 4 * per_byte)]
    best_rate = 0.0
    for run, moved in kernels:
        run()
        synchronize(device)
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                run()
                elapsed = time.perf_counter() - t0
            best_rate = max(best_rate, moved / elapsed)
    return best_rate


def measure_matmul_rate(device, size: int | None = None, repeats: int = 5,
                        dtype: torch.dtype = torch.float32) -> float:
    """The device's matmul rate in FLOP/s: the best of ``repeats`` timings of a square matmul
    (1024 on CPU, 8192 on CUDA), after one warm-up, under the current TF32 setting (torch's default:
    off for matmuls)."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            elapsed = time.perf_counter() - t0
        best = min(best, elapsed)
    return 2.0 * size ** 3 / best


# Op-level timing modes: on CUDA, an eager op call is bound by the host (Python, dispatch, launches:
# tens of microseconds per call against a few microseconds of kernel time at GAN layer sizes), so the
# op suites time each contender twice there: as called ("call") and as a CUDA graph replay of the same
# call ("graphed": device time only, what a captured training step such as fastgan.Trainer's sees).
# On CPU only "call" exists.
def op_timing_modes(device) -> tuple[str, ...]:
    return ("call", "graphed") if torch.device(device).type == "cuda" else ("call",)


GRAPHED_STEPS = 10  # steps per graph replay: the replay's launch and the sync amortised over them


class graphed:
    """``fn`` (a forward + backward over static input tensors) captured ``steps`` times in one CUDA
    graph. Call it ``steps`` times per timed round (``benchmark.pedantic(..., iterations=steps)``, which
    divides the round's time by ``steps``): the last call of each group of ``steps`` replays the graph
    and waits for the device, the others return at once, so each round times ``steps`` steps of device
    work plus one launch and one sync, reported per step.

    Warm-up runs on a side stream first (as torch.cuda.graph's documentation prescribes: lazy
    initialisation, cuBLAS workspaces, Triton compiles and autotuning happen there, not in the
    capture). Gradients the capture allocates (``.grad`` set to None inside ``fn``) come from the
    graph's private memory pool and are rewritten in place by each replay."""

    def __init__(self, fn: Callable[[], object], steps: int = GRAPHED_STEPS, warmup: int = 3):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(steps):
                fn()
        torch.cuda.synchronize()
        self.steps = steps
        self._calls = 0

    def __call__(self) -> None:
        self._calls += 1
        if self._calls % self.steps == 0:
            self.graph.replay()
            torch.cuda.synchronize()
