"""Checkpoint plumbing for :class:`fastgan.Trainer`: atomic writes and RNG states as plain tensors.

Checkpoints are loaded with ``torch.load(weights_only=True)``, so everything in them must be
tensors, numbers, strings, booleans, None, and lists / tuples / dicts of those. The RNG states of
Python's ``random`` and NumPy are converted here into that vocabulary and back.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import IO, Any, Callable

import torch

try:  # numpy is a dependency of fastgan, but the trainer itself must not need it
    import numpy as np
except ImportError:  # pragma: no cover - numpy is installed with fastgan
    np = None


def _umask() -> int:
    """The process's umask, read without changing it where the OS shows it (Linux: /proc), since setting
    it to read it back would briefly change it for every thread."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, flush it to disk, then rename it over
    ``path`` (and fsync the folder where the platform allows).

    A reader (or a crash) sees either the previous complete file or the new complete file, never a
    partial one: ``os.replace`` is atomic on POSIX and Windows when both names are in one folder.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0666 less the umask), so a
        # checkpoint is as readable as the other files of its run folder (an evaluation job, a colleague).
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (not possible on every platform / filesystem)
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def global_rng_states() -> dict[str, Any]:
    """The process-wide RNG states: torch CPU, every initialised CUDA device, Python, NumPy."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    version, internal, gauss = random.getstate()
    state["python"] = {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss": gauss}
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def set_global_rng_states(state: dict[str, Any]) -> None:
    """Restore what :func:`global_rng_states` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "numpy" in state and np is not None:
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
