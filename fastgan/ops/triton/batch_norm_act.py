"""Triton kernels of BatchNorm + activation (math and reference: fastgan/ops/batch_norm_act.py).

x is walked as N*H*W rows by C channels (a 2-D (N, C) input is (N, C, 1, 1)), contiguous or
channels_last: row r sits at r * s_w (channels_last, (N, C)) or at (r // HW) * s_n + (r % HW) * s_w
(NCHW), HW a compile-time constant (see _tile_offsets). Each program handles a [BLOCK_R, BLOCK_C]
tile: for NCHW the rows are the contiguous direction (BLOCK_R large), for channels_last the channels
are (BLOCK_C large), so loads coalesce either way.

Split path (large maps), two launches each way. Forward: ``_stats_kernel`` (per-channel sums of
x - shift, in float32 (float64 for float64 x), one row of partials per split of the rows;
shift = the mean of the channel's first 64 rows keeps the variance free of cancellation) then
``_apply_kernel`` (y = act(x * scale + shift), scale and shift per channel). Backward:
``_grad_stats_kernel`` (sum dz, sum dz (x - mean), dz = dy act'(z) with z = x * scale + shift recomputed
from x, so y is never read) then
``_grad_apply_kernel`` (dx = dz * p + x * q + o per channel). The last program of each reduction to
finish a block of channels (an atomic counter per block: ``_store_partials_and_count``) sums the
partial rows in float64, in order (deterministic), and does the per-channel algebra (mean, var,
running statistics, scale, shift; dweight, dbias, p, q, o). Done with torch ops, that algebra was
some 25 tiny launches each way per layer call; as separate finishing kernels, two more launches and a
few microseconds of latency each on an H200.

Where a channel's rows are few (small feature maps: 512 x 4x4 at batch 64), the launches cost more
than the lost parallelism: ``_single_pass_forward_kernel`` and ``_single_pass_backward_kernel`` then
do each direction in one launch, one program per block of channels (see SINGLE_PASS_MAX_ELEMENTS).
Eval mode normalises with given statistics: ``_scale_shift_kernel`` then ``_apply_kernel``.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import torch
import triton
import triton.language as tl

from fastgan.ops.triton.activations import act_backward, apply_act

MAX_SPLITS = 128        # row splits of the reduction kernels (partial rows)
TILE = 2048             # elements per program tile
# Largest rows x channels a single-pass program takes on (the whole forward, or backward, of its channels in
# one launch): eight tiles. Measured on an H200 (kernel device time of forward + backward, batch 64, NCHW,
# benchmarks/profile_ops.py; results under benchmarks/results/2026-11-26-h200/): single pass against split
# 9.7 against 15.0 us at 256 x 8x8 (4096 rows per channel), 20.6 against 21.9 us at 128 x 16x16 (16384 rows).
# FASTGAN_BN_SINGLE_PASS_MAX_ELEMENTS overrides it (0: always split).
SINGLE_PASS_MAX_ELEMENTS = int(os.environ.get("FASTGAN_BN_SINGLE_PASS_MAX_ELEMENTS", 8 * TILE))


@triton.jit
def _tile_offsets(r, c, HW: tl.constexpr, s_n, s_c, s_w, ROWS: tl.constexpr):
    """Memory offsets of the [BLOCK_R, BLOCK_C] tile of rows r (n and the H x W position flattened) and
    channels c. ROWS (see _geometry): 2, row r at r * s_w (channels_last, (N, C)): no division; 1, each
    image's H x W plane evenly strided (NCHW): one division by HW, a compile-time constant (a shift for
    the usual powers of two). A per-element division by a runtime HW and W was what bound these
    kernels (H200: the statistics pass of 64 x 32x32 at a fifth of the memory bandwidth)."""
    if ROWS == 2:
        rows = r.to(tl.int64) * s_w
    else:
        n = r // HW
        rows = n.to(tl.int64) * s_n + (r - n * HW).to(tl.int64) * s_w
    return rows[:, None] + c.to(tl.int64)[None, :] * s_c


# --- Tile bodies: one [BLOCK_R, BLOCK_C] tile of each pass, shared by the split and single-pass kernels. ---

# rows whose mean shifts the statistics' sums (csrc/cpu/batch_norm_act.cpp: kShiftSample)
SHIFT_SAMPLE = tl.constexpr(64)


@triton.jit
def _shift_sample(x_ptr, R, c, c_mask, HW: tl.constexpr, s_n, s_c, s_w, ROWS: tl.constexpr, ACC: tl.constexpr,
                  SAMPLE: tl.constexpr):
    """The mean of each channel's first min(SAMPLE, R) rows: the shift of the statistics' sums. The
    variance sum(d^2)/n - mean(d)^2 of d = x - shift cancels by as many digits as the shift is standard
    deviations from the mean; a channel's first value alone (an outlier, say 300 sigma off) cost 0.5 % of
    the variance in float32, a sample's mean stays close. Every program of a channel computes the same."""
    r = tl.arange(0, SAMPLE)
    mask = (r < R)[:, None] & c_mask[None, :]
    v = tl.load(x_ptr + _tile_offsets(r, c, HW, s_n, s_c, s_w, ROWS), mask=mask, other=0.0).to(ACC)
    return tl.sum(v, axis=0) / tl.minimum(R, SAMPLE)


@triton.jit
def _shifted_tile(x_ptr, r, r_end, c, c_mask, x0, HW: tl.constexpr, s_n, s_c, s_w, ROWS: tl.constexpr, ACC: tl.constexpr):
    """x - x0[c] on the tile (0 outside rows < r_end; x0 from _shift_sample): the statistics' summand,
    free of cancellation."""
    mask = (r < r_end)[:, None] & c_mask[None, :]
    v = tl.load(x_ptr + _tile_offsets(r, c, HW, s_n, s_c, s_w, ROWS), mask=mask, other=0.0).to(ACC)
    return tl.where(mask, v - x0[None, :], 0.0)


@triton.jit
def _apply_tile(x_ptr, y_ptr, r, R, c, c_mask, scale, shift, alpha, HW: tl.constexpr, s_n, s_c, s_w, ROWS: tl.constexpr,
                ACT: tl.constexpr, ACC: tl.constexpr):
    """y = act(x * scale[c] + shift[c]) on the tile; y has x's strides."""
    mask = (r < R)[:, None] & c_mask[None, :]
    offs = _tile_offsets(r, c, HW, s_n, s_c, s_w, ROWS)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = apply_act(v * scale[None, :] + shift[None, :], alpha, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dz(gy, v, scale, shift, alpha, ACT: tl.constexpr):
    """dy * act'(z) with z = x * scale + shift recomputed (act' through the table's rule in y)."""
    y = apply_act(v * scale[None, :] + shift[None, :], alpha, ACT)
    return act_backward(gy, y, alpha, ACT)


@triton.jit
def _grad_sums_tile(gy_ptr, x_ptr, r, r_end, c, c_mask, mean, scale, shift, alpha, HW: tl.constexpr, s_n, s_c, s_w, ROWS: tl.constexpr,
                    ACT: tl.constexpr, ACC: tl.constexpr):
    """(dz, dz (x - mean[c])) on the tile, 0 outside rows < r_end; dz = dy act'(z)."""
    mask = (r < r_end)[:, None] & c_mask[None, :]
    offs = _tile_offsets(r, c, HW, s_n, s_c, s_w, ROWS)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dz = tl.where(mask, _dz(gy, v, scale, shift, alpha, ACT), 0.0)
    return dz, dz * tl.where(mask, v - mean[None, :], 0.0)


@triton.jit
def _grad_apply_tile(gy_ptr, x_ptr, dx_ptr, r, R, c, c_mask, scale, shift, p, q, o, alpha, HW: tl.constexpr, s_n, s_c,
                     s_w, ROWS: tl.constexpr, TRAINING: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr):
    """dx = dz * p[c] + x * q[c] + o[c] on the tile, dz = dy act'(z); in eval mode (q = o = 0) dx = dz * p[c],
    so that a NaN x gives a NaN dx only where torch's does (through dz), not through x * 0."""
    mask = (r < R)[:, None] & c_mask[None, :]
    offs = _tile_offsets(r, c, HW, s_n, s_c, s_w, ROWS)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dz = _dz(gy, v, scale, shift, alpha, ACT)
    if TRAINING:
        dx = dz * p[None, :] + v * q[None, :] + o[None, :]
    else:
        dx = dz * p[None, :]
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
def _param_f64(ptr, c, c_mask, HAS: tl.constexpr, default):
    """A per-channel parameter in float64, or ``default`` (1 for an absent weight, 0 for an absent bias:
    multiplying by one and adding zero are exact, so the algebra needs no branches)."""
    if HAS:
        return _load_f64(ptr, c, c_mask)
    return tl.full(c.shape, default, tl.float64)


@triton.jit
def _forward_channel_params(w_ptr, b_ptr, rm_ptr, rv_ptr, c, c_mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                            UPDATE: tl.constexpr):
    """(w, b, running_mean, running_var) of channels c in float64, as _finish_stats takes them (the running
    statistics only with UPDATE, else zeros never used)."""
    return (_param_f64(w_ptr, c, c_mask, HAS_W, 1.0), _param_f64(b_ptr, c, c_mask, HAS_B, 0.0),
            _param_f64(rm_ptr, c, c_mask, UPDATE, 0.0), _param_f64(rv_ptr, c, c_mask, UPDATE, 0.0))


@triton.jit
def _backward_channel_params(mean_ptr, var_ptr, w_ptr, b_ptr, c, c_mask, eps, HAS_W: tl.constexpr,
                             HAS_B: tl.constexpr, ACC: tl.constexpr):
    """What a backward kernel needs per channel: (mean, var, w) in float64 for _grad_coefficients, and the
    forward's (mean, scale, shift) in ACC, recomputed from the saved statistics, for the tiles."""
    mean64 = _load_f64(mean_ptr, c, c_mask)
    var64 = _load_f64(var_ptr, c, c_mask)
    w = _param_f64(w_ptr, c, c_mask, HAS_W, 1.0)
    _, scale, shift = _scale_shift_f64(mean64, var64, w, _param_f64(b_ptr, c, c_mask, HAS_B, 0.0), eps)
    return mean64, var64, w, mean64.to(ACC), scale.to(ACC), shift.to(ACC)


@triton.jit
def _scale_shift_f64(mean, var, w, b, eps):
    """(invstd, scale, shift) in float64 with z = x * scale + shift: scale = w invstd, shift = b - mean scale."""
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = w * invstd
    return invstd, scale, b - mean * scale


@triton.jit
def _finish_stats(sum_s, sum_ss, x0, R, c, c_mask, w, b, rm, rv, mean_ptr, var_ptr, rm_ptr, rv_ptr, factor, unbias,
                  eps, UPDATE: tl.constexpr, ACC: tl.constexpr):
    """From the float64 sums of x - x0 and their squares: store the batch's mean and biased var (ACC),
    update the running statistics rm, rv (UPDATE: nn.BatchNorm's r = (1 - factor) r + factor s, s the
    unbiased variance var * unbias, unbias = count / (count - 1)), and return (scale, shift) in float64,
    computed from the statistics as saved, as the backward recomputes them. The parameters and running
    statistics come in as values, loaded before: in a split kernel this runs last, on the critical path."""
    m_shifted = sum_s / R
    var = sum_ss / R - m_shifted * m_shifted
    var = tl.where(var < 0.0, 0.0, var)  # clamp rounding below zero; NaN (inf in x) stays NaN, as in torch
    mean = (x0.to(tl.float64) + m_shifted).to(ACC)
    var = var.to(ACC)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(var_ptr + c, var, mask=c_mask)
    if UPDATE:
        f = tl.cast(factor, tl.float64)
        rm = rm * (1.0 - f) + mean.to(tl.float64) * f
        rv = rv * (1.0 - f) + var.to(tl.float64) * tl.cast(unbias, tl.float64) * f
        tl.store(rm_ptr + c, rm.to(rm_ptr.dtype.element_ty), mask=c_mask)
        tl.store(rv_ptr + c, rv.to(rv_ptr.dtype.element_ty), mask=c_mask)
    _, scale, shift = _scale_shift_f64(mean.to(tl.float64), var.to(tl.float64), w, b, eps)
    return scale, shift


@triton.jit
def _grad_coefficients(sum_dz, sum_dzx, var, mean, R, c, c_mask, w, dweight_ptr, dbias_ptr, eps,
                       TRAINING: tl.constexpr, ACC: tl.constexpr):
    """Store dbias = sum dz and dweight = sum dz x_hat; return dx = p dz + q x + o's per-channel (p, q, o) in
    float64: p = w invstd; in training q and o subtract the mean of dz and its projection on x_hat."""
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(dbias_ptr + c, sum_dz.to(ACC), mask=c_mask)
    tl.store(dweight_ptr + c, (sum_dzx * invstd).to(ACC), mask=c_mask)
    p = w * invstd
    if TRAINING:
        q = -p * invstd * invstd * sum_dzx / R
        o = -p * sum_dz / R - q * mean
    else:
        q = tl.zeros_like(p)
        o = tl.zeros_like(p)
    return p, q, o


@triton.jit
def _sum_splits(partial_ptr, splits, C, c, c_mask, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """(sum over k of partial[0, k, c], of partial[1, k, c]) in float64 (partial is (2, splits, C)
    contiguous). CHUNK splits of both rows a load, added element-wise, then one tree sum: a loop of
    single-row loads (15 us at 128 splits on an H200) or of per-chunk tree sums (a cross-warp reduction
    each) kept the last program waiting. The order of the sums is fixed by CHUNK: deterministic. The
    loads bypass L1 (.cg): other programs wrote these rows during this launch."""
    acc_a = tl.zeros((CHUNK, BLOCK_C), dtype=tl.float64)
    acc_b = tl.zeros((CHUNK, BLOCK_C), dtype=tl.float64)
    for k0 in range(0, splits, CHUNK):
        k = k0 + tl.arange(0, CHUNK)
        mask = (k < splits)[:, None] & c_mask[None, :]
        ptrs = partial_ptr + k[:, None] * C + c[None, :]
        acc_a += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
        acc_b += tl.load(ptrs + splits * C, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
    return tl.sum(acc_a, axis=0), tl.sum(acc_b, axis=0)


@triton.jit
def _store_partials_and_count(partial_ptr, counter_ptr, c, c_mask, C, sum_a, sum_b):
    """Store this split's two partial sums; return whether it is the last split of its channel block to
    do so, when all the block's partial rows are visible to it (and re-arm the block's counter for the
    next launch). The barrier orders every thread's stores before the release of the counter's
    increment; the acquire of the last increment orders them before the finishing loads."""
    out = partial_ptr + tl.program_id(1) * C + c
    tl.store(out, sum_a, mask=c_mask)
    tl.store(out + tl.num_programs(1) * C, sum_b, mask=c_mask)
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr + tl.program_id(0), 1, sem="acq_rel")
    last = done == tl.num_programs(1) - 1
    if last:
        tl.store(counter_ptr + tl.program_id(0), 0)
    return last


# --- Split path: row-split reductions whose last program per block of channels finishes the per-channel
# algebra (one launch instead of two), then an element-wise pass. ---

@triton.jit
def _stats_kernel(x_ptr, partial_ptr, counter_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, rm_ptr,
                  rv_ptr, factor, unbias, eps_hi, eps_lo, R, C, HW: tl.constexpr, s_n, s_c, s_w, rows_per_split,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """partial[0, split, c] = sum (x - x0[c]), partial[1, split, c] = sum (x - x0[c])^2 (x0: _shift_sample);
    the last split of a block of channels then stores their mean and biased var, scale and shift (and,
    with UPDATE, the running statistics)."""
    split = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    x0 = _shift_sample(x_ptr, R, c, c_mask, HW, s_n, s_c, s_w, ROWS, ACC, SHIFT_SAMPLE)
    w, b, rm, rv = _forward_channel_params(w_ptr, b_ptr, rm_ptr, rv_ptr, c, c_mask, HAS_W, HAS_B, UPDATE)
    acc_s = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    acc_ss = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, R)
    for r0 in range(row_start, row_end, BLOCK_R):
        d = _shifted_tile(x_ptr, r0 + tl.arange(0, BLOCK_R), row_end, c, c_mask, x0, HW, s_n, s_c, s_w, ROWS, ACC)
        acc_s += d
        acc_ss += d * d
    if _store_partials_and_count(partial_ptr, counter_ptr, c, c_mask, C, tl.sum(acc_s, axis=0),
                                 tl.sum(acc_ss, axis=0)):
        sum_s, sum_ss = _sum_splits(partial_ptr, tl.num_programs(1), C, c, c_mask, CHUNK, BLOCK_C)
        scale, shift = _finish_stats(sum_s, sum_ss, x0, R, c, c_mask, w, b, rm, rv, mean_ptr, var_ptr, rm_ptr, rv_ptr,
                                     factor, unbias, _eps_f64(eps_hi, eps_lo), UPDATE, ACC)
        tl.store(scale_ptr + c, scale.to(ACC), mask=c_mask)
        tl.store(shift_ptr + c, shift.to(ACC), mask=c_mask)


@triton.jit
def _scale_shift_kernel(mean_ptr, var_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, C, eps_hi, eps_lo,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """scale, shift (ACC) from given per-channel mean and var (eval mode)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    _, scale, shift = _scale_shift_f64(_load_f64(mean_ptr, c, c_mask), _load_f64(var_ptr, c, c_mask),
                                       _param_f64(w_ptr, c, c_mask, HAS_W, 1.0), _param_f64(b_ptr, c, c_mask, HAS_B, 0.0),
                                       _eps_f64(eps_hi, eps_lo))
    tl.store(scale_ptr + c, scale.to(ACC), mask=c_mask)
    tl.store(shift_ptr + c, shift.to(ACC), mask=c_mask)


@triton.jit
def _apply_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, alpha, R, C, HW: tl.constexpr, s_n, s_c, s_w,
                  ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    """y = act(x * scale[c] + shift[c]); y has x's strides. Rows on grid axis 0 (axis 1 stops at 65535
    blocks), channels on axis 1."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    _apply_tile(x_ptr, y_ptr, tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R), R, c, c_mask, scale, shift, alpha,
                HW, s_n, s_c, s_w, ROWS, ACT, ACC)


@triton.jit
def _grad_stats_kernel(gy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, partial_ptr, counter_ptr, scale_ptr, shift_ptr,
                       dweight_ptr, dbias_ptr, p_ptr, q_ptr, o_ptr, alpha, eps_hi, eps_lo, R, C, HW: tl.constexpr, s_n,
                       s_c, s_w, rows_per_split, HAS_W: tl.constexpr, HAS_B: tl.constexpr, TRAINING: tl.constexpr,
                       ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """partial[0, split, c] = sum dz, partial[1, split, c] = sum dz (x - mean[c]), dz = dy act'(z), with the
    forward's scale and shift recomputed from mean and var; the last split of a block of channels then
    stores dweight, dbias, and the scale, shift and (p, q, o) of _grad_apply_kernel."""
    split = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    eps = _eps_f64(eps_hi, eps_lo)
    mean64, var64, w, mean, scale, shift = _backward_channel_params(mean_ptr, var_ptr, w_ptr, b_ptr, c, c_mask, eps,
                                                                    HAS_W, HAS_B, ACC)
    acc_dz = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    acc_dzx = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, R)
    for r0 in range(row_start, row_end, BLOCK_R):
        dz, dzx = _grad_sums_tile(gy_ptr, x_ptr, r0 + tl.arange(0, BLOCK_R), row_end, c, c_mask, mean, scale, shift,
                                  alpha, HW, s_n, s_c, s_w, ROWS, ACT, ACC)
        acc_dz += dz
        acc_dzx += dzx
    if _store_partials_and_count(partial_ptr, counter_ptr, c, c_mask, C, tl.sum(acc_dz, axis=0),
                                 tl.sum(acc_dzx, axis=0)):
        sum_dz, sum_dzx = _sum_splits(partial_ptr, tl.num_programs(1), C, c, c_mask, CHUNK, BLOCK_C)
        p, q, o = _grad_coefficients(sum_dz, sum_dzx, var64, mean64, R, c, c_mask, w, dweight_ptr, dbias_ptr, eps,
                                     TRAINING, ACC)
        tl.store(scale_ptr + c, scale, mask=c_mask)
        tl.store(shift_ptr + c, shift, mask=c_mask)
        tl.store(p_ptr + c, p.to(ACC), mask=c_mask)
        tl.store(q_ptr + c, q.to(ACC), mask=c_mask)
        tl.store(o_ptr + c, o.to(ACC), mask=c_mask)


@triton.jit
def _grad_apply_kernel(gy_ptr, x_ptr, scale_ptr, shift_ptr, dx_ptr, p_ptr, q_ptr, o_ptr, alpha, R, C, HW: tl.constexpr, s_n, s_c, s_w, TRAINING: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    """dx = dz * p[c] + x * q[c] + o[c], dz = dy act'(z). Grid as _apply_kernel's."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    p = tl.load(p_ptr + c, mask=c_mask, other=0.0)
    q = tl.load(q_ptr + c, mask=c_mask, other=0.0)
    o = tl.load(o_ptr + c, mask=c_mask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    _grad_apply_tile(gy_ptr, x_ptr, dx_ptr, tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R), R, c, c_mask, scale,
                     shift, p, q, o, alpha, HW, s_n, s_c, s_w, ROWS, TRAINING, ACT, ACC)


# --- Single-pass path: one program per block of channels walks all their rows, each direction in one launch. ---

@triton.jit
def _single_pass_forward_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr, factor, unbias, alpha,
                                R, C, HW: tl.constexpr, s_n, s_c, s_w, eps_hi, eps_lo, HAS_W: tl.constexpr,
                                HAS_B: tl.constexpr, UPDATE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    """The whole training forward of BLOCK_C channels in one program (few rows per channel): the sums of
    _stats_kernel over all rows, its last program's algebra (and the running-statistics update),
    then _apply_kernel's pass, whose second read of the channels' rows mostly hits the cache."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    x0 = _shift_sample(x_ptr, R, c, c_mask, HW, s_n, s_c, s_w, ROWS, ACC, SHIFT_SAMPLE)
    w, b, rm, rv = _forward_channel_params(w_ptr, b_ptr, rm_ptr, rv_ptr, c, c_mask, HAS_W, HAS_B, UPDATE)
    acc_s = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    acc_ss = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        d = _shifted_tile(x_ptr, r0 + tl.arange(0, BLOCK_R), R, c, c_mask, x0, HW, s_n, s_c, s_w, ROWS, ACC)
        acc_s += d
        acc_ss += d * d
    scale, shift = _finish_stats(tl.sum(acc_s, axis=0).to(tl.float64), tl.sum(acc_ss, axis=0).to(tl.float64), x0,
                                 R, c, c_mask, w, b, rm, rv, mean_ptr, var_ptr, rm_ptr, rv_ptr, factor, unbias,
                                 _eps_f64(eps_hi, eps_lo), UPDATE, ACC)
    scale = scale.to(ACC)
    shift = shift.to(ACC)
    for r0 in range(0, R, BLOCK_R):
        _apply_tile(x_ptr, y_ptr, r0 + tl.arange(0, BLOCK_R), R, c, c_mask, scale, shift, alpha, HW, s_n, s_c,
                    s_w, ROWS, ACT, ACC)


@triton.jit
def _single_pass_backward_kernel(gy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, dx_ptr, dweight_ptr, dbias_ptr, alpha,
                                 R, C, HW: tl.constexpr, s_n, s_c, s_w, eps_hi, eps_lo, HAS_W: tl.constexpr,
                                 HAS_B: tl.constexpr, TRAINING: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    """The whole backward of BLOCK_C channels in one program: _grad_stats_kernel's sums over all rows and its
    last program's algebra, then _grad_apply_kernel's pass."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    eps = _eps_f64(eps_hi, eps_lo)
    mean64, var64, w, mean, scale, shift = _backward_channel_params(mean_ptr, var_ptr, w_ptr, b_ptr, c, c_mask, eps,
                                                                    HAS_W, HAS_B, ACC)
    acc_dz = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    acc_dzx = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        dz, dzx = _grad_sums_tile(gy_ptr, x_ptr, r0 + tl.arange(0, BLOCK_R), R, c, c_mask, mean, scale, shift, alpha,
                                  HW, s_n, s_c, s_w, ROWS, ACT, ACC)
        acc_dz += dz
        acc_dzx += dzx
    p, q, o = _grad_coefficients(tl.sum(acc_dz, axis=0).to(tl.float64), tl.sum(acc_dzx, axis=0).to(tl.float64), var64,
                                 mean64, R, c, c_mask, w, dweight_ptr, dbias_ptr, eps, TRAINING, ACC)
    p = p.to(ACC)
    q = q.to(ACC)
    o = o.to(ACC)
    for r0 in range(0, R, BLOCK_R):
        _grad_apply_tile(gy_ptr, x_ptr, dx_ptr, r0 + tl.arange(0, BLOCK_R), R, c, c_mask, scale, shift, p, q, o, alpha,
                         HW, s_n, s_c, s_w, ROWS, TRAINING, ACT, ACC)


# ---------------------------------------------------------------------------------------------
# Launchers (called by fastgan/ops/batch_norm_act.py; arguments already validated there).
# ---------------------------------------------------------------------------------------------

def _geometry(x: torch.Tensor):
    """(R, C, HW, strides n/c/w, ROWS) of x walked as rows x channels, R = N*H*W; 2-D x is (N, C, 1, 1).
    ROWS is _tile_offsets' row layout: 2 where row r sits at r * s_w (channels_last, (N, C)), 1 where
    each H x W plane is evenly strided (NCHW). HW (a compile-time constant of the kernels) is given as 1
    where ROWS == 2 does not use it, so channels_last maps of every size share one compilation. The
    callers pass contiguous or channels_last x."""
    if x.dim() == 2:
        (n, c), h, w = x.shape, 1, 1
        s_n, s_c = x.stride()
        s_h = s_w = s_n
    else:
        n, c, h, w = x.shape
        s_n, s_c, s_h, s_w = x.stride()
    # Only index 0 of a size-1 dimension is walked, so its stride is free: choose the one that keeps the
    # rows evenly strided.
    if w == 1:
        s_w = s_h
    if h == 1:
        s_h = w * s_w
    if n == 1:
        s_n = h * w * s_w
    if s_h != w * s_w:
        raise ValueError(f"batch_norm_act (triton): x must be contiguous or channels_last, got strides {x.stride()}")
    rows = 2 if s_n == h * w * s_w else 1
    return n * h * w, c, h * w if rows == 1 else 1, (s_n, s_c, s_w), rows


def _blocks(x: torch.Tensor, c: int) -> tuple[int, int]:
    """Tile shape: wide in channels when channels are the contiguous direction, else tall in rows."""
    if x.stride(1) == 1 and c > 1:
        block_c = min(64, triton.next_power_of_2(c))
    else:
        block_c = 1 if c == 1 else 2
    return TILE // block_c, block_c


def _apply_grid(r: int, c: int, block_r: int, block_c: int) -> tuple[int, int]:
    """Grid of the element-wise passes: row blocks on axis 0, which CUDA lets run to 2**31 - 1 blocks (a
    channels_last map of 32 x 64 x 256 x 256 has 65536 row blocks; axis 1 stops at 65535)."""
    return triton.cdiv(r, block_r), triton.cdiv(c, block_c)


def _acc(x: torch.Tensor):
    """(torch dtype, tl dtype) of the statistics: float64 for float64 x, else float32."""
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def _channel_block(c: int) -> tuple[int, int]:
    """(BLOCK_C, programs) of the per-channel kernel (eval's scale and shift; no programs for C = 0)."""
    block = min(1024, triton.next_power_of_2(max(c, 1)))
    return block, triton.cdiv(c, block)


class _CounterRing:
    """Zeroed int32 counters for the reduction kernels' last-split detection, one per block of channels.

    A kernel leaves its counters zeroed again (the last split re-arms them), so one buffer per device
    serves every call: each takes the next slots, so kernels running at once on different streams do not
    share counters unless the ring wrapped in between. Slots taken while a CUDA graph is being captured
    are kept out of later rounds (the graph's replays use them, at any time)."""

    SLOTS = 1 << 16

    def __init__(self, device: torch.device):
        self.buf = torch.zeros(self.SLOTS, dtype=torch.int32, device=device)
        self.next = 0
        self.floor = 0  # slots below belong to captured graphs
        self.lock = threading.Lock()  # threads launching on different streams must not get the same slots

    def take(self, n: int, keep: bool) -> torch.Tensor | None:
        """n consecutive slots, or None where even a new round has not n left above the kept ones."""
        with self.lock:
            if self.next + n > self.SLOTS:
                self.next = self.floor
            if self.next + n > self.SLOTS:
                return None
            start = self.next
            self.next += n
            if keep:
                self.floor = self.next
        return self.buf[start:start + n]


_COUNTER_RINGS: dict[torch.device, _CounterRing] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """n zeroed counters for one launch. The per-device ring is created on an eager call: created during a
    graph capture its zeroing would only be captured, not done, so a capture before any eager call (or a
    full ring) gets counters of its own (a zeroing memset in the graph)."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    ring = _COUNTER_RINGS.get(device)
    if ring is None and not capturing:
        ring = _COUNTER_RINGS[device] = _CounterRing(device)
    slots = ring.take(n, keep=capturing) if ring is not None else None
    return slots if slots is not None else torch.zeros(n, dtype=torch.int32, device=device)


def _split_launch(x: torch.Tensor, r: int, c: int):
    """Grid and blocks of a split reduction: ((c_blocks, splits), rows_per_split, BLOCK_R, BLOCK_C, CHUNK,
    partial rows (2, splits, C), counters)."""
    acc, _ = _acc(x)
    block_r, block_c = _blocks(x, c)
    c_blocks = triton.cdiv(c, block_c)
    splits = max(1, min(MAX_SPLITS, triton.cdiv(r, block_r), max(1, 1024 // c_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(r, splits), block_r) * block_r
    splits = triton.cdiv(r, rows_per_split)
    # The finishing adds up [CHUNK, BLOCK_C] tiles of partial sums (two float64 tiles of 1024 at most).
    chunk = max(1, min(triton.next_power_of_2(splits), 1024 // block_c))
    partial = torch.empty((2, splits, c), device=x.device, dtype=acc)
    return (c_blocks, splits), rows_per_split, block_r, block_c, chunk, partial, _counters(x.device, c_blocks)


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
    r, c, hw, strides, rows = _geometry(x)
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
                x, y, _param(weight, mean), _param(bias, mean), mean, var, rm, rv, factor, unbias, alpha, r, c, hw,
                *strides, *_split_eps(eps), HAS_W=weight is not None, HAS_B=bias is not None, UPDATE=update,
                ACT=act, ACC=acc_tl, BLOCK_R=block_r, BLOCK_C=block_c, ROWS=rows)
            return y, mean, var
        scale, shift = torch.empty_like(mean), torch.empty_like(mean)
        grid, rows_per_split, block_r, block_c, chunk, partial, counters = _split_launch(x, r, c)
        _stats_kernel[grid](x, partial, counters, _param(weight, mean), _param(bias, mean), mean, var, scale, shift,
                            rm, rv, factor, unbias, *_split_eps(eps), r, c, hw, *strides, rows_per_split,
                            HAS_W=weight is not None, HAS_B=bias is not None, UPDATE=update, ACC=acc_tl,
                            BLOCK_R=block_r, BLOCK_C=block_c, ROWS=rows, CHUNK=chunk)
    else:
        mean = mean.to(acc).clone(memory_format=torch.contiguous_format)
        var = var.to(acc).clone(memory_format=torch.contiguous_format)
        scale, shift = _scale_shift(weight, bias, mean, var, eps, acc, acc_tl)
    y = torch.empty_like(x)
    block_r, block_c = _blocks(x, c)
    grid = _apply_grid(r, c, block_r, block_c)
    _apply_kernel[grid](x, y, scale, shift, alpha, r, c, hw,
                        *strides, ACT=act, ACC=acc_tl, BLOCK_R=block_r, BLOCK_C=block_c, ROWS=rows)
    return y, mean, var


def batch_norm_act_backward(grad_out, x, weight, bias, mean, var, training: bool, eps: float, act: int,
                            alpha: float):
    """(dx, dweight, dbias), the parameter grads in the statistics' dtype; see
    fastgan.ops.batch_norm_act._backward_op."""
    r, c, hw, strides, rows = _geometry(x)
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
            r, c, hw, *strides, *_split_eps(eps), HAS_W=weight is not None, HAS_B=bias is not None,
            TRAINING=training, ACT=act, ACC=acc_tl, BLOCK_R=block_r, BLOCK_C=block_c, ROWS=rows)
        return dx, dweight, dbias
    scale, shift, dweight, dbias, p, q, o = (torch.empty(c, device=x.device, dtype=acc) for _ in range(7))
    grid, rows_per_split, block_r, block_c, chunk, partial, counters = _split_launch(x, r, c)
    _grad_stats_kernel[grid](grad_out, x, _param(weight, mean_v), _param(bias, mean_v), mean_v, var_v, partial, counters,
                             scale, shift, dweight, dbias, p, q, o, alpha, *_split_eps(eps), r, c, hw, *strides,
                             rows_per_split, HAS_W=weight is not None, HAS_B=bias is not None, TRAINING=training,
                             ACT=act, ACC=acc_tl, BLOCK_R=block_r, BLOCK_C=block_c, ROWS=rows, CHUNK=chunk)
    dx = torch.empty_like(x)
    block_r, block_c = _blocks(x, c)
    grid = _apply_grid(r, c, block_r, block_c)
    _grad_apply_kernel[grid](grad_out, x, scale, shift, dx, p, q, o, alpha, r, c, hw, *strides, TRAINING=training,
                             ACT=act, ACC=acc_tl, BLOCK_R=block_r, BLOCK_C=block_c, ROWS=rows)
    return dx, dweight, dbias
