"""conv_bias_act and fold_bn: every distinct conv of resnet18, resnet50 and resnext50_32x4d
against the reference (F.conv2d + bias + residual + relu), odd sizes, layouts, gradients,
opcheck; the Triton kernel under the interpreter (fp32/fp16): every shape, each of its
kernel paths forced by config (1x1 GEMM, packed taps, EVEN_K or not, split-K, grouped tile
order, int64 offsets), its config table (entry used, missing/corrupt table warns once) and the
tuner's --smoke run."""

import importlib.util
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _numerics import assert_within_reference_error
from torch.nn.utils.fusion import fuse_conv_bn_eval

from resnet_fast._jsonfile import TableWarning
from resnet_fast.bench.conv_shapes import distinct_convs
from resnet_fast.ops import conv_bias_act, fold_bn, reference
from resnet_fast.ops.conv_bias_act import onednn_dtype_supported, onednn_dtypes

# Every distinct conv of resnet18, resnet50 and resnext50_32x4d on 32x32 images, as
# distinct_convs gives it (C_in, C_out, kernel, stride, padding, dilation, groups, H): written
# out so that collecting the tests builds no model; the first test checks it against the models.
CONVS = [
    (3, 64, 7, 2, 3, 1, 1, 32), (64, 64, 1, 1, 0, 1, 1, 8), (64, 64, 3, 1, 1, 1, 1, 8),
    (64, 128, 1, 1, 0, 1, 1, 8), (64, 128, 1, 2, 0, 1, 1, 8), (64, 128, 3, 2, 1, 1, 1, 8),
    (64, 256, 1, 1, 0, 1, 1, 8), (128, 128, 3, 1, 1, 1, 1, 4), (128, 128, 3, 1, 1, 1, 32, 8),
    (128, 128, 3, 2, 1, 1, 1, 8), (128, 256, 1, 1, 0, 1, 1, 8), (128, 256, 1, 2, 0, 1, 1, 4),
    (128, 256, 3, 2, 1, 1, 1, 4), (128, 512, 1, 1, 0, 1, 1, 4), (256, 64, 1, 1, 0, 1, 1, 8),
    (256, 128, 1, 1, 0, 1, 1, 8), (256, 256, 1, 1, 0, 1, 1, 8), (256, 256, 3, 1, 1, 1, 1, 2),
    (256, 256, 3, 1, 1, 1, 32, 4), (256, 256, 3, 2, 1, 1, 1, 4), (256, 256, 3, 2, 1, 1, 32, 8),
    (256, 512, 1, 1, 0, 1, 1, 4), (256, 512, 1, 2, 0, 1, 1, 2), (256, 512, 1, 2, 0, 1, 1, 8),
    (256, 512, 3, 2, 1, 1, 1, 2), (256, 1024, 1, 1, 0, 1, 1, 2), (512, 128, 1, 1, 0, 1, 1, 4),
    (512, 256, 1, 1, 0, 1, 1, 4), (512, 512, 1, 1, 0, 1, 1, 4), (512, 512, 3, 1, 1, 1, 1, 1),
    (512, 512, 3, 1, 1, 1, 32, 2), (512, 512, 3, 2, 1, 1, 1, 2), (512, 512, 3, 2, 1, 1, 32, 4),
    (512, 1024, 1, 1, 0, 1, 1, 2), (512, 1024, 1, 2, 0, 1, 1, 4), (512, 2048, 1, 1, 0, 1, 1, 1),
    (1024, 256, 1, 1, 0, 1, 1, 2), (1024, 512, 1, 1, 0, 1, 1, 2), (1024, 1024, 1, 1, 0, 1, 1, 2),
    (1024, 1024, 3, 1, 1, 1, 32, 1), (1024, 1024, 3, 2, 1, 1, 32, 2),
    (1024, 2048, 1, 1, 0, 1, 1, 1), (1024, 2048, 1, 2, 0, 1, 1, 2), (2048, 512, 1, 1, 0, 1, 1, 1),
    (2048, 1024, 1, 1, 0, 1, 1, 1),
]


@pytest.mark.slow
def test_the_shape_list_is_the_familys():
    assert CONVS == sorted({c for arch in ("resnet18", "resnet50", "resnext50_32x4d")
                            for c in distinct_convs(arch)})
    assert (3, 64, 7, 2, 3, 1, 1, 32) in CONVS  # the stem
    assert any(c[6] == 32 for c in CONVS)  # ResNeXt's grouped 3x3


# The sweeps over CONVS run its first five shapes (the 7x7 stem, 1x1s, a 3x3, a strided 1x1) in
# the fast tier and the rest in `make test` only; grouped and odd shapes have fast tests of
# their own (test_cpu_odd_sizes, test_triton_odd_shapes_layouts_and_fp16).
FAST_SWEEP = 5
CPU_SWEEP = [c if i < FAST_SWEEP else pytest.param(c, marks=pytest.mark.slow)
             for i, c in enumerate(CONVS)]
TRITON_SWEEP = [(i, c) if i < FAST_SWEEP else pytest.param(i, c, marks=pytest.mark.slow)
                for i, c in enumerate(CONVS)]


def _case(conv, dtype=torch.float32, batch=2, channels_last=True, residual=True, seed=0, hw=None):
    c_in, c_out, k, stride, pad, dil, groups, h = conv
    h = hw or h
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, h, h, generator=g, dtype=torch.float64)
    w = torch.randn(c_out, c_in // groups, k, k, generator=g, dtype=torch.float64) / (c_in // groups * k * k) ** 0.5
    b = torch.randn(c_out, generator=g, dtype=torch.float64)
    p = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
    r = torch.randn(batch, c_out, p, p, generator=g, dtype=torch.float64) if residual else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def cast(t):
        if t is None:
            return None
        return t.to(dtype).contiguous(memory_format=fmt) if t.dim() == 4 else t.to(dtype)

    return cast(x), cast(w), cast(b), (stride, pad, dil, groups), cast(r)


def _check(backend, x, w, b, geo, r, relu=True):
    out = conv_bias_act(x, w, b, *geo, r, relu, backend=backend)
    return _judge(out, x, w, b, geo, r, relu)


def _judge(out, x, w, b, geo, r, relu):
    """Asserts that ``out`` is conv_bias_act(x, ...) in x's dtype and memory format, within the
    reduced-precision rule (docs/design.md, Tolerances) against a float64 truth."""
    stride, pad, dil, groups = geo
    ref = reference.conv_bias_act(x, w, b, stride, pad, dil, groups, r, relu)

    def d(t):
        return None if t is None else t.double()

    truth = reference.conv_bias_act(d(x), d(w), d(b), stride, pad, dil, groups, d(r), relu)
    magnitude = F.conv2d(x.double().abs(), w.double().abs(), None, stride, pad, dil, groups)
    magnitude = magnitude + (0 if b is None else b.double().abs().view(1, -1, 1, 1))
    if r is not None:
        magnitude = magnitude + r.double().abs()
    assert out.shape == ref.shape and out.dtype == x.dtype
    expect_cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)
    assert_within_reference_error(out, ref, truth, magnitude.max().item())
    return out


@pytest.mark.parametrize("conv", CPU_SWEEP, ids=str)
def test_cpu_every_resnet_conv(conv):
    for channels_last, residual, relu in ((True, True, True), (True, False, True),
                                          (False, True, True), (True, False, False)):
        x, w, b, geo, r = _case(conv, channels_last=channels_last, residual=residual)
        _check("cpu", x, w, b, geo, r, relu)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_cpu_other_dtypes(dtype):
    # ATen's convolution + our epilogue, except bfloat16 where oneDNN runs it (onednn_dtypes).
    x, w, b, geo, r = _case((16, 32, 3, 1, 1, 1, 1, 9), dtype)
    _check("cpu", x, w, b, geo, r)


@pytest.mark.parametrize("batch, hw", [(1, 7), (3, 13), (1, 33)])
@pytest.mark.parametrize("conv", [(3, 64, 7, 2, 3, 1, 1, 0), (64, 64, 3, 1, 1, 1, 1, 0),
                                  (64, 128, 3, 2, 1, 1, 1, 0), (64, 256, 1, 2, 0, 1, 1, 0),
                                  (128, 128, 3, 1, 2, 2, 32, 0)], ids=str)
def test_cpu_odd_sizes(conv, batch, hw):
    x, w, b, geo, r = _case(conv, batch=batch, hw=hw)
    _check("cpu", x, w, b, geo, r)
    x, w, b, geo, r = _case(conv, batch=batch, hw=hw, channels_last=False, residual=False)
    _check("cpu", x, w, None, geo, None)


def test_the_op_is_a_pure_function_of_its_inputs():
    # docs/design.md: no op keeps state keyed on a tensor's address or version; a prepared
    # weight is an explicit input. So an in-place edit of the weight (the version is bumped,
    # the address kept) and a new weight at a possibly recycled address both give the new
    # result, and a packed weight is a copy made when it was packed.
    x, w, b, geo, r = _case((16, 32, 3, 1, 1, 1, 1, 8))
    first = conv_bias_act(x, w, b, *geo, r, backend="cpu")
    packed = torch.ops.resnet_fast.prepack_conv_weight(w, *geo, list(x.shape))
    with torch.no_grad():
        w.mul_(2)
    second = conv_bias_act(x, w, b, *geo, r, backend="cpu")
    torch.testing.assert_close(second, reference.conv_bias_act(x, w, b, *geo, r, True))
    assert not torch.allclose(first, second)
    torch.testing.assert_close(
        torch.ops.resnet_fast.conv_bias_act_packed(x, packed, b, *geo, r, True), first)
    w2 = w.clone()
    del w
    torch.testing.assert_close(conv_bias_act(x, w2, b, *geo, r, backend="cpu"),
                               reference.conv_bias_act(x, w2, b, *geo, r, True))


def test_gradients_match_autograd_of_the_reference():
    x, w, b, geo, r = _case((8, 16, 3, 2, 1, 1, 2, 9), torch.float64, channels_last=True)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    ours = conv_bias_act(*leaves[:3], *geo, leaves[3], True, backend="cpu")
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    ref = reference.conv_bias_act(*ref_leaves[:3], *geo, ref_leaves[3], True)
    g = torch.randn_like(ref)
    ours.backward(g)
    ref.backward(g)
    for a, e in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, e.grad)


@pytest.mark.slow
def test_gradcheck_float64():
    x, w, b, geo, r = _case((4, 6, 3, 1, 1, 1, 2, 5), torch.float64, batch=1)
    args = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), *[list((v, v)) for v in geo[:3]],
            geo[3], r.requires_grad_(), True]
    assert torch.autograd.gradcheck(lambda *a: torch.ops.resnet_fast.conv_bias_act(*a), args)


@pytest.mark.parametrize("residual, relu", [(True, True), (False, False)])
def test_opcheck(residual, relu):
    x, w, b, geo, r = _case((8, 16, 3, 2, 1, 1, 2, 7), residual=residual)
    pairs = [list((v, v)) for v in geo[:3]]
    torch.library.opcheck(torch.ops.resnet_fast.conv_bias_act, (x, w, b, *pairs, geo[3], r, relu))
    grads = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    torch.library.opcheck(torch.ops.resnet_fast.conv_bias_act,
                          (grads[0], grads[1], grads[2], *pairs, geo[3], grads[3], relu))


def test_bad_arguments():
    x, w, b, geo, r = _case((8, 16, 3, 1, 1, 1, 1, 6))
    cases = [
        (dict(w=w[:, :4]), ValueError, r"x has 8 channels but weight expects 4"),
        (dict(b=b[:3]), ValueError, r"expected bias of shape \(16,\), got \(3,\)"),
        (dict(r=r[:, :, :3]), ValueError, r"expected residual of the output's shape \(2, 16, 6, 6\), got \(2, 16, 3, 6\)"),
        (dict(w=w.double()), TypeError, r"expected weight in x's dtype \(torch.float32\), got torch.float64"),
        (dict(groups=3), ValueError, r"groups >= 1 dividing the 16 output channels, got groups=3"),
        (dict(stride=0), ValueError, r"expected stride >= 1"),
        (dict(x=x[:, :, :1, :1], pad=0), ValueError, r"the height of the output would be -1"),
        (dict(x=x[0]), ValueError, r"expected x of shape \(N, C, H, W\), got \(8, 6, 6\)"),
    ]
    for change, exc, msg in cases:
        args = dict(x=x, w=w, b=b, stride=1, pad=1, dil=1, groups=1, r=r) | change
        with pytest.raises(exc, match=msg):
            conv_bias_act(args["x"], args["w"], args["b"], args["stride"], args["pad"], args["dil"],
                          args["groups"], args["r"], True, backend="cpu")
    with pytest.raises(ValueError, match=r"x has 8 channels but weight expects 4"):
        torch.ops.resnet_fast.conv_bias_act(x, w[:, :4], b, [1, 1], [1, 1], [1, 1], 1, None, True)


def test_autocast_runs_in_the_autocast_dtype():
    x, w, b, geo, r = _case((8, 16, 3, 1, 1, 1, 1, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_bias_act(x, w, b, *geo, r, backend="cpu")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.conv_bias_act(x, w, b, *geo, r), rtol=3e-2, atol=3e-2)


# fold_bn -------------------------------------------------------------------------------


def _bn(c, affine=True, eps=1e-5, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(c, affine=affine, eps=eps).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.3)
        if affine:
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn


@pytest.mark.parametrize("conv_bias, affine, eps, groups", [
    (False, True, 1e-5, 1), (True, True, 1e-3, 1), (False, False, 1e-5, 1), (True, False, 1e-3, 4)])
def test_fold_bn(conv_bias, affine, eps, groups):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 12, 3, padding=1, bias=conv_bias, groups=groups).eval()
    bn = _bn(12, affine, eps)
    w, b = fold_bn(conv, bn)
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        expected = bn(conv(x))
        torch.testing.assert_close(F.conv2d(x, w, b, 1, 1, 1, groups), expected, rtol=1e-5, atol=1e-5)
        fused = fuse_conv_bn_eval(conv, bn)
        torch.testing.assert_close(w, fused.weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b, fused.bias, rtol=1e-6, atol=1e-6)
        out = conv_bias_act(x, w, b, 1, 1, 1, groups, None, True, backend="cpu")
        torch.testing.assert_close(out, torch.relu(expected), rtol=1e-5, atol=1e-5)


def test_fold_bn_in_half_folds_in_float32():
    conv = torch.nn.Conv2d(4, 4, 1, bias=False)
    bn = _bn(4)
    w32, b32 = fold_bn(conv, bn)
    w16, b16 = fold_bn(conv.half(), bn.half())
    assert w16.dtype == torch.float16 and b16.dtype == torch.float16
    torch.testing.assert_close(w16.float(), w32, rtol=1e-3, atol=1e-3)


def test_fold_bn_is_differentiable_for_frozen_bn_finetuning():
    conv, bn = torch.nn.Conv2d(4, 6, 3), _bn(6)
    w, b = fold_bn(conv, bn)
    (w.sum() + b.sum()).backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None and bn.bias.grad is not None


def test_fold_bn_refusals():
    conv = torch.nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match=r"no running statistics \(track_running_stats=False\)"):
        fold_bn(conv, torch.nn.BatchNorm2d(6, track_running_stats=False))
    with pytest.raises(ValueError, match=r"BatchNorm has 5 features but the conv has 6 output channels"):
        fold_bn(conv, torch.nn.BatchNorm2d(5))
    with pytest.raises(TypeError, match=r"expected an nn.Conv2d, got Linear"):
        fold_bn(torch.nn.Linear(2, 2), torch.nn.BatchNorm2d(6))


# Triton under the interpreter ---------------------------------------------------------

triton_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton on CPU needs its interpreter (the gpu tier runs it on CUDA)")
# (channels_last, residual, relu, bias): cycled over the shape list, so every shape runs once
# and each layout and epilogue combination runs on many shapes.
EPILOGUES = [(True, True, True, True), (False, False, True, True), (True, False, False, True),
             (False, True, True, False), (True, False, True, False)]


@triton_only
@pytest.mark.parametrize("index, conv", TRITON_SWEEP, ids=str)
def test_triton_every_resnet_conv(index, conv):
    channels_last, residual, relu, bias = EPILOGUES[index % len(EPILOGUES)]
    x, w, b, geo, r = _case(conv, batch=1, channels_last=channels_last, residual=residual)
    _check("triton", x, w, b if bias else None, geo, r, relu)


@triton_only
@pytest.mark.parametrize("conv", [(3, 64, 7, 2, 3, 1, 1, 13), (32, 64, 3, 1, 2, 2, 8, 7),
                                  (24, 40, 1, 2, 0, 1, 1, 9)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_odd_shapes_layouts_and_fp16(conv, dtype):
    for channels_last, residual, relu in ((True, True, True), (False, False, False)):
        x, w, b, geo, r = _case(conv, dtype, batch=3, channels_last=channels_last, residual=residual)
        _check("triton", x, w, b, geo, r, relu)


@triton_only
def test_triton_opcheck():
    x, w, b, geo, r = _case((8, 16, 3, 2, 1, 1, 2, 5), batch=1)
    pairs = [list((v, v)) for v in geo[:3]]
    torch.library.opcheck(torch.ops.resnet_fast.conv_bias_act_triton, (x, w, b, *pairs, geo[3], r, True))


def _tconv():
    from resnet_fast.kernels.triton import conv
    return conv


def _config(m, n, k, group_m=8, split=1):
    return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=group_m, SPLIT_K=split, num_warps=4,
                num_stages=2)


class _Spy:
    """Stands in for a Triton kernel object and records each launch's arguments."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def spy(monkeypatch):
    tconv = _tconv()
    spy = _Spy(tconv._conv)
    monkeypatch.setattr(tconv, "_conv", spy)
    return spy


# (conv, config, GEMM_1X1, PACK_RS, EVEN_K, why). The K loop's variants, the 1x1 GEMM path,
# split-K (bias, residual and ReLU must be applied once, after the splits are summed; 5 splits
# of 2 K steps leaves some empty) and the grouped tile order with partial groups and tiles.
PATHS = [
    ((32, 48, 1, 1, 0, 1, 1, 9), _config(32, 32, 16), True, False, True, "1x1 GEMM, EVEN_K"),
    ((40, 48, 1, 1, 0, 1, 1, 9), _config(32, 32, 16), True, False, False, "1x1 GEMM, C tail"),
    ((32, 48, 1, 2, 0, 1, 1, 9), _config(32, 32, 16), False, False, True, "strided 1x1"),
    ((32, 40, 3, 1, 1, 1, 1, 7), _config(32, 16, 32), False, False, True, "3x3, EVEN_K"),
    ((24, 40, 3, 2, 1, 1, 1, 9), _config(32, 16, 16), False, False, False, "3x3, C tail"),
    ((3, 32, 7, 2, 3, 1, 1, 11), _config(32, 32, 32), False, True, False, "stem, packed taps"),
    ((16, 32, 3, 1, 2, 2, 8, 7), _config(16, 16, 16), False, True, False, "dilated, 2-ch groups"),
    ((24, 40, 3, 2, 1, 1, 1, 9), _config(32, 16, 16, split=3), False, False, False, "split-K 3"),
    ((32, 32, 2, 1, 0, 1, 8, 7), _config(16, 16, 16), False, True, True, "2x2, packed, EVEN_K"),
    ((32, 48, 1, 1, 0, 1, 1, 5), _config(16, 16, 16, split=5), True, False, True, "split-K, empty"),
    ((3, 32, 7, 2, 3, 1, 1, 11), _config(16, 16, 32, split=2), False, True, False, "split, packed"),
    ((16, 40, 3, 1, 1, 1, 1, 9), _config(32, 16, 16, group_m=4), False, False, True, "GROUP_M 4/6"),
    ((16, 40, 1, 1, 0, 1, 1, 9), _config(16, 16, 16, group_m=3), True, False, True, "GROUP_M 3/11"),
]


def _check_paths(cases, device, dtype, spy):
    tconv = _tconv()
    for i, (conv, config, gemm_1x1, pack, even, why) in enumerate(cases):
        channels_last, residual, relu, bias = EPILOGUES[i % len(EPILOGUES)]
        x, w, b, geo, r = _case(conv, dtype, batch=2, channels_last=channels_last,
                                residual=residual)
        x, w, b, r = (None if t is None else t.to(device) for t in (x, w, b, r))
        b = b if bias else None
        stride, pad, dil, groups = geo
        out = tconv.conv_bias_act(x, w, b, (stride,) * 2, (pad,) * 2, (dil,) * 2, groups, r,
                                  relu, config=config)
        _judge(out, x, w, b, geo, r, relu)
        kwargs = spy.launches[-1][1]
        shape = dict(R=conv[2], S=conv[2], C_G=conv[0] // groups, BLOCK_K=config["BLOCK_K"])
        assert (kwargs["GEMM_1X1"], tconv._pack_rs(shape), tconv._even_k(shape)) == (
            gemm_1x1, pack, even), why
        assert kwargs["SPLIT_K"] == config["SPLIT_K"] and kwargs["INT64"] is False, why


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.slow
def test_triton_kernel_paths(dtype, spy):
    _check_paths(PATHS, "cpu", dtype, spy)


@triton_only
def test_triton_int64_indexing_path(spy, monkeypatch):
    # The selection is a pure function of the sizes (no 2^31-element tensor here); the int64
    # kernel itself is run by forcing the selection.
    tconv = _tconv()
    assert not tconv.needs_int64(2**31 - 1, 10)
    assert tconv.needs_int64(10, 2**31)
    monkeypatch.setattr(tconv, "needs_int64", lambda *numels: True)
    for conv, config in [((24, 40, 3, 2, 1, 1, 1, 9), _config(32, 16, 16, split=2)),
                         ((3, 32, 7, 2, 3, 1, 1, 11), _config(32, 32, 32)),
                         ((32, 48, 1, 1, 0, 1, 1, 5), _config(16, 16, 16))]:
        x, w, b, geo, r = _case(conv)
        stride, pad, dil, groups = geo
        out = tconv.conv_bias_act(x, w, b, (stride,) * 2, (pad,) * 2, (dil,) * 2, groups, r,
                                  True, config=config)
        _judge(out, x, w, b, geo, r, True)
        assert spy.launches[-1][1]["INT64"] is True


@triton_only
def test_triton_autotuned_launch(monkeypatch):
    # The search itself times configs on a GPU; here one config runs through the same
    # autotune + heuristics wrapper. The key is every argument but the pointers, the tiles the
    # search picks, the heuristics' outputs and SPLIT_STRIDE (GEMM_M * K): a config tuned
    # without a residual, in another precision or padding is not reused (the autotuner skips
    # unknown names silently, so each must be an argument).
    tconv = _tconv()
    names = tconv._conv_tuned.arg_names
    searched = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_STRIDE", *tconv._HEURISTICS}
    assert set(tconv._conv_tuned.keys) == {n for n in names if not n.endswith("_ptr")} - searched
    monkeypatch.setattr(tconv, "AUTOTUNE", True)
    monkeypatch.setattr(tconv._conv_tuned, "configs", tconv._conv_tuned.configs[-1:])
    x, w, b, geo, r = _case((24, 40, 3, 2, 1, 1, 1, 9))
    _check("triton", x, w, b, geo, r)


def test_split_k_heuristic():
    tconv = _tconv()
    assert tconv.split_k(ctas=132, k_steps=72, sms=132) == 1
    assert tconv.split_k(ctas=4, k_steps=72, sms=132) == 16  # batch 1, a late 3x3
    assert tconv.split_k(ctas=4, k_steps=8, sms=132) == 2  # >= 4 K steps per split
    assert tconv.split_k(ctas=40, k_steps=4, sms=132) == 1


@triton_only
def test_triton_channels_last_weight_is_not_copied(spy):
    from resnet_fast.kernels.layout import dense_in
    tconv = _tconv()
    x, w, b, (stride, pad, dil, groups), r = _case((16, 32, 3, 1, 1, 1, 1, 5))
    geo = ((stride,) * 2, (pad,) * 2, (dil,) * 2, groups)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    assert dense_in(w_cl, torch.channels_last) is w_cl
    tconv.conv_bias_act(x, w_cl, b, *geo, r, True)
    assert spy.launches[-1][0][1].data_ptr() == w_cl.data_ptr()
    assert spy.launches[-1][0][0].data_ptr() == x.data_ptr()  # channels_last x: not copied
    w_nchw = w.contiguous()
    tconv.conv_bias_act(x, w_nchw, b, *geo, r, True)  # an NCHW 3x3 weight is laid out anew
    assert spy.launches[-1][0][1].data_ptr() != w_nchw.data_ptr()


@pytest.fixture
def table(monkeypatch, tmp_path):
    """Points the launcher at a table in tmp_path (written by the test) and re-reads it."""
    tconv = _tconv()
    path = tmp_path / "conv_configs.json"
    monkeypatch.setattr(tconv, "TABLE_PATH", path)
    tconv.config_table.cache_clear()
    tconv.shape_configs.cache_clear()
    yield path
    tconv.config_table.cache_clear()
    tconv.shape_configs.cache_clear()


TABLE_CONV = (16, 32, 3, 1, 1, 1, 1, 5)


def _run_table_conv(spy, times=2):
    tconv = _tconv()
    x, w, b, (stride, pad, dil, groups), r = _case(TABLE_CONV)
    for _ in range(times):
        out = tconv.conv_bias_act(x, w, b, (stride,) * 2, (pad,) * 2, (dil,) * 2, groups, r, True)
        _judge(out, x, w, b, (stride, pad, dil, groups), r, True)
    kwargs = spy.launches[-1][1]
    return {k: kwargs.get(k) for k in tconv.CONFIG_KEYS}


def _heuristic():
    tconv = _tconv()
    c_in, c_out, k, *_ = TABLE_CONV
    return dict(tconv.heuristic_config(2 * 5 * 5, c_out, c_in, k, k, 1, 1, torch.float32),
                SPLIT_K=1)


@triton_only
def test_triton_table_entry_is_used(table, spy, monkeypatch):
    import triton
    tconv = _tconv()
    monkeypatch.setattr(tconv, "device_name", lambda device: "Fake GPU")
    key = tconv.shape_key(2 * 5 * 5, 32, 16, 1, 3, 3, (1, 1), torch.float32)
    entry = _config(16, 16, 16, group_m=2, split=2)
    version = f"triton {triton.__version__}"
    table.write_text(json.dumps({"entries": {"Fake GPU": {version: {key: entry}}}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _run_table_conv(spy) == entry
        monkeypatch.setattr(tconv, "device_name", lambda device: "Other GPU")  # no entry: silent
        assert _run_table_conv(spy, times=1) == _heuristic()


@triton_only
@pytest.mark.parametrize("content", [None, "{not json", '{"entries": []}', {"BLOCK_M": 64},
                                     _config(48, 16, 16), _config(16, 16, 8)], ids=str)
def test_triton_bad_table_warns_once_and_uses_the_heuristic(table, spy, content):
    """No file, a corrupt file, or an entry that is not a usable config: one TableWarning, and
    the heuristic config."""
    import triton
    tconv = _tconv()
    if isinstance(content, dict):
        key = tconv.shape_key(2 * 5 * 5, 32, 16, 1, 3, 3, (1, 1), torch.float32)
        content = json.dumps({"entries": {"cpu": {f"triton {triton.__version__}": {key: content}}}})
    if content is not None:
        table.write_text(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _run_table_conv(spy) == _heuristic()
    assert [type(w.message) for w in caught] == [TableWarning], [str(w.message) for w in caught]


@triton_only
def test_tune_triton_conv_smoke(table, spy, tmp_path):
    """benchmarks/tune_triton_conv.py --smoke (one tiny shape, one config, the interpreter)
    writes a table entry the launcher then uses, and the per-layer ratio JSON."""
    spec = importlib.util.spec_from_file_location(
        "tune_triton_conv", Path(__file__).parents[1] / "benchmarks" / "tune_triton_conv.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    ratios = tmp_path / "ratios.json"
    assert tune.main(["--smoke", "--table", str(table), "--out", str(ratios)]) == 0
    (row,) = json.loads(ratios.read_text())["layers"].values()
    assert row["best_over_baseline"] > 0 and row["configs_timed"] == 1
    (entry,) = json.loads(table.read_text())["entries"]["cpu"].values()
    (config,) = entry.values()
    conv, dtype, batch = tune.SMOKE
    x, w, b, (stride, pad, dil, groups), _ = _case(conv, dtype, batch=batch)
    _tconv().conv_bias_act(x, w, b, (stride,) * 2, (pad,) * 2, (dil,) * 2, groups, None, True)
    assert {k: spy.launches[-1][1][k] for k in config if k != "SPLIT_K"} == {
        k: v for k, v in config.items() if k != "SPLIT_K"}
    # The GPU run's candidates (not run here): whole configs, with split-K variants where a
    # batch-1 late layer has few tiles for 132 SMs.
    candidates = tune._candidates((512, 512, 3, 1, 1, 1, 1, 7), 49, sms=132,
                                  dtype=torch.bfloat16)
    assert all(set(c) == set(_tconv().CONFIG_KEYS) for c in candidates)
    assert max(c["SPLIT_K"] for c in candidates) > 1


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_every_resnet50_conv_full_size(backend, dtype):
    for conv in distinct_convs("resnet50", size=224):
        x, w, b, geo, r = _case(conv, dtype, batch=8)
        _check(backend, x.cuda(), w.cuda(), b.cuda(), geo, r.cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_triton_batch_1_heuristic_splits_k(dtype, spy):
    """Batch 1 at 224px: the late layers' few tiles take split-K from the heuristic."""
    for conv in distinct_convs("resnet50", size=224):
        x, w, b, geo, r = _case(conv, dtype, batch=1)
        _check("triton", x.cuda(), w.cuda(), b.cuda(), geo, r.cuda())
    assert max(kwargs["SPLIT_K"] for _, kwargs in spy.launches) > 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_triton_kernel_paths(dtype, spy):
    _check_paths(PATHS, "cuda", dtype, spy)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_triton_every_search_config(dtype, monkeypatch):
    """Each config of the autotune list for the dtype launches (float32 with TF32 on, as a user
    runs it: its tiles must fit in shared memory) and computes the same conv (the search only
    times them), on an odd-sized conv with partial tiles, a grouped one and a 1x1 GEMM. The
    rule's same-dtype reference runs with TF32 on too."""
    tconv = _tconv()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    for m, n, k, warps, stages in tconv.search_tiles(dtype):
        config = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, SPLIT_K=1, num_warps=warps,
                      num_stages=stages)
        for conv in [(64, 96, 3, 2, 1, 1, 1, 17), (128, 128, 3, 1, 1, 1, 32, 14),
                     (256, 64, 1, 1, 0, 1, 1, 15)]:
            x, w, b, (stride, pad, dil, groups), r = _case(conv, dtype, batch=3)
            x, w, b, r = x.cuda(), w.cuda(), b.cuda(), r.cuda()
            out = tconv.conv_bias_act(x, w, b, (stride,) * 2, (pad,) * 2, (dil,) * 2, groups,
                                      r, True, config=config)
            _judge(out, x, w, b, (stride, pad, dil, groups), r, True)


@pytest.mark.gpu
def test_gpu_triton_autotuned_path(monkeypatch):
    monkeypatch.setattr(_tconv(), "AUTOTUNE", True)
    for conv in [(256, 64, 1, 1, 0, 1, 1, 28), (64, 64, 3, 1, 1, 1, 1, 28),
                 (3, 64, 7, 2, 3, 1, 1, 56)]:
        x, w, b, geo, r = _case(conv, torch.bfloat16, batch=4)
        _check("triton", x.cuda(), w.cuda(), b.cuda(), geo, r.cuda())


def _packed_case(residual=True, relu=True):
    x, w, b, (stride, pad, dil, groups), r = _case((8, 16, 3, 2, 1, 1, 2, 7), residual=residual)
    geo = ([stride] * 2, [pad] * 2, [dil] * 2, groups)
    packed = torch.ops.resnet_fast.prepack_conv_weight(w, *geo, list(x.shape))
    return x, w, b, geo, r, packed


@pytest.mark.parametrize("residual, relu", [(True, True), (False, False)])
def test_packed_weight_gives_the_dense_result(residual, relu):
    x, w, b, geo, r, packed = _packed_case(residual, relu)
    assert packed.is_mkldnn and packed.shape == w.shape
    ours = torch.ops.resnet_fast.conv_bias_act_packed(x, packed, b, *geo, r, relu)
    # Bit for bit: the dense op reorders the weight the same way for the same input size.
    assert torch.equal(ours, torch.ops.resnet_fast.conv_bias_act(x, w, b, *geo, r, relu))
    truth = reference.conv_bias_act(x.double(), w.double(), b.double(), *geo,
                                    None if r is None else r.double(), relu)
    magnitude = F.conv2d(x.double().abs(), w.double().abs(), None, *geo).abs().max().item()
    assert_within_reference_error(ours, reference.conv_bias_act(x, w, b, *geo, r, relu), truth,
                                  magnitude + b.abs().max().item() + (0 if r is None else r.abs().max().item()))
    # A packed weight made for another input size is still right (oneDNN reorders it).
    other = torch.ops.resnet_fast.prepack_conv_weight(w, *geo, [1, *x.shape[1:]])
    torch.testing.assert_close(torch.ops.resnet_fast.conv_bias_act_packed(x, other, b, *geo, r, relu), ours)


ONEDNN_BF16 = (torch.backends.mkldnn.is_available()
               and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN runs no bf16 on this CPU (needs AVX-512 "
                                            "or AVX-NE-CONVERT)")
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("conv, batch", [((8, 16, 3, 2, 1, 1, 2, 7), 2),
                                         ((3, 24, 7, 2, 3, 1, 1, 13), 2),
                                         ((40, 24, 1, 1, 0, 1, 1, 5), 2),
                                         ((64, 256, 1, 1, 0, 1, 1, 32), 4)], ids=str)
def test_onednn_bf16_with_a_packed_weight(conv, batch, channels_last):
    """Where oneDNN runs bf16, bf16 takes the float32 path's route: a packed weight, the same
    result as the dense op, within bf16's reference error of the fp64 truth. The last case's
    2 MiB output is a pooled buffer (the fill + sum post-op path), the others are written by
    oneDNN directly."""
    assert torch.bfloat16 in onednn_dtypes()
    x, w, b, (stride, pad, dil, groups), r = _case(conv, torch.bfloat16, batch=batch,
                                                  channels_last=channels_last)
    geo = ([stride] * 2, [pad] * 2, [dil] * 2, groups)
    packed = torch.ops.resnet_fast.prepack_conv_weight(w, *geo, list(x.shape))
    assert packed.is_mkldnn and packed.dtype == torch.bfloat16
    for residual, relu in ((r, True), (None, False)):
        ours = torch.ops.resnet_fast.conv_bias_act_packed(x, packed, b, *geo, residual, relu)
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours, torch.ops.resnet_fast.conv_bias_act(x, w, b, *geo, residual,
                                                                   relu))
        _judge(ours, x, w, b, (stride, pad, dil, groups), residual, relu)


def test_onednn_dtypes_follow_torchs_bf16_test():
    assert onednn_dtypes() == ((torch.float32, torch.bfloat16) if ONEDNN_BF16
                               else (torch.float32,))


def test_onednn_dtype_supported_is_the_cpp_answer():
    """One answer to "does oneDNN run this dtype here": the C++ op, which Python asks (for
    onednn_dtypes and optimize's warning); it agrees with torch's own CPUID tests."""
    onednn = torch.backends.mkldnn.is_available()
    expected = {torch.float32: onednn, torch.bfloat16: ONEDNN_BF16,
                torch.float16: onednn and torch.ops.mkldnn._is_mkldnn_fp16_supported(),
                torch.float64: False, torch.int8: False}
    for dtype, supported in expected.items():
        assert torch.ops.resnet_fast.onednn_dtype_supported(dtype) is supported, dtype
        assert onednn_dtype_supported(dtype) is supported, dtype


def test_packed_fake_kernel():
    # opcheck cannot run this op: every one of its tests reads storages, which an mkldnn
    # (opaque) tensor has none of. The fake kernel is checked directly instead: fake tensors
    # carry the packed weight's layout, and the output is what the real op returns.
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, w, b, geo, r, packed = _packed_case()
    real = torch.ops.resnet_fast.conv_bias_act_packed(x, packed, b, *geo, r, True)
    mode = FakeTensorMode()
    fx, fp, fb, fr = (mode.from_tensor(t) for t in (x, packed, b, r))
    with mode:
        fake = torch.ops.resnet_fast.conv_bias_act_packed(fx, fp, fb, *geo, fr, True)
    assert fake.shape == real.shape and fake.dtype == real.dtype
    assert fake.stride() == real.stride()


def test_packed_bad_arguments():
    x, w, b, geo, r, packed = _packed_case()
    with pytest.raises(ValueError, match=r"expected a 4-D strided CPU weight .* in float32.*, "
                                          r"got torch.float64"):
        torch.ops.resnet_fast.prepack_conv_weight(w.double(), *geo, list(x.shape))
    if not ONEDNN_BF16:
        with pytest.raises(ValueError, match=r"oneDNN runs no bfloat16 on this CPU: it needs "
                                              r"AVX-512 .*is False here\), got torch.bfloat16"):
            torch.ops.resnet_fast.prepack_conv_weight(w.bfloat16(), *geo, list(x.shape))
    with pytest.raises(ValueError, match=r"expected input_size \(N, C, H, W\) with C = 8, got \(2, 4, 7, 7\)"):
        torch.ops.resnet_fast.prepack_conv_weight(w, *geo, [2, 4, 7, 7])
    with pytest.raises(ValueError, match=r"expected a weight from prepack_conv_weight"):
        torch.ops.resnet_fast.conv_bias_act_packed(x, w, b, *geo, r, True)
    with pytest.raises(ValueError, match=r"x has 4 channels but weight expects 8"):
        torch.ops.resnet_fast.conv_bias_act_packed(x[:, :4], packed, b, *geo, None, True)
