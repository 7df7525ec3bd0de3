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
Partial rows are summed by torch: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgan.ops.triton.activations import act_grad_from_output, apply_act

MAX_SPLITS = 128        # row splits of the reduction kernels (partial rows)
TILE = 2048             # elements per program tile


@triton.jit
def _tile_offsets(r, c, HW, W, s_n, s_c, s_h, s_w):
    """Memory offsets of the [BLOCK_R, BLOCK_C] tile of rows r (n, h, w flattened) and channels c."""
    r = r.to(tl.int64)
    n = r // HW
    hw = r - n * HW
    h = hw // W
    w = hw - h * W
    return (n * s_n + h * s_h + w * s_w)[:, None] + c.to(tl.int64)[None, :] * s_c


@triton.jit
def _stats_kernel(x_ptr, partial_ptr, R, C, HW, W, s_n, s_c, s_h, s_w, rows_per_split,
                  ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """partial[0, split, c] = sum (x - x[0, c]), partial[1, split, c] = sum (x - x[0, c])^2."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    shift = tl.load(x_ptr + c.to(tl.int64) * s_c, mask=c_mask, other=0.0).to(ACC)
    acc_s = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    acc_ss = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, R)
    for r0 in range(row_start, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < row_end)[:, None] & c_mask[None, :]
        v = tl.load(x_ptr + _tile_offsets(r, c, HW, W, s_n, s_c, s_h, s_w), mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, v - shift[None, :], 0.0)
        acc_s += d
        acc_ss += d * d
    out = partial_ptr + split * C + c
    tl.store(out, tl.sum(acc_s, axis=0), mask=c_mask)
    tl.store(out + tl.num_programs(1) * C, tl.sum(acc_ss, axis=0), mask=c_mask)


@triton.jit
def _apply_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, alpha, R, C, HW, W, s_n, s_c, s_h, s_w,
                  ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act(x * scale[c] + shift[c]); y has x's strides."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    c_mask = c < C
    mask = (r < R)[:, None] & c_mask[None, :]
    offs = _tile_offsets(r, c, HW, W, s_n, s_c, s_h, s_w)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    z = v * scale[None, :] + shift[None, :]
    y = apply_act(z, alpha, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dz(gy, v, scale, shift, alpha, ACT: tl.constexpr):
    """dy * act'(z) with z = x * scale + shift recomputed (act' through the table's rule in y)."""
    y = apply_act(v * scale[None, :] + shift[None, :], alpha, ACT)
    return gy * act_grad_from_output(y, alpha, ACT)


@triton.jit
def _grad_stats_kernel(gy_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, partial_ptr, alpha, R, C, HW, W, s_n, s_c, s_h, s_w,
                       rows_per_split, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """partial[0, split, c] = sum dz, partial[1, split, c] = sum dz (x - mean[c]), dz = dy act'(z)."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    acc_dz = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    acc_dzx = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, R)
    for r0 in range(row_start, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < row_end)[:, None] & c_mask[None, :]
        offs = _tile_offsets(r, c, HW, W, s_n, s_c, s_h, s_w)
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dz = tl.where(mask, _dz(gy, v, scale, shift, alpha, ACT), 0.0)
        acc_dz += dz
        acc_dzx += dz * tl.where(mask, v - mean[None, :], 0.0)
    out = partial_ptr + split * C + c
    tl.store(out, tl.sum(acc_dz, axis=0), mask=c_mask)
    tl.store(out + tl.num_programs(1) * C, tl.sum(acc_dzx, axis=0), mask=c_mask)


@triton.jit
def _grad_apply_kernel(gy_ptr, x_ptr, scale_ptr, shift_ptr, dx_ptr, p_ptr, q_ptr, o_ptr, alpha, R, C, HW, W,
                       s_n, s_c, s_h, s_w, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = dz * p[c] + x * q[c] + o[c], dz = dy act'(z)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    c_mask = c < C
    mask = (r < R)[:, None] & c_mask[None, :]
    offs = _tile_offsets(r, c, HW, W, s_n, s_c, s_h, s_w)
    p = tl.load(p_ptr + c, mask=c_mask, other=0.0)
    q = tl.load(q_ptr + c, mask=c_mask, other=0.0)
    o = tl.load(o_ptr + c, mask=c_mask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dz = _dz(gy, v, scale, shift, alpha, ACT)
    dx = dz * p[None, :] + v * q[None, :] + o[None, :]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


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


def _channel_vector(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous()


def _reduce_launch(kernel, tensors, x, r, c, hw, w, strides, scalars, act=None):
    """Launch a two-output per-channel reduction; returns its (2, C) sums in float64."""
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
    return partial.to(torch.float64).sum(dim=1)  # the few partial rows, combined in float64


def _channel_shift(x: torch.Tensor) -> torch.Tensor:
    """x[0, c] at the first spatial position: the shift the stats kernel subtracts."""
    return x[0].reshape(x.shape[1], -1)[:, 0]


def _scale_shift(weight, bias, mean, var, eps: float):
    """Per-channel z = x * scale + shift (float64, cast by the caller): scale = w invstd."""
    invstd = torch.rsqrt(var.to(torch.float64) + eps)
    scale = invstd if weight is None else weight.to(torch.float64) * invstd
    shift = -mean.to(torch.float64) * scale
    if bias is not None:
        shift = shift + bias.to(torch.float64)
    return invstd, scale, shift


def batch_norm_act_forward(x, weight, bias, mean, var, training: bool, eps: float, act: int, alpha: float):
    """(y, mean, biased var); see fastgan.ops.batch_norm_act._forward_op."""
    r, c, hw, w, strides = _geometry(x)
    acc, acc_tl = _acc(x)
    if training:
        sums = _reduce_launch(_stats_kernel, (x,), x, r, c, hw, w, strides, ())
        m_shifted = sums[0] / r
        mean = (_channel_shift(x).to(torch.float64) + m_shifted).to(acc)
        var = (sums[1] / r - m_shifted * m_shifted).clamp_min(0.0).to(acc)
    else:
        mean, var = mean.to(acc).clone(), var.to(acc).clone()
    _, scale, shift = _scale_shift(weight, bias, mean, var, eps)
    y = torch.empty_like(x)
    block_r, block_c = _blocks(x, c)
    grid = (triton.cdiv(c, block_c), triton.cdiv(r, block_r))
    _apply_kernel[grid](x, y, _channel_vector(scale, acc), _channel_vector(shift, acc), alpha, r, c, hw, w,
                        *strides, ACT=act, ACC=acc_tl, BLOCK_R=block_r, BLOCK_C=block_c)
    return y, mean, var


def batch_norm_act_backward(grad_out, x, weight, bias, mean, var, training: bool, eps: float, act: int,
                            alpha: float):
    """(dx, dweight, dbias), the parameter grads in the statistics' dtype; see
    fastgan.ops.batch_norm_act._backward_op."""
    if grad_out.stride() != x.stride():
        raise ValueError("batch_norm_act_backward (triton): grad_out and x must share strides")
    r, c, hw, w, strides = _geometry(x)
    acc, acc_tl = _acc(x)
    invstd, scale, shift = _scale_shift(weight, bias, mean, var, eps)
    scale_v, shift_v = _channel_vector(scale, acc), _channel_vector(shift, acc)
    sums = _reduce_launch(_grad_stats_kernel, (grad_out, x, _channel_vector(mean, acc), scale_v, shift_v), x,
                          r, c, hw, w, strides, (alpha,), act=act)
    sum_dz, sum_dzx = sums[0], sums[1]
    dbias = sum_dz.to(acc)
    dweight = (sum_dzx * invstd).to(acc)
    # dx = p dz + q x + o: p = w invstd; in training q, o subtract the mean of dz and its projection on x_hat.
    p = invstd if weight is None else weight.to(torch.float64) * invstd
    if training:
        q = -p * invstd * invstd * sum_dzx / r
        o = -p * sum_dz / r - q * mean.to(torch.float64)
    else:
        q = torch.zeros_like(p)
        o = torch.zeros_like(p)
    dx = torch.empty_like(x)
    block_r, block_c = _blocks(x, c)
    grid = (triton.cdiv(c, block_c), triton.cdiv(r, block_r))
    _grad_apply_kernel[grid](grad_out, x, scale_v, shift_v, dx, _channel_vector(p, acc), _channel_vector(q, acc),
                             _channel_vector(o, acc), alpha, r, c, hw, w, *strides,
                             ACT=act, ACC=acc_tl, BLOCK_R=block_r, BLOCK_C=block_c)
    return dx, dweight, dbias
