"""Implicit-GEMM convolution with the bias + residual + ReLU epilogue, in Triton.

GEMM view (per group g): M = N*P*Q output pixels, N_gemm = K/groups output channels,
K_gemm = R*S*C/groups. Activations are NHWC (channels_last) and the weight (K, R, S, C/groups)
(the weight's channels_last layout), so a [BLOCK_M, BLOCK_K] tile of input is BLOCK_M pixels x
BLOCK_K consecutive channels. The K loop walks (r, s) and channel chunks; out-of-image taps
and channel tails are masked to zero. Accumulation is float32; bias, residual and ReLU are
applied to the accumulator in registers before the single store. Groups (ResNeXt) are the
third grid axis. float32 inputs use TF32 exactly when torch would for a convolution
(torch.backends.cudnn.allow_tf32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..layout import dense_in, layout_of
from .elementwise import _relu_nan

SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _configs():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # The interpreter runs every config it is given: one small tile keeps tests fast
        # and still exercises partial tiles.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4)]
    shapes = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): large tiles for the wide late layers,
        # narrow ones for the 64-channel early layers and the grouped convs.
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
        (64, 64, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 2, 5), (32, 32, 16, 2, 5),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


@triton.jit
def _conv_bias_act_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, out_ptr,
    H, W, C, K, P, Q,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    C_G, K_G,
    GEMM_M, GEMM_N, GEMM_K,
    R: tl.constexpr, S: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < GEMM_M
    n_mask = offs_n < GEMM_N
    n_img = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    h0 = (pq // Q) * stride_h - pad_h
    w0 = (pq % Q) * stride_w - pad_w
    k_out = g * K_G + offs_n  # global output channel
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(R):
        h = h0 + r * dil_h
        for s in range(S):
            w = w0 + s * dil_w
            pix_ok = m_mask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            x_row = ((n_img * H + h) * W + w) * C + g * C_G
            w_col = ((k_out.to(tl.int64) * R + r) * S + s) * C_G
            for c0 in range(0, C_G, BLOCK_K):
                offs_c = c0 + tl.arange(0, BLOCK_K)
                c_mask = offs_c < C_G
                a = tl.load(x_ptr + x_row[:, None] + offs_c[None, :],
                            mask=pix_ok[:, None] & c_mask[None, :], other=0.0)
                b = tl.load(w_ptr + w_col[None, :] + offs_c[:, None],
                            mask=c_mask[:, None] & n_mask[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + k_out, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_off = offs_m[:, None] * K + k_out[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = _relu_nan(acc)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)


_conv_bias_act_tuned = triton.autotune(configs=_configs(), key=["GEMM_M", "GEMM_N", "GEMM_K"])(
    _conv_bias_act_kernel)


def autotuning() -> bool:
    """Whether launches search the config list (RESNET_FAST_TRITON_AUTOTUNE=1, the default on
    GPU: once per GEMM shape and process, ~1 s of compiles each) or take one config per shape
    from :func:`heuristic_config` (=0: first call in a second, a few percent slower)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return os.environ.get("RESNET_FAST_TRITON_AUTOTUNE", "1") != "0"


def heuristic_config(gemm_m: int, gemm_n: int, c_g: int) -> dict:
    """One tile config for a GEMM shape, without a search: wide tiles where the problem is
    large, narrow where it is not (the 64-channel layers, batch-1 late layers, grouped convs);
    BLOCK_K no wider than the channels it walks (tl.dot needs >= 16)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)
    block_m = 128 if gemm_m >= 4096 else 64
    block_n = 128 if gemm_n >= 128 else 64 if gemm_n >= 64 else 32
    block_k = 64 if c_g >= 64 else 32 if c_g >= 32 else 16
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                num_stages=3 if block_k == 64 else 4)


def conv_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  stride: tuple[int, int], padding: tuple[int, int],
                  dilation: tuple[int, int], groups: int, residual: torch.Tensor | None,
                  relu: bool) -> torch.Tensor:
    """Host launcher; arguments validated by resnet_fast.ops. Output in x's memory format
    (NCHW input: computed in NHWC, converted back, one extra pass)."""
    if x.dtype not in SUPPORTED:
        raise TypeError(f"conv_bias_act (triton): expected float32, float16 or bfloat16, got "
                        f"{x.dtype}; use the cpu/cuda backend for float64")
    fmt = layout_of(x)
    n, c, h, w_in = x.shape
    k, c_g, r, s = weight.shape
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w_in + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    out = torch.empty((n, k, p, q), device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last)
    if out.numel() == 0:
        return out.contiguous(memory_format=fmt)
    xc = dense_in(x, torch.channels_last)
    wc = dense_in(weight, torch.channels_last)
    res = dense_in(residual, torch.channels_last) if residual is not None else out
    b = bias.contiguous() if bias is not None else out
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32
    k_g = k // groups
    gemm_m = n * p * q

    def grid(meta):
        return (triton.cdiv(gemm_m, meta["BLOCK_M"]), triton.cdiv(k_g, meta["BLOCK_N"]), groups)

    tuned = autotuning()
    kernel = _conv_bias_act_tuned if tuned else _conv_bias_act_kernel
    config = {} if tuned else heuristic_config(gemm_m, k_g, c_g)
    kernel[grid](
        xc, wc, b, res, out,
        h, w_in, c, k, p, q,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        c_g, k_g,
        gemm_m, k_g, c_g * r * s,
        R=r, S=s, HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=bool(relu),
        INPUT_PRECISION="tf32" if tf32 else "ieee", **config,
    )
    return out if fmt == torch.channels_last else out.contiguous(memory_format=fmt)
