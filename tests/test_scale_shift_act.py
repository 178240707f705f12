"""scale_shift_act on the C++ CPU backend (CUDA in the gpu tier) against the reference."""

import pytest
import torch
from _numerics import assert_within_reference_error, scale_shift_magnitude

from resnet_fast.ops import reference, scale_shift_act

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# The odd shape (nothing a multiple of a vector width), a ResNet-like one, 2-D and 3-D.
SHAPES = [(3, 37, 13, 19), (2, 64, 8, 8), (5, 7), (2, 3, 11)]
LAYOUTS = [(shape, cl) for shape in SHAPES for cl in (False, True) if not cl or len(shape) == 4]


def make_inputs(shape, dtype, device="cpu", channels_last=False, param_dtype=None, seed=0):
    # Drawn on the device itself: fp64 randn of a 51M-element GPU case on the host took 4 s.
    g = torch.Generator(device).manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64, device=device)
    r = torch.randn(shape, generator=g, dtype=torch.float64, device=device)
    scale = torch.rand(c, generator=g, dtype=torch.float64, device=device) * 2 - 0.5
    shift = torch.randn(c, generator=g, dtype=torch.float64, device=device)
    x, r = x.to(device, dtype), r.to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        r = r.contiguous(memory_format=torch.channels_last)
    pd = param_dtype or dtype
    return x, scale.to(device, pd), shift.to(device, pd), r


def check_against_reference(backend, x, scale, shift, r, relu):
    inputs = [t for t in (x, scale, shift, r) if t is not None]
    originals = [t.clone() for t in inputs]
    res = r
    out = scale_shift_act(x, scale, shift, res, relu, backend=backend)
    ref = reference.scale_shift_act(x, scale, shift, res, relu)
    truth = reference.scale_shift_act(x.double(), scale.double(), shift.double(),
                                      None if res is None else res.double(), relu)
    assert out.dtype == x.dtype and out.shape == x.shape and out.stride() == x.stride()
    assert_within_reference_error(out, ref, truth, scale_shift_magnitude(x, scale, shift, res))
    for t, t0 in zip(inputs, originals):
        assert torch.equal(t, t0), "an input was modified"
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, channels_last", LAYOUTS)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_cpu_matches_reference(shape, channels_last, dtype, residual, relu):
    x, s, b, r = make_inputs(shape, dtype, channels_last=channels_last)
    check_against_reference("cpu", x, s, b, r if residual else None, relu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_parameters_with_reduced_activations(dtype):
    x, s, b, r = make_inputs((2, 24, 5, 5), dtype, param_dtype=torch.float32)
    check_against_reference("cpu", x, s, b, r, True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, channels_last",
                         LAYOUTS + [((64, 256, 56, 56), False), ((64, 256, 56, 56), True)])
@pytest.mark.parametrize("residual", [True, False])
def test_gpu_matches_reference(backend, shape, channels_last, dtype, residual):
    x, s, b, r = make_inputs(shape, dtype, "cuda", channels_last)
    check_against_reference(backend, x, s, b, r if residual else None, True)


def test_nan_inf_zero_size_and_strided_inputs():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0]]).view(1, 4, 1, 1).repeat(2, 1, 3, 3)
    s = torch.tensor([1.0, 1.0, 2.0, float("nan")])
    b = torch.zeros(4)
    out = scale_shift_act(x, s, b, None, True, backend="cpu")
    torch.testing.assert_close(out, reference.scale_shift_act(x, s, b, None, True),
                               equal_nan=True, rtol=0, atol=0)
    empty = torch.empty(0, 4, 3, 3)
    assert scale_shift_act(empty, s, b, empty, True, backend="cpu").shape == (0, 4, 3, 3)
    big, sc, sh, r = make_inputs((2, 8, 10, 12), torch.float32, channels_last=True)
    view = big[:, ::2, 1:, :]  # strided channels_last view
    rv = r[:, ::2, 1:, :].contiguous()  # residual in the other layout
    out = scale_shift_act(view, sc[::2], sh[::2], rv, True, backend="cpu")
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference.scale_shift_act(view, sc[::2], sh[::2], rv, True))


def test_bad_inputs_are_refused():
    x, s, b, r = make_inputs((2, 4, 3, 3), torch.float32)
    cases = [
        ((x, s[:3], b, None), ValueError, r"expected scale of shape \(4,\) \(one value per channel of x\), got \(3,\)"),
        ((x, s, b.double(), None), TypeError, r"expected shift in x's dtype \(torch.float32\) or float32, got torch.float64"),
        ((x, s.half(), b.half(), None), TypeError, r"expected scale in x's dtype"),
        ((x, s, b, r[:1]), ValueError, r"expected residual to have the same shape as x"),
        ((x, s, b, r.double()), TypeError, r"expected residual to have the same dtype as x"),
        ((x[0, 0, 0], s[:3], b[:3], None), ValueError, r"at least 2 dims, got \(3,\)"),
        ((x.int(), s, b, None), TypeError, r"got torch.int32"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            scale_shift_act(*args, backend="cpu")
    with pytest.raises(ValueError, match=r"expected scale of shape \(4,\)"):
        torch.ops.resnet_fast.scale_shift_act(x, s[:3], b, None, True)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_opcheck(channels_last, residual, relu):
    x, s, b, r = make_inputs((2, 5, 3, 7), torch.float32, channels_last=channels_last)
    args = (x, s, b, r if residual else None, relu)
    torch.library.opcheck(torch.ops.resnet_fast.scale_shift_act, args)
    grad_args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.resnet_fast.scale_shift_act, grad_args)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_gradcheck_float64(residual, relu):
    x, s, b, r = make_inputs((2, 3, 4, 5), torch.float64, seed=3)
    # Keep pre-activations away from the relu kink, where finite differences are undefined.
    x = x + torch.sign(x) * 0.1
    args = [x.requires_grad_(), s.requires_grad_(), b.requires_grad_(),
            r.requires_grad_() if residual else None, relu]
    assert torch.autograd.gradcheck(lambda *a: torch.ops.resnet_fast.scale_shift_act(*a), args)


def test_backward_matches_eager_batchnorm_add_relu():
    # Frozen (eval) BN + add + ReLU in eager autograd vs our op with scale/shift from the BN.
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    r = torch.randn(3, 6, 5, 5, requires_grad=True)
    eager = torch.relu(bn(x) + r)
    g = torch.randn_like(eager)
    gx, gr, gw, gb = torch.autograd.grad(eager, (x, r, bn.weight, bn.bias), g)
    inv = torch.rsqrt(bn.running_var + bn.eps)
    scale, shift = bn.weight * inv, bn.bias - bn.running_mean * bn.weight * inv
    ours = scale_shift_act(x, scale, shift, r, True, backend="cpu")
    ox, orr, ow, ob = torch.autograd.grad(ours, (x, r, bn.weight, bn.bias), g)
    for a, b in ((ox, gx), (orr, gr), (ow, gw), (ob, gb)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_autocast_promotes_like_eager():
    x, s, b, r = make_inputs((2, 4, 3, 3), torch.float32)
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scale_shift_act(xb, s, b, r, True, backend="cpu")
        via_op = torch.ops.resnet_fast.scale_shift_act(xb, s, b, r, True)
    assert out.dtype == torch.float32 and via_op.dtype == torch.float32
    expected = reference.scale_shift_act(xb.float(), s, b, r, True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(via_op, expected)


def test_compiles_with_fullgraph():
    x, s, b, r = make_inputs((2, 4, 3, 3), torch.float32)
    fn = torch.compile(lambda *a: torch.ops.resnet_fast.scale_shift_act(*a) + 1, fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(x, s, b, r, True), reference.scale_shift_act(x, s, b, r, True) + 1)
