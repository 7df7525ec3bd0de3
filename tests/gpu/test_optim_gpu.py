"""fastgan.optim on CUDA (the kernels of csrc/cuda/optim.cu): FusedAdam / FusedSGD against torch.optim
at fp32 and bf16, sizes well beyond one grid, the non-finite skip without host synchronisation,
unscale, the fused EMA, state_dicts, and a step captured in a CUDA graph and replayed."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from fastgan._dispatch import extension
from fastgan.optim import EMA, FusedAdam, FusedSGD

SHAPES = [(512, 100, 4, 4), (512,), (256, 512, 4, 4), (7, 13), (1,), (3, 64, 4, 4), (100_003,)]


def params_on(device, shapes=SHAPES, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in shapes]


def clone(params, dtype=None):
    return [nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


def assert_close_scaled(actual, expected, rtol):
    for a, e in zip(actual, expected):
        a, e = a.detach().float(), e.detach().float()
        scale = max(e.abs().max().item(), 1.0)
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale)


def random_grads(params, gen):
    return [torch.randn(p.shape, generator=gen, device=p.device) for p in params]


def uses_cuda_kernels(opt) -> bool:
    return all(b.kernels is not None for bs in opt._buckets for b in bs)


def test_extension_has_cuda():
    ext = extension()
    assert ext is not None and ext.with_cuda, "fastgan._C was built without its CUDA kernels"


CASES = [
    ("adam", dict(lr=1e-2), torch.optim.Adam, dict(lr=1e-2)),
    ("adam_wd", dict(lr=1e-2, weight_decay=0.1, betas=(0.5, 0.999)), torch.optim.Adam,
     dict(lr=1e-2, weight_decay=0.1, betas=(0.5, 0.999))),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True), torch.optim.AdamW,
     dict(lr=1e-2, weight_decay=0.1)),
    ("sgd_momentum", dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01), torch.optim.SGD,
     dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    ("sgd_nesterov", dict(lr=0.05, momentum=0.9, nesterov=True), torch.optim.SGD,
     dict(lr=0.05, momentum=0.9, nesterov=True)),
]


@pytest.mark.parametrize("name,ours_kw,torch_cls,torch_kw", CASES, ids=[c[0] for c in CASES])
def test_100_steps_match_torch_fp32(cuda_device, name, ours_kw, torch_cls, torch_kw):
    ours_p = params_on(cuda_device)
    ref_p = clone(ours_p)
    ours = (FusedSGD if name.startswith("sgd") else FusedAdam)(ours_p, **ours_kw)
    ref = torch_cls(ref_p, foreach=False, **torch_kw)
    assert uses_cuda_kernels(ours)
    gen = torch.Generator(device=cuda_device).manual_seed(1)
    for _ in range(100):
        for p, q, g in zip(ours_p, ref_p, random_grads(ours_p, gen)):
            p.grad, q.grad = g.clone(), g
        ours.step()
        ref.step()
    assert ours.found_inf.device.type == "cuda" and float(ours.found_inf) == 0.0
    assert_close_scaled(ours_p, ref_p, rtol=1e-5)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_bf16_params_fp32_state(cuda_device, kind):
    ours_p = clone(params_on(cuda_device), torch.bfloat16)
    ref_p = clone(ours_p, torch.float32)
    if kind == "adam":
        ours, ref = FusedAdam(ours_p, lr=0.05), torch.optim.Adam(ref_p, lr=0.05, foreach=False)
    else:
        ours, ref = FusedSGD(ours_p, lr=0.05, momentum=0.9), torch.optim.SGD(ref_p, lr=0.05, momentum=0.9,
                                                                               foreach=False)
    assert uses_cuda_kernels(ours)
    gen = torch.Generator(device=cuda_device).manual_seed(2)
    for _ in range(20):
        for p, q, g in zip(ours_p, ref_p, random_grads(ours_p, gen)):
            g = g.bfloat16()
            p.grad, q.grad = g.clone(), g.float()
        ours.step()
        ref.step()
        with torch.no_grad():
            for q in ref_p:
                q.copy_(q.bfloat16().float())
    assert all(p.dtype == torch.bfloat16 for p in ours_p)
    assert_close_scaled(ours_p, ref_p, rtol=1e-2)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_nonfinite_skips_on_device(cuda_device, groups, kind):
    ps = params_on(cuda_device)
    param_groups = [{"params": ps}] if groups == 1 else [{"params": ps[:3]}, {"params": ps[3:]}]
    model = nn.Module()
    model.ps = nn.ParameterList(ps)
    ema = EMA(model, 0.9)
    opt = FusedAdam(param_groups, lr=0.01, ema=ema) if kind == "adam" else FusedSGD(param_groups, lr=0.01,
                                                                                      momentum=0.9, ema=ema)
    gen = torch.Generator(device=cuda_device).manual_seed(3)
    for p, g in zip(ps, random_grads(ps, gen)):
        p.grad = g
    opt.step()
    before = [p.detach().clone() for p in ps]
    shadows = [s.clone() for s in ema.shadow_params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    for p, g in zip(ps, random_grads(ps, gen)):
        p.grad = g
    ps[-1].grad[77_777] = float("inf")
    opt.step()
    assert opt.found_inf.is_cuda and float(opt.found_inf) == 1.0
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
    assert all(torch.equal(s, s0) for s, s0 in zip(ema.shadow_params, shadows))
    for p, st in zip(ps, state):
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())


def test_unscale_matches_dividing_first(cuda_device):
    ours_p = params_on(cuda_device)
    ref_p = clone(ours_p)
    ours, ref = FusedAdam(ours_p, lr=0.01), FusedAdam(ref_p, lr=0.01)
    inv = torch.tensor(1.0 / 65536.0, device=cuda_device)
    gen = torch.Generator(device=cuda_device).manual_seed(4)
    for _ in range(10):
        for p, q, g in zip(ours_p, ref_p, random_grads(ours_p, gen)):
            p.grad, q.grad = g * 65536.0, g.clone()
        ours.step(inv_scale=inv)
        ref.step()
    for p, q in zip(ours_p, ref_p):
        assert torch.equal(p, q)


def test_fused_ema_matches_lerp(cuda_device):
    ps = params_on(cuda_device)
    model = nn.Module()
    model.ps = nn.ParameterList(ps)
    ema = EMA(model, 0.99)
    opt = FusedAdam(ps, lr=0.01, ema=ema)
    ref = [p.detach().clone() for p in ps]
    gen = torch.Generator(device=cuda_device).manual_seed(5)
    for _ in range(20):
        for p, g in zip(ps, random_grads(ps, gen)):
            p.grad = g
        opt.step()
        for r, p in zip(ref, ps):
            r.lerp_(p.detach(), 0.01)
    assert_close_scaled(ema.shadow_params, ref, rtol=1e-5)


def test_state_dict_round_trip_with_torch(cuda_device):
    ours_p = params_on(cuda_device)
    ours = FusedAdam(ours_p, lr=0.01, weight_decay=0.1)
    gen = torch.Generator(device=cuda_device).manual_seed(6)
    for _ in range(5):
        for p, g in zip(ours_p, random_grads(ours_p, gen)):
            p.grad = g
        ours.step()
    ref_p = clone(ours_p)
    ref = torch.optim.Adam(ref_p, lr=1.0)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    ref.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    back_p = clone(ours_p)
    back = FusedAdam(back_p, lr=1.0)
    back.load_state_dict(ref.state_dict())
    for _ in range(10):
        for p, q, r, g in zip(ours_p, ref_p, back_p, random_grads(ours_p, gen)):
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.clone()
        ours.step()
        ref.step()
        back.step()
    assert_close_scaled(ref_p, ours_p, rtol=1e-5)
    assert_close_scaled(back_p, ours_p, rtol=1e-5)


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_device_lr_steps_equal_float_lr_steps_bit_for_bit(cuda_device, kind):
    """use_device_lr (the Trainer's CUDA graphs read lr from the device) must not change a step's
    arithmetic. 2e-4 has no exact float32 value: a float32 device copy moved lr / bias_correction1 by an
    ulp now and then, and Adam's later steps amplified that into 3.5e-5 weight differences between
    graphed and eager DCGAN training (H100, tests/gpu/test_trainer_gpu.py)."""
    def build(ps):
        if kind == "sgd":
            return FusedSGD(ps, lr=2e-4, momentum=0.9, weight_decay=1e-2)
        return FusedAdam(ps, lr=2e-4, betas=(0.5, 0.999), weight_decay=1e-2, decoupled_weight_decay=kind == "adamw")

    device_p = params_on(cuda_device)
    float_p = clone(device_p)
    on_device, on_host = build(device_p), build(float_p)
    on_device.use_device_lr()
    gen = torch.Generator(device=cuda_device).manual_seed(11)
    for i in range(12):
        if i == 6:  # a scheduler's new value, also without an exact float32 one
            for opt in (on_device, on_host):
                opt.param_groups[0]["lr"] = 1e-3 / 3
            on_device.sync_device_lr()
        for p, q, g in zip(device_p, float_p, random_grads(device_p, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        on_device.step()
        on_host.step()
    assert on_device._device_lr is not None and on_device._device_lr[0][0].dtype == torch.float64
    for p, q in zip(device_p, float_p):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_cuda_graph_capture_of_a_step(cuda_device, kind):
    """A step (with EMA and inv_scale, lr as a device tensor) captured once and replayed matches eager
    steps; the step count advances on the device and a scheduler's lr change is seen by replays."""
    def build(ps):
        model = nn.Module()
        model.ps = nn.ParameterList(ps)
        ema = EMA(model, 0.9)
        lr = torch.tensor(0.01, device=cuda_device)
        opt = FusedAdam(ps, lr=lr, ema=ema) if kind == "adam" else FusedSGD(ps, lr=lr, momentum=0.9, ema=ema)
        (bucket,) = opt._buckets[0]
        for p, view in zip(ps, bucket.grad_views):  # .grad = views of the flat buffer (static addresses), as
            p.grad = view                           # after a backward
        return opt, ema

    graph_p = params_on(cuda_device)
    eager_p = clone(graph_p)
    g_opt, g_ema = build(graph_p)
    e_opt, e_ema = build(eager_p)
    inv = torch.tensor(0.5, device=cuda_device)
    gen = torch.Generator(device=cuda_device).manual_seed(7)
    (bucket,) = g_opt._buckets[0]
    grads_seq = [torch.randn(bucket.total, generator=gen, device=cuda_device) for _ in range(8)]

    def set_grads(opt, flat):
        (b,) = opt._buckets[0]
        b.flat_grad.copy_(flat)

    # warm-up on a side stream (allocates state), as torch.cuda.graphs requires
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for opt, flat in ((g_opt, grads_seq[0]), (e_opt, grads_seq[0])):
            set_grads(opt, flat)
            opt.step(inv_scale=inv)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_opt.step(inv_scale=inv)
    for i, flat in enumerate(grads_seq[1:]):
        if i == 3:  # a scheduler writing the lr tensor in place
            for opt in (g_opt, e_opt):
                opt.param_groups[0]["lr"].fill_(0.003)
        set_grads(g_opt, flat)
        graph.replay()
        set_grads(e_opt, flat)
        e_opt.step(inv_scale=inv)
    torch.cuda.synchronize()
    for p, q in zip(graph_p, eager_p):
        assert torch.equal(p, q)
    for s, t in zip(g_ema.shadow_params, e_ema.shadow_params):
        assert torch.equal(s, t)
    assert torch.equal(bucket.steps, e_opt._buckets[0][0].steps)
    assert float(bucket.steps[0]) == len(grads_seq)
    # a non-finite gradient in a replay is skipped there too
    before = [p.detach().clone() for p in graph_p]
    bad = grads_seq[0].clone()
    bad[5] = float("nan")
    set_grads(g_opt, bad)
    graph.replay()
    torch.cuda.synchronize()
    assert float(g_opt.found_inf) == 1.0
    assert all(torch.equal(p, b) for p, b in zip(graph_p, before))


def test_large_buffer_matches_torch_fused(cuda_device):
    """~50 M parameters in one buffer (many grid strides) against torch's fused Adam."""
    shapes = [(2048, 1024, 4, 4), (1024, 512, 4, 4), (100, 2048, 4, 4), (2048,)]
    ours_p = params_on(cuda_device, shapes)
    ref_p = clone(ours_p)
    ours, ref = FusedAdam(ours_p, lr=1e-3), torch.optim.Adam(ref_p, lr=1e-3, fused=True)
    gen = torch.Generator(device=cuda_device).manual_seed(8)
    for _ in range(3):
        for p, q, g in zip(ours_p, ref_p, random_grads(ours_p, gen)):
            p.grad, q.grad = g.clone(), g
        ours.step()
        ref.step()
    assert_close_scaled(ours_p, ref_p, rtol=1e-5)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_step_zero_grad_on_cuda_eager_and_captured(cuda_device, kind):
    """step(zero_grad=True) on CUDA (the kernel, then a fill on the same stream) equals step();
    zero_grad(set_to_none=False) bit for bit, eagerly and replayed from a CUDA graph, also around a
    skipped step; the gradient buffer is zero afterwards either way."""
    def build(ps):
        opt = FusedAdam(ps, lr=0.01) if kind == "adam" else FusedSGD(ps, lr=0.01, momentum=0.9)
        (bucket,) = opt._buckets[0]
        for p, view in zip(ps, bucket.grad_views):
            p.grad = view
        return opt, bucket

    fused_p = params_on(cuda_device)
    graph_p, ref_p = clone(fused_p), clone(fused_p)
    (fused, fb), (graphed, gb), (ref, rb) = build(fused_p), build(graph_p), build(ref_p)
    gen = torch.Generator(device=cuda_device).manual_seed(9)
    grads_seq = [torch.randn(fb.total, generator=gen, device=cuda_device) for _ in range(6)]
    grads_seq[3][17] = float("inf")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up step (allocates the state) for all three
        for opt, b in ((fused, fb), (graphed, gb), (ref, rb)):
            b.flat_grad.copy_(grads_seq[0])
            if opt is ref:
                opt.step()
                opt.zero_grad(set_to_none=False)
            else:
                opt.step(zero_grad=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step(zero_grad=True)
    for i, flat in enumerate(grads_seq[1:]):
        for b in (fb, gb, rb):
            b.flat_grad.add_(flat)  # accumulated into the zeroed buffer, as autograd does
        fused.step(zero_grad=True)
        graph.replay()
        ref.step()
        ref.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        assert float(fused.found_inf) == float(graphed.found_inf) == float(ref.found_inf) == (1.0 if i == 2 else 0.0)
        for b in (fb, gb):
            assert torch.count_nonzero(b.flat_grad) == 0
        for p, q, r in zip(fused_p, graph_p, ref_p):
            assert torch.equal(p, r) and torch.equal(q, r)
        assert all(p.grad is v for p, v in zip(fused_p, fb.grad_views))


def test_sgd_momentum_off_then_on_matches_torch(cuda_device):
    """The CUDA SGD kernel counts only momentum updates: a parameter first stepped while momentum is 0
    starts its buffer as its gradient when momentum returns (with dampening this differs from a blend
    into zeros), as torch's does."""
    ours_p = params_on(cuda_device, [(7, 13), (100_003,), (3,)])
    ref_p = clone(ours_p)
    kw = dict(lr=0.01, momentum=0.9, dampening=0.5)
    ours, ref = FusedSGD(ours_p, **kw), torch.optim.SGD(ref_p, **kw)
    gen = torch.Generator(device=cuda_device).manual_seed(10)
    for it in range(4):
        for opt in (ours, ref):
            opt.param_groups[0]["momentum"] = 0.0 if it == 1 else 0.9
        for p, q, g in zip(ours_p, ref_p, random_grads(ours_p, gen)):
            p.grad, q.grad = g.clone(), g
        if it == 0:
            ours_p[0].grad = ref_p[0].grad = None
        ours.step()
        ref.step()
    assert_close_scaled(ours_p, ref_p, rtol=1e-6)
    for p, q in zip(ours_p, ref_p):
        assert_close_scaled([ours.state[p]["momentum_buffer"]], [ref.state[q]["momentum_buffer"]], rtol=1e-6)
