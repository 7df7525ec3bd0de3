"""``fastgan.Trainer``: the alternating GAN update (Algorithm 1 of Goodfellow et al., 2014) for any
``nn.Module`` generator and discriminator, on fastgan's fused kernels and batched optimizer step.

What one call does (``real`` a batch of N samples, z a batch of N latent vectors):

* ``d_step(real, z)``: one discriminator update on the loss of ``loss`` (``fastgan.ops.d_loss``)
  plus the R1 / WGAN-GP penalties when they are on. G runs without autograd.
* ``g_step(z)``: one generator update on ``fastgan.ops.g_loss``; D's parameters are frozen
  (``requires_grad=False``) so no weight gradient of D is computed, and unfrozen afterwards.
* ``step(real, z)``: ``d_step`` then ``g_step`` on the same z, reusing G's forward pass (exact: G
  does not change during the D step; this is what the PyTorch DCGAN example does).

Usage::

    trainer = fastgan.Trainer(generator, discriminator, latent_dim=100, loss="nonsaturating", seed=0)
    history = trainer.fit(images, steps=10_000, batch_size=64, checkpoint_every=1000, out_dir="runs/a",
                          max_nonfinite_steps=100)
    samples = trainer.sample(64)
    trainer = fastgan.Trainer.load("runs/a", build_generator(), build_discriminator())  # newest good one

Choices worth knowing (each one is tested in ``tests/test_trainer*.py``):

* **Joint D forward.** D sees ``cat([real, fake])`` in one forward pass (bigger GEMMs, half the
  per-layer calls) when every one of its modules is of a type known to compute each sample on its
  own: ``nn.Sequential``, Linear, Conv*/ConvTranspose*, activations, pooling, padding, Flatten /
  Unflatten, Upsample, LayerNorm / GroupNorm, InstanceNorm without running statistics, fastgan's
  fused versions of these (exact types, no forward hooks; ``_PER_SAMPLE_MODULES``). Anything else
  (BatchNorm, spectral norm, dropout, a minibatch-stddev layer, a D class with its own ``forward``)
  makes D run twice (real, then fake), so results equal the eager loop's. ``joint_d_forward=True``
  turns it on for a D whose own code is known to be per-sample; ``trainer.batch_dependent_layers``
  names what kept it off.
* **channels_last.** On CPU, when G or D has 2-D convolutions, 4-D real batches and latents are
  handed to the networks in ``torch.channels_last`` layout (a real batch is copied into a buffer kept
  per shape; a (N, C, 1, 1) latent only gets channels_last strides), so oneDNN runs every convolution
  and the fused BatchNorm kernels in NHWC without reordering at each call (measured ~15% of a DCGAN step
  on CPU). Same values and noise draws; results equal the NCHW run's to rounding.
  ``channels_last=False`` turns it off.
* **Sigmoid.** A D whose last executed layer is ``nn.Sigmoid`` (as the DCGAN example's) is detected
  on the first step by a probe forward (eval mode, no autograd); the trainer then uses the Sigmoid's
  input as the logit (one warning). Called outside the trainer, D still returns probabilities.
* **R1** (Mescheder et al., 2018), lazy as in StyleGAN2 (Karras et al., 2020): on every
  ``r1_every``-th D step, ``r1_gamma / 2 * E ||grad_x D(x)||^2`` over the real batch is added to D's
  loss multiplied by ``r1_every``, so the regularisation strength per step on average is the one
  ``r1_gamma`` asks for. ``r1_every=1`` is the non-lazy R1. The norm is taken per D input (with
  ``pack`` > 1, over the packed samples).
* **WGAN-GP** (Gulrajani et al., 2017), only with ``loss="wasserstein"``: ``gp_lambda *
  E (||grad D(x_hat)||_2 - 1)^2`` with ``x_hat = eps * real + (1 - eps) * fake``, eps ~ U[0, 1] per
  sample, in a separate forward pass of D.
* **Noise** comes from the trainer's own ``torch.Generator`` (seeded by ``seed``; otherwise from a
  draw of torch's global RNG at construction). Order of draws: one latent batch per D step (and one
  per ``g_step`` without z), one eps batch per D step when WGAN-GP is on.
* **fit** runs Algorithm 1: ``d_steps - 1`` calls of ``d_step`` (fresh real batch, fresh noise),
  then one ``step`` (a fresh real batch and fresh noise for the last D update, that noise reused by
  the G update as in the DCGAN example).
* **Precision.** ``"bf16"`` / ``"fp16"`` run the forward passes under ``torch.autocast``; the
  parameters, optimizer state and losses stay float32. fp16 adds dynamic loss scaling, one scale per
  network, updated on the device from the fused optimizer's ``found_inf`` (a step whose gradients
  are not finite is skipped by the optimizer; the scale halves; it doubles after 2000 good steps).
* **CUDA graphs.** With ``cuda_graphs="auto"`` on a CUDA device, each kind of call (``d_step``,
  ``g_step``, ``step``, with and without a due R1 step, per batch shape) runs eagerly twice as
  warm-up, then is captured once (noise drawn inside the graph from the trainer's generator, the
  batch copied into a static buffer, optimizer steps included) and replayed. If capture fails the
  trainer warns once and stays eager. A replay repeats the arguments of its capture, so the fused
  optimizers read their learning rates from device tensors refreshed from the param groups before
  each replay (LR schedulers work), and a change of any other hyperparameter (betas, momentum, the
  EMA's beta) drops the graphs, which are captured again; hyperparameters that change nearly every
  step (OneCycleLR's momentum cycling) turn the graphs off with a warning. Each batch shape gets its
  own graph (``fit`` keeps one shape by dropping incomplete batches).
* **Stats** are 0-d tensors on the device; nothing in a step reads a value back to the host.
  Under CUDA graphs they are copies of the graph's outputs (one small copy per call).
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import numbers
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any, Callable, Iterable

import torch
from torch import nn

from fastgan import _checkpoint

PRIORS = ("normal", "uniform")
PRECISIONS = ("fp32", "bf16", "fp16")
CHECKPOINT_FORMAT = "fastgan.Trainer/1"
CHECKPOINT_NAME = "checkpoint.pt"  # a single-file checkpoint (Trainer.save); run folders use checkpoint-<step>.pt

# Dynamic loss scaling for fp16 (the values torch.amp.GradScaler uses).
_INIT_SCALE = 2.0 ** 16
_GROWTH_FACTOR = 2.0
_BACKOFF_FACTOR = 0.5
_GROWTH_INTERVAL = 2000

_GRAPH_WARMUP = 2  # eager runs of each kind of call before it is captured
_DATA_ON_DEVICE_BYTES = 2 << 30  # fit moves CPU tensor data up to this size onto the GPU once


# ------------------------------------------------------------------------------------------------
# Small pieces
# ------------------------------------------------------------------------------------------------

def _loss_kinds() -> tuple[str, ...]:
    from fastgan.ops.losses import LOSS_KINDS
    return tuple(LOSS_KINDS)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """``module.eval()`` for the block, every submodule's own mode restored after: a probe or a sample
    updates no running statistics and draws no dropout, and each sample depends on its own noise only."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_real(name: str, value, low: float, high: float | None = None, *, low_open: bool = False,
                high_open: bool = True) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
        raise ValueError(f"{name} must be a number in {lo}{low}, {hi}, got {value!r}")
    return float(value)


# Module types whose output for one sample depends on that sample alone (and on nothing random or
# stateful), by exact type: a subclass may override forward. D runs real and fake in one joint
# forward only when all its modules are of these types (``_modules_blocking_joint_forward``).
_PER_SAMPLE_MODULES: tuple[type, ...] = (
    nn.Sequential, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.LayerNorm, nn.GroupNorm,
)


_PER_SAMPLE_FASTGAN_MODELS = ("MLPDiscriminator", "DCGANDiscriminator")


def _per_sample_module(m: nn.Module) -> bool:
    if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None):
        return False  # a hook (spectral_norm's, a user's) may do anything
    if type(m) in _PER_SAMPLE_MODULES or isinstance(m, _SigmoidTap):
        return True
    if type(m).__module__ == "fastgan.models" and type(m).__name__ in _PER_SAMPLE_FASTGAN_MODELS:
        return True  # fastgan's own discriminators: their forward only reshapes around self.net
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and type(m).__module__ == "torch.nn.modules.instancenorm":
        return not m.track_running_stats  # with running statistics, eval mode mixes the batch in
    try:  # fastgan's fused replacements of the types above (not those with BatchNorm)
        from fastgan.nn.layers import BiasAct, FusedLinear, _ConvActMixin
    except ImportError:
        return False
    return type(m).__module__ == "fastgan.nn.layers" and isinstance(m, (BiasAct, FusedLinear, _ConvActMixin))


def _modules_blocking_joint_forward(module: nn.Module) -> list[str]:
    """Names of D's modules that are not known to be per-sample (see ``_PER_SAMPLE_MODULES``): with
    any of them, real and fake go through D separately, as in the eager loop. Deliberately
    conservative: BatchNorm, a minibatch-stddev layer, spectral norm (its power iteration advances at
    every forward), dropout (the random masks would be drawn in another order) and any module with its
    own forward code (the user's D class itself, say) are on this list."""
    return [name or type(m).__name__ for name, m in module.named_modules() if not _per_sample_module(m)]


def _has_conv2d(module: nn.Module) -> bool:
    """Whether ``module`` has 2-D (transposed) convolutions, which oneDNN runs faster in channels_last."""
    return any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in module.modules())


class _SigmoidTap(nn.Module):
    """Stands where D's final ``nn.Sigmoid`` was: passes the logit through while the trainer runs D
    (``emit_logits`` True), applies the sigmoid otherwise, so D keeps its meaning for the user."""

    def __init__(self) -> None:
        super().__init__()
        self.emit_logits = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.emit_logits else torch.sigmoid(x)


# Autograd nodes of ops that only reshape, alias, copy or cast their one input (D's output after its
# sigmoid: ``.view(-1)``, ``.squeeze(1)``, ``.flatten()``, ``.float()``).
_RESHAPE_NODES = ("ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "SqueezeBackward",
                  "UnsqueezeBackward", "AliasBackward", "CloneBackward", "ToCopyBackward")


def _ends_in_sigmoid_op(out: torch.Tensor) -> bool:
    """Whether ``out``'s autograd graph ends in a sigmoid followed by reshaping ops only."""
    node = out.grad_fn
    while node is not None and type(node).__name__.startswith(_RESHAPE_NODES):
        inputs = [fn for fn, _ in node.next_functions if fn is not None]
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return node is not None and type(node).__name__.startswith("SigmoidBackward")


class _LossScaler:
    """Dynamic fp16 loss scale of one network, kept and updated on the device (no host sync)."""

    def __init__(self, device: torch.device) -> None:
        self.scale = torch.full((), _INIT_SCALE, dtype=torch.float32, device=device)
        self.inv_scale = torch.full((), 1.0 / _INIT_SCALE, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)

    def update(self, found_inf: torch.Tensor) -> None:
        if found_inf.dtype != torch.float32:
            found_inf = found_inf.float()
        torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, _GROWTH_FACTOR,
                                 _BACKOFF_FACTOR, _GROWTH_INTERVAL)
        torch.reciprocal(self.scale, out=self.inv_scale)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])
        torch.reciprocal(self.scale, out=self.inv_scale)


class _IndexCursor:
    """Where a shuffled pass over ``n`` samples stands: the data generator's state when the epoch's
    permutation was drawn and how many samples of it were used. Saved in checkpoints, so a resumed
    ``fit`` on the same tensor / Dataset continues with the very next batch."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm: torch.Tensor | None = None
        self.epoch_state: torch.Tensor | None = None
        self.position = 0
        self._perm_on: dict[torch.device, torch.Tensor] = {}  # the epoch's permutation, copied per device

    def next_indices(self, device: torch.device | None = None) -> torch.Tensor:
        """The next batch's sample indices (on ``device``: one copy of the permutation per epoch, so
        indexing data that lives on a GPU costs no host-to-device copy per batch)."""
        if self.perm is None or self.position + self.batch_size > self.n:
            self.epoch_state = self.generator.get_state()
            self.perm = torch.randperm(self.n, generator=self.generator)
            self._perm_on = {}
            self.position = 0
        perm = self.perm
        if device is not None and device.type != "cpu":
            perm = self._perm_on.get(device)
            if perm is None:
                perm = self._perm_on[device] = self.perm.to(device)
        idx = perm[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return idx

    def state_dict(self) -> dict[str, Any] | None:
        if self.perm is None:
            return None
        return {"n": self.n, "batch_size": self.batch_size, "epoch_state": self.epoch_state,
                "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        replay = torch.Generator()
        replay.set_state(state["epoch_state"])
        self.epoch_state = state["epoch_state"]
        self.perm = torch.randperm(self.n, generator=replay)
        self._perm_on = {}
        self.position = int(state["position"])


class _GraphEntry:
    """One captured kind of call: its CUDA graph, static inputs and static outputs."""

    def __init__(self) -> None:
        self.warmup_left = _GRAPH_WARMUP
        self.graph = None
        self.static_real: torch.Tensor | None = None
        self.static_z: torch.Tensor | None = None
        self.names: tuple[str, ...] = ()
        self.out: torch.Tensor | None = None


_DEFAULT_OPTIMIZER = ("fastgan.optim.fused", "FusedAdam")


def _recorded_groups(cfg: dict[str, Any], net: nn.Module, what: str) -> list | None:
    """The recorded optimizer's parameters per param group, as the new network's parameters (by name);
    None for a checkpoint that did not record them (written before fastgan recorded groups)."""
    groups = cfg.get("groups")
    if groups is None:
        return None
    named = dict(net.named_parameters())
    missing = [n for names in groups for n in names if n not in named]
    if missing:
        raise ValueError(f"the checkpoint's {what} updates parameters the new network does not have: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return [[named[n] for n in names] for names in groups]


def _rebuild_optimizer(cfg: dict[str, Any], params: list, what: str) -> torch.optim.Optimizer:
    """An optimizer like the recorded one over ``params`` (a list of parameters, or of param-group
    parameter lists), for ``Trainer.load``: fastgan's fused ones come back as their torch counterparts,
    which the Trainer turns into fused twins (with the EMA)."""
    import importlib
    defaults = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg["defaults"].items()}
    if cfg["module"].startswith("fastgan.") and cfg["class"] == "FusedSGD":
        cls = torch.optim.SGD
    elif cfg["module"].startswith("fastgan.") and cfg["class"] == "FusedAdam":
        cls = torch.optim.AdamW if defaults.get("decoupled_weight_decay") else torch.optim.Adam
    else:
        # The file names the class; import and call only torch's and fastgan's optimizers, so that a
        # crafted checkpoint cannot make weights_only loading call arbitrary code.
        module, name = str(cfg["module"]), str(cfg["class"])
        cls = None
        if module == "torch.optim" or module.startswith(("torch.optim.", "fastgan.optim.")):
            cls = getattr(importlib.import_module(module), name, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(f"the checkpoint's {what} is {module}.{name}; Trainer.load rebuilds only optimizers of "
                             f"torch.optim and fastgan.optim: pass {what}=... (an optimizer over the new network's "
                             "parameters) to Trainer.load, and its state is restored into it")
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        defaults = {k: v for k, v in defaults.items() if k in accepted and k != "params"}
    for key in ("foreach", "fused", "capturable", "differentiable"):
        defaults.pop(key, None)
    if params and isinstance(params[0], list):
        params = [{"params": ps} for ps in params]  # hyper-parameters per group: from the state_dict
    return cls(params, **defaults)


def _check_trainer_format(state: Any) -> None:
    """``validate`` for ``fastgan.checkpoint`` loading: a ValueError marks a file that is no Trainer checkpoint."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"is not a fastgan.Trainer checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")


def _check_module_state(net: nn.Module, saved: dict[str, Any], what: str) -> None:
    """Raise a ValueError naming ``what`` when ``saved`` (a state_dict) does not fit ``net``: missing or
    unexpected keys, or tensors of another shape (what load_state_dict would refuse after changing
    other networks already)."""
    mine = net.state_dict()
    missing = [k for k in mine if k not in saved]
    unexpected = [k for k in saved if k not in mine]
    shapes = [f"{k}: {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in mine.items()
              if k in saved and isinstance(v, torch.Tensor) and isinstance(saved[k], torch.Tensor)
              and saved[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing[:5]}" if missing else "", f"unexpected keys {unexpected[:5]}" if unexpected else "",
                 f"other shapes ({'; '.join(shapes[:5])})" if shapes else ""]
        raise ValueError(f"the checkpoint's {what} does not fit this trainer's {what}: "
                         + ", ".join(p for p in parts if p))


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------

class Trainer:
    """Trains ``generator`` against ``discriminator`` with the alternating update of Algorithm 1.

    Args:
        generator: any ``nn.Module`` mapping a latent batch ``(N, *latent_dim)`` to samples.
        discriminator: any ``nn.Module`` mapping ``(N / pack, pack * C, ...)`` samples to one logit
            per D input, shape ``(N / pack,)`` or ``(N / pack, 1)``.
        latent_dim: int or tuple of ints; else ``generator.latent_dim``.
        prior: ``"normal"`` (standard normal) or ``"uniform"`` (on [-1, 1]).
        loss: minimax | nonsaturating | hinge | wasserstein | least_squares (see ``fastgan.ops``).
        d_steps: k of Algorithm 1 (D updates per G update in ``fit``).
        lr, betas: Adam hyper-parameters of the default optimizers; ``g_lr`` / ``d_lr`` override lr
            per network.
        g_optimizer, d_optimizer: optimizers over the network's parameters. torch's Adam, AdamW and
            SGD run as their fused twins (``trainer.g_optimizer`` is the one that runs: attach LR
            schedulers to it); fastgan's fused optimizers run as they are; any other optimizer runs
            unfused, with a warning (and is refused with fp16, which needs the fused skip).
        r1_gamma, r1_every: lazy R1 penalty on real data (see the module docstring).
        gp_lambda: WGAN-GP penalty weight (``loss="wasserstein"`` only).
        ema_beta: keep an exponential moving average of G's weights (fused into G's update);
            ``sample()`` uses it.
        pack: PacGAN degree: D judges ``pack`` samples concatenated along dimension 1.
        precision: fp32 | bf16 | fp16.
        cuda_graphs: ``"auto"`` (on for CUDA devices), True (CUDA required) or False.
        fuse: apply ``fastgan.fuse`` to G and D in place (same parameter objects and state_dict
            keys). D is fused on the first step, after the Sigmoid check.
        joint_d_forward: ``None`` decides from D's layers (see the module docstring); True / False
            force one joint real+fake forward of D or two separate ones.
        channels_last: ``None`` (on for CPU training when G or D has 2-D convolutions), True or False:
            feed 4-D real batches and latents to the networks in ``torch.channels_last`` layout (see
            the module docstring).
        device: where to train; default: where G's parameters are. The networks are moved there.
        seed: seeds the trainer's own generator (noise, WGAN-GP's eps, the order of ``fit``'s data).
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, *,
                 latent_dim: int | tuple[int, ...] | None = None,
                 prior: str = "normal",
                 loss: str = "nonsaturating",
                 d_steps: int = 1,
                 lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999),
                 g_lr: float | None = None, d_lr: float | None = None,
                 g_optimizer: torch.optim.Optimizer | None = None,
                 d_optimizer: torch.optim.Optimizer | None = None,
                 r1_gamma: float = 0.0, r1_every: int = 16, gp_lambda: float = 0.0,
                 ema_beta: float | None = None,
                 pack: int = 1,
                 precision: str = "fp32",
                 cuda_graphs: bool | str = "auto",
                 fuse: bool = True,
                 joint_d_forward: bool | None = None,
                 channels_last: bool | None = None,
                 device: torch.device | str | None = None,
                 seed: int | None = None) -> None:
        # ---- the networks, their device and dtype --------------------------------------------
        if not isinstance(generator, nn.Module):
            raise TypeError(f"generator must be an nn.Module, got {type(generator).__name__}")
        if not isinstance(discriminator, nn.Module):
            raise TypeError(f"discriminator must be an nn.Module, got {type(discriminator).__name__}")
        if generator is discriminator:
            raise ValueError("generator and discriminator are the same module; they must be two networks")
        g_params, d_params = list(generator.parameters()), list(discriminator.parameters())
        if not g_params:
            raise ValueError("generator has no parameters to train")
        if not d_params:
            raise ValueError("discriminator has no parameters to train")
        shared = {id(p) for p in g_params} & {id(p) for p in d_params}
        if shared:
            raise ValueError(f"generator and discriminator share {len(shared)} parameter(s); "
                             "the two networks must have their own parameters")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError, ValueError) as exc:
                raise ValueError(f"device must be a torch.device or a device string such as 'cpu' or 'cuda:0', "
                                 f"got {device!r} ({exc})") from None
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            generator.to(device)
            discriminator.to(device)
        self.device = self._common(generator, discriminator, "device")
        self.param_dtype = self._common(generator, discriminator, "dtype")
        if not self.param_dtype.is_floating_point:
            raise ValueError(f"the networks' parameters must be floating point, got {self.param_dtype}")
        self.generator = generator
        self.discriminator = discriminator

        # ---- options -------------------------------------------------------------------------
        self.latent_dim = self._resolve_latent_dim(latent_dim, generator)
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        self.prior = prior
        kinds = _loss_kinds()
        if not isinstance(loss, str) or loss not in kinds:
            raise ValueError(f"loss must be one of {kinds}, got {loss!r}")
        self.loss = loss
        self.d_steps = _check_int("d_steps", d_steps, 1)
        lr = _check_real("lr", lr, 0.0, low_open=True)
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        betas = (_check_real("betas[0]", betas[0], 0.0, 1.0), _check_real("betas[1]", betas[1], 0.0, 1.0))
        for lr_name, lr_value, opt_name, opt_value in (("g_lr", g_lr, "g_optimizer", g_optimizer),
                                                        ("d_lr", d_lr, "d_optimizer", d_optimizer)):
            if lr_value is not None and opt_value is not None:
                raise ValueError(f"{lr_name} sets the learning rate of the default optimizer, but {opt_name} was "
                                 f"given; set the learning rate on {opt_name} instead")
        if g_optimizer is not None and d_optimizer is not None and (lr != 2e-4 or tuple(betas) != (0.5, 0.999)):
            raise ValueError("lr and betas set the default optimizers, but g_optimizer and d_optimizer were both "
                             "given; set them on those optimizers instead")
        g_lr = lr if g_lr is None else _check_real("g_lr", g_lr, 0.0, low_open=True)
        d_lr = lr if d_lr is None else _check_real("d_lr", d_lr, 0.0, low_open=True)
        self.r1_gamma = _check_real("r1_gamma", r1_gamma, 0.0)
        self.r1_every = _check_int("r1_every", r1_every, 1)
        self.gp_lambda = _check_real("gp_lambda", gp_lambda, 0.0)
        if self.gp_lambda > 0 and loss != "wasserstein":
            raise ValueError(f"gp_lambda={gp_lambda} is the WGAN-GP penalty and belongs to loss='wasserstein', "
                             f"not loss={loss!r} (use r1_gamma for a gradient penalty with other losses)")
        if ema_beta is not None:
            ema_beta = _check_real("ema_beta", ema_beta, 0.0, 1.0)
        self.ema_beta = ema_beta
        self.pack = _check_int("pack", pack, 1)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        if cuda_graphs not in ("auto", True, False):
            raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
        if cuda_graphs is True and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, but the networks are on {self.device}")
        self._graphs_on = self.device.type == "cuda" and cuda_graphs in ("auto", True)
        self._graphs_asked = cuda_graphs is True
        self._graphs: dict[tuple, _GraphEntry] = {}
        self._graph_hypers: tuple | None = None  # the optimizers' hyperparameters the graphs were captured with
        self._replays_since_capture = 0
        self._quick_recaptures = 0  # graphs dropped for new hyperparameters soon after their capture, in a row
        if not isinstance(fuse, bool):
            raise ValueError(f"fuse must be True or False, got {fuse!r}")
        self.fuse = fuse
        if joint_d_forward not in (None, True, False):
            raise ValueError(f"joint_d_forward must be None, True or False, got {joint_d_forward!r}")
        if channels_last not in (None, True, False):
            raise ValueError(f"channels_last must be None, True or False, got {channels_last!r}")
        if channels_last is None:
            channels_last = self.device.type == "cpu" and (_has_conv2d(generator) or _has_conv2d(discriminator))
        self.channels_last = channels_last
        # D's modules not known to be per-sample; the joint real+fake forward needs none
        self.batch_dependent_layers = _modules_blocking_joint_forward(discriminator)
        self.joint_d_forward = (not self.batch_dependent_layers) if joint_d_forward is None else joint_d_forward
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                                 or not -2 ** 63 <= seed < 2 ** 64):
            raise ValueError(f"seed must be an int in [-2**63, 2**64) (torch.manual_seed's range) or None, got {seed!r}")

        # ---- random generators ---------------------------------------------------------------
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())  # follows torch.manual_seed
        self.seed = int(seed)
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(self.seed)
        self._sample_gen = torch.Generator(device=self.device)
        self._sample_gen.manual_seed((self.seed + 1) % 2 ** 64)
        self._data_gen = torch.Generator()
        self._data_gen.manual_seed((self.seed + 2) % 2 ** 64)
        self._cursor: _IndexCursor | None = None
        self._pending_cursor_state: dict[str, Any] | None = None
        self.loaded_rank_states: dict[str, Any] | None = None  # see load_state_dict

        # ---- fusion, EMA, optimizers ---------------------------------------------------------
        if fuse:
            self._fuse_module(generator)
        self._d_layers_fused = False  # D is fused on the first step, after the Sigmoid probe
        self._setup_done = False
        self._sigmoid_tap: _SigmoidTap | None = None
        self._d_trainable = [p for p in d_params if p.requires_grad]
        self._g_trainable = [p for p in g_params if p.requires_grad]
        if not self._g_trainable:
            raise ValueError("generator has no parameter with requires_grad=True")
        if not self._d_trainable:
            raise ValueError("discriminator has no parameter with requires_grad=True")

        optim = self._optim_module()
        self.ema = optim.EMA(generator, ema_beta) if ema_beta is not None else None
        if self.ema is None and getattr(g_optimizer, "ema", None) is not None:
            self.ema = g_optimizer.ema  # a fused optimizer built with its own EMA: sample() uses it
            self.ema_beta = self.ema.beta
        self._ema_fused = False
        self.g_optimizer, self._g_fused = self._make_optimizer(
            "g_optimizer", g_optimizer, generator, self._g_trainable, g_lr, betas, ema=self.ema)
        self.d_optimizer, self._d_fused = self._make_optimizer(
            "d_optimizer", d_optimizer, discriminator, self._d_trainable, d_lr, betas, ema=None)
        if precision == "fp16":
            for name, fused in (("g_optimizer", self._g_fused), ("d_optimizer", self._d_fused)):
                if not fused:
                    raise ValueError(f"precision='fp16' needs fused optimizers (their step unscales the "
                                     f"gradients and skips non-finite steps on the device), but {name} "
                                     f"is a {type(getattr(self, name)).__name__} with no fused twin")
            self._d_scaler: _LossScaler | None = _LossScaler(self.device)
            self._g_scaler: _LossScaler | None = _LossScaler(self.device)
        else:
            self._d_scaler = self._g_scaler = None

        # ---- bookkeeping ---------------------------------------------------------------------
        self.step_count = 0     # G updates (iterations of Algorithm 1) done
        self.d_step_count = 0   # D updates done
        self._z_cache: dict[int, torch.Tensor] = {}
        self._layout_cache: dict[tuple, torch.Tensor] = {}  # channels_last copies of real batches, per shape
        self._eps_cache: dict[tuple, torch.Tensor] = {}
        self._checked_real: tuple | None = None
        self._sample_shape: torch.Size | None = None
        self._last_r1 = torch.full((), float("nan"), device=self.device)  # latest R1 value (lazy R1)
        self._autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self._graph_failure: str | None = None
        # Fused optimizers: zero_grad(set_to_none=True) lets autograd hand over each new gradient, which
        # the optimizer's step copies into its flat buffer right before its kernel reads it (exact
        # torch semantics: a parameter backward did not reach is skipped, not stepped with a zero
        # gradient). Copying in step rather than from the optimizer's per-parameter hooks inside
        # backward measured ~2.5% of an MLP-b64 step on CPU. Under CUDA graphs the .grad views stay
        # put (static, nothing allocated in capture).
        self._grads_to_none = not self._graphs_on
        if self._grads_to_none:
            for opt, fused in ((self.d_optimizer, self._d_fused), (self.g_optimizer, self._g_fused)):
                if fused and hasattr(opt, "gather_grads_in_step"):
                    opt.gather_grads_in_step()
        from fastgan.ops.losses import d_loss, g_loss
        self._d_loss_fn, self._g_loss_fn = d_loss, g_loss
        # What the forwards whose gradients are synchronised go through: the networks themselves, or
        # their DistributedDataParallel wrappers after wrap_data_parallel().
        self._g_net: nn.Module = generator
        self._d_net: nn.Module = discriminator

    # ------------------------------------------------------------------------------------------
    # data-parallel training
    # ------------------------------------------------------------------------------------------

    @property
    def data_parallel(self) -> bool:
        """Whether G and D train through DistributedDataParallel wrappers (see wrap_data_parallel)."""
        return self._d_net is not self.discriminator

    def wrap_data_parallel(self, process_group=None) -> None:
        """Train G and D data-parallel: one ``torch.nn.parallel.DistributedDataParallel`` wrapper per
        network, over the default process group (or ``process_group``). ``fastgan.distributed.
        data_parallel(trainer)`` calls this after synchronising the ranks' starting state; call that.

        * ``find_unused_parameters=False``: every step reaches every trainable parameter.
        * No buffer broadcast at each forward (``broadcast_buffers=False``; ``forward_sync_buffers=False``
          from torch 2.13 on): D runs several forwards before one backward (real, fake, the
          penalty's); re-broadcasting BatchNorm buffers in place at each forward breaks that
          backward. Each rank keeps its own running statistics (``fastgan.distributed.
          average_buffers`` averages them for evaluation and checkpoints).
        * Forwards whose gradients are synchronised go through the wrappers: D in the D step, G in
          the G step (and G's forward that ``step`` shares). The frozen D of the G step and G's
          no-grad forward of a D step call the networks themselves, so DDP never waits for
          gradients that do not come. R1 and WGAN-GP take ``autograd.grad(create_graph=True)`` with
          respect to D's input, which fires no DDP hook, then one ordinary backward.
        * The flat gradient buffer is DDP's bucket: ``gradient_as_bucket_view=True`` makes ``.grad``
          views of DDP's buckets, the bucket cap holds each network in one bucket per dtype, and the
          fused optimizers adopt that bucket (with several param groups: the part of it holding each
          group, when that part is contiguous) as their flat gradient buffer (``adopt_gradient_buckets``:
          parameters and state re-laid out once in DDP's order, and again after DDP re-buckets at its
          second iteration). DDP all-reduces the buffer the optimizer then steps on, in place; no
          gradient is copied. ``zero_grad`` is one fill of that bucket.
        * CUDA graphs are turned off (DDP's collectives run outside them).
        """
        if self.data_parallel:
            return
        import torch.distributed as dist
        if process_group is None and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("wrap_data_parallel needs torch.distributed initialised first (under torchrun: "
                               "fastgan.distributed.init_from_env()), or a process_group")
        from fastgan.distributed import ddp_wrap

        def wrap(net: nn.Module, trainable: list) -> nn.Module:
            # One bucket per dtype: the optimizer's whole flat gradient buffer (a GAN network is
            # small enough that overlapping several buckets' all-reduces with backward gains little).
            megabytes = sum(p.numel() * p.element_size() for p in trainable) / 2 ** 20
            return ddp_wrap(net, self.device, process_group=process_group, bucket_cap_mb=megabytes + 1.0)

        self._g_net = wrap(self.generator, self._g_trainable)
        self._d_net = wrap(self.discriminator, self._d_trainable)
        if self._graphs_on:
            if self._graphs_asked:
                warnings.warn("fastgan.Trainer: cuda_graphs=True is turned off under DistributedDataParallel",
                              RuntimeWarning, stacklevel=2)
            self._graphs_on = False
            self._graphs.clear()
        # Zero the (adopted) bucket in one fill; autograd then accumulates into DDP's views in place.
        self._grads_to_none = False
        for opt, fused in ((self.d_optimizer, self._d_fused), (self.g_optimizer, self._g_fused)):
            if fused:
                opt.gather_grads_in_step()
                opt.adopt_gradient_buckets()

    # ------------------------------------------------------------------------------------------
    # construction helpers
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _common(generator: nn.Module, discriminator: nn.Module, attr: str):
        values = {}
        for name, net in (("generator", generator), ("discriminator", discriminator)):
            found = {getattr(p, attr) for p in net.parameters()}
            if len(found) > 1:
                raise ValueError(f"{name}'s parameters are spread over several {attr}s {sorted(map(str, found))}; "
                                 f"they must share one (pass device=... to move the networks)")
            values[name] = found.pop()
        if values["generator"] != values["discriminator"]:
            hint = " (pass device=... to move both)" if attr == "device" else ""
            raise ValueError(f"generator's parameters have {attr} {values['generator']} but discriminator's "
                             f"have {values['discriminator']}; they must agree{hint}")
        return values["generator"]

    @staticmethod
    def _resolve_latent_dim(latent_dim, generator: nn.Module) -> tuple[int, ...]:
        source = "latent_dim"
        if latent_dim is None:
            latent_dim = getattr(generator, "latent_dim", None)
            source = f"{type(generator).__name__}.latent_dim"
            if latent_dim is None:
                raise ValueError("latent size unknown: pass latent_dim=... (an int or a tuple such as "
                                 "(100, 1, 1)) or give the generator a `latent_dim` attribute")
        dims = (latent_dim,) if isinstance(latent_dim, numbers.Integral) else latent_dim
        try:
            dims = tuple(dims)
        except TypeError:
            raise ValueError(f"{source} must be a positive int or a tuple of them, got {latent_dim!r}") from None
        if not dims or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in dims):
            raise ValueError(f"{source} must be a positive int or a tuple of them, got {latent_dim!r}")
        return tuple(int(d) for d in dims)

    @staticmethod
    def _optim_module():
        import fastgan.optim as optim  # landed by the optimizer work; imported here, not at fastgan import
        return optim

    @staticmethod
    def _fuse_module(module: nn.Module) -> None:
        import fastgan
        fuse_fn = getattr(fastgan, "fuse", None)
        if fuse_fn is None:
            import fastgan.nn
            fuse_fn = getattr(fastgan.nn, "fuse", None)
        if fuse_fn is None:
            raise ImportError("fuse=True needs fastgan.fuse, which this build of fastgan does not have; "
                              "pass fuse=False")
        fuse_fn(module, inplace=True)

    def _make_optimizer(self, name: str, given, net: nn.Module, trainable: list, lr: float, betas, ema):
        """(optimizer that runs, whether it is fused)."""
        optim = self._optim_module()
        if given is None:
            return optim.FusedAdam(trainable, lr=lr, betas=betas, ema=ema), True
        if not isinstance(given, torch.optim.Optimizer):
            raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(given).__name__}")
        own = {id(p) for p in net.parameters()}
        net_name = "generator" if name == "g_optimizer" else "discriminator"
        for group in given.param_groups:
            for p in group["params"]:
                if id(p) not in own:
                    raise ValueError(f"{name} holds a parameter of shape {tuple(p.shape)} that is not one of the "
                                     f"{net_name}'s (were g_optimizer and d_optimizer swapped?)")
        fused_types = tuple(getattr(optim, n) for n in ("FusedAdam", "FusedSGD") if hasattr(optim, n))
        earlier_twin = optim.twin_of(given)
        if earlier_twin is not None:  # an earlier Trainer fused it: its parameters and state live in that twin
            given = earlier_twin
        if isinstance(given, fused_types):
            if ema is not None and given.ema is not ema:
                raise ValueError(f"ema_beta fuses the EMA into the generator's optimizer, but {name} is an "
                                 f"already built {type(given).__name__}; build it with ema=fastgan.optim.EMA(...) "
                                 "and leave ema_beta unset, or pass a torch optimizer")
            return given, True
        why = "which has no fused twin"
        if type(given) in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD):
            try:
                return optim.fused_twin(given, ema=ema), True
            except ValueError as exc:  # e.g. amsgrad / maximize: torch's own step stays correct
                why = f"whose options have no fused twin ({exc})"
        warnings.warn(f"fastgan.Trainer: {name} is a {type(given).__name__}, {why}; it runs as it is "
                      "(unfused)", RuntimeWarning, stacklevel=3)
        return given, False

    # ------------------------------------------------------------------------------------------
    # input checks and first-step setup
    # ------------------------------------------------------------------------------------------

    def _check_real(self, real) -> None:
        key = (real.shape, real.dtype, real.device) if isinstance(real, torch.Tensor) else None
        if key is not None and key == self._checked_real:
            return
        if not isinstance(real, torch.Tensor):
            raise TypeError(f"real must be a torch.Tensor batch, got {type(real).__name__}")
        if real.dim() < 2:
            raise ValueError(f"real must be a batch of shape (N, ...) with at least 2 dimensions "
                             f"(use (N, 1) for scalar samples), got shape {tuple(real.shape)}")
        if real.shape[0] == 0:
            raise ValueError("real is an empty batch (N = 0)")
        if real.device != self.device:
            raise ValueError(f"real is on {real.device} but the networks are on {self.device}")
        if real.dtype != self.param_dtype:
            raise ValueError(f"real has dtype {real.dtype} but the networks' parameters are {self.param_dtype}")
        if real.shape[0] % self.pack:
            raise ValueError(f"the batch size {real.shape[0]} of real does not divide by pack={self.pack}")
        if self._sample_shape is not None and real.shape[1:] != self._sample_shape:
            raise ValueError(f"real has samples of shape {tuple(real.shape[1:])}, but the generator's samples "
                             f"have shape {tuple(self._sample_shape)}")
        if not self._setup_done:
            self._setup(real)
        self._checked_real = key

    def _check_z(self, z, batch: int | None) -> None:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.shape[1:] != self.latent_dim or z.shape[0] == 0:
            raise ValueError(f"z must have shape (N, {', '.join(map(str, self.latent_dim))}) with N > 0, "
                             f"got {tuple(z.shape)}")
        if batch is not None and z.shape[0] != batch:
            raise ValueError(f"z has batch size {z.shape[0]} but real has {batch}; they must match")
        if z.device != self.device:
            raise ValueError(f"z is on {z.device} but the networks are on {self.device}")
        if z.dtype != self.param_dtype:
            raise ValueError(f"z has dtype {z.dtype} but the networks' parameters are {self.param_dtype}")

    def _generate(self, net: nn.Module, z: torch.Tensor):
        """``net(z)`` (G, its DDP wrapper or its EMA copy). Until G has produced a sample that was checked,
        a failure inside G is a ValueError naming the latent shape (latent_dim that does not fit G)."""
        try:
            return net(z)
        except RuntimeError as exc:
            # A shape error before G's first checked sample names the latent (the usual cause: latent_dim that
            # does not fit G); anything else (out of memory, a CUDA error) is G's own failure, as it is.
            text = str(exc)
            if self._sample_shape is not None or isinstance(exc, torch.OutOfMemoryError) or \
                    type(exc).__name__ == "AcceleratorError" or \
                    not any(word in text for word in ("shape", "size", "dimension", "Expected", "expected")):
                raise
            hint = ""
            if len(self.latent_dim) == 1:
                hint = (f" (a generator that takes latents of shape (N, {self.latent_dim[0]}, 1, 1), as the "
                        f"DCGAN example's, needs latent_dim=({self.latent_dim[0]}, 1, 1))")
            raise ValueError(f"the generator failed on a latent batch of shape {tuple(z.shape)} (latent_dim="
                             f"{self.latent_dim}){hint}: {exc}") from exc

    def _check_fake(self, fake, real_shape: torch.Size | None) -> None:
        """G's output against the data: checked once per shape (cheap tuple compare afterwards)."""
        if self._sample_shape is not None and fake.shape[1:] == self._sample_shape and real_shape is None:
            return
        if not isinstance(fake, torch.Tensor):
            raise ValueError(f"the generator returned a {type(fake).__name__}; it must return one tensor batch")
        if fake.device != self.device:
            raise ValueError(f"the generator's output is on {fake.device} but the networks are on {self.device}")
        # Under autocast the networks' layers cast their inputs; without it D needs its parameters' dtype.
        if fake.dtype != self.param_dtype and (self._autocast_dtype is None or not fake.is_floating_point()):
            raise ValueError(f"the generator's output has dtype {fake.dtype} but the networks' parameters (and the "
                             f"data) are {self.param_dtype}")
        if real_shape is not None and fake.shape != real_shape:
            raise ValueError(f"the generator's output has shape {tuple(fake.shape)} but the real batch has shape "
                             f"{tuple(real_shape)}; G(z) must produce samples shaped like the data")
        if self._sample_shape is None:
            self._sample_shape = fake.shape[1:]
        elif fake.shape[1:] != self._sample_shape:
            raise ValueError(f"the generator's output has samples of shape {tuple(fake.shape[1:])}, but the data's "
                             f"samples have shape {tuple(self._sample_shape)}")

    def _setup(self, real: torch.Tensor) -> None:
        """First step: check D's output on a probe batch (real samples, or generated ones when the
        first call is ``g_step``), find a final Sigmoid, then fuse D."""
        d = self.discriminator
        probe_n = 2 * self.pack if real.shape[0] >= 2 * self.pack else self.pack
        probe = self._pack(self._layout(real[:probe_n]))
        leaves = [m for m in d.modules() if not m._modules]
        calls: list[tuple[nn.Module, torch.Tensor]] = []

        def record(module, _inputs, output):
            calls.append((module, output))

        hooks = [m.register_forward_hook(record) for m in leaves]
        try:
            # The probe leaves no trace (eval mode, no backward); autograd records its graph so that a
            # sigmoid applied in D's own forward code (torch.sigmoid) can be seen on its output.
            with _eval_mode(d), torch.enable_grad():
                out = d(probe)
        except RuntimeError as exc:
            packed = (f"; with pack={self.pack} D takes {self.pack} samples concatenated along dimension 1, so "
                      f"its first layer must take {self.pack} x {real.shape[1]} channels or features"
                      if self.pack > 1 else "")
            raise ValueError(f"the discriminator failed on a batch of shape {tuple(probe.shape)}{packed}: "
                             f"{exc}") from exc
        finally:
            for h in hooks:
                h.remove()
        n_in = probe.shape[0]
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n_in or out.numel() != n_in:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the discriminator's output must be one value per D input, shape ({n_in},), "
                             f"({n_in}, 1) or ({n_in}, 1, ..., 1) for {n_in} inputs{' (pack=%d)' % self.pack if self.pack > 1 else ''}, "
                             f"got {shape}")
        # The Sigmoid is final when only reshaping layers run after it and D returns its values.
        reshaping = (nn.Flatten, nn.Unflatten, nn.Identity)
        i = len(calls) - 1
        while i >= 0 and isinstance(calls[i][0], reshaping):
            i -= 1
        final_sigmoid = False
        # A _SigmoidTap is the Sigmoid an earlier Trainer of this D replaced (a second run on the same
        # networks, Trainer.load into them): outside that trainer's steps it applies the sigmoid.
        if i >= 0 and isinstance(calls[i][0], (nn.Sigmoid, _SigmoidTap)):
            last, last_out = calls[i]
            if last_out.numel() == out.numel() and torch.equal(last_out.reshape(-1), out.reshape(-1)):
                if sum(1 for m, _ in calls if m is last) != 1:
                    # Its input cannot be taken as D's logit without changing its other use, and its
                    # probabilities taken as logits would train the wrong game.
                    raise ValueError("the discriminator ends in an nn.Sigmoid module that it also calls elsewhere "
                                     "in its forward; fastgan's losses need logits: end D with a Sigmoid module "
                                     "of its own, or without one")
                self._replace_final_sigmoid(last)
                final_sigmoid = True
        if not final_sigmoid and _ends_in_sigmoid_op(out):
            warnings.warn(
                "fastgan.Trainer: the discriminator's output is a sigmoid computed in its forward code "
                "(torch.sigmoid / Tensor.sigmoid, not an nn.Sigmoid module the trainer can take the input of). "
                f"fastgan's losses take logits, so D's probabilities would be trained as logits (loss={self.loss!r}; "
                "with the BCE losses D's loss cannot fall below ~1.0): return the logit from forward, or apply "
                "the sigmoid with an nn.Sigmoid module as its last step.", UserWarning, stacklevel=4)
        if self.fuse and not self._d_layers_fused:
            self._fuse_module(d)
        self._d_layers_fused = True
        self._setup_done = True

    def _replace_final_sigmoid(self, sigmoid: nn.Module) -> None:
        d = self.discriminator
        if isinstance(sigmoid, _SigmoidTap):  # already replaced by an earlier Trainer: share its tap
            self._sigmoid_tap = sigmoid
            warnings.warn(
                "fastgan.Trainer: the discriminator ends in an nn.Sigmoid that an earlier Trainer replaced; this "
                "trainer, too, uses that Sigmoid's input as D's output (fastgan's losses take logits).",
                UserWarning, stacklevel=4)
            return
        places = [(parent, child_name, f"{parent_name}.{child_name}" if parent_name else child_name)
                  for parent_name, parent in d.named_modules()
                  for child_name, child in parent._modules.items() if child is sigmoid]
        if len(places) != 1:
            raise ValueError("the discriminator ends in an nn.Sigmoid that is registered in several places; "
                             "fastgan's losses need logits: remove the final Sigmoid")
        parent, child_name, qualified = places[0]
        tap = _SigmoidTap()
        setattr(parent, child_name, tap)
        self._sigmoid_tap = tap
        warnings.warn(
            f"fastgan.Trainer: the discriminator ends in nn.Sigmoid ('{qualified}'). fastgan's losses take "
            "logits (their softplus forms stay finite where log(sigmoid) underflows), so the trainer uses that "
            "Sigmoid's input as D's output; called outside the trainer, the discriminator still returns "
            "probabilities.", UserWarning, stacklevel=4)

    # ------------------------------------------------------------------------------------------
    # building blocks of a step (also what CUDA graphs capture)
    # ------------------------------------------------------------------------------------------

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        m = self.pack
        if m == 1:
            return x
        return x.reshape(x.shape[0] // m, m * x.shape[1], *x.shape[2:])

    def _autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype,
                              cache_enabled=not self._graphs_on)

    def _draw_z(self, n: int) -> torch.Tensor:
        z = self._z_cache.get(n)
        if z is None:
            z = self._z_cache[n] = torch.empty((n, *self.latent_dim), device=self.device, dtype=self.param_dtype)
        if self.prior == "normal":
            z.normal_(generator=self._gen)
        else:
            z.uniform_(-1.0, 1.0, generator=self._gen)
        return self._layout(z, "latent")

    def _layout(self, x: torch.Tensor, role: str = "real") -> torch.Tensor:
        """``x`` in the layout the networks run fastest on: with ``channels_last`` a 4-D batch becomes
        channels_last (same values; a (N, C, 1, 1) latent is only given channels_last strides, a view of
        the same memory; a real batch is copied into a buffer kept per shape and ``role``: latents and
        real batches of one shape, used in the same step, must not share one). Other inputs as they are."""
        if not self.channels_last or x.dim() != 4:
            return x
        n, c, h, w = x.shape
        if x.stride() == (h * w * c, 1, w * c, c):
            return x
        if h * w == 1 and x.is_contiguous():
            # torch.contiguous(channels_last) keeps the (C, 1, 1, 1) strides, which convolutions read as NCHW
            return x.as_strided(x.shape, (c, 1, c, c))
        key = (role, x.shape, x.dtype)
        buf = self._layout_cache.get(key)
        if buf is None:
            buf = self._layout_cache[key] = torch.empty_like(x, memory_format=torch.channels_last)
        return buf.copy_(x)

    def _draw_eps(self, real: torch.Tensor) -> torch.Tensor:
        key = (real.shape[0], real.dim())
        eps = self._eps_cache.get(key)
        if eps is None:
            eps = self._eps_cache[key] = torch.empty((real.shape[0],) + (1,) * (real.dim() - 1),
                                                     device=self.device, dtype=self.param_dtype)
        return eps.uniform_(generator=self._gen)

    def _d_logits(self, x: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """D's logits through ``net`` (D's DDP wrapper in the D update; D itself by default)."""
        out = (net if net is not None else self.discriminator)(self._pack(x))
        # One value per input in any trailing shape, e.g. the DCGAN example's (N, 1, 1, 1).
        return out if out.dim() <= 2 else out.reshape(out.shape[0], 1)

    def _r1_due(self) -> bool:
        return self.r1_gamma > 0 and self.d_step_count % self.r1_every == 0

    def _d_update(self, real: torch.Tensor, z: torch.Tensor, fake: torch.Tensor | None,
                  r1_due: bool) -> dict[str, torch.Tensor]:
        """One D update. ``fake`` is G(z) when the caller already ran G (it is detached here)."""
        d_loss = self._d_loss_fn
        scaler = self._d_scaler
        if fake is None:
            with self._autocast(), torch.no_grad():
                fake = self._generate(self.generator, z)
            self._check_fake(fake, real.shape)
        fake = fake.detach()
        real_in = real.detach().requires_grad_(True) if r1_due else real
        n_real = real.shape[0] // self.pack
        d_net = self._d_net
        # The joint batch is concatenated outside autocast: autocast's cat rejects 16-bit tensors of the
        # other 16-bit type ("Unexpected floating ScalarType in at::autocast::prioritize" for bf16 networks
        # under precision="fp16", fp16 ones under "bf16"). Those two meet in the autocast dtype, which D's
        # first layer casts both to anyway (G's fp16 output through bf16 would lose 3 bits); otherwise in
        # the data's dtype, as before.
        both = None
        if self.joint_d_forward:
            cat_dtype = real_in.dtype
            if {real_in.dtype, fake.dtype} == {torch.float16, torch.bfloat16} and self._autocast_dtype is not None:
                cat_dtype = self._autocast_dtype
            both = torch.cat([real_in.to(cat_dtype), fake.to(cat_dtype)])
        with self._autocast():
            if both is not None:
                logits = self._d_logits(both, d_net)
                real_logits, fake_logits = logits[:n_real], logits[n_real:]
            else:
                real_logits = self._d_logits(real_in, d_net)
                fake_logits = self._d_logits(fake, d_net)
        out = d_loss(real_logits, fake_logits, kind=self.loss)
        total = out.loss
        stats = {"d_loss": out.loss.detach(), "value": out.value, "jsd": out.jsd,
                 "d_real": out.d_real, "d_fake": out.d_fake}
        if r1_due:
            outputs = real_logits.float().sum()
            if scaler is not None:  # scaled so that small fp16 gradients survive; unscaled below
                outputs = outputs * scaler.scale
            (grad,) = torch.autograd.grad(outputs, real_in, create_graph=True)
            if scaler is not None:
                grad = grad * scaler.inv_scale
            r1 = grad.float().reshape(n_real, -1).square().sum(1).mean()
            total = total + (0.5 * self.r1_gamma * self.r1_every) * r1
            stats["r1"] = r1.detach()
            self._last_r1.copy_(stats["r1"])  # a buffer outside any CUDA graph's pool
        elif self.r1_gamma > 0:
            stats["r1"] = self._last_r1.clone()  # NaN until the first R1 step
        if self.gp_lambda > 0:
            eps = self._draw_eps(real)
            x_hat = torch.lerp(fake.to(real.dtype), real.detach(), eps).requires_grad_(True)
            with self._autocast():
                hat_logits = self._d_logits(x_hat, self._d_net)
            outputs = hat_logits.float().sum()
            if scaler is not None:
                outputs = outputs * scaler.scale
            (grad,) = torch.autograd.grad(outputs, x_hat, create_graph=True)
            if scaler is not None:
                grad = grad * scaler.inv_scale
            norms = grad.float().reshape(n_real, -1).norm(2, dim=1)
            gp = (norms - 1.0).square().mean()
            total = total + self.gp_lambda * gp
            stats["gp"] = gp.detach()
        opt = self.d_optimizer
        opt.zero_grad(set_to_none=self._grads_to_none or not self._d_fused)
        if scaler is None:
            total.backward()
            opt.step()
        else:
            (total * scaler.scale).backward()
            opt.step(inv_scale=scaler.inv_scale)
            scaler.update(opt.found_inf)
        return stats

    def _g_update(self, z: torch.Tensor, fake: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One G update with D frozen. ``fake`` is G(z) with its autograd graph when already computed."""
        g_loss = self._g_loss_fn
        scaler = self._g_scaler
        for p in self._d_trainable:
            p.requires_grad_(False)
        try:
            with self._autocast():
                if fake is None:
                    fake = self._generate(self._g_net, z)
                    self._check_fake(fake, None)
                fake_logits = self._d_logits(fake)  # D frozen: D itself, not its DDP wrapper
            loss = g_loss(fake_logits, kind=self.loss)
            opt = self.g_optimizer
            opt.zero_grad(set_to_none=self._grads_to_none or not self._g_fused)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                (loss * scaler.scale).backward()
                opt.step(inv_scale=scaler.inv_scale)
                scaler.update(opt.found_inf)
        finally:
            for p in self._d_trainable:
                p.requires_grad_(True)
        if not self._g_fused and self.ema is not None:
            self.ema.update()
        return {"g_loss": loss.detach()}

    # the three kinds of call, eager (the CUDA-graph runner calls these too)

    def _eager_d_step(self, real: torch.Tensor, z: torch.Tensor | None, r1_due: bool) -> dict[str, torch.Tensor]:
        z = self._draw_z(real.shape[0]) if z is None else self._layout(z, "latent")
        return self._d_update(self._layout(real), z, None, r1_due)

    def _eager_g_step(self, batch: int, z: torch.Tensor | None, _r1_due: bool = False) -> dict[str, torch.Tensor]:
        z = self._draw_z(batch) if z is None else self._layout(z, "latent")
        return self._g_update(z, None)

    def _eager_step(self, real: torch.Tensor, z: torch.Tensor | None, r1_due: bool) -> dict[str, torch.Tensor]:
        z = self._draw_z(real.shape[0]) if z is None else self._layout(z, "latent")
        real = self._layout(real)
        with self._autocast():
            fake = self._generate(self._g_net, z)  # with autograd: the G update below reuses this forward
        self._check_fake(fake, real.shape)
        stats = self._d_update(real, z, fake, r1_due)
        stats.update(self._g_update(z, fake))
        return stats

    # ------------------------------------------------------------------------------------------
    # public steps
    # ------------------------------------------------------------------------------------------

    def d_step(self, real: torch.Tensor, z: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One discriminator update on ``real`` and G(z) (fresh noise unless ``z`` is given).

        Returns 0-d device tensors: ``d_loss``, ``value`` (V(G, D) estimate), ``jsd``, ``d_real``
        (mean D(x)), ``d_fake`` (mean D(G(z))), and ``r1`` / ``gp`` when those penalties are on
        (``r1``: the value at the last step it was computed). Nothing synchronises with the host.
        """
        self._check_real(real)
        if z is not None:
            self._check_z(z, real.shape[0])
        r1_due = self._r1_due()
        tap = self._sigmoid_tap
        if tap is not None:
            tap.emit_logits = True
        try:
            stats = self._run("d_step", real, z, r1_due, self._eager_d_step)
        finally:
            if tap is not None:
                tap.emit_logits = False
        self.d_step_count += 1
        return stats

    def g_step(self, z: torch.Tensor | None = None, *, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """One generator update on fresh noise (``batch_size`` samples; default: the last real batch's
        size) or on the given ``z``. Returns ``{"g_loss": 0-d tensor}``."""
        if z is not None:
            self._check_z(z, None)
            batch = z.shape[0]
            if batch % self.pack:
                raise ValueError(f"z has batch size {batch}, which does not divide by pack={self.pack}")
        else:
            if batch_size is None:
                if self._checked_real is None:
                    raise ValueError("g_step() without z needs batch_size=... before any real batch was seen")
                batch_size = self._checked_real[0][0]
            batch = _check_int("batch_size", batch_size, 1)
            if batch % self.pack:
                raise ValueError(f"batch_size={batch} does not divide by pack={self.pack}")
        if not self._setup_done:  # no real batch seen yet: check D on generated samples instead
            with _eval_mode(self.generator), torch.no_grad():
                probe = self._generate(self.generator, z if z is not None else self._draw_z(batch))
            self._check_fake(probe, None)
            self._setup(probe.to(self.param_dtype))
        tap = self._sigmoid_tap
        if tap is not None:
            tap.emit_logits = True
        try:
            stats = self._run("g_step", batch, z, False, self._eager_g_step)
        finally:
            if tap is not None:
                tap.emit_logits = False
        self.step_count += 1
        return stats

    def step(self, real: torch.Tensor, z: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``d_step(real, z)`` then ``g_step(z)`` on the same noise, reusing G's forward pass.
        Returns the stats of both (see ``d_step``) plus ``g_loss``."""
        self._check_real(real)
        if z is not None:
            self._check_z(z, real.shape[0])
        r1_due = self._r1_due()
        tap = self._sigmoid_tap
        if tap is not None:
            tap.emit_logits = True
        try:
            stats = self._run("step", real, z, r1_due, self._eager_step)
        finally:
            if tap is not None:
                tap.emit_logits = False
        self.d_step_count += 1
        self.step_count += 1
        return stats

    # ------------------------------------------------------------------------------------------
    # CUDA graphs
    # ------------------------------------------------------------------------------------------

    def _graph_hyperparameters(self) -> tuple:
        """What the captured optimizer steps keep as they were at capture: every param group's values
        (the fused optimizers' learning rates excepted: their kernels read them from device tensors,
        see ``_FusedOptimizer.use_device_lr``) and the EMA's beta."""
        key = []
        for opt in (self.d_optimizer, self.g_optimizer):
            device_lr = getattr(opt, "_device_lr", None) is not None
            for group in opt.param_groups:
                key.append(tuple(v for k, v in group.items() if k != "params" and not (device_lr and k == "lr")))
        key.append(self.ema.beta if self.ema is not None else None)
        return tuple(key)

    def _refresh_graph_arguments(self) -> None:
        """Before replaying: the device learning rates follow the param groups (LR schedulers), and a
        change of any other hyperparameter the graphs were captured with drops them (captured again
        after a warm-up), so a replay never applies stale values."""
        for opt in (self.d_optimizer, self.g_optimizer):
            sync = getattr(opt, "sync_device_lr", None)
            if sync is not None:
                sync()
        if self._graph_hypers is not None and self._graph_hypers != self._graph_hyperparameters():
            self._graphs.clear()
            self._graph_hypers = None
            self._quick_recaptures = self._quick_recaptures + 1 if self._replays_since_capture < 50 else 0
            if self._quick_recaptures >= 3:  # capturing again every few steps: slower than no graphs
                self._stop_graphs("the optimizers' hyperparameters (other than the fused optimizers' learning "
                                  "rates) or the EMA's beta change every few steps (a momentum-cycling LR "
                                  "schedule?), so the captured steps would be captured again and again")

    def _stop_graphs(self, why: str) -> None:
        """Train on without CUDA graphs, with one warning saying why."""
        self._graphs_on = False
        self._graphs.clear()
        self._graph_hypers = None
        for opt in (self.d_optimizer, self.g_optimizer):
            use_device_lr = getattr(opt, "use_device_lr", None)
            if use_device_lr is not None:
                use_device_lr(False)  # eager steps read group["lr"] again
        warnings.warn(f"fastgan.Trainer: {why}; training continues without CUDA graphs", RuntimeWarning,
                      stacklevel=5)

    def _run(self, kind: str, real, z, r1_due: bool, eager: Callable) -> dict[str, torch.Tensor]:
        if not self._graphs_on:
            return eager(real, z, r1_due)
        self._refresh_graph_arguments()
        if not self._graphs_on:  # just turned off (hyperparameters changing every few steps)
            return eager(real, z, r1_due)
        shape = real.shape if isinstance(real, torch.Tensor) else (real,)
        key = (kind, tuple(shape), z is not None, r1_due)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = _GraphEntry()
        if entry.warmup_left > 0:
            # Warm-up on a side stream (as torch's whole-network capture recipe does); these are real steps.
            entry.warmup_left -= 1
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                stats = eager(real, z, r1_due)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            return stats
        if entry.graph is None:
            try:
                self._capture(entry, real, z, r1_due, eager)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
                self._graph_failure = f"{type(exc).__name__}: {exc}"
                self._stop_graphs(f"CUDA graph capture of {kind}() failed ({self._graph_failure})")
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(self.device)
                return eager(real, z, r1_due)
        if entry.static_real is not None:
            entry.static_real.copy_(real)
        if entry.static_z is not None:
            entry.static_z.copy_(z)
        entry.graph.replay()
        self._replays_since_capture += 1
        values = entry.out.clone()  # the graph overwrites its outputs on the next replay
        return dict(zip(entry.names, values.unbind()))

    def _capture(self, entry: _GraphEntry, real, z, r1_due: bool, eager: Callable) -> None:
        for opt in (self.d_optimizer, self.g_optimizer):
            use_device_lr = getattr(opt, "use_device_lr", None)
            if use_device_lr is not None:
                use_device_lr()
        self._graph_hypers = self._graph_hyperparameters()
        self._replays_since_capture = 0
        if isinstance(real, torch.Tensor):
            entry.static_real = real.detach().clone()
        if z is not None:
            entry.static_z = z.detach().clone()
        graph = torch.cuda.CUDAGraph()
        if hasattr(graph, "register_generator_state"):
            graph.register_generator_state(self._gen)  # noise drawn inside the graph advances on replay
        elif self._gen is not torch.cuda.default_generators[self.device.index or 0]:
            raise RuntimeError("this torch cannot capture a private torch.Generator in a CUDA graph")
        torch.cuda.synchronize(self.device)
        static_in = entry.static_real if entry.static_real is not None else real
        # thread_local: unsafe CUDA calls of other threads (a DataLoader's pin-memory thread) do not
        # invalidate the capture (torch.compile's CUDA-graph trees capture the same way).
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            stats = eager(static_in, entry.static_z, r1_due)
            names = tuple(stats)
            out = torch.stack([stats[n].float() for n in names])
        entry.graph, entry.names, entry.out = graph, names, out

    # ------------------------------------------------------------------------------------------
    # fit
    # ------------------------------------------------------------------------------------------

    def fit(self, data, steps: int, batch_size: int = 64, log_every: int = 100,
            checkpoint_every: int | None = None, out_dir: str | os.PathLike | None = None,
            callbacks: Iterable[Callable] = (), progress: bool = True, *, keep_checkpoints: int = 2,
            max_nonfinite_steps: int | None = None,
            on_checkpoint: Callable | None = None) -> dict[str, list[float]]:
        """Train for ``steps`` iterations of Algorithm 1 (``d_steps`` D updates, then one G update).

        ``data``: a tensor of samples (shuffled each epoch by the trainer's generator, batches of
        ``batch_size``, incomplete last batch dropped), a ``Dataset`` (same, items or first item of
        tuple items are samples), or a ``DataLoader`` / any iterable of batches (tensors, or tuples /
        lists whose first item is the batch), re-iterated for each epoch; a batch smaller than the
        first one (an incomplete last batch) is skipped. Batches are moved to the trainer's device:
        on a GPU, tensor data (up to 2 GiB) is copied there once and batches are gathered on the GPU;
        give a DataLoader ``pin_memory=True`` so that its batches are copied without waiting.
        A tensor or Dataset of the same length resumes where the previous ``fit`` (or the loaded
        checkpoint) stopped in its epoch.

        Every ``log_every`` trainer steps (multiples of it, counted across ``fit`` calls and resumes, and
        after the last step of this call) the stats of the latest step are appended, as
        floats, to the returned history (a dict of lists, with ``"step"`` and ``"steps_per_s"``) and
        shown on the progress bar. Each callback is called as ``callback(trainer, step, stats)`` after
        every step (``stats``: 0-d device tensors).

        Checkpoints: ``checkpoint_every`` writes ``out_dir/checkpoint-<step>.pt`` (with a SHA-256
        digest beside it, see :meth:`save_checkpoint`) at every step count that is a multiple of it
        (counted from the start of training, so a resumed run keeps the cadence) and after the last; the
        newest ``keep_checkpoints`` are kept, an older one is deleted only once the new one is
        complete. Under ``torch.distributed`` rank 0 writes (all ranks must call ``fit`` alike: under
        ``data_parallel`` a rank whose ``fit`` cannot start, e.g. its data shard smaller than the batch,
        or whose ``steps`` / ``log_every`` / ``checkpoint_every`` / ``max_nonfinite_steps`` differ from
        rank 0's, makes every rank raise a ValueError before the first step).
        ``Trainer.load(out_dir, G, D)`` resumes from the newest good one. ``on_checkpoint(trainer,
        step, history)``, if given, is called at each checkpoint step just before the checkpoint is
        written, with the history logged so far (``fastgan train`` writes its history.csv there, so a
        killed run keeps its rows up to its last checkpoint; written first, they are never behind it).

        Non-finite steps: with ``max_nonfinite_steps=N`` every update of D (the ``d_steps - 1``
        extra ones included) and of G is watched by a :class:`fastgan.checkpoint.NonFiniteGuard`: an
        update whose loss is not finite or whose fused optimizer found non-finite gradients (and so
        skipped it) counts as skipped. The history gets ``d_skipped`` / ``g_skipped`` columns (updates
        skipped since the previous row), newly skipped updates are logged (``fastgan`` logger), and
        after N skipped updates of one network in a row ``fit`` raises
        :class:`fastgan.checkpoint.NonFiniteTrainingError` naming the step and the network; no
        checkpoint is written after that step (the guard is checked before each one), so the last
        good checkpoint stays. The counters
        live on the device; the host reads them at log steps, before checkpoints, every N steps and
        at the end. ``None`` (default) watches nothing.

        Whatever stops ``fit`` early (an exception, ``KeyboardInterrupt``) carries the history logged
        so far as its ``.history``.
        """
        from fastgan import distributed as fdist
        try:
            (steps, log_every, checkpoint_every, keep_checkpoints, max_nonfinite_steps, guard, callbacks,
             batches) = self._prepare_fit(data, steps, batch_size, log_every, checkpoint_every, out_dir, callbacks,
                                          keep_checkpoints, max_nonfinite_steps, on_checkpoint)
            setup_error = None
        except Exception as exc:  # noqa: BLE001 -- any set-up failure: re-raised on this rank below
            if not self.data_parallel:
                raise
            setup_error = exc
        if self.data_parallel:
            # Every rank reaches the same collectives (DDP's all-reduces, the non-finite guard's and the
            # checkpoints' gathers) at the same steps: a rank whose own set-up failed (a shard smaller than
            # the batch) or whose cadence differs stops every rank now, not after the process group's timeout.
            fdist.raise_on_every_rank(setup_error, [] if setup_error is not None else [
                ("steps", steps), ("d_steps", self.d_steps), ("log_every", log_every),
                ("checkpoint_every", checkpoint_every), ("max_nonfinite_steps", max_nonfinite_steps)])
        history: dict[str, list[float]] = {"step": [], "steps_per_s": []}
        skipped_logged = {"discriminator": 0, "generator": 0}
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, unit="step", dynamic_ncols=True, leave=True)
        last_log_time, last_log_step = time.perf_counter(), 0
        stats: dict[str, torch.Tensor] = {}
        try:
            for i in range(1, steps + 1):
                for _ in range(self.d_steps - 1):
                    d_stats = self.d_step(next(batches))
                    if guard is not None:
                        self._observe_nonfinite(guard, self.step_count + 1, d_stats, g=False)
                stats = self.step(next(batches))
                if guard is not None:
                    self._observe_nonfinite(guard, self.step_count, stats, g=True)
                # The trainer's steps, as for checkpoints: a resumed run logs the steps an uninterrupted one does.
                log_due = self.step_count % log_every == 0 or i == steps
                # Counted in the trainer's steps, not this call's: a resumed or extended run keeps the cadence.
                checkpoint_due = checkpoint_every is not None and (
                    self.step_count % checkpoint_every == 0 or i == steps)
                skipped_total = None
                if guard is not None and (log_due or checkpoint_due or i % max_nonfinite_steps == 0):
                    skipped_total = guard.check(self.step_count)  # raises after too many in a row
                if bar is not None:
                    bar.update(1)
                if log_due:
                    now = time.perf_counter()
                    rate = (i - last_log_step) / max(now - last_log_time, 1e-9)
                    last_log_time, last_log_step = now, i
                    values = self._to_floats(stats)  # the one host sync per log interval
                    history["step"].append(float(self.step_count))
                    history["steps_per_s"].append(rate)
                    for name, v in values.items():
                        history.setdefault(name, []).append(v)
                    if skipped_total is not None:
                        for key, net in (("d_skipped", "discriminator"), ("g_skipped", "generator")):
                            total = skipped_total.get(net, 0)
                            history.setdefault(key, []).append(float(total - skipped_logged[net]))
                            skipped_logged[net] = total
                    if bar is not None:
                        bar.set_postfix({k: f"{values[k]:.4g}" for k in ("d_loss", "g_loss", "jsd") if k in values},
                                        refresh=False)
                # After the step's history row: a callback that stops training (StopOnSignal) keeps it.
                for cb in callbacks:
                    cb(self, self.step_count, stats)
                if checkpoint_due:
                    if on_checkpoint is not None:
                        on_checkpoint(self, self.step_count, history)
                    self.save_checkpoint(out_dir, keep=keep_checkpoints)
        except BaseException as exc:
            # What was logged before the stop (a non-finite stop, an interrupt: the CLI writes it).
            with contextlib.suppress(AttributeError, TypeError):
                exc.history = history
            raise
        finally:
            if bar is not None:
                bar.close()
        return history

    def _prepare_fit(self, data, steps, batch_size, log_every, checkpoint_every, out_dir, callbacks,
                     keep_checkpoints, max_nonfinite_steps, on_checkpoint):
        """fit's argument checks and its batch stream; see fit."""
        steps = _check_int("steps", steps, 0)
        batch_size = _check_int("batch_size", batch_size, 1)
        log_every = _check_int("log_every", log_every, 1)
        keep_checkpoints = _check_int("keep_checkpoints", keep_checkpoints, 1)
        if checkpoint_every is not None:
            checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
            if out_dir is None:
                raise ValueError("checkpoint_every needs out_dir=... (the folder the checkpoints go to)")
            self._check_out_dir(out_dir)
        elif out_dir is not None:
            raise ValueError("out_dir is the folder checkpoint_every writes checkpoints to; give checkpoint_every=... "
                             "too (nothing would be written)")
        guard = None
        if max_nonfinite_steps is not None:
            max_nonfinite_steps = _check_int("max_nonfinite_steps", max_nonfinite_steps, 1)
            from fastgan.checkpoint import NonFiniteGuard
            guard = NonFiniteGuard(max_consecutive=max_nonfinite_steps)
        callbacks = tuple(callbacks)
        for cb in callbacks:
            if not callable(cb):
                raise TypeError(f"callbacks must be callables, got {type(cb).__name__}")
        if on_checkpoint is not None and not callable(on_checkpoint):
            raise TypeError(f"on_checkpoint must be a callable or None, got {type(on_checkpoint).__name__}")
        batches = self._batches(data, batch_size)
        if steps > 0:
            # The first batch now, within the checks: data that yields no batch, or a batch that cannot
            # be used, fails here (on every rank at once under data_parallel), before any step.
            batches = itertools.chain((next(batches),), batches)
        return steps, log_every, checkpoint_every, keep_checkpoints, max_nonfinite_steps, guard, callbacks, batches

    def _check_out_dir(self, out_dir) -> None:
        """Refuse a checkpoint folder holding checkpoints of steps this run has not reached: they belong to
        another run (this one would overwrite some and interleave with the rest) or to the steps after
        the checkpoint this trainer was loaded from (rotation would have to delete one run or the other).
        Also a path that is not a folder, before any step is trained."""
        from fastgan.checkpoint import checkpoint_step, digest_matches, list_checkpoints
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ValueError(f"out_dir {os.fspath(out_dir)!r} exists and is not a folder")
        # A corrupted or truncated one (its digest does not match) is no run's data: the run rewrites it.
        ahead = [p for p in list_checkpoints(out_dir)
                 if (checkpoint_step(p) or 0) > self.step_count and digest_matches(p) is not False]
        if ahead:
            raise ValueError(f"out_dir {os.fspath(out_dir)!r} holds {ahead[0].name}, a checkpoint of a later step than "
                             f"this trainer's ({self.step_count}): another run's, or the rest of the run this one "
                             "was loaded from. Choose another out_dir, or move those checkpoints away first")

    def _observe_nonfinite(self, guard, step: int, stats: dict[str, torch.Tensor], g: bool) -> None:
        """Feed one D update (and the G update when ``g``) to a NonFiniteGuard (device ops only)."""
        nets = (("d", "d_loss", self.d_optimizer), ("g", "g_loss", self.g_optimizer)) if g else \
            (("d", "d_loss", self.d_optimizer),)
        for key, loss_name, opt in nets:
            found_inf = getattr(opt, "found_inf", None)
            found_inf = found_inf if isinstance(found_inf, torch.Tensor) else None
            loss = stats.get(loss_name)
            if loss is not None or found_inf is not None:
                guard.observe(step, key, loss=loss, found_inf=found_inf)

    @staticmethod
    def _to_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
        if not stats:
            return {}
        names = list(stats)
        values = torch.stack([stats[n].detach().float() for n in names]).tolist()
        return dict(zip(names, values))

    def _batches(self, data, batch_size: int) -> Iterator[torch.Tensor]:
        """An endless stream of device batches from ``data`` (see ``fit``)."""
        if isinstance(data, torch.Tensor):
            n = data.shape[0] if data.dim() > 0 else 0
            if n == 0:
                raise ValueError("data is empty (a tensor with no samples)")
            if n < batch_size:
                raise ValueError(f"data has {n} samples, fewer than batch_size={batch_size}")
            if batch_size % self.pack:
                raise ValueError(f"batch_size={batch_size} does not divide by pack={self.pack}")
            cursor = self._cursor_for(n, batch_size)
            return self._tensor_batches(data, cursor)
        if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__") and hasattr(data, "__getitem__") \
                and not isinstance(data, torch.utils.data.IterableDataset):
            n = len(data)
            if n == 0:
                raise ValueError("data is empty (a Dataset of length 0)")
            if n < batch_size:
                raise ValueError(f"data has {n} samples, fewer than batch_size={batch_size}")
            if batch_size % self.pack:
                raise ValueError(f"batch_size={batch_size} does not divide by pack={self.pack}")
            cursor = self._cursor_for(n, batch_size)
            return self._dataset_batches(data, cursor)
        if isinstance(data, torch.utils.data.IterableDataset):
            raise TypeError("data is an IterableDataset, which yields single samples; wrap it in a "
                            "torch.utils.data.DataLoader(data, batch_size=...) so that fit receives batches")
        if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
            raise TypeError(f"data must be a tensor, a Dataset, a DataLoader or an iterable of batches, "
                            f"got {type(data).__name__}")
        return self._iterable_batches(data)

    def _cursor_for(self, n: int, batch_size: int) -> _IndexCursor:
        cursor = self._cursor
        if cursor is not None and cursor.n == n and cursor.batch_size == batch_size:
            return cursor
        cursor = _IndexCursor(n, batch_size, self._data_gen)
        pending = self._pending_cursor_state
        if pending is not None and pending["n"] == n and pending["batch_size"] == batch_size:
            cursor.load_state_dict(pending)
        self._pending_cursor_state = None
        self._cursor = cursor
        return cursor

    def _to_device(self, batch, where: str) -> torch.Tensor:
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError(f"{where} yielded an empty tuple; expected a tensor or (batch, ...)")
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"{where} yielded a {type(batch).__name__}; expected a tensor or a tuple / list "
                            "whose first item is the batch tensor")
        if batch.device != self.device or batch.dtype != self.param_dtype:
            if not batch.is_floating_point():
                raise ValueError(f"{where} yielded a batch of dtype {batch.dtype}; the networks' parameters are "
                                 f"{self.param_dtype} (convert the data to floating point)")
            batch = batch.to(self.device, self.param_dtype, non_blocking=True)
        return batch

    def _tensor_batches(self, data: torch.Tensor, cursor: _IndexCursor) -> Iterator[torch.Tensor]:
        if not data.is_floating_point():
            raise ValueError(f"data has dtype {data.dtype}; the networks' parameters are {self.param_dtype} "
                             "(convert the data to floating point)")
        if data.device != self.device and self.device.type == "cuda":
            nbytes = data.numel() * torch.finfo(self.param_dtype).bits // 8
            if nbytes <= _DATA_ON_DEVICE_BYTES:
                # Batches gathered on the GPU: a pageable host-to-device copy per step would wait for
                # the GPU (and stall CUDA-graph replays); the whole tensor goes over once per fit.
                data = data.to(self.device, self.param_dtype)
        pin = data.device.type == "cpu" and self.device.type == "cuda"
        while True:
            batch = data[cursor.next_indices(data.device)]
            if pin:  # page-locked, so the copy below is asynchronous
                batch = batch.pin_memory()
            yield self._to_device(batch, "data")

    def _dataset_batches(self, data, cursor: _IndexCursor) -> Iterator[torch.Tensor]:
        from torch.utils.data import default_collate
        while True:
            idx = cursor.next_indices().tolist()
            items = [data[i] for i in idx]
            first = items[0]
            if isinstance(first, (tuple, list)):
                items = [it[0] for it in items]
            try:
                batch = default_collate(items)
            except TypeError as exc:  # e.g. PIL images: a Dataset without a ToTensor transform
                raise TypeError(f"data[{idx[0]}] is a {type(items[0]).__module__}.{type(items[0]).__name__}, which "
                                "cannot be batched; the Dataset must return tensors (or (tensor, label) tuples): give "
                                "it a transform such as torchvision.transforms.ToTensor() (then Normalize to [-1, 1] "
                                f"for a Tanh generator) ({exc})") from exc
            if self.device.type == "cuda" and isinstance(batch, torch.Tensor) and batch.device.type == "cpu":
                batch = batch.pin_memory()  # asynchronous copy to the GPU
            yield self._to_device(batch, "data")

    def _iterable_batches(self, data) -> Iterator[torch.Tensor]:
        full = None
        epochs = 0
        while True:
            got = 0
            # A DistributedSampler (how a DataLoader is split across data-parallel ranks) shuffles by
            # seed + epoch and leaves advancing the epoch to the loop: without set_epoch every epoch
            # repeats the first one's order. The D step count is the same on every rank, grows each
            # epoch, and carries across fit calls and resumes (an epoch count would restart there).
            batch_sampler = getattr(data, "batch_sampler", None)
            for sampler in (getattr(data, "sampler", None), getattr(batch_sampler, "sampler", None)):
                set_epoch = getattr(sampler, "set_epoch", None)
                if callable(set_epoch):
                    set_epoch(self.d_step_count)
            for batch in data:
                batch = self._to_device(batch, "data")
                got += 1
                if full is None:
                    full = batch.shape[0]
                elif batch.shape[0] < full:
                    continue  # the incomplete last batch of an epoch
                yield batch
            if got == 0:
                if epochs:
                    raise ValueError(f"data ran out after {epochs} epoch(s): iterating it again yielded no batch "
                                     "(a single-pass iterable, e.g. a generator or an iterator). Give fit a tensor, a "
                                     "Dataset, a DataLoader or another iterable that can be iterated again")
                raise ValueError("data is empty (the iterable yielded no batch)")
            epochs += 1
            if isinstance(data, Iterator):  # a one-shot iterator (e.g. a generator) cannot be cycled
                raise ValueError("data ran out: a one-shot iterator (such as a generator) was exhausted before "
                                 "`steps` were done; pass a re-iterable (list, DataLoader, tensor) or an endless one")

    # ------------------------------------------------------------------------------------------
    # sampling
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, z: torch.Tensor | None = None, ema: bool = True) -> torch.Tensor:
        """``n`` samples of G (of its EMA copy when there is one and ``ema``), on fresh noise from a
        sampling generator of its own (training noise is not disturbed) or on the given ``z`` (then
        ``n`` must be its batch size). G runs in eval mode (BatchNorm on its running statistics, no
        dropout; its own mode is restored after), so sampling leaves no trace in G and each sample
        depends on its own noise only; no autograd graph is recorded."""
        if z is None:
            n = _check_int("n", n, 1)
            z = torch.empty((n, *self.latent_dim), device=self.device, dtype=self.param_dtype)
            if self.prior == "normal":
                z.normal_(generator=self._sample_gen)
            else:
                z.uniform_(-1.0, 1.0, generator=self._sample_gen)
        else:
            self._check_z(z, None)
            if n != z.shape[0]:
                raise ValueError(f"n={n!r} but z holds {z.shape[0]} latents; give n=z.shape[0] with z")
        net = self._ema_module() if (ema and self.ema is not None) else self.generator
        with _eval_mode(net):
            return self._generate(net, z)

    def _ema_module(self) -> nn.Module:
        """A copy of G carrying the EMA weights, made once and refreshed from the EMA at each call."""
        net = getattr(self, "_ema_net", None)
        if net is None:
            net = self._ema_net = self.ema.averaged_model()
        else:
            self.ema.copy_to(net)
        return net

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _optimizer_config(opt: torch.optim.Optimizer, net: nn.Module) -> dict[str, Any]:
        defaults = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opt.defaults.items()
                    if isinstance(v, (bool, int, float, str, type(None)))
                    or (isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v))}
        # Each param group's parameters by name, in the group's order: the optimizer's state_dict lists
        # them by position only, so Trainer.load rebuilds the same groups around a new network.
        names = {id(p): n for n, p in net.named_parameters()}
        groups = [[names.get(id(p), "?") for p in g["params"]] for g in opt.param_groups]
        return {"module": type(opt).__module__, "class": type(opt).__name__, "defaults": defaults,
                "groups": groups}

    def config(self) -> dict[str, Any]:
        """The options a checkpoint records so that ``Trainer.load`` rebuilds the same trainer."""
        return {
            "latent_dim": list(self.latent_dim), "prior": self.prior, "loss": self.loss,
            "d_steps": self.d_steps, "r1_gamma": self.r1_gamma, "r1_every": self.r1_every,
            "gp_lambda": self.gp_lambda, "ema_beta": self.ema_beta, "pack": self.pack,
            "precision": self.precision, "fuse": self.fuse, "joint_d_forward": self.joint_d_forward,
            "seed": self.seed,
            "g_optimizer": self._optimizer_config(self.g_optimizer, self.generator),
            "d_optimizer": self._optimizer_config(self.d_optimizer, self.discriminator),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: G, D, G's EMA, both optimizers, the loss
        scalers, the step counters, every RNG state (the trainer's generators, torch's CPU and CUDA
        generators, Python's and NumPy's) and where ``fit`` stands in its epoch."""
        local = self._rank_local_state()
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config(),
            "step": self.step_count,
            "d_step": self.d_step_count,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "g_optimizer": self.g_optimizer.state_dict(),
            "d_optimizer": self.d_optimizer.state_dict(),
            "scaler": None if self._d_scaler is None else {"d": self._d_scaler.state_dict(),
                                                           "g": self._g_scaler.state_dict()},
            **local,
            "sample_shape": None if self._sample_shape is None else list(self._sample_shape),
        }

    def _rank_local_state(self) -> dict[str, Any]:
        """What differs between the ranks of a data-parallel run: every RNG state, the data cursor and
        the last R1 value (the parameters, optimizer state and counters are the same on all ranks)."""
        cursor = self._cursor.state_dict() if self._cursor is not None else self._pending_cursor_state
        return {
            "rng": {"trainer": self._gen.get_state(), "sample": self._sample_gen.get_state(),
                    "data": self._data_gen.get_state(), "global": _checkpoint.global_rng_states()},
            "data_cursor": cursor,
            "last_r1": self._last_r1.detach().cpu(),
        }

    def _load_rank_local_state(self, local: dict[str, Any]) -> None:
        rng = local["rng"]
        self._gen.set_state(rng["trainer"])
        self._sample_gen.set_state(rng["sample"])
        self._data_gen.set_state(rng["data"])
        _checkpoint.set_global_rng_states(rng["global"])
        self._cursor = None
        self._pending_cursor_state = local.get("data_cursor")
        self._last_r1.copy_(local["last_r1"])

    def checkpoint_state(self) -> dict[str, Any] | None:
        """``state_dict()`` for a checkpoint. Under ``torch.distributed`` (every rank must call it: a
        collective) it also holds every rank's own RNG states and data cursor under ``"ranks"``, so a
        run resumed at the same world size continues exactly as if never interrupted (at another
        world size the ranks are re-seeded, see ``fastgan.distributed.data_parallel``); rank 0
        gets the dict, the other ranks None."""
        from fastgan import distributed as fdist
        if fdist.world_size() == 1:
            return self.state_dict()
        import torch.distributed as dist
        gathered: list[Any] = [None] * fdist.world_size()
        dist.all_gather_object(gathered, self._rank_local_state())
        if not fdist.is_main_process():
            return None
        state = self.state_dict()
        state["ranks"] = {"world_size": fdist.world_size(), "local": gathered}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (also the global RNG states, for an exact resume)."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a fastgan.Trainer checkpoint (format {state.get('format') if isinstance(state, dict) else None!r}, "
                             f"expected {CHECKPOINT_FORMAT!r})")
        cfg = state["config"]
        for key, mine in (("latent_dim", list(self.latent_dim)), ("pack", self.pack), ("loss", self.loss),
                          ("precision", self.precision)):
            if cfg[key] != mine:
                raise ValueError(f"the checkpoint was written with {key}={cfg[key]!r} but this trainer has "
                                 f"{key}={mine!r}")
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError(f"the checkpoint {'has no' if state['ema'] is None else 'has an'} EMA of G but this "
                             f"trainer has ema_beta={self.ema_beta!r}")
        if (state["scaler"] is None) != (self._d_scaler is None):
            raise ValueError("the checkpoint's loss scaler does not match this trainer's precision")
        # Everything is checked before anything is loaded: a mismatch leaves this trainer as it was.
        for what, net, key in (("generator", self.generator, "generator"),
                               ("discriminator", self.discriminator, "discriminator")):
            _check_module_state(net, state[key], what)
        for name, opt, net in (("g_optimizer", self.g_optimizer, self.generator),
                               ("d_optimizer", self.d_optimizer, self.discriminator)):
            recorded, mine = cfg.get(name), self._optimizer_config(opt, net)
            if recorded is None:
                continue
            if (recorded["module"], recorded["class"]) != (mine["module"], mine["class"]):
                raise ValueError(f"the checkpoint's {name} is {recorded['module']}.{recorded['class']} but this "
                                 f"trainer's is {mine['module']}.{mine['class']}")
            if recorded.get("groups") is not None and recorded["groups"] != mine["groups"]:
                raise ValueError(f"the checkpoint's {name} has other param groups than this trainer's (by parameter "
                                 f"name, in order: {recorded['groups']} vs {mine['groups']}); its state would go to "
                                 "the wrong parameters")
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        if self._d_scaler is not None:
            self._d_scaler.load_state_dict(state["scaler"]["d"])
            self._g_scaler.load_state_dict(state["scaler"]["g"])
        self.step_count = int(state["step"])
        self.d_step_count = int(state["d_step"])
        self._load_rank_local_state(state)
        # Every rank's own states of a data-parallel run (checkpoint_state): data_parallel() restores
        # this rank's when the world size matches.
        self.loaded_rank_states = state.get("ranks")
        if state.get("sample_shape") is not None and self._sample_shape is None:
            self._sample_shape = torch.Size(state["sample_shape"])
        self._graphs.clear()  # captured graphs may point at replaced buffers

    def save(self, path: str | os.PathLike) -> None:
        """Write ``state_dict()`` to the single file ``path`` atomically (temporary file beside it,
        then renamed: the previous file stays intact until the new one is complete). For rotating,
        digest-checked checkpoints of a run folder use :meth:`save_checkpoint`. Under
        ``torch.distributed`` it is no collective: each rank that calls it writes its own state (its
        own RNG states and BatchNorm running statistics), so call it on one rank for one file, or use
        :meth:`save_checkpoint`, which holds every rank's."""
        _checkpoint.atomic_save(self.state_dict(), path)

    def save_checkpoint(self, run_dir: str | os.PathLike, keep: int = 2):
        """Write ``run_dir/checkpoint-<step>.pt`` with its SHA-256 digest and keep the newest ``keep``
        checkpoints of the folder (``fastgan.checkpoint.save_checkpoint``: the older ones are
        deleted only after the new one is complete). Returns the path written.

        Under ``torch.distributed`` every rank must call it (BatchNorm running statistics are first
        averaged across ranks and every rank's RNG states gathered, see ``checkpoint_state``: both
        collectives), and rank 0 alone writes; the others return None."""
        from fastgan.checkpoint import save_checkpoint
        keep = _check_int("keep", keep, 1)
        self._average_buffers_across_ranks()
        state = self.checkpoint_state()
        if state is None:  # not rank 0
            return None
        return save_checkpoint(state, run_dir, int(self.step_count), keep=keep)

    def reseed(self, noise_seed: int | None = None, data_seed: int | None = None) -> None:
        """Re-seed the trainer's noise generator (latent batches, WGAN-GP's eps) and / or the generator
        that orders ``fit``'s tensor / Dataset data (from its next epoch on). ``fastgan.distributed``
        uses it to give every rank its own noise. Call it before the first step: CUDA graphs captured
        earlier keep drawing from the generator but were warmed up on the old stream."""
        for name, value in (("noise_seed", noise_seed), ("data_seed", data_seed)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name} must be an int or None, got {value!r}")
        if noise_seed is not None:
            self._gen.manual_seed(int(noise_seed) % (2 ** 63))
        if data_seed is not None:
            self._data_gen.manual_seed(int(data_seed) % (2 ** 63))

    @classmethod
    def load(cls, path: str | os.PathLike, generator: nn.Module, discriminator: nn.Module,
             **overrides) -> "Trainer":
        """Rebuild a trainer from a checkpoint around freshly built ``generator`` and ``discriminator``
        (same architecture), and restore its state. ``path``: one file (written by :meth:`save` or
        :meth:`save_checkpoint`) or a run folder, which resumes from its newest good checkpoint (a
        bad newer one is reported by name and skipped). Keyword arguments override the recorded
        options (e.g. ``device=``, ``cuda_graphs=``; ``lr``, ``g_lr``, ``d_lr``, ``betas`` and ``ema_beta``
        replace the checkpoint's values in the restored optimizers and EMA)."""
        from fastgan.checkpoint import load_checkpoint, load_latest_good
        # weights_only loading; a truncated, corrupted (digest) or unsafe file is a CheckpointError
        # (a ValueError) naming it; a run folder resumes from its newest good checkpoint.
        # A file that loads but is no Trainer checkpoint (another format, a file saved under a checkpoint's
        # name) is a bad one like a corrupted file: in a run folder named and skipped (as the CLI's resume),
        # given by name refused.
        if os.path.isdir(path):
            state, path = load_latest_good(path, validate=_check_trainer_format)
        else:
            state = load_checkpoint(path, validate=_check_trainer_format)
        return cls.from_state_dict(state, generator, discriminator, **overrides)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], generator: nn.Module, discriminator: nn.Module,
                        **overrides) -> "Trainer":
        """What :meth:`load` does after reading the file: a trainer with the options recorded in
        ``state`` (a ``state_dict()``), overridden by ``overrides``, with that state restored."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"state is not a fastgan.Trainer state_dict (format "
                             f"{state.get('format') if isinstance(state, dict) else None!r})")
        cfg = dict(state["config"])
        kwargs: dict[str, Any] = {k: cfg[k] for k in ("prior", "loss", "d_steps", "r1_gamma", "r1_every",
                                                       "gp_lambda", "ema_beta", "pack", "precision", "fuse",
                                                       "joint_d_forward", "seed")}
        kwargs["latent_dim"] = tuple(cfg["latent_dim"])
        for name, net in (("g_optimizer", generator), ("d_optimizer", discriminator)):
            recorded = cfg[name]
            if name in overrides:
                continue
            trainable = [p for p in net.parameters() if p.requires_grad]
            groups = _recorded_groups(recorded, net, name)
            # The trainer's own default optimizer is one group over the trainable parameters in module
            # order; anything else (another class, several groups, another order) is rebuilt as recorded.
            default_layout = groups is None or (len(groups) == 1 and [id(p) for p in groups[0]] == [id(p) for p in trainable])
            if (recorded["module"], recorded["class"]) != _DEFAULT_OPTIMIZER or not default_layout:
                kwargs[name] = _rebuild_optimizer(recorded, groups if groups is not None else trainable, name)
        kwargs.update(overrides)
        trainer = cls(generator, discriminator, **kwargs)
        trainer.load_state_dict(state)  # also restores the optimizers' hyper-parameters and state
        trainer._reapply_hyper_overrides(overrides)
        return trainer

    def _average_buffers_across_ranks(self) -> None:
        """Under torch.distributed (a collective: every rank calls it): G's and D's floating buffers
        (BatchNorm running statistics) averaged over the ranks, and the EMA's copy of G's buffers
        refreshed from them -- it is a copy taken at each update, so without this the EMA (what sample()
        and evaluations use) would keep rank 0's own statistics. For checkpoints and final evaluations."""
        from fastgan import distributed as fdist
        if fdist.world_size() > 1:
            fdist.average_buffers(self.generator)
            fdist.average_buffers(self.discriminator)
            if self.ema is not None:
                self.ema.copy_buffers()

    def _reapply_hyper_overrides(self, overrides: dict[str, Any]) -> None:
        """After load_state_dict restored the checkpoint's optimizer and EMA hyper-parameters: the ones
        given to ``load`` / ``from_state_dict`` (lr, g_lr, d_lr, betas, ema_beta) win, as documented (the
        constructor validated them)."""
        for opt, own in ((self.g_optimizer, "g_lr"), (self.d_optimizer, "d_lr")):
            lr = overrides.get(own) if overrides.get(own) is not None else overrides.get("lr")
            for group in opt.param_groups:
                if lr is not None:
                    group["lr"] = float(lr)
                if overrides.get("betas") is not None and "betas" in group:
                    group["betas"] = tuple(float(b) for b in overrides["betas"])
        if overrides.get("ema_beta") is not None and self.ema is not None:
            self.ema.beta = float(overrides["ema_beta"])

    def __repr__(self) -> str:
        return (f"Trainer(loss={self.loss!r}, d_steps={self.d_steps}, latent_dim={self.latent_dim}, "
                f"pack={self.pack}, precision={self.precision!r}, device={str(self.device)!r}, "
                f"joint_d_forward={self.joint_d_forward}, cuda_graphs={self._graphs_on}, step={self.step_count})")
