"""Data-parallel training of a :class:`fastgan.Trainer` under ``torchrun`` (gloo on CPU, NCCL on CUDA).

The command line does all of this: ``torchrun --nproc_per_node=N -m fastgan train ...`` (see
:mod:`fastgan.cli`). In a script of your own:

    # torchrun --nproc_per_node=N train.py
    info = fastgan.distributed.init_from_env()          # process group from torchrun's variables
    trainer = fastgan.Trainer(G, D, ..., device=info.device, seed=0)
    fastgan.distributed.data_parallel(trainer)          # same start on all ranks, grads averaged
    trainer.fit(fastgan.distributed.shard(data), steps, batch_size=per_rank_batch,
                checkpoint_every=1000, out_dir=run_dir)  # every rank calls it; rank 0 writes
    fastgan.distributed.destroy()

What ``data_parallel`` does, and why:

* **Same start.** G's and D's parameters and buffers, the EMA and the optimizer state are
  broadcast from rank 0, so every rank starts from one model whatever its local initialisation.
  The ranks must hold the same networks, optimizers and step counts (a resumed run: the checkpoint
  loaded on every rank); where they do not, every rank raises a ValueError naming the first difference.
* **One DistributedDataParallel wrapper per network** (``Trainer.wrap_data_parallel``):
  ``find_unused_parameters=False``, ``broadcast_buffers=False``, ``gradient_as_bucket_view=True``.
  Forwards whose gradients are synchronised (D in the D step, G in the G step) go through the
  wrappers; the frozen D of the G step and G's no-grad forward in a D step call the networks
  themselves, so DDP never waits for gradients that do not come.
* **The flat gradient buffer is DDP's bucket.** The bucket cap holds each network in one bucket per
  dtype; with ``gradient_as_bucket_view=True`` DDP points every ``.grad`` into that bucket, and the
  fused optimizer adopts the bucket as its flat gradient buffer (parameters and state re-laid out
  once in DDP's order, and again after DDP re-buckets at its second iteration; see
  ``FusedAdam.adopt_gradient_buckets``). DDP all-reduces (averages) the buffer in place during
  backward, the optimizer steps on it, ``zero_grad`` fills it: no gradient is copied. Because the
  average happens before the step, the fused optimizer's non-finite check sees the global gradient:
  all ranks skip a step together.
* **R1 / gradient penalties** need nothing special: the Trainer computes them with
  ``autograd.grad(create_graph=True)`` with respect to D's input (no DDP hook fires) followed by one
  ordinary backward of loss + penalty.
* **BatchNorm.** Each rank normalises with its own batch statistics and keeps its own running
  statistics (``broadcast_buffers=False``): nothing is broadcast during a step, so D's several
  forwards per step (real, fake, penalty) never meet the in-place buffer update that breaks
  ``broadcast_buffers=True``. :func:`average_buffers` averages the running statistics across
  ranks (call it before evaluating or saving; ``Trainer.save_checkpoint`` does); convert BatchNorm
  to ``nn.SyncBatchNorm`` yourself before building the Trainer if you need global batch statistics
  (CUDA only in torch).
* **Data and noise.** :func:`shard` gives each rank a disjoint slice of a tensor or Dataset,
  :class:`RankSlices` each rank its slice of every batch of a stream of global batches; the
  trainer's noise generator is re-seeded per rank (``Trainer.reseed``) so ranks draw different noise.
* **Checkpoints** carry every rank's RNG states and data cursor (``Trainer.checkpoint_state``), so a
  run resumed at the same world size continues exactly as if it had never stopped; at another world
  size the ranks are re-seeded. They are written by rank 0 only (``fit(checkpoint_every=, out_dir=)`` /
  ``Trainer.save_checkpoint``, which first average the BatchNorm running statistics across ranks, and
  ``fastgan.checkpoint.CheckpointEvery`` check the rank); they hold ordinary, un-prefixed state
  dicts and load at any world size (also 1).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_from_env", "is_initialized", "rank", "world_size", "is_main_process",
           "data_parallel", "all_reduce_gradients", "broadcast_module", "average_buffers", "shard", "RankSlices",
           "barrier", "destroy", "ddp_wrap", "raise_on_every_rank"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(backend: str | None = None, device: str | torch.device | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) when it is set; a single process otherwise.
    The backend defaults to NCCL when training on CUDA, gloo on CPU; on CUDA the device is
    ``cuda:LOCAL_RANK``."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not is_initialized():
        if "WORLD_SIZE" not in os.environ:   # not under torchrun: one process
            return DistInfo(0, 1, local_rank, device, None)
        if backend is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


# ------------------------------------------------------------------------------------------------
# Synchronising state
# ------------------------------------------------------------------------------------------------

def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from rank ``src`` to every rank (in place). Raises a
    ValueError on every rank if the ranks' modules differ (names, shapes, dtypes)."""
    if not is_initialized():
        return
    _check_same_across_ranks(_module_layout("module", module), src)
    _broadcast_module(module, src)


def _broadcast_module(module: nn.Module, src: int = 0) -> None:
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def _optimizer_state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer state tensors that ``_broadcast_optimizer_state`` sends, in its order."""
    flat_state = getattr(opt, "flat_state_buffers", None)
    if flat_state is not None:   # a fastgan fused optimizer: its per-parameter state is views of these
        return list(flat_state())
    return [v for state in opt.state.values() for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0]


def _broadcast_optimizer_state(opt: torch.optim.Optimizer, src: int = 0) -> None:
    with torch.no_grad():
        for t in _optimizer_state_tensors(opt):
            dist.broadcast(t, src)


def _layout(named_tensors) -> list[tuple]:
    """(what, shape, dtype) rows of ``(what, tensor)`` pairs: what the ranks compare before broadcasting."""
    return [(what, tuple(t.shape), str(t.dtype)) for what, t in named_tensors]


def _module_layout(what: str, module: nn.Module) -> list[tuple]:
    return _layout((f"{what} {kind} {name!r}", t)
                   for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers()))
                   for name, t in named)


def _check_same_across_ranks(layout: list[tuple], src: int = 0) -> None:
    """Raise the same ValueError on every rank if some rank's ``layout`` (rows of (what, value...))
    differs from rank ``src``'s. The broadcasts that follow pair tensors by position: between
    ranks that differ they would exchange buffers of other sizes, which gloo answers by aborting
    the receiving process (SIGABRT, "Received data size doesn't match expected size") and the
    others with a connection error, or silently copy the wrong values where the sizes happen to agree."""
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, layout)
    ref = gathered[src]
    for r, rows in enumerate(gathered):
        if rows == ref:
            continue
        for i in range(max(len(rows), len(ref))):
            mine = rows[i] if i < len(rows) else None
            theirs = ref[i] if i < len(ref) else None
            if mine != theirs:
                break
        def show(row):
            return "nothing" if row is None else f"{row[0]}: {', '.join(map(str, row[1:]))}"
        raise ValueError(f"the ranks do not hold the same model and training state: rank {src} has "
                         f"{show(theirs)}, rank {r} has {show(mine)}. Build the same G, D and optimizers on "
                         "every rank (and when resuming, load the checkpoint on every rank) before "
                         "data_parallel / broadcast_module")


def raise_on_every_rank(error: BaseException | None, settings: list[tuple] = ()) -> None:
    """A collective that every rank calls before entering training together (``Trainer.fit`` under
    ``data_parallel``): if some rank's ``error`` (its own set-up failure, e.g. a data shard smaller
    than the batch) is not None, or its ``settings`` (rows of (name, value): what decides when the
    ranks meet in collectives, such as the step count and the checkpoint cadence) differ from rank
    0's, every rank raises. A rank raises its own error; the others a ValueError naming the first
    failing rank and its message. Without this one rank raises while the others enter DDP's first
    all-reduce and wait there until the process group's timeout (30 minutes with gloo)."""
    if not is_initialized() or world_size() == 1:
        if error is not None:
            raise error
        return
    mine = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, (mine, list(settings)))
    if error is not None:
        raise error
    for r, (message, _) in enumerate(gathered):
        if message is not None:
            raise ValueError(f"rank {r} could not start training ({message}); every rank stops here")
    ref = gathered[0][1]
    for r, (_, rows) in enumerate(gathered):
        for mine_row, ref_row in zip(rows, ref):
            if mine_row != ref_row:
                raise ValueError(f"the ranks were given different {ref_row[0]}: rank 0 has {ref_row[1]!r}, rank {r} "
                                 f"has {mine_row[1]!r}. They decide when the ranks meet in collectives; give every "
                                 "rank the same")


def average_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) across ranks, in place."""
    if not is_initialized():
        return
    n = world_size()
    with torch.no_grad():
        for b in module.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b.div_(n)


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------

def all_reduce_gradients(opt: torch.optim.Optimizer) -> None:
    """Average the gradients ``opt`` is about to apply across ranks, in place.

    Fused optimizers: their flat gradient buffers are gathered (every present ``.grad`` made a view
    of the buffer, a no-op when autograd already wrote there) and all-reduced as they are.
    Other optimizers: the present gradients are flattened into one buffer, all-reduced, copied back.
    Every rank must have gradients for the same parameters (as DDP without find_unused_parameters).
    """
    if not is_initialized() or world_size() == 1:
        return
    n = world_size()
    flat_grads = getattr(opt, "flat_grad_buffers", None)
    with torch.no_grad():
        if flat_grads is not None:
            for flat in flat_grads():
                dist.all_reduce(flat)
                flat.div_(n)
            return
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(n)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


# ------------------------------------------------------------------------------------------------
# The Trainer
# ------------------------------------------------------------------------------------------------

def data_parallel(trainer, *, seed_offset_per_rank: bool = True):
    """Make ``trainer`` train data-parallel across the ranks of the default process group (a no-op
    without one): rank 0's parameters, buffers, optimizer state and EMA broadcast, then one DDP
    wrapper per network (``Trainer.wrap_data_parallel``). Call it once, after building the Trainer
    and before the first step (or, when resuming, after ``load_state_dict`` of the checkpoint on
    every rank). Ranks whose networks, optimizer state or step counts differ raise a ValueError
    naming the difference (on every rank). See the module docstring."""
    if not is_initialized():
        return trainer
    r = rank()
    ema = getattr(trainer, "ema", None)
    ema_tensors = [] if ema is None else \
        list(getattr(ema, "shadow_params", [])) + list(getattr(ema, "shadow_buffers", []))
    # Everything broadcast below, and the step counters (R1's schedule, fit's checkpoint and log
    # steps, whose collectives every rank must reach together), agree in layout on every rank first:
    # one clear error instead of a collective mismatch.
    layout = _module_layout("generator", trainer.generator) + _module_layout("discriminator", trainer.discriminator)
    for name, opt in (("g_optimizer", trainer.g_optimizer), ("d_optimizer", trainer.d_optimizer)):
        layout += _layout((f"{name} state tensor {i}", t) for i, t in enumerate(_optimizer_state_tensors(opt)))
    layout += _layout((f"EMA shadow {i}", t) for i, t in enumerate(ema_tensors))
    layout.append(("step counts (G, D)", int(trainer.step_count), int(trainer.d_step_count)))
    _check_same_across_ranks(layout)
    _broadcast_module(trainer.generator)
    _broadcast_module(trainer.discriminator)
    for opt in (trainer.g_optimizer, trainer.d_optimizer):
        _broadcast_optimizer_state(opt)
    if ema_tensors:   # an EMA outside the fused optimizer (its fused shadow was broadcast above)
        with torch.no_grad():
            for t in ema_tensors:
                dist.broadcast(t, 0)
    trainer.wrap_data_parallel()
    saved_ranks = getattr(trainer, "loaded_rank_states", None)
    if saved_ranks is not None and saved_ranks.get("world_size") == world_size():
        # Resumed at the world size that wrote the checkpoint: each rank continues its own noise,
        # data order and global RNG streams exactly where they were (Trainer.checkpoint_state).
        trainer._load_rank_local_state(saved_ranks["local"][r])
        trainer.loaded_rank_states = None
    elif seed_offset_per_rank and world_size() > 1:
        # Every rank draws its own noise (and its own order of its data shard). A fresh trainer
        # starts from seed + rank offset (rank 0 then draws what a single process would); a resumed
        # one (all ranks loaded rank 0's state; written at another world size) from a base mixed from
        # the seed and the D step count.
        # A group of one process (torchrun --nproc_per_node=1) keeps the trainer's streams, as a run
        # without a group does: a fresh trainer's are its seed's already, a resumed one's what its
        # checkpoint restored (a world-size-1 checkpoint has no "ranks"; re-seeding it here broke the
        # exact resume).
        fresh = trainer.step_count == 0 and trainer.d_step_count == 0
        base = int(trainer.seed)
        if not fresh:
            base = (base * 6364136223846793005 + int(trainer.d_step_count) * 1442695040888963407 + 1) % (2 ** 62)
        trainer.reseed(noise_seed=base + 1_000_003 * r, data_seed=base + 2 + 1_000_003 * r)
    return trainer


def shard(data, rank_: int | None = None, world_size_: int | None = None):
    """This rank's disjoint share of ``data`` (a tensor or a map-style Dataset): items
    ``rank, rank + world, rank + 2 world, ...``. Other iterables (DataLoaders) should use
    ``torch.utils.data.DistributedSampler`` instead."""
    r = rank() if rank_ is None else rank_
    n = world_size() if world_size_ is None else world_size_
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"world_size must be an int >= 1, got {n!r}")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < n:
        raise ValueError(f"rank {r!r} is not in [0, {n})")
    if n == 1:
        return data
    if isinstance(data, torch.Tensor):
        return data[r::n]
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        return torch.utils.data.Subset(data, range(r, len(data), n))
    raise TypeError(f"shard takes a tensor or a map-style Dataset, got {type(data).__name__}; "
                    "use torch.utils.data.DistributedSampler for a DataLoader")


class RankSlices:
    """This rank's share of every batch of ``batches`` (an iterable of *global* batches, re-iterable
    if ``batches`` is): rows ``[rank * b, (rank + 1) * b)`` with ``b = len(batch) // world``. With
    the same global stream on every rank (e.g. fastgan's mixture batches, seeded per batch index)
    the ranks together see exactly the global batches a single process would."""

    def __init__(self, batches, rank_: int | None = None, world_size_: int | None = None):
        self.batches = batches
        self.rank = rank() if rank_ is None else int(rank_)
        self.world = world_size() if world_size_ is None else int(world_size_)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world})")

    def __iter__(self):
        for batch in self.batches:
            if self.world == 1:
                yield batch
                continue
            n = batch.shape[0]
            if n % self.world:
                raise ValueError(f"a global batch of {n} samples does not split evenly across {self.world} ranks")
            per = n // self.world
            yield batch[self.rank * per:(self.rank + 1) * per]


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group is up; nothing otherwise."""
    if is_initialized() and world_size() > 1:
        dist.barrier()


def destroy() -> None:
    """Destroy the default process group if one is up (the end of a torchrun script)."""
    if is_initialized():
        dist.destroy_process_group()


def ddp_wrap(module: nn.Module, device: torch.device | None = None, *, process_group=None,
             bucket_cap_mb: float | None = None) -> nn.parallel.DistributedDataParallel:
    """A DDP wrapper configured for GAN training (``fastgan.Trainer`` wraps G and D with it; use it in
    loops of your own too):

    * ``find_unused_parameters=False``: every step uses every parameter (no extra graph traversal);
    * BatchNorm buffers are not re-broadcast at each forward (``broadcast_buffers=False``, spelled
      ``forward_sync_buffers=False`` from torch 2.13 on): the in-place broadcast breaks D's second
      forward before backward;
    * ``gradient_as_bucket_view=True``: ``.grad`` are views of DDP's buckets (no copy after the
      all-reduce); ``bucket_cap_mb`` as DDP takes it (None: DDP's default).

    Rules for GAN steps (DDP prepares its gradient reduction at every forward with grad on):

    * several forwards before one backward (D on real, then on fake) are fine: every parameter's
      gradient still arrives once, from the one backward (``wrapper.no_sync()`` around all but the
      last is allowed and changes nothing);
    * a *frozen* network's forward (D in the G step) goes through ``wrapper.module``: through the
      wrapper, DDP would wait for gradients that never come.

    R1 / gradient penalties: ``torch.autograd.grad(..., create_graph=True)`` with respect to the
    input (it fires no parameter hooks), then one ordinary backward of loss + penalty.
    (tests/test_distributed.py runs exactly this loop against one process of twice the batch.)
    """
    device_ids = [device.index] if device is not None and device.type == "cuda" else None
    if device_ids == [None]:
        device_ids = [torch.cuda.current_device()]
    kwargs = {"bucket_cap_mb": bucket_cap_mb} if bucket_cap_mb is not None else {}
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, process_group=process_group,
                                               find_unused_parameters=False, gradient_as_bucket_view=True,
                                               **_no_buffer_sync(), **kwargs)


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's keyword for "do not broadcast buffers at each forward": torch 2.13 renamed
    ``broadcast_buffers`` to ``forward_sync_buffers`` and warns on the old name."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
