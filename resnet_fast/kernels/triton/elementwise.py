"""Elementwise epilogues in Triton: add_relu and scale_shift_act.

Layout: tensors are walked in the caller's memory format. NCHW scale_shift_act runs each
program on one block of one (n, c) plane, so the channel is a scalar per program (no
per-element division); channels_last runs [rows, channels] tiles with the channel vector
from arange.
Offsets are int64. Math in float32, rounded once on store. ReLU keeps NaN (tl.maximum(v, 0)
would turn NaN into 0). The launchers expect validated arguments (resnet_fast.ops checks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import dense_in, layout_of

SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _relu_nan(v):
    return tl.where((v > 0) | (v != v), v, 0.0)


@triton.jit
def _add_act_store(v, r_ptr, out_ptr, offs, mask, HAS_RES: tl.constexpr, RELU: tl.constexpr):
    """out[offs] = act(v (+ r[offs])), in out's dtype: the epilogue every fused kernel ends
    with (v is float32)."""
    if HAS_RES:
        v += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        v = _relu_nan(v)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_relu_kernel(x_ptr, r_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, _relu_nan(x + r).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_shift_act_tile(x_ptr, r_ptr, out_ptr, offs, mask, s, b, HAS_RES: tl.constexpr,
                          RELU: tl.constexpr):
    v = tl.load(x_ptr + offs, mask=mask).to(tl.float32) * s + b
    _add_act_store(v, r_ptr, out_ptr, offs, mask, HAS_RES, RELU)


@triton.jit
def _scale_shift_act_planes_kernel(x_ptr, s_ptr, b_ptr, r_ptr, out_ptr, C, inner, chunks,
                                   BLOCK: tl.constexpr, HAS_RES: tl.constexpr,
                                   RELU: tl.constexpr):
    # NCHW: plane = n * C + c holds `inner` = H*W contiguous values, cut in `chunks` blocks.
    # One grid axis (CUDA's axes 1 and 2 stop at 65535: 256 x 2048 planes, or a 2^31-element
    # plane, would not launch).
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // chunks
    cols = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    offs = plane * inner + cols
    c = plane % C
    s = tl.load(s_ptr + c)
    b = tl.load(b_ptr + c)
    _scale_shift_act_tile(x_ptr, r_ptr, out_ptr, offs, mask, s, b, HAS_RES, RELU)


@triton.jit
def _scale_shift_act_rows_kernel(x_ptr, s_ptr, b_ptr, r_ptr, out_ptr, rows, C,
                                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                                 HAS_RES: tl.constexpr, RELU: tl.constexpr):
    # channels_last: rows = N*H*W, each of C contiguous channel values.
    r_idx = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c_idx = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_idx < C
    mask = (r_idx < rows)[:, None] & c_mask[None, :]
    offs = r_idx[:, None] * C + c_idx[None, :]
    s = tl.load(s_ptr + c_idx, mask=c_mask, other=0.0)[None, :]
    b = tl.load(b_ptr + c_idx, mask=c_mask, other=0.0)[None, :]
    _scale_shift_act_tile(x_ptr, r_ptr, out_ptr, offs, mask, s, b, HAS_RES, RELU)


def _check_dtype(x: torch.Tensor, op: str) -> None:
    if x.dtype not in SUPPORTED:
        raise TypeError(f"{op} (triton): expected float32, float16 or bfloat16, got {x.dtype}; "
                        "use the cpu/cuda backend for float64")


def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    _check_dtype(x, "add_relu")
    fmt = layout_of(x)
    x, residual = dense_in(x, fmt), dense_in(residual, fmt)
    out = torch.empty_like(x, memory_format=fmt)
    n = x.numel()
    if n:
        block = 4096
        _add_relu_kernel[(triton.cdiv(n, block),)](x, residual, out, n, BLOCK=block)
    return out


def scale_shift_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                    residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    _check_dtype(x, "scale_shift_act")
    fmt = layout_of(x)
    x = dense_in(x, fmt)
    r = dense_in(residual, fmt) if residual is not None else x  # x: a valid, unread pointer
    s = scale.to(torch.float32).contiguous()
    b = shift.to(torch.float32).contiguous()
    out = torch.empty_like(x, memory_format=fmt)
    if x.numel() == 0:
        return out
    n, c = x.shape[0], x.shape[1]
    inner = x.numel() // (n * c)
    flags = dict(HAS_RES=residual is not None, RELU=bool(relu))
    if fmt == torch.channels_last:
        rows = n * inner
        block_c = min(triton.next_power_of_2(c), 256)
        block_r = max(1, 4096 // block_c)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(c, block_c))
        _scale_shift_act_rows_kernel[grid](x, s, b, r, out, rows, c, BLOCK_R=block_r,
                                           BLOCK_C=block_c, **flags)
    else:
        block = min(triton.next_power_of_2(inner), 4096)
        chunks = triton.cdiv(inner, block)
        _scale_shift_act_planes_kernel[(n * c * chunks,)](x, s, b, r, out, c, inner, chunks,
                                                          BLOCK=block, **flags)
    return out
