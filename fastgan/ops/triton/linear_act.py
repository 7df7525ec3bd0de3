"""Triton kernel of linear_act's forward (see fastgan/ops/linear_act.py for the math and reference):
a tiled ``tl.dot`` matmul, fp32 accumulation, with bias, activation and gain applied in its epilogue
before the single store, so the pre-activation never goes to memory. Float32 on CUDA without TF32
(torch's default precision) multiplies with cuBLAS instead and applies the epilogue with bias_act's
kernel (see linear_act_forward). The backward's element-wise
part is bias_act's gradient kernel (fastgan/ops/triton/bias_act.py); its matmuls use torch's GEMM.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgan.ops.triton.activations import apply_act
from fastgan.ops.triton.bias_act import _index64, bias_act_forward


@triton.jit
def _linear_act_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
                       stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                       alpha, gain,
                       HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, DOT_IN_ACC: tl.constexpr,
                       DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INDEX64: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if INDEX64:  # an operand of 2**31 elements or more: int32 offsets would wrap
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
        rk = rk.to(tl.int64)
    mask_m, mask_n = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & (kk < K)[None, :], other=0.0)
        # (BLOCK_K, BLOCK_N) tile of weight.T
        b = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=(kk < K)[:, None] & mask_n[None, :], other=0.0)
        if DOT_IN_ACC:
            # Triton's CPU interpreter (3.9) computes bf16 x bf16 tl.dot wrongly: upcast there only.
            a = a.to(ACC)
            b = b.to(ACC)
        acc += tl.dot(a, b, input_precision=DOT_PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(ACC)
        acc = acc + bias[None, :]
    y = apply_act(acc, alpha, ACT) * gain
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _on_cuda(t: torch.Tensor) -> bool:
    """Whether ``t`` is a CUDA tensor, for the launch choices that differ between the GPU and Triton's
    interpreter. One function so that benchmarks/kernel_resources.py can record CUDA's choices from CPU
    tensors."""
    return t.device.type == "cuda"


def _config(M: int, N: int, K: int, cuda: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps); tl.dot needs every block >= 16."""
    if not cuda:  # interpreter: fewer, larger programs run faster
        return (max(16, min(64, triton.next_power_of_2(M))), max(16, min(64, triton.next_power_of_2(N))),
                max(16, min(64, triton.next_power_of_2(K))), 4)
    if M <= 64:
        return 32, 64, 64, 4
    return 64, 128, 32, (4 if N <= 256 else 8)


def dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input precision for float32 operands: TF32 only where torch's own float32 matmuls may use it
    (torch.backends.cuda.matmul.fp32_precision = "tf32", or the older allow_tf32 / set_float32_matmul_precision
    other than "highest"),
    so the fused layer rounds like the nn.Linear it replaces. Triton's default is TF32, which on an H100
    put 1e-3 relative errors into float32 layers that torch computes to 1e-6."""
    if dtype != torch.float32:
        return None  # Triton's default; the setting only means something for float32 operands
    return "tf32" if _cuda_matmul_allows_tf32() else "ieee"


def _cuda_matmul_allows_tf32() -> bool:
    """torch's TF32 setting for CUDA matmuls, through either of its APIs: torch >= 2.9's
    ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" / "ieee"; "none" defers to
    ``torch.backends.fp32_precision``, then to the legacy flag), or ``allow_tf32`` -- which raises once
    the new API has been used, so it is read last."""
    for precision in (getattr(torch.backends.cuda.matmul, "fp32_precision", None),
                      getattr(torch.backends, "fp32_precision", None)):
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # a mix of the two APIs that torch declines to resolve: full precision
        return False


def linear_act_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: int, alpha: float,
                       gain: float) -> torch.Tensor:
    """act(x @ weight.T + bias) * gain for x (M, K), weight (N, K), bias (N,) or None; any strides."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    precision = dot_precision(x.dtype)
    cuda = _on_cuda(x)
    if precision == "ieee" and cuda:
        # Full-precision float32 tl.dot has no tensor-core path and ran at half cuBLAS's float32 GEMM
        # in the MLP step on an H100 (the fused layers made the step 1.8x slower than unfused ones), so
        # here cuBLAS multiplies and the bias_act kernel applies bias, activation and gain in place:
        # one extra pass over the (M, N) result instead of a slow matmul.
        torch.mm(x, weight.t(), out=y)
        bias_act_forward(y.view(M, N, 1), bias, y.view(M, N, 1), act, alpha, gain, -1.0)  # -1: no clamp
        return y
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    block_m, block_n, block_k, warps = _config(M, N, K, cuda)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _linear_act_kernel[grid](x, weight, bias if bias is not None else y, y, M, N, K,
                             x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
                             alpha, gain, HAS_BIAS=bias is not None, ACT=act, ACC=acc,
                             DOT_IN_ACC=not cuda, DOT_PRECISION=precision,
                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                             INDEX64=any(_index64(t) for t in (x, weight, y)), num_warps=warps)
    return y
