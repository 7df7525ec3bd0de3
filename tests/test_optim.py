"""FusedAdam / FusedSGD / EMA against torch.optim on the same parameters and the same gradients."""
import io
import warnings
from collections import defaultdict

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import fastgan.optim.fused as fused_mod
from fastgan._dispatch import extension
from fastgan.optim import EMA, FusedAdam, FusedSGD, fused_twin

SHAPES = [(7, 5), (13,), (3, 4, 5), (1,), (33, 17)]  # odd sizes, a single element, > one SIMD vector


def make_params(shapes=SHAPES, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float32).to(dtype)) for s in shapes]


def clone_params(params, dtype=None):
    return [nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


def random_grads(params, gen, scale=1.0):
    return [torch.randn(p.shape, generator=gen) * scale for p in params]


def assert_close_fp32(actual, expected, rtol=1e-6):
    """Within rtol of the reference, relative to the scale of the values (the parameters start as
    standard normal samples, so an element near 0 is compared at scale 1, not at its own size)."""
    for a, e in zip(actual, expected):
        a, e = a.detach().float(), e.detach().float()
        scale = e.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale.item())


ADAM_CASES = {
    "adam": (dict(lr=1e-2), dict(lr=1e-2), torch.optim.Adam),
    "adam_wd": (dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6),
                dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6), torch.optim.Adam),
    "adamw": (dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True), dict(lr=1e-2, weight_decay=0.1),
              torch.optim.AdamW),
}
SGD_CASES = {
    "sgd": dict(lr=0.05),
    "sgd_wd": dict(lr=0.05, weight_decay=0.01),
    "momentum": dict(lr=0.05, momentum=0.9),
    "momentum_dampening_wd": dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
}


def build(kind, case, params):
    if kind == "adam":
        ours_kw, torch_kw, torch_cls = ADAM_CASES[case]
        return FusedAdam(params[0], **ours_kw), torch_cls(params[1], **torch_kw)
    kw = SGD_CASES[case]
    return FusedSGD(params[0], **kw), torch.optim.SGD(params[1], **kw)


def run_both(ours, ref, ours_params, ref_params, steps, gen, **step_kw):
    for _ in range(steps):
        for p, q, g in zip(ours_params, ref_params, random_grads(ref_params, gen)):
            p.grad = g.clone().to(p.dtype)
            q.grad = g.clone().to(q.dtype)
        ours.step(**step_kw)
        ref.step()


ALL_CASES = [("adam", c) for c in ADAM_CASES] + [("sgd", c) for c in SGD_CASES]


@pytest.fixture(autouse=True)
def _need_extension_or_warning():
    # The fused optimizers work without fastgan._C (torch fallback) but warn once about it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def test_extension_is_built():
    ext = extension()
    assert ext is not None and hasattr(ext, "optim_adam_step"), "fastgan._C lacks the optimizer kernels"


@pytest.mark.parametrize("kind,case", ALL_CASES)
def test_100_steps_match_torch(kind, case):
    ours_p = make_params()
    ref_p = clone_params(ours_p)
    ours, ref = build(kind, case, (ours_p, ref_p))
    assert all(b.kernels is not None for bs in ours._buckets for b in bs)
    run_both(ours, ref, ours_p, ref_p, 100, torch.Generator().manual_seed(1))
    assert_close_fp32(ours_p, ref_p)
    assert float(ours.found_inf) == 0.0
    for p, q in zip(ours_p, ref_p):
        for key, value in ref.state[q].items():
            assert_close_fp32([ours.state[p][key]], [value], rtol=1e-5)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_several_param_groups(kind):
    ours_p = make_params()
    ref_p = clone_params(ours_p)

    def groups(ps):
        extra = dict(betas=(0.5, 0.9)) if kind == "adam" else dict(momentum=0.5, dampening=0.1)
        return [{"params": ps[:2]}, {"params": ps[2:4], "lr": 0.003, "weight_decay": 0.2, **extra},
                {"params": ps[4:], "lr": 0.02}]

    if kind == "adam":
        ours, ref = FusedAdam(groups(ours_p), lr=0.01), torch.optim.Adam(groups(ref_p), lr=0.01)
    else:
        ours, ref = FusedSGD(groups(ours_p), lr=0.01, momentum=0.9), torch.optim.SGD(groups(ref_p), lr=0.01,
                                                                                      momentum=0.9)
    assert len(ours._buckets) == 3
    run_both(ours, ref, ours_p, ref_p, 100, torch.Generator().manual_seed(2))
    assert_close_fp32(ours_p, ref_p)


@pytest.mark.parametrize("kind,tensor_lr", [("adam", False), ("adam", True), ("sgd", False), ("sgd", True)])
def test_scheduler(kind, tensor_lr):
    """OneCycleLR moves the learning rate and cycles the momentum (Adam's beta1, SGD's momentum): both must
    reach the fused update, as they reach torch's."""
    ours_p = make_params()
    ref_p = clone_params(ours_p)
    lr = torch.tensor(0.01) if tensor_lr else 0.01
    if kind == "adam":
        ours, ref = FusedAdam(ours_p, lr=lr), torch.optim.Adam(ref_p, lr=lr.clone() if tensor_lr else lr)
    else:
        ours = FusedSGD(ours_p, lr=lr, momentum=0.9)
        ref = torch.optim.SGD(ref_p, lr=lr.clone() if tensor_lr else lr, momentum=0.9)
    s1 = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=0.05, total_steps=60)
    s2 = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=0.05, total_steps=60)
    gen = torch.Generator().manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(60):
            run_both(ours, ref, ours_p, ref_p, 1, gen)
            s1.step()
            s2.step()
    assert float(ours.param_groups[0]["lr"]) == pytest.approx(float(ref.param_groups[0]["lr"]), rel=1e-6)
    assert_close_fp32(ours_p, ref_p)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_bf16_params_fp32_state(kind):
    """bf16 parameters: fp32 state and math, the parameter rounded to bf16 after each step -- the
    reference is torch's fp32 optimizer whose parameters are rounded to bf16 after each step."""
    base = make_params()
    ours_p = clone_params(base, torch.bfloat16)
    ref_p = clone_params(ours_p, torch.float32)
    if kind == "adam":
        ours, ref = FusedAdam(ours_p, lr=0.05, weight_decay=0.01), torch.optim.Adam(ref_p, lr=0.05, weight_decay=0.01)
    else:
        ours, ref = (FusedSGD(ours_p, lr=0.05, momentum=0.9), torch.optim.SGD(ref_p, lr=0.05, momentum=0.9))
    assert all(b.kernels is not None for bs in ours._buckets for b in bs)
    gen = torch.Generator().manual_seed(4)
    for _ in range(30):
        for p, q, g in zip(ours_p, ref_p, random_grads(ref_p, gen)):
            g = g.bfloat16()
            p.grad, q.grad = g.clone(), g.float()
        ours.step()
        ref.step()
        with torch.no_grad():
            for q in ref_p:
                q.copy_(q.bfloat16().float())
    for p in ours_p:
        assert p.dtype == torch.bfloat16
    for st in ours.state.values():
        assert all(v.dtype == torch.float32 for v in st.values())
    assert_close_fp32(ours_p, ref_p, rtol=1e-2)


def test_params_are_views_and_autograd_accumulates_into_flat_buffer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt = FusedAdam(model.parameters(), lr=1e-3)
    (bucket,) = opt._buckets[0]
    flat_p, flat_g = bucket.flat_param, bucket.flat_grad
    lo, hi = flat_p.data_ptr(), flat_p.data_ptr() + flat_p.numel() * flat_p.element_size()
    for p in model.parameters():
        assert lo <= p.data_ptr() < hi and p.untyped_storage().data_ptr() == flat_p.untyped_storage().data_ptr()
    model(torch.randn(8, 5)).sum().backward()  # first backward: grads were None -> hook re-attaches
    for p, view in zip(model.parameters(), bucket.grad_views):
        assert p.grad is view
    before = flat_g.clone()
    model(torch.randn(8, 5)).sum().backward()  # second backward: accumulates in place into the buffer
    assert not torch.equal(before, flat_g)
    for p, view in zip(model.parameters(), bucket.grad_views):
        assert p.grad is view


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_tiny_module_training_matches_torch(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    ref_model = nn.Sequential(nn.Linear(4, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    ref_model.load_state_dict(model.state_dict())
    if kind == "adam":
        ours, ref = FusedAdam(model.parameters(), lr=1e-3), torch.optim.Adam(ref_model.parameters(), lr=1e-3)
    else:
        ours = FusedSGD(model.parameters(), lr=1e-2, momentum=0.9)
        ref = torch.optim.SGD(ref_model.parameters(), lr=1e-2, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    for it in range(50):
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
        for m, o in ((model, ours), (ref_model, ref)):
            o.zero_grad(set_to_none=it % 2 == 0)  # both zero_grad flavours
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
    assert_close_fp32(list(model.parameters()), list(ref_model.parameters()), rtol=1e-5)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("layout", ["one_group", "two_groups"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_gradient_skips_whole_step(kind, layout, bad):
    ours_p = make_params()
    groups = [{"params": ours_p}] if layout == "one_group" else [{"params": ours_p[:2]}, {"params": ours_p[2:]}]
    model = nn.Module()
    model.ps = nn.ParameterList(ours_p)
    ema = EMA(model, beta=0.9)
    opt = FusedAdam(groups, lr=0.01, ema=ema) if kind == "adam" else FusedSGD(groups, lr=0.01, momentum=0.9, ema=ema)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        for p, g in zip(ours_p, random_grads(ours_p, gen)):
            p.grad = g
        opt.step()
    snapshot = [p.detach().clone() for p in ours_p]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in ours_p}
    shadows = [s.clone() for s in ema.shadow_params]
    for p, g in zip(ours_p, random_grads(ours_p, gen)):
        p.grad = g
    ours_p[-1].grad[3, 2] = bad  # the last buffer, after the others would have been updated
    opt.step()
    assert float(opt.found_inf) == 1.0
    for p, s in zip(ours_p, snapshot):
        assert torch.equal(p.detach(), s)
    for p in ours_p:
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[id(p)][k]), k
    for s, s0 in zip(ema.shadow_params, shadows):
        assert torch.equal(s, s0)
    ours_p[-1].grad[3, 2] = 0.0
    opt.step()
    assert float(opt.found_inf) == 0.0
    assert not torch.equal(ours_p[0].detach(), snapshot[0])


def test_found_inf_is_a_device_tensor_reused_across_steps():
    ps = make_params()
    opt = FusedAdam(ps, lr=0.01)
    flag = opt.found_inf
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.found_inf is flag and flag.shape == () and flag.dtype == torch.float32
    assert isinstance(opt.state[ps[0]]["step"], torch.Tensor) and float(opt.state[ps[0]]["step"]) == 1.0


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("scale", [1024.0, 3.0])
def test_unscale_matches_dividing_gradients_first(kind, scale):
    ours_p = make_params()
    ref_p = clone_params(ours_p)
    if kind == "adam":
        ours, ref = FusedAdam(ours_p, lr=0.01, weight_decay=0.01), torch.optim.Adam(ref_p, lr=0.01, weight_decay=0.01)
    else:
        ours, ref = FusedSGD(ours_p, lr=0.01, momentum=0.9), torch.optim.SGD(ref_p, lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(7)
    inv = torch.tensor(1.0 / scale)
    for _ in range(20):
        for p, q, g in zip(ours_p, ref_p, random_grads(ours_p, gen)):
            p.grad = g * scale
            q.grad = g * scale / scale
        ours.step(inv_scale=inv)
        ref.step()
    # torch.optim on the divided gradients (a power of two scales exactly; 1/3 differs from dividing by 3
    # in the last bit, and torch's own vectorised sqrt in the last bit of some inputs)
    assert_close_fp32(ours_p, ref_p)


def test_unscale_overflow_is_reported():
    ps = make_params()
    opt = FusedSGD(ps, lr=0.01)
    before = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.full_like(p, 3e38)
    opt.step(inv_scale=torch.tensor(2.0))  # 6e38 overflows float32
    assert float(opt.found_inf) == 1.0
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_fused_ema_matches_reference_lerp(kind):
    torch.manual_seed(0)
    # (no bias right before BatchNorm: its gradient is pure rounding noise, which Adam amplifies)
    model = nn.Sequential(nn.Linear(3, 8), nn.LeakyReLU(0.2), nn.BatchNorm1d(8), nn.Linear(8, 2))
    ref_model = nn.Sequential(nn.Linear(3, 8), nn.LeakyReLU(0.2), nn.BatchNorm1d(8), nn.Linear(8, 2))
    ref_model.load_state_dict(model.state_dict())
    ema = EMA(model, beta=0.9)
    if kind == "adam":
        ours, ref = FusedAdam(model.parameters(), lr=0.01, ema=ema), torch.optim.Adam(ref_model.parameters(), lr=0.01)
    else:
        ours = FusedSGD(model.parameters(), lr=0.01, momentum=0.9, ema=ema)
        ref = torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=0.9)
    ref_shadow = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(8)
    ours_p, ref_p = list(model.parameters()), list(ref_model.parameters())
    for _ in range(30):
        model(torch.randn(6, 3, generator=gen))  # moves BatchNorm's running statistics
        run_both(ours, ref, ours_p, ref_p, 1, gen)
        for s, p in zip(ref_shadow, ours_p):
            s.lerp_(p.detach(), 1 - 0.9)
    assert_close_fp32(ours_p, ref_p)
    assert_close_fp32(ema.shadow_params, ref_shadow, rtol=1e-5)
    # buffers (BatchNorm running stats) are copied
    for s, b in zip(ema.shadow_buffers, model.buffers()):
        assert torch.equal(s, b)
    averaged = ema.averaged_model()
    for p, s in zip(averaged.parameters(), ema.shadow_params):
        assert torch.equal(p.detach(), s) and p.grad is None
        assert p.data_ptr() != 0 and p.is_contiguous()
    assert not any(torch.equal(p, q) for p, q in zip(averaged.parameters(), model.parameters()))


def test_standalone_ema_update_state_dict_and_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, beta=0.75)
    ref = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(5, 3))  # moves BatchNorm's running statistics
        ema.update()
        for r, p in zip(ref, model.parameters()):
            r.lerp_(p.detach(), 0.25)
    for s, r in zip(ema.shadow_params, ref):
        torch.testing.assert_close(s, r, rtol=1e-6, atol=1e-7)
    for s, b in zip(ema.shadow_buffers, model.buffers()):
        assert torch.equal(s, b)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    other = EMA(model, beta=0.5)
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert other.beta == 0.75
    for a, b in zip(other.shadow_params, ema.shadow_params):
        assert torch.equal(a, b)
    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema.copy_to(target)
    for p, s in zip(target.parameters(), ema.shadow_params):
        assert torch.equal(p.detach(), s)
    with pytest.raises(ValueError, match="beta"):
        EMA(model, beta=1.5)
    with pytest.raises(TypeError, match="model"):
        EMA([torch.zeros(1)], beta=0.5)


def test_ema_of_bf16_params_keeps_fp32_shadow():
    model = nn.Linear(4, 4).bfloat16()
    ema = EMA(model, beta=0.999)
    opt = FusedAdam(model.parameters(), lr=0.1, ema=ema)
    assert all(s.dtype == torch.float32 for s in ema.shadow_params)
    start = [s.clone() for s in ema.shadow_params]
    ref = [s.clone() for s in ema.shadow_params]
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        for r, p in zip(ref, model.parameters()):
            r.lerp_(p.detach().float(), 1 - 0.999)
    assert all(not torch.equal(s, s0) for s, s0 in zip(ema.shadow_params, start))
    assert_close_fp32(ema.shadow_params, ref, rtol=1e-5)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_state_dict_ours_to_torch(kind):
    ours_p = make_params()
    ref_p = clone_params(ours_p)
    if kind == "adam":
        ours, ref = FusedAdam(ours_p, lr=0.01, weight_decay=0.1), torch.optim.Adam(ref_p, lr=0.5)
    else:
        ours, ref = FusedSGD(ours_p, lr=0.01, momentum=0.9), torch.optim.SGD(ref_p, lr=0.5)
    gen = torch.Generator().manual_seed(9)
    for _ in range(10):
        for p, g in zip(ours_p, random_grads(ours_p, gen)):
            p.grad = g
        ours.step()
    with torch.no_grad():
        for q, p in zip(ref_p, ours_p):
            q.copy_(p)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    ref.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert ref.param_groups[0]["lr"] == 0.01
    run_both(ours, ref, ours_p, ref_p, 20, gen)
    assert_close_fp32(ours_p, ref_p)


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_state_dict_torch_to_ours_and_fused_twin(kind):
    ref_p = make_params()
    if kind == "adam":
        ref = torch.optim.Adam([{"params": ref_p[:2]}, {"params": ref_p[2:], "lr": 0.002}], lr=0.01, weight_decay=0.1)
    elif kind == "adamw":
        ref = torch.optim.AdamW(ref_p, lr=0.01, weight_decay=0.1)
    else:
        ref = torch.optim.SGD(ref_p, lr=0.01, momentum=0.9, dampening=0.1)
    gen = torch.Generator().manual_seed(10)
    for _ in range(10):
        for q, g in zip(ref_p, random_grads(ref_p, gen)):
            q.grad = g
        ref.step()
    # (a) load_state_dict into a fresh fused optimizer with the same groups
    ours_p = clone_params(ref_p)
    groups = [{"params": ours_p[:2]}, {"params": ours_p[2:]}] if kind == "adam" else ours_p
    ours = FusedSGD(groups, lr=1.0) if kind == "sgd" else FusedAdam(groups, lr=1.0)
    ours.load_state_dict(ref.state_dict())
    assert ours.param_groups[0]["lr"] == 0.01
    # (b) the fused twin of (a copy of) the torch optimizer
    twin_p = clone_params(ref_p)
    ref_copy = type(ref)([dict(g, params=twin_p[i:i + len(g["params"])]) for i, g in
                          zip([0, 2], ref.param_groups)] if kind == "adam" else twin_p)
    ref_copy.load_state_dict(ref.state_dict())
    twin = fused_twin(ref_copy)
    assert isinstance(twin, FusedSGD if kind == "sgd" else FusedAdam)
    assert twin.param_groups[0].get("decoupled_weight_decay", False) == (kind == "adamw")
    gen2 = torch.Generator().manual_seed(11)
    for _ in range(20):
        for p, t, q, g in zip(ours_p, twin_p, ref_p, random_grads(ref_p, gen2)):
            p.grad, t.grad, q.grad = g.clone(), g.clone(), g.clone()
        ours.step()
        twin.step()
        ref.step()
    assert_close_fp32(ours_p, ref_p)
    assert_close_fp32(twin_p, ref_p)


def test_state_dict_ours_round_trip_and_classmethod_twin():
    ps = make_params()
    opt = FusedAdam(ps, lr=0.01)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["param_groups"][0]["amsgrad"] is False
    ps2 = clone_params(ps)
    opt2 = FusedAdam(ps2, lr=0.5)
    opt2.load_state_dict(torch.load(io.BytesIO(_saved(sd))))
    for p, q in zip(ps, ps2):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[q][k])
    sgd = torch.optim.SGD(clone_params(ps), lr=0.1)
    assert isinstance(FusedSGD.from_torch(sgd), FusedSGD)
    with pytest.raises(TypeError):
        FusedAdam.from_torch(torch.optim.SGD(clone_params(ps), lr=0.1))
    with pytest.raises(TypeError):
        fused_twin(torch.optim.RMSprop(clone_params(ps)))
    with pytest.raises(ValueError, match="amsgrad"):
        fused_twin(torch.optim.Adam(clone_params(ps), amsgrad=True))


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_hand_assigned_and_missing_grads(kind):
    """Gradients set by hand, set to None for some parameters (torch skips those), then the buffer
    views again: every step matches torch."""
    ours_p = make_params()
    ref_p = clone_params(ours_p)
    if kind == "adam":
        ours, ref = FusedAdam(ours_p, lr=0.01), torch.optim.Adam(ref_p, lr=0.01)
    else:
        ours, ref = FusedSGD(ours_p, lr=0.01, momentum=0.9), torch.optim.SGD(ref_p, lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(12)
    for it in range(12):
        grads = random_grads(ref_p, gen)
        for i, (p, q, g) in enumerate(zip(ours_p, ref_p, grads)):
            if (it + i) % 3 == 0:  # some parameters miss a step
                p.grad = q.grad = None
            elif it % 2 and p.grad is not None:  # write into whatever .grad is (the flat view)
                p.grad.copy_(g)
                q.grad = g.clone()
            else:
                p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        assert_close_fp32(ours_p, ref_p)
    for p, q in zip(ours_p, ref_p):
        if q in ref.state and "step" in ref.state[q]:
            assert float(ours.state[p]["step"]) == float(ref.state[q]["step"])


def test_zero_grad_both_ways():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = FusedSGD(model.parameters(), lr=0.1)
    (bucket,) = opt._buckets[0]
    model(torch.randn(2, 6)).sum().backward()
    assert all(p.grad is v for p, v in zip(model.parameters(), bucket.grad_views))
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is v for p, v in zip(model.parameters(), bucket.grad_views))
    assert torch.count_nonzero(bucket.flat_grad) == 0
    opt.zero_grad()  # torch's default: set_to_none=True
    assert all(p.grad is None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no gradients at all: nothing moves
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    model.weight.grad = torch.ones_like(model.weight)  # only one parameter gets a gradient
    opt.step()
    assert torch.equal(model.bias.detach(), before[1])
    torch.testing.assert_close(model.weight.detach(), before[0] - 0.1)


@pytest.mark.parametrize("kind", ["adamw", "momentum_dampening_wd"])
def test_zero_grad_keeps_missing_grads_missing(kind):
    """zero_grad(set_to_none=False) zeroes the gradients that exist and leaves None ones None, as torch
    does: a parameter autograd never reaches is then skipped by every step (weight decay and momentum
    must not move it), and its step count stays 0."""
    gen = torch.Generator().manual_seed(3)
    ours_p, ref_p = make_params(), None
    ref_p = clone_params(ours_p)
    ours, ref = build("adam" if kind == "adamw" else "sgd", kind, (ours_p, ref_p))
    for _ in range(4):
        ours.zero_grad(set_to_none=False)
        ref.zero_grad(set_to_none=False)
        for p, q, g in zip(ours_p[1:], ref_p[1:], random_grads(ref_p[1:], gen)):  # parameter 0: never a gradient
            if p.grad is None:
                p.grad, q.grad = g.clone(), g.clone()
            else:
                p.grad.add_(g)
                q.grad.add_(g)
        ours.step()
        ref.step()
        assert ours_p[0].grad is None and ref_p[0].grad is None
        assert_close_fp32(ours_p, ref_p)
    assert torch.equal(ours_p[0].detach(), ref_p[0].detach())
    saved_ours, saved_ref = ours.state_dict()["state"], ref.state_dict()["state"]
    assert sorted(saved_ours) == sorted(saved_ref) == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_fused_ema_averages_parameters_without_gradient(kind):
    """The EMA is an average of the weights after every step, gradient or not: a parameter the step skips
    still has its shadow pulled towards it, as ema.update() after a torch optimizer does (and as the
    fallback without the extension does); a skipped (non-finite) step moves no shadow."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    twin = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    twin.load_state_dict(model.state_dict())
    ema, ref_ema = EMA(model, beta=0.5), EMA(twin, beta=0.5)
    make = (lambda ps, **kw: FusedAdam(ps, lr=0.1, **kw)) if kind == "adam" else \
        (lambda ps, **kw: FusedSGD(ps, lr=0.1, momentum=0.9, **kw))
    ref_make = (lambda ps: torch.optim.Adam(ps, lr=0.1)) if kind == "adam" else \
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    opt, ref = make(model.parameters(), ema=ema), ref_make(twin.parameters())
    gen = torch.Generator().manual_seed(1)
    for it in range(5):
        for p, q, g in zip(model.parameters(), twin.parameters(), random_grads(list(twin.parameters()), gen)):
            p.grad, q.grad = g.clone(), g.clone()
        if it >= 1:  # the first layer gets no gradient from step 2 on; at step 4 no parameter has one
            for m in (model[0], twin[0]) + ((model[1], twin[1]) if it == 3 else ()):
                m.weight.grad = m.bias.grad = None
        opt.step()
        ref.step()
        ref_ema.update()
        assert_close_fp32(ema.shadow_params, ref_ema.shadow_params)
    before = [s.clone() for s in ema.shadow_params]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert opt.found_inf.item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, before))


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_load_state_dict_into_a_stepped_optimizer(kind):
    """Loading a checkpoint into an optimizer that has already stepped (a warm-up step before a CUDA graph
    capture, say): parameters without saved state start afresh -- moments and step count zero -- as a
    torch optimizer given the same checkpoint does."""
    ps = make_params()
    ref_p = clone_params(ps)
    src = clone_params(ps)
    if kind == "adam":
        source, ours, ref = torch.optim.Adam(src, lr=0.01), FusedAdam(ps, lr=0.01), torch.optim.Adam(ref_p, lr=0.01)
    else:
        source = torch.optim.SGD(src, lr=0.01, momentum=0.9, dampening=0.5)
        ours = FusedSGD(ps, lr=0.01, momentum=0.9, dampening=0.5)
        ref = torch.optim.SGD(ref_p, lr=0.01, momentum=0.9, dampening=0.5)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):  # ours steps every parameter five times
        for p, g in zip(ps, random_grads(ps, gen)):
            p.grad = g
        ours.step()
    src[0].grad = torch.randn(src[0].shape, generator=gen)
    source.step()  # the checkpoint has state for parameter 0 only
    sd = source.state_dict()
    ours.load_state_dict(sd)
    ref.load_state_dict(sd)
    with torch.no_grad():
        for p, q in zip(ps, ref_p):
            q.copy_(p)
    run_both(ours, ref, ps, ref_p, 3, gen)
    assert_close_fp32(ps, ref_p)


@pytest.mark.parametrize("fused_kw,torch_cls", [(dict(), torch.optim.Adam),
                                                (dict(decoupled_weight_decay=True), torch.optim.AdamW)])
def test_load_state_dict_of_older_torch_without_new_group_keys(fused_kw, torch_cls):
    """Param groups saved by torch < 2.6 lack ``decoupled_weight_decay``: the optimizer's own default fills
    it (FusedAdam(decoupled_weight_decay=True) stays AdamW), as torch's Adam / AdamW fill theirs."""
    ps = make_params()
    ref_p = clone_params(ps)
    src = torch_cls(clone_params(ps), lr=0.01, weight_decay=0.1)
    sd = src.state_dict()
    for group in sd["param_groups"]:
        del group["decoupled_weight_decay"]
    ours = FusedAdam(ps, lr=0.01, weight_decay=0.1, **fused_kw)
    ours.load_state_dict(sd)
    ref = torch_cls(ref_p, lr=0.01, weight_decay=0.1)
    ref.load_state_dict(sd)
    assert ours.param_groups[0]["decoupled_weight_decay"] == ref.param_groups[0]["decoupled_weight_decay"]
    run_both(ours, ref, ps, ref_p, 3, torch.Generator().manual_seed(6))
    assert_close_fp32(ps, ref_p)


def test_parameter_replaced_after_construction_is_reattached():
    """``module.to(memory_format=channels_last)`` after building the optimizer replaces the weights'
    tensors: the step must update the model's (new) parameters, not the abandoned flat buffer -- with one
    warning -- and refuse a change of dtype it cannot follow."""
    torch.manual_seed(0)
    conv, twin = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    twin.load_state_dict(conv.state_dict())
    opt, ref = FusedSGD(conv.parameters(), lr=0.1, momentum=0.9), torch.optim.SGD(twin.parameters(), lr=0.1,
                                                                                   momentum=0.9)
    conv.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6)
    fused_mod._warned.discard("reattach")
    with pytest.warns(RuntimeWarning, match="replaced after the optimizer was built"):
        for _ in range(3):
            opt.zero_grad()
            ref.zero_grad()
            conv(x).square().sum().backward()
            twin(x).square().sum().backward()
            opt.step()
            ref.step()
    assert_close_fp32(list(conv.parameters()), list(twin.parameters()))
    (bucket,) = opt._buckets[0]
    assert conv.weight.data_ptr() == bucket.flat_param.data_ptr()
    conv.double()
    conv.weight.grad = torch.ones_like(conv.weight)
    with pytest.raises(RuntimeError, match="build the optimizer after converting the model"):
        opt.step()


def _foreign_bucket(params, order, gap_after_first=0):
    """A flat gradient storage of another owner (DDP's bucket, say): the gradients of ``params`` end to
    end in ``order`` (optionally with a gap after the first). Returns (storage, per-parameter views)."""
    flat = torch.zeros(sum(p.numel() for p in params) + gap_after_first)
    views, off = [None] * len(params), 0
    for k, i in enumerate(order):
        n = params[i].numel()
        views[i] = flat[off:off + n].view(params[i].shape)
        off += n + (gap_after_first if k == 0 else 0)
    return flat, views


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_adopted_gradient_buckets_match_torch_and_copy_nothing(kind):
    """adopt_gradient_buckets (the Trainer's DDP route): gradients living end to end in one foreign
    storage make it the flat gradient buffer, parameters, state and EMA re-laid out in its order;
    a second storage is adopted again; one with a gap is declined (copied). Every step, the EMA and
    the state_dict match torch throughout."""
    ours_p = make_params()
    ref_p = clone_params(ours_p)
    holder = nn.Module()
    holder.ps = nn.ParameterList(ours_p)
    ema = EMA(holder, beta=0.8)
    if kind == "adam":
        ours = FusedAdam(ours_p, lr=0.01, weight_decay=0.01, ema=ema)
        ref = torch.optim.Adam(ref_p, lr=0.01, weight_decay=0.01)
    else:
        ours = FusedSGD(ours_p, lr=0.01, momentum=0.9, ema=ema)
        ref = torch.optim.SGD(ref_p, lr=0.01, momentum=0.9)
    ours.adopt_gradient_buckets()
    (bucket,) = ours._buckets[0]
    shadow_ref = [p.detach().clone() for p in ref_p]
    gen = torch.Generator().manual_seed(21)
    n = len(ours_p)
    storages = {2: _foreign_bucket(ours_p, list(reversed(range(n)))),       # DDP's first buckets: reversed
                6: _foreign_bucket(ours_p, [2, 0, 4, 1, 3]),                 # re-bucketed in another order
                10: _foreign_bucket(ours_p, list(range(n)), gap_after_first=3)}  # not one flat buffer
    flat, views = None, None
    for it in range(13):
        flat, views = storages.get(it, (flat, views))
        grads = random_grads(ref_p, gen)
        for i, (p, q, g) in enumerate(zip(ours_p, ref_p, grads)):
            q.grad = g.clone()
            if views is None:
                p.grad = g.clone()
            elif p.grad is not None and p.grad.data_ptr() == views[i].data_ptr():
                p.grad.copy_(g)  # in place, as DDP writes its bucket
            else:
                views[i].copy_(g)
                p.grad = views[i]
        ours.step()
        ref.step()
        for s, q in zip(shadow_ref, ref_p):
            s.lerp_(q.detach(), 1 - 0.8)
        assert_close_fp32(ours_p, ref_p)
        assert_close_fp32(ema.shadow_params, shadow_ref, rtol=1e-5)
        adopted = bucket.flat_grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() \
            if flat is not None else False
        assert adopted == (2 <= it < 10), it
        if adopted:  # the parameters sit where their gradients sit, in one new flat buffer
            for p, v in zip(ours_p, views):
                assert p.grad is not None and p.grad.data_ptr() == v.data_ptr()
                offset = (v.data_ptr() - flat.data_ptr()) // 4
                assert p.data_ptr() == bucket.flat_param.data_ptr() + 4 * offset
    # torch's layout of the state, also after two re-layouts
    theirs = ref.state_dict()["state"]
    for i, entry in ours.state_dict()["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(torch.as_tensor(value).float(), torch.as_tensor(theirs[i][key]).float(),
                                       rtol=1e-6, atol=1e-6)
    # zero_grad on an adopted storage: one fill of it, the .grad views kept
    ours.adopt_gradient_buckets()
    flat, views = storages[6]
    for p, v in zip(ours_p, views):
        p.grad = v
    ours.step()
    ours.zero_grad(set_to_none=False)
    assert torch.count_nonzero(flat) == 0
    assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(ours_p, views))


def test_validation_errors():
    ps = make_params()
    with pytest.raises(ValueError, match="lr"):
        FusedAdam(ps, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        FusedAdam(clone_params(ps), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        FusedSGD(clone_params(ps), lr=0.1, nesterov=True)
    with pytest.raises(TypeError, match="ema"):
        FusedAdam(clone_params(ps), ema=object())
    with pytest.raises(ValueError, match="floating"):
        FusedSGD([nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)], lr=0.1)
    opt = FusedAdam(clone_params(ps))
    with pytest.raises(TypeError, match="inv_scale"):
        opt.step(inv_scale=0.5)
    with pytest.raises(ValueError, match="inv_scale"):
        opt.step(inv_scale=torch.ones(2))
    sd = torch.optim.Adam(clone_params(ps), amsgrad=True).state_dict()
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(sd)
    # Every hyperparameter is checked, in the defaults and in each param group, with its name.
    bad = [(FusedAdam, dict(lr="a"), "lr must be a number"), (FusedAdam, dict(lr=None), "lr must be a number"),
           (FusedAdam, dict(lr=torch.ones(2)), "lr must be a number or a one-element"),
           (FusedAdam, dict(lr=torch.tensor(-1.0)), "lr must be a finite number >= 0"),
           (FusedAdam, dict(eps=None), "eps must be a number"), (FusedAdam, dict(betas=0.9), "betas must be a pair"),
           (FusedAdam, dict(betas=(0.9, float("nan"))), "betas must be a finite number in"),
           (FusedAdam, dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0"),
           (FusedSGD, dict(lr=None), "lr must be a number"),
           (FusedSGD, dict(lr=0.1, momentum=float("nan")), "momentum must be a finite number >= 0"),
           (FusedSGD, dict(lr=0.1, weight_decay=float("nan")), "weight_decay must be a finite number >= 0"),
           (FusedSGD, dict(lr=0.1, dampening=float("inf")), "dampening must be a finite number")]
    for cls, kw, message in bad:
        with pytest.raises(ValueError, match=message):
            cls(clone_params(ps), **kw)
    for cls, group, message in [(FusedAdam, dict(lr=-1), r"lr .* \(param group 1\)"),
                                (FusedAdam, dict(betas=(0.9, 1.5)), r"betas .* \(param group 1\)"),
                                (FusedSGD, dict(momentum=-0.5), r"momentum .* \(param group 1\)")]:
        opt = cls(clone_params(ps[:2]), lr=0.1)
        with pytest.raises(ValueError, match=message):
            opt.add_param_group(dict(params=clone_params(ps[2:]), **group))
        assert len(opt.param_groups) == len(opt._buckets) == 1  # the rejected group left nothing behind
    opt = FusedAdam(clone_params(ps[:2]), lr=0.1)
    with pytest.raises(ValueError, match="floating point"):
        opt.add_param_group(dict(params=[nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)]))
    assert len(opt.param_groups) == len(opt._buckets) == 1
    late = clone_params(ps[2:3])
    opt.add_param_group(dict(params=late, lr=0.5))  # takes position 1, its own lr
    assert opt._buckets[1][0].group_index == 1 and opt.param_groups[1]["lr"] == 0.5
    twice = clone_params(ps)
    with pytest.raises(ValueError, match="more than once"):
        FusedAdam(twice + twice[:1])
    with pytest.raises(ValueError, match="more than once"):  # named parameters (torch >= 2.6) too
        FusedAdam([("a", twice[0]), ("b", twice[1]), ("a_again", twice[0])])
    with pytest.raises(ValueError, match="beta must be a number"):
        EMA(nn.Linear(2, 2), beta="x")


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_fallback_without_extension_matches_torch(kind, monkeypatch):
    """Without fastgan._C the same math runs as torch ops (one warning), skip and EMA included."""
    monkeypatch.setattr(fused_mod, "extension", lambda: None)
    monkeypatch.setattr(fused_mod, "_warned", set())
    ours_p = make_params()
    ref_p = clone_params(ours_p)
    model = nn.Module()
    model.ps = nn.ParameterList(ours_p)
    ema = EMA(model, beta=0.8)
    with pytest.warns(RuntimeWarning, match="not built"):
        if kind == "adam":
            ours = FusedAdam([{"params": ours_p[:3]}, {"params": ours_p[3:]}], lr=0.01, weight_decay=0.1, ema=ema)
        else:
            ours = FusedSGD([{"params": ours_p[:3]}, {"params": ours_p[3:]}], lr=0.01, momentum=0.9, nesterov=True,
                            ema=ema)
    ref = torch.optim.Adam(ref_p, lr=0.01, weight_decay=0.1) if kind == "adam" else torch.optim.SGD(
        ref_p, lr=0.01, momentum=0.9, nesterov=True)
    assert all(b.kernels is None for bs in ours._buckets for b in bs)
    ref_shadow = [p.detach().clone() for p in ref_p]
    gen = torch.Generator().manual_seed(13)
    for it in range(30):
        run_both(ours, ref, ours_p, ref_p, 1, gen)
        for s, q in zip(ref_shadow, ref_p):
            s.lerp_(q.detach(), 0.2)
    assert_close_fp32(ours_p, ref_p)
    assert_close_fp32(ema.shadow_params, ref_shadow, rtol=1e-5)
    snapshot = [p.detach().clone() for p in ours_p]
    for p in ours_p:
        p.grad = torch.ones_like(p)
    ours_p[1].grad[5] = float("nan")
    ours.step()
    assert float(ours.found_inf) == 1.0
    assert all(torch.equal(p.detach(), s) for p, s in zip(ours_p, snapshot))


def test_float64_params_use_torch_path_and_match():
    ours_p = make_params(dtype=torch.float64)
    ref_p = clone_params(ours_p)
    with pytest.warns(RuntimeWarning, match="float64"):
        fused_mod._warned.discard(f"dtype-cpu-{torch.float64}")
        ours = FusedAdam(ours_p, lr=0.01)
    ref = torch.optim.Adam(ref_p, lr=0.01)
    run_both(ours, ref, ours_p, ref_p, 20, torch.Generator().manual_seed(14))
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("bad_at", [None, 5, 119_990])  # none / in the first / in the last thread's slice
def test_large_buffer_threaded_check_then_update(kind, bad_at):
    """A buffer big enough for the multi-threaded path (check each slice, barrier, update)."""
    shapes = [(300, 400), (17,)]
    ours_p = make_params(shapes)
    ref_p = clone_params(ours_p)
    if kind == "adam":
        ours, ref = FusedAdam(ours_p, lr=0.01, weight_decay=0.1), torch.optim.Adam(ref_p, lr=0.01, weight_decay=0.1)
    else:
        ours, ref = FusedSGD(ours_p, lr=0.01, momentum=0.9), torch.optim.SGD(ref_p, lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(15)
    run_both(ours, ref, ours_p, ref_p, 5, gen)
    assert_close_fp32(ours_p, ref_p)
    before = [p.detach().clone() for p in ours_p]
    for p, g in zip(ours_p, random_grads(ours_p, gen)):
        p.grad = g
    if bad_at is not None:
        ours_p[0].grad.view(-1)[bad_at] = float("inf")
    ours.step()
    assert float(ours.found_inf) == (0.0 if bad_at is None else 1.0)
    unchanged = all(torch.equal(p.detach(), b) for p, b in zip(ours_p, before))
    assert unchanged == (bad_at is not None)


def _adam_step_ieee_float32(p, g, v0, step, lr, beta1, beta2, eps):
    """torch.optim.Adam's update from exp_avg = 0, evaluated op by op in IEEE float32 (NumPy), with the
    bias corrections in double as torch computes them. exp_avg.lerp_(g, 1 - beta1) from 0 is one
    rounded product (the FMA's addend is 0), so every operation here is a single float32 rounding."""
    np = pytest.importorskip("numpy")
    f32 = np.float32
    p, g, v0 = p.numpy(), g.numpy(), v0.numpy()
    m = f32(1 - beta1) * g
    v = v0 * f32(beta2) + f32(1 - beta2) * g * g
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = np.sqrt(v) / f32(bc2 ** 0.5) + f32(eps)
    return torch.from_numpy(p + f32(-(lr / bc1)) * m / denom), torch.from_numpy(m), torch.from_numpy(v)


@pytest.mark.parametrize("n", [1_000, 100_003])  # one thread / threaded slices updated in blocks from the end
@pytest.mark.parametrize("step", [1, 2, 7, 100, 12345])  # a different sqrt(bias_correction2) divisor each
def test_adam_kernel_is_float32_exact(n, step):
    """The kernel's element-wise Adam is bit-identical to the float32 evaluation of torch's formula
    (it divides by sqrt(bias_correction2) as a double multiply, which must round identically) over
    gradients and second moments spanning 30 orders of magnitude."""
    ext = extension()
    gen = torch.Generator().manual_seed(step)
    p = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)
    g = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 8)
    v0 = torch.exp(torch.randn(n, generator=gen) * 8)
    lr, beta1, beta2, eps = 1e-3, 0.5, 0.999, 1e-8
    param, m, v = p.clone(), torch.zeros(n), v0.clone()
    steps, found_inf = torch.full((1,), float(step - 1)), torch.zeros(())
    ext.optim_adam_step(param, g.clone(), m, v, steps, found_inf, None, None, lr, beta1, beta2, eps, 0.0, False,
                        None, 0.0, True)
    want_p, want_m, want_v = _adam_step_ieee_float32(p, g, v0, step, lr, beta1, beta2, eps)
    assert torch.equal(m, want_m) and torch.equal(v, want_v)
    assert torch.equal(param, want_p), f"{(param != want_p).sum().item()} of {n} elements differ"
    assert float(steps) == step and float(found_inf) == 0.0


def test_step_hooks_profiler_and_grad_mode():
    """step() skips torch's profiling wrapper only while nothing needs it: hooks (own and global) and
    the profiler range still work; grad mode is restored; a closure runs with grad enabled."""
    params = make_params()
    opt = FusedAdam(params, lr=0.01)
    gen = torch.Generator().manual_seed(16)

    def set_grads():
        for p, g in zip(params, random_grads(params, gen)):
            p.grad = g

    calls = []
    handles = [opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
               opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
               register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global"))]
    set_grads()
    opt.step()
    assert calls == ["global", "pre", "post"]
    for h in handles:
        h.remove()
    calls.clear()
    set_grads()
    before = [p.detach().clone() for p in params]
    opt.step()
    assert calls == [] and not torch.equal(params[0].detach(), before[0])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert any(e.name == "Optimizer.step#FusedAdam.step" for e in prof.events())
    assert torch.is_grad_enabled()
    with torch.no_grad():
        opt.step()
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    seen = []
    opt.step(closure=lambda: seen.append(torch.is_grad_enabled()) or torch.zeros(()))
    assert seen == [True] and torch.is_grad_enabled()


def test_large_flat_buffers_are_2mb_aligned_zeroed_and_freed():
    """Flat buffers from 2 MB up are fresh 2 MB aligned mappings (huge-page candidates); smaller ones
    and non-kernel devices use torch.zeros. Both are zero-filled and behave as ordinary tensors."""
    big = fused_mod.flat_zeros(1 << 20, torch.float32, torch.device("cpu"))
    small = fused_mod.flat_zeros(1000, torch.bfloat16, "cpu")
    assert big.data_ptr() % (2 << 20) == 0 and big.shape == (1 << 20,) and big.dtype == torch.float32
    assert small.dtype == torch.bfloat16 and not small.any() and not big.any()
    big[-1] = 3.0  # the whole mapping is writable, including the last element
    view = big[-10:].clone()
    del big  # unmapped by the deleter; the clone stays valid
    assert float(view[-1]) == 3.0
    params = make_params([(1024, 1024), (5,)])
    opt = FusedAdam(params, lr=0.01)
    (bucket,) = opt._buckets[0]
    assert bucket.flat_param.data_ptr() % (2 << 20) == 0 and bucket.flat_grad.data_ptr() % (2 << 20) == 0
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # storages of mapped buffers serialise as any other


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [37, 100_003])  # one thread / threaded slices
def test_nonfinite_check_detects_exactly_inf_and_nan(dtype, n):
    """optim_nonfinite_check tests the exponent bits: every inf/NaN (either sign, any payload) is found
    anywhere in the buffer; the largest finite values, subnormals and -0.0 are not; with an inverse
    scale the unscaled value is tested."""
    ext = extension()
    finfo = torch.finfo(dtype)
    neg_nan = -torch.tensor(float("nan"))
    bad_values = [float("inf"), float("-inf"), float("nan"), float(neg_nan)]
    fine_values = [finfo.max, -finfo.max, finfo.tiny / 4, -0.0]

    def found(values_at, inv_scale=None):
        g = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
        for i, value in values_at:
            g[i] = value
        flag = torch.zeros(())
        ext.optim_nonfinite_check(g, inv_scale, flag)
        return float(flag)

    for value in bad_values:
        for i in (0, n // 2, n - 1):
            assert found([(i, value)]) == 1.0, (value, i)
    assert found([(i, v) for i, v in zip((0, n // 3, n // 2, n - 1), fine_values)]) == 0.0
    assert found([(n - 1, finfo.max)], inv_scale=torch.tensor(4.0)) == 1.0  # overflows once unscaled
    assert found([(n - 1, float("inf"))], inv_scale=torch.tensor(0.0)) == 1.0  # inf * 0 = NaN
    assert found([(n - 1, finfo.max)], inv_scale=torch.tensor(0.5)) == 0.0


ZERO_IN_STEP_LAYOUTS = {
    # name: (shapes, param groups as index lists, parameters that never get a gradient)
    "one_buffer": (SHAPES, [[0, 1, 2, 3, 4]], []),
    "two_groups": (SHAPES, [[0, 1], [2, 3, 4]], []),                 # the check runs before both updates
    "missing_grad": (SHAPES, [[0, 1, 2, 3, 4]], [2]),                # stepped parameter by parameter
    "threaded": ([(300, 400), (1, 17), (333,)], [[0, 1, 2]], []),    # slices of both threads, many chunks
}


def _zero_in_step_pair(kind, dtype, layout, ema_beta):
    shapes, groups, _ = ZERO_IN_STEP_LAYOUTS[layout]
    pair = []
    for _ in range(2):
        params = make_params(shapes, dtype=dtype, seed=21)
        model = nn.Module()
        model.ps = nn.ParameterList(params)
        ema = EMA(model, beta=ema_beta) if ema_beta is not None else None
        param_groups = [{"params": [params[i] for i in g]} for g in groups]
        if kind == "adam":
            opt = FusedAdam(param_groups, lr=0.01, weight_decay=0.05, ema=ema)
        elif kind == "adamw":
            opt = FusedAdam(param_groups, lr=0.01, weight_decay=0.05, decoupled_weight_decay=True, ema=ema)
        else:
            opt = FusedSGD(param_groups, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01, ema=ema)
        pair.append((params, opt, ema))
    return pair


@pytest.mark.parametrize("path", ["kernel", "older_build", "torch_ops"])
@pytest.mark.parametrize("layout", list(ZERO_IN_STEP_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_step_zero_grad_equals_step_then_zero_grad(kind, dtype, layout, path, monkeypatch):
    """step(zero_grad=True) leaves exactly what step(); zero_grad(set_to_none=False) leaves: the same
    parameters, state, EMA and found_inf bit for bit, a zero gradient buffer that the .grad views still
    point into (autograd accumulates the next gradients there), missing gradients still None; also
    around a skipped (non-finite) step, with an inverse loss scale, and on the paths that zero in a
    fill after the update (an extension built before the option, torch ops without the extension)."""
    if path == "older_build":
        monkeypatch.setattr(fused_mod, "_zeroes_in_pass", lambda kernels: False)
    elif path == "torch_ops":
        monkeypatch.setattr(fused_mod, "extension", lambda: None)
    threads = torch.get_num_threads()
    if layout == "threaded":
        torch.set_num_threads(2)
    (ours_p, ours, ours_ema), (ref_p, ref, ref_ema) = _zero_in_step_pair(kind, dtype, layout, 0.9 if kind != "adamw"
                                                                         else None)
    never = ZERO_IN_STEP_LAYOUTS[layout][2]
    gen = torch.Generator().manual_seed(22)
    inv_scale = torch.tensor(0.25)
    try:
        for it in range(6):
            for i, (p, q, g) in enumerate(zip(ours_p, ref_p, random_grads(ref_p, gen, scale=4.0))):
                if i in never:
                    continue
                g = g.to(dtype)
                if it == 3 and i == len(ours_p) - 1:
                    g.view(-1)[-1] = float("inf")  # this step is skipped by both
                for param in (p, q):  # as autograd does: the first gradient is handed over, later ones added
                    if param.grad is None:
                        param.grad = g.clone()
                    else:
                        param.grad.add_(g)
            scale = inv_scale if it % 2 else None
            ours.step(inv_scale=scale, zero_grad=True)
            ref.step(inv_scale=scale)
            ref.zero_grad(set_to_none=False)
            assert float(ours.found_inf) == float(ref.found_inf) == (1.0 if it == 3 else 0.0)
            for p, q in zip(ours_p, ref_p):
                assert torch.equal(p.detach(), q.detach())
                assert (p.grad is None) == (q.grad is None)
                if p.grad is not None:
                    assert torch.count_nonzero(p.grad) == 0
                    assert any(p.grad is v for bs in ours._buckets for b in bs for v in b.grad_views)
                for key, value in ref.state[q].items():
                    assert torch.equal(ours.state[p][key], value), key
            for b in (b for bs in ours._buckets for b in bs):
                assert torch.count_nonzero(b.flat_grad) == 0
            if ours_ema is not None:
                for s, t in zip(ours_ema.shadow_params, ref_ema.shadow_params):
                    assert torch.equal(s, t)
    finally:
        torch.set_num_threads(threads)
    assert all(ours_p[i].grad is None for i in never)
    moved = [not torch.equal(p.detach(), q) for p, q in zip(ours_p, make_params(ZERO_IN_STEP_LAYOUTS[layout][0],
                                                                                 dtype=dtype, seed=21))]
    assert moved == [i not in never for i in range(len(ours_p))]


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("n", [1_000, 100_003])  # one thread / threaded slices, chunks and a ragged tail
def test_kernel_zero_grad_zeroes_every_element(kind, skip, n):
    """The kernels' zero_grad=True: the update is the one without it, every gradient element is zero
    afterwards (each thread's slice, each chunk, the tail), also when the step is skipped."""
    ext = extension()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for zero in (False, True):
            gen = torch.Generator().manual_seed(23)
            param, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
            if skip:
                grad[n // 2] = float("nan")
            state = [torch.zeros(n), torch.zeros(n)] if kind == "adam" else [torch.randn(n, generator=gen)]
            steps, found_inf = torch.zeros(1), torch.zeros(())
            if kind == "adam":
                ext.optim_adam_step(param, grad, *state, steps, found_inf, None, None, 0.01, 0.9, 0.999, 1e-8, 0.0,
                                    False, None, 0.0, True, zero)
            else:
                steps.fill_(1.0)  # a later step: the momentum buffer is read
                ext.optim_sgd_step(param, grad, state[0], steps, found_inf, None, None, 0.01, 0.9, 0.0, False, 0.0,
                                   None, 0.0, True, zero)
            assert float(found_inf) == float(skip)
            if zero:
                assert torch.count_nonzero(grad) == 0
            results.append((param, *state, steps))
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


def _sgd_pair(**kw):
    ours_p = make_params()
    ref_p = clone_params(ours_p)
    return ours_p, ref_p, FusedSGD(ours_p, **kw), torch.optim.SGD(ref_p, **kw)


def _assert_momentum_matches(ours, ref, ours_p, ref_p):
    assert_close_fp32(ours_p, ref_p)
    saved = ours.state_dict()["state"]
    for i, (p, q) in enumerate(zip(ours_p, ref_p)):
        assert ("momentum_buffer" in ref.state[q]) == ("momentum_buffer" in saved.get(i, {})), i
        if "momentum_buffer" in ref.state[q]:
            assert_close_fp32([ours.state[p]["momentum_buffer"]], [ref.state[q]["momentum_buffer"]])


@pytest.mark.parametrize("path", ["kernel", "torch_ops"])
@pytest.mark.parametrize("absent", [0, 1])
def test_sgd_momentum_switched_on_while_a_parameter_has_no_gradient(absent, path, monkeypatch):
    """Momentum turned on by a schedule at a step where one parameter has no gradient: each parameter's
    first momentum update copies its gradient (torch's buffer starts as a clone), later ones blend."""
    if path == "torch_ops":
        monkeypatch.setattr(fused_mod, "extension", lambda: None)
    ours_p, ref_p, ours, ref = _sgd_pair(lr=0.01, momentum=0.0)
    gen = torch.Generator().manual_seed(31)
    for it in range(6):
        if it == 2:
            for opt in (ours, ref):
                opt.param_groups[0]["momentum"] = 0.9
        for p, q, g in zip(ours_p, ref_p, random_grads(ref_p, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        if it == 2:
            ours_p[absent].grad = ref_p[absent].grad = None
        ours.step()
        ref.step()
        _assert_momentum_matches(ours, ref, ours_p, ref_p)


@pytest.mark.parametrize("path", ["kernel", "torch_ops"])
def test_sgd_steps_without_momentum_do_not_start_a_momentum_buffer(path, monkeypatch):
    """A parameter first stepped while momentum is 0 has no momentum buffer (state_dict has none), and when
    momentum comes back its buffer starts as its gradient, not as a dampened blend into zeros."""
    if path == "torch_ops":
        monkeypatch.setattr(fused_mod, "extension", lambda: None)
    ours_p, ref_p, ours, ref = _sgd_pair(lr=0.01, momentum=0.9, dampening=0.5)
    gen = torch.Generator().manual_seed(32)
    for it in range(4):
        for opt in (ours, ref):
            opt.param_groups[0]["momentum"] = 0.0 if it == 1 else 0.9
        for p, q, g in zip(ours_p, ref_p, random_grads(ref_p, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        if it == 0:
            ours_p[0].grad = ref_p[0].grad = None
        ours.step()
        ref.step()
        if it == 1:
            assert sorted(ours.state_dict()["state"]) == sorted(
                i for i, s in ref.state_dict()["state"].items() if "momentum_buffer" in s) == [1, 2, 3, 4]
        _assert_momentum_matches(ours, ref, ours_p, ref_p)


def test_sgd_momentum_buffers_loaded_into_a_group_without_momentum_are_kept():
    """torch keeps loaded momentum buffers while a group's momentum is 0 (and re-saves them); so do we,
    and they are used again once momentum returns."""
    src_p, _, src, _ = _sgd_pair(lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(33)
    for _ in range(3):
        for p, g in zip(src_p, random_grads(src_p, gen)):
            p.grad = g
        src.step()
    src.param_groups[0]["momentum"] = 0.0  # a checkpoint taken while a schedule had momentum at 0
    saved = src.state_dict()
    ours_p, ref_p, ours, ref = _sgd_pair(lr=0.01, momentum=0.0)
    for opt in (ours, ref):
        opt.load_state_dict(saved)
    assert sorted(ours.state_dict()["state"]) == sorted(ref.state_dict()["state"]) == [0, 1, 2, 3, 4]
    for it in range(4):
        for opt in (ours, ref):
            opt.param_groups[0]["momentum"] = 0.0 if it < 2 else 0.9
        for p, q, g in zip(ours_p, ref_p, random_grads(ref_p, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        _assert_momentum_matches(ours, ref, ours_p, ref_p)


def test_zero_size_parameters_count_steps_like_torch():
    """A zero-size parameter's step count advances with the others' also when a bucket is stepped
    parameter by parameter, and the bucket returns to one whole-buffer call once counts agree."""
    shapes = [(3,), (0, 4), (2,)]
    ours_p, ref_p = make_params(shapes), None
    ref_p = clone_params(ours_p)
    ours, ref = FusedAdam(ours_p, lr=0.01), torch.optim.Adam(ref_p, lr=0.01)
    gen = torch.Generator().manual_seed(34)
    for it in range(4):
        for p, q, g in zip(ours_p, ref_p, random_grads(ref_p, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        if it == 1:
            ours_p[2].grad = ref_p[2].grad = None
        ours.step()
        ref.step()
    steps = lambda opt: {i: float(s["step"]) for i, s in opt.state_dict()["state"].items()}  # noqa: E731
    assert steps(ours) == steps(ref) == {0: 4.0, 1: 4.0, 2: 3.0}
    assert_close_fp32([ours_p[0], ours_p[2]], [ref_p[0], ref_p[2]])
    ours_p[0].grad = ref_p[0].grad = None  # parameter 0 misses a step too: all counts 4 again
    ours_p[1].grad = torch.zeros(0, 4)
    for opt in (ours, ref):
        opt.step()
    assert steps(ours) == steps(ref) == {0: 4.0, 1: 5.0, 2: 4.0}


def test_load_state_dict_refuses_state_of_another_shape():
    ps = make_params()
    opt = FusedAdam(ps, lr=0.01)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    saved["state"][4]["exp_avg"] = torch.zeros(33)  # parameter 4 is (33, 17)
    fresh = FusedAdam(make_params(), lr=0.01)
    with pytest.raises(ValueError, match=r"state\[4\]\['exp_avg'\].*\(33,\).*\(33, 17\)"):
        fresh.load_state_dict(saved)
    assert not fresh.state and all(not b.state for bs in fresh._buckets for b in bs)  # nothing was loaded
    sgd_saved = {"state": {0: {"momentum_buffer": torch.zeros(5, 7)}},
                 "param_groups": [dict(FusedSGD(make_params(), lr=0.1).param_groups[0], params=[0, 1, 2, 3, 4])]}
    with pytest.raises(ValueError, match="momentum_buffer"):
        FusedSGD(make_params(), lr=0.1).load_state_dict(sgd_saved)


@pytest.mark.parametrize("cls", [FusedAdam, torch.optim.Adam])
def test_load_state_dict_hooks_as_torch_runs_them(cls):
    """A pre-hook's returned state_dict is the one loaded; a post-hook runs after everything and its
    changes to the state stay (ran against torch.optim.Adam as well, to pin the expected behaviour)."""
    def pre_hook(opt, state_dict):
        state_dict = {"state": {i: dict(s, exp_avg=torch.full_like(s["exp_avg"], 0.5))
                                for i, s in state_dict["state"].items()},
                      "param_groups": state_dict["param_groups"]}
        return state_dict

    calls = []

    def post_hook(opt):
        calls.append(float(opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].flatten()[0]))
        for s in opt.state.values():
            s["exp_avg_sq"].fill_(0.25)

    src = cls(make_params(), lr=0.01)
    for p in src.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    src.step()
    ps = make_params()
    opt = cls(ps, lr=0.01)
    opt.register_load_state_dict_pre_hook(pre_hook)
    opt.register_load_state_dict_post_hook(post_hook)
    opt.load_state_dict(src.state_dict())
    assert calls == [0.5]
    for p in ps:
        assert torch.all(opt.state[p]["exp_avg"] == 0.5) and torch.all(opt.state[p]["exp_avg_sq"] == 0.25)


def test_torch_add_param_group_after_fused_twin_is_stepped():
    """fused_twin shares param_groups with the torch optimizer: a group added through the torch
    optimizer afterwards is bucketed at the next step and stepped (not silently skipped)."""
    ps = make_params()
    torch_opt = torch.optim.Adam(ps[:3], lr=0.01)
    twin = fused_twin(torch_opt)
    torch_opt.add_param_group({"params": ps[3:], "lr": 0.1})
    ref_p = clone_params(ps)
    ref = torch.optim.Adam([{"params": ref_p[:3]}, {"params": ref_p[3:], "lr": 0.1}], lr=0.01)
    gen = torch.Generator().manual_seed(35)
    for _ in range(3):
        for p, q, g in zip(ps, ref_p, random_grads(ref_p, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        twin.step()
        ref.step()
    assert len(twin._buckets) == 2
    assert_close_fp32(ps, ref_p)


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_pickling_or_copying_a_fused_optimizer_is_a_clear_error(copier):
    import copy
    import pickle
    opt = FusedAdam(make_params(), lr=0.01)
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(opt) if copier == "deepcopy" else pickle.dumps(opt)


@pytest.mark.parametrize("how", ["clear", "new_container", "del_one", "empty_entry", "entry_values_copied"])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_state_changed_by_hand_is_honoured_as_torch_does(kind, how):
    """Entries of ``optimizer.state`` cleared, deleted or replaced by hand (resetting the moments as
    ``opt.state.clear()`` / ``opt.state = defaultdict(dict)`` do for a torch optimizer, or the "move the state"
    loop that assigns new tensors into each entry) take effect at the next step, as in torch: a parameter
    without state starts afresh. state_dict() always reports the state the steps run on."""
    ours_p = make_params()
    ref_p = clone_params(ours_p)
    ours, ref = build(kind, "adam" if kind == "adam" else "momentum_dampening_wd", (ours_p, ref_p))
    gen = torch.Generator().manual_seed(41)
    run_both(ours, ref, ours_p, ref_p, 4, gen)
    for opt in (ours, ref):
        first = opt.param_groups[0]["params"][0]
        if how == "clear":
            opt.state.clear()
        elif how == "new_container":
            opt.state = defaultdict(dict)
        elif how == "del_one":
            del opt.state[first]
        elif how == "empty_entry":
            opt.state[first] = {}
        else:
            for entry in opt.state.values():
                for key, value in list(entry.items()):
                    entry[key] = value.clone()
    assert sorted(ours.state_dict()["state"]) == sorted(i for i, e in ref.state_dict()["state"].items() if e)
    run_both(ours, ref, ours_p, ref_p, 3, gen)
    assert_close_fp32(ours_p, ref_p)
    saved = torch.load(io.BytesIO(_saved(ours.state_dict())), weights_only=True)  # plain dicts and tensors
    theirs = ref.state_dict()["state"]
    assert sorted(saved["state"]) == sorted(theirs) == [0, 1, 2, 3, 4]
    for i, entry in theirs.items():
        assert set(saved["state"][i]) == set(entry)
        for key, value in entry.items():
            assert_close_fp32([torch.as_tensor(saved["state"][i][key]).float()], [torch.as_tensor(value).float()],
                              rtol=1e-5)


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_fused_twin_keeps_the_torch_optimizers_defaults(kind):
    """A param group added to the twin later (a network grown during training) gets the torch optimizer's
    defaults -- AdamW stays AdamW, SGD keeps its momentum -- as ``add_param_group`` on the torch optimizer
    would give it; so does a group of an older torch's state_dict missing a key."""
    make = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=2e-3, betas=(0.0, 0.99), weight_decay=0.05),
            "adam": lambda ps: torch.optim.Adam(ps, lr=2e-3, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.01),
            "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)}[kind]
    ours_p = make_params()
    ref_p = clone_params(ours_p)
    twin, ref = fused_twin(make(ours_p[:3])), make(ref_p[:3])
    twin.add_param_group({"params": ours_p[3:]})
    ref.add_param_group({"params": ref_p[3:]})
    for key, value in ref.param_groups[1].items():
        if key not in ("params", "foreach", "fused"):
            assert twin.param_groups[1][key] == value, key
    run_both(twin, ref, ours_p, ref_p, 10, torch.Generator().manual_seed(42))
    assert_close_fp32(ours_p, ref_p)
    if kind == "adamw":  # a state_dict of torch < 2.6 (no decoupled_weight_decay) stays AdamW, as in torch
        saved = torch.load(io.BytesIO(_saved(ref.state_dict())))
        for group in saved["param_groups"]:
            del group["decoupled_weight_decay"]
        twin.load_state_dict(saved)
        assert all(group["decoupled_weight_decay"] for group in twin.param_groups)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_state_written_into_entries_a_user_holds_is_honoured(kind):
    """torch users warm-start a fresh optimizer through ``st = opt.state[p]; st[key] = ...`` and keep entry
    dicts across steps (``held = opt.state[p]`` then ``held[key] = ...`` later, after other entries changed):
    both reach the state the steps run on, as in torch. A copy of ``opt.state`` is a plain container."""
    ours_p = make_params()
    ref_p = clone_params(ours_p)
    ours, ref = build(kind, "adam" if kind == "adam" else "momentum_dampening_wd", (ours_p, ref_p))
    key = "exp_avg" if kind == "adam" else "momentum_buffer"
    for opt, params in ((ours, ours_p), (ref, ref_p)):
        entry = opt.state[params[0]]  # a fresh optimizer: an empty entry, filled by hand
        entry[key] = torch.ones_like(params[0])
        if kind == "adam":
            entry["exp_avg_sq"] = torch.full_like(params[0], 2.0)
            entry["step"] = torch.tensor(3.0)
    gen = torch.Generator().manual_seed(43)
    run_both(ours, ref, ours_p, ref_p, 3, gen)
    assert_close_fp32(ours_p, ref_p)
    held = [opt.state[params[0]] for opt, params in ((ours, ours_p), (ref, ref_p))]
    for opt, params in ((ours, ours_p), (ref, ref_p)):
        opt.state[params[1]] = {}  # another entry changed: the bucket's entries are republished
    run_both(ours, ref, ours_p, ref_p, 2, gen)
    for entry in held:
        entry[key] = torch.zeros_like(entry[key])
    run_both(ours, ref, ours_p, ref_p, 2, gen)
    assert_close_fp32(ours_p, ref_p)
    copied = ours.state.copy()
    copied[ours_p[0]] = {}  # a plain defaultdict: no effect on the optimizer
    assert type(copied) is defaultdict and type(ours.state | {}) is defaultdict
    run_both(ours, ref, ours_p, ref_p, 1, gen)
    assert_close_fp32(ours_p, ref_p)
