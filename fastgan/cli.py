"""The `fastgan` command line: `fastgan info | train | bench` (also `python -m fastgan ...`).

`fastgan train` trains a GAN with :class:`fastgan.Trainer` on an embedded dataset (ring8, grid25,
digits) or on user data, and leaves a run folder with pictures, metrics, the history, the resolved
configuration and rotating checkpoints (``checkpoint-<step>.pt`` with SHA-256 digests, the newest two
kept) that `--resume` continues from, skipping a truncated or corrupted newest one by name.
`fastgan bench` runs the whole-step benchmark of the repository's `benchmarks/` suite in a quick mode
and prints a table.

Multi-process training: ``torchrun --nproc_per_node=N -m fastgan train ...`` trains data-parallel
through ``torch.distributed`` (gloo on CPU; NCCL on CUDA, each process on ``cuda:LOCAL_RANK``).
``--batch-size`` is the global batch: each process trains on ``batch-size / N`` samples per step
(it must divide). Mixture data: every process draws the same global batch and takes its slice, so
the processes together see what one process would; tensor data: each process shuffles its own
disjoint shard (``fastgan.distributed.shard``). Every process draws its own noise. Rank 0 alone
writes the run folder; a run can be resumed at any number of processes (also one).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

KEEP_CHECKPOINTS = 2          # checkpoint-<step>.pt files kept in a run folder
DEFAULT_MAX_SKIPPED_STEPS = 100
EXIT_NONFINITE = 3            # exit status when training stopped on non-finite steps

LOSSES = ("minimax", "nonsaturating", "hinge", "wasserstein", "least_squares")
PRECISIONS = ("fp32", "bf16", "fp16")

# Settings that suit each embedded dataset; anything given on the command line wins. The digits
# preset is tuned so that the default `fastgan train` finishes in well under two minutes on a
# 2-core CPU and draws recognisable digits (see docs/digits_samples.png); the ring8 preset captures
# all 8 modes (96% high-quality samples, seed 0), the grid25 preset 22 of 25 (31% high-quality).
PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(model="dcgan", steps=3000, batch_size=64, lr=5e-4, latent_dim=32, width=64, ema_beta=0.99),
    "ring8": dict(model="mlp", steps=4000, batch_size=256, lr=1e-3, latent_dim=2, width=256, ema_beta=None),
    "grid25": dict(model="mlp", steps=4000, batch_size=256, lr=1e-3, latent_dim=8, width=256, ema_beta=None),
    "user": dict(model=None, steps=2000, batch_size=64, lr=2e-4, latent_dim=64, width=None, ema_beta=None),
}

# Options fixed when a run starts; --resume takes them from the run's config.json. The others
# (steps, device, logging, checkpoints, progress) may be given again when resuming.
RUN_OPTIONS = ("data", "model", "batch_size", "loss", "d_steps", "lr", "g_lr", "d_lr", "beta1", "beta2",
               "ema_beta", "pack", "precision", "seed", "latent_dim", "width", "prior", "image_size")
# Of those, the learning rates may be given anew with --resume (lowering them is how a run that stopped
# on non-finite steps is continued): they are set on the restored optimizers.
RESUME_OVERRIDES = ("lr", "g_lr", "d_lr")
SESSION_OPTIONS = ("steps", "device", "log_every", "checkpoint_every", "progress", "eval_samples",
                   "max_skipped_steps")

NUM_PICTURE_SAMPLES = 100  # a 10 x 10 grid


class UsageError(Exception):
    """A problem with the command line, the data or the run folder: reported as one clear message."""


# ------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------

def _cmd_info(args: argparse.Namespace) -> int:
    from fastgan.info import info
    print(info())
    return 0


# ------------------------------------------------------------------------------------------------
# train: option resolution
# ------------------------------------------------------------------------------------------------

def _checked(text: str, convert, ok, expected: str):
    """``convert(text)`` for argparse, or an ArgumentTypeError saying what was ``expected``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _checked(text, int, lambda v: v >= 1, "a positive integer")


def _positive_float(text: str) -> float:
    return _checked(text, float, lambda v: math.isfinite(v) and v > 0, "a positive number")


def _unit_float(text: str) -> float:
    return _checked(text, float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def _seed(text: str) -> int:
    return _checked(text, int, lambda v: -2 ** 63 <= v < 2 ** 64, "an integer in [-2**63, 2**64) (torch's seed range)")


def _eval_count(text: str) -> int:
    return _checked(text, int, lambda v: v >= 2, "a number of samples >= 2")


def _max_skipped(text: str) -> int:
    """--max-skipped-steps: a count >= 1, or 0 / none / off (no watching, training never stops)."""
    if text.lower() in ("none", "off"):
        return 0
    return _checked(text, int, lambda v: v >= 0, "a number of steps >= 0 or 'none'")


def _ema(text: str) -> float | None:
    if text.lower() in ("none", "off", "0"):
        return None
    return _unit_float(text)


def best_device() -> str:
    """CUDA when present, else Apple's MPS, else the CPU."""
    import torch
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _check_device(name: str) -> str:
    import torch
    if name == "auto":
        return best_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device: {name!r} is not a device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    return name


def _data_key(spec: str) -> str:
    return spec if spec in ("digits", "ring8", "grid25") else "user"


def _run_name(spec: str) -> str:
    if spec in ("digits", "ring8", "grid25"):
        return spec
    stem = Path(spec.rstrip("/\\")).stem or "data"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)


def _default_out(spec: str) -> Path:
    """``runs/<data>-<timestamp>``, with a counter when that folder already exists; claimed (see
    :func:`_claim_run_folder`), so runs started at the same second get folders of their own."""
    base = Path("runs") / f"{_run_name(spec)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 2
    while True:
        try:
            out.mkdir(parents=True)  # atomic: of two processes asking for one name, one gets it
        except FileExistsError:
            out, n = Path(f"{base}-{n}"), n + 1
            continue
        _claim_run_folder(out, created=True)
        return out


# The run folder this process claimed and nothing has been written to yet: (folder, whether it was created
# here). Released (placeholder removed, a created folder too) when setting up the run fails.
_CLAIMED: list[tuple[Path, bool]] = []


def _claim_run_folder(out: Path, created: bool) -> None:
    """Make ``out`` this run's before anything else is written: config.json is created exclusively (an
    empty placeholder until the run's options are written into it), so two runs started on one empty
    folder at once cannot both take it."""
    try:
        fd = os.open(out / "config.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        raise UsageError(f"--out {out} already exists and is not empty (another run started in it); choose a "
                         "new folder, or add --resume to continue the run in it") from None
    os.close(fd)
    _CLAIMED.append((out, created))


def _release_claimed_folder() -> None:
    """Undo :func:`_claim_run_folder` after a failed set-up: no empty run folder is left behind."""
    while _CLAIMED:
        out, created = _CLAIMED.pop()
        placeholder = out / "config.json"
        try:
            if placeholder.stat().st_size == 0:
                placeholder.unlink()
            if created:
                out.rmdir()  # only if empty
        except OSError:
            pass


def resolve_options(args: argparse.Namespace, data) -> dict[str, Any]:
    """Every option of the run, with the dataset's preset filling what the command line left open."""
    from fastgan.models import default_model
    preset = PRESETS[_data_key(args.data)]
    given = {name: getattr(args, name) for name in RUN_OPTIONS + SESSION_OPTIONS}
    config: dict[str, Any] = {}
    config["data"] = args.data
    config["model"] = given["model"] or preset["model"] or default_model(data.kind, data.sample_shape)
    for name in ("steps", "batch_size", "lr", "latent_dim", "width"):
        config[name] = given[name] if given[name] is not None else preset[name]
    config["ema_beta"] = given["ema_beta"] if args.ema_beta_given else preset["ema_beta"]
    defaults = dict(loss="nonsaturating", d_steps=1, g_lr=None, d_lr=None, beta1=0.5, beta2=0.999, pack=1,
                    precision="fp32", seed=0, prior="normal", image_size=32, log_every=None,
                    checkpoint_every=None, device="auto", progress=True, eval_samples=None,
                    max_skipped_steps=DEFAULT_MAX_SKIPPED_STEPS)
    for name, default in defaults.items():
        config[name] = given[name] if given[name] is not None else default
    config["log_every"] = config["log_every"] or max(1, min(50, config["steps"] // 50 or 1))
    config["checkpoint_every"] = config["checkpoint_every"] or max(1, config["steps"] // 4)
    if data.mixture is not None:
        config["eval_samples"] = config["eval_samples"] or 2500
    elif data.name == "digits":
        config["eval_samples"] = config["eval_samples"] or int(data.num_samples)
    else:
        config["eval_samples"] = config["eval_samples"] or NUM_PICTURE_SAMPLES
    if config["batch_size"] % config["pack"]:
        raise UsageError(f"--batch-size {config['batch_size']} must be divisible by --pack {config['pack']}")
    if data.num_samples is not None and data.num_samples < config["batch_size"]:
        raise UsageError(f"--batch-size {config['batch_size']} is larger than the {data.num_samples} samples in "
                         f"{args.data}")
    if config["model"] == "dcgan" and not (data.kind == "images" and data.sample_shape[1] == data.sample_shape[2]):
        raise UsageError(f"--model dcgan needs square images, but {args.data} holds samples of shape "
                         f"{data.sample_shape}; use --model mlp")
    config["sample_shape"] = list(data.sample_shape)
    return config


# ------------------------------------------------------------------------------------------------
# train: building, running, reporting
# ------------------------------------------------------------------------------------------------

def _build(config: dict[str, Any], data):
    from fastgan.models import build_models
    low, high = data.value_range
    bounded = low >= -1.0 - 1e-6 and high <= 1.0 + 1e-6  # tanh output only when the data fits it
    import torch
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["seed"])  # the same --seed gives the same initial weights
            return build_models(config["model"], tuple(config["sample_shape"]), latent_dim=config["latent_dim"],
                                pack=config["pack"], bounded=bounded, width=config["width"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _trainer_kwargs(config: dict[str, Any], device: str) -> dict[str, Any]:
    return dict(latent_dim=config["latent_dim"], prior=config["prior"], loss=config["loss"],
                d_steps=config["d_steps"], lr=config["lr"], betas=(config["beta1"], config["beta2"]),
                g_lr=config["g_lr"], d_lr=config["d_lr"], ema_beta=config["ema_beta"], pack=config["pack"],
                precision=config["precision"], device=device, seed=config["seed"])


def _read_history(path: Path) -> dict[str, list[float]]:
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    history: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            history.setdefault(key, []).append(float(value) if value not in ("", None) else math.nan)
    return history


def _write_history(path: Path, history: dict[str, list[float]]) -> None:
    """history.csv, replaced atomically: a crash while writing leaves the previous complete file."""
    from fastgan._checkpoint import atomic_write
    keys = ["step"] + [k for k in history if k != "step"]
    rows = len(history.get("step", []))
    lines = io.StringIO(newline="")
    writer = csv.writer(lines)
    writer.writerow(keys)
    for i in range(rows):
        writer.writerow([_csv_number(history[k][i]) if i < len(history[k]) else "" for k in keys])
    atomic_write(path, lambda f: f.write(lines.getvalue().encode()))


def _csv_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def _merge_history(old: dict[str, list[float]], new: dict[str, list[float]]) -> dict[str, list[float]]:
    """Append ``new`` rows to ``old`` (keys of either; missing values become NaN). Rows of ``old`` from the
    first new step on are dropped: a resumed session redid those steps."""
    if new.get("step") and old.get("step"):
        keep = sum(1 for step in old["step"] if step < new["step"][0])
        old = {key: values[:keep] for key, values in old.items()}
    n_old, n_new = len(old.get("step", [])), len(new.get("step", []))
    merged: dict[str, list[float]] = {}
    for key in list(old) + [k for k in new if k not in old]:
        merged[key] = list(old.get(key, [math.nan] * n_old)) + list(new.get(key, [math.nan] * n_new))
    return merged


def _write_history_so_far(out: Path, done: int, history: dict[str, list[float]] | None,
                          upto: int | None = None) -> None:
    """history.csv after a session that stopped early: the earlier sessions' rows (when resumed) and this
    one's, without rows of steps after ``upto`` (None: keep all)."""
    if not history or not history.get("step"):
        return
    if upto is not None:
        keep = sum(1 for step in history["step"] if step <= upto)
        history = {key: values[:keep] for key, values in history.items()}
        if not keep:
            return
    merged = _merge_history(_read_history(out / "history.csv"), history) if done else history
    _write_history(out / "history.csv", merged)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def evaluate(trainer, data, config: dict[str, Any]) -> dict[str, Any]:
    """Metrics of the trained generator on ``eval_samples`` samples (EMA weights when kept)."""
    import torch
    from fastgan.metrics import digits_metrics, mode_metrics
    use_ema = config["ema_beta"] is not None
    samples = _sample(trainer, config["eval_samples"], use_ema)
    if data.mixture is not None:
        return {"modes": mode_metrics(samples, data.mixture.modes, data.mixture.std).as_dict()}
    if data.name == "digits":
        return {"digits": digits_metrics(samples).as_dict()}
    flat = samples.reshape(samples.shape[0], -1)
    real = data.train.reshape(data.train.shape[0], -1)
    return {"sample_stats": {"generated_mean": float(flat.mean()), "generated_std": float(flat.std()),
                             "real_mean": float(real.mean()), "real_std": float(real.std()),
                             "nonfinite_samples": int((~torch.isfinite(flat).all(1)).sum())}}


def _sample(trainer, n: int, ema: bool):
    """``n`` samples on the CPU, drawn in chunks (Trainer.sample runs G in eval mode, without grad)."""
    import torch
    return torch.cat([trainer.sample(min(1024, n - i), ema=ema).float().cpu() for i in range(0, n, 1024)])


def _fixed_noise(trainer, n: int, seed: int):
    """The same latent vectors for every picture of a run (so pictures of a resumed run compare)."""
    import torch
    gen = torch.Generator().manual_seed(seed + 12345)
    if trainer.prior == "normal":
        z = torch.randn((n, *trainer.latent_dim), generator=gen)
    else:
        z = torch.rand((n, *trainer.latent_dim), generator=gen) * 2 - 1
    return z.to(trainer.device, trainer.param_dtype)


def _draw_pictures(trainer, data, config: dict[str, Any], out: Path, history: dict[str, list[float]]) -> None:
    from fastgan.plots import save_samples, save_training
    step = int(history["step"][-1]) if history.get("step") else 0
    title = f"{data.name} · {config['model']} · {config['loss']} · step {step}"
    use_ema = config["ema_beta"] is not None
    if data.mixture is not None:
        samples = _sample(trainer, 2500, use_ema)
        save_samples(out / "samples.png", samples, modes=data.mixture.modes, std=data.mixture.std, title=title)
    elif data.kind == "images":
        z = _fixed_noise(trainer, NUM_PICTURE_SAMPLES, config["seed"])
        samples = trainer.sample(NUM_PICTURE_SAMPLES, z=z, ema=use_ema).float().cpu()
        save_samples(out / "samples.png", samples, title=title, dark_on_light=data.name == "digits")
    else:
        samples = _sample(trainer, 1000, use_ema)
        save_samples(out / "samples.png", samples, real=data.train[:1000], title=title)
    save_training(out / "training.png", history, title=title)


def _format_metrics(metrics: dict[str, Any]) -> list[str]:
    lines = []
    if "digits" in metrics:
        m = metrics["digits"]
        lines.append(f"classes covered {m['classes_covered']}/10 · KL from uniform {_fmt(m['kl_from_uniform'])} · "
                     f"mean confidence {_fmt(m['mean_confidence'])}")
        lines.append(f"Fréchet distance {_fmt(m['frechet_distance'])} (real-vs-real floor {_fmt(m['frechet_floor'])})"
                     f" on {m['num_samples']} samples")
    if "modes" in metrics:
        m = metrics["modes"]
        lines.append(f"modes captured {m['modes_captured']}/{m['num_modes']} · high-quality samples "
                     f"{m['high_quality_percent']:.1f}% · KL from uniform {_fmt(m['kl_from_uniform'])} "
                     f"on {m['num_samples']} samples")
    if "sample_stats" in metrics:
        m = metrics["sample_stats"]
        lines.append(f"generated mean/std {_fmt(m['generated_mean'])}/{_fmt(m['generated_std'])} vs real "
                     f"{_fmt(m['real_mean'])}/{_fmt(m['real_std'])}")
    final = metrics.get("final_stats") or {}
    if final:
        lines.append("last logged: " + " · ".join(f"{k} {_fmt(final[k])}" for k in
                                                   ("d_loss", "g_loss", "value", "jsd", "d_real", "d_fake")
                                                   if k in final))
    return lines


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _prepare_out(args: argparse.Namespace) -> tuple[Path, dict[str, Any] | None]:
    """The run folder, and the saved config when resuming. Refuses to write into another run."""
    if args.resume:
        if args.out is None:
            raise UsageError("--resume needs --out DIR, the run folder to continue")
        out = Path(args.out)
        if not out.is_dir():
            raise UsageError(f"--resume: no run folder at {out}")
        config_path = out / "config.json"
        if not config_path.is_file():
            raise UsageError(f"--resume: {out} is not a resumable run (it needs the config.json of the run, and "
                             "a checkpoint, checkpoint-<step>.pt or checkpoint.pt, to continue from)")
        try:
            saved = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--resume: cannot read {config_path}: {exc}") from None
        _check_saved_options(saved, config_path)
        return out, saved
    if args.out is None:
        return _default_out(args.data or "digits"), None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} already exists and is not empty; choose a new folder, or add --resume "
                         "to continue the run in it")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the folder: {exc}") from None
    _claim_run_folder(out, created)
    return out, None


def _check_saved_options(saved: Any, path: Path) -> None:
    """config.json (which a person may have edited) must hold options the command line would accept: each
    value passes its option's own check."""
    if not isinstance(saved, dict):
        raise UsageError(f"--resume: {path} does not hold the run's options (a JSON object); it was changed, "
                         "or is not a fastgan run's")
    sub = argparse.ArgumentParser().add_subparsers()
    _add_train(sub)
    for action in sub.choices["train"]._actions:
        value = saved.get(action.dest)
        if value is None or action.dest in ("data", "out", "resume"):
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        try:
            if action.choices is not None and value not in action.choices:
                raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, action.choices))}")
            if callable(action.type) and (isinstance(value, bool) or action.type(str(value)) != value):
                raise argparse.ArgumentTypeError(f"expected what {flag} accepts")
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise UsageError(f"--resume: {path} records {action.dest} = {value!r}: {exc}") from None


def _set_learning_rates(trainer, config: dict[str, Any]) -> None:
    """--resume with --lr / --g-lr / --d-lr: the restored optimizers continue at the new rates."""
    for opt, value in ((trainer.g_optimizer, config["g_lr"] or config["lr"]),
                       (trainer.d_optimizer, config["d_lr"] or config["lr"])):
        for group in opt.param_groups:
            group["lr"] = value


def _check_checkpoint_matches(config: dict[str, Any], recorded: dict[str, Any], path) -> None:
    """The options config.json gives must be those the checkpoint was trained with (config.json may have
    been edited, or copied from another run): refuse rather than train on with one and report the other."""
    expected = _trainer_kwargs(config, "cpu")
    for key in ("loss", "d_steps", "prior", "pack", "precision", "ema_beta", "seed", "latent_dim"):
        if key not in recorded:
            continue
        want, got = expected[key], recorded[key]
        if key == "latent_dim":
            want, got = (tuple(want) if isinstance(want, (list, tuple)) else (want,)), tuple(got)
        if want != got:
            raise UsageError(f"--resume: config.json gives {key} = {want!r}, but {path} was trained with "
                             f"{key} = {got!r}; config.json was changed or belongs to another run")


def _apply_saved(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    """On --resume: take the run's options from its config.json; refuse conflicting ones."""
    args.lr_overridden = False
    if args.lr is not None and args.g_lr is None and args.d_lr is None:
        # --lr alone sets both networks' rates, also where the run was started with --g-lr / --d-lr
        args.g_lr = args.d_lr = None
        args.lr_overridden = bool(saved.get("g_lr") or saved.get("d_lr"))
        saved = {k: v for k, v in saved.items() if k not in ("g_lr", "d_lr")}
    for name in RUN_OPTIONS:
        given = getattr(args, name)
        explicitly = args.ema_beta_given if name == "ema_beta" else given is not None
        if explicitly and name in RESUME_OVERRIDES:
            args.lr_overridden = args.lr_overridden or given != saved.get(name)
            continue
        if explicitly and name in saved and given != saved[name]:
            raise UsageError(f"--resume: the run was started with --{name.replace('_', '-')} {saved[name]!r}; "
                             f"it cannot change to {given!r} (start a new run instead)")
        if name in saved:
            setattr(args, name, saved[name])
    args.ema_beta_given = True
    if args.steps is None:
        args.steps = saved.get("steps")
    for name in ("log_every", "checkpoint_every", "eval_samples", "max_skipped_steps"):
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name))


def _cmd_train(args: argparse.Namespace) -> int:
    from fastgan import distributed as fdist
    try:
        code = _train(args)
    except UsageError as exc:
        _release_claimed_folder()
        print(f"fastgan train: error: {exc}", file=sys.stderr)
        code = 2
    except BaseException:
        _release_claimed_folder()
        fdist.destroy()
        raise
    worker = fdist.is_initialized()
    fdist.destroy()
    if worker:
        _leave_worker(code)
    return code


def _leave_worker(code: int) -> None:
    """End a torchrun worker whose files are written and whose process group is destroyed, skipping the
    interpreter's finalisation: gloo's worker threads can still be torn down there and abort the process
    (SIGABRT, "terminate called without an active exception": pytorch#190489), which made a complete run
    exit with a failure (seen in CI with the same DDP set-up)."""
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _start_processes(args: argparse.Namespace):
    """Under torchrun (``WORLD_SIZE`` set): the process group (gloo on CPU, NCCL on CUDA with each
    process on cuda:LOCAL_RANK) and the device; else (None, None)."""
    if "WORLD_SIZE" not in os.environ:
        return None, None
    import torch
    from fastgan import distributed as fdist
    device = torch.device(_check_device(args.device or "auto"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {device.index}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise UsageError(f"multi-process training runs on the CPU (gloo) or CUDA (NCCL), not on {device.type}")
    try:
        info = fdist.init_from_env(device=device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"cannot start torch.distributed from the environment (WORLD_SIZE="
                         f"{os.environ.get('WORLD_SIZE')}): {exc}") from None
    return info, str(device)


def _shared_run_folder(args: argparse.Namespace, info):
    """``_prepare_out`` decided on rank 0 (one folder name, checked before anyone writes) and
    shared with every rank; a usage error there is raised on every rank."""
    if info is None:
        return _prepare_out(args)
    import torch.distributed as dist
    decided: list[Any] = [None, None, None]
    if info.rank == 0:
        try:
            out, saved = _prepare_out(args)
            decided = [str(out), saved, None]
        except UsageError as exc:
            decided = [None, None, str(exc)]
    dist.broadcast_object_list(decided, src=0)
    if decided[2] is not None:
        raise UsageError(decided[2])
    return Path(decided[0]), decided[1]


def _load_resume_state(out: Path, say: bool):
    """The newest good checkpoint of ``out``: (state, path); each bad newer one is named on stderr."""
    from fastgan.checkpoint import CheckpointError, load_latest_good

    def report(error: CheckpointError) -> None:
        if say:
            print(f"fastgan train: skipping checkpoint {error.path}: {error.reason}", file=sys.stderr)
    try:
        state, path = load_latest_good(out, report=report)
    except (CheckpointError, FileNotFoundError) as exc:
        raise UsageError(f"--resume: {exc}") from None
    return state, path


def _train(args: argparse.Namespace) -> int:
    from fastgan.data import DataError, load_data
    from fastgan import distributed as fdist

    info, dist_device = _start_processes(args)
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    main_process = rank == 0
    out, saved = _shared_run_folder(args, info)
    if saved is not None:
        _apply_saved(args, saved)
    args.data = args.data or "digits"
    try:
        data = load_data(args.data, image_size=args.image_size if args.image_size is not None else 32)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    config = resolve_options(args, data)
    config["device"] = device = dist_device or _check_device(config["device"])
    if config["batch_size"] % world:
        raise UsageError(f"--batch-size {config['batch_size']} (the global batch) must be divisible by the "
                         f"{world} processes")
    per_process_batch = config["batch_size"] // world
    if per_process_batch % config["pack"]:
        raise UsageError(f"the per-process batch {per_process_batch} (--batch-size {config['batch_size']} / "
                         f"{world} processes) must be divisible by --pack {config['pack']}")
    if data.train is not None and world > 1 and data.num_samples // world < per_process_batch:
        raise UsageError(f"each of the {world} processes holds about {data.num_samples // world} of the "
                         f"{data.num_samples} samples, fewer than its batch of {per_process_batch}")

    import torch
    import fastgan
    from fastgan.checkpoint import list_checkpoints
    G, D = _build(config, data)
    resumed_from = None
    try:
        if saved is not None and not list_checkpoints(out):
            # A run stopped before its first checkpoint: it starts again from step 0 with its options.
            if main_process:
                print(f"fastgan train: --resume: {out} has no checkpoint yet; starting its run from step 0",
                      file=sys.stderr)
            trainer = fastgan.Trainer(G, D, **_trainer_kwargs(config, device))
        elif saved is not None:
            state, resumed_from = _load_resume_state(out, say=main_process)
            if isinstance(state, dict) and isinstance(state.get("config"), dict):
                _check_checkpoint_matches(config, state["config"], resumed_from)
            trainer = fastgan.Trainer.from_state_dict(state, G, D, device=device)
            del state
            if getattr(args, "lr_overridden", False):
                _set_learning_rates(trainer, config)
        else:
            trainer = fastgan.Trainer(G, D, **_trainer_kwargs(config, device))
    except (ValueError, TypeError, RuntimeError) as exc:
        where = f" from {resumed_from}" if resumed_from is not None else ""
        raise UsageError(f"cannot set up training{where}: {exc}") from None
    # Same start on every rank (rank 0's state), gradients averaged before each optimizer step,
    # each rank its own noise. Every rank has loaded the checkpoint when this returns.
    fdist.data_parallel(trainer)

    done = trainer.step_count
    remaining = config["steps"] - done
    # A run that trained all its steps but stopped before its evaluation (interrupted at the last step)
    # gets the evaluation written now; one that has it is done.
    report_only = saved is not None and remaining <= 0 and not (out / "metrics.json").is_file()
    if saved is not None and remaining <= 0 and not report_only:
        raise UsageError(f"--resume: the run in {out} has already done {done} of {config['steps']} steps; "
                         f"pass --steps N with N > {done} to train further")

    # Everything is validated: from here on the run folder is written (by rank 0 alone).
    config["out"] = str(out)
    config["resolved_at"] = datetime.now().isoformat(timespec="seconds")
    config["fastgan_version"] = fastgan.__version__
    config["torch_version"] = torch.__version__
    config["data_description"] = data.describe()
    config["world_size"] = world
    config["per_process_batch_size"] = per_process_batch
    if report_only:
        trainer._average_buffers_across_ranks()
        if main_process:
            print(f"fastgan train: --resume: {out} has trained all {done} steps but has no metrics.json; "
                  "writing its evaluation", file=sys.stderr)
            _report(trainer, data, config, out, _read_history(out / "history.csv"), 0, 0.0)
        fdist.barrier()
        return 0
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", config)
        _CLAIMED.clear()  # the run's own now: kept whatever happens next
        print(f"fastgan train: {data.describe()}")
        print(f"  model {config['model']} (G {sum(p.numel() for p in G.parameters()):,} / D "
              f"{sum(p.numel() for p in D.parameters()):,} parameters), loss {config['loss']}, "
              f"batch {config['batch_size']}, lr {config['lr']}, device {device}")
        if world > 1:
            print(f"  world size {world}: data-parallel over {world} processes (torch.distributed, "
                  f"{info.backend}), {per_process_batch} samples per process and step")
        else:
            print("  world size 1 (one process)")
        if resumed_from is not None:
            print(f"  resuming from {resumed_from}")
        print(f"  {'resuming at step ' + str(done) + ', ' if done else ''}{remaining} steps -> {out}", flush=True)

    # Mixture batches are indexed by how many real (global) batches were used, so a resumed run
    # continues the stream at any world size; each rank takes its slice of every global batch.
    # Tensor data: each rank its shard, resumed through the trainer's data cursor where it matches.
    if data.mixture is not None:
        batches = fdist.RankSlices(data.batches(config["batch_size"], seed=config["seed"],
                                                start=trainer.d_step_count), rank, world)
    else:
        batches = fdist.shard(data.batches(per_process_batch), rank, world)
    started = time.perf_counter()
    from fastgan.checkpoint import (NonFiniteTrainingError, StopOnSignal, TrainingInterrupted, checkpoint_step,
                                    list_checkpoints)

    def save_on_signal(tr, step):  # runs between two steps, never inside an update; on every rank
        return tr.save_checkpoint(out, keep=KEEP_CHECKPOINTS)
    max_skipped = config["max_skipped_steps"] or None

    def history_at_checkpoint(tr, step, history_so_far):
        # history.csv as of each checkpoint, written just before it: a run killed (SIGKILL, OOM, power)
        # keeps the rows up to its last checkpoint, where --resume continues (rows of a checkpoint the
        # kill prevented are logged again, and the merge keeps one of each).
        if main_process:
            _write_history_so_far(out, done, history_so_far, upto=step)
    try:
        with StopOnSignal(save_on_signal) as stop:
            history = trainer.fit(batches, remaining, batch_size=per_process_batch, log_every=config["log_every"],
                                  checkpoint_every=config["checkpoint_every"], out_dir=out,
                                  keep_checkpoints=KEEP_CHECKPOINTS, max_nonfinite_steps=max_skipped,
                                  progress=config["progress"] and main_process, callbacks=[stop],
                                  on_checkpoint=history_at_checkpoint)
    except TrainingInterrupted as exc:
        if main_process:
            _write_history_so_far(out, done, getattr(exc, "history", None), upto=exc.step)
            print(f"\nfastgan train: interrupted after step {exc.step}; checkpoint written to {exc.path}; "
                  f"continue with: fastgan train --resume --out {out}", file=sys.stderr)
        return 130
    except KeyboardInterrupt as exc:
        # Not saved here: the interrupt may have landed inside an update. The periodic checkpoint is intact.
        if main_process:
            kept = list_checkpoints(out)
            # Rows past the last checkpoint are dropped: a resume redoes those steps and logs them again.
            last_step = checkpoint_step(kept[0]) if kept else None
            _write_history_so_far(out, done, getattr(exc, "history", None), upto=last_step if kept else done)
            hint = (f"the last checkpoint is {kept[0]}; continue with: fastgan train --resume --out {out}"
                    if kept else "no checkpoint was written yet")
            print(f"\nfastgan train: interrupted at step {trainer.step_count}; {hint}", file=sys.stderr)
        return 130
    except NonFiniteTrainingError as exc:
        if main_process:
            _write_history_so_far(out, done, exc.history)
            kept = list_checkpoints(out)
            last = (f"the last good checkpoint is {kept[0]}; after fixing the cause continue with: "
                    f"fastgan train --resume --out {out} (with --lr ... to lower the learning rate)"
                    if kept else "no checkpoint was written before it")
            print(f"\nfastgan train: error: {exc}\n  {last}\n  (--max-skipped-steps {config['max_skipped_steps']}"
                  f" sets how many skipped steps in a row stop a run; 'none' never stops)", file=sys.stderr)
        return EXIT_NONFINITE
    except Exception as exc:
        # Any other failure (disk full at a checkpoint, out of memory): keep the rows up to the last
        # checkpoint (what a resume continues from), then let the error through.
        if main_process:
            kept = list_checkpoints(out)
            _write_history_so_far(out, done, getattr(exc, "history", None),
                                  upto=checkpoint_step(kept[0]) if kept else done)
        raise
    elapsed = time.perf_counter() - started
    trainer._average_buffers_across_ranks()  # BatchNorm running statistics of all ranks for the evaluation

    if main_process:
        history = _merge_history(_read_history(out / "history.csv"), history) if done else history
        _write_history(out / "history.csv", history)
        _report(trainer, data, config, out, history, remaining, elapsed)
    fdist.barrier()  # the other ranks wait until rank 0 has written everything
    return 0


def _report(trainer, data, config: dict[str, Any], out: Path, history: dict[str, list[float]],
            remaining: int, elapsed: float) -> None:
    """Rank 0 after training: metrics.json, the pictures, and the summary on stdout."""
    print("fastgan train: evaluating ...", flush=True)
    metrics: dict[str, Any] = {"data": data.name, "model": config["model"], "steps": trainer.step_count,
                               "world_size": config["world_size"],
                               "train_seconds_this_session": elapsed,
                               "steps_per_second_this_session": remaining / max(elapsed, 1e-9)}
    metrics.update(evaluate(trainer, data, config))
    metrics["final_stats"] = {k: v[-1] for k, v in history.items() if k not in ("step",) and v}
    skipped = {k: int(sum(v for v in history.get(f"{k}_skipped", []) if math.isfinite(v))) for k in ("d", "g")}
    metrics["skipped_steps"] = {"discriminator": skipped["d"], "generator": skipped["g"]}
    _write_json(out / "metrics.json", metrics)
    _draw_pictures(trainer, data, config, out, history)

    print(f"\nfastgan train: done, {trainer.step_count} steps ({remaining} in {elapsed:.1f} s, "
          f"{remaining / max(elapsed, 1e-9):.1f} steps/s)")
    for line in _format_metrics(metrics):
        print(f"  {line}")
    if skipped["d"] or skipped["g"]:
        print(f"  skipped for non-finite values: {skipped['d']} D / {skipped['g']} G updates (history.csv)")
    print(f"  files in {out}/:")
    for name, what in (("samples.png", "generated samples"), ("training.png", "losses, V(G, D), JSD, D outputs"),
                       ("metrics.json", "the metrics above"), ("history.csv", "logged statistics per step"),
                       ("config.json", "every resolved option"),
                       ("checkpoint-<step>.pt", f"the newest {KEEP_CHECKPOINTS} checkpoints, each with a "
                                                ".sha256 digest (--resume)")):
        print(f"    {name:<20} {what}")


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------

def _benchmarks_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks"


def _load_bench_common():
    """``benchmarks/common.py`` of the source checkout (one definition of problems and contenders)."""
    import importlib.util
    path = _benchmarks_dir() / "common.py"
    if not path.is_file():
        raise UsageError(f"fastgan bench runs the repository's benchmark definitions, but {path} is missing "
                         "(install fastgan from a source checkout: pip install -e .)")
    spec = importlib.util.spec_from_file_location("fastgan_bench_common", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        return _bench(args)
    except UsageError as exc:
        print(f"fastgan bench: error: {exc}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    import torch
    device = torch.device(_check_device(args.device))
    common = _load_bench_common()
    problems = common.problems(device)
    names = [p.name for p in problems]
    if args.problem:
        unknown = [p for p in args.problem if not any(n.startswith(p) for n in names)]
        if unknown:
            raise UsageError(f"--problem {', '.join(unknown)}: unknown; choose from {', '.join(names)}")
        problems = [p for p in problems if any(p.name.startswith(q) for q in args.problem)]
    contenders = [c for c in common.CONTENDERS if not (args.no_compile and c == "compile")]
    print(f"fastgan bench: quick whole-step timings on {device} (median of {args.steps} steps after "
          f"{args.warmup} warm-up; contenders checked to compute the same losses first)\n")
    header = f"{'problem':<18} {'contender':<10} {'ms/step':>10} {'fastgan speed-up':>17}"
    print(header)
    print("-" * len(header))
    for problem in problems:
        inputs = common.InputSets(problem, device)
        initial = problem.models(seed=0)
        built, losses = {}, {}
        for name in contenders:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                contender = common.make_contender(name, problem, device, initial)
                losses[name] = [tuple(float(v) for v in contender.step(*inputs[i])) for i in range(3)]
            built[name] = contender
        rtol, atol = common.default_tolerance(device)
        common.check_equivalent(losses, reference="naive", rtol=rtol, atol=atol)
        times = {}
        for name, contender in built.items():
            for _ in range(args.warmup):
                contender.step(*inputs.next())
            common.synchronize(device)
            times[name] = common.median_step_time(contender, inputs, args.steps)
        ours = times.get("fastgan")
        for name, seconds in times.items():
            ratio = "" if ours is None or name == "fastgan" else f"{seconds / ours:.2f}x"
            print(f"{problem.name:<18} {name:<10} {seconds * 1e3:>10.3f} {ratio:>17}", flush=True)
        print()
    print("Speed-up = contender's step time / fastgan's (above 1: fastgan is faster). Quick mode: few steps, "
          "no statistics.\nFull suites (pytest-benchmark, with memory and compile time):\n"
          f"  python -m pytest {_benchmarks_dir()}/bench_step.py --benchmark-enable\n"
          f"  python -m pytest {_benchmarks_dir()} --benchmark-enable")
    return 0


# ------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------

class _EmaAction(argparse.Action):
    """Records that --ema-beta was given (its value may legitimately be None: 'none')."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.ema_beta_given = True


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a GAN on ring8 / grid25 / digits or your data; pictures, metrics, checkpoints",
        description="Train a GAN with fastgan.Trainer. With no arguments: the 8x8 digits, a DCGAN-style model, "
                    "the best device. Options left out take the dataset's preset; config.json records them all.")
    p.add_argument("--data",
                   help="ring8 | grid25 | digits | a .npy/.pt tensor file | a folder of images (default: digits)")
    p.add_argument("--model", choices=("mlp", "dcgan"), help="network pair (default: suits the data)")
    p.add_argument("--steps", type=_positive_int, help="total generator updates of the run")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--loss", choices=LOSSES, help="default: nonsaturating")
    p.add_argument("--d-steps", type=_positive_int, help="discriminator updates per generator update (k)")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate of both networks")
    p.add_argument("--g-lr", type=_positive_float, help="generator learning rate (overrides --lr)")
    p.add_argument("--d-lr", type=_positive_float, help="discriminator learning rate (overrides --lr)")
    p.add_argument("--beta1", type=_unit_float, help="Adam beta1 (default 0.5)")
    p.add_argument("--beta2", type=_unit_float, help="Adam beta2 (default 0.999)")
    p.add_argument("--ema-beta", type=_ema, action=_EmaAction, help="EMA of G's weights, e.g. 0.999, or 'none'")
    p.add_argument("--pack", type=_positive_int, help="PacGAN degree: D judges this many samples at once")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (default: auto, the best present)")
    p.add_argument("--seed", type=_seed)
    p.add_argument("--latent-dim", type=_positive_int)
    p.add_argument("--width", type=_positive_int, help="hidden units (mlp) or base channels (dcgan)")
    p.add_argument("--prior", choices=("normal", "uniform"))
    p.add_argument("--image-size", type=_positive_int, help="side images of a folder are resized to (default 32)")
    p.add_argument("--out", help="run folder (default runs/<data>-<timestamp>/); must be new or empty")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest good checkpoint (a corrupted newer one is "
                        "named and skipped); any number of processes")
    p.add_argument("--log-every", type=_positive_int, help="log statistics every N steps")
    p.add_argument("--checkpoint-every", type=_positive_int,
                   help="write checkpoint-<step>.pt (with a .sha256 digest) every N steps; the newest "
                        f"{KEEP_CHECKPOINTS} are kept")
    p.add_argument("--max-skipped-steps", type=_max_skipped,
                   help="stop with an error (exit status 3) after N consecutive updates of D or of G skipped for "
                        f"non-finite losses or gradients; 0 or 'none': never (default {DEFAULT_MAX_SKIPPED_STEPS})")
    p.add_argument("--eval-samples", type=_eval_count,
                   help="samples scored for metrics.json (default: 2500 for mixtures, the training split's size "
                        "for digits)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                   help="no progress bar")
    p.set_defaults(func=_cmd_train, ema_beta_given=False, ema_beta=None)


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="quick whole-step timings: naive eager, tuned eager, torch.compile, fastgan",
        description="Runs the step benchmark of benchmarks/bench_step.py in a quick mode on this device and "
                    "prints step times and fastgan's speed-up over each contender.")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--problem", action="append",
                   help="only this problem (prefix of mlp-b64, mlp-b512, dcgan..., toy2d...); repeatable")
    p.add_argument("--steps", type=_positive_int, default=20, help="timed steps per contender (default 20)")
    p.add_argument("--warmup", type=_positive_int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender (slow to compile)")
    p.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgan", description="Fast GAN training for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, devices, the extension and which kernels run")
    p_info.set_defaults(func=_cmd_info)
    _add_train(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
