"""Winograd F(2x2,3x3) and F(4x4,3x3) on CPU (``winograd_prepack``, ``conv_bias_act_winograd``)
against an fp64 direct convolution, on shapes that are not multiples of the tile or of the
vector width, with and without residual and ReLU, channels_last and NCHW; NaN and inf where
torch puts them; bfloat16 tensors (float32 arithmetic: the float32 op's result rounded once);
the op's checks, opcheck; and the models' plans choosing it per layer."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _numerics import assert_within_reference_error

import resnet_fast
from resnet_fast import autotune
from resnet_fast.calibrate import calibrate_
from resnet_fast.models.program import Kept
from resnet_fast.ops.conv_bias_act import onednn_dtypes, winograd_k_block

pytestmark = pytest.mark.skipif(not winograd_k_block(),
                                reason="the Winograd kernels need AVX2+FMA or AVX-512")
op = torch.ops.resnet_fast

# F(4x4,3x3) is the opt-in: its error against fp64, measured on ResNet-50's layers
# (docs/design.md), is 5-11x torch's own channels_last fp32 conv's. The test holds it to 32x
# the worse of torch's two layouts, so a kernel error (typically 1e3x and more) still fails.
F4_FACTOR = 32

SHAPES = [  # N, C, K, H, W, padding
    (1, 3, 5, 7, 9, 1),
    (3, 17, 33, 10, 11, 1),
    (1, 16, 16, 1, 1, 1),
    (2, 20, 40, 5, 4, 0),
    (1, 64, 70, 14, 13, 1),
]


def _case(n, c, k, h, w, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, 3, 3, generator=g) / (9 * c) ** 0.5
    bias = torch.randn(k, generator=g)
    r = None
    if residual:
        r = torch.randn(n, k, h, w, generator=g)
    return x, weight, bias, r


def _direct(x, weight, bias, padding, r, relu):
    y = F.conv2d(x, weight, bias, padding=padding)
    if r is not None:
        y = y + r
    return y.relu() if relu else y


def _torch_fp32(x, weight, bias, padding, r, relu, truth):
    """torch's own fp32 result with the larger error of its two layouts (NCHW: ATen's
    direct conv; channels_last: oneDNN's), the reference the bounds below scale."""
    outs = [_direct(x.contiguous(memory_format=fmt), weight, bias, padding,
                    None if r is None else r.contiguous(memory_format=fmt), relu)
            for fmt in (torch.contiguous_format, torch.channels_last)]
    finite = torch.isfinite(truth)
    return max(outs, key=lambda o: (o.double() - truth)[finite].abs().max().item())


def _assert_within_bound(tile, out, torch_fp32, truth):
    """F(2x2,3x3): the project's tolerance rule; F(4x4,3x3): NaN and infinities exactly where
    the truth has them, finite values within F4_FACTOR x torch's fp32 error (+ the floor).
    ``torch_fp32``: torch's result with the larger error of its two layouts."""
    if tile == 2:
        assert_within_reference_error(out, torch_fp32, truth)
        return
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isnan(out), torch.isnan(truth))
    assert torch.equal(out.double()[torch.isinf(truth)], truth[torch.isinf(truth)])
    err = (out.double() - truth)[finite].abs().max().item()
    ref = (torch_fp32.double() - truth)[finite].abs().max().item()
    floor = 2 * torch.finfo(torch.float32).eps * max(1.0, truth[finite].abs().max().item())
    assert err <= F4_FACTOR * ref + floor, (err, ref)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual,relu,channels_last",
                         list(itertools.product([False, True], [False, True], [False, True])))
def test_matches_fp64_direct(tile, shape, residual, relu, channels_last):
    n, c, k, h, w, pad = shape
    x, weight, bias, r = _case(n, c, k, h, w, False)
    oh, ow = h + 2 * pad - 2, w + 2 * pad - 2
    if residual:
        r = torch.randn(n, k, oh, ow)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    r = None if r is None else r.contiguous(memory_format=fmt)
    out = op.conv_bias_act_winograd(x, weight, op.winograd_prepack(weight, tile), bias,
                                    [pad, pad], r, relu)
    assert out.shape == (n, k, oh, ow) and out.is_contiguous(memory_format=fmt)
    truth = _direct(x.double(), weight.double(), bias.double(), pad,
                    None if r is None else r.double(), relu)
    _assert_within_bound(tile, out, _torch_fp32(x, weight, bias, pad, r, relu, truth), truth)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", [(2, 19, 21, 11, 10), (1, 19, 70, 6, 5)],
                         ids=["tiles split", "channels split"])  # fewer tiles than channels
def test_nan_and_inf_where_torch_puts_them(tile, shape):
    x, weight, bias, r = _case(*shape, True)
    x = x.contiguous(memory_format=torch.channels_last)
    x[0, 3, 4, 3] = float("nan")
    x[-1, 7, 0, 4] = float("inf")
    x[-1, 2, 5, 2] = float("-inf")
    out = op.conv_bias_act_winograd(x, weight, op.winograd_prepack(weight, tile), bias, [1, 1],
                                    r, True)
    truth = _direct(x.double(), weight.double(), bias.double(), 1, r.double(), True)
    assert torch.isnan(truth).any() and torch.isinf(truth).any()  # the case is what it says
    # NaN exactly where torch's are, the same infinities, and the finite values within the
    # bound (the non-finite tiles are computed directly).
    _assert_within_bound(tile, out, _torch_fp32(x, weight, bias, 1, r, True, truth), truth)


def _bf16(*tensors):
    return tuple(None if t is None else t.bfloat16() for t in tensors)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual,relu,channels_last,non_finite", [
    (False, False, True, False), (True, True, True, False), (True, False, False, False),
    (True, True, True, True)])
def test_bfloat16_is_the_float32_result_rounded_once(tile, shape, residual, relu, channels_last,
                                                     non_finite):
    """bfloat16 x, weight, bias and residual: widened exactly, the float32 kernel's arithmetic,
    one rounding to nearest even at the store. So the result is, bit for bit, the float32 op's
    on the same values (itself checked against fp64 above) rounded to bfloat16, NaN where it
    has NaN; and it errs against the fp64 truth within the rule next to torch's own bf16 conv
    (which rounds the conv's output and again after the residual and ReLU)."""
    n, c, k, h, w, pad = shape
    x, weight, bias, _ = _bf16(*_case(n, c, k, h, w, False))
    r = torch.randn(n, k, h + 2 * pad - 2, w + 2 * pad - 2).bfloat16() if residual else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    if non_finite:
        x[0, 0, min(2, h - 1), 0] = float("nan")
        x[-1, -1, h - 1, w - 1] = float("inf")
    r = None if r is None else r.contiguous(memory_format=fmt)
    packed = op.winograd_prepack(weight, tile)
    assert packed.dtype == torch.float32
    torch.testing.assert_close(packed, op.winograd_prepack(weight.float(), tile), rtol=0, atol=0)
    out = op.conv_bias_act_winograd(x, weight, packed, bias, [pad, pad], r, relu)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=fmt)
    f32 = op.conv_bias_act_winograd(x.float(), weight.float(), packed, bias.float(), [pad, pad],
                                    None if r is None else r.float(), relu)
    torch.testing.assert_close(out, f32.bfloat16(), rtol=0, atol=0, equal_nan=True)
    truth = _direct(x.double(), weight.double(), bias.double(), pad,
                    None if r is None else r.double(), relu)
    torch_bf16 = _direct(x, weight, bias, pad, r, relu)
    assert_within_reference_error(out, torch_bf16, truth)
    if residual:  # in place over the residual: the same values
        into = r.contiguous(memory_format=torch.channels_last)
        op.conv_bias_act_winograd_(x, weight, packed, bias, [pad, pad], into, relu)
        torch.testing.assert_close(into, out, rtol=0, atol=0, equal_nan=True)


def test_opcheck():
    x, weight, bias, r = _case(2, 5, 7, 6, 5, True)
    x = x.contiguous(memory_format=torch.channels_last)
    packed = op.winograd_prepack(weight, 2)
    torch.library.opcheck(op.winograd_prepack, (weight, 4))
    torch.library.opcheck(op.conv_bias_act_winograd, (x, weight, packed, bias, [1, 1], r, True))
    torch.library.opcheck(op.conv_bias_act_winograd,
                          (x.contiguous(), weight, packed, bias, [0, 0], None, False))
    xb, wb, bb, rb = _bf16(x, weight, bias, r)
    torch.library.opcheck(op.winograd_prepack, (wb, 2))
    torch.library.opcheck(op.conv_bias_act_winograd,
                          (xb, wb, op.winograd_prepack(wb, 4), bb, [1, 1], rb, True))


def _torch_weight_grad(x, g, padding):
    w = torch.empty(g.shape[1], x.shape[1], 3, 3, dtype=x.dtype)
    return torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], padding, [1, 1], False,
                                               [0, 0], 1, [False, True, False])[1]


WEIGHT_GRAD_SHAPES = [  # N, C, K, H, W, padding
    (2, 5, 7, 6, 5, 1), (1, 70, 65, 9, 11, 1), (3, 4, 3, 7, 7, 0), (2, 6, 5, 5, 6, 2),
    (1, 1, 1, 1, 1, 1), (2, 33, 130, 8, 8, 1),
    pytest.param(2, 512, 512, 24, 24, 1, marks=pytest.mark.slow),  # 288 tiles: two chunks
]


@pytest.mark.parametrize("n, c, k, h, w, pad", WEIGHT_GRAD_SHAPES)
def test_weight_grad_is_the_convs_within_the_rule(n, c, k, h, w, pad):
    """conv3x3_weight_grad against the fp64 weight gradient, within the tolerance rule against
    torch's fp32 backward in the worse of its two layouts: odd sizes (tiles past the edge),
    channel counts off the 64-channel blocks, paddings 0-2, NCHW and channels_last inputs."""
    gen = torch.Generator().manual_seed(n * 1000 + c + k)
    x = torch.randn(n, c, h, w, generator=gen)
    g = torch.randn(n, k, h + 2 * pad - 2, w + 2 * pad - 2, generator=gen)
    truth = _torch_weight_grad(x.double(), g.double(), [pad, pad])
    layouts = (torch.contiguous_format, torch.channels_last)
    want = max((_torch_weight_grad(x.contiguous(memory_format=f), g.contiguous(memory_format=f),
                                   [pad, pad]) for f in layouts),
               key=lambda t: (t.double() - truth).abs().max().item())
    for fmt in layouts:
        got = op.conv3x3_weight_grad(x.contiguous(memory_format=fmt),
                                     g.contiguous(memory_format=fmt), [pad, pad])
        assert got.shape == (k, c, 3, 3) and got.is_contiguous()
        assert_within_reference_error(got, want, truth)


def test_weight_grad_keeps_torchs_non_finite_values():
    """A NaN or an infinity in x or the gradient (or a sum that overflows) gives the weight
    gradient torch's direct computation gives, NaN and infinities where torch has them."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 7, 8, generator=gen)
    g = torch.randn(2, 5, 7, 8, generator=gen)
    cases = []
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[1, 2, 0, 3] = bad
        gb = g.clone()
        gb[0, 4, 6, 7] = bad
        cases += [(xb, g), (x, gb)]
    cases.append((x * 1e30, g * 1e30))  # finite inputs, overflowing sums
    for xi, gi in cases:
        got = op.conv3x3_weight_grad(xi, gi, [1, 1])
        want = _torch_weight_grad(xi, gi, [1, 1])
        assert not torch.isfinite(want).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_weight_grad_checks_its_arguments_and_opcheck():
    x, g = torch.randn(2, 4, 6, 6), torch.randn(2, 3, 6, 6)
    torch.library.opcheck(op.conv3x3_weight_grad, (x, g, [1, 1]))
    torch.library.opcheck(op.conv3x3_weight_grad,
                          (x.contiguous(memory_format=torch.channels_last), g[:, :, 1:5, 1:5],
                           [0, 0]))
    with pytest.raises(TypeError, match="float32"):
        op.conv3x3_weight_grad(x.double(), g.double(), [1, 1])
    with pytest.raises(ValueError, match=r"expected grad of shape \(2, K, 4, 4\)"):
        op.conv3x3_weight_grad(x, g, [0, 0])
    with pytest.raises(ValueError, match="paddings >= 0"):
        op.conv3x3_weight_grad(x, g, [-1, 1])
    with pytest.raises(ValueError, match="4-D"):
        op.conv3x3_weight_grad(x[0], g[0], [1, 1])
    empty = op.conv3x3_weight_grad(x[:0], g[:0], [1, 1])
    assert empty.shape == (3, 4, 3, 3) and not empty.any()


def test_empty_batch_and_no_input_channels():
    x, weight, bias, _ = _case(0, 4, 6, 5, 5, False)
    out = op.conv_bias_act_winograd(x, weight, op.winograd_prepack(weight, 2), bias, [1, 1])
    assert out.shape == (0, 6, 5, 5)
    x, weight = torch.randn(2, 0, 5, 5), torch.randn(6, 0, 3, 3)
    out = op.conv_bias_act_winograd(x, weight, op.winograd_prepack(weight, 4), bias, [1, 1],
                                    None, False)
    torch.testing.assert_close(out, bias.view(1, -1, 1, 1).expand(2, 6, 5, 5), rtol=0, atol=0)


def test_bad_arguments_say_what_was_expected():
    x, weight, bias, _ = _case(1, 8, 8, 6, 6, False)
    packed = op.winograd_prepack(weight, 2)
    with pytest.raises(ValueError, match="tile 2"):
        op.winograd_prepack(weight, 3)
    with pytest.raises(ValueError, match=r"\(K, C, 3, 3\)"):
        op.winograd_prepack(torch.randn(8, 8, 5, 5), 2)
    with pytest.raises(TypeError, match="float32"):
        op.winograd_prepack(weight.double(), 2)
    other = torch.randn(8, 24, 3, 3)
    with pytest.raises(ValueError, match="winograd_prepack"):  # packed for other channels
        op.conv_bias_act_winograd(x, weight, op.winograd_prepack(other, 2), bias, [1, 1])
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        op.conv_bias_act_winograd(x.double(), weight.double(), packed, bias.double(), [1, 1])
    with pytest.raises(TypeError, match="bias in x's dtype"):  # one dtype for every tensor
        op.conv_bias_act_winograd(x.bfloat16(), weight.bfloat16(), packed, bias, [1, 1])
    with pytest.raises(ValueError, match="residual"):
        op.conv_bias_act_winograd(x, weight, packed, bias, [1, 1], torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="3x3"):
        w5 = torch.randn(8, 8, 5, 5)
        op.conv_bias_act_winograd(x, w5, packed, bias, [1, 1])


class _Prefer:
    """A CPU tuner timer under which Winograd with ``tile`` is fastest (its calls take no
    time). A candidate is ``partial(plan._timed_call, x, residual, kernel, name, prepared,
    in_place)``, name one of "onednn", "gemm", "winograd2", "winograd4"."""

    def __init__(self, tile):
        self.name, self.calls = f"winograd{tile}", 0

    def __call__(self, fn):
        self.calls += 1
        kernel, name = fn.args[2:4]
        return 0.0 if kernel == "winograd" and name == self.name else 1.0


def _resnet18_pair(winograd):
    """(torchvision's calibrated resnet18 with 10 classes, ours with its weights and
    ``set_winograd(winograd)``), both in eval mode."""
    tv = torchvision.models.resnet18(num_classes=10).eval()
    calibrate_(tv, batches=1, batch_size=4, image_size=64)
    ours = resnet_fast.resnet18(num_classes=10)
    ours.load_state_dict(tv.state_dict())
    ours.eval().set_winograd(winograd)
    return tv, ours


def _choices(model):
    return [entry[0] for plan in Kept.of(model).plans() for entry in plan._packed.values()
            if getattr(plan, "_packed", None)]


@pytest.mark.parametrize("winograd", [None, True])
def test_plans_choose_winograd_and_match_torchvision(tmp_path, monkeypatch, winograd):
    timer = _Prefer(4 if winograd else 2)
    monkeypatch.setattr(autotune, "_default_cpu", autotune.Tuner(
        str(tmp_path / "t.json"), environment=autotune.cpu_environment, timer=timer,
        measure=True))
    tv, ours = _resnet18_pair(winograd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = ours(x)
        truth = tv.double()(x.double())
        # torchvision's fp32 result with the larger error of its two layouts (as _torch_fp32)
        want = max((tv.float().to(memory_format=fmt)(x.contiguous(memory_format=fmt))
                    for fmt in (torch.contiguous_format, torch.channels_last)),
                   key=lambda o: (o.double() - truth).abs().max().item())
    # resnet18: 16 3x3 convs, 3 of them stride 2; the 13 others take Winograd.
    assert _choices(ours).count("winograd") == 13 and timer.calls > 0
    _assert_within_bound(4 if winograd else 2, got, want, truth)
    assert got.argmax(1).tolist() == want.argmax(1).tolist()
    calls = timer.calls
    with torch.no_grad():
        ours(x)
    assert timer.calls == calls  # chosen once per layer and input shape


def test_plans_weigh_winograds_larger_weight_at_memory_speed(tmp_path, monkeypatch):
    """The plans tell the tuner each candidate's weight bytes: F(2x2)'s transformed weight is
    16/9 of oneDNN's (F(4x4)'s 36/9). Timed 1 ms faster, Winograd still loses a layer whose
    extra weight takes longer than that to read: at 0.2 GB/s the four 64-channel stride-1
    3x3s of resnet18 (F(2x2) reads 7/9 x 144 KiB more: 0.57 ms) take Winograd and those of
    128 channels and up (2.3 ms and more) stay on oneDNN; at 1000 GB/s all 13 take it."""
    timer = _Prefer(2)
    for gbs, winograd in ((0.2, 4), (1000.0, 13)):
        monkeypatch.setattr(autotune, "_default_cpu", autotune.Tuner(
            str(tmp_path / f"{gbs}.json"), environment=autotune.cpu_environment, timer=timer,
            measure=True, stream_gbs=lambda gbs=gbs: gbs))
        tv, ours = _resnet18_pair(None)
        with torch.no_grad():
            ours(torch.randn(1, 3, 64, 64))
        assert _choices(ours).count("winograd") == winograd, gbs
        table = json.loads((tmp_path / f"{gbs}.json").read_text())["entries"].values()
        reads = [e["weight_read_ms"] for e in table if "winograd2" in e["ms"]]
        assert reads and all(r["winograd2"] == pytest.approx(r["onednn"] * 16 / 9) for r in reads)


@pytest.mark.skipif(torch.bfloat16 not in onednn_dtypes(),
                    reason="bfloat16 plans run oneDNN's bf16 conv, which this CPU has not")
def test_bfloat16_plans_measure_both_tiles_where_enough_pixels_share_the_weight(tmp_path,
                                                                                monkeypatch):
    """A bfloat16 model measures F(4x4) by default (its error there is the output's
    rounding), for layers of at least 512 output pixels per call: resnet18 at 64x64, batch 8,
    layer1 (16x16) and layer2 (8x8) take it, layer3 (4x4) and layer4 (2x2) stay on oneDNN."""
    timer = _Prefer(4)
    monkeypatch.setattr(autotune, "_default_cpu", autotune.Tuner(
        str(tmp_path / "t.json"), environment=autotune.cpu_environment, timer=timer,
        measure=True))
    torch.manual_seed(0)
    tv, ours = _resnet18_pair(None)
    tv, ours = tv.bfloat16(), ours.bfloat16()
    x = torch.randn(8, 3, 64, 64).bfloat16()
    with torch.no_grad():
        got = ours(x)
        want = tv(x.contiguous(memory_format=torch.channels_last))
        truth = tv.double()(x.double())
    # 4 stride-1 3x3 convs in layer1, 3 in layer2; 3 each in layer3 and layer4 on oneDNN
    assert _choices(ours).count("winograd") == 7 and _choices(ours).count("onednn") >= 6
    assert_within_reference_error(got, want, truth)


def test_winograd_false_keeps_onednn():
    model = resnet_fast.resnet18(num_classes=10).eval().set_winograd(False)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    # the stem and all 16 3x3s on oneDNN (the 3 bias-free 1x1 downsamples may measure our
    # GEMM faster)
    assert _choices(model) and set(_choices(model)) <= {"onednn", "gemm"}
    assert _choices(model).count("onednn") >= 17
    with pytest.raises(TypeError, match="None, True or False"):
        model.set_winograd("yes")


_AVX2_CHECK = """
import torch, torch.nn.functional as F, resnet_fast
op = torch.ops.resnet_fast
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 19, 9, 10, generator=g).contiguous(memory_format=torch.channels_last)
w = torch.randn(21, 19, 3, 3, generator=g) / 13
b = torch.randn(21, generator=g)
truth = F.conv2d(x.double(), w.double(), b.double(), padding=1).relu()
ref = (F.conv2d(x, w, b, padding=1).relu().double() - truth).abs().max().item()
for tile, factor in ((2, 2), (4, 32)):
    packed = op.winograd_prepack(w, tile)
    assert packed.shape[3] == 16, packed.shape  # 2 x 8 lanes: the AVX2 build
    err = (op.conv_bias_act_winograd(x, w, packed, b, [1, 1]).double() - truth).abs().max().item()
    assert err <= factor * ref + 1e-6, (tile, err, ref)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()  # bfloat16: float32's, rounded once
    rb = torch.randn(2, 21, 9, 10, generator=g).bfloat16()  # NCHW, as x.contiguous() below
    for xi, ri in ((xb, None), (xb.contiguous(), rb)):
        got = op.conv_bias_act_winograd(xi, wb, op.winograd_prepack(wb, tile), bb, [1, 1], ri)
        want = op.conv_bias_act_winograd(xi.float(), wb.float(), op.winograd_prepack(wb, tile),
                                         bb.float(), [1, 1], None if ri is None else ri.float())
        assert torch.equal(got, want.bfloat16()), tile
print("ok")
"""


def test_avx2_build_runs_where_avx512_is_turned_off():
    """The AVX2 build, on any x86-64 host with AVX2: ATEN_CPU_CAPABILITY=avx2 selects it (as it
    selects PyTorch's own AVX2 kernels), whose weight layout has 16-channel blocks."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", _AVX2_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.slow
def test_compiled_model_with_winograd_on_matches_eager():
    """torch.compile (inductor) of a model whose eager plans run Winograd: the compiled graph
    folds BN itself and runs the convolutions inductor picks; its output matches the fp64
    truth within the rule, and the eager plans keep working beside it."""
    tv, ours = _resnet18_pair(True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = ours(x)
        compiled = torch.compile(ours)(x)
        truth = tv.double()(x.double())
        want = tv.float()(x)
        again = ours(x)
    assert_within_reference_error(compiled, want, truth)
    _assert_within_bound(4, eager, want, truth)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("k, c", [(21, 19), (64, 3), (40, 33)])
def test_prepack_is_the_transform_with_zero_padding(tile, k, c):
    """winograd_prepack is G f G^T per (k, c) within a float32 rounding of the fp64 transform,
    laid out (E, K blocks, C padded, block width) with exact zeros in the padding, also where
    the allocator hands back memory that held NaN (the kernel writes every value)."""
    g = {2: [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]],
         4: [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]}[tile]
    g = torch.tensor(g, dtype=torch.float64)
    weight = torch.randn(k, c, 3, 3, generator=torch.Generator().manual_seed(7))
    shape = op.winograd_prepack(weight, tile).shape
    for _ in range(3):  # NaN-filled blocks of the packed size, freed for the allocator to reuse
        junk = torch.full(shape, float("nan"))
        del junk
        packed = op.winograd_prepack(weight, tile)
    e, blocks, cp, kb = shape
    u = torch.einsum("ai,kcij,bj->abkc", g, weight.double(), g).reshape(e, k, c)
    want = torch.zeros(e, blocks * kb, cp, dtype=torch.float64)
    want[:, :k, :c] = u  # zero where K and C are padded
    want = want.reshape(e, blocks, kb, cp).transpose(2, 3)
    # atol 0: the padding exactly 0
    torch.testing.assert_close(packed.double(), want, rtol=2 ** -23, atol=0)


def test_a_rebuilt_plan_prepares_only_the_kernel_it_runs(tmp_path, monkeypatch):
    """Once the tuning table knows a layer, a plan rebuilt for new weights (an optimizer step)
    prepares the chosen kernel's weight alone: no oneDNN reorder where Winograd runs, no
    Winograd transform where oneDNN does, no copy of the residual to time on."""
    from resnet_fast.models import _fused

    monkeypatch.setattr(autotune, "_default_cpu", autotune.Tuner(
        str(tmp_path / "t.json"), environment=autotune.cpu_environment, timer=_Prefer(2),
        measure=True))
    tv, ours = _resnet18_pair(None)
    x = torch.randn(2, 3, 64, 64)

    def choices():  # the program's plans' and the fc plan's
        head = ours.__dict__[Kept.HEAD].program
        return _choices(ours) + [entry[0] for entry in head._packed.values()]

    with torch.no_grad():
        ours(x)
        first = choices()
        for p in ours.parameters():
            p.mul_(1.0)  # a new version: every plan is rebuilt
        made = []
        real = _fused._Prepared.__missing__
        monkeypatch.setattr(_fused._Prepared, "__missing__",
                            lambda self, name: made.append(name) or real(self, name))
        ours(x)
    assert choices() == first and "winograd" in first and "onednn" in first
    kernels = ["winograd" if n.startswith("winograd") else n for n in made]
    assert sorted(kernels) == sorted(first)  # one preparation per plan: the chosen one
