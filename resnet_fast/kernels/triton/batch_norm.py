"""Training BatchNorm fused with (+ residual) and ReLU, in Triton: the forward statistics, the
forward apply pass (``_apply_kernel``: (x - mean) * a + b, then the residual and ReLU), the
backward reduction and the backward element pass.

x is viewed as (N, C, HW) with element (n, c, s) at n * sN + c * sC + s * sHW, which covers
NCHW (sC = HW, sHW = 1) and channels_last (sC = 1, sHW = C) with one kernel; a tile is
[BLOCK_R rows (n, s), BLOCK_C channels]. Reductions are two-level: each program sums its rows
in float32 (statistics shifted by the channel's first value, so a large mean cannot cancel the
variance away) into a [programs, C] partial array, which the host adds up in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import dense_in, layout_of
from .elementwise import SUPPORTED, _add_act_store

_MAX_ROW_PROGRAMS = 512


@triton.jit
def _tile_offsets(rows0, c0, ROWS, HW, C, sN, sC, sHW,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = rows0 + tl.arange(0, BLOCK_R).to(tl.int64)
    c = c0 + tl.arange(0, BLOCK_C)
    n = r // HW
    s = r % HW
    offs = (n * sN + s * sHW)[:, None] + (c.to(tl.int64) * sC)[None, :]
    mask = (r < ROWS)[:, None] & (c < C)[None, :]
    return offs, mask, c


@triton.jit
def _partial_sums_kernel(x_ptr, g_ptr, o_ptr, k_ptr, p1_ptr, p2_ptr,
                         ROWS, HW, C, sN, sC, sHW, PROGS,
                         BWD: tl.constexpr, RELU: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Forward (BWD=0): sum(x - k), sum((x - k)^2) per channel, k the shift.
    Backward (BWD=1): sum(g'), sum(g' * (x - k)) with g' = grad, 0 where out <= 0 (a NaN
    output passes it, as torch.relu's backward), k the mean."""
    pid = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    cc = c0 + tl.arange(0, BLOCK_C)
    k = tl.load(k_ptr + cc, mask=cc < C, other=0.0)
    a1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for rows0 in range(pid * BLOCK_R, ROWS, PROGS * BLOCK_R):
        offs, mask, _ = _tile_offsets(rows0, c0, ROWS, HW, C, sN, sC, sHW, BLOCK_R, BLOCK_C)
        d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - k[None, :], 0.0)
        if BWD:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if RELU:
                o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                g = tl.where(o <= 0, 0.0, g)
            a1 += tl.sum(g, axis=0)
            a2 += tl.sum(g * d, axis=0)
        else:
            a1 += tl.sum(d, axis=0)
            a2 += tl.sum(d * d, axis=0)
    tl.store(p1_ptr + pid * C + cc, a1, mask=cc < C)
    tl.store(p2_ptr + pid * C + cc, a2, mask=cc < C)


@triton.jit
def _apply_kernel(x_ptr, r_ptr, out_ptr, m_ptr, a_ptr, b_ptr, ROWS, HW, C, sN, sC, sHW,
                  RELU: tl.constexpr, RES: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = act((x - mean) * a + b (+ r)): x - mean first, so a large mean cannot cancel
    digits away (x * a + (b - mean * a) would)."""
    offs, mask, c = _tile_offsets(tl.program_id(0).to(tl.int64) * BLOCK_R, tl.program_id(1) * BLOCK_C,
                                  ROWS, HW, C, sN, sC, sHW, BLOCK_R, BLOCK_C)
    cm = c < C
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(m_ptr + c, mask=cm, other=0.0)[None, :]
    a = tl.load(a_ptr + c, mask=cm, other=0.0)[None, :]
    b = tl.load(b_ptr + c, mask=cm, other=0.0)[None, :]
    _add_act_store((x - mean) * a + b, r_ptr, out_ptr, offs, mask, RES, RELU)


@triton.jit
def _bwd_elemt_kernel(x_ptr, g_ptr, o_ptr, m_ptr, a_ptr, b_ptr, k_ptr, dx_ptr, dr_ptr,
                      ROWS, HW, C, sN, sC, sHW,
                      RELU: tl.constexpr, RES: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = a * g' + b * (x - mean) + k per channel; d residual = g'."""
    offs, mask, c = _tile_offsets(tl.program_id(0).to(tl.int64) * BLOCK_R, tl.program_id(1) * BLOCK_C,
                                  ROWS, HW, C, sN, sC, sHW, BLOCK_R, BLOCK_C)
    cm = c < C
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(o <= 0, 0.0, g)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(m_ptr + c, mask=cm, other=0.0)[None, :]
    a = tl.load(a_ptr + c, mask=cm, other=0.0)[None, :]
    b = tl.load(b_ptr + c, mask=cm, other=0.0)[None, :]
    k = tl.load(k_ptr + c, mask=cm, other=0.0)[None, :]
    dx = a * g + b * (x - mean) + k
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if RES:
        tl.store(dr_ptr + offs, g.to(dr_ptr.dtype.element_ty), mask=mask)


def _geometry(x: torch.Tensor):
    """(rows, HW, C, sN, sC, sHW) of x dense in its layout."""
    n, c = x.shape[0], x.shape[1]
    hw = x.numel() // max(n * c, 1)
    if layout_of(x) == torch.channels_last:
        return n * hw, hw, c, hw * c, 1, c
    return n * hw, hw, c, c * hw, hw, 1


def _blocks(c: int, rows: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(max(c, 1)), 64)
    block_r = max(16, min(4096 // block_c, triton.next_power_of_2(max(rows, 1))))
    return block_r, block_c


def _sums(x, g, o, k, bwd: bool, relu: bool):
    rows, hw, c, sn, sc, shw = _geometry(x)
    block_r, block_c = _blocks(c, rows)
    progs = max(1, min(_MAX_ROW_PROGRAMS, triton.cdiv(rows, block_r)))
    p1 = torch.empty((progs, c), device=x.device, dtype=torch.float32)
    p2 = torch.empty_like(p1)
    _partial_sums_kernel[(progs, triton.cdiv(c, block_c))](
        x, g if g is not None else x, o if o is not None else x, k, p1, p2,
        rows, hw, c, sn, sc, shw, progs, BWD=bwd, RELU=relu, BLOCK_R=block_r, BLOCK_C=block_c)
    return p1.sum(0, dtype=torch.float64), p2.sum(0, dtype=torch.float64)


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED:
        raise TypeError(f"batch_norm_act (triton): expected float32, float16 or bfloat16, got "
                        f"{x.dtype}; use the cpu/cuda backend for float64")


def bn_act_fwd(x, weight, bias, residual, relu: bool, eps: float):
    """(out, mean, biased var) of training BN on x, fused with (+ residual) and ReLU."""
    _check_dtype(x)
    fmt = layout_of(x)
    x = dense_in(x, fmt)
    c = x.shape[1]
    rows = x.numel() // max(c, 1)
    if x.numel() == 0:
        nan = torch.full((c,), float("nan"), device=x.device)
        return torch.empty_like(x, memory_format=fmt), nan, nan.clone()
    shift = x.reshape(x.shape[0], c, -1)[0, :, 0].float().contiguous()
    s1, s2 = _sums(x, None, None, shift, bwd=False, relu=False)
    m = s1 / rows
    mean = (shift.double() + m).float()
    var = (s2 / rows - m * m).clamp_min(0).float()
    invstd = torch.rsqrt(var + eps)
    scale = (invstd * weight.float() if weight is not None else invstd).contiguous()
    bias_ = (bias.float() if bias is not None else torch.zeros_like(mean)).contiguous()
    out = torch.empty_like(x, memory_format=fmt)
    res = dense_in(residual, fmt) if residual is not None else x
    n_rows, hw, _, sn, sc, shw = _geometry(x)
    block_r, block_c = _blocks(c, n_rows)
    _apply_kernel[(triton.cdiv(n_rows, block_r), triton.cdiv(c, block_c))](
        x, res, out, mean, scale, bias_, n_rows, hw, c, sn, sc, shw, RELU=bool(relu),
        RES=residual is not None, BLOCK_R=block_r, BLOCK_C=block_c)
    return out, mean, var


def bn_act_bwd(grad, x, out, weight, mean, var, eps: float, relu: bool, residual_grad: bool):
    _check_dtype(x)
    fmt = layout_of(x)
    x, grad, out = dense_in(x, fmt), dense_in(grad, fmt), dense_in(out, fmt)
    c = x.shape[1]
    rows = x.numel() // max(c, 1)
    dres = torch.empty_like(x, memory_format=fmt) if residual_grad else x.new_empty(0)
    if x.numel() == 0:
        zeros = torch.zeros(c, device=x.device, dtype=torch.float32)
        return torch.empty_like(x, memory_format=fmt), zeros, zeros.clone(), dres
    mean = mean.float().contiguous()
    sg, sgx = _sums(x, grad, out, mean, bwd=True, relu=relu)
    invstd = torch.rsqrt(var.double() + eps)
    w = weight.double() if weight is not None else torch.ones_like(invstd)
    a = w * invstd
    b = -a * invstd * invstd * sgx / rows
    k = -a * sg / rows
    dx = torch.empty_like(x, memory_format=fmt)
    n_rows, hw, _, sn, sc, shw = _geometry(x)
    block_r, block_c = _blocks(c, n_rows)
    _bwd_elemt_kernel[(triton.cdiv(n_rows, block_r), triton.cdiv(c, block_c))](
        x, grad, out, mean, a.float(), b.float(), k.float(), dx, dres if residual_grad else dx,
        n_rows, hw, c, sn, sc, shw, RELU=relu, RES=residual_grad, BLOCK_R=block_r,
        BLOCK_C=block_c)
    return dx, (sgx * invstd).float(), sg.float(), dres
