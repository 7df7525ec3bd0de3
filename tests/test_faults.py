"""Faults: atomic rotating checkpoints, corrupted / truncated / malicious checkpoint files, runs of
non-finite steps, SIGKILL mid-run then resume, SIGINT (fastgan.checkpoint with fastgan.Trainer)."""
from __future__ import annotations

import csv
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from fastgan import checkpoint as ckpt
from fastgan.checkpoint import (CheckpointError, CheckpointEvery, NonFiniteGuard, NonFiniteTrainingError,
                                load_checkpoint, load_latest_good, save_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    """The child's environment: this checkout importable whatever the install (scripts run from tmp)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"format": "fastgan.Trainer/1", "step": step, "w": torch.randn(64, 64, generator=g),
            "nested": {"b": torch.arange(step + 1), "lr": 1e-3, "name": "d"}}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


# ------------------------------------------------------------------------------------------------
# Writing: atomic, rotating, the previous one kept until the new one is complete
# ------------------------------------------------------------------------------------------------

def test_save_keeps_the_newest_and_round_trips(tmp_path):
    for step in (10, 20, 30):
        path = save_checkpoint(_state(step), tmp_path, step, keep=2)
        assert path.name == f"checkpoint-{step:09d}.pt"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-000000020.pt", "checkpoint-000000020.pt.sha256",
                     "checkpoint-000000030.pt", "checkpoint-000000030.pt.sha256"]
    state, path = load_latest_good(tmp_path)
    assert path.name == "checkpoint-000000030.pt" and _same(state, _state(30))
    assert _same(load_checkpoint(tmp_path / "checkpoint-000000020.pt"), _state(20))


@pytest.mark.parametrize("fail_at", ["torch.save", "fsync", "os.replace"])
def test_a_save_that_dies_midway_leaves_the_previous_checkpoints_intact(tmp_path, monkeypatch, fail_at):
    save_checkpoint(_state(1), tmp_path, 1)
    save_checkpoint(_state(2), tmp_path, 2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(*args, **kwargs):
        raise OSError(f"simulated crash in {fail_at}")
    target = {"torch.save": (torch, "save"), "fsync": (os, "fsync"), "os.replace": (os, "replace")}[fail_at]
    monkeypatch.setattr(*target, boom)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(_state(3), tmp_path, 3)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # Nothing earlier touched, no temporary file left behind, no checkpoint-3 under its final name.
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [n for n in after if n.endswith(".tmp")]
    assert "checkpoint-000000003.pt" not in after
    state, path = load_latest_good(tmp_path)
    assert path.name == "checkpoint-000000002.pt" and _same(state, _state(2))


_WRITER = textwrap.dedent("""
    import sys, torch
    from fastgan.checkpoint import save_checkpoint
    run_dir = sys.argv[1]
    step = 0
    while True:
        step += 1
        g = torch.Generator().manual_seed(step)
        save_checkpoint({"format": "fastgan.Trainer/1", "step": step,
                         "w": torch.randn(512, 1024, generator=g)}, run_dir, step, keep=2)
        print(step, flush=True)
""")


def test_sigkill_while_writing_never_leaves_a_bad_newest_checkpoint(tmp_path):
    """A real process writing 2 MB checkpoints in a loop, killed with SIGKILL at arbitrary moments:
    every checkpoint under its final name is complete, and the newest one loads."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    for delay in (0.0, 0.013, 0.029):
        run_dir = tmp_path / f"run{delay}"
        proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True,
                                env=_env())
        try:
            assert proc.stdout.readline().strip() == "1"   # at least one complete checkpoint
            proc.stdout.readline()
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL
        named = ckpt.list_checkpoints(run_dir)
        assert 1 <= len(named) <= 3   # keep=2, plus one new one whose rotation the kill may have cut
        for path in named:
            state = load_checkpoint(path)
            g = torch.Generator().manual_seed(state["step"])
            assert torch.equal(state["w"], torch.randn(512, 1024, generator=g))
        state, path = load_latest_good(run_dir)
        assert path == named[0]


# ------------------------------------------------------------------------------------------------
# Reading: truncated, corrupted, not a checkpoint, malicious
# ------------------------------------------------------------------------------------------------

def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "bit flip":          # inside the tensor data: torch.load alone would not notice
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "bit flip", "garbage", "empty"])
def test_a_bad_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, how):
    for step in (5, 6):
        save_checkpoint(_state(step), tmp_path, step)
    newest = tmp_path / "checkpoint-000000006.pt"
    _corrupt(newest, how)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(newest)
    assert str(newest) in str(info.value) and ("corrupted" in str(info.value) or "truncated" in str(info.value))
    with pytest.warns(RuntimeWarning, match="checkpoint-000000006.pt"):
        state, path = load_latest_good(tmp_path)
    assert path.name == "checkpoint-000000005.pt" and _same(state, _state(5))


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_a_bad_plain_trainer_checkpoint_is_named(tmp_path, how):
    """Files without a digest (Trainer.save's checkpoint.pt) are still reported by name."""
    path = tmp_path / "checkpoint.pt"
    torch.save(_state(1), path)
    _corrupt(path, how)
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_checkpoint(path)


def test_every_checkpoint_bad_is_an_error_listing_them(tmp_path):
    for step in (1, 2):
        save_checkpoint(_state(step), tmp_path, step)
        _corrupt(tmp_path / f"checkpoint-{step:09d}.pt", "truncated")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(CheckpointError) as info:
            load_latest_good(tmp_path)
    assert "checkpoint-000000001.pt" in str(info.value) and "checkpoint-000000002.pt" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_latest_good(tmp_path / "empty")


def test_a_file_that_is_not_a_fastgan_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint-000000001.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        load_checkpoint(path)
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="not a fastgan checkpoint"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this runs ``os.system(command)`` (what a malicious checkpoint would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _CreateFile:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):  # builtins.open(path, "w"): creates the file when unpickled
        return (open, (self.path, "w"))


@pytest.mark.parametrize("container", ["torch zip", "raw pickle"])
@pytest.mark.parametrize("payload", ["os.system", "open"])
def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, container, payload):
    marker = tmp_path / "pwned"
    evil = _Payload(f"touch {marker}") if payload == "os.system" else _CreateFile(str(marker))
    good = save_checkpoint(_state(1), tmp_path, 1)
    path = tmp_path / "checkpoint-000000002.pt"
    obj = {"format": "fastgan.Trainer/1", "step": 2, "w": torch.ones(3), "hook": evil}
    if container == "torch zip":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "refused" in str(info.value)
    assert not marker.exists(), "the payload ran"
    with pytest.warns(RuntimeWarning, match="checkpoint-000000002.pt"):
        state, used = load_latest_good(tmp_path)
    assert used == good and state["step"] == 1
    assert not marker.exists(), "the payload ran"


# ------------------------------------------------------------------------------------------------
# Non-finite steps
# ------------------------------------------------------------------------------------------------

def test_guard_counts_consecutive_skips_per_network_and_names_step_and_network():
    guard = NonFiniteGuard(max_consecutive=3, check_every=1000)
    nan, ok = torch.tensor(float("nan")), torch.tensor(0.5)
    found, clear = torch.tensor(1.0), torch.tensor(0.0)
    pattern = {1: (ok, nan), 2: (nan, nan), 3: (ok, ok), 4: (ok, nan), 5: (nan, ok), 6: (ok, ok), 7: (ok, ok)}
    for step, (d, g) in pattern.items():
        guard.observe(step, "d", loss=d, found_inf=clear)
        guard.observe(step, "g", loss=ok, found_inf=found if g is nan else clear)
        guard.check(step)                      # never 3 in a row: no error
    assert guard.skipped() == {"discriminator": 2, "generator": 3}
    for step in (8, 9, 10, 11):                # the generator's gradients go non-finite for good
        guard.observe(step, "d", loss=ok)
        guard.observe(step, "g", loss=ok, found_inf=found)
    with pytest.raises(NonFiniteTrainingError) as info:
        guard.check(11)
    err = info.value
    assert err.network == "generator" and err.step == 10     # the step at which the limit was reached
    assert "step 10" in str(err) and "generator" in str(err) and "3 consecutive" in str(err)


def test_guard_reports_a_run_that_ended_before_the_check_and_reads_non_scalar_values():
    guard = NonFiniteGuard(max_consecutive=2, check_every=1000)
    ok, nan = torch.tensor(1.0), torch.tensor(float("inf"))
    for step, loss in enumerate([ok, nan, nan, ok, ok], start=1):   # 2 in a row at steps 2-3, then good again
        guard.observe(step, "d", loss=loss)
    guard.observe(6, "g", loss=torch.tensor([1.0, float("nan")]), found_inf=torch.zeros(3))  # per-sample loss
    with pytest.raises(NonFiniteTrainingError) as info:
        guard.check(5)
    assert info.value.network == "discriminator" and info.value.step == 3
    assert guard.skipped() == {"discriminator": 2, "generator": 1}
    state = guard.state_dict()
    fresh = NonFiniteGuard(max_consecutive=2)
    fresh.load_state_dict(state)
    assert fresh.skipped() == {"discriminator": 2, "generator": 1}


def test_guard_rejects_bad_options():
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_consecutive"):
            NonFiniteGuard(max_consecutive=bad)
    with pytest.raises(ValueError, match="network"):
        NonFiniteGuard().observe(1, "critic", loss=torch.tensor(1.0))


def _mlp_gan(seed: int = 0):
    torch.manual_seed(seed)
    g = nn.Sequential(nn.Linear(4, 16), nn.LeakyReLU(0.2), nn.Linear(16, 2))
    d = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    return g, d


class _Poison(nn.Module):
    """Turns D's output into NaN once ``armed`` (a stand-in for a diverging model)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.armed = net, False

    def forward(self, x):
        y = self.net(x)
        return y * float("nan") if self.armed else y


def test_trainer_stops_after_consecutive_nonfinite_steps_and_keeps_the_last_good_checkpoint(tmp_path, caplog):
    from fastgan.trainer import Trainer
    g, d = _mlp_gan()
    d = _Poison(d)
    data = torch.randn(256, 2)
    trainer = Trainer(g, d, latent_dim=4, seed=3, lr=1e-3, fuse=False)
    guard = NonFiniteGuard(max_consecutive=3, check_every=1)
    saver = CheckpointEvery(tmp_path, every=2, keep=2)
    snapshots = {}

    def arm_and_snapshot(tr, step, stats):
        snapshots[step] = [p.detach().clone() for p in list(g.parameters()) + list(d.parameters())]
        if step == 4:
            d.armed = True                    # steps 5, 6, 7 are non-finite
    with pytest.raises(NonFiniteTrainingError) as info, caplog.at_level("WARNING", logger="fastgan"):
        trainer.fit(data, 20, batch_size=32, progress=False, callbacks=[arm_and_snapshot, guard, saver])
    assert info.value.step == 7 and info.value.network == "discriminator"
    assert "skipped" in caplog.text
    # The skipped steps changed no parameter (the fused optimizers skipped them).
    for step in (5, 6, 7):
        assert all(torch.equal(a, b) for a, b in zip(snapshots[4], snapshots[step]))
    # The newest checkpoint is from a step the guard did not stop at, and it is finite.
    state, path = load_latest_good(tmp_path)
    assert state["step"] == 6 and path.name == "checkpoint-000000006.pt"
    assert all(torch.isfinite(v).all() for v in state["discriminator"].values())


# ------------------------------------------------------------------------------------------------
# SIGKILL mid-run, then resume; SIGINT
# ------------------------------------------------------------------------------------------------

_TRAIN = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    from fastgan.trainer import Trainer
    from fastgan.checkpoint import CheckpointEvery, StopOnSignal, TrainingInterrupted, load_latest_good
    run_dir, steps, mode, out, delay = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 16), nn.LeakyReLU(0.2), nn.Linear(16, 2))
    D = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    data = torch.randn(256, 2) * 0.5 + 1
    trainer = Trainer(G, D, latent_dim=4, seed=1, lr=1e-3, ema_beta=0.9)
    if mode == "resume":
        state, path = load_latest_good(run_dir)
        trainer.load_state_dict(state)
        print("resumed", trainer.step_count, flush=True)
    saver = CheckpointEvery(run_dir, every=3, keep=2)
    def report(tr, step, stats):
        print("step", step, flush=True)
        time.sleep(delay)
    with StopOnSignal(saver) as stop:
        try:
            trainer.fit(data, steps - trainer.step_count, batch_size=32, progress=False,
                        callbacks=[saver, stop, report])
        except TrainingInterrupted as exc:
            print("interrupted", exc.step, exc.path, flush=True)
            sys.exit(130)
    torch.save({"G": G.state_dict(), "D": D.state_dict(), "step": trainer.step_count}, out)
""")

STEPS = 24


def _train(tmp_path: Path, run: str, mode: str, delay: float = 0.0, **popen):
    script = tmp_path / "train.py"
    script.write_text(_TRAIN)
    out = tmp_path / f"{run}-final.pt"
    args = [sys.executable, str(script), str(tmp_path / run), str(STEPS), mode, str(out), str(delay)]
    return args, out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    args, out = _train(tmp, "run", "fresh")
    subprocess.run(args, check=True, capture_output=True, timeout=600, env=_env())
    return torch.load(out, weights_only=True)


def _assert_equal_runs(a, b):
    assert a["step"] == b["step"] == STEPS
    for net in ("G", "D"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs from the uninterrupted run"


def _run_until(proc, min_step: int) -> int:
    """Read the child's progress until it has done ``min_step`` steps; returns the last step seen."""
    step = 0
    while step < min_step:
        line = proc.stdout.readline()
        assert line, f"the training process ended early (rc {proc.poll()})"
        if line.startswith("step"):
            step = int(line.split()[1])
    return step


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    args, out = _train(tmp_path, "run", "fresh", delay=0.05)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env())
    try:
        killed_after = _run_until(proc, 8)              # checkpoints at 3 and 6 at least
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert killed_after < STEPS
    resume_args, out = _train(tmp_path, "run", "resume")
    result = subprocess.run(resume_args, capture_output=True, text=True, timeout=600, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_from = int(result.stdout.split("resumed", 1)[1].split()[0])
    assert 6 <= resumed_from < STEPS and resumed_from % 3 == 0
    _assert_equal_runs(torch.load(out, weights_only=True), uninterrupted)


def test_sigint_writes_a_checkpoint_exits_cleanly_and_resumes_exactly(tmp_path, uninterrupted):
    args, out = _train(tmp_path, "run", "fresh", delay=0.05)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _run_until(proc, 4)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    line = [ln for ln in stdout.splitlines() if ln.startswith("interrupted")][0]
    _, step, path = line.split()
    assert Path(path).name == f"checkpoint-{int(step):09d}.pt" and int(step) < STEPS
    assert load_checkpoint(path)["step"] == int(step)
    resume_args, out = _train(tmp_path, "run", "resume")
    result = subprocess.run(resume_args, capture_output=True, text=True, timeout=600, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed {step}" in result.stdout
    _assert_equal_runs(torch.load(out, weights_only=True), uninterrupted)


# ------------------------------------------------------------------------------------------------
# The command line: `fastgan train` killed / interrupted, then `--resume`
# ------------------------------------------------------------------------------------------------

CLI_STEPS = 400
_CLI_COMMON = ["--data", "ring8", "--batch-size", "16", "--eval-samples", "50", "--no-progress", "--width", "16",
               "--log-every", "10", "--seed", "5"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastgan", "train", *args]


def _cli_env() -> dict:
    return _env(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _final_params(run: Path):
    state = load_checkpoint(ckpt.list_checkpoints(run)[0])
    return state["step"], state["generator"], state["discriminator"]


@pytest.fixture(scope="module")
def cli_uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "straight"
    subprocess.run(_cli(*_CLI_COMMON, "--steps", str(CLI_STEPS), "--checkpoint-every", "10", "--out", str(out)),
                   check=True, capture_output=True, timeout=900, env=_cli_env())
    return _final_params(out)


def _assert_same_final(a, b, steps=CLI_STEPS):
    assert a[0] == b[0] == steps
    for net_a, net_b in ((a[1], b[1]), (a[2], b[2])):
        for k in net_a:
            assert torch.equal(net_a[k], net_b[k]), f"{k} differs from the uninterrupted run"


def test_cli_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, cli_uninterrupted):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*_CLI_COMMON, "--steps", str(CLI_STEPS), "--checkpoint-every", "10",
                                 "--out", str(out)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_cli_env())
    try:
        deadline = time.monotonic() + 600
        while not ckpt.list_checkpoints(out):             # the first checkpoint (step 10) is written
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_latest_good(out)[0]["step"]
    assert killed_at < CLI_STEPS
    result = subprocess.run(_cli("--resume", "--out", str(out), "--steps", str(CLI_STEPS), "--no-progress"),
                            capture_output=True, text=True, timeout=900, env=_cli_env())
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_final(_final_params(out), cli_uninterrupted)
    # The killed session's rows up to its last checkpoint were written at that checkpoint: the history has
    # every logged step once, as the uninterrupted run's.
    with (out / "history.csv").open(newline="") as f:
        steps = [int(float(row["step"])) for row in csv.DictReader(f)]
    assert steps == list(range(10, CLI_STEPS + 1, 10))


# Long enough that the signal, sent half a second into training, lands inside fit() on a fast machine
# too (400 steps can be over by then, and a signal during the final plots is another situation).
CLI_SIGINT_STEPS = 4000


@pytest.fixture(scope="module")
def cli_uninterrupted_long(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "straight_long"
    subprocess.run(_cli(*_CLI_COMMON, "--steps", str(CLI_SIGINT_STEPS), "--checkpoint-every", "100000",
                        "--out", str(out)), check=True, capture_output=True, timeout=900, env=_cli_env())
    return _final_params(out)


def test_cli_sigint_writes_a_checkpoint_and_exits_cleanly(tmp_path, cli_uninterrupted_long):
    """Ctrl-C: the step in progress finishes, a checkpoint of that step is written, exit status 130
    without a traceback; --resume then finishes the run exactly as if it had never stopped."""
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(_cli(*_CLI_COMMON, "--steps", str(CLI_SIGINT_STEPS), "--checkpoint-every", "100000",
                                 "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env())
    try:
        for line in proc.stdout:                       # training starts after this line
            if "steps ->" in line:
                break
        time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    written = ckpt.list_checkpoints(out)
    assert written, f"no checkpoint was written on SIGINT; stderr: {stderr[-2000:]}"
    step = load_checkpoint(written[0])["step"]
    assert 0 < step < CLI_SIGINT_STEPS
    # The history logged before the signal is kept (every 10th step up to the checkpoint's) ...
    logged = [int(float(row.split(",")[0])) for row in (out / "history.csv").read_text().splitlines()[1:]]
    assert logged == list(range(10, step + 1, 10))
    result = subprocess.run(_cli("--resume", "--out", str(out), "--steps", str(CLI_SIGINT_STEPS), "--no-progress"),
                            capture_output=True, text=True, timeout=900, env=_cli_env())
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_final(_final_params(out), cli_uninterrupted_long, CLI_SIGINT_STEPS)
    # ... and continued by the resumed session: one row per log step, none twice, none lost.
    logged = [int(float(row.split(",")[0])) for row in (out / "history.csv").read_text().splitlines()[1:]]
    assert logged[:len(range(10, step + 1, 10))] == list(range(10, step + 1, 10))
    assert logged == sorted(set(logged)) and logged[-1] == CLI_SIGINT_STEPS


# ------------------------------------------------------------------------------------------------
# Trainer.fit(max_nonfinite_steps=...): the extra D steps of d_steps > 1 count too
# ------------------------------------------------------------------------------------------------

def test_fit_max_nonfinite_steps_counts_every_d_update_and_logs_skips(tmp_path, caplog):
    from fastgan.trainer import Trainer
    g, d = _mlp_gan()
    d = _Poison(d)
    trainer = Trainer(g, d, latent_dim=4, seed=3, lr=1e-3, d_steps=3)

    def arm(tr, step, stats):
        if step == 2:
            d.armed = True                    # every D update from iteration 3 on is non-finite
    with pytest.raises(NonFiniteTrainingError) as info, caplog.at_level("WARNING", logger="fastgan"):
        trainer.fit(torch.randn(256, 2), 10, batch_size=16, log_every=1, checkpoint_every=1, out_dir=tmp_path,
                    progress=False, callbacks=[arm], max_nonfinite_steps=4)
    err = info.value
    # D: 3 skipped updates in iteration 3, the 4th in iteration 4 (G has only 2 by then). Counting only
    # the last D update of each iteration would stop at iteration 6.
    assert err.network == "discriminator" and err.step == 4 and "step 4" in str(err)
    assert err.history["step"] == [1.0, 2.0, 3.0]
    assert err.history["d_skipped"] == [0.0, 0.0, 3.0] and err.history["g_skipped"] == [0.0, 0.0, 1.0]
    assert "3 discriminator step(s) skipped" in caplog.text
    # No checkpoint of iteration 4; the newest (3) holds iteration 2's parameters (3 was skipped), finite.
    state, path = load_latest_good(tmp_path)
    assert path.name == "checkpoint-000000003.pt"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-000000003.pt",
                                                                 "checkpoint-000000002.pt"]
    two = load_checkpoint(tmp_path / "checkpoint-000000002.pt")
    for net in ("generator", "discriminator"):
        for key, value in state[net].items():
            assert torch.isfinite(value).all() and torch.equal(value, two[net][key]), (net, key)


def test_fit_writes_rotating_step_checkpoints_that_load(tmp_path):
    from fastgan.trainer import Trainer
    g, d = _mlp_gan()
    trainer = Trainer(g, d, latent_dim=4, seed=3, lr=1e-3)
    trainer.fit(torch.randn(64, 2), 5, batch_size=16, checkpoint_every=2, out_dir=tmp_path, progress=False,
                keep_checkpoints=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-000000004.pt", "checkpoint-000000004.pt.sha256",
        "checkpoint-000000005.pt", "checkpoint-000000005.pt.sha256"]
    g2, d2 = _mlp_gan(1)
    loaded = Trainer.load(tmp_path, g2, d2)                    # the folder: its newest good checkpoint
    assert loaded.step_count == 5
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), g2.state_dict().values()))
    with pytest.raises(ValueError, match="keep_checkpoints"):
        trainer.fit(torch.randn(64, 2), 1, batch_size=16, checkpoint_every=1, out_dir=tmp_path, progress=False,
                    keep_checkpoints=0)
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        trainer.fit(torch.randn(64, 2), 1, batch_size=16, progress=False, max_nonfinite_steps=0)
