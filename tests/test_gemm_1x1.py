"""Our own 1x1 convolution on CPU (``conv1x1_prepack``, ``conv_bias_act_1x1``) against an fp64
convolution, on channel counts that are not multiples of the vector width (and C multiples of
1024, whose rows are copied first), strides 1 and 2, with and without residual and ReLU,
channels_last and NCHW, in float32 and (AVX512-BF16) bfloat16; NaN and inf where torch puts
them; the in-place variants
(``conv_bias_act_1x1_``, ``conv_bias_act_winograd_``) that write over the residual; and the
models' programs, which write over a residual only where they own it."""

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _numerics import assert_within_reference_error

import resnet_fast
from resnet_fast.calibrate import calibrate_
from resnet_fast.models.program import Kept
from resnet_fast.ops.conv_bias_act import gemm_bf16_supported, winograd_k_block

pytestmark = pytest.mark.skipif(not winograd_k_block(),
                                reason="our CPU kernels need AVX2+FMA or AVX-512")
op = torch.ops.resnet_fast

SHAPES = [  # N, C, K, H, W, stride
    (1, 3, 5, 7, 9, 1),
    (3, 17, 33, 10, 11, 1),
    (1, 16, 16, 1, 1, 1),
    (2, 20, 40, 5, 4, 2),
    (1, 64, 70, 14, 13, 2),
    (2, 1024, 36, 3, 5, 1),  # rows 4 KiB apart: copied before the products
]


def _case(n, c, k, h, w, stride, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, 1, 1, generator=g) / c ** 0.5
    bias = torch.randn(k, generator=g)
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    r = torch.randn(n, k, oh, ow, generator=g) if residual else None
    return x, weight, bias, r


def _direct(x, weight, bias, stride, r, relu):
    y = F.conv2d(x, weight, bias, stride=stride)
    if r is not None:
        y = y + r
    return y.relu() if relu else y


def _check(out, x, weight, bias, stride, r, relu):
    truth = _direct(x.double(), weight.double(), bias.double(), stride,
                    None if r is None else r.double(), relu)
    assert_within_reference_error(out, _direct(x, weight, bias, stride, r, relu), truth)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual,relu,channels_last",
                         list(itertools.product([False, True], [False, True], [False, True])))
def test_matches_fp64(shape, residual, relu, channels_last):
    n, c, k, h, w, stride = shape
    x, weight, bias, r = _case(n, c, k, h, w, stride, residual)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    r = None if r is None else r.contiguous(memory_format=fmt)
    out = op.conv_bias_act_1x1(x, weight, op.conv1x1_prepack(weight), bias, [stride, stride],
                               r, relu)
    assert out.shape == (n, k, (h - 1) // stride + 1, (w - 1) // stride + 1)
    assert out.is_contiguous(memory_format=fmt)
    _check(out, x, weight, bias, stride, r, relu)


needs_bf16 = pytest.mark.skipif(not gemm_bf16_supported(),
                                reason="the bfloat16 GEMM needs AVX-512 and AVX512-BF16")
BF16_SHAPES = [  # odd C (its last pair padded in a copy), C = 2048 (copied), stride 2; C = 512
    (1, 3, 5, 7, 9, 1),  # (the longest sum of one run) and 514 (a second run of one pair)
    (3, 17, 33, 10, 11, 1),
    (2, 20, 40, 5, 4, 2),
    (1, 64, 70, 14, 13, 1),
    (1, 512, 40, 5, 6, 1),
    (1, 514, 33, 4, 5, 1),
    (2, 2048, 36, 3, 5, 1),
]


@needs_bf16
@pytest.mark.parametrize("shape", BF16_SHAPES)
@pytest.mark.parametrize("residual,relu,channels_last",
                         list(itertools.product([False, True], [False, True], [False, True])))
def test_bf16_matches_fp64(shape, residual, relu, channels_last):
    n, c, k, h, w, stride = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, weight, bias, r = (None if t is None else t.bfloat16()
                          for t in _case(n, c, k, h, w, stride, residual))
    x = x.contiguous(memory_format=fmt)
    r = None if r is None else r.contiguous(memory_format=fmt)
    packed = op.conv1x1_prepack(weight)
    assert packed.dtype == torch.bfloat16 and packed.shape == (-(-k // 32), -(-c // 2), 64)
    out = op.conv_bias_act_1x1(x, weight, packed, bias, [stride, stride], r, relu)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=fmt)
    _check(out, x, weight, bias, stride, r, relu)


@needs_bf16
def test_bf16_opcheck_nan_inf_and_in_place():
    x, weight, bias, r = (t.bfloat16() for t in _case(2, 19, 21, 6, 5, 1, True))
    x, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
    packed = op.conv1x1_prepack(weight)
    torch.library.opcheck(op.conv1x1_prepack, (weight,))
    torch.library.opcheck(op.conv_bias_act_1x1, (x, weight, packed, bias, [2, 2], r[:, :, ::2, ::2],
                                                 True))
    torch.library.opcheck(op.conv_bias_act_1x1_, (x, weight, packed, bias, [1, 1], r.clone(),
                                                  True))
    x[0, 3, 4, 2] = float("nan")
    x[1, :, 0, 4] = float("inf")
    x[1, 2, 3, 2] = float("-inf")
    out = op.conv_bias_act_1x1(x, weight, packed, bias, [1, 1], r, True)
    truth = _direct(x.double(), weight.double(), bias.double(), 1, r.double(), True)
    assert torch.isnan(truth).any() and torch.isinf(truth).any()
    # The reference: torch in float32 on the same values, rounded once (torch's own bf16 conv
    # puts a NaN where the truth is finite here).
    ref = _direct(x.float(), weight.float(), bias.float(), 1, r.float(), True).bfloat16()
    assert_within_reference_error(out, ref, truth)
    into = r.clone()
    op.conv_bias_act_1x1_(x, weight, packed, bias, [1, 1], into, True)
    torch.testing.assert_close(into, out, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="conv1x1_prepack"):  # a float32 packing
        op.conv_bias_act_1x1(x, weight, op.conv1x1_prepack(weight.float()), bias, [1, 1])


@needs_bf16
def test_bf16_model_runs_the_gemm_in_place_and_matches_torchvision(prefer_ours):
    tv, ours = _pair("resnet50")
    tv, ours = tv.bfloat16(), ours.bfloat16()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(x.bfloat16())
        want = tv(x.bfloat16().contiguous(memory_format=torch.channels_last))
        truth = tv.double()(x.bfloat16().double())
    kernels = _kernels(ours)
    # 16 conv3s over their residuals; 16 conv1s and the 4 bias-free downsamples into outputs
    assert kernels["gemm", True] == 16 and kernels["gemm", False] == 20, kernels
    assert_within_reference_error(got, want, truth)


@pytest.mark.parametrize("c,k", [(19, 21), (19, 64), (600, 64)])  # partial and whole
def test_nan_and_inf_where_torch_puts_them(c, k):  # column blocks; sums of one and two runs
    x, weight, bias, r = _case(2, c, k, 6, 5, 1, True)
    x = x.contiguous(memory_format=torch.channels_last)
    x[0, 3, 4, 2] = float("nan")
    x[1, :, 0, 4] = float("inf")  # every channel: +inf and -inf products in one sum (NaN)
    x[1, 2, 3, 2] = float("-inf")
    out = op.conv_bias_act_1x1(x, weight, op.conv1x1_prepack(weight), bias, [1, 1], r, True)
    truth = _direct(x.double(), weight.double(), bias.double(), 1, r.double(), True)
    assert torch.isnan(truth).any() and torch.isinf(truth).any()  # the case is what it says
    _check(out, x, weight, bias, 1, r, True)


@pytest.mark.parametrize("stride", [1, 2])
def test_in_place_writes_the_result_over_the_residual(stride):
    x, weight, bias, r = _case(2, 24, 40, 7, 6, stride, True)
    x, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
    packed = op.conv1x1_prepack(weight)
    want = op.conv_bias_act_1x1(x, weight, packed, bias, [stride, stride], r, True)
    into = r.clone()
    assert op.conv_bias_act_1x1_(x, weight, packed, bias, [stride, stride], into, True) is None
    torch.testing.assert_close(into, want, rtol=0, atol=0)
    # x in another layout or a view is read through a dense copy: still apart from the residual
    for other in (x.contiguous(), x[:, :, :, :]):
        into = r.clone()
        op.conv_bias_act_1x1_(other, weight, packed, bias, [stride, stride], into, True)
        torch.testing.assert_close(into, want, rtol=0, atol=0)


def test_winograd_in_place_writes_the_result_over_the_residual():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 19, 9, 10, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(21, 19, 3, 3, generator=g) / 13, torch.randn(21, generator=g)
    r = torch.randn(2, 21, 9, 10, generator=g).contiguous(memory_format=torch.channels_last)
    x[1, 4, 2, 3] = float("nan")  # a tile computed directly writes over the residual too
    for tile in (2, 4):
        packed = op.winograd_prepack(weight, tile)
        want = op.conv_bias_act_winograd(x, weight, packed, bias, [1, 1], r, True)
        into = r.clone()
        op.conv_bias_act_winograd_(x, weight, packed, bias, [1, 1], into, True)
        torch.testing.assert_close(into, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 2])
def test_without_bias_as_the_models_downsamples_run_it(dtype, stride):
    if dtype == torch.bfloat16 and not gemm_bf16_supported():
        pytest.skip("the bfloat16 GEMM needs AVX-512 and AVX512-BF16")
    x, weight, _, r = (t.to(dtype) for t in _case(2, 40, 36, 7, 6, stride, True))
    x, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
    packed = op.conv1x1_prepack(weight)
    for residual, relu in ((None, False), (r, True)):
        out = op.conv_bias_act_1x1(x, weight, packed, None, [stride, stride], residual, relu)
        truth = _direct(x.double(), weight.double(), None, stride,
                        None if residual is None else residual.double(), relu)
        assert_within_reference_error(
            out, _direct(x, weight, None, stride, residual, relu), truth)
    torch.library.opcheck(op.conv_bias_act_1x1,
                          (x, weight, packed, None, [stride, stride], None, False))
    into = r.clone()
    op.conv_bias_act_1x1_(x, weight, packed, None, [stride, stride], into, True)
    torch.testing.assert_close(into, op.conv_bias_act_1x1(x, weight, packed, None,
                                                          [stride, stride], r, True),
                               rtol=0, atol=0)


def test_opcheck():
    x, weight, bias, r = _case(2, 5, 7, 6, 5, 1, True)
    x, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
    packed = op.conv1x1_prepack(weight)
    torch.library.opcheck(op.conv1x1_prepack, (weight,))
    torch.library.opcheck(op.conv_bias_act_1x1, (x, weight, packed, bias, [1, 1], r, True))
    torch.library.opcheck(op.conv_bias_act_1x1,
                          (x.contiguous(), weight, packed, bias, [2, 2], None, False))
    torch.library.opcheck(op.conv_bias_act_1x1_, (x, weight, packed, bias, [1, 1], r.clone(),
                                                  True))
    w3 = torch.randn(7, 5, 3, 3)
    torch.library.opcheck(op.conv_bias_act_winograd_,
                          (x, w3, op.winograd_prepack(w3, 2), bias, [1, 1], r.clone(), True))


def test_empty_batch_and_no_input_channels():
    x, weight, bias, _ = _case(0, 4, 6, 5, 5, 1, False)
    out = op.conv_bias_act_1x1(x, weight, op.conv1x1_prepack(weight), bias, [1, 1])
    assert out.shape == (0, 6, 5, 5)
    x, weight = torch.randn(2, 0, 5, 5), torch.randn(6, 0, 1, 1)
    r = torch.randn(2, 6, 5, 5)
    out = op.conv_bias_act_1x1(x, weight, op.conv1x1_prepack(weight), bias, [1, 1], r, True)
    torch.testing.assert_close(out, (bias.view(1, -1, 1, 1) + r).relu(), rtol=0, atol=0)
    out = op.conv_bias_act_1x1(x, weight, op.conv1x1_prepack(weight), None, [1, 1], r, True)
    torch.testing.assert_close(out, r.relu(), rtol=0, atol=0)


def test_bad_arguments_say_what_was_expected():
    x, weight, bias, r = _case(1, 8, 8, 6, 6, 1, True)
    x, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
    packed = op.conv1x1_prepack(weight)
    with pytest.raises(ValueError, match=r"\(K, C, 1, 1\)"):
        op.conv1x1_prepack(torch.randn(8, 8, 3, 3))
    with pytest.raises(TypeError, match="float32"):
        op.conv1x1_prepack(weight.double())
    with pytest.raises(ValueError, match="conv1x1_prepack"):  # packed for other channels
        op.conv_bias_act_1x1(x, weight, op.conv1x1_prepack(torch.randn(8, 24, 1, 1)), bias,
                             [1, 1])
    with pytest.raises(TypeError, match="float32"):
        op.conv_bias_act_1x1(x.double(), weight.double(), packed, bias.double(), [1, 1])
    with pytest.raises(ValueError, match="1x1"):
        op.conv_bias_act_1x1(x, torch.randn(8, 8, 3, 3), packed, bias, [1, 1])
    with pytest.raises(ValueError, match="residual"):
        op.conv_bias_act_1x1(x, weight, packed, bias, [1, 1], torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="dense in channels_last"):  # NCHW residual
        op.conv_bias_act_1x1_(x, weight, packed, bias, [1, 1], r.contiguous(), True)
    with pytest.raises(ValueError, match="apart from x"):  # the residual is x itself
        op.conv_bias_act_1x1_(x, weight, packed, bias, [1, 1], x, True)
    # The fake kernels (torch.compile, export) refuse what the ops refuse.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fx, fw, fp, fb, fr = (mode.from_tensor(t) for t in (x, weight, packed, bias, r))
        with pytest.raises(ValueError, match="dense in channels_last"):
            op.conv_bias_act_1x1_(fx, fw, fp, fb, [1, 1], fr.contiguous(), True)
        with pytest.raises(ValueError, match="1x1"):
            op.conv_bias_act_1x1(fx, mode.from_tensor(torch.randn(8, 8, 3, 3)), fp, fb, [1, 1])
        with pytest.raises(TypeError, match="float32"):
            op.conv_bias_act_1x1(fx.double(), fw.double(), fp, fb.double(), [1, 1])


def _pair(arch):
    tv = getattr(torchvision.models, arch)(num_classes=10).eval()
    calibrate_(tv, batches=1, batch_size=4, image_size=64)
    ours = getattr(resnet_fast, arch)(num_classes=10)
    ours.load_state_dict(tv.state_dict())
    return tv, ours.eval()


def _kernels(model):
    """{(kernel, written in place): plans} of the model's program."""
    seen = {}
    for plan in Kept.of(model).plans():
        for (_, _, in_place), (kernel, _) in getattr(plan, "_packed", {}).items():
            seen[kernel, in_place] = seen.get((kernel, in_place), 0) + 1
    return seen


@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_models_run_our_kernels_in_place_and_match_torchvision(prefer_ours, arch):
    tv, ours = _pair(arch)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    with torch.no_grad():
        got = ours(x)
        truth = tv.double()(x.double())
        # torch's fp32 error: the worse of its two layouts (NCHW: ATen; channels_last: oneDNN)
        want = max((tv.float()(x.contiguous(memory_format=f)) for f in
                    (torch.contiguous_format, torch.channels_last)),
                   key=lambda o: (o.double() - truth).abs().max().item())
    assert torch.equal(x, before)  # the caller's input is never written
    kernels = _kernels(ours)
    blocks = 16 if arch == "resnet50" else 8
    # Every block's last conv writes over its residual: ResNet-50's 1x1 conv3 by the GEMM
    # (its conv1s run the GEMM too), ResNet-18's 3x3 conv2 by Winograd; the 1x1 downsamples
    # (4 in ResNet-50, 3 in ResNet-18; no bias) by the GEMM into outputs of their own.
    last = "gemm" if arch == "resnet50" else "winograd"
    assert kernels[last, True] == blocks, kernels
    assert kernels.get(("gemm", False), 0) == (blocks + 4 if arch == "resnet50" else 3), kernels
    assert_within_reference_error(got, want, truth)
    assert got.argmax(1).tolist() == want.argmax(1).tolist()


def test_a_hooked_maxpools_output_is_not_written(prefer_ours):
    # ResNet-18's layer1.0 adds the maxpool's output: a hook that keeps it must see it as
    # the maxpool returned it, not overwritten by the block.
    tv, ours = _pair("resnet18")
    kept = []
    ours.maxpool.register_forward_hook(lambda m, i, o: kept.append((o, o.clone())))
    with torch.no_grad():
        got = ours(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(got).all() and len(kept) == 1
    assert torch.equal(kept[0][0], kept[0][1])
    assert _kernels(ours).get(("winograd", True)) == 7  # the other seven blocks own theirs


def test_a_block_on_its_own_never_writes_the_callers_tensor(prefer_ours):
    tv, ours = _pair("resnet18")
    # layer1[0] adds the caller's x itself; layer2[0] a fused downsample's output, which the
    # block writes over instead.
    for name in ("layer1", "layer2"):
        x = torch.randn(2, 64, 16, 16).contiguous(memory_format=torch.channels_last)
        before = x.clone()
        with torch.no_grad():
            got = getattr(ours, name)[0](x)
            want = getattr(tv, name)[0](x)
        assert torch.equal(x, before)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert _kernels(ours.layer2[0]).get(("winograd", True)) == 1


_AVX2_CHECK = """
import torch, torch.nn.functional as F, resnet_fast
op = torch.ops.resnet_fast
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 19, 9, 10, generator=g).contiguous(memory_format=torch.channels_last)
w = torch.randn(21, 19, 1, 1, generator=g) / 5
b = torch.randn(21, generator=g)
for s in (1, 2):
    truth = F.conv2d(x.double(), w.double(), b.double(), stride=s).relu()
    ref = (F.conv2d(x, w, b, stride=s).relu().double() - truth).abs().max().item()
    packed = op.conv1x1_prepack(w)
    assert packed.shape[2] == 16, packed.shape  # 2 x 8 lanes: the AVX2 build
    err = (op.conv_bias_act_1x1(x, w, packed, b, [s, s]).double() - truth).abs().max().item()
    assert err <= 2 * ref + 1e-6, (s, err, ref)
try:  # the bfloat16 GEMM is AVX-512 code: refused, and said why
    op.conv1x1_prepack(w.bfloat16())
    raise SystemExit("bfloat16 ran without AVX-512")
except RuntimeError as e:
    assert "AVX512-BF16" in str(e), e
print("ok")
"""


def test_avx2_build_runs_where_avx512_is_turned_off():
    import os
    import subprocess
    import sys
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", _AVX2_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
