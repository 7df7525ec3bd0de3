"""`fastgan train | bench | info` end to end on short runs with small models."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastgan import cli
from fastgan.checkpoint import list_checkpoints

RUN_FILES = ("samples.png", "training.png", "metrics.json", "history.csv", "config.json",
             "checkpoint-000000010.pt", "checkpoint-000000010.pt.sha256",
             "checkpoint-000000020.pt", "checkpoint-000000020.pt.sha256")
FAST = ["--no-progress", "--width", "16"]


@pytest.fixture(autouse=True)
def _classifier_cache(tmp_path_factory, monkeypatch):
    # One digits classifier for the whole module, outside the user's ~/.cache.
    monkeypatch.setenv("FASTGAN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fastgan-cache"))


def _train(*args: str) -> int:
    return cli.main(["train", *args])


def _history(path):
    with open(path / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_image(path):
    with Image.open(path) as image:
        image.load()
        assert image.size[0] > 100 and image.size[1] > 100
        # not a blank canvas
        assert len(np.unique(np.asarray(image.convert("L")))) > 5


def test_train_ring8_writes_every_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train("--data", "ring8", "--steps", "20", "--batch-size", "32", "--log-every", "5",
                  "--checkpoint-every", "10", "--out", str(out), *FAST) == 0
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)  # the newest 2 checkpoints, nothing else
    _assert_image(out / "samples.png")
    _assert_image(out / "training.png")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["modes"]["num_samples"] == 2500
    assert metrics["modes"]["num_modes"] == 8 and 0 <= metrics["modes"]["modes_captured"] <= 8
    for key in ("d_loss", "g_loss", "value", "jsd", "d_real", "d_fake"):
        assert key in metrics["final_stats"]
    rows = _history(out)
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    assert {"d_loss", "g_loss", "value", "jsd", "d_real", "d_fake", "d_skipped", "g_skipped"} <= set(rows[0])
    assert all(r["d_skipped"] == r["g_skipped"] == "0" for r in rows)
    assert metrics["skipped_steps"] == {"discriminator": 0, "generator": 0} and metrics["world_size"] == 1
    config = json.loads((out / "config.json").read_text())
    for key in ("data", "model", "steps", "batch_size", "loss", "d_steps", "lr", "ema_beta", "pack", "precision",
                "device", "seed", "log_every", "checkpoint_every", "latent_dim", "width", "prior"):
        assert key in config, key
    assert config["model"] == "mlp" and config["device"] == "cpu" and config["loss"] == "nonsaturating"
    text = capsys.readouterr().out
    assert "modes captured" in text and "samples.png" in text and str(out) in text
    assert "world size 1" in text and "checkpoint-<step>.pt" in text


def test_train_digits_reports_classifier_metrics(tmp_path, capsys):
    out = tmp_path / "digits"
    assert _train("--steps", "6", "--batch-size", "16", "--eval-samples", "64", "--out", str(out), *FAST) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    digits = metrics["digits"]
    assert digits["num_samples"] == 64 and 0 <= digits["classes_covered"] <= 10
    assert digits["frechet_distance"] > 0 and digits["frechet_floor"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == "digits" and config["model"] == "dcgan"
    _assert_image(out / "samples.png")
    assert "classes covered" in capsys.readouterr().out


def _params(run):
    state = torch.load(list_checkpoints(run)[0], map_location="cpu", weights_only=True)
    return state["step"], state["generator"], state["discriminator"]


def assert_same_final_parameters(run_a, run_b, steps):
    """Both runs' newest checkpoints are at ``steps`` and hold bit-equal G and D parameters."""
    step_a, g_a, d_a = _params(run_a)
    step_b, g_b, d_b = _params(run_b)
    assert step_a == step_b == steps
    for key in g_a:
        assert torch.equal(g_a[key], g_b[key]), key
    for key in d_a:
        assert torch.equal(d_a[key], d_b[key]), key


@pytest.mark.parametrize("data", ["ring8", "digits"])
def test_resume_continues_exactly(tmp_path, data):
    common = ["--data", data, "--batch-size", "16", "--log-every", "2", "--eval-samples", "50", *FAST]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(*common, "--steps", "8", "--out", str(straight)) == 0
    assert _train(*common, "--steps", "4", "--out", str(split)) == 0
    assert _train("--resume", "--out", str(split), "--steps", "8", "--no-progress") == 0
    assert_same_final_parameters(straight, split, 8)
    assert [int(r["step"]) for r in _history(split)] == [2, 4, 6, 8]  # the history continues
    assert json.loads((split / "metrics.json").read_text())["steps"] == 8


def test_resume_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train("--data", "ring8", "--steps", "4", "--batch-size", "16", "--out", str(out), *FAST) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    assert _train("--resume", "--out", str(out), "--loss", "hinge", "--steps", "8") == 2
    assert "--loss 'nonsaturating'" in capsys.readouterr().err
    assert _train("--resume", "--out", str(out)) == 2  # already done all 4 steps
    assert "already done 4 of 4 steps" in capsys.readouterr().err
    assert _train("--resume") == 2
    assert "--resume needs --out" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    assert _train("--resume", "--out", str(tmp_path / "other")) == 2
    assert "not a resumable run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written over


def test_resume_checks_config_json_and_lowers_learning_rates(tmp_path, capsys):
    """config.json may have been edited: values the command line would refuse, or options the checkpoint
    was not trained with, are usage errors (exit 2) before anything is written. The learning rates may be
    given anew (how a run that stopped on non-finite steps continues); the restored optimizers take them."""
    import json
    out = tmp_path / "run"
    assert _train("--data", "ring8", "--steps", "4", "--batch-size", "16", "--out", str(out), *FAST) == 0
    config_path = out / "config.json"
    original = json.loads(config_path.read_text())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for edited, message in (([1, 2], "does not hold the run's options"),
                            ({**original, "steps": "abc"}, "records steps = 'abc'"),
                            ({**original, "lr": -5}, "records lr = -5"),
                            ({**original, "loss": "softmax"}, "records loss = 'softmax'"),
                            ({**original, "loss": "hinge"}, "gives loss = 'hinge', but .* was trained with")):
        config_path.write_text(json.dumps(edited))
        assert _train("--resume", "--out", str(out), "--steps", "6") == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        config_path.write_bytes(before["config.json"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written over
    assert _train("--resume", "--out", str(out), "--steps", "6", "--lr", "1e-5", *FAST) == 0
    state = torch.load(list_checkpoints(out)[0], weights_only=True)
    assert state["step"] == 6
    for name in ("g_optimizer", "d_optimizer"):
        assert all(group["lr"] == 1e-5 for group in state[name]["param_groups"])
    assert json.loads(config_path.read_text())["lr"] == 1e-5
    # A run started with per-network rates: --lr alone on resume sets both networks' rates.
    per_net = tmp_path / "per_net"
    assert _train("--data", "ring8", "--steps", "2", "--batch-size", "16", "--g-lr", "1e-4", "--d-lr", "4e-4",
                  "--out", str(per_net), *FAST) == 0
    assert _train("--resume", "--out", str(per_net), "--steps", "3", "--lr", "5e-5", *FAST) == 0
    state = torch.load(list_checkpoints(per_net)[0], weights_only=True)
    for name in ("g_optimizer", "d_optimizer"):
        assert all(group["lr"] == 5e-5 for group in state[name]["param_groups"])


@pytest.mark.parametrize("args, message", [(["--seed", str(2 ** 64)], "--seed"),
                                           (["--eval-samples", "1"], "--eval-samples")])
def test_out_of_range_numbers_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        _train("--data", "ring8", "--steps", "2", *args, *FAST)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_sample_pictures_of_any_channel_count(tmp_path):
    """samples.png of image data whose channels imshow cannot draw (2, 5): the first channel, named."""
    from fastgan.plots import save_samples
    for channels in (1, 2, 3, 4, 5):
        path = tmp_path / f"c{channels}.png"
        save_samples(path, torch.rand(6, channels, 8, 8) * 2 - 1, title="run")
        _assert_image(path)


def test_existing_out_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert _train("--data", "ring8", "--steps", "2", "--out", str(out), *FAST) == 2
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and "--resume" in err
    assert os.listdir(out) == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    assert _train("--data", "ring8", "--steps", "2", "--out", str(tmp_path / "file"), *FAST) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_default_out_dirs_are_new(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert _train("--data", "ring8", "--steps", "2", "--batch-size", "8", "--eval-samples", "10", *FAST) == 0
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert len(runs) == 2 and all(name.startswith("ring8-") for name in runs)
    for name in runs:
        assert (tmp_path / "runs" / name / "metrics.json").is_file()


def test_run_folders_are_claimed_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """Two runs started at once on one empty --out folder, or without --out in the same second, never
    share a folder: the folder (and its config.json) is claimed atomically; a failed set-up gives it back."""
    import argparse
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    args = argparse.Namespace(resume=False, out=str(empty), data="ring8")
    assert cli._prepare_out(args) == (empty, None)
    with pytest.raises(cli.UsageError, match="not empty"):
        cli._prepare_out(args)
    cli._release_claimed_folder()
    assert os.listdir(empty) == []  # given back: the empty folder is as it was, and kept (it existed)

    class Frozen:  # every default name is asked for in the same second
        @staticmethod
        def now():
            import datetime as dt
            return dt.datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(cli, "datetime", Frozen)
    first, second = cli._default_out("ring8"), cli._default_out("ring8")
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == first.name + "-2"
    cli._release_claimed_folder()
    assert not first.exists() and not second.exists()  # created here and never used: removed


def test_resume_of_a_run_stopped_after_its_last_step_writes_its_evaluation(tmp_path, capsys):
    """Interrupted at the very last step (its checkpoint written, the evaluation not): --resume writes the
    evaluation instead of refusing a run that has done all its steps; once written, it refuses."""
    out = tmp_path / "run"
    assert _train("--data", "ring8", "--steps", "4", "--batch-size", "16", "--eval-samples", "50", "--out", str(out),
                  *FAST) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("metrics.json", "samples.png", "training.png"):
        (out / name).unlink()
    capsys.readouterr()
    assert _train("--resume", "--out", str(out), "--no-progress") == 0
    assert "writing its evaluation" in capsys.readouterr().err
    again = json.loads((out / "metrics.json").read_text())
    assert again["steps"] == metrics["steps"] == 4 and (out / "samples.png").is_file()
    assert _train("--resume", "--out", str(out), "--no-progress") == 2
    assert "already done 4 of 4 steps" in capsys.readouterr().err


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_again(tmp_path, capsys):
    common = ["--data", "ring8", "--batch-size", "16", "--eval-samples", "50", *FAST]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _train(*common, "--steps", "4", "--out", str(straight)) == 0
    assert _train(*common, "--steps", "4", "--out", str(stopped)) == 0
    for path in stopped.iterdir():  # as a run killed before its first checkpoint leaves it
        if path.name != "config.json":
            path.unlink()
    assert _train(*common, "--steps", "4", "--out", str(stopped)) == 2
    assert "add --resume" in capsys.readouterr().err
    assert _train("--resume", "--out", str(stopped), "--no-progress") == 0
    assert "no checkpoint yet; starting its run from step 0" in capsys.readouterr().err
    assert_same_final_parameters(straight, stopped, 4)


@pytest.mark.parametrize("args, message", [
    (["--data", "no/such/path.npy"], "neither a built-in dataset"),
    (["--data", "ring8", "--batch-size", "10", "--pack", "3"], "divisible by --pack 3"),
    (["--data", "ring8", "--model", "dcgan"], "--model dcgan needs square images"),
    (["--data", "ring8", "--device", "cuda"] if not torch.cuda.is_available() else
     ["--data", "ring8", "--device", "cuda:99"], "--device"),
    (["--data", "ring8", "--device", "toaster"], "is not a device"),
    (["--data", "digits", "--batch-size", "5000"], "larger than the 1442 samples"),
])
def test_bad_options_exit_nonzero_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert _train(*args, "--steps", "2", "--out", str(out), "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgan train: error:") and message in err
    assert not out.exists()


@pytest.mark.parametrize("args", [["--steps", "0"], ["--lr", "-1"], ["--loss", "nope"], ["--ema-beta", "1.5"],
                                  ["--model", "resnet"], ["--batch-size", "many"]])
def test_bad_values_are_rejected_by_the_parser(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as info:
        _train(*args, "--out", str(tmp_path / "out"))
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_user_data_names_the_file(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    assert _train("--data", str(folder), "--out", str(tmp_path / "o1"), "--no-progress") == 2
    assert "contains no image files" in capsys.readouterr().err
    (folder / "broken.png").write_bytes(b"not a png")
    assert _train("--data", str(folder), "--out", str(tmp_path / "o2"), "--no-progress") == 2
    assert "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_train_on_an_image_folder_and_a_tensor_file(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "img-run"
    assert _train("--data", str(folder), "--image-size", "8", "--steps", "3", "--batch-size", "4",
                  "--out", str(out), *FAST) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "dcgan" and config["sample_shape"] == [3, 8, 8]
    _assert_image(out / "samples.png")

    np.save(tmp_path / "points.npy", rng.normal(size=(64, 5)).astype(np.float32))
    out = tmp_path / "vec-run"
    assert _train("--data", str(tmp_path / "points.npy"), "--steps", "3", "--batch-size", "8",
                  "--out", str(out), *FAST) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "sample_stats" in metrics and json.loads((out / "config.json").read_text())["model"] == "mlp"
    _assert_image(out / "samples.png")


def test_python_dash_m_entry_and_info():
    result = subprocess.run([sys.executable, "-m", "fastgan", "train", "--data", "nowhere", "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "fastgan train: error:" in result.stderr
    assert cli.main(["info"]) == 0


def test_bench_quick_table(capsys):
    assert cli.main(["bench", "--problem", "toy2d", "--steps", "2", "--warmup", "1", "--no-compile",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("naive", "tuned", "fastgan", "bench_step.py"):
        assert name in out
    assert cli.main(["bench", "--problem", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Checkpoints of a run folder: rotation, a bad newest one skipped by name, the old single file
# ------------------------------------------------------------------------------------------------

_SHORT = ["--data", "ring8", "--batch-size", "16", "--log-every", "1", "--eval-samples", "50", *FAST]


def test_resume_names_a_corrupted_newest_checkpoint_and_continues_from_the_previous_one(tmp_path, capsys):
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert _train(*_SHORT, "--steps", "8", "--checkpoint-every", "3", "--out", str(straight)) == 0
    assert _train(*_SHORT, "--steps", "6", "--checkpoint-every", "3", "--out", str(run)) == 0
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-000000006.pt", "checkpoint-000000003.pt"]
    newest = run / "checkpoint-000000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])            # truncated, as by a full disk
    capsys.readouterr()
    assert _train("--resume", "--out", str(run), "--steps", "8", "--no-progress") == 0
    captured = capsys.readouterr()
    assert f"skipping checkpoint {newest}" in captured.err and "truncated" in captured.err
    assert f"resuming from {run / 'checkpoint-000000003.pt'}" in captured.out
    assert "resuming at step 3, 5 steps" in captured.out
    # From step 3 the run redoes steps 4..8 exactly as the uninterrupted one did.
    assert_same_final_parameters(straight, run, 8)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-000000008.pt", "checkpoint-000000006.pt"]


def test_a_run_folder_with_only_the_old_checkpoint_pt_still_resumes(tmp_path, capsys):
    run = tmp_path / "old"
    assert _train(*_SHORT, "--steps", "4", "--out", str(run)) == 0
    newest = list_checkpoints(run)[0]
    state = torch.load(newest, weights_only=True)
    for path in list(run.glob("checkpoint-*")):
        path.unlink()
    torch.save(state, run / "checkpoint.pt")                # what earlier versions wrote
    capsys.readouterr()
    assert _train("--resume", "--out", str(run), "--steps", "6", "--no-progress") == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / 'checkpoint.pt'}" in out and "resuming at step 4" in out
    assert _params(run)[0] == 6


def test_every_checkpoint_bad_is_a_usage_error_naming_them(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(*_SHORT, "--steps", "4", "--checkpoint-every", "2", "--out", str(run)) == 0
    for path in list_checkpoints(run):
        path.write_bytes(b"")
    capsys.readouterr()
    assert _train("--resume", "--out", str(run), "--steps", "6", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "checkpoint-000000004.pt" in err and "checkpoint-000000002.pt" in err and "no good checkpoint" in err


# ------------------------------------------------------------------------------------------------
# --max-skipped-steps
# ------------------------------------------------------------------------------------------------

class _DivergingD(torch.nn.Module):
    """Returns NaN from the ``after``-th training forward on (a stand-in for a D whose weights blew up
    in a way the optimizer cannot see: the losses and gradients go non-finite)."""

    def __init__(self, net, after: int):
        super().__init__()
        self.net, self.after, self.calls = net, after, 0

    def forward(self, x):
        y = self.net(x)
        if torch.is_grad_enabled():
            self.calls += 1
        return y * float("nan") if self.calls > self.after else y


def test_max_skipped_steps_stops_a_diverging_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real_build = cli._build

    def build(config, data):
        G, D = real_build(config, data)
        return G, _DivergingD(D, after=2 * 4)   # about two D forwards with autograd per step: NaN from ~step 5
    monkeypatch.setattr(cli, "_build", build)
    run = tmp_path / "run"
    code = _train(*_SHORT, "--steps", "20", "--checkpoint-every", "2", "--max-skipped-steps", "3", "--out", str(run))
    err = capsys.readouterr().err
    assert code == cli.EXIT_NONFINITE
    match = re.search(r"training stopped at step (\d+): the (discriminator|generator) had 3 consecutive", err)
    assert match, err
    stop_step = int(match.group(1))
    # history.csv is written up to the last logged step: one skipped update per network and step from the onset
    rows = _history(run)
    skipped = [(int(r["d_skipped"]), int(r["g_skipped"])) for r in rows]
    onset = min(int(r["step"]) for r, s in zip(rows, skipped) if s != (0, 0))
    assert 3 <= onset and stop_step == onset + 2            # 3 in a row: the onset step and the two after it
    assert [int(r["step"]) for r in rows] == list(range(1, stop_step))
    assert all(s == (0, 0) for s in skipped[:onset - 1]) and all(s == (1, 1) for s in skipped[onset:])
    # The newest checkpoint is the last one before the stop; no checkpoint of the stop step or later.
    newest = list_checkpoints(run)[0]
    last_good = 2 * ((stop_step - 1) // 2)
    assert newest.name == f"checkpoint-{last_good:09d}.pt"
    assert f"the last good checkpoint is {newest}" in err
    state = torch.load(newest, weights_only=True)
    for net in ("generator", "discriminator"):
        assert all(torch.isfinite(v).all() for v in state[net].values()), net
    assert not (run / "metrics.json").exists()


def test_max_skipped_steps_none_never_stops(tmp_path, capsys, monkeypatch):
    real_build = cli._build
    monkeypatch.setattr(cli, "_build", lambda config, data: (real_build(config, data)[0],
                                                             _DivergingD(real_build(config, data)[1], after=2)))
    run = tmp_path / "run"
    assert _train(*_SHORT, "--steps", "5", "--eval-samples", "20", "--max-skipped-steps", "none",
                  "--out", str(run)) == 0
    assert json.loads((run / "config.json").read_text())["max_skipped_steps"] == 0
    assert "d_skipped" not in _history(run)[0]


@pytest.mark.parametrize("value", ["-1", "many", "1.5"])
def test_max_skipped_steps_rejects_bad_values(tmp_path, capsys, value):
    with pytest.raises(SystemExit):
        _train("--max-skipped-steps", value, "--out", str(tmp_path / "o"))
    assert "--max-skipped-steps" in capsys.readouterr().err
