"""Triton kernels of BatchNorm + activation (math and reference: fastgan/ops/batch_norm_act.py).

x is walked as N*H*W rows by C channels through its four strides (a 2-D (N, C) input is (N, C, 1, 1)),
so NCHW, channels_last and other layouts use the same kernels. Each program handles a
[BLOCK_R, BLOCK_C] tile: for NCHW the rows are the contiguous direction (BLOCK_R large), for
channels_last the channels are (BLOCK_C large), so loads coalesce either way.

Forward: ``_stats_kernel`` (per-channel sums of x - shift, in float32 (float64 for float64 x), one row of partials per split of
the rows; shift = x[0, c] keeps the variance free of cancellation) then ``_apply_kernel``
(y = act(x * scale + shift), scale and shift per channel). Backward: ``_grad_stats_kernel`` (sum dz,
sum dz (x - mean), dz = dy act'(z) with z = x * scale + shift recomputed from x, so y is never read)
then ``_grad_apply_kernel`` (dx = dz * p + x * q + o per channel).
Between them, one small per-channel kernel each way sums the partial rows in float64 (in order:
deterministic, no atomics) and finishes the per-channel algebra (``_stats_finish_kernel``: mean, var,
scale, shift; ``_grad_finish_kernel``: dweight, dbias, p, q, o; ``_scale_shift_kernel`` for the
backward's and eval's scale and shift). Done with torch ops, that algebra was some 25 tiny launches
each way per layer call: on an H100 they cost the DCGAN step more than the fusion saved. In training
the statistics kernels also update the running statistics (eager calls; ``_finish_stats``).

Where a channel's rows fit in one tile (small feature maps: 512 x 4x4 at batch 64), the launches cost
more than the lost parallelism: ``_single_pass_forward_kernel`` and ``_single_pass_backward_kernel``
then do each direction in one launch, one program per block of channels (see SINGLE_PASS_MAX_ELEMENTS).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from fastgan.ops.triton.activations import act_grad_from_output, apply_act

MAX_SPLITS = 128        # row splits of the reduction kernels (partial rows)
TILE = 2048             # elements per program tile
# Largest rows x channels a single-pass program takes on (the whole forward, or backward, of its channels in
# one launch): one tile. Measured on an H200 (CUDA-graph replays of forward + backward, batch 64, NCHW;
# benchmarks/results/2026-11-26-h200/): at 1024 rows per channel (512 x 4x4) the single pass took 20.8 us
# against the split path's 29.5; at 4096 rows (256 x 8x8), looping over them in one program, 44.7 us
# against 32.5, and worse beyond. FASTGAN_BN_SINGLE_PASS_MAX_ELEMENTS overrides it (0: always split).
SINGLE_PASS_MAX_ELEMENTS = int(os.environ.get("FASTGAN_BN_SINGLE_PASS_MAX_ELEMENTS", TILE))


@triton.jit
def _tile_offsets(r, c, HW, W, s_n, s_c, s_h, s_w):
    """Memory offsets of the [BLOCK_R, BLOCK_C] tile of rows r (n, h, w flattened) and channels c."""
    r = r.to(tl.int64)
    n = r // HW
    hw = r - n * HW
    h = hw // W
    w = hw - h * W
    return (n * s_n + h * s_h + w * s_w)[:, None] + c.to(tl.int64)[None, :] * s_c


# --- Tile bodies: one [BLOCK_R, BLOCK_C] tile of each pass, shared by the split and single-pass kernels. ---

@triton.jit
def _shifted_tile(x_ptr, r, r_end, c, c_mask, x0, HW, W, s_n, s_c, s_h, s_w, ACC: tl.constexpr):
    """x - x[0, c] on the tile (0 outside rows < r_end): the statistics' summand, free of cancellation."""
    mask = (r < r_end)[:, None] & c_mask[None, :]
    v = tl.load(x_ptr + _tile_offsets(r, c, HW, W, s_n, s_c, s_h, s_w), mask=mask, other=0.0).to(ACC)
    return tl.where(mask, v - x0[None, :], 0.0)


@triton.jit
def _apply_tile(x_ptr, y_ptr, r, R, c, c_mask, scale, shift, alpha, HW, W, s_n, s_c, s_h, s_w,
                ACT: tl.constexpr, ACC: tl.constexpr):
    """y = act(x * scale[c] + shift[c]) on the tile; y has x's strides."""
    mask = (r < R)[:, None] & c_mask[None, :]
    offs = _tile_offsets(r, c, HW, W, s_n, s_c, s_h, s_w)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = apply_act(v * scale[None, :] + shift[None, :], alpha, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dz(gy, v, scale, shift, alpha, ACT: tl.constexpr):
    """dy * act'(z) with z = x * scale + shift recomputed (act' through the table's rule in y)."""
    y = apply_act(v * scale[None, :] + shift[None, :], alpha, ACT)
    return gy * act_grad_from_output(y, alpha, ACT)


@triton.jit
def _grad_sums_tile(gy_ptr, x_ptr, r, r_end, c, c_mask, mean, scale, shift, alpha, HW, W, s_n, s_c, s_h, s_w,
                    ACT: tl.constexpr, ACC: tl.constexpr):
    """(dz, dz (x - mean[c])) on the tile, 0 outside rows < r_end; dz = dy act'(z)."""
    mask = (r < r_end)[:, None] & c_mask[None, :]
    offs = _tile_offsets(r, c, HW, W, s_n, s_c, s_h, s_w)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dz = tl.where(mask, _dz(gy, v, scale, shift, alpha, ACT), 0.0)
    return dz, dz * tl.where(mask, v - mean[None, :], 0.0)


@triton.jit
def _grad_apply_tile(gy_ptr, x_ptr, dx_ptr, r, R, c, c_mask, scale, shift, p, q, o, alpha, HW, W, s_n, s_c, s_h,
                     s_w, ACT: tl.constexpr, ACC: tl.constexpr):
    """dx = dz * p[c] + x * q[c] + o[c] on the tile, dz = dy act'(z)."""
    mask = (r < R)[:, None] & c_mask[None, :]
    offs = _tile_offsets(r, c, HW, W, s_n, s_c, s_h, s_w)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dz = _dz(gy, v, scale, shift, alpha, ACT)
    dx = dz * p[None, :] + v * q[None, :] + o[None, :]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --- Per-channel algebra in float64, shared by the finishing kernels and the single-pass kernels. ---

@triton.jit
def _load_f64(ptr, c, c_mask):
    return tl.load(ptr + c, mask=c_mask, other=0.0).to(tl.float64)


@triton.jit
def _eps_f64(eps_hi, eps_lo):
    """eps in float64 from its float32 head and tail (see _split_eps)."""
    return tl.cast(eps_hi, tl.float64) + tl.cast(eps_lo, tl.float64)


@triton.jit
def _scale_shift_f64(mean, var, w_ptr, b_ptr, c, c_mask, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """(invstd, scale, shift) in float64 with z = x * scale + shift: scale = w invstd, shift = b - mean scale."""
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd
    if HAS_W:
        scale = _load_f64(w_ptr, c, c_mask) * invstd
    shift = -mean * scale
    if HAS_B:
        shift += _load_f64(b_ptr, c, c_mask)
    return invstd, scale, shift


@triton.jit
def _finish_stats(sum_s, sum_ss, x0, R, c, c_mask, w_ptr, b_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr, factor, unbias,
                  eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE: tl.constexpr, ACC: tl.constexpr):
    """From the float64 sums of x - x0 and their squares: store the batch's mean and biased var (ACC),
    update the running statistics (UPDATE: nn.BatchNorm's r = (1 - factor) r + factor s, s the unbiased
    variance var * unbias, unbias = count / (count - 1)), and return (scale, shift) in float64, computed
    from the statistics as saved, as the backward recomputes them."""
    m_shifted = sum_s / R
    var = sum_ss / R - m_shifted * m_shifted
    var = tl.where(var < 0.0, 0.0, var)  # clamp rounding below zero; NaN (inf in x) stays NaN, as in torch
    mean = (x0.to(tl.float64) + m_shifted).to(ACC)
    var = var.to(ACC)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(var_ptr + c, var, mask=c_mask)
    if UPDATE:
        f = tl.cast(factor, tl.float64)
        rm = _load_f64(rm_ptr, c, c_mask) * (1.0 - f) + mean.to(tl.float64) * f
        rv = _load_f64(rv_ptr, c, c_mask) * (1.0 - f) + var.to(tl.float64) * tl.cast(unbias, tl.float64) * f
        tl.store(rm_ptr + c, rm.to(rm_ptr.dtype.element_ty), mask=c_mask)
        tl.store(rv_ptr + c, rv.to(rv_ptr.dtype.element_ty), mask=c_mask)
    _, scale, shift = _scale_shift_f64(mean.to(tl.float64), var.to(tl.float64), w_ptr, b_ptr, c, c_mask, eps,
                                       HAS_W, HAS_B)
    return scale, shift


@triton.jit
def _grad_coefficients(sum_dz, sum_dzx, var, mean, R, c, c_mask, w_ptr, dweight_ptr, dbias_ptr, eps,
                       HAS_W: tl.constexpr, TRAINING: tl.constexpr, ACC: tl.constexpr):
    """Store dbias = sum dz and dweight = sum dz x_hat; return dx = p dz + q x + o's per-channel (p, q, o) in
    float64: p = w invstd; in training q and o subtract the mean of dz and its projection on x_hat."""
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(dbias_ptr + c, sum_dz.to(ACC), mask=c_mask)
    tl.store(dweight_ptr + c, (sum_dzx * invstd).to(ACC), mask=c_mask)
    p = invstd
    if HAS_W:
        p = _load_f64(w_ptr, c, c_mask) * invstd
    if TRAINING:
        q = -p * invstd * invstd * sum_dzx / R
        o = -p * sum_dz / R - q * mean
    else:
        q = tl.zeros_like(p)
        o = tl.zeros_like(p)
    return p, q, o


@triton.jit
def _sum_splits(partial_ptr, row, splits, C, c, c_mask, BLOCK_C: tl.constexpr):
    """sum over k of partial[row, k, c] in float64, k in order (partial is (2, splits, C) contiguous)."""
    total = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for k in range(0, splits):
        total += tl.load(partial_ptr + (row * splits + k) * C + c, mask=c_mask, other=0.0).to(tl.float64)
    return total


# --- Split path: row-split reductions into partial rows, per-channel finishing, element-wise passes. ---

@triton.jit
def _stats_kernel(x_ptr, partial_ptr, R, C, HW, W, s_n, s_c, s_h, s_w, rows_per_split,
                  ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """partial[0, split, c] = sum (x - x[0, c]), partial[1, split, c] = sum (x - x[0, c])^2."""
    split = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    x0 = tl.load(x_ptr + c.to(tl.int64) * s_c, mask=c_mask, other=0.0).to(ACC)
    acc_s = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    acc_ss = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, R)
    for r0 in range(row_start, row_end, BLOCK_R):
        d = _shifted_tile(x_ptr, r0 + tl.arange(0, BLOCK_R), row_end, c, c_mask, x0, HW, W, s_n, s_c, s_h, s_w, ACC)
        acc_s += d
        acc_ss += d * d
    out = partial_ptr + split * C + c
    tl.store(out, tl.sum(acc_s, axis=0), mask=c_mask)
    tl.store(out + tl.num_programs(1) * C, tl.sum(acc_ss, axis=0), mask=c_mask)


@triton.jit
def _stats_finish_kernel(partial_ptr, x_ptr, s_c, w_ptr, b_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, rm_ptr, rv_ptr,
                         factor, unbias, splits, R, C, eps_hi, eps_lo, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                         UPDATE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """The batch's mean and biased var from _stats_kernel's partials (shifted by x[0, c]), then scale, shift
    (and, with UPDATE, the running statistics)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    x0 = tl.load(x_ptr + c.to(tl.int64) * s_c, mask=c_mask, other=0.0)
    scale, shift = _finish_stats(_sum_splits(partial_ptr, 0, splits, C, c, c_mask, BLOCK_C),
                                 _sum_splits(partial_ptr, 1, splits, C, c, c_mask, BLOCK_C), x0, R, c, c_mask,
                                 w_ptr, b_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr, factor, unbias,
                                 _eps_f64(eps_hi, eps_lo), HAS_W, HAS_B, UPDATE, ACC)
    tl.store(scale_ptr + c, scale.to(ACC), mask=c_mask)
    tl.store(shift_ptr + c, shift.to(ACC), mask=c_mask)


@triton.jit
def _scale_shift_kernel(mean_ptr, var_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, C, eps_hi, eps_lo,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """scale, shift (ACC) from given per-channel mean and var."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    _, scale, shift = _scale_shift_f64(_load_f64(mean_ptr, c, c_mask), _load_f64(var_ptr, c, c_mask), w_ptr, b_ptr,
                                       c, c_mask, _eps_f64(eps_hi, eps_lo), HAS_W, HAS_B)
    tl.store(scale_ptr + c, scale.to(ACC), mask=c_mask)
    tl.store(shift_ptr + c, shift.to(ACC), mask=c_mask)


@triton.jit
def _apply_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, alpha, R, C, HW, W, s_n, s_c, s_h, s_w,
                  ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act(x * scale[c] + shift[c]); y has x's strides."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    _apply_tile(x_ptr, y_ptr, tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R), R, c, c_mask, scale, shift, alpha,
                HW, W, s_n, s_c, s_h, s_w, ACT, ACC)


@triton.jit
def _grad_stats_kernel(gy_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, partial_ptr, alpha, R, C, HW, W, s_n, s_c, s_h, s_w,
                       rows_per_split, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """partial[0, split, c] = sum dz, partial[1, split, c] = sum dz (x - mean[c]), dz = dy act'(z)."""
    split = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    acc_dz = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    acc_dzx = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, R)
    for r0 in range(row_start, row_end, BLOCK_R):
        dz, dzx = _grad_sums_tile(gy_ptr, x_ptr, r0 + tl.arange(0, BLOCK_R), row_end, c, c_mask, mean, scale, shift,
                                  alpha, HW, W, s_n, s_c, s_h, s_w, ACT, ACC)
        acc_dz += dz
        acc_dzx += dzx
    out = partial_ptr + split * C + c
    tl.store(out, tl.sum(acc_dz, axis=0), mask=c_mask)
    tl.store(out + tl.num_programs(1) * C, tl.sum(acc_dzx, axis=0), mask=c_mask)


@triton.jit
def _grad_finish_kernel(partial_ptr, w_ptr, mean_ptr, var_ptr, dweight_ptr, dbias_ptr, p_ptr, q_ptr, o_ptr, splits,
                        R, C, eps_hi, eps_lo, HAS_W: tl.constexpr, TRAINING: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """dweight, dbias and the per-channel (p, q, o) of dx from _grad_stats_kernel's partials."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    p, q, o = _grad_coefficients(_sum_splits(partial_ptr, 0, splits, C, c, c_mask, BLOCK_C),
                                 _sum_splits(partial_ptr, 1, splits, C, c, c_mask, BLOCK_C),
                                 _load_f64(var_ptr, c, c_mask), _load_f64(mean_ptr, c, c_mask), R, c, c_mask, w_ptr,
                                 dweight_ptr, dbias_ptr, _eps_f64(eps_hi, eps_lo), HAS_W, TRAINING, ACC)
    tl.store(p_ptr + c, p.to(ACC), mask=c_mask)
    tl.store(q_ptr + c, q.to(ACC), mask=c_mask)
    tl.store(o_ptr + c, o.to(ACC), mask=c_mask)


@triton.jit
def _grad_apply_kernel(gy_ptr, x_ptr, scale_ptr, shift_ptr, dx_ptr, p_ptr, q_ptr, o_ptr, alpha, R, C, HW, W,
                       s_n, s_c, s_h, s_w, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = dz * p[c] + x * q[c] + o[c], dz = dy act'(z)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    p = tl.load(p_ptr + c, mask=c_mask, other=0.0)
    q = tl.load(q_ptr + c, mask=c_mask, other=0.0)
    o = tl.load(o_ptr + c, mask=c_mask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    _grad_apply_tile(gy_ptr, x_ptr, dx_ptr, tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R), R, c, c_mask, scale,
                     shift, p, q, o, alpha, HW, W, s_n, s_c, s_h, s_w, ACT, ACC)


# --- Single-pass path: one program per block of channels walks all their rows, each direction in one launch. ---

@triton.jit
def _single_pass_forward_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr, factor, unbias, alpha,
                                R, C, HW, W, s_n, s_c, s_h, s_w, eps_hi, eps_lo, HAS_W: tl.constexpr,
                                HAS_B: tl.constexpr, UPDATE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The whole training forward of BLOCK_C channels in one program (few rows per channel): the sums of
    _stats_kernel over all rows, _stats_finish_kernel's algebra (and the running-statistics update),
    then _apply_kernel's pass, whose second read of the channels' rows mostly hits the cache."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    x0 = tl.load(x_ptr + c.to(tl.int64) * s_c, mask=c_mask, other=0.0).to(ACC)
    acc_s = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    acc_ss = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        d = _shifted_tile(x_ptr, r0 + tl.arange(0, BLOCK_R), R, c, c_mask, x0, HW, W, s_n, s_c, s_h, s_w, ACC)
        acc_s += d
        acc_ss += d * d
    scale, shift = _finish_stats(tl.sum(acc_s, axis=0).to(tl.float64), tl.sum(acc_ss, axis=0).to(tl.float64), x0,
                                 R, c, c_mask, w_ptr, b_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr, factor, unbias,
                                 _eps_f64(eps_hi, eps_lo), HAS_W, HAS_B, UPDATE, ACC)
    scale = scale.to(ACC)
    shift = shift.to(ACC)
    for r0 in range(0, R, BLOCK_R):
        _apply_tile(x_ptr, y_ptr, r0 + tl.arange(0, BLOCK_R), R, c, c_mask, scale, shift, alpha, HW, W, s_n, s_c, s_h,
                    s_w, ACT, ACC)


@triton.jit
def _single_pass_backward_kernel(gy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, dx_ptr, dweight_ptr, dbias_ptr, alpha,
                                 R, C, HW, W, s_n, s_c, s_h, s_w, eps_hi, eps_lo, HAS_W: tl.constexpr,
                                 HAS_B: tl.constexpr, TRAINING: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The whole backward of BLOCK_C channels in one program: _scale_shift_kernel's algebra, the sums of
    _grad_stats_kernel over all rows, _grad_finish_kernel's algebra, then _grad_apply_kernel's pass."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    eps = _eps_f64(eps_hi, eps_lo)
    mean64 = _load_f64(mean_ptr, c, c_mask)
    var64 = _load_f64(var_ptr, c, c_mask)
    _, scale, shift = _scale_shift_f64(mean64, var64, w_ptr, b_ptr, c, c_mask, eps, HAS_W, HAS_B)
    scale = scale.to(ACC)
    shift = shift.to(ACC)
    mean = mean64.to(ACC)
    acc_dz = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    acc_dzx = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        dz, dzx = _grad_sums_tile(gy_ptr, x_ptr, r0 + tl.arange(0, BLOCK_R), R, c, c_mask, mean, scale, shift, alpha,
                                  HW, W, s_n, s_c, s_h, s_w, ACT, ACC)
        acc_dz += dz
        acc_dzx += dzx
    p, q, o = _grad_coefficients(tl.sum(acc_dz, axis=0).to(tl.float64), tl.sum(acc_dzx, axis=0).to(tl.float64), var64,
                                 mean64, R, c, c_mask, w_ptr, dweight_ptr, dbias_ptr, eps, HAS_W, TRAINING, ACC)
    p = p.to(ACC)
    q = q.to(ACC)
    o = o.to(ACC)
    for r0 in range(0, R, BLOCK_R):
        _grad_apply_tile(gy_ptr, x_ptr, dx_ptr, r0 + tl.arange(0, BLOCK_R), R, c, c_mask, scale, shift, p, q, o, alpha,
                         HW, W, s_n, s_c, s_h, s_w, ACT, ACC)


# ---------------------------------------------------------------------------------------------
# Launchers (called by fastgan/ops/batch_norm_act.py; arguments already validated there).
# ---------------------------------------------------------------------------------------------

def _geometry(x: torch.Tensor):
    """(R, C, HW, W, strides n/c/h/w) of x walked as rows x channels; 2-D x is (N, C, 1, 1)."""
    if x.dim() == 2:
        n, c = x.shape
        return n, c, 1, 1, (x.stride(0), x.stride(1), 0, 0)
    n, c, h, w = x.shape
    return n * h * w, c, h * w, w, x.stride()


def _blocks(x: torch.Tensor, c: int) -> tuple[int, int]:
    """Tile shape: wide in channels when channels are the contiguous direction, else tall in rows."""
    if x.stride(1) == 1 and c > 1:
        block_c = min(64, triton.next_power_of_2(c))
    else:
        block_c = 1 if c == 1 else 2
    return TILE // block_c, block_c


def _acc(x: torch.Tensor):
    """(torch dtype, tl dtype) of the statistics: float64 for float64 x, else float32."""
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def _channel_block(c: int) -> tuple[int, int]:
    """(BLOCK_C, programs) of the per-channel finishing kernels (no programs for C = 0)."""
    block = min(1024, triton.next_power_of_2(max(c, 1)))
    return block, triton.cdiv(c, block)


def _reduce_launch(kernel, tensors, x, r, c, hw, w, strides, scalars, act=None) -> tuple[torch.Tensor, int]:
    """Launch a two-output per-channel reduction; returns its (2, splits, C) partial rows and splits."""
    acc, acc_tl = _acc(x)
    block_r, block_c = _blocks(x, c)
    c_blocks = triton.cdiv(c, block_c)
    splits = max(1, min(MAX_SPLITS, triton.cdiv(r, block_r), max(1, 1024 // c_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(r, splits), block_r) * block_r
    splits = triton.cdiv(r, rows_per_split)
    partial = torch.empty((2, splits, c), device=x.device, dtype=acc)
    constexprs = {"ACC": acc_tl, "BLOCK_R": block_r, "BLOCK_C": block_c}
    if act is not None:
        constexprs["ACT"] = act
    kernel[(c_blocks, splits)](*tensors, partial, *scalars, r, c, hw, w, *strides, rows_per_split, **constexprs)
    return partial, splits


def _split_eps(eps: float) -> tuple[float, float]:
    """eps as float32 head + tail: a float kernel argument is float32, and eps rounded to float32 moves
    invstd by ~1e-8 where var is near eps -- visible in float64 BatchNorm."""
    head = float(np.float32(eps))
    return head, float(np.float32(eps - head))


def _param(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A per-channel parameter as a kernel argument (``like`` stands in for None: never read)."""
    return like if t is None else t.contiguous()


def _scale_shift(weight, bias, mean, var, eps: float, acc, acc_tl) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) in ``acc`` with z = x * scale + shift, from given mean and var."""
    c = mean.numel()
    scale, shift = torch.empty(c, device=mean.device, dtype=acc), torch.empty(c, device=mean.device, dtype=acc)
    block, programs = _channel_block(c)
    _scale_shift_kernel[(programs,)](mean, var, _param(weight, mean), _param(bias, mean), scale, shift, c,
                                     *_split_eps(eps), HAS_W=weight is not None, HAS_B=bias is not None,
                                     ACC=acc_tl, BLOCK_C=block)
    return scale, shift


def _single_pass_blocks(x: torch.Tensor, r: int, c: int) -> tuple[int, int] | None:
    """(BLOCK_R, BLOCK_C) of the single-pass kernels, or None where a program would take on too many rows."""
    block_c = min(16, triton.next_power_of_2(c)) if x.stride(1) == 1 and c > 1 else 1
    if r * block_c > SINGLE_PASS_MAX_ELEMENTS:
        return None
    return min(TILE // block_c, max(16, triton.next_power_of_2(r))), block_c


def batch_norm_act_forward(x, weight, bias, mean, var, training: bool, eps: float, act: int, alpha: float,
                           running=None):
    """(y, mean, biased var); see fastgan.ops.batch_norm_act._forward_op. ``running``: None, or
    (running_mean, running_var, factor, count) to update in place in the same launch (training only:
    nn.BatchNorm's r = (1 - factor) r + factor s, with the unbiased batch variance)."""
    r, c, hw, w, strides = _geometry(x)
    acc, acc_tl = _acc(x)
    update = training and running is not None
    rm, rv, factor, unbias = (running[0], running[1], float(running[2]), running[3] / (running[3] - 1)) if update \
        else (x, x, 0.0, 0.0)
    if training:
        mean, var = torch.empty(c, device=x.device, dtype=acc), torch.empty(c, device=x.device, dtype=acc)
        single = _single_pass_blocks(x, r, c)
        if single is not None:
            y = torch.empty_like(x)
            block_r, block_c = single
            _single_pass_forward_kernel[(triton.cdiv(c, block_c),)](
                x, y, _param(weight, mean), _param(bias, mean), mean, var, rm, rv, factor, unbias, alpha, r, c, hw, w,
                *strides, *_split_eps(eps), HAS_W=weight is not None, HAS_B=bias is not None, UPDATE=update,
                ACT=act, ACC=acc_tl, BLOCK_R=block_r, BLOCK_C=block_c)
            return y, mean, var
        partial, splits = _reduce_launch(_stats_kernel, (x,), x, r, c, hw, w, strides, ())
        scale, shift = torch.empty_like(mean), torch.empty_like(mean)
        block, programs = _channel_block(c)
        _stats_finish_kernel[(programs,)](partial, x, strides[1], _param(weight, mean), _param(bias, mean), mean, var,
                                          scale, shift, rm, rv, factor, unbias, splits, r, c, *_split_eps(eps),
                                          HAS_W=weight is not None, HAS_B=bias is not None, UPDATE=update,
                                          ACC=acc_tl, BLOCK_C=block)
    else:
        mean = mean.to(acc).clone(memory_format=torch.contiguous_format)
        var = var.to(acc).clone(memory_format=torch.contiguous_format)
        scale, shift = _scale_shift(weight, bias, mean, var, eps, acc, acc_tl)
    y = torch.empty_like(x)
    block_r, block_c = _blocks(x, c)
    grid = (triton.cdiv(c, block_c), triton.cdiv(r, block_r))
    _apply_kernel[grid](x, y, scale, shift, alpha, r, c, hw, w,
                        *strides, ACT=act, ACC=acc_tl, BLOCK_R=block_r, BLOCK_C=block_c)
    return y, mean, var


def batch_norm_act_backward(grad_out, x, weight, bias, mean, var, training: bool, eps: float, act: int,
                            alpha: float):
    """(dx, dweight, dbias), the parameter grads in the statistics' dtype; see
    fastgan.ops.batch_norm_act._backward_op."""
    r, c, hw, w, strides = _geometry(x)
    acc, acc_tl = _acc(x)
    if x.numel() == 0:  # (eval mode: training needs values) nothing to walk; an empty grad_out's strides are arbitrary
        return torch.empty_like(x), torch.zeros(c, device=x.device, dtype=acc), torch.zeros(c, device=x.device, dtype=acc)
    if grad_out.stride() != x.stride():
        raise ValueError("batch_norm_act_backward (triton): grad_out and x must share strides")
    mean_v, var_v = mean.to(acc).contiguous(), var.to(acc).contiguous()
    single = _single_pass_blocks(x, r, c)
    if single is not None:
        dx = torch.empty_like(x)
        dweight, dbias = torch.empty(c, device=x.device, dtype=acc), torch.empty(c, device=x.device, dtype=acc)
        block_r, block_c = single
        _single_pass_backward_kernel[(triton.cdiv(c, block_c),)](
            grad_out, x, _param(weight, mean_v), _param(bias, mean_v), mean_v, var_v, dx, dweight, dbias, alpha,
            r, c, hw, w, *strides, *_split_eps(eps), HAS_W=weight is not None, HAS_B=bias is not None,
            TRAINING=training, ACT=act, ACC=acc_tl, BLOCK_R=block_r, BLOCK_C=block_c)
        return dx, dweight, dbias
    scale, shift = _scale_shift(weight, bias, mean_v, var_v, eps, acc, acc_tl)
    partial, splits = _reduce_launch(_grad_stats_kernel, (grad_out, x, mean_v, scale, shift), x,
                                     r, c, hw, w, strides, (alpha,), act=act)
    dweight, dbias, p, q, o = (torch.empty(c, device=x.device, dtype=acc) for _ in range(5))
    block, programs = _channel_block(c)
    _grad_finish_kernel[(programs,)](partial, _param(weight, mean_v), mean_v, var_v, dweight, dbias, p, q, o, splits,
                                     r, c, *_split_eps(eps), HAS_W=weight is not None, TRAINING=training, ACC=acc_tl,
                                     BLOCK_C=block)
    dx = torch.empty_like(x)
    block_r, block_c = _blocks(x, c)
    grid = (triton.cdiv(c, block_c), triton.cdiv(r, block_r))
    _grad_apply_kernel[grid](grad_out, x, scale, shift, dx, p, q, o, alpha, r, c, hw, w, *strides,
                             ACT=act, ACC=acc_tl, BLOCK_R=block_r, BLOCK_C=block_c)
    return dx, dweight, dbias
