"""fastgan.Trainer under DistributedDataParallel on CUDA with NCCL (one rank: one GPU is what a lent
machine has; NCCL refuses two ranks on one device). At one rank DDP's all-reduce is the identity, so
the wrapped run must equal the unwrapped one, and the buffer NCCL reduces must be the fused
optimizer's flat gradient buffer. Two-rank equality is tested on CPU with gloo (tests/test_distributed.py)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastgan.distributed as fd
from fastgan import Trainer


@pytest.fixture
def nccl_group(tmp_path, cuda_device):
    if not dist.is_nccl_available():
        pytest.fail("this CUDA build of torch has no NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1,
                            device_id=cuda_device)
    try:
        yield cuda_device
    finally:
        dist.destroy_process_group()


def _pair(device):
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2)).to(device)
    D = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1)).to(device)
    return G, D


@pytest.mark.parametrize("options", [dict(), dict(r1_gamma=1.0, r1_every=2, ema_beta=0.9)], ids=["default", "r1-ema"])
def test_trainer_under_nccl_ddp_equals_unwrapped_and_adopts_the_bucket(nccl_group, options):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    device = nccl_group
    data = torch.randn(64, 2, device=device, generator=torch.Generator(device).manual_seed(3))

    def run(ddp):
        G, D = _pair(device)
        trainer = Trainer(G, D, latent_dim=8, seed=1, cuda_graphs=False, **options)
        seen = {"G": [], "D": []}
        if ddp:
            fd.data_parallel(trainer, seed_offset_per_rank=False)
            for name, net in (("G", trainer._g_net), ("D", trainer._d_net)):
                def hook(state, bucket, name=name):
                    seen[name].append(bucket.buffer().data_ptr())
                    return allreduce_hook(state, bucket)
                net.register_comm_hook(dist.group.WORLD, hook)
        for it in range(4):
            trainer.step(data[16 * it:16 * it + 16])
            if ddp:
                for name, opt in (("G", trainer.g_optimizer), ("D", trainer.d_optimizer)):
                    assert seen[name][-1] == opt.flat_grad_buffers()[0].data_ptr(), (name, it)
        return [*G.state_dict().values(), *D.state_dict().values()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_cuda_graphs_are_turned_off_under_ddp_with_a_warning(nccl_group):
    G, D = _pair(nccl_group)
    trainer = Trainer(G, D, latent_dim=8, seed=1, cuda_graphs=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fd.data_parallel(trainer)
    assert any("cuda_graphs=True is turned off" in str(w.message) for w in caught)
    assert trainer.data_parallel and "cuda_graphs=False" in repr(trainer)
    stats = trainer.step(torch.randn(16, 2, device=nccl_group))
    assert torch.isfinite(stats["d_loss"]) and torch.isfinite(stats["g_loss"])
