"""fastgan.distributed on CPU with gloo, 2 processes started by torchrun: 2 ranks x batch m give the
parameters of 1 process x batch 2m; a checkpoint written at world size 2 resumes at world size 1; the
same through `torchrun -m fastgan train`."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastgan import distributed as fd

REPO = Path(__file__).resolve().parents[1]
M = 8          # per-rank batch
STEPS = 5      # steps before the checkpoint
MORE = 3       # steps after it

_WORKER = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from torch import nn
    import fastgan.distributed as fd
    from fastgan.trainer import Trainer
    from fastgan.checkpoint import save_checkpoint, load_latest_good

    out_dir, m, steps, more, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    info = fd.init_from_env()
    rank, world = info.rank, info.world_size
    # A different local initialisation on each rank: data_parallel must broadcast rank 0's.
    torch.manual_seed(0 + 7 * rank)
    G = nn.Sequential(nn.Linear(8, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.LeakyReLU(0.2), nn.Linear(32, 2))
    D = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    trainer = Trainer(G, D, latent_dim=8, seed=1, lr=1e-3, betas=(0.5, 0.999), ema_beta=0.9)
    gen = torch.Generator().manual_seed(123)
    start = 0
    if mode == "resume":
        state, path = load_latest_good(out_dir)
        trainer.load_state_dict(state)
        start = trainer.step_count
    fd.data_parallel(trainer)
    assert trainer.data_parallel == (world > 1)

    def batches(step):   # the global batch of a step (2m samples), the same in every run
        g = torch.Generator().manual_seed(1000 + step)
        return torch.randn(2 * m, 2, generator=g) * 0.5 + 1, torch.randn(2 * m, 8, generator=g)

    per_rank = 2 * m // world
    for step in range(start, steps + more):
        real, z = batches(step)
        lo = rank * per_rank
        trainer.step(real[lo:lo + per_rank], z[lo:lo + per_rank])
        if step + 1 == steps and mode == "fresh" and fd.is_main_process():
            save_checkpoint(trainer.state_dict(), out_dir, trainer.step_count)
    if world > 1:  # each network's gradients: one storage, DDP's bucket, the optimizer's flat buffer
        for net, opt in ((G, trainer.g_optimizer), (D, trainer.d_optimizer)):
            (flat,) = opt.flat_grad_buffers()
            assert {p.grad.untyped_storage().data_ptr() for p in net.parameters()} == \
                {flat.untyped_storage().data_ptr()}
    if fd.is_main_process():
        torch.save({"G": G.state_dict(), "D": D.state_dict(), "step": trainer.step_count,
                    "world": world}, f"{out_dir}/final-{mode}-{world}.pt")
    if fd.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # Everything is written and the group is gone: leave without interpreter finalisation, where gloo's
    # worker threads can still be torn down and abort the process ("terminate called without an active
    # exception", SIGABRT after a run whose results were complete: seen once in CI, pytorch#190489).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
""")


def _env() -> dict:
    """One-process environment (no torchrun variables inherited), this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={world}"]


def _run(tmp: Path, world: int, mode: str, out_dir: Path) -> dict:
    script = tmp / "worker.py"
    script.write_text(_WORKER)
    out_dir.mkdir(exist_ok=True)
    args = [str(script), str(out_dir), str(M), str(STEPS), str(MORE), mode]
    cmd = [sys.executable, *args] if world == 1 else [*_torchrun(world), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return torch.load(out_dir / f"final-{mode}-{world}.pt", weights_only=True)


def _assert_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert a["step"] == b["step"]
    for net in ("G", "D"):
        for k in a[net]:
            x, y = a[net][k].double(), b[net][k].double()
            torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * max(1.0, float(y.abs().max())),
                                       msg=lambda m: f"{net}.{k}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    single = _run(tmp, 1, "fresh", tmp / "ws1")
    double = _run(tmp, 2, "fresh", tmp / "ws2")
    return tmp, single, double


def test_two_ranks_of_batch_m_equal_one_process_of_batch_2m(runs):
    tmp, single, double = runs
    assert single["world"] == 1 and double["world"] == 2 and double["step"] == STEPS + MORE
    _assert_close(double, single)
    # and training did move the parameters (the comparison is not between two untouched models)
    torch.manual_seed(0)
    g0 = torch.nn.Linear(8, 32)
    assert not torch.allclose(single["G"]["0.weight"], g0.weight.detach(), atol=1e-4)


def test_a_world_size_2_checkpoint_resumes_at_world_size_1(runs):
    tmp, single, double = runs
    resumed = _run(tmp, 1, "resume", tmp / "ws2")   # reads ws2/checkpoint-000000005.pt
    _assert_close(resumed, double)


def test_shard_gives_disjoint_covering_slices():
    data = torch.arange(10)
    parts = [fd.shard(data, r, 3) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    ds = torch.utils.data.TensorDataset(torch.arange(7))
    assert [len(fd.shard(ds, r, 2)) for r in range(2)] == [4, 3]
    assert fd.shard(data, 0, 1) is data
    with pytest.raises(TypeError, match="DistributedSampler"):
        fd.shard(iter([data]), 0, 2)
    for rank, world, message in ((5, 3, r"rank 5 is not in \[0, 3\)"), (-1, 2, r"rank -1 is not in"),
                                 (0, 0, "world_size must be an int >= 1")):
        with pytest.raises(ValueError, match=message):
            fd.shard(data, rank, world)


def test_wrap_data_parallel_without_a_process_group_says_what_is_missing():
    from fastgan.trainer import Trainer
    G, D = _small_gan(batch_norm=False)
    trainer = Trainer(G, D, latent_dim=4, seed=0)
    with pytest.raises(RuntimeError, match="torch.distributed initialised first"):
        trainer.wrap_data_parallel()
    assert not trainer.data_parallel
    fd.data_parallel(trainer)  # no process group: a no-op
    assert not trainer.data_parallel


def test_single_process_helpers_are_no_ops():
    assert not fd.is_initialized() and fd.rank() == 0 and fd.world_size() == 1 and fd.is_main_process()
    info = fd.init_from_env() if "WORLD_SIZE" not in os.environ else None
    if info is not None:
        assert (info.rank, info.world_size, info.backend) == (0, 1, None)


_DDP_LOOP = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from torch import nn
    import fastgan.distributed as fd
    from fastgan.ops import d_loss, g_loss

    out, m, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    info = fd.init_from_env()
    rank, world = info.rank, info.world_size
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(8, 32), nn.LeakyReLU(0.2), nn.Linear(32, 2))
    D = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    g_opt = torch.optim.Adam(G.parameters(), 1e-3, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(D.parameters(), 1e-3, betas=(0.5, 0.999))
    Gw = fd.ddp_wrap(G) if world > 1 else G
    Dw = fd.ddp_wrap(D) if world > 1 else D
    per = 2 * m // world
    lo = rank * per
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + step)
        real = (torch.randn(2 * m, 2, generator=g) * 0.5 + 1)[lo:lo + per].requires_grad_(True)
        z = torch.randn(2 * m, 8, generator=g)[lo:lo + per]
        # D step: two forwards (real, then fake), R1 by autograd.grad(create_graph=True), one backward.
        # DDP prepares its reduction at each forward: the first one runs under no_sync.
        with torch.no_grad():
            fake = G(z)
        if world > 1:
            with Dw.no_sync():
                r_logits = Dw(real)
        else:
            r_logits = Dw(real)
        f_logits = Dw(fake)
        (grad,) = torch.autograd.grad(r_logits.sum(), real, create_graph=True)
        r1 = grad.square().sum(1).mean()
        d_opt.zero_grad()
        (d_loss(r_logits, f_logits).loss + 5.0 * r1).backward()
        d_opt.step()
        # G step: D frozen and called outside DDP (its wrapper would wait for D's gradients).
        for p in D.parameters():
            p.requires_grad_(False)
        loss = g_loss(D(Gw(z)))
        g_opt.zero_grad()
        loss.backward()
        g_opt.step()
        for p in D.parameters():
            p.requires_grad_(True)
    if rank == 0:
        torch.save({"G": G.state_dict(), "D": D.state_dict(), "step": steps, "world": world},
                   f"{out}/ddp-{world}.pt")
    if fd.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # Everything is written and the group is gone: leave without interpreter finalisation, where gloo's
    # worker threads can still be torn down and abort the process ("terminate called without an active
    # exception", SIGABRT after a run whose results were complete: seen once in CI, pytorch#190489).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
""")


def test_ddp_wrap_two_forwards_r1_and_frozen_d_match_one_process(tmp_path):
    """The DDP route for loops of one's own: a DDP wrapper per network (find_unused_parameters off,
    broadcast_buffers off, gradients as bucket views), D's two forwards, R1 through
    autograd.grad(create_graph=True) then one backward, D frozen in the G step."""
    script = tmp_path / "ddp_loop.py"
    script.write_text(_DDP_LOOP)
    env = _env()
    results = {}
    for world in (1, 2):
        launcher = [] if world == 1 else ["-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                                          f"--nproc_per_node={world}"]
        r = subprocess.run([sys.executable, *launcher, str(script), str(tmp_path), str(M), str(STEPS)],
                           capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
        results[world] = torch.load(tmp_path / f"ddp-{world}.pt", weights_only=True)
    _assert_close(results[2], results[1])


# ------------------------------------------------------------------------------------------------
# `torchrun --nproc_per_node=2 -m fastgan train`
# ------------------------------------------------------------------------------------------------

CLI_STEPS, CLI_MORE, CLI_BATCH, CLI_SEED = 6, 3, 16, 5
_CLI_ARGS = ["--data", "ring8", "--batch-size", str(CLI_BATCH), "--checkpoint-every", "3", "--log-every", "2",
             "--eval-samples", "50", "--width", "16", "--seed", str(CLI_SEED), "--device", "cpu", "--no-progress"]


def _fastgan_train(world: int, *args: str) -> subprocess.CompletedProcess:
    launcher = _torchrun(world) if world > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "fastgan", "train", *args], capture_output=True, text=True,
                          timeout=600, env=_env())


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-ddp") / "run"
    result = _fastgan_train(2, *_CLI_ARGS, "--steps", str(CLI_STEPS), "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out, result


def test_cli_two_processes_rank_0_writes_the_run_folder(cli_run):
    out, result = cli_run
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "samples.png", "training.png", "metrics.json", "history.csv", "config.json",
        "checkpoint-000000003.pt", "checkpoint-000000003.pt.sha256",
        "checkpoint-000000006.pt", "checkpoint-000000006.pt.sha256"])
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["per_process_batch_size"] == CLI_BATCH // 2
    assert config["batch_size"] == CLI_BATCH
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    # One header, one summary: rank 1 prints nothing of its own.
    assert result.stdout.count("world size 2: data-parallel over 2 processes") == 1
    assert result.stdout.count("fastgan train: done") == 1
    assert "gloo" in result.stdout


def _single_process_twin(out: Path):
    """What one process with the global batch computes from the run's config: the same global
    mixture batches, and as noise the two ranks' latent batches concatenated (rank r draws from a
    generator seeded seed + 1_000_003 r, see fastgan.distributed.data_parallel)."""
    from fastgan import cli
    from fastgan.data import load_data
    from fastgan.trainer import Trainer
    config = json.loads((out / "config.json").read_text())
    data = load_data("ring8")
    G, D = cli._build(config, data)
    trainer = Trainer(G, D, **cli._trainer_kwargs(config, "cpu"))
    noise = [torch.Generator().manual_seed(CLI_SEED + 1_000_003 * r) for r in range(2)]
    batches = iter(data.batches(CLI_BATCH, seed=CLI_SEED))
    return trainer, noise, batches, config["latent_dim"]


def _assert_params(state: dict, trainer, rtol: float = 1e-5) -> None:
    assert state["step"] == trainer.step_count
    for net, module in (("generator", trainer.generator), ("discriminator", trainer.discriminator)):
        for key, mine in module.state_dict().items():
            theirs = state[net][key].double()
            torch.testing.assert_close(theirs, mine.double(), rtol=rtol,
                                       atol=rtol * max(1.0, float(mine.abs().max())),
                                       msg=lambda m: f"{net}.{key}: {m}")


def _resume_copy_of(out: Path, copy: Path, world: int) -> Path:
    """A copy of the run folder ``out``, resumed by ``world`` processes to CLI_STEPS + CLI_MORE steps."""
    shutil.copytree(out, copy)
    result = _fastgan_train(world, "--resume", "--out", str(copy), "--steps", str(CLI_STEPS + CLI_MORE),
                            "--no-progress", "--device", "cpu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert f"world size {world}" in result.stdout and f"resuming at step {CLI_STEPS}" in result.stdout
    return copy


def test_cli_two_processes_equal_one_process_of_twice_the_batch_and_resume_in_one(cli_run, tmp_path):
    out, _ = cli_run
    trainer, noise, batches, latent = _single_process_twin(out)
    half = CLI_BATCH // 2
    for _ in range(CLI_STEPS):
        z = torch.cat([torch.empty(half, latent).normal_(generator=g) for g in noise])
        trainer.step(next(batches), z)
    _assert_params(torch.load(out / "checkpoint-000000006.pt", weights_only=True), trainer)

    # The world-size-2 run resumed by one process: it continues rank 0's noise with the whole batch
    # and the global data stream where it stopped.
    copy = _resume_copy_of(out, tmp_path / "resumed", world=1)
    for _ in range(CLI_MORE):
        z = torch.empty(CLI_BATCH, latent).normal_(generator=noise[0])
        trainer.step(next(batches), z)
    _assert_params(torch.load(copy / f"checkpoint-{CLI_STEPS + CLI_MORE:09d}.pt", weights_only=True), trainer)
    with open(copy / "history.csv") as handle:
        steps = [int(line.split(",")[0]) for line in handle.readlines()[1:]]
    assert steps == [2, 4, 6, 8, 9]


def test_cli_two_processes_resume_at_two_continues_every_ranks_noise_exactly(cli_run, tmp_path):
    """A world-size-2 checkpoint holds both ranks' RNG states (Trainer.checkpoint_state); resumed at
    world size 2, each rank continues its own noise stream where it stopped, so the resumed run is
    the uninterrupted one (here: its single-process twin, continued with both ranks' noise)."""
    out, _ = cli_run
    state = torch.load(out / f"checkpoint-{CLI_STEPS:09d}.pt", weights_only=True)
    assert state["ranks"]["world_size"] == 2 and len(state["ranks"]["local"]) == 2
    trainer, noise, batches, latent = _single_process_twin(out)
    half = CLI_BATCH // 2
    copy = _resume_copy_of(out, tmp_path / "resumed-at-2", world=2)
    for _ in range(CLI_STEPS + CLI_MORE):
        z = torch.cat([torch.empty(half, latent).normal_(generator=g) for g in noise])
        trainer.step(next(batches), z)
    _assert_params(torch.load(copy / f"checkpoint-{CLI_STEPS + CLI_MORE:09d}.pt", weights_only=True), trainer)


def test_cli_batch_size_must_divide_by_the_processes(tmp_path):
    out = tmp_path / "run"
    result = _fastgan_train(2, *_CLI_ARGS[:2], "--batch-size", "15", "--steps", "2", "--device", "cpu",
                            "--no-progress", "--out", str(out))
    assert result.returncode != 0
    assert "must be divisible by the 2 processes" in result.stderr
    assert not out.exists()


def test_cli_two_processes_ctrl_c_writes_one_checkpoint_and_stops_both(tmp_path):
    """Ctrl-C in a terminal reaches torchrun and both workers (one process group); torchrun passes it
    on again. Both ranks stop after the same step, rank 0 writes that step's checkpoint, no hang."""
    import signal
    import time
    from fastgan.checkpoint import list_checkpoints, load_checkpoint
    out = tmp_path / "run"
    proc = subprocess.Popen([*_torchrun(2), "-m", "fastgan", "train", *_CLI_ARGS, "--steps", "1000000",
                             "--checkpoint-every", "1000000", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**_env(), "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        for line in proc.stdout:                 # rank 0's header: training starts now
            if "steps ->" in line:
                break
        time.sleep(1.0)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)       # what the terminal does on Ctrl-C
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    written = list_checkpoints(out)
    assert len(written) == 1, stderr[-4000:]
    step = load_checkpoint(written[0])["step"]
    assert 0 < step < 1000000 and step % 10 == 0     # the ranks agree on stopping every 10 steps
    assert stderr.count(f"interrupted after step {step}; checkpoint written to {written[0]}") == 1, stderr[-4000:]
    assert "fastgan/cli.py" not in stderr            # no traceback from a worker


def test_fused_optimizer_flat_buffers_are_what_it_steps_on():
    from fastgan.optim import FusedAdam
    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))
    opt = FusedAdam([p, q], lr=0.1)
    opt.zero_grad(set_to_none=True)
    (2 * p.sum() + q.sum()).backward()
    (flat,) = opt.flat_grad_buffers()
    assert flat.numel() == 17 and p.grad.data_ptr() == flat.data_ptr()
    flat.mul_(0.5)                                   # what an in-place all-reduce average does
    assert torch.equal(p.grad, torch.ones(3, 4)) and torch.equal(q.grad, torch.full((5,), 0.5))
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(p.detach(), before)
    state = opt.flat_state_buffers()                 # moments, step counts
    assert len(state) >= 3 and all(t.numel() in (2, 17) for t in state)
    assert any(torch.equal(t, torch.ones(2)) for t in state)   # one step for each parameter


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process (DDP runs; its all-reduce is the identity)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _small_gan(batch_norm: bool):
    torch.manual_seed(0)
    norm = [torch.nn.BatchNorm1d(16)] if batch_norm else []
    G = torch.nn.Sequential(torch.nn.Linear(4, 16), *norm, torch.nn.ReLU(), torch.nn.Linear(16, 2))
    D = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 1))
    return G, D


@pytest.mark.parametrize("options", [
    dict(),
    dict(batch_norm=True, r1_gamma=1.0, r1_every=2, ema_beta=0.9),
    dict(loss="wasserstein", gp_lambda=10.0, joint_d_forward=False),
    dict(d_steps=2, fuse=False),
    dict(groups="by-layer"),
    dict(groups="interleaved"),
], ids=["default", "bn-r1-ema", "wgan-gp-two-forwards", "k2-unfused", "groups-by-layer", "groups-interleaved"])
def test_trainer_under_ddp_is_exact_and_steps_on_ddps_bucket(one_rank_group, options):
    """wrap_data_parallel: one DDP wrapper per network; at one rank the run equals the unwrapped one
    bit for bit, and the buffer DDP all-reduces is the fused optimizer's flat gradient buffer (a
    comm hook records the bucket DDP hands over; after DDP re-buckets, the new bucket is adopted)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from fastgan.trainer import Trainer

    options = dict(options)
    batch_norm = options.pop("batch_norm", False)
    d_steps = options.pop("d_steps", 1)
    # D's optimizer with two param groups, so two flat buffers against DDP's one bucket. By layer:
    # each group's gradients lie end to end in the bucket and each buffer adopts its part.
    # Interleaved (weights, biases): not in parameter order; those gradients are copied (declined).
    groups = options.pop("groups", None)
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(3)) * 0.5 + 1

    def run(ddp: bool):
        G, D = _small_gan(batch_norm)
        if groups is not None:
            first, second = ([D[0].weight, D[0].bias], [D[2].weight, D[2].bias]) if groups == "by-layer" \
                else ([D[0].weight, D[2].weight], [D[0].bias, D[2].bias])
            options["d_optimizer"] = torch.optim.Adam([{"params": first}, {"params": second, "lr": 3e-4}], lr=1e-3)
        trainer = Trainer(G, D, latent_dim=4, seed=1, lr=1e-3, d_steps=d_steps, **options)
        seen = {"G": [], "D": []}
        if ddp:
            fd.data_parallel(trainer, seed_offset_per_rank=False)
            assert trainer.data_parallel
            for name, net in (("G", trainer._g_net), ("D", trainer._d_net)):
                assert isinstance(net, torch.nn.parallel.DistributedDataParallel)

                def hook(state, bucket, name=name):
                    buffer = bucket.buffer()
                    seen[name].append((buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()))
                    return allreduce_hook(state, bucket)
                net.register_comm_hook(dist.group.WORLD, hook)
        for it in range(4):
            trainer.fit(data, steps=1, batch_size=16, log_every=100, progress=False) if it % 2 else \
                trainer.step(data[16 * it:16 * it + 16])
            if ddp:
                for name, opt in (("G", trainer.g_optimizer), ("D", trainer.d_optimizer)):
                    lo, hi = seen[name][-1]
                    inside = [lo <= f.data_ptr() < hi for f in opt.flat_grad_buffers()]
                    if name == "D" and groups == "interleaved":
                        # In parameter order (DDP's first bucket) neither group is contiguous; after DDP
                        # re-buckets in gradient-ready order, one may be.
                        assert it > 0 or inside == [False, False]
                    else:
                        assert all(inside), (name, it)
        return G, D, trainer

    G0, D0, t0 = run(False)
    G1, D1, t1 = run(True)
    for a, b in zip([*G0.state_dict().values(), *D0.state_dict().values()],
                    [*G1.state_dict().values(), *D1.state_dict().values()]):
        assert torch.equal(a, b)
    if t0.ema is not None:
        assert all(torch.equal(a, b) for a, b in zip(t0.ema.shadow_params, t1.ema.shadow_params))
    # checkpoints hold the networks' own names (no DDP "module." prefix) and load without DDP
    state = t1.state_dict()
    assert not any(k.startswith("module.") for k in state["generator"])
    t0.load_state_dict(state)


_GUARD_WORKER = textwrap.dedent("""
    import sys, torch
    import fastgan.distributed as fd
    from fastgan.checkpoint import NonFiniteGuard, NonFiniteTrainingError
    info = fd.init_from_env()
    guard = NonFiniteGuard(max_consecutive=2, check_every=1000)
    ok, bad = torch.tensor(0.5), torch.tensor(float("inf"))
    outcome = "no error"
    try:
        for step in range(1, 7):
            # Only rank 1 sees non-finite losses (steps 3 and 4): its data, say. Gradients, averaged
            # before the step, would be the same on both ranks; the losses are not.
            guard.observe(step, "g", loss=bad if info.rank == 1 and step in (3, 4) else ok)
            if step % 3 == 0:
                guard.check(step)
    except NonFiniteTrainingError as exc:
        outcome = f"stopped {exc.network} {exc.step}"
    print(f"rank {info.rank}: {outcome}", flush=True)
    fd.destroy()
""")


def test_nonfinite_guard_stops_every_rank_when_one_rank_hits_the_limit(tmp_path):
    script = tmp_path / "guard.py"
    script.write_text(_GUARD_WORKER)
    result = subprocess.run([*_torchrun(2), str(script)], capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "rank 0: stopped generator 4" in result.stdout and "rank 1: stopped generator 4" in result.stdout


_MISMATCH_WORKER = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from torch import nn
    import fastgan.distributed as fd
    from fastgan.trainer import Trainer
    torch.set_num_threads(1)
    info = fd.init_from_env()
    rank = info.rank

    def trainer(width=16):
        torch.manual_seed(0)
        G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        D = nn.Sequential(nn.Linear(2, width), nn.LeakyReLU(0.2), nn.Linear(width, 1))
        return Trainer(G, D, latent_dim=4, seed=0, ema_beta=0.9)

    def attempt(case, t):
        try:
            fd.data_parallel(t)
            outcome = "no error"
        except ValueError as exc:
            outcome = f"ValueError: {exc}"
        print(f"{case} rank {rank}: {outcome}", flush=True)

    # D one layer wider on rank 1 (a config read differently, say).
    attempt("width", trainer(16 if rank == 0 else 32))
    # A checkpoint loaded on rank 0 only: its optimizer state and step counts are not on rank 1.
    if rank == 0:
        t = trainer()
        for _ in range(2):
            t.step(torch.randn(8, 2))
        state = t.state_dict()
    t = trainer()
    if rank == 0:
        t.load_state_dict(state)
    attempt("rank-0-load", t)
    # Ranks that agree: no error, and the group is still usable.
    t = trainer()
    attempt("same", t)
    t.step(torch.randn(8, 2))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
""")


def test_data_parallel_over_ranks_that_differ_raises_a_value_error_on_every_rank(tmp_path):
    """Rank 0's state is broadcast tensor by tensor: between ranks whose networks or optimizer state
    differ, gloo aborted the receiving rank (SIGABRT, "Received data size doesn't match expected
    size") and the other died of a connection reset. Every rank now raises a ValueError naming the
    first difference, before any broadcast."""
    script = tmp_path / "mismatch.py"
    script.write_text(_MISMATCH_WORKER)
    result = subprocess.run([*_torchrun(2), str(script)], capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    for rank in (0, 1):
        assert (f"width rank {rank}: ValueError: the ranks do not hold the same model and training state: rank 0 "
                "has discriminator parameter '0.weight': (16, 2)") in result.stdout, result.stdout
        assert f"rank-0-load rank {rank}: ValueError: the ranks do not hold the same model" in result.stdout
        assert f"same rank {rank}: no error" in result.stdout
    assert "load the checkpoint on every rank" in result.stdout


_FIT_SETUP_WORKER = textwrap.dedent("""
    import os, sys, time, torch
    import torch.distributed as dist
    from torch import nn
    import fastgan.distributed as fd
    from fastgan.trainer import Trainer
    torch.set_num_threads(1)
    info = fd.init_from_env()
    rank = info.rank
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    D = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    trainer = fd.data_parallel(Trainer(G, D, latent_dim=4, seed=0))

    def attempt(case, data, **kwargs):
        start = time.perf_counter()
        try:
            trainer.fit(data, progress=False, batch_size=8, **kwargs)
            outcome = "no error"
        except ValueError as exc:
            outcome = f"ValueError: {exc}"
        print(f"{case} rank {rank} ({time.perf_counter() - start:.0f} s): {outcome}", flush=True)

    full = torch.randn(64, 2)
    # rank 1's shard is smaller than its batch: it raised while rank 0 waited in DDP's first all-reduce
    attempt("small-shard", full if rank == 0 else full[:3], steps=3)
    # a DataLoader that yields nothing on rank 1 (its error comes from the first batch)
    attempt("empty-loader", [full[:8]] if rank == 0 else [], steps=3)
    # a cadence read differently on one rank
    attempt("steps", full, steps=3 if rank == 0 else 4)
    attempt("same", full, steps=2, log_every=1)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
""")


def test_fit_fails_on_every_rank_when_one_ranks_set_up_fails(tmp_path):
    """A rank whose fit could not start (its data shard smaller than the batch, an empty DataLoader) used
    to raise alone while the other ranks waited in DDP's first all-reduce until gloo's 30-minute timeout;
    ranks given different step counts hung at the end the same way. Every rank now raises at once."""
    script = tmp_path / "fit_setup.py"
    script.write_text(_FIT_SETUP_WORKER)
    result = subprocess.run([*_torchrun(2), str(script)], capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    out = result.stdout
    assert "small-shard rank 1 (0 s): ValueError: data has 3 samples, fewer than batch_size=8" in out, out
    assert ("small-shard rank 0 (0 s): ValueError: rank 1 could not start training (ValueError: data has 3 samples, "
            "fewer than batch_size=8); every rank stops here") in out, out
    assert "empty-loader rank 1 (0 s): ValueError: data is empty (the iterable yielded no batch)" in out, out
    assert "empty-loader rank 0 (0 s): ValueError: rank 1 could not start training (ValueError: data is empty" in out
    for rank in (0, 1):
        assert (f"steps rank {rank} (0 s): ValueError: the ranks were given different steps: rank 0 has 3, rank 1 "
                "has 4") in out, out
        assert re.search(rf"same rank {rank} \(\d+ s\): no error", out), out


_EMA_BN_WORKER = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from torch import nn
    import fastgan.distributed as fd
    from fastgan.trainer import Trainer
    torch.set_num_threads(1)
    info = fd.init_from_env()
    rank = info.rank
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    D = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    trainer = Trainer(G, D, latent_dim=4, seed=0, ema_beta=0.9)
    fd.data_parallel(trainer)
    for _ in range(3):   # each rank its own noise: its own running statistics in G
        trainer.step(torch.randn(8, 2) + rank)
    trainer.save_checkpoint(sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
""")


def test_a_data_parallel_checkpoints_ema_holds_the_averaged_running_statistics(tmp_path):
    """save_checkpoint averages G's BatchNorm running statistics across ranks; the EMA's buffers (a
    copy of G's, taken at each update, and what sample() runs with) kept rank 0's own."""
    from fastgan.checkpoint import list_checkpoints
    script = tmp_path / "ema_bn.py"
    script.write_text(_EMA_BN_WORKER)
    out = tmp_path / "run"
    result = subprocess.run([*_torchrun(2), str(script), str(out)], capture_output=True, text=True, timeout=300,
                            env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    (path,) = list_checkpoints(out)
    state = torch.load(path, weights_only=True)
    assert set(state["ema"]["buffers"]) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    for name, value in state["ema"]["buffers"].items():
        assert torch.equal(value, state["generator"][name]), name


def test_fit_advances_a_distributed_samplers_epoch():
    """A DataLoader is split across ranks by a DistributedSampler, which shuffles by seed + epoch and
    leaves set_epoch to the training loop: fit never called it, so every epoch repeated the first
    one's order (a DataLoader with shuffle=True in one process reshuffles each epoch)."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    from fastgan.trainer import Trainer

    class Recording(TensorDataset):
        def __init__(self, *tensors):
            super().__init__(*tensors)
            self.order = []

        def __getitem__(self, i):
            self.order.append(int(i))
            return super().__getitem__(i)

    data = Recording(torch.randn(16, 2, generator=torch.Generator().manual_seed(0)))
    sampler = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=0)
    G, D = _small_gan(batch_norm=False)
    trainer = Trainer(G, D, latent_dim=4, seed=0)
    trainer.fit(DataLoader(data, batch_size=4, sampler=sampler), steps=6, log_every=100, progress=False)
    epochs = [data.order[i:i + 8] for i in range(0, 24, 8)]   # 8 samples of rank 0 per epoch, 2 batches
    assert len(data.order) == 24
    assert len({tuple(e) for e in epochs}) == 3, epochs


def test_a_one_process_group_resumes_exactly(one_rank_group, tmp_path):
    """Under a process group of one (``torchrun --nproc_per_node=1``) a world-size-1 checkpoint holds
    no per-rank states; data_parallel re-seeded the resumed trainer's noise and data order, so the
    resumed run drifted from the uninterrupted one (as a run without a group does not)."""
    from fastgan.trainer import Trainer
    data = torch.randn(40, 2, generator=torch.Generator().manual_seed(5))
    G, D = _small_gan(batch_norm=False)
    trainer = fd.data_parallel(Trainer(G, D, latent_dim=4, seed=3, lr=1e-3))
    trainer.fit(data, steps=3, batch_size=4, log_every=100, progress=False, checkpoint_every=3, out_dir=tmp_path)
    trainer.fit(data, steps=3, batch_size=4, log_every=100, progress=False)
    G2, D2 = _small_gan(batch_norm=False)
    resumed = fd.data_parallel(Trainer.load(tmp_path, G2, D2))
    assert resumed.step_count == 3
    resumed.fit(data, steps=3, batch_size=4, log_every=100, progress=False)
    for a, b in zip([*G.parameters(), *D.parameters()], [*G2.parameters(), *D2.parameters()]):
        assert torch.equal(a, b)
