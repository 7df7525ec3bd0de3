"""fastgan.Trainer: fit's data handling and history, EMA, precision, checkpoints and resume, errors."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import fastgan.trainer as trainer_module
from fastgan import Trainer

NZ = 4
DIM = 3


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """These models are tiny: one thread is fastest, and on a loaded shared machine torch's thread pool
    (spinning OpenMP workers) makes them an order of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp_pair(seed=0, dropout=False, pack=1):
    torch.manual_seed(seed)
    g = nn.Sequential(nn.Linear(NZ, 16), nn.ReLU(), nn.Linear(16, DIM))
    layers = [nn.Linear(DIM * pack, 16), nn.LeakyReLU(0.2)]
    if dropout:
        layers.append(nn.Dropout(0.3))  # draws from torch's global RNG: checkpoints must restore it
    layers.append(nn.Linear(16, 1))
    return g, nn.Sequential(*layers)


def make_trainer(model_seed=0, **kwargs):
    g, d = mlp_pair(model_seed, dropout=kwargs.pop("dropout", False), pack=kwargs.get("pack", 1))
    kwargs.setdefault("fuse", False)
    kwargs.setdefault("seed", 0)
    return Trainer(g, d, latent_dim=NZ, **kwargs)


def params_of(trainer):
    return [p.detach().clone() for p in list(trainer.generator.parameters()) + list(trainer.discriminator.parameters())]


def data_tensor(n=40, seed=1):
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# fit: data forms, epochs, history, callbacks, progress, checkpoints
# ---------------------------------------------------------------------------------------------

class ListDataset(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@pytest.mark.parametrize("form", ["tensor", "dataset", "tensor_dataset", "loader", "list", "tuples"])
def test_fit_accepts_every_data_form_and_cycles_epochs(form):
    x = data_tensor(24)
    data = {
        "tensor": x,
        "dataset": ListDataset(x),
        "tensor_dataset": torch.utils.data.TensorDataset(x, torch.zeros(24)),
        "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8, shuffle=True),
        "list": list(x.split(8)),
        "tuples": [(b, torch.zeros(8)) for b in x.split(8)],
    }[form]
    trainer = make_trainer()
    seen = []
    trainer.discriminator.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    before = params_of(trainer)
    history = trainer.fit(data, steps=7, batch_size=8, log_every=3, progress=False)  # 7 batches > 3 per epoch
    assert trainer.step_count == 7 and trainer.d_step_count == 7
    assert seen.count(16) == 7  # one joint real+fake forward of D per D step, 8 + 8 samples
    assert history["step"] == [3.0, 6.0, 7.0]
    for key in ("d_loss", "g_loss", "jsd", "value", "d_real", "d_fake", "steps_per_s"):
        assert len(history[key]) == 3 and all(isinstance(v, float) for v in history[key]), key
    assert all(not torch.equal(a, b) for a, b in zip(before, params_of(trainer)))


def test_fit_tensor_epochs_are_shuffled_permutations():
    x = torch.arange(12, dtype=torch.float32).unsqueeze(1).repeat(1, DIM)
    trainer = make_trainer()
    seen = []
    # the joint real+fake forwards of D (8 rows; real first) give the real batches
    trainer.discriminator.register_forward_pre_hook(
        lambda m, a: seen.append(a[0][:4, 0].clone()) if a[0].shape[0] == 8 else None)
    trainer.fit(x, steps=6, batch_size=4, progress=False)
    reals = seen
    epochs = [torch.cat(reals[:3]).sort().values, torch.cat(reals[3:]).sort().values]
    for e in epochs:
        assert torch.equal(e, torch.arange(12, dtype=torch.float32))
    assert not torch.equal(torch.cat(reals[:3]), torch.arange(12, dtype=torch.float32))


def test_fit_skips_incomplete_last_batch_of_a_loader():
    loader = torch.utils.data.DataLoader(data_tensor(10), batch_size=4)  # batches of 4, 4, 2
    trainer = make_trainer()
    sizes = []
    trainer.discriminator.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    trainer.fit(loader, steps=5, progress=False)
    assert sizes == [2] + [8, 4] * 5  # probe; then joint D forwards of 4 real + 4 fake and G steps, never 2 + 2


def test_fit_calls_callbacks_writes_checkpoints_and_shows_progress(tmp_path, capsys):
    trainer = make_trainer()
    calls = []
    trainer.fit(data_tensor(), steps=5, batch_size=8, log_every=2, checkpoint_every=2, out_dir=tmp_path,
                callbacks=[lambda t, step, stats: calls.append((t, step, sorted(stats)))], progress=True)
    assert [c[1] for c in calls] == [1, 2, 3, 4, 5] and all(c[0] is trainer for c in calls)
    assert "g_loss" in calls[0][2] and "jsd" in calls[0][2]
    state = torch.load(tmp_path / "checkpoint-000000005.pt", weights_only=True)
    assert state["step"] == 5
    err = capsys.readouterr().err
    assert "5/5" in err and "step/s" in err and "jsd" in err
    # the newest two checkpoints (steps 4 and 5) with their digests; no temporary left behind
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000000004.pt", "checkpoint-000000004.pt.sha256",
                                            "checkpoint-000000005.pt", "checkpoint-000000005.pt.sha256"]


def test_whatever_stops_fit_carries_the_history_of_every_step_done():
    """A callback that stops training (StopOnSignal raises after writing its checkpoint) runs after the
    step's history row: the row of the step the checkpoint holds is not lost."""
    trainer = make_trainer()

    def stop(t, step, stats):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        trainer.fit(data_tensor(), steps=10, batch_size=8, log_every=1, callbacks=[stop], progress=False)
    assert info.value.history["step"] == [1.0, 2.0, 3.0] and trainer.step_count == 3


def test_two_fits_continue_one_stream():
    x = data_tensor(20)
    a, b = make_trainer(), make_trainer()
    a.fit(x, steps=6, batch_size=4, progress=False)
    b.fit(x, steps=2, batch_size=4, progress=False)
    b.fit(x, steps=4, batch_size=4, progress=False)
    for p, q in zip(params_of(a), params_of(b)):
        assert torch.equal(p, q)


def test_fit_moves_cpu_batches_and_converts_dtype():
    trainer = make_trainer()
    trainer.fit(data_tensor().double(), steps=2, batch_size=8, progress=False)
    assert trainer.step_count == 2


# ---------------------------------------------------------------------------------------------
# EMA, precision
# ---------------------------------------------------------------------------------------------

def test_ema_tracks_generator_and_sample_uses_it():
    beta = 0.8
    trainer = make_trainer(ema_beta=beta)
    g = trainer.generator
    shadow = [p.detach().clone() for p in g.parameters()]
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        trainer.step(torch.randn(8, DIM, generator=gen))
        shadow = [s * beta + (1 - beta) * p.detach() for s, p in zip(shadow, g.parameters())]
    averaged = copy.deepcopy(g)
    with torch.no_grad():
        for p, s in zip(averaged.parameters(), shadow):
            p.copy_(s)
    z = torch.randn(5, NZ)
    torch.testing.assert_close(trainer.sample(5, z=z), averaged(z), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trainer.sample(5, z=z, ema=False), g(z).detach())
    assert not torch.allclose(trainer.sample(5, z=z), g(z))
    assert trainer.sample(7).shape == (7, DIM)


@pytest.mark.parametrize("fuse", [False, True])
def test_bf16_autocast_on_cpu_trains_close_to_fp32(fuse):
    fp32, bf16 = make_trainer(fuse=fuse), make_trainer(precision="bf16", fuse=fuse)
    real = torch.randn(16, DIM)
    fp32.step(real, torch.zeros(16, NZ))
    bf16.step(real, torch.zeros(16, NZ))  # the first step also probes D once, outside autocast
    dtypes = []
    bf16.discriminator.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    bf16.generator.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        real, z = torch.randn(16, DIM, generator=gen), torch.randn(16, NZ, generator=gen)
        s32, s16 = fp32.step(real, z), bf16.step(real, z)
        for key in ("d_loss", "g_loss", "d_real", "d_fake"):
            torch.testing.assert_close(s16[key], s32[key], rtol=2e-2, atol=1e-2)
    assert dtypes and all(dt == torch.bfloat16 for dt in dtypes)
    for p in bf16.generator.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()


def test_fp16_loss_scaling_skips_nonfinite_steps_and_grows(monkeypatch):
    monkeypatch.setattr(trainer_module, "_GROWTH_INTERVAL", 2)
    monkeypatch.setattr(trainer_module, "_INIT_SCALE", 256.0)  # small enough that fp16 gradients stay finite
    trainer = make_trainer(precision="fp16")
    scale0 = trainer._d_scaler.scale.item()
    gen = torch.Generator().manual_seed(0)
    trainer.d_step(torch.randn(8, DIM, generator=gen))
    trainer.d_step(torch.randn(8, DIM, generator=gen))
    assert trainer._d_scaler.scale.item() == 2 * scale0  # two finite steps: the scale doubles
    before = [p.detach().clone() for p in trainer.discriminator.parameters()]
    stats = trainer.d_step(torch.full((8, DIM), 1e30))  # overflows fp16: non-finite gradients
    assert not torch.isfinite(stats["d_loss"])
    assert trainer._d_scaler.scale.item() == scale0  # halved
    for p, q in zip(before, trainer.discriminator.parameters()):
        assert torch.equal(p, q)  # the step was skipped
    stats = trainer.step(torch.randn(8, DIM, generator=gen))
    assert torch.isfinite(stats["d_loss"]) and torch.isfinite(stats["g_loss"])


@pytest.mark.parametrize("param_dtype,precision", [(torch.bfloat16, "fp16"), (torch.float16, "bf16")])
def test_16_bit_networks_under_the_other_16_bit_autocast_train_with_the_joint_d_forward(param_dtype, precision,
                                                                                     monkeypatch):
    """The joint real+fake batch of D was concatenated under autocast, whose cat refuses 16-bit tensors
    of the other 16-bit type: bf16 networks with precision="fp16" (fp16 ones with "bf16") died at the
    first step in torch's "Unexpected floating ScalarType in at::autocast::prioritize", while the same
    trainer with two separate D forwards trained. The concatenation is exact, so now runs outside
    autocast: both give the same step."""
    monkeypatch.setattr(trainer_module, "_INIT_SCALE", 256.0)  # R1's fp16 input gradients stay finite
    trainers = []
    for joint in (True, False):
        g, d = mlp_pair()
        g.to(param_dtype), d.to(param_dtype)
        trainers.append(Trainer(g, d, latent_dim=NZ, fuse=False, seed=0, precision=precision, joint_d_forward=joint,
                                r1_gamma=1.0, r1_every=1))
    gen = torch.Generator().manual_seed(0)
    real, z = torch.randn(8, DIM, generator=gen).to(param_dtype), torch.randn(8, NZ, generator=gen).to(param_dtype)
    joint, separate = (t.step(real, z) for t in trainers)
    for key in ("d_loss", "d_real", "d_fake", "r1", "g_loss"):
        assert torch.isfinite(joint[key]), key
        torch.testing.assert_close(joint[key], separate[key], rtol=1e-2, atol=1e-3)
    for p, q in zip(params_of(trainers[0]), params_of(trainers[1])):
        assert p.dtype == param_dtype
        torch.testing.assert_close(p, q, rtol=0, atol=2 * torch.finfo(param_dtype).eps)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_equals_uninterrupted_run(tmp_path, precision):
    """N steps == N/2 steps + save + Trainer.load + N/2 steps: identical parameters, EMA, optimizer
    state (R1 lazy and d_steps=2 so the counters matter; Dropout so the global RNG matters)."""
    options = dict(ema_beta=0.9, r1_gamma=1.0, r1_every=3, d_steps=2, dropout=True, precision=precision)
    x = data_tensor(28)
    torch.manual_seed(100)
    whole = make_trainer(**options)
    whole.fit(x, steps=6, batch_size=4, progress=False)

    torch.manual_seed(100)
    first = make_trainer(**options)
    first.fit(x, steps=3, batch_size=4, progress=False)
    first.save(tmp_path / "ck.pt")
    g, d = mlp_pair(7, dropout=True)  # fresh networks with other weights: everything comes from the file
    torch.manual_seed(12345)  # and a disturbed global RNG
    resumed = Trainer.load(tmp_path / "ck.pt", g, d)
    assert resumed.step_count == 3 and resumed.d_step_count == 6 and resumed.ema_beta == 0.9
    resumed.fit(x, steps=3, batch_size=4, progress=False)

    for p, q in zip(params_of(whole), params_of(resumed)):
        assert torch.equal(p, q)
    z = torch.randn(4, NZ)
    assert torch.equal(whole.sample(4, z=z), resumed.sample(4, z=z))
    a, b = whole.state_dict(), resumed.state_dict()
    assert a["step"] == b["step"] and a["d_step"] == b["d_step"]
    assert torch.equal(a["rng"]["trainer"], b["rng"]["trainer"])
    if precision == "fp16":
        assert torch.equal(a["scaler"]["d"]["scale"], b["scaler"]["d"]["scale"])


def test_checkpoint_cadence_counts_the_trainers_steps_across_fit_calls(tmp_path):
    """A second fit (a resumed or extended run) checkpoints at the same multiples as one long fit would,
    plus its own last step."""
    from fastgan.checkpoint import checkpoint_step, list_checkpoints
    trainer = make_trainer()
    trainer.fit(data_tensor(), steps=3, batch_size=8, checkpoint_every=2, out_dir=tmp_path, progress=False,
                keep_checkpoints=10)
    trainer.fit(data_tensor(), steps=4, batch_size=8, checkpoint_every=2, out_dir=tmp_path, progress=False,
                keep_checkpoints=10)
    assert sorted(checkpoint_step(p) for p in list_checkpoints(tmp_path)) == [2, 3, 4, 6, 7]


def test_checkpoints_of_other_runs_are_never_overwritten_or_rotated_away(tmp_path):
    """A run folder holding checkpoints of later steps than the trainer's (another run's, or the rest of the
    run a trainer was loaded from to branch off) is refused before anything is written; rotation deletes
    only checkpoints of earlier steps, never the one just written."""
    from fastgan.checkpoint import list_checkpoints, save_checkpoint
    run = tmp_path / "run"
    first = make_trainer()
    first.fit(data_tensor(), steps=6, batch_size=8, checkpoint_every=2, out_dir=run, progress=False, keep_checkpoints=3)
    names = [p.name for p in list_checkpoints(run)]
    assert names == ["checkpoint-000000006.pt", "checkpoint-000000004.pt", "checkpoint-000000002.pt"]
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    branch = Trainer.load(run / "checkpoint-000000002.pt", *mlp_pair(9))
    with pytest.raises(ValueError, match="holds checkpoint-000000006.pt, a checkpoint of a later step"):
        branch.fit(data_tensor(), steps=1, batch_size=8, checkpoint_every=1, out_dir=run, progress=False)
    with pytest.raises(ValueError, match="a checkpoint of a later step than this trainer's \\(0\\)"):
        make_trainer(seed=7).fit(data_tensor(), steps=2, batch_size=8, checkpoint_every=1, out_dir=run,
                                 progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written, nothing deleted
    # Written anyway (save_checkpoint itself): the new one stays, the later ones stay, earlier ones rotate.
    path = save_checkpoint({"format": "fastgan.test"}, run, 3, keep=1)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-000000006.pt", "checkpoint-000000004.pt",
                                                       path.name]
    # The branch continues in a folder of its own.
    branch.fit(data_tensor(), steps=2, batch_size=8, checkpoint_every=1, out_dir=tmp_path / "branch", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "branch")] == ["checkpoint-000000004.pt",
                                                                      "checkpoint-000000003.pt"]


def test_load_rebuilds_only_optimizer_classes_of_torch_and_fastgan(tmp_path):
    """The checkpoint names its optimizers' classes; Trainer.load must not import and call whatever a
    (tampered) file names -- that would undo weights_only loading's protection."""
    g, d = mlp_pair()
    trainer = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0, d_optimizer=torch.optim.SGD(d.parameters(), lr=0.1))
    state = trainer.state_dict()
    for module, name in (("builtins", "print"), ("os", "system"), ("torch.optim", "lr_scheduler"),
                         ("torch.optim.lr_scheduler", "StepLR"), ("fastgan.optim.fused", "fused_twin")):
        tampered = copy.deepcopy(state)
        tampered["config"]["d_optimizer"] = dict(tampered["config"]["d_optimizer"], module=module, **{"class": name})
        with pytest.raises(ValueError, match=f"d_optimizer is {module}.{name}; Trainer.load rebuilds only"):
            Trainer.from_state_dict(tampered, *mlp_pair(3))
    # With the optimizer given nothing is imported either: the recorded class is only compared (and this
    # one is not the given optimizer's), and with the true class recorded the checkpoint loads.
    g2, d2 = mlp_pair(3)
    tampered["config"]["d_optimizer"]["module"] = "builtins"
    with pytest.raises(ValueError, match="d_optimizer is builtins.fused_twin but this trainer's is "
                                         "fastgan.optim.fused.FusedSGD"):
        Trainer.from_state_dict(tampered, g2, d2, d_optimizer=torch.optim.SGD(d2.parameters(), lr=0.1))
    g2, d2 = mlp_pair(3)
    loaded = Trainer.from_state_dict(state, g2, d2, d_optimizer=torch.optim.SGD(d2.parameters(), lr=0.1))
    assert loaded.step_count == trainer.step_count


def test_sample_runs_the_generator_in_eval_mode_without_a_trace():
    """sample(): BatchNorm on running statistics (sample i depends on z[i] alone, one sample works), no
    update of G's buffers, G's mode restored, no autograd graph."""
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(NZ, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, DIM))
    d = nn.Sequential(nn.Linear(DIM, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    trainer = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0)
    trainer.fit(data_tensor(), steps=3, batch_size=8, progress=False)
    buffers = {k: v.clone() for k, v in g.state_dict().items() if "running" in k or "batches" in k}
    z = torch.randn(6, NZ)
    out = trainer.sample(6, z=z)
    assert not out.requires_grad and g.training
    torch.testing.assert_close(trainer.sample(2, z=z[:2]), out[:2])
    assert trainer.sample(1).shape == (1, DIM)
    assert all(torch.equal(v, g.state_dict()[k]) for k, v in buffers.items())


def test_lr_scheduler_of_a_given_torch_optimizer_drives_the_trainer():
    """A drop-in user keeps their torch optimizer and its LR scheduler; the trainer runs the fused twin, so
    the scheduler must set the twin's learning rate (they share their param groups), with no warning."""
    import warnings
    g, d = mlp_pair()
    g_opt = torch.optim.Adam(g.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(g_opt, step_size=1, gamma=0.5)
    trainer = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0, g_optimizer=g_opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            trainer.step(torch.randn(8, DIM))
            sched.step()
    assert trainer.g_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 8)
    assert g_opt.param_groups is trainer.g_optimizer.param_groups
    # Loading a state (a manual resume) keeps the groups shared: the scheduler still drives the trainer.
    trainer.load_state_dict(trainer.state_dict())
    sched.step()
    assert trainer.g_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 16)
    assert g_opt.param_groups is trainer.g_optimizer.param_groups


def test_graph_arguments_follow_hyperparameter_changes():
    """The CUDA-graph bookkeeping, on CPU: captured graphs are dropped when a hyperparameter they were
    captured with changes (betas, momentum, the EMA's beta, a learning rate the kernels take as a float),
    but not when only a learning rate read from the device changes (tests/gpu replays the real thing)."""
    trainer = make_trainer(ema_beta=0.9)
    trainer._replays_since_capture = 100  # graphs that have been replayed a while
    trainer._graphs = {"warming up": object()}
    trainer.d_optimizer.param_groups[0]["betas"] = (0.3, 0.99)
    trainer._refresh_graph_arguments()
    assert trainer._graphs  # nothing captured yet: nothing to drop
    trainer._graphs = {"captured": object()}
    trainer._graph_hypers = trainer._graph_hyperparameters()
    trainer._refresh_graph_arguments()
    assert trainer._graphs  # nothing changed
    for change in (lambda: trainer.d_optimizer.param_groups[0].__setitem__("betas", (0.1, 0.99)),
                   lambda: trainer.g_optimizer.param_groups[0].__setitem__("lr", 1e-5),
                   lambda: setattr(trainer.ema, "beta", 0.5)):
        change()
        trainer._refresh_graph_arguments()
        assert not trainer._graphs
        trainer._graphs = {"captured": object()}
        trainer._graph_hypers = trainer._graph_hyperparameters()
        trainer._replays_since_capture = 100
    trainer.g_optimizer._device_lr = []  # as use_device_lr() leaves it on CUDA
    trainer._graph_hypers = trainer._graph_hyperparameters()
    trainer.g_optimizer.param_groups[0]["lr"] = 3e-5
    trainer._refresh_graph_arguments()
    assert trainer._graphs
    assert trainer.g_optimizer._device_lr[0][0].item() == pytest.approx(3e-5)  # synced, by group position
    trainer.g_optimizer.param_groups[0]["lr"] = torch.tensor(2e-5)  # a CPU tensor: read on the host
    trainer._refresh_graph_arguments()
    assert trainer.g_optimizer._device_lr[0][0].item() == pytest.approx(2e-5)
    # Hyperparameters changing every few steps: captured again and again would be slower than eager,
    # so the third quick change turns the graphs off, with a warning, and the learning rates are read
    # from the param groups again.
    trainer._graphs_on = True
    for beta1 in (0.4, 0.5, 0.6):
        trainer._graphs = {"captured": object()}
        trainer._graph_hypers = trainer._graph_hyperparameters()
        trainer._replays_since_capture = 2
        trainer.d_optimizer.param_groups[0]["betas"] = (beta1, 0.99)
        if beta1 < 0.6:
            trainer._refresh_graph_arguments()
            assert trainer._graphs_on
    with pytest.warns(RuntimeWarning, match="change every few steps.*without CUDA graphs"):
        trainer._refresh_graph_arguments()
    assert not trainer._graphs_on and trainer.g_optimizer._device_lr is None


def test_user_torch_optimizers_and_per_network_lr_match_torch_updates():
    """g_lr / d_lr and torch optimizers given to the trainer take effect: one d_step against the same
    update written with torch.optim by hand."""
    import torch.nn.functional as F
    for build in (lambda g, d: dict(d_lr=3e-3, g_lr=7e-4),
                  lambda g, d: dict(d_optimizer=torch.optim.SGD(d.parameters(), lr=0.05, momentum=0.9))):
        g, d = mlp_pair()
        g_ref, d_ref = copy.deepcopy(g), copy.deepcopy(d)
        kwargs = build(g, d)
        trainer = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0, **kwargs)
        ref_opt = (torch.optim.Adam(d_ref.parameters(), lr=3e-3, betas=(0.5, 0.999)) if "d_lr" in kwargs
                   else torch.optim.SGD(d_ref.parameters(), lr=0.05, momentum=0.9))
        for _ in range(2):
            real, z = torch.randn(8, DIM), torch.randn(8, NZ)
            trainer.d_step(real, z)
            ref_opt.zero_grad()
            logits_r, logits_f = d_ref(real).view(-1), d_ref(g_ref(z).detach()).view(-1)
            (F.softplus(-logits_r).mean() + F.softplus(logits_f).mean()).backward()
            ref_opt.step()
        for p, q in zip(d.parameters(), d_ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        if "g_lr" in kwargs:
            assert trainer.g_optimizer.param_groups[0]["lr"] == 7e-4


def test_resume_with_user_optimizers(tmp_path):
    """Torch optimizers given to the trainer run as fused twins; the checkpoint brings them back."""
    def build(model_seed):
        g, d = mlp_pair(model_seed)
        return Trainer(g, d, latent_dim=NZ, fuse=False, seed=0, ema_beta=0.5,
                       g_optimizer=torch.optim.AdamW(g.parameters(), lr=1e-3, weight_decay=0.1),
                       d_optimizer=torch.optim.SGD(d.parameters(), lr=1e-2, momentum=0.9, nesterov=True))

    x = data_tensor(24)
    whole = build(0)
    assert type(whole.d_optimizer).__name__ == "FusedSGD" and type(whole.g_optimizer).__name__ == "FusedAdam"
    whole.fit(x, steps=4, batch_size=4, progress=False)
    first = build(0)
    first.fit(x, steps=2, batch_size=4, progress=False)
    first.save(tmp_path / "ck.pt")
    resumed = Trainer.load(tmp_path / "ck.pt", *mlp_pair(5))
    assert type(resumed.d_optimizer).__name__ == "FusedSGD"
    assert resumed.d_optimizer.param_groups[0]["momentum"] == 0.9
    assert resumed.g_optimizer.param_groups[0]["weight_decay"] == 0.1
    resumed.fit(x, steps=2, batch_size=4, progress=False)
    for p, q in zip(params_of(whole), params_of(resumed)):
        assert torch.equal(p, q)
    z = torch.randn(3, NZ)
    assert torch.equal(whole.sample(3, z=z), resumed.sample(3, z=z))


@pytest.mark.parametrize("layout", ["two_groups", "reordered", "same_shapes_reordered"])
def test_resume_keeps_a_user_optimizers_param_groups_and_order(tmp_path, layout):
    """A torch optimizer whose groups are not one group over G's parameters in module order (two groups
    with their own lr, or the parameters listed in another order, also among same-shape tensors): the
    checkpoint records each group's parameters by name, and the resumed run equals the uninterrupted one."""
    def nets(model_seed):
        torch.manual_seed(model_seed)
        g = nn.Sequential(nn.Linear(NZ, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, DIM))
        return g, mlp_pair(model_seed)[1]

    def build(model_seed):
        g, d = nets(model_seed)
        ps = list(g.parameters())
        groups = {"two_groups": [{"params": ps[:2]}, {"params": ps[2:], "lr": 1e-3}],
                  "reordered": [{"params": ps[6:] + ps[:6]}],
                  "same_shapes_reordered": [{"params": ps[:2] + ps[4:6] + ps[2:4] + ps[6:]}]}[layout]
        return Trainer(g, d, latent_dim=NZ, fuse=False, seed=0,
                       g_optimizer=torch.optim.Adam(groups, lr=2e-4, betas=(0.5, 0.999)))

    x = data_tensor(24)
    whole = build(0)
    whole.fit(x, steps=6, batch_size=4, progress=False)
    first = build(0)
    first.fit(x, steps=3, batch_size=4, progress=False)
    first.save(tmp_path / "ck.pt")
    resumed = Trainer.load(tmp_path / "ck.pt", *nets(5))
    assert [len(g["params"]) for g in resumed.g_optimizer.param_groups] == [
        len(g["params"]) for g in whole.g_optimizer.param_groups]
    resumed.fit(x, steps=3, batch_size=4, progress=False)
    for p, q in zip(params_of(whole), params_of(resumed)):
        assert torch.equal(p, q)


def test_load_overrides_of_hyper_parameters_win_over_the_checkpoints(tmp_path):
    trainer = make_trainer(ema_beta=0.9)
    trainer.fit(data_tensor(), steps=2, batch_size=8, progress=False)
    trainer.save(tmp_path / "c.pt")
    loaded = Trainer.load(tmp_path / "c.pt", *mlp_pair(1), lr=1e-5, d_lr=3e-5, betas=(0.0, 0.9), ema_beta=0.5)
    assert [g["lr"] for g in loaded.g_optimizer.param_groups] == [1e-5]
    assert [g["lr"] for g in loaded.d_optimizer.param_groups] == [3e-5]
    assert all(g["betas"] == (0.0, 0.9) for o in (loaded.g_optimizer, loaded.d_optimizer) for g in o.param_groups)
    assert loaded.ema.beta == loaded.ema_beta == loaded.config()["ema_beta"] == 0.5
    plain = Trainer.load(tmp_path / "c.pt", *mlp_pair(1))  # without overrides: the checkpoint's values
    assert plain.g_optimizer.param_groups[0]["lr"] == trainer.g_optimizer.param_groups[0]["lr"]
    assert plain.ema.beta == 0.9


def test_load_state_dict_refuses_other_networks_and_optimizers_before_changing_anything():
    trainer = make_trainer(ema_beta=0.5)
    trainer.step(torch.randn(8, DIM))
    state = trainer.state_dict()
    # D of another width: refused, naming the discriminator, and G (loaded first before) is untouched
    other = make_trainer(ema_beta=0.5, model_seed=3)
    other.discriminator[0] = nn.Linear(DIM, 17)
    other.discriminator[-1] = nn.Linear(17, 1)
    before = params_of(other)
    with pytest.raises(ValueError, match="discriminator does not fit.*0.weight"):
        other.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(before, params_of(other))) and other.step_count == 0
    # another optimizer class
    g, d = mlp_pair()
    sgd = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0, ema_beta=0.5,
                  g_optimizer=torch.optim.SGD(g.parameters(), lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match="g_optimizer is fastgan.optim.fused.FusedAdam.*FusedSGD"):
        sgd.load_state_dict(state)
    # the same class over the parameters in another order
    g, d = mlp_pair()
    reordered = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0, ema_beta=0.5,
                        g_optimizer=torch.optim.Adam(list(g.parameters())[::-1], lr=2e-4, betas=(0.5, 0.999)))
    with pytest.raises(ValueError, match="other param groups"):
        reordered.load_state_dict(state)


def test_checkpoint_is_complete_and_loads_weights_only(tmp_path):
    trainer = make_trainer(ema_beta=0.5, precision="fp16")
    trainer.fit(data_tensor(), steps=2, batch_size=8, progress=False)
    trainer.save(tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    for key in ("generator", "discriminator", "ema", "g_optimizer", "d_optimizer", "scaler", "step", "rng",
                "config", "data_cursor"):
        assert state[key] is not None, key
    for key in ("trainer", "sample", "data", "global"):
        assert key in state["rng"]
    for key in ("torch", "python", "numpy"):
        assert key in state["rng"]["global"]
    assert state["g_optimizer"]["state"] and state["d_optimizer"]["state"]


def test_load_restores_every_global_rng(tmp_path):
    import random

    import numpy as np
    trainer = make_trainer()
    trainer.step(torch.randn(8, DIM))
    trainer.save(tmp_path / "c.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    Trainer.load(tmp_path / "c.pt", *mlp_pair(3))
    got_torch, got_python, got_numpy = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(got_torch, expected[0]) and got_python == expected[1] and got_numpy == expected[2]


def test_save_is_atomic(tmp_path, monkeypatch):
    trainer = make_trainer()
    trainer.step(torch.randn(8, DIM))
    path = tmp_path / "c.pt"
    trainer.save(path)
    good = torch.load(path, weights_only=True)
    trainer.step(torch.randn(8, DIM))

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trainer_module._checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save(path)
    monkeypatch.undo()
    kept = torch.load(path, weights_only=True)  # the previous checkpoint is intact
    assert kept["step"] == good["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoints_get_the_mode_of_other_files(tmp_path, umask):
    """A checkpoint is created as open() creates files (0666 less the umask), not mkstemp's 0600, so
    other users or jobs that can read the run folder's other files can read it too."""
    old = os.umask(umask)
    try:
        make_trainer().save(tmp_path / "c.pt")
        (tmp_path / "other.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == (tmp_path / "other.txt").stat().st_mode & 0o777 \
        == 0o666 & ~umask


def test_load_state_dict_checks_compatibility(tmp_path):
    trainer = make_trainer(ema_beta=0.5)
    trainer.step(torch.randn(8, DIM))
    state = trainer.state_dict()
    with pytest.raises(ValueError, match="loss"):
        make_trainer(loss="hinge", ema_beta=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="EMA"):
        make_trainer().load_state_dict(state)
    with pytest.raises(ValueError, match="checkpoint"):
        make_trainer().load_state_dict({"step": 3})


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("kwargs, match", [
    (dict(prior="cauchy"), "prior"),
    (dict(loss="softmax"), "loss"),
    (dict(d_steps=0), "d_steps"),
    (dict(d_steps=1.5), "d_steps"),
    (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(g_lr=-1.0), "g_lr"),
    (dict(d_lr=0), "d_lr"),
    (dict(betas=(0.5,)), "betas"),
    (dict(betas=(0.5, 1.0)), r"betas\[1\]"),
    (dict(r1_gamma=-1.0), "r1_gamma"),
    (dict(r1_every=0), "r1_every"),
    (dict(gp_lambda=-0.1, loss="wasserstein"), "gp_lambda"),
    (dict(gp_lambda=10.0), "gp_lambda.*wasserstein"),
    (dict(ema_beta=1.0), "ema_beta"),
    (dict(pack=0), "pack"),
    (dict(precision="fp8"), "precision"),
    (dict(cuda_graphs="always"), "cuda_graphs"),
    (dict(cuda_graphs=True), "cuda_graphs=True needs a CUDA device"),
    (dict(fuse="yes"), "fuse"),
    (dict(joint_d_forward="auto"), "joint_d_forward"),
    (dict(seed=1.5), "seed"),
    (dict(seed=2 ** 64), r"seed must be an int in \[-2\*\*63, 2\*\*64\)"),
])
def test_option_errors_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(**kwargs)


def test_optimizer_errors():
    g, d = mlp_pair()
    with pytest.raises(ValueError, match="g_lr.*g_optimizer"):
        Trainer(g, d, latent_dim=NZ, fuse=False, g_lr=1e-3, g_optimizer=torch.optim.Adam(g.parameters()))
    with pytest.raises(ValueError, match="g_optimizer holds a parameter.*swapped"):
        Trainer(g, d, latent_dim=NZ, fuse=False, g_optimizer=torch.optim.Adam(d.parameters()))
    with pytest.raises(TypeError, match="d_optimizer"):
        Trainer(g, d, latent_dim=NZ, fuse=False, d_optimizer="adam")
    with pytest.raises(ValueError, match="lr and betas set the default optimizers"):
        Trainer(g, d, latent_dim=NZ, fuse=False, lr=1e-3, g_optimizer=torch.optim.Adam(g.parameters()),
                d_optimizer=torch.optim.Adam(d.parameters()))
    with pytest.raises(ValueError, match="fp16.*needs fused optimizers.*d_optimizer"):
        with pytest.warns(RuntimeWarning, match="no fused twin"):
            Trainer(g, d, latent_dim=NZ, fuse=False, precision="fp16", d_optimizer=torch.optim.RMSprop(d.parameters()))


def test_unfused_optimizer_runs_as_it_is_with_a_warning():
    g, d = mlp_pair()
    g_ref, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    with pytest.warns(RuntimeWarning, match="RMSprop.*no fused twin"):
        trainer = Trainer(g, d, latent_dim=NZ, fuse=False, d_optimizer=torch.optim.RMSprop(d.parameters(), lr=1e-3))
    real, z = torch.randn(8, DIM), torch.randn(8, NZ)
    trainer.d_step(real, z)
    opt = torch.optim.RMSprop(d_ref.parameters(), lr=1e-3)
    logits_r, logits_f = d_ref(real).view(-1), d_ref(g_ref(z).detach()).view(-1)
    (torch.nn.functional.softplus(-logits_r).mean() + torch.nn.functional.softplus(logits_f).mean()).backward()
    opt.step()
    for p, q in zip(d.parameters(), d_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_network_errors():
    g, d = mlp_pair()
    with pytest.raises(ValueError, match="latent size unknown"):
        Trainer(g, d, fuse=False)
    with pytest.raises(ValueError, match="latent_dim"):
        Trainer(g, d, latent_dim=(4, 0), fuse=False)
    with pytest.raises(TypeError, match="discriminator"):
        Trainer(g, lambda x: x, latent_dim=NZ, fuse=False)
    with pytest.raises(ValueError, match="dtype.*generator.*discriminator|generator.*dtype"):
        Trainer(copy.deepcopy(g).double(), d, latent_dim=NZ, fuse=False)
    with pytest.raises(ValueError, match="device"):
        Trainer(g, copy.deepcopy(d).to("meta"), latent_dim=NZ, fuse=False)
    g.latent_dim = NZ
    assert Trainer(g, d, fuse=False).latent_dim == (NZ,)  # read from the generator


def test_step_errors_name_the_culprit():
    trainer = make_trainer(pack=2)
    with pytest.raises(ValueError, match="real has dtype torch.float64"):
        trainer.step(torch.randn(8, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="real is on meta"):
        trainer.step(torch.randn(8, DIM, device="meta"))
    with pytest.raises(ValueError, match="does not divide by pack=2"):
        trainer.step(torch.randn(7, DIM))
    with pytest.raises(ValueError, match="empty"):
        trainer.step(torch.randn(0, DIM))
    with pytest.raises(ValueError, match="z must have shape"):
        trainer.step(torch.randn(8, DIM), torch.randn(8, NZ + 1))
    with pytest.raises(ValueError, match="z has batch size 4 but real has 8"):
        trainer.step(torch.randn(8, DIM), torch.randn(4, NZ))
    with pytest.raises(TypeError, match="real"):
        trainer.step([1.0, 2.0])
    with pytest.raises(ValueError, match="generator's output has shape"):
        trainer.step(torch.randn(8, DIM + 1))
    with pytest.raises(ValueError, match="z has batch size 5, which does not divide by pack=2"):
        trainer.g_step(torch.randn(5, NZ))
    with pytest.raises(ValueError, match="n=3 but z holds 4 latents"):
        trainer.sample(3, z=torch.randn(4, NZ))
    g, d = mlp_pair()  # D's first layer takes DIM features, not pack x DIM
    with pytest.raises(ValueError, match=r"pack=2 D takes 2 samples .* must take 2 x 3 channels or features"):
        Trainer(g, d, latent_dim=NZ, fuse=False, pack=2).step(torch.randn(8, DIM))


def test_discriminator_output_must_be_one_value_per_sample():
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(NZ, DIM))
    class MeanLogit(nn.Module):  # one value for the whole batch
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(DIM, 1)

        def forward(self, x):
            return self.linear(x).mean()

    for d in (nn.Sequential(nn.Linear(DIM, 2)), MeanLogit(), nn.Sequential(nn.Linear(DIM, 3), nn.Unflatten(1, (3, 1)))):
        trainer = Trainer(g, d, latent_dim=NZ, fuse=False)
        with pytest.raises(ValueError, match="discriminator's output must be one value per D input"):
            trainer.step(torch.randn(8, DIM))


def test_generator_output_must_match_data():
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(NZ, 2 * DIM), nn.Unflatten(1, (2, DIM)))
    d = nn.Sequential(nn.Flatten(), nn.Linear(2 * DIM, 1))
    trainer = Trainer(g, d, latent_dim=NZ, fuse=False)
    with pytest.raises(ValueError, match="generator's output has shape"):
        trainer.step(torch.randn(8, 2 * DIM))


@pytest.mark.parametrize("data, match", [
    (torch.randn(0, DIM), "data is empty"),
    (torch.utils.data.TensorDataset(torch.randn(0, DIM)), "data is empty"),
    ([], "data is empty"),
    (torch.randn(5, DIM), "fewer than batch_size=8"),
    (torch.zeros(16, DIM, dtype=torch.int64), "dtype torch.int64"),
])
def test_fit_data_errors(data, match):
    with pytest.raises(ValueError, match=match):
        make_trainer().fit(data, steps=2, batch_size=8, progress=False)


class _OncePerProcess:
    """An iterable whose __iter__ hands back one shared iterator: it yields its batches once, ever."""

    def __init__(self, batches):
        self._it = iter(batches)

    def __iter__(self):
        return self._it


def test_on_checkpoint_sees_the_history_before_each_checkpoint_is_written(tmp_path):
    calls = []

    def on_checkpoint(trainer, step, history):
        calls.append((step, list(history["step"]), sorted(p.name for p in tmp_path.glob("checkpoint-*.pt"))))

    trainer = make_trainer()
    trainer.fit(data_tensor(), steps=6, batch_size=8, log_every=2, checkpoint_every=3, out_dir=tmp_path,
                progress=False, on_checkpoint=on_checkpoint)
    assert calls == [(3, [2.0], []), (6, [2.0, 4.0, 6.0], ["checkpoint-000000003.pt"])]
    with pytest.raises(TypeError, match="on_checkpoint"):
        trainer.fit(data_tensor(), steps=1, batch_size=8, progress=False, on_checkpoint="yes")


def test_log_cadence_counts_the_trainers_steps_across_fit_calls():
    """History rows at multiples of log_every of the trainer's steps: a run continued after 5 steps logs
    at 6 and 9, as an uninterrupted one does (and at its own last step)."""
    trainer = make_trainer()
    first = trainer.fit(data_tensor(), steps=5, batch_size=8, log_every=3, progress=False)
    second = trainer.fit(data_tensor(), steps=5, batch_size=8, log_every=3, progress=False)
    assert first["step"] == [3.0, 5.0] and second["step"] == [6.0, 9.0, 10.0]


def test_a_bad_device_names_the_argument():
    with pytest.raises(ValueError, match="device must be .* got 'cpux'"):
        make_trainer(device="cpux")


def test_fit_single_pass_iterable_that_runs_out_is_named_so():
    trainer = make_trainer()
    data = _OncePerProcess([torch.randn(8, DIM) for _ in range(3)])
    with pytest.raises(ValueError, match="data ran out after 1 epoch.*single-pass"):
        trainer.fit(data, steps=5, batch_size=8, progress=False)
    assert trainer.step_count == 3


def test_fit_refuses_an_out_dir_that_is_a_file_before_training(tmp_path):
    trainer = make_trainer()
    path = tmp_path / "not-a-folder"
    path.write_text("x")
    with pytest.raises(ValueError, match="out_dir .* exists and is not a folder"):
        trainer.fit(data_tensor(), steps=3, batch_size=8, checkpoint_every=2, out_dir=path, progress=False)
    assert trainer.step_count == 0


def test_fit_option_errors(tmp_path):
    trainer = make_trainer(pack=3)
    with pytest.raises(ValueError, match="checkpoint_every needs out_dir"):
        trainer.fit(data_tensor(), steps=2, batch_size=6, checkpoint_every=1, progress=False)
    with pytest.raises(ValueError, match="out_dir is the folder checkpoint_every writes"):
        trainer.fit(data_tensor(), steps=2, batch_size=6, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch_size=8 does not divide by pack=3"):
        trainer.fit(data_tensor(), steps=2, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="steps"):
        trainer.fit(data_tensor(), steps=-1, progress=False)
    with pytest.raises(ValueError, match="log_every"):
        trainer.fit(data_tensor(), steps=1, log_every=0, progress=False)
    with pytest.raises(TypeError, match="data must be"):
        trainer.fit("images/", steps=1, progress=False)
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data_tensor(12))

    with pytest.raises(TypeError, match="IterableDataset.*DataLoader"):
        trainer.fit(Stream(), steps=1, progress=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        trainer.fit((b for b in data_tensor(12).split(6)), steps=3, batch_size=6, progress=False)


def test_the_users_torch_optimizers_save_and_load_the_state_that_trains():
    """g_optimizer / d_optimizer given as torch optimizers run as fused twins; the user's objects stay
    meaningful: their state_dict is the running state (torch's layout), load_state_dict reaches it."""
    g, d = mlp_pair()
    opt_g, opt_d = torch.optim.Adam(g.parameters(), lr=1e-3), torch.optim.Adam(d.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt_d, step_size=1, gamma=0.5)
    trainer = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0, g_optimizer=opt_g, d_optimizer=opt_d)
    trainer.fit(data_tensor(), steps=3, batch_size=8, callbacks=[lambda *_: sched.step()], progress=False)
    for mine, running in ((opt_g, trainer.g_optimizer), (opt_d, trainer.d_optimizer)):
        saved, want = mine.state_dict(), running.state_dict()
        assert len(saved["state"]) == len(want["state"]) == len(list(mine.param_groups[0]["params"]))
        for i, entry in want["state"].items():
            for key, value in entry.items():
                torch.testing.assert_close(saved["state"][i][key], value)
        fresh = torch.optim.Adam(copy.deepcopy(d if mine is opt_d else g).parameters())
        fresh.load_state_dict(copy.deepcopy(saved))  # loads into torch's own Adam
    assert opt_d.param_groups[0]["lr"] == trainer.d_optimizer.param_groups[0]["lr"] == 1e-3 / 8
    # a resume in the user's code: load into the optimizer the trainer was built with
    saved = copy.deepcopy(opt_d.state_dict())
    g2, d2 = mlp_pair(1)
    opt_d2 = torch.optim.Adam(d2.parameters(), lr=1e-3)
    trainer2 = Trainer(g2, d2, latent_dim=NZ, fuse=False, seed=0, d_optimizer=opt_d2)
    opt_d2.load_state_dict(saved)
    assert opt_d2.param_groups is trainer2.d_optimizer.param_groups
    loaded = trainer2.d_optimizer.state_dict()
    assert loaded["param_groups"][0]["lr"] == 1e-3 / 8
    for i, entry in saved["state"].items():
        torch.testing.assert_close(loaded["state"][i]["exp_avg"], entry["exp_avg"])


def test_a_second_trainer_given_the_same_torch_optimizers_continues_their_state():
    """A second Trainer on the same networks and the same torch optimizers (a second fit in a notebook) runs
    the twins the first one made: a second twin would have started Adam afresh, and re-bound the
    parameters to new flat buffers behind the first twin's back."""
    g, d = mlp_pair()
    opt_g, opt_d = torch.optim.Adam(g.parameters(), lr=1e-3), torch.optim.Adam(d.parameters(), lr=1e-3)
    first = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0, g_optimizer=opt_g, d_optimizer=opt_d)
    first.fit(data_tensor(), steps=3, batch_size=8, progress=False)
    second = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0, g_optimizer=opt_g, d_optimizer=opt_d)
    assert second.g_optimizer is first.g_optimizer and second.d_optimizer is first.d_optimizer
    assert all(float(entry["step"]) == 3 for entry in opt_d.state_dict()["state"].values())
    second.fit(data_tensor(), steps=2, batch_size=8, progress=False)
    assert all(float(entry["step"]) == 5 for entry in opt_d.state_dict()["state"].values())


def test_a_dataset_of_items_that_cannot_be_batched_is_named():
    class Picture:  # e.g. a PIL image, returned without a ToTensor transform
        pass

    class Pictures(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return Picture(), 0

    with pytest.raises(TypeError, match=r"data\[\d+\] is a .*Picture, which cannot be batched.*ToTensor"):
        make_trainer().fit(Pictures(), steps=1, batch_size=4, progress=False)
