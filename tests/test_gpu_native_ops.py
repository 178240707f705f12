"""The gpu tier's checks of the C++/CUDA training and conv ops, which the CPU tiers cannot run:
``bn_act_fwd`` / ``bn_act_bwd`` (one apply pass forward; the ReLU mask inside both backward
passes) and ``conv_bias_act`` on CUDA, including the paths besides cuDNN's fused engine
(cuDNN disabled, relu=False with and without a residual). opcheck on every variant; outputs and
gradients against nn.BatchNorm2d -> add -> ReLU and F.conv2d under the tolerance rule
(docs/design.md, Tolerances)."""

import pytest
import torch
import torch.nn.functional as F
from _numerics import assert_within_reference_error
from test_conv_bias_act import _case

from resnet_fast.ops import batch_norm_act, conv_bias_act, reference

pytestmark = pytest.mark.gpu

BN_SHAPES = [
    ((3, 37, 13, 19), False),  # odd C and H*W: single-element (unpacked) path
    ((3, 37, 13, 19), True),
    ((4, 64, 8, 8), True),  # C % 8 == 0: 128-bit packs across channels
    ((4, 24, 8, 8), False),  # H*W % 8 == 0: 128-bit packs within a channel
    ((2, 2048, 7, 7), True),  # many channel blocks, few rows
    ((8, 2048, 7, 7), False),
    ((32, 256, 28, 28), True),  # many row slices
    ((3, 12, 5, 7), True),  # C % 4 == 0 only: float32 packs, half precision single elements
    ((2, 8, 9, 11), True),  # one half-precision pack per row: a block of 1 x 256 rows
    ((3, 5, 6, 2), False),  # H*W % 4 == 0 only
]


def _bn_inputs(shape, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, r, grad = ((torch.randn(shape, generator=g, dtype=torch.float64) * s + m)
                  .to("cuda", dtype).contiguous(memory_format=fmt)
                  for s, m in ((2.0, 0.5), (1.0, 0.0), (1.0, 0.0)))
    w = (torch.rand(shape[1], generator=g) + 0.5).cuda()
    b = torch.randn(shape[1], generator=g).cuda()
    return x, r, grad, w, b


@pytest.mark.parametrize("suffix", ["", "_triton"])
@pytest.mark.parametrize("shape, channels_last", BN_SHAPES[:3])
@pytest.mark.parametrize("residual, relu", [(True, True), (False, True), (False, False)])
def test_bn_act_opcheck(suffix, shape, channels_last, residual, relu):
    x, r, grad, w, b = _bn_inputs(shape, torch.float32, channels_last)
    fwd = getattr(torch.ops.resnet_fast, "bn_act_fwd" + suffix)
    bwd = getattr(torch.ops.resnet_fast, "bn_act_bwd" + suffix)
    res = r if residual else None
    torch.library.opcheck(fwd, (x.requires_grad_(), w.requires_grad_(), b, res, relu, 1e-5))
    out, mean, var = fwd(x.detach(), w.detach(), b, res, relu, 1e-5)
    torch.library.opcheck(bwd, (grad, x.detach(), out, w.detach(), mean, var, 1e-5, relu,
                                residual))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_act_bwd_with_unaligned_statistics(dtype):
    """NHWC packs load their per-channel parameters as vectors, which needs them aligned: a mean
    that is a view at an odd offset takes the single-element path, with the same result."""
    x, _, grad, w, b = _bn_inputs((4, 64, 6, 5), dtype, True)
    out, mean, var = torch.ops.resnet_fast.bn_act_fwd(x, w, b, None, True, 1e-5)
    shifted = torch.empty(mean.numel() + 1, device="cuda", dtype=mean.dtype)[1:].copy_(mean)
    aligned = torch.ops.resnet_fast.bn_act_bwd(grad, x, out, w, mean, var, 1e-5, True, True)
    unaligned = torch.ops.resnet_fast.bn_act_bwd(grad, x, out, w, shifted, var, 1e-5, True, True)
    for ours, expected in zip(unaligned, aligned):
        assert torch.equal(ours, expected)


def _rows(t):
    """A channels_last (N, C, H, W) tensor as its (N*H*W, C) rows, without a copy."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


@pytest.mark.slow
@pytest.mark.parametrize("batch", [2**19 - 1, 2**19 + 1], ids=["2^31-2^12", "2^31+2^12"])
def test_bn_act_indexes_past_int32(batch):
    """Both passes' grid-stride loops index in int64 where their index can pass 2^31 - 1: just
    under 2^31 elements (where an int32 index past the last pack wrapped negative) and past it.
    bfloat16 NHWC, 64 channels (8-element packs); about 30 GB of GPU memory. The first and last
    rows against the formulas in float64 from our statistics, the per-channel sums against a
    chunked float64 reduction."""
    c, eps = 64, 1e-5
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, grad = (torch.randn((batch, 8, 8, c), device="cuda", dtype=torch.bfloat16, generator=gen)
               .permute(0, 3, 1, 2) for _ in range(2))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.numel() == batch * 2**12
    w = torch.rand(c, device="cuda", generator=gen) + 0.5
    b = torch.randn(c, device="cuda", generator=gen)
    out, mean, var = torch.ops.resnet_fast.bn_act_fwd(x, w, b, None, True, eps)
    dx, dw, db, _ = torch.ops.resnet_fast.bn_act_bwd(grad, x, out, w, mean, var, eps, True, False)
    mean, invstd = mean.double(), (var.double() + eps).rsqrt()
    sg, sgx, size = (torch.zeros(c, device="cuda", dtype=torch.float64) for _ in range(3))
    for xs, gs, os in zip(*(_rows(t).split(2**20) for t in (x, grad, out))):
        gm = torch.where(os > 0, gs.double(), 0.0)
        sg += gm.sum(0)
        sgx += (gm * (xs.double() - mean)).sum(0)
        size += gm.abs().sum(0) * (1 + (xs.double() - mean).abs().max())
    torch.testing.assert_close(db.double(), sg, rtol=0, atol=(5e-5 * size).max().item())
    torch.testing.assert_close(dw.double(), sgx * invstd, rtol=0,
                               atol=(5e-5 * size * invstd).max().item())
    a = w.double() * invstd
    coef_x, shift = -a * invstd**2 * sgx / (x.numel() // c), -a * sg / (x.numel() // c)
    for rows in (slice(0, 4096), slice(-4096, None)):
        xr, gr, orow = (_rows(t)[rows].double() for t in (x, grad, out))
        expect_out = ((xr - mean) * invstd * w.double() + b.double()).relu()
        torch.testing.assert_close(orow, expect_out, rtol=2**-7, atol=1e-5)
        gm = torch.where(orow > 0, gr, 0.0)
        expect_dx = a * gm + coef_x * (xr - mean) + shift
        torch.testing.assert_close(_rows(dx)[rows].double(), expect_dx, rtol=2**-7, atol=1e-5)


def test_bn_act_whole_op_opcheck():
    x, r, _, w, b = _bn_inputs((4, 16, 6, 5), torch.float32, True)
    rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
    nbt = torch.tensor(0, device="cuda")
    torch.library.opcheck(torch.ops.resnet_fast.batch_norm_act,
                          (x, w, b, rm, rv, True, 0.1, 1e-5, r, True, nbt))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, channels_last", BN_SHAPES)
@pytest.mark.parametrize("residual, relu", [(True, True), (False, True), (False, False)])
def test_bn_act_against_batchnorm_add_relu(backend, dtype, shape, channels_last, residual, relu):
    """Output, dx, dweight, dbias and d residual within the tolerance rule against eager in the
    same dtype and a float64 truth; the running statistics within float32 rounding."""
    x, r, grad, w, b = _bn_inputs(shape, dtype, channels_last)
    results = {}
    for name in ("ours", "eager", "truth"):
        cast = torch.float64 if name == "truth" else None
        xi, ri = (t.to(cast or t.dtype).detach().requires_grad_() for t in (x, r))
        wi, bi = (t.to(cast or t.dtype).detach().requires_grad_() for t in (w, b))
        rm, rv = torch.zeros_like(wi).detach(), torch.ones_like(wi).detach()
        res = ri if residual else None
        if name == "ours":
            out = batch_norm_act(xi, wi, bi, rm, rv, True, 0.1, 1e-5, res, relu, backend=backend)
        else:
            out = F.batch_norm(xi, rm, rv, wi, bi, True, 0.1, 1e-5)
            out = out + res if residual else out
            out = torch.relu(out) if relu else out
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                                 else torch.contiguous_format)
        out.backward(grad.to(out.dtype))
        results[name] = (out, xi.grad, wi.grad, bi.grad, ri.grad if residual else None, rm, rv)
    for i in range(5 if residual else 4):
        assert_within_reference_error(results["ours"][i], results["eager"][i],
                                      results["truth"][i])
    if not residual:
        assert results["ours"][4] is None
    for i in (5, 6):
        torch.testing.assert_close(results["ours"][i].double(), results["truth"][i], rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_act_relu_mask_passes_the_gradient_through_nan(backend, channels_last):
    """As torch.relu: a NaN output stays NaN and passes its gradient to its residual (torch's
    threshold_backward zeroes only where the output is <= 0)."""
    x, r, grad, w, b = _bn_inputs((2, 8, 4, 4), torch.float32, channels_last)
    r = r.clone()
    r[0, 3, 1, 2] = float("nan")
    ri = r.clone().requires_grad_()
    out = batch_norm_act(x, w, b, None, None, True, 0.1, 1e-5, ri, True, backend=backend)
    assert torch.isnan(out[0, 3, 1, 2]) and torch.isnan(out).sum() == 1
    out.backward(grad)
    assert ri.grad[0, 3, 1, 2] == grad[0, 3, 1, 2] != 0
    expect = torch.ops.aten.threshold_backward(grad, out.detach(), 0)
    torch.testing.assert_close(ri.grad, expect, rtol=0, atol=0)


@pytest.mark.parametrize("residual, relu", [(True, True), (False, True), (True, False),
                                            (False, False)])
@pytest.mark.parametrize("cudnn", [True, False])
def test_conv_bias_act_opcheck(residual, relu, cudnn):
    """Every path of the CUDA op: cuDNN's fused engine (relu), ATen's convolution with the bias
    (no relu, no residual) and convolution + our epilogue kernel (cuDNN off, or no relu with a
    residual)."""
    x, w, b, r = _conv_case((8, 16, 3, 2, 1, 1, 2, 7), torch.float32, residual)
    args = (x, w, b, [2, 2], [1, 1], [1, 1], 2, r, relu)
    with torch.backends.cudnn.flags(enabled=cudnn):
        torch.library.opcheck(torch.ops.resnet_fast.conv_bias_act, args)
        grads = tuple(t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t
                      for t in args)
        torch.library.opcheck(torch.ops.resnet_fast.conv_bias_act, grads)


def _conv_case(conv, dtype, residual=True, channels_last=True):
    """test_conv_bias_act's case (x, weight, bias, residual) at batch 3, on the GPU."""
    x, w, b, _, r = _case(conv, dtype, batch=3, channels_last=channels_last, residual=residual)
    return tuple(None if t is None else t.cuda() for t in (x, w, b, r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cudnn", [True, False])
@pytest.mark.parametrize("residual, relu", [(True, True), (False, True), (True, False),
                                            (False, False)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_conv_bias_act_gradients(dtype, cudnn, residual, relu, channels_last):
    """Output and the gradients of x, weight, bias and residual within the tolerance rule
    against the reference's autograd in the same dtype and in float64."""
    conv = (16, 32, 3, 1, 1, 1, 1, 9)
    x, w, b, r = _conv_case(conv, dtype, residual, channels_last)
    geo = (1, 1, 1, 1)
    grad = torch.randn((3, 32, 9, 9), generator=torch.Generator().manual_seed(5),
                       dtype=torch.float64).to("cuda", dtype)
    results = {}
    for name in ("ours", "reference", "truth"):
        cast = torch.float64 if name == "truth" else dtype
        leaves = [None if t is None else t.detach().to(cast).requires_grad_()
                  for t in (x, w, b, r)]
        with torch.backends.cudnn.flags(enabled=cudnn):
            if name == "ours":
                out = conv_bias_act(*leaves[:3], *geo, leaves[3], relu, backend="cuda")
            else:
                out = reference.conv_bias_act(*leaves[:3], *geo, leaves[3], relu)
            out.backward(grad.to(cast))
        results[name] = [out] + [None if t is None else t.grad for t in leaves]
    for ours, ref, truth in zip(*results.values()):
        if truth is None:
            assert ours is None
            continue
        assert_within_reference_error(ours.detach(), ref.detach(), truth.detach(),
                                      truth.abs().max().item() + 1.0)


def test_bn_act_full_size_passes_are_ours():
    """The forward is ATen's statistics reduction plus ONE elementwise pass (ours), the
    backward our two masked passes: no batch_norm_elemt, add/ReLU or where kernels over the
    activation, on a ResNet-50 layer1 shape."""
    x, r, grad, w, b = _bn_inputs((32, 256, 56, 56), torch.bfloat16, True)
    x.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = batch_norm_act(x, w, b, None, None, True, 0.1, 1e-5, r, True, backend="cuda")
        out.backward(grad)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for kernel in ("channel_affine_act_kernel", "masked_grad_sums_kernel",
                   "masked_grad_elemt_kernel"):
        assert sum(kernel in n for n in names) == 1, names
    unfused = ("batch_norm_elemt", "batch_norm_backward_elemt", "where", "add_relu",
               "threshold")
    assert not [n for n in names if any(k in n for k in unfused)], names
