"""Never losing a run: rotating checkpoints with integrity checks, resume from the last good one,
a guard against runs of non-finite steps, and a clean stop on SIGINT / SIGTERM.

Builds on :mod:`fastgan._checkpoint` (the Trainer's atomic write and RNG-state plumbing).

* :func:`save_checkpoint` writes ``run_dir/checkpoint-<step>.pt`` atomically (temporary file,
  fsync, rename) with a SHA-256 digest beside it (``.sha256``), and only then deletes checkpoints
  older than the newest ``keep``: the previous checkpoint stays until the new one is complete.
* :func:`load_checkpoint` loads one file with ``torch.load(weights_only=True)``: a pickle that asks
  for anything but tensors and plain containers is refused (nothing in it runs), a truncated or
  corrupted file (digest mismatch, unreadable archive) raises :class:`CheckpointError` naming it.
* :func:`load_latest_good` walks a run folder from the newest checkpoint back, warns about each bad
  one by name, and returns the newest that loads.
* :class:`NonFiniteGuard` counts steps skipped for non-finite losses / gradients per network on the
  device (no host sync per step), logs them, and stops training with :class:`NonFiniteTrainingError`
  naming the step and the network after ``max_consecutive`` skipped steps in a row.
* :class:`CheckpointEvery` and :class:`StopOnSignal` are ``Trainer.fit`` callbacks built on the
  above (``callback(trainer, step, stats)``), so they work with any Trainer without changes to it.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import re
import signal
import struct
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from fastgan._checkpoint import atomic_write

__all__ = ["CheckpointError", "NonFiniteTrainingError", "TrainingInterrupted", "save_checkpoint",
           "load_checkpoint", "load_latest_good", "list_checkpoints", "NonFiniteGuard", "CheckpointEvery",
           "StopOnSignal"]

log = logging.getLogger("fastgan")

CHECKPOINT_GLOB = "checkpoint-*.pt"
# [0-9], not \d: \d also matches other scripts' digits (checkpoint-٣.pt would be taken for step 3 and pruned).
_STEP_NAME = re.compile(r"^checkpoint-([0-9]+)\.pt$")
# What atomic_write leaves of a checkpoint or digest when the process is killed mid-write (mkstemp's name).
_STALE_TEMP_NAME = re.compile(r"^\.checkpoint-[0-9]+\.pt(\.sha256)?\.[a-z0-9_]+\.tmp$")
LEGACY_NAME = "checkpoint.pt"     # what fit / the CLI wrote before checkpoint-<step>.pt (no digest, no rotation)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (corrupted, truncated, not a checkpoint, unsafe)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"checkpoint {self.path!r}: {reason}")


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: a network skipped too many consecutive steps for non-finite values."""

    def __init__(self, network: str, step: int, consecutive: int, total: int):
        self.network, self.step, self.consecutive, self.total = network, step, consecutive, total
        self.history: dict[str, list[float]] | None = None  # Trainer.fit attaches what it had logged
        super().__init__(
            f"training stopped at step {step}: the {network} had {consecutive} consecutive steps with a "
            f"non-finite loss or gradients (all skipped; {total} skipped in all). The last checkpoint "
            "written before this stays; lower the learning rate or check the data/model for the cause.")


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after writing a checkpoint (``StopOnSignal``)."""

    def __init__(self, signum: int, step: int, path: str | None):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        where = f"; checkpoint written to {path}" if path else ""
        super().__init__(f"{name} received: stopped after step {step}{where}")


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{int(step):09d}.pt"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a ``checkpoint-<step>.pt`` file name; None for other names."""
    m = _STEP_NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints of a run folder, newest first: ``checkpoint-<step>.pt`` by step, then the
    Trainer's plain ``checkpoint.pt`` (if any) as the oldest candidate."""
    run_dir = Path(run_dir)
    found = []
    for p in run_dir.glob(CHECKPOINT_GLOB):
        m = _STEP_NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    ordered = [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]
    legacy = run_dir / LEGACY_NAME
    if legacy.is_file():
        ordered.append(legacy)
    return ordered


def save_checkpoint(state: dict[str, Any], run_dir: str | os.PathLike, step: int, keep: int = 2) -> Path:
    """Write ``state`` as ``run_dir/checkpoint-<step>.pt`` atomically, then delete the checkpoints of
    earlier steps but the newest ``keep - 1`` of them (checkpoints of later steps are left alone).
    Returns the path written.

    The digest file is written first and the checkpoint second, each atomically: a crash at any point
    leaves every earlier checkpoint intact, and at worst a stray digest without its checkpoint and a
    temporary ``.checkpoint-<step>.pt.*.tmp`` (both ignored, removed by the next save). Rewriting a
    step's checkpoint (a resumed run reaching that step again) drops the old digest first, then
    writes the checkpoint and its digest: a crash in between leaves a complete checkpoint (the old or
    the new one) without a digest, which loads. Call it on one process only (rank 0 under
    torch.distributed).
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = checkpoint_path(run_dir, step)
    digest = (hashlib.sha256(data).hexdigest() + "\n").encode()
    digest_path = Path(str(path) + ".sha256")
    if path.exists():
        # Written digest first, a crash between the two renames would leave the old (good) checkpoint
        # beside the new digest: a mismatch that discards it. Without a digest either file loads.
        digest_path.unlink(missing_ok=True)
        atomic_write(path, lambda f: f.write(data))
        atomic_write(digest_path, lambda f: f.write(digest))
    else:
        atomic_write(digest_path, lambda f: f.write(digest))
        atomic_write(path, lambda f: f.write(data))
    # Only now that the new checkpoint is complete: drop the old ones -- those of earlier steps beyond
    # the newest ``keep`` (this one included). Checkpoints of later steps are not older than this one:
    # another run's, or the steps after the checkpoint this run resumed from, left for their owner.
    earlier = [p for p in list_checkpoints(run_dir) if p.name != LEGACY_NAME and checkpoint_step(p) < step]
    for old in earlier[keep - 1:]:
        for f in (old, Path(str(old) + ".sha256")):
            f.unlink(missing_ok=True)
    for stray in run_dir.glob(CHECKPOINT_GLOB + ".sha256"):   # digests whose checkpoint never landed
        if not Path(str(stray)[: -len(".sha256")]).exists():
            stray.unlink(missing_ok=True)
    # Temporary files of writes cut by a hard kill (SIGKILL, OOM killer, power): each is as large as a
    # checkpoint and nothing else ever removes them. Safe here: one process writes a run folder's checkpoints.
    for temp in run_dir.glob(".checkpoint-*.tmp"):
        if _STALE_TEMP_NAME.match(temp.name) and temp.is_file():
            temp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def _default_validate(state: Any) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a checkpoint dict")
    fmt = state.get("format")
    if not (isinstance(fmt, str) and fmt.startswith("fastgan.")):
        raise ValueError(f"is not a fastgan checkpoint (format {fmt!r})")


def digest_matches(path: str | os.PathLike) -> bool | None:
    """Whether the file's SHA-256 matches the digest written beside it (``<path>.sha256``); None when
    there is no digest file."""
    digest_file = os.fspath(path) + ".sha256"
    if not os.path.isfile(digest_file):
        return None
    with open(digest_file, "rb") as f:
        expected = f.read().decode("ascii", "replace").strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() == expected


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu",
                    validate: Callable[[Any], None] | None = _default_validate) -> Any:
    """Load one checkpoint safely: digest checked when a ``.sha256`` sits beside it, then
    ``torch.load(weights_only=True)`` (refuses pickles that reference anything but tensors and plain
    containers, so a malicious payload never runs), then ``validate(state)`` (a ValueError from it
    marks the file bad). Every failure is a :class:`CheckpointError` naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file")
    try:
        matches = digest_matches(path)
    except OSError as exc:  # as torch.load's OSError below: an unreadable file is a bad one, named, not a crash
        raise CheckpointError(path, f"unreadable ({type(exc).__name__}: {exc})") from exc
    if matches is False:
        raise CheckpointError(path, "corrupted or truncated: its SHA-256 digest does not match the one "
                                    f"written with it ({os.path.basename(path)}.sha256)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refused a global (a class or function to call): never execute such a file.
        raise CheckpointError(path, "refused: it asks to unpickle objects other than tensors and plain "
                                    "values (weights_only=True loading), so it was not loaded; a fastgan "
                                    f"checkpoint never does this and the file may be malicious ({exc})") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError, IndexError,
            UnicodeDecodeError, AttributeError, TypeError,
            # A damaged pickle can also end inside an opcode's argument (struct.error) or fail one of
            # torch.load's own checks (AssertionError: "saved_id must be a tuple", "storage key ... not found").
            struct.error, AssertionError) as exc:
        raise CheckpointError(path, f"corrupted or truncated: torch.load failed ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if validate is not None:
        try:
            validate(state)
        except ValueError as exc:
            raise CheckpointError(path, str(exc)) from None
    return state


def load_latest_good(run_dir: str | os.PathLike, *, map_location: Any = "cpu",
                     validate: Callable[[Any], None] | None = _default_validate,
                     report: Callable[[CheckpointError], None] | None = None) -> tuple[Any, Path]:
    """The newest checkpoint of ``run_dir`` that loads: ``(state, path)``. Each bad one met on the
    way is reported by name and skipped: by ``report(error)`` when given (the error's ``.path`` and
    ``.reason`` say which file and why), else by a ``RuntimeWarning`` and the ``fastgan`` logger.
    Raises FileNotFoundError when the folder has no checkpoint, CheckpointError when none is good."""
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {os.fspath(run_dir)!r} (looked for {CHECKPOINT_GLOB} "
                                f"and {LEGACY_NAME})")
    errors = []
    for path in candidates:
        try:
            state = load_checkpoint(path, map_location=map_location, validate=validate)
        except CheckpointError as exc:
            errors.append(str(exc))
            if report is not None:
                report(exc)
                continue
            message = f"fastgan: skipping bad {exc} — trying an older checkpoint"
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            continue
        if errors and report is None:
            log.warning("fastgan: resuming from %s (the newer checkpoint(s) were bad)", path)
        return state, path
    raise CheckpointError(os.fspath(run_dir), "no good checkpoint in the folder:\n  " + "\n  ".join(errors))


# ------------------------------------------------------------------------------------------------
# Non-finite steps
# ------------------------------------------------------------------------------------------------

class NonFiniteGuard:
    """Counts skipped (non-finite) steps per network and stops training after ``max_consecutive``
    in a row, with an error naming the step and the network.

    A step of a network counts as skipped when its loss is not finite or its fused optimizer's
    ``found_inf`` is set (the fused optimizers skip such a step themselves). :meth:`observe` only
    copies the two values on the device (one small op, no host sync); the host reads what was
    observed at :meth:`check` (one sync for all of it), every ``check_every`` steps when used as a
    callback (default: every ``max_consecutive`` steps). The step reported is the one at which the
    limit was reached, even if the check comes later.

    Use as a ``Trainer.fit`` callback (``fit(..., callbacks=[guard])``), through
    ``Trainer.fit(max_nonfinite_steps=N)``, or call :meth:`observe` and :meth:`check` from a loop of
    your own (call ``check`` regularly: each observation is kept until then).
    """

    NETWORKS = {"d": "discriminator", "g": "generator"}

    def __init__(self, max_consecutive: int = 100, check_every: int | None = None):
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"max_consecutive must be an int >= 1, got {max_consecutive!r}")
        if check_every is not None and (isinstance(check_every, bool) or not isinstance(check_every, int)
                                        or check_every < 1):
            raise ValueError(f"check_every must be an int >= 1 or None, got {check_every!r}")
        self.max_consecutive = max_consecutive
        self.check_every = check_every if check_every is not None else max_consecutive
        self._pending: list[tuple[str, int, bool, bool, torch.Tensor]] = []  # (net, step, has loss, has found_inf, values)
        self._consecutive: dict[str, int] = {}
        self._total: dict[str, int] = {}
        self._hit_step: dict[str, int] = {}
        self._logged_total: dict[str, int] = {}
        self._observed = 0

    def observe(self, step: int, network: str, loss: torch.Tensor | None = None,
                found_inf: torch.Tensor | None = None) -> None:
        """Record one step of ``network`` ("d" or "g"): skipped if ``loss`` is not finite or
        ``found_inf`` is non-zero. One device op (a copy of the values), no host sync."""
        if network not in self.NETWORKS:
            raise ValueError(f"network must be one of {tuple(self.NETWORKS)}, got {network!r}")
        if loss is None and found_inf is None:
            raise ValueError("observe needs loss= and/or found_inf=")
        if (loss is not None and found_inf is not None and loss.dim() == 0 and found_inf.dim() == 0
                and loss.dtype == found_inf.dtype == torch.float32 and loss.device == found_inf.device):
            # The common case (a fused optimizer's found_inf, a 0-d float32 loss): one stack, a copy
            # (the optimizer overwrites found_inf at its next step).
            record = torch.stack((loss.detach(), found_inf.detach()))
            self._pending.append((network, int(step), True, True, record))
            if network not in self._consecutive:
                self._consecutive[network] = self._total[network] = self._logged_total[network] = 0
            return
        values = []
        if loss is not None:
            loss = loss.detach()
            if loss.numel() != 1:   # a loss per sample: finite only if all are
                loss = torch.where(torch.isfinite(loss).all(), 0.0, float("nan"))
            values.append(loss.reshape(1).float())
        if found_inf is not None:
            found_inf = found_inf.detach()
            if found_inf.numel() != 1:
                found_inf = found_inf.ne(0).any()
            values.append(found_inf.reshape(1).float())
        if len(values) == 2 and values[0].device != values[1].device:
            values[1] = values[1].to(values[0].device)
        # A copy: the optimizer overwrites found_inf at its next step.
        record = torch.cat(values) if len(values) == 2 else values[0].clone()
        self._pending.append((network, int(step), loss is not None, found_inf is not None, record))
        if network not in self._consecutive:
            self._consecutive[network] = self._total[network] = self._logged_total[network] = 0

    def _drain(self) -> None:
        """Read the pending observations (one host sync) into the host counters."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_device: dict[torch.device, list[int]] = {}
        for i, (*_, record) in enumerate(pending):
            by_device.setdefault(record.device, []).append(i)
        values: list[list[float]] = [[] for _ in pending]
        for indices in by_device.values():
            flat = torch.cat([pending[i][4] for i in indices]).tolist()
            at = 0
            for i in indices:
                n = pending[i][4].numel()
                values[i] = flat[at:at + n]
                at += n
        for (network, step, has_loss, has_found, _), vals in zip(pending, values):
            bad = (has_loss and not math.isfinite(vals[0])) or (has_found and vals[-1] != 0)
            if bad:
                self._total[network] += 1
                self._consecutive[network] += 1
                if self._consecutive[network] >= self.max_consecutive and network not in self._hit_step:
                    self._hit_step[network] = step
            else:
                self._consecutive[network] = 0

    def __call__(self, trainer, step: int, stats: dict[str, torch.Tensor]) -> None:
        """``Trainer.fit`` callback: observe D and G of the step just done, check every few steps."""
        for key, loss_name, opt_name in (("d", "d_loss", "d_optimizer"), ("g", "g_loss", "g_optimizer")):
            found_inf = getattr(getattr(trainer, opt_name, None), "found_inf", None)
            loss = stats.get(loss_name)
            if loss is not None or isinstance(found_inf, torch.Tensor):
                self.observe(step, key, loss=loss, found_inf=found_inf if isinstance(found_inf, torch.Tensor) else None)
        self._observed += 1
        if self._observed % self.check_every == 0:
            self.check(step)

    def check(self, step: int | None = None) -> dict[str, int]:
        """Read what was observed (one host sync): log newly skipped steps, raise
        NonFiniteTrainingError if a network reached ``max_consecutive`` skipped steps in a row.
        Returns the skipped steps so far per network (``{"discriminator": n, ...}`` for the
        networks observed). Under torch.distributed every rank must call it at the same steps: the
        ranks exchange what they found and all raise if one does (the earliest step is named)."""
        self._drain()
        for key in self._consecutive:
            total = self._total[key]
            new = total - self._logged_total[key]
            if new > 0:
                self._logged_total[key] = total
                log.warning("fastgan: %d %s step(s) skipped for a non-finite loss or gradients%s "
                            "(%d in all)", new, self.NETWORKS[key], f" up to step {step}" if step is not None else "",
                            total)
        hits = [(self._hit_step[k], self.NETWORKS[k], self._total[k]) for k in self._consecutive
                if k in self._hit_step]
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank stops together: a loss can be non-finite on one rank only (the gradients,
            # averaged before the step, are the same everywhere), and a rank that stopped alone
            # would leave the others waiting in their next collective.
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, hits[0] if hits else None)
            hits = sorted(h for h in gathered if h is not None)
        if hits:
            step_hit, network, total = min(hits)
            raise NonFiniteTrainingError(network, step_hit, self.max_consecutive, total)
        return {self.NETWORKS[k]: v for k, v in self._total.items()}

    def skipped(self) -> dict[str, int]:
        """Skipped steps so far per network (a host sync)."""
        self._drain()
        return {self.NETWORKS[k]: v for k, v in self._total.items()}

    def state_dict(self) -> dict[str, Any]:
        self._drain()
        return {k: {"consecutive": torch.tensor(self._consecutive[k]), "total": torch.tensor(self._total[k])}
                for k in self._consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = []
        for k, v in state.items():
            self._consecutive[k] = int(v["consecutive"])
            self._total[k] = int(v["total"])
            self._logged_total[k] = int(v["total"])


# ------------------------------------------------------------------------------------------------
# fit callbacks: periodic checkpoints, stop on a signal
# ------------------------------------------------------------------------------------------------

def _is_writer() -> bool:
    """Rank 0 writes checkpoints (every process when torch.distributed is not initialised)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class CheckpointEvery:
    """``Trainer.fit`` callback: ``save_checkpoint(trainer.checkpoint_state(), run_dir, step, keep)``
    every ``every`` steps (every rank calls it; rank 0 writes under torch.distributed). ``extra()`` may add entries (e.g. a
    NonFiniteGuard's state) to the saved dict under the key ``"extra"``."""

    def __init__(self, run_dir: str | os.PathLike, every: int, keep: int = 2,
                 extra: Callable[[], dict[str, Any]] | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.run_dir, self.every, self.keep, self.extra = Path(run_dir), every, keep, extra
        self.last_path: Path | None = None

    def save(self, trainer, step: int) -> Path | None:
        # A fastgan.Trainer's checkpoint_state gathers every rank's RNG states (all ranks call it).
        gather = getattr(trainer, "checkpoint_state", None)
        state = gather() if gather is not None else (trainer.state_dict() if _is_writer() else None)
        if state is None or not _is_writer():
            return None
        if self.extra is not None:
            state["extra"] = self.extra()
        self.last_path = save_checkpoint(state, self.run_dir, int(step), keep=self.keep)
        return self.last_path

    def __call__(self, trainer, step: int, stats) -> None:
        if step % self.every == 0:
            self.save(trainer, step)


class StopOnSignal:
    """``Trainer.fit`` callback and context manager: on SIGINT (Ctrl-C) or SIGTERM, finish the step
    in progress, write a checkpoint through ``checkpointer`` (a :class:`CheckpointEvery`, or any
    ``checkpointer(trainer, step) -> path``; None: write nothing) and raise
    :class:`TrainingInterrupted` (a KeyboardInterrupt) carrying the step and the path. The signal is
    only recorded by the handler, so the checkpoint is taken between two steps, never inside an
    update. A second Ctrl-C interrupts at once (under torch.distributed: one that comes more than
    ``FORWARDED_WITHIN_S`` seconds after the first, since torchrun passes the terminal's Ctrl-C on
    to workers that got it from the terminal already).

    Under ``torch.distributed`` (world size > 1) the ranks agree on stopping every ``sync_every``
    steps (one small all-reduce), so that all of them stop after the same step -- a rank that
    stopped alone would leave the others waiting in a collective -- and write the checkpoint
    together (rank 0 writes the file).

        with StopOnSignal(CheckpointEvery(run_dir, 100)) as stop:
            trainer.fit(data, steps, callbacks=[stop, ...])
    """

    FORWARDED_WITHIN_S = 2.0

    def __init__(self, checkpointer: CheckpointEvery | Callable[[Any, int], Any] | None,
                 signals=(signal.SIGINT, signal.SIGTERM), sync_every: int = 10):
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
        self.sync_every = sync_every
        self.checkpointer = checkpointer
        self.signals = tuple(signals)
        self.received: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        now = time.monotonic()
        if self.received is not None and signum == signal.SIGINT:
            dist = torch.distributed
            forwarded = (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                         and now - self._received_at < self.FORWARDED_WITHIN_S)
            if not forwarded:
                raise KeyboardInterrupt  # second Ctrl-C: stop now
            return  # torchrun passing on the Ctrl-C this process already got from the terminal
        self.received, self._received_at = signum, now
        log.warning("fastgan: %s received; stopping after the current step (Ctrl-C again to stop at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopOnSignal":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _agreed_signal(self, trainer, step: int) -> int | None:
        """The signal to stop on: this process's, or under torch.distributed any rank's (checked
        every ``sync_every`` steps, at the same steps on every rank)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.received
        if step % self.sync_every:
            return None
        device = getattr(trainer, "device", torch.device("cpu")) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        return signum or None

    def __call__(self, trainer, step: int, stats) -> None:
        signum = self._agreed_signal(trainer, step)
        if signum is None:
            return
        self.received = signum
        if self.checkpointer is None:
            path = None
        elif isinstance(self.checkpointer, CheckpointEvery):
            path = self.checkpointer.save(trainer, step)
        else:
            path = self.checkpointer(trainer, step)
        raise TrainingInterrupted(self.received, step, None if path is None else os.fspath(path))
