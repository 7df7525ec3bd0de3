"""Checkpoint files of a run folder (fastgan.checkpoint, fastgan._checkpoint): damaged and unreadable files
named and skipped, debris of hard kills, names that only look like checkpoints, Trainer.load of a folder."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from fastgan import Trainer
from fastgan import checkpoint as ckpt
from fastgan.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_latest_good, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"format": "fastgan.Trainer/1", "step": step, "lr": 1e-3, "w": torch.randn(8, 8, generator=g)}


def _torch_bytes(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def _with_pickle_end(data: bytes, new_end: bytes) -> bytes:
    """``data`` (a torch zip file) with the last bytes of its pickle (``archive/data.pkl``, stored
    uncompressed) replaced in place by ``new_end``: damage inside the pickle, the zip intact."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    assert info.compress_type == zipfile.ZIP_STORED
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    end = info.header_offset + 30 + name_len + extra_len + info.file_size
    assert data[end - 1: end] == b"."   # the pickle's STOP
    return data[: end - len(new_end)] + new_end + data[end:]


# Damage that torch.load reports with other exceptions than the usual ones (found by fuzzing files
# without a digest: a Trainer.save checkpoint.pt, or a checkpoint whose .sha256 was not copied along).
DAMAGED = {
    # STOP turned into BINFLOAT: the float's 8 bytes run past the end (struct.error)
    "pickle ends inside a float": lambda: _with_pickle_end(_torch_bytes(_state(2)), b"G"),
    # an int where a storage's id tuple belongs (AssertionError: "saved_id must be a tuple")
    "int as a storage id": lambda: _with_pickle_end(_torch_bytes(_state(2)), b"K\x05Q."),
    # torch's older (non-zip) format, cut short in its header (struct.error)
    "old format truncated": lambda: _torch_bytes(_state(2), _use_new_zipfile_serialization=False)[:18],
}


def _assert_named_then_skipped(run: Path, bad: Path, good: Path, why: str) -> None:
    """Loading ``bad`` is a CheckpointError naming it (``why``); resuming the folder warns about it and
    takes ``good``, the step-1 checkpoint."""
    with pytest.raises(CheckpointError, match=why) as info:
        load_checkpoint(bad)
    assert info.value.path == str(bad)
    with pytest.warns(RuntimeWarning, match=bad.name):
        state, path = load_latest_good(run)
    assert path == good and state["step"] == 1


@pytest.mark.parametrize("how", sorted(DAMAGED))
def test_a_damaged_pickle_is_a_named_bad_checkpoint_and_the_previous_one_used(tmp_path, how):
    good = save_checkpoint(_state(1), tmp_path, 1)
    bad = tmp_path / "checkpoint-000000002.pt"
    bad.write_bytes(DAMAGED[how]())
    _assert_named_then_skipped(tmp_path, bad, good, "corrupted or truncated")
    # The old single-file checkpoint.pt damaged alike, alone in its folder: the "no good checkpoint" error.
    (alone := tmp_path / "alone").mkdir()
    (alone / "checkpoint.pt").write_bytes(DAMAGED[how]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(CheckpointError, match="no good checkpoint"):
            load_latest_good(alone)


def test_an_unreadable_newest_checkpoint_is_named_and_skipped(tmp_path, monkeypatch):
    """Reading the file for its digest fails (EACCES, EIO): a CheckpointError naming it, as when
    torch.load fails to read it, so that resuming falls back to the previous checkpoint."""
    good = save_checkpoint(_state(1), tmp_path, 1)
    newest = save_checkpoint(_state(2), tmp_path, 2)

    def unreadable(file, *args, **kwargs):
        if os.fspath(file) == str(newest):
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)
    monkeypatch.setattr(ckpt, "open", unreadable, raising=False)  # what fastgan.checkpoint's digest check opens
    _assert_named_then_skipped(tmp_path, newest, good, "unreadable")


_KILLED_WRITER = textwrap.dedent("""
    import os, sys
    from fastgan._checkpoint import atomic_write

    def write_then_die(f):
        f.write(b"x" * 100_000)
        f.flush()
        os._exit(9)   # a hard kill mid-write: nothing of Python's cleanup runs

    atomic_write(sys.argv[1], write_then_die)
""")


def test_temporaries_left_by_a_hard_kill_are_never_checkpoints_and_the_next_save_removes_them(tmp_path):
    save_checkpoint(_state(1), tmp_path, 1)
    script = tmp_path.parent / f"{tmp_path.name}-writer.py"
    script.write_text(_KILLED_WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    for name in ("checkpoint-000000002.pt.sha256", "checkpoint-000000002.pt"):
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / name)], env=env, timeout=120)
        assert proc.returncode == 9
    stale = sorted(p.name for p in tmp_path.glob(".checkpoint-*.tmp"))
    assert len(stale) == 2, sorted(os.listdir(tmp_path))
    # Other files' temporaries: Trainer.save's checkpoint.pt, the CLI's history.csv; not ours to remove.
    others = [".checkpoint.pt.abcd1234.tmp", ".history.csv.abcd1234.tmp"]
    for name in others:
        (tmp_path / name).write_bytes(b"y")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000000001.pt"]
    assert load_latest_good(tmp_path)[1].name == "checkpoint-000000001.pt"

    save_checkpoint(_state(2), tmp_path, 2)
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == sorted(others)
    assert load_latest_good(tmp_path)[0]["step"] == 2


def test_names_with_other_scripts_digits_are_not_checkpoints(tmp_path):
    """``checkpoint-<step>.pt`` means ASCII digits: a file named with Arabic-Indic or full-width digits
    is no checkpoint of the run (neither resumed from nor rotated away)."""
    for name in ("checkpoint-\u0663.pt", "checkpoint-\uff19\uff19.pt"):
        (tmp_path / name).write_bytes(_torch_bytes(_state(99)))
    save_checkpoint(_state(1), tmp_path, 1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000000001.pt"]
    assert ckpt.checkpoint_step("checkpoint-\u0663.pt") is None
    save_checkpoint(_state(5), tmp_path, 5, keep=1)
    assert (tmp_path / "checkpoint-\u0663.pt").exists() and (tmp_path / "checkpoint-\uff19\uff19.pt").exists()
    assert load_latest_good(tmp_path)[0]["step"] == 5


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    return (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
            nn.Sequential(nn.Linear(3, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1)))


def test_trainer_load_of_a_folder_skips_a_newer_file_that_is_no_trainer_checkpoint(tmp_path):
    """Trainer.load(run_dir) resumes from the newest good checkpoint: a newer checkpoint-<step>.pt that
    loads but is not a Trainer checkpoint is named and skipped (as ``fastgan train --resume`` does),
    not the end of the load."""
    trainer = Trainer(*_pair(), latent_dim=4, fuse=False, seed=0)
    data = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    trainer.fit(data, steps=2, batch_size=8, checkpoint_every=2, out_dir=tmp_path, progress=False)
    foreign = tmp_path / "checkpoint-000000009.pt"
    torch.save({"generator": trainer.generator.state_dict()}, foreign)   # G's weights under a checkpoint's name
    with pytest.warns(RuntimeWarning, match="checkpoint-000000009.pt.*not a fastgan.Trainer checkpoint"):
        loaded = Trainer.load(tmp_path, *_pair(1))
    assert loaded.step_count == 2
    for a, b in zip(loaded.generator.parameters(), trainer.generator.parameters()):
        assert torch.equal(a, b)
    # One file named directly is still refused outright.
    with pytest.raises(ValueError, match="not a fastgan.Trainer checkpoint"):
        Trainer.load(foreign, *_pair(1))


@pytest.mark.parametrize("crash_at_write", [0, 1])
def test_a_crash_while_rewriting_a_steps_checkpoint_leaves_one_that_loads(tmp_path, monkeypatch, crash_at_write):
    # A resumed run reaching a step it has a checkpoint of rewrites it. Written digest first, a crash
    # between the digest's rename and the checkpoint's left the old (good) checkpoint beside the new
    # digest: "corrupted", and resume fell back a checkpoint.
    save_checkpoint(_state(1), tmp_path, 1)
    path = save_checkpoint(_state(5), tmp_path, 5)
    new_state = dict(_state(6), step=5)
    real_write, calls = ckpt.atomic_write, []

    def crash_on_one_write(target, fn):
        calls.append(target)
        if len(calls) - 1 == crash_at_write:
            raise OSError("disk gone")
        return real_write(target, fn)

    monkeypatch.setattr(ckpt, "atomic_write", crash_on_one_write)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(new_state, tmp_path, 5)
    monkeypatch.undo()
    state = load_checkpoint(path)   # no CheckpointError: the old or the new one, complete
    assert any(torch.equal(state["w"], s["w"]) for s in (_state(5), new_state))
    latest, latest_path = load_latest_good(tmp_path)
    assert latest_path == path and latest["step"] == 5
    # and a clean rewrite leaves the new one with a matching digest
    save_checkpoint(new_state, tmp_path, 5)
    assert ckpt.digest_matches(path) is True and torch.equal(load_checkpoint(path)["w"], new_state["w"])
