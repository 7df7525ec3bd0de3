"""fastgan.distributed on CPU with gloo, 2 processes started by torchrun: 2 ranks x batch m give the
parameters of 1 process x batch 2m; a checkpoint written at world size 2 resumes at world size 1."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastgan import distributed as fd

M = 8          # per-rank batch
STEPS = 5      # steps before the checkpoint
MORE = 3       # steps after it

_WORKER = textwrap.dedent("""
    import sys, torch
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
    if fd.is_main_process():
        torch.save({"G": G.state_dict(), "D": D.state_dict(), "step": trainer.step_count,
                    "world": world}, f"{out_dir}/final-{mode}-{world}.pt")
    if fd.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
""")


def _run(tmp: Path, world: int, mode: str, out_dir: Path) -> dict:
    script = tmp / "worker.py"
    script.write_text(_WORKER)
    out_dir.mkdir(exist_ok=True)
    args = [str(script), str(out_dir), str(M), str(STEPS), str(MORE), mode]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    if world == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc_per_node={world}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
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


def test_single_process_helpers_are_no_ops():
    assert not fd.is_initialized() and fd.rank() == 0 and fd.world_size() == 1 and fd.is_main_process()
    info = fd.init_from_env() if "WORLD_SIZE" not in os.environ else None
    if info is not None:
        assert (info.rank, info.world_size, info.backend) == (0, 1, None)


_DDP_LOOP = textwrap.dedent("""
    import sys, torch
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
""")


def test_ddp_wrap_two_forwards_r1_and_frozen_d_match_one_process(tmp_path):
    """The DDP route for loops of one's own: a DDP wrapper per network (find_unused_parameters off,
    broadcast_buffers off, gradients as bucket views), D's two forwards, R1 through
    autograd.grad(create_graph=True) then one backward, D frozen in the G step."""
    script = tmp_path / "ddp_loop.py"
    script.write_text(_DDP_LOOP)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    results = {}
    for world in (1, 2):
        launcher = [] if world == 1 else ["-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                                          f"--nproc_per_node={world}"]
        r = subprocess.run([sys.executable, *launcher, str(script), str(tmp_path), str(M), str(STEPS)],
                           capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
        results[world] = torch.load(tmp_path / f"ddp-{world}.pt", weights_only=True)
    _assert_close(results[2], results[1])
