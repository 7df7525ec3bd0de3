"""Triton kernels of the fused log-D losses (see fastgan/ops/losses.py for the math and reference).

One pass over the logits computes the loss terms, the statistics and d loss / d logits. Up to
``BLOCK`` logits per side the whole op is one launch of one program; beyond that each program
reduces a strided share of both sides into a row of partial sums and a one-program kernel
finishes the means (deterministic: no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096       # logits per side handled by a single program (one launch up to this size)
MAX_PROGRAMS = 256     # programs of the multi-program path (partial rows for the finishing kernel)
N_PARTIAL = 8          # loss_r, loss_f, softplus_r, softplus_f, sigmoid_r, sigmoid_f, nonfinite, (pad)

# Loss kinds: the order of fastgan.ops.losses.LOSS_KINDS.
MINIMAX, NONSATURATING, HINGE, WASSERSTEIN, LEAST_SQUARES = 0, 1, 2, 3, 4


@triton.jit
def _reciprocal(n, ACC: tl.constexpr):
    """1/n in the accumulation dtype, as a 1-element tensor (n may arrive specialised as a constant;
    Python float arguments reach a kernel as fp32, too coarse for float64 inputs)."""
    return 1.0 / tl.full([1], n, ACC)


@triton.jit
def _log1p_unit(e, ACC: tl.constexpr):
    """log1p(e) for e in [0, 1]."""
    if ACC == tl.float64:
        # the series where 1 + e would round e away, log otherwise (1e-12 relative at worst)
        return tl.where(e < 1e-4, e - 0.5 * e * e + e * e * e / 3.0, tl.log(1.0 + e))
    else:
        # float32: log(1 + e) keeps only e's digits above 2^-24 (5e-4 relative errors at e ~ 1e-4: the
        # loss terms of a confident D). 2 atanh(s), s = e / (2 + e) <= 1/3, as the odd series truncated
        # after s^15 (relative error < 2e-9), as csrc/cpu/vec_math.h's log1p_unit.
        s = e / (2.0 + e)
        s2 = s * s
        t = 1.0 / 15.0
        t = t * s2 + 1.0 / 13.0
        t = t * s2 + 1.0 / 11.0
        t = t * s2 + 1.0 / 9.0
        t = t * s2 + 1.0 / 7.0
        t = t * s2 + 1.0 / 5.0
        t = t * s2 + 1.0 / 3.0
        t = t * s2 + 1.0
        return 2.0 * s * t


@triton.jit
def _softplus_sigmoid(x, ACC: tl.constexpr):
    """softplus(x), softplus(-x), sigmoid(x), sigmoid(-x) from one exp(-|x|), stable for any x."""
    e = tl.exp(-tl.abs(x))
    log_term = _log1p_unit(e, ACC)
    inv = 1.0 / (1.0 + e)
    pos = x >= 0
    return (tl.where(x > 0, x, 0.0) + log_term, tl.where(x < 0, -x, 0.0) + log_term,
            tl.where(pos, inv, e * inv), tl.where(pos, e * inv, inv))


@triton.jit
def _d_terms(v, KIND: tl.constexpr, REAL: tl.constexpr, ACC: tl.constexpr):
    """Per-logit D loss term, its derivative, the value term softplus(-+v) and sigmoid(v)."""
    sp_pos, sp_neg, sig, sig_neg = _softplus_sigmoid(v, ACC)
    if REAL:
        sp = sp_neg
    else:
        sp = sp_pos
    if KIND == 0 or KIND == 1:  # minimax, nonsaturating: -log D(x), -log(1 - D(G(z)))
        term = sp
        if REAL:
            g = -sig_neg
        else:
            g = sig
    elif KIND == 2:  # hinge
        if REAL:
            term = tl.where(v < 1.0, 1.0 - v, 0.0)
            g = tl.where(v < 1.0, -1.0, 0.0)
        else:
            term = tl.where(v > -1.0, 1.0 + v, 0.0)
            g = tl.where(v > -1.0, 1.0, 0.0)
    elif KIND == 3:  # wasserstein
        if REAL:
            term = -v
            g = tl.zeros_like(v) - 1.0
        else:
            term = v
            g = tl.zeros_like(v) + 1.0
    else:  # least squares, targets 1 (real) and 0 (fake)
        if REAL:
            d = v - 1.0
        else:
            d = v
        term = 0.5 * d * d
        g = d
    return term, g, sp, sig


@triton.jit
def _g_terms(v, KIND: tl.constexpr, ACC: tl.constexpr):
    """Per-logit G loss term and its derivative."""
    sp_pos, sp_neg, sig, sig_neg = _softplus_sigmoid(v, ACC)
    if KIND == 0:  # minimax: G minimises log(1 - D(G(z))) = -softplus(v)
        term = -sp_pos
        g = -sig
    elif KIND == 1:  # nonsaturating: G maximises log D(G(z)), loss softplus(-v)
        term = sp_neg
        g = -sig_neg
    elif KIND == 2 or KIND == 3:  # hinge, wasserstein
        term = -v
        g = tl.zeros_like(v) - 1.0
    else:  # least squares
        d = v - 1.0
        term = 0.5 * d * d
        g = d
    return term, g


@triton.jit
def _d_side(x_ptr, grad_ptr, n, nan_value, pid, num_programs,
            KIND: tl.constexpr, REAL: tl.constexpr, NEED_GRAD: tl.constexpr, ACC: tl.constexpr,
            BLOCK: tl.constexpr):
    inv_n = _reciprocal(n, ACC)
    acc_loss = tl.zeros([BLOCK], ACC)
    acc_sp = tl.zeros([BLOCK], ACC)
    acc_sig = tl.zeros([BLOCK], ACC)
    acc_bad = tl.zeros([BLOCK], ACC)
    for start in range(pid * BLOCK, n, num_programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        term, g, sp, sig = _d_terms(v, KIND, REAL, ACC)
        finite = (v == v) & (tl.abs(v) != float("inf"))
        acc_loss += tl.where(mask, term, 0.0)
        acc_sp += tl.where(mask, sp, 0.0)
        acc_sig += tl.where(mask, sig, 0.0)
        acc_bad += tl.where(mask & (finite == 0), 1.0, 0.0)
        if NEED_GRAD:
            grad = tl.where(finite, g * inv_n, nan_value)
            tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    return tl.sum(acc_loss, 0), tl.sum(acc_sp, 0), tl.sum(acc_sig, 0), tl.sum(acc_bad, 0)


@triton.jit
def _write_d_stats(stats_ptr, loss_r, loss_f, sp_r, sp_f, sig_r, sig_f, bad, n_real, n_fake, nan_value,
                   ACC: tl.constexpr):
    # log 4 in the accumulation dtype (a float literal would be fp32).
    inv_nr = _reciprocal(n_real, ACC)
    inv_nf = _reciprocal(n_fake, ACC)
    LOG4_C = tl.log(tl.full([1], 4.0, ACC))
    loss = loss_r * inv_nr + loss_f * inv_nf
    value = -(sp_r * inv_nr + sp_f * inv_nf)
    has_bad = bad > 0
    tl.store(stats_ptr + 0 + tl.arange(0, 1), tl.where(has_bad, nan_value, loss))
    tl.store(stats_ptr + 1 + tl.arange(0, 1), tl.where(has_bad, nan_value, value))
    tl.store(stats_ptr + 2 + tl.arange(0, 1), tl.where(has_bad, nan_value, 0.5 * (value + LOG4_C)))
    tl.store(stats_ptr + 3 + tl.arange(0, 1), tl.where(has_bad, nan_value, sig_r * inv_nr))
    tl.store(stats_ptr + 4 + tl.arange(0, 1), tl.where(has_bad, nan_value, sig_f * inv_nf))


@triton.jit
def _d_loss_kernel(real_ptr, fake_ptr, grad_real_ptr, grad_fake_ptr, partial_ptr, stats_ptr,
                   n_real, n_fake, nan_value,
                   KIND: tl.constexpr, NEED_GRAD: tl.constexpr, SINGLE: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    loss_r, sp_r, sig_r, bad_r = _d_side(real_ptr, grad_real_ptr, n_real, nan_value, pid, num_programs,
                                         KIND, True, NEED_GRAD, ACC, BLOCK)
    loss_f, sp_f, sig_f, bad_f = _d_side(fake_ptr, grad_fake_ptr, n_fake, nan_value, pid, num_programs,
                                         KIND, False, NEED_GRAD, ACC, BLOCK)
    if SINGLE:
        _write_d_stats(stats_ptr, loss_r, loss_f, sp_r, sp_f, sig_r, sig_f, bad_r + bad_f,
                       n_real, n_fake, nan_value, ACC)
    else:
        row = partial_ptr + pid * 8
        tl.store(row + 0, loss_r)
        tl.store(row + 1, loss_f)
        tl.store(row + 2, sp_r)
        tl.store(row + 3, sp_f)
        tl.store(row + 4, sig_r)
        tl.store(row + 5, sig_f)
        tl.store(row + 6, bad_r + bad_f)


@triton.jit
def _d_loss_finish_kernel(partial_ptr, stats_ptr, n_rows, n_real, n_fake, nan_value,
                          ACC: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.arange(0, ROWS)
    mask = rows < n_rows
    p = partial_ptr + rows * 8
    loss_r = tl.sum(tl.load(p + 0, mask=mask, other=0.0), 0)
    loss_f = tl.sum(tl.load(p + 1, mask=mask, other=0.0), 0)
    sp_r = tl.sum(tl.load(p + 2, mask=mask, other=0.0), 0)
    sp_f = tl.sum(tl.load(p + 3, mask=mask, other=0.0), 0)
    sig_r = tl.sum(tl.load(p + 4, mask=mask, other=0.0), 0)
    sig_f = tl.sum(tl.load(p + 5, mask=mask, other=0.0), 0)
    bad = tl.sum(tl.load(p + 6, mask=mask, other=0.0), 0)
    _write_d_stats(stats_ptr, loss_r, loss_f, sp_r, sp_f, sig_r, sig_f, bad, n_real, n_fake, nan_value, ACC)


@triton.jit
def _g_loss_kernel(fake_ptr, grad_ptr, partial_ptr, loss_ptr, n, nan_value,
                   KIND: tl.constexpr, NEED_GRAD: tl.constexpr, SINGLE: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    inv_n = _reciprocal(n, ACC)
    acc_loss = tl.zeros([BLOCK], ACC)
    acc_bad = tl.zeros([BLOCK], ACC)
    for start in range(pid * BLOCK, n, num_programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(fake_ptr + offs, mask=mask, other=0.0).to(ACC)
        term, g = _g_terms(v, KIND, ACC)
        finite = (v == v) & (tl.abs(v) != float("inf"))
        acc_loss += tl.where(mask, term, 0.0)
        acc_bad += tl.where(mask & (finite == 0), 1.0, 0.0)
        if NEED_GRAD:
            grad = tl.where(finite, g * inv_n, nan_value)
            tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    loss = tl.sum(acc_loss, 0)
    bad = tl.sum(acc_bad, 0)
    if SINGLE:
        tl.store(loss_ptr + tl.arange(0, 1), tl.where(bad > 0, nan_value, loss * inv_n))
    else:
        tl.store(partial_ptr + pid * 2 + 0, loss)
        tl.store(partial_ptr + pid * 2 + 1, bad)


@triton.jit
def _g_loss_finish_kernel(partial_ptr, loss_ptr, n_rows, n, nan_value, ACC: tl.constexpr, ROWS: tl.constexpr):
    inv_n = _reciprocal(n, ACC)
    rows = tl.arange(0, ROWS)
    mask = rows < n_rows
    loss = tl.sum(tl.load(partial_ptr + rows * 2, mask=mask, other=0.0), 0)
    bad = tl.sum(tl.load(partial_ptr + rows * 2 + 1, mask=mask, other=0.0), 0)
    tl.store(loss_ptr + tl.arange(0, 1), tl.where(bad > 0, nan_value, loss * inv_n))


def _launch_shape(n: int, acc_torch: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK, programs, warps) for n logits per side: one program up to MAX_BLOCK. float64 (two
    registers a value) takes half that block and enough warps for at most 4 logits per thread and
    side: at 4096 logits and Triton's default of 4 warps its programs spilled 1.4-1.9 KB of registers
    on sm_90 (``benchmarks/kernel_resources.py --ops d_loss,g_loss``), now none. float32 keeps the
    launch its GPU timings were measured with (4 warps); at sizes that are not a multiple of 16 some of
    its 4096-logit variants spill 16-24 B, at the benchmarks' sizes none."""
    if acc_torch == torch.float64:
        block = max(128, min(MAX_BLOCK // 2, triton.next_power_of_2(n)))
        warps = max(4, min(16, block // (32 * 4)))
    else:
        block, warps = max(128, min(MAX_BLOCK, triton.next_power_of_2(n))), 4
    return block, min(triton.cdiv(n, block), MAX_PROGRAMS), warps


def _acc(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _grad_buffer(x: torch.Tensor, need_grad: bool) -> torch.Tensor:
    # In the accumulation dtype, as the C++ path keeps it (fastgan/ops/losses.py, _empty_grad).
    _, acc_torch = _acc(x.dtype)
    return x.new_empty(x.numel() if need_grad else 0, dtype=acc_torch)


def d_loss_forward(real: torch.Tensor, fake: torch.Tensor, kind: int, need_grad: bool):
    """(stats[5], grad_real, grad_fake) for contiguous 1-D logits; see fastgan.ops.losses."""
    acc_tl, acc_torch = _acc(real.dtype)
    n_real, n_fake = real.numel(), fake.numel()
    block, programs, warps = _launch_shape(max(n_real, n_fake), acc_torch)
    stats = torch.empty(5, device=real.device, dtype=acc_torch)
    grad_real, grad_fake = _grad_buffer(real, need_grad), _grad_buffer(fake, need_grad)
    single = programs == 1
    partial = stats if single else torch.empty(programs * N_PARTIAL, device=real.device, dtype=acc_torch)
    # An unused grad pointer still needs a tensor argument: pass the logits (never written).
    _d_loss_kernel[(programs,)](
        real, fake, grad_real if need_grad else real, grad_fake if need_grad else fake, partial, stats,
        n_real, n_fake, float("nan"),
        KIND=kind, NEED_GRAD=need_grad, SINGLE=single, ACC=acc_tl, BLOCK=block,
        num_warps=warps)
    if not single:
        _d_loss_finish_kernel[(1,)](partial, stats, programs, n_real, n_fake, float("nan"), ACC=acc_tl,
                                    ROWS=triton.next_power_of_2(programs))
    return stats, grad_real, grad_fake


def g_loss_forward(fake: torch.Tensor, kind: int, need_grad: bool):
    """(loss, grad_fake) for contiguous 1-D logits; see fastgan.ops.losses."""
    acc_tl, acc_torch = _acc(fake.dtype)
    n = fake.numel()
    block, programs, warps = _launch_shape(n, acc_torch)
    loss = torch.empty((), device=fake.device, dtype=acc_torch)
    grad = _grad_buffer(fake, need_grad)
    single = programs == 1
    partial = loss if single else torch.empty(programs * 2, device=fake.device, dtype=acc_torch)
    _g_loss_kernel[(programs,)](
        fake, grad if need_grad else fake, partial, loss, n, float("nan"),
        KIND=kind, NEED_GRAD=need_grad, SINGLE=single, ACC=acc_tl, BLOCK=block,
        num_warps=warps)
    if not single:
        _g_loss_finish_kernel[(1,)](partial, loss, programs, n, float("nan"), ACC=acc_tl,
                                    ROWS=triton.next_power_of_2(programs))
    return loss, grad
