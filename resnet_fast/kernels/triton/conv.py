"""Implicit-GEMM convolution with the bias + residual + ReLU epilogue, in Triton.

GEMM view (per group g): M = N*P*Q output pixels, N_gemm = K/groups output channels,
K_gemm = R*S*C/groups. Activations are NHWC (channels_last) and the weight (K, R, S, C/groups)
(the weight's channels_last layout, so each output channel's K_gemm values are contiguous).

- One K loop: a single ``for`` over R*S*ceil(C_G/BLOCK_K) steps, each decomposed into a tap
  (r, s) and a channel chunk, so the compiler software-pipelines it (``num_stages``) even
  where C_G <= BLOCK_K. Where C_G < BLOCK_K on a kernel wider than 1x1 (the C=3 stem,
  ResNeXt's 4-channel groups) the taps are packed into the K dimension instead (PACK_RS):
  each step takes BLOCK_K consecutive (r, s, c) values, so an MMA is not mostly padding.
- EVEN_K (the channels, or the packed taps, fill whole BLOCK_K chunks): no K mask.
- A 1x1, stride-1, unpadded conv is a plain GEMM over x viewed as [N*H*W, C] (GEMM_1X1: no
  pixel decomposition, no bounds mask).
- Rows and columns of partial tiles load a valid row (m % M) or column (n % N) and are masked
  only in the store.
- Tiles are visited in groups of GROUP_M row tiles (the Triton matmul tutorial's swizzle), so
  a group's activation tiles stay in L2 while the column tiles walk over them.
- Split-K (SPLIT_K > 1, where the output has few tiles for the SMs: batch 1's late layers):
  each split writes float32 partial sums to a workspace, and one reduce kernel adds them in a
  fixed order and applies the epilogue once.
- Index math is int32 unless a tensor the kernel addresses can pass 2^31 elements
  (:func:`needs_int64`, chosen at launch: the INT64 constexpr).

Accumulation is float32; bias, residual and ReLU (NaN-propagating) are applied in registers
before the single store. Groups (ResNeXt) are the third grid axis, the split the second.
float32 inputs use TF32 exactly when torch would for a convolution
(torch.backends.cudnn.allow_tf32).

Configs (tile sizes, GROUP_M, SPLIT_K, warps, stages) come, in order, from the ``config=``
argument, the per-shape table ``conv_configs.json`` (keyed by device name, Triton version and
:func:`shape_key`; written by ``benchmarks/tune_triton_conv.py`` on the GPU it describes, read
once per process), an in-memory autotune over :func:`search_tiles` for the input's dtype
(RESNET_FAST_TRITON_AUTOTUNE=1, the default on GPU; SPLIT_K from the heuristic), or
:func:`heuristic_config`. The environment is read once, when this module is imported.

Not done (Hopper-only, untestable under the interpreter): TMA descriptors, a persistent kernel.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
import triton
import triton.language as tl

from ..._jsonfile import TableWarning, read
from ..layout import dense_in, layout_of
from .elementwise import _add_act_store

SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter runs every config it is given, so it never searches.
AUTOTUNE = not INTERPRET and os.environ.get("RESNET_FAST_TRITON_AUTOTUNE", "1") != "0"
TABLE_PATH = Path(__file__).with_name("conv_configs.json")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "num_warps", "num_stages")
MAX_BLOCK = 256  # the widest tile of the autotune search (bounds the int32 check's overhang)
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for 2-byte inputs: large tiles for the wide late
# layers, narrow ones for the 64-channel early layers and the grouped convs. The widest (128 x
# 256 x 64 in 3 stages) pipelines 144 KiB of shared memory, within an A100's 163 KiB per block.
SEARCH = [
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (64, 64, 64, 4, 4),
    (64, 64, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 2, 5), (32, 32, 16, 2, 5),
]
# float32 (TF32 or not) pipelines twice the bytes per tile: BLOCK_K 64 put 128 x 128 in 4
# stages at 256 KiB, past the 227 KiB of an H100 (OutOfResources). Half the K tile keeps every
# 4-byte config at or below 144 KiB.
MAX_BLOCK_K_4_BYTE = 32


def search_tiles(dtype: torch.dtype) -> list[tuple[int, int, int, int, int]]:
    """The autotune search's (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for inputs of
    ``dtype``: SEARCH, with BLOCK_K at most MAX_BLOCK_K_4_BYTE for float32."""
    if dtype.itemsize < 4:
        return list(SEARCH)
    tiles = [(m, n, min(k, MAX_BLOCK_K_4_BYTE), w, s) for m, n, k, w, s in SEARCH]
    return list(dict.fromkeys(tiles))


def _config(tile: tuple[int, int, int, int, int]) -> triton.Config:
    m, n, k, w, s = tile
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                         num_warps=w, num_stages=s)


def _tile_of(config: triton.Config) -> tuple[int, int, int, int, int]:
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages


def _prune_for_dtype(configs: list[triton.Config], named_args: dict, **kwargs
                     ) -> list[triton.Config]:
    """The autotuner's early prune: only the tiles of search_tiles(x's dtype)."""
    allowed = set(search_tiles(named_args["x_ptr"].dtype))
    return [c for c in configs if _tile_of(c) in allowed]


def _pack_rs(args) -> bool:
    return args["R"] * args["S"] > 1 and args["C_G"] < args["BLOCK_K"]


def _even_k(args) -> bool:
    walked = args["R"] * args["S"] * args["C_G"] if _pack_rs(args) else args["C_G"]
    return walked % args["BLOCK_K"] == 0


def _pack_c(args) -> int:
    return args["C_G"] if _pack_rs(args) else 1


# Integer arguments that index only the pixel (GEMM M) axis, along which no load or store is
# contiguous: Triton's specialisation of them (== 1, % 16 == 0) would buy nothing and compile
# one kernel per combination. C, K, C_G, K_G and SPLIT_STRIDE stay specialised: they step the
# channel axis, and their divisibility is what lets loads and stores be vectorised.
PIXEL_ARGS = ["H", "W", "P", "Q", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
              "GEMM_M"]


@triton.jit
def _epilogue(acc, offs_m, offs_k, m_mask, n_mask, K, b_ptr, r_ptr, out_ptr,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr):
    """acc (+ bias[k]) (+ residual) -> ReLU -> out, rows offs_m and channels offs_k of the
    [M, K] (NHWC) output."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_k, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    _add_act_store(acc, r_ptr, out_ptr, offs_m[:, None] * K + offs_k[None, :],
                   m_mask[:, None] & n_mask[None, :], HAS_RES, RELU)


@triton.jit(do_not_specialize=PIXEL_ARGS)
def _conv_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, ws_ptr,
    H, W, C, K, P, Q,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    C_G, K_G, GEMM_M, SPLIT_STRIDE,
    R: tl.constexpr, S: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, GEMM_1X1: tl.constexpr, INT64: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PACK_RS: tl.constexpr, EVEN_K: tl.constexpr, PACK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2)
    num_pid_m = tl.cdiv(GEMM_M, BLOCK_M)
    num_pid_n = tl.cdiv(K_G, BLOCK_N)
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_m
    pid_n = (pid % tiles_per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INT64:
        offs_m = offs_m.to(tl.int64)
        pid_k = pid_k.to(tl.int64)
    m_mask = offs_m < GEMM_M
    n_mask = offs_n < K_G
    k_out = g * K_G + offs_n  # global output channel
    # Rows/columns past the edge read a valid row/column; only the store is masked.
    m_in = offs_m % GEMM_M
    if PACK_RS:
        # The packed index divides by the channel count: as a compile-time constant (the padded
        # stem's 8, ResNeXt's 4) that is a shift, and the loads see runs of c_g contiguous
        # channels at a known alignment (x's row, c_g * groups channels, via the grid's group
        # axis: C itself is not specialised below 16).
        c_g = PACK_C
        c_row = PACK_C * tl.num_programs(2)
    else:
        c_g = C_G
        c_row = C
    w_base = g * K_G + offs_n % K_G
    if INT64:
        w_base = w_base.to(tl.int64)
    w_base = w_base * (R * S * c_g)
    if GEMM_1X1:
        x_base = m_in * C + g * C_G
    else:
        n_img = m_in // (P * Q)
        pq = m_in % (P * Q)
        h0 = (pq // Q) * stride_h - pad_h
        w0 = (pq % Q) * stride_w - pad_w
        x_img = n_img * H
    if PACK_RS:
        k_steps = tl.cdiv(R * S * c_g, BLOCK_K)
    else:
        c_chunks = tl.cdiv(C_G, BLOCK_K)
        k_steps = R * S * c_chunks
    per_split = tl.cdiv(k_steps, SPLIT_K)
    step0 = pid_k * per_split
    step1 = tl.minimum(step0 + per_split, k_steps)
    offs_kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(step0, step1):
        if PACK_RS:
            kk = step * BLOCK_K + offs_kk  # (r, s, c) flattened
            rs = kk // c_g
            h = h0[:, None] + ((rs // S) * dil_h)[None, :]
            w = w0[:, None] + ((rs % S) * dil_w)[None, :]
            a_ptrs = x_ptr + ((x_img[:, None] + h) * W + w) * c_row + g * c_g + (kk % c_g)[None, :]
            b_ptrs = w_ptr + w_base[None, :] + kk[:, None]
            a_ok = (h >= 0) & (h < H) & (w >= 0) & (w < W)
            if EVEN_K:
                a = tl.load(a_ptrs, mask=a_ok, other=0.0)
                b = tl.load(b_ptrs)
            else:
                k_ok = kk < R * S * c_g
                a = tl.load(a_ptrs, mask=a_ok & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            rs = step // c_chunks
            offs_c = (step % c_chunks) * BLOCK_K + offs_kk
            b_ptrs = w_ptr + (w_base + rs * C_G)[None, :] + offs_c[:, None]
            if GEMM_1X1:
                a_ptrs = x_ptr + x_base[:, None] + offs_c[None, :]
                a_ok = tl.full((BLOCK_M,), 1, tl.int1)
            else:
                h = h0 + (rs // S) * dil_h
                w = w0 + (rs % S) * dil_w
                a_ptrs = x_ptr + (((x_img + h) * W + w) * C + g * C_G)[:, None] + offs_c[None, :]
                a_ok = (h >= 0) & (h < H) & (w >= 0) & (w < W)
            if EVEN_K:
                if GEMM_1X1:
                    a = tl.load(a_ptrs)
                else:
                    a = tl.load(a_ptrs, mask=a_ok[:, None], other=0.0)
                b = tl.load(b_ptrs)
            else:
                c_ok = offs_c < C_G
                a = tl.load(a_ptrs, mask=a_ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=c_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if SPLIT_K == 1:
        _epilogue(acc, offs_m, k_out, m_mask, n_mask, K, b_ptr, r_ptr, out_ptr,
                  HAS_BIAS, HAS_RES, RELU)
    else:
        off = pid_k * SPLIT_STRIDE + offs_m[:, None] * K + k_out[None, :]
        tl.store(ws_ptr + off, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["GEMM_M"])
def _split_k_reduce_kernel(ws_ptr, b_ptr, r_ptr, out_ptr, GEMM_M, K, SPLIT_STRIDE,
                           SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                           RELU: tl.constexpr, INT64: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sums the SPLIT_K float32 partials of one [BLOCK_M, BLOCK_N] output tile in split order
    (deterministic) and applies the epilogue once."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        offs_m = offs_m.to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < GEMM_M
    n_mask = offs_k < K
    mask = m_mask[:, None] & n_mask[None, :]
    ptrs = ws_ptr + offs_m[:, None] * K + offs_k[None, :]
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for _ in range(1, SPLIT_K):
        ptrs += SPLIT_STRIDE
        acc += tl.load(ptrs, mask=mask, other=0.0)
    _epilogue(acc, offs_m, offs_k, m_mask, n_mask, K, b_ptr, r_ptr, out_ptr,
              HAS_BIAS, HAS_RES, RELU)


_HEURISTICS = {"PACK_RS": _pack_rs, "EVEN_K": _even_k, "PACK_C": _pack_c}
_conv = triton.heuristics(_HEURISTICS)(_conv_kernel)
# The search is keyed on every argument that changes the compiled kernel or its speed: the
# whole geometry, the epilogue, the precision (TF32 or IEEE float32), int64 indexing and the
# split; Triton adds each tensor argument's dtype itself. SPLIT_STRIDE is GEMM_M * K.
AUTOTUNE_KEY = ["H", "W", "C", "K", "P", "Q", "stride_h", "stride_w", "pad_h", "pad_w",
                "dil_h", "dil_w", "C_G", "K_G", "GEMM_M", "R", "S", "HAS_BIAS", "HAS_RES",
                "RELU", "INPUT_PRECISION", "GEMM_1X1", "INT64", "SPLIT_K"]
_conv_tuned = triton.autotune(
    configs=[_config(t) for t in dict.fromkeys(search_tiles(torch.float16)
                                                + search_tiles(torch.float32))],
    key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_dtype},
)(triton.heuristics(_HEURISTICS)(_conv_kernel))


def needs_int64(*numels: int) -> bool:
    """Whether the kernels must index in int64: some offset they compute (bounded by these
    element counts) can pass 2^31 - 1."""
    return max(numels) > 2**31 - 1


def split_k(ctas: int, k_steps: int, sms: int) -> int:
    """How many ways to split the K loop: 1 where the output tiles already fill half the SMs,
    else enough splits to fill them, keeping >= 4 K steps per split, at most 16."""
    if ctas * 2 >= sms:
        return 1
    return max(1, min(sms // ctas, k_steps // 4, 16))


def heuristic_config(gemm_m: int, gemm_n: int, c_g: int, r: int, s: int, groups: int,
                     sms: int, dtype: torch.dtype) -> dict:
    """One config for a GEMM shape and input dtype, without a search: wide tiles where the
    problem is large, narrow where it is not (the 64-channel layers, batch-1 late layers,
    grouped convs); BLOCK_K no wider than the channels (or packed taps) it walks (tl.dot needs
    >= 16) and at most MAX_BLOCK_K_4_BYTE for float32 (shared memory); split-K where the tiles
    cannot fill the SMs. Under the interpreter, tiles of at most 64 (fast tests that still
    have partial tiles) and no split."""
    block_m = 128 if gemm_m >= 4096 else 64
    block_n = (256 if gemm_n >= 256 and gemm_m >= 16384 else 128 if gemm_n >= 128
               else 64 if gemm_n >= 64 else 32 if gemm_n >= 32 else 16)
    walked = r * s * c_g if r * s > 1 and c_g < 16 else c_g
    block_k = 64 if walked >= 64 else 32 if walked >= 32 else 16
    if dtype.itemsize >= 4:
        block_k = min(block_k, MAX_BLOCK_K_4_BYTE)
    if INTERPRET:
        return dict(BLOCK_M=min(block_m, 64), BLOCK_N=min(block_n, 64), BLOCK_K=block_k,
                    GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=1)
    ctas = triton.cdiv(gemm_m, block_m) * triton.cdiv(gemm_n, block_n) * groups
    packed = r * s > 1 and c_g < block_k  # as the kernel's PACK_RS
    k_steps = triton.cdiv(r * s * c_g, block_k) if packed else r * s * triton.cdiv(c_g, block_k)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                SPLIT_K=split_k(ctas, k_steps, sms),
                num_warps=8 if block_m * block_n >= 128 * 128 else 4,
                num_stages=3 if block_m * block_n >= 128 * 256 else 4)


def shape_key(gemm_m: int, gemm_n: int, c_g: int, groups: int, r: int, s: int,
              stride: tuple[int, int], dtype: torch.dtype) -> str:
    """The config table's key for one conv: its GEMM shape per group, the group count, the
    kernel size, the stride and the dtype."""
    return (f"M{gemm_m}-N{gemm_n}-C{c_g}-G{groups}-R{r}S{s}-stride{stride[0]}x{stride[1]}-"
            f"{str(dtype).removeprefix('torch.')}")


@functools.cache
def device_name(device: torch.device) -> str:
    """The table's device key: the GPU's name; "cpu" for the interpreter."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def config_table() -> dict:
    """The entries of the config table at TABLE_PATH, read once: {device name: {"triton
    <version>": {shape key: config}}}. A missing or corrupt table is empty, with one
    TableWarning (the table ships with the package, so a missing one is a broken install)."""
    what = "Triton conv config table"
    if not os.path.exists(TABLE_PATH):
        warnings.warn(f"ignoring {what} {TABLE_PATH}: no such file; heuristic configs",
                      TableWarning, stacklevel=2)
        return {}
    entries = read(TABLE_PATH, what).get("entries", {})
    if not isinstance(entries, dict):
        warnings.warn(f"ignoring {what} {TABLE_PATH}: 'entries' is not an object",
                      TableWarning, stacklevel=2)
        return {}
    return entries


def table_config(name: str, key: str) -> dict | None:
    """The table entry for ``key`` on the GPU called ``name`` with this Triton version, or
    None. An entry that is not a complete config of positive ints, with power-of-two tiles of
    at least 16 and warps, is ignored with a warning (one: shape_configs asks once per key)."""
    versions = config_table().get(name)
    shapes = versions.get(f"triton {triton.__version__}") if isinstance(versions, dict) else None
    entry = shapes.get(key) if isinstance(shapes, dict) else None
    if entry is None:
        return None
    if (isinstance(entry, dict) and set(entry) == set(CONFIG_KEYS)
            and all(type(v) is int and v > 0 for v in entry.values())
            and all(entry[k] >= 16 for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            and all(entry[k] & (entry[k] - 1) == 0
                    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"))):
        return entry
    warnings.warn(f"ignoring the Triton conv config table's entry {key!r} for {name}: "
                  f"expected {{{', '.join(CONFIG_KEYS)}}} as positive ints (tiles and warps "
                  f"powers of two, tiles >= 16), got {entry!r}", TableWarning, stacklevel=2)
    return None


@functools.cache
def shape_configs(name: str, gemm_m: int, k_g: int, c_g: int, groups: int, r: int, s: int,
                  stride: tuple[int, int], dtype: torch.dtype, sms: int
                  ) -> tuple[dict | None, dict]:
    """(the table's entry or None, the heuristic config) for one conv shape on the GPU called
    ``name``: worked out at a shape's first launch, a dict lookup on every later one."""
    key = shape_key(gemm_m, k_g, c_g, groups, r, s, stride, dtype)
    return (table_config(name, key), heuristic_config(gemm_m, k_g, c_g, r, s, groups, sms,
                                                      dtype))


def conv_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  stride: tuple[int, int], padding: tuple[int, int],
                  dilation: tuple[int, int], groups: int, residual: torch.Tensor | None,
                  relu: bool, *, config: dict | None = None) -> torch.Tensor:
    """Host launcher; arguments validated by resnet_fast.ops. Output in x's memory format
    (NCHW input: computed in NHWC, converted back, one extra pass each way). A weight that is
    already channels_last-dense (the models' plans store it so) is used as it is.
    ``config`` (the keys of CONFIG_KEYS) overrides the table, autotuning and heuristic."""
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
    gemm_1x1 = r == s == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
    tuned = False
    if config is None:
        entry, heuristic = shape_configs(device_name(x.device), gemm_m, k_g, c_g, groups, r, s,
                                         tuple(stride), x.dtype, sm_count(x.device))
        tuned = entry is None and AUTOTUNE
        config = entry or heuristic
    split = config["SPLIT_K"]
    ws = torch.empty((split, gemm_m, k), device=x.device, dtype=torch.float32) if split > 1 \
        else out
    # Masked lanes compute offsets past the tensors' ends: taps in the bottom/right padding
    # (less than a padded row of x), partial tiles (less than a tile); the workspace holds
    # `split` outputs.
    tile_m, tile_n, tile_k = ((MAX_BLOCK,) * 3 if tuned else
                              (config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]))
    int64 = needs_int64(xc.numel() + (padding[0] + 1) * (w_in + padding[1] + 1) * c,
                        wc.numel() + tile_k, (gemm_m + tile_m) * (k + tile_n) * split)

    def grid(meta):
        tiles = triton.cdiv(gemm_m, meta["BLOCK_M"]) * triton.cdiv(k_g, meta["BLOCK_N"])
        return (tiles, split, groups)

    launch = dict(R=r, S=s, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                  RELU=bool(relu), INPUT_PRECISION="tf32" if tf32 else "ieee",
                  GEMM_1X1=gemm_1x1, INT64=int64, SPLIT_K=split)
    if not tuned:
        launch.update((key, v) for key, v in config.items() if key != "SPLIT_K")
    (_conv_tuned if tuned else _conv)[grid](
        xc, wc, b, res, out, ws,
        h, w_in, c, k, p, q,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        c_g, k_g, gemm_m, gemm_m * k, **launch,
    )
    if split > 1:
        _split_k_reduce_kernel[(triton.cdiv(gemm_m, 64), triton.cdiv(k, 64))](
            ws, b, res, out, gemm_m, k, gemm_m * k, SPLIT_K=split, HAS_BIAS=bias is not None,
            HAS_RES=residual is not None, RELU=bool(relu), INT64=int64, BLOCK_M=64, BLOCK_N=64)
    return out if fmt == torch.channels_last else out.contiguous(memory_format=fmt)
