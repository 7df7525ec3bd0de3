"""Triton kernels of bias_act and its gradient (see fastgan/ops/bias_act.py for the math and reference).

Tensors arrive as contiguous 3-D views (outer, C, inner) with the bias along C (Python prepares
them): (rows, features, 1) for linear layers and channels_last maps, (N, C, H*W) for NCHW maps. A
program handles a [BLOCK_R, BLOCK_C] tile, r running over the flattened (outer, inner) pairs. The
gradient kernel writes d loss / d x and one row of per-channel partial sums per row-block, which
torch sums (deterministic: no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgan.ops.triton.activations import act_backward, apply_act

TILE = 4096  # elements per program


def _acc(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


@triton.jit
def _tile(R, C, INNER, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INDEX64: tl.constexpr):
    """Offsets, mask and channel indices of this program's tile (in int64 where the tensor has 2**31
    elements or more: int32 offsets would wrap)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if INDEX64:
        r = r.to(tl.int64)
        c = c.to(tl.int64)
    o = r // INNER
    i = r - o * INNER
    offs = (o * C * INNER + i)[:, None] + (c * INNER)[None, :]
    mask = (r < R)[:, None] & (c < C)[None, :]
    return offs, mask, c


@triton.jit
def _bias_act_kernel(x_ptr, b_ptr, y_ptr, R, C, INNER, alpha, gain, clamp,
                     HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_CLAMP: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INDEX64: tl.constexpr):
    offs, mask, c = _tile(R, C, INNER, BLOCK_R, BLOCK_C, INDEX64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        b = tl.load(b_ptr + c, mask=c < C, other=0.0).to(ACC)
        x = x + b[None, :]
    y = apply_act(x, alpha, ACT) * gain
    if HAS_CLAMP:
        # comparisons rather than tl.minimum / tl.maximum, which may turn NaN into a number
        y = tl.where(y > clamp, clamp, tl.where(y < -clamp, -clamp, y))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_grad_kernel(gy_ptr, y_ptr, gx_ptr, partial_ptr, R, C, INNER, alpha, gain, inv_gain, clamp,
                          NEED_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_CLAMP: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INDEX64: tl.constexpr):
    offs, mask, c = _tile(R, C, INNER, BLOCK_R, BLOCK_C, INDEX64)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_CLAMP:
        # saturated outputs pass no gradient; the mask applies first, as torch's clamp backward before
        # the activation's (a NaN output of tanh keeps a NaN gradient)
        gy = tl.where(tl.abs(y) < clamp, gy, 0.0)
    # f'(x) from the saved output y = clamp(f(x) * gain): f(x) = y / gain
    g = act_backward(gy * gain, y * inv_gain, alpha, ACT)
    g = tl.where(mask, g, 0.0)
    tl.store(gx_ptr + offs, g.to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_BIAS:
        tl.store(partial_ptr + tl.program_id(0) * C + c, tl.sum(g, axis=0), mask=c < C)


def _index64(t: torch.Tensor) -> bool:
    """Whether offsets into t need int64 (Triton computes them in int32 from int32 indices): its farthest
    element, through its strides, at 2**31 - 1 or beyond."""
    if t.numel() == 0:
        return False
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) >= 2 ** 31 - 1


def _blocks(R: int, C: int, inner: int) -> tuple[int, int]:
    """Tile shape: wide along C for rows of features, wide along r for NCHW planes."""
    if inner == 1:
        block_c = min(128, triton.next_power_of_2(C))
        block_r = max(1, min(triton.next_power_of_2(R), TILE // block_c))
    else:
        block_r = min(1024, triton.next_power_of_2(R))
        block_c = max(1, min(triton.next_power_of_2(C), TILE // block_r))
    return block_r, block_c


def bias_act_forward(x3: torch.Tensor, bias: torch.Tensor | None, y3: torch.Tensor, act: int, alpha: float,
                     gain: float, clamp: float) -> None:
    """Writes y3 = clamp(act(x3 + bias) * gain); x3, y3 contiguous (outer, C, inner); clamp < 0: none."""
    outer, C, inner = x3.shape
    R = outer * inner
    if R * C == 0:
        return
    acc_tl, _ = _acc(x3.dtype)
    block_r, block_c = _blocks(R, C, inner)
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, block_c))
    _bias_act_kernel[grid](x3, bias if bias is not None else x3, y3, R, C, inner, alpha, gain, max(clamp, 0.0),
                           HAS_BIAS=bias is not None, ACT=act, HAS_CLAMP=clamp >= 0, ACC=acc_tl,
                           BLOCK_R=block_r, BLOCK_C=block_c, INDEX64=_index64(x3))


def bias_act_backward(gy3: torch.Tensor, y3: torch.Tensor, gx3: torch.Tensor, need_bias_grad: bool, act: int,
                      alpha: float, gain: float, clamp: float) -> torch.Tensor:
    """Writes gx3 and returns d loss / d bias (length C in y3's dtype; empty unless need_bias_grad)."""
    outer, C, inner = y3.shape
    R = outer * inner
    if R * C == 0:
        gx3.zero_()
        return y3.new_zeros(C if need_bias_grad else 0)
    acc_tl, acc_torch = _acc(y3.dtype)
    block_r, block_c = _blocks(R, C, inner)
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, block_c))
    partial = torch.empty((grid[0], C) if need_bias_grad else (1,), device=y3.device, dtype=acc_torch)
    _bias_act_grad_kernel[grid](gy3, y3, gx3, partial, R, C, inner, alpha, gain, 1.0 / gain, max(clamp, 0.0),
                                NEED_BIAS=need_bias_grad, ACT=act, HAS_CLAMP=clamp >= 0, ACC=acc_tl,
                                BLOCK_R=block_r, BLOCK_C=block_c, INDEX64=_index64(y3))
    if not need_bias_grad:
        return y3.new_empty(0)
    return partial.sum(0).to(y3.dtype)
