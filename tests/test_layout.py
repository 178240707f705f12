"""resnet_fast::to_channels_last (csrc/cpu/layout.cpp) and the two dense_in that call it
(kernels.layout's, which the models use for NCHW inputs and the planned backward's NCHW
gradients, and csrc/checks.h's, every CPU op's): the same tensor as torch's
``contiguous(memory_format=torch.channels_last)`` for every dtype and input layout, a new
tensor even where the input is channels_last already, opcheck, its gradient, a clear error."""

import pytest
import torch

from resnet_fast._extension import has_kernel
from resnet_fast.kernels.layout import dense_in
from resnet_fast.ops.conv_bias_act import winograd_k_block

pytestmark = pytest.mark.skipif(not has_kernel("to_channels_last", "CPU"),
                                reason="needs the C++ extension's CPU kernels")
op = torch.ops.resnet_fast.to_channels_last
CL = torch.channels_last

SHAPES = [(1, 256, 32, 32),  # whole 16-channel blocks, H*W a power of two
          (2, 37, 9, 70),    # a partial channel block (37 = 2 x 16 + 5)
          (3, 16, 65, 65),   # 4225 pixels: past one task's run of 4096
          (1, 3, 5, 4), (2, 1, 3, 3), (0, 8, 4, 4), (2, 8, 0, 3)]


def _values(shape, dtype):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point and not dtype.is_complex:
        return torch.randint(-100, 100, shape, generator=g).to(dtype)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16,
                                   torch.uint8, torch.int64, torch.bool, torch.complex64,
                                   torch.complex128])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_bit_for_bit(dtype, shape):
    x = _values(shape, dtype)
    want = x.contiguous(memory_format=CL)
    for got in (op(x), dense_in(x, CL)):
        assert got.is_contiguous(memory_format=CL) and got.dtype == dtype
        assert got.shape == x.shape and torch.equal(got, want)


def test_nan_bits_move_unchanged():
    x = torch.randn(1, 32, 16, 16)
    x[0, 3, 2, 5] = float("nan")
    x.view(torch.int32)[0, 7, 1, 1] = 0x7FC00123  # a NaN with a payload
    got = op(x)
    assert torch.equal(got.view(torch.int32), x.contiguous(memory_format=CL).view(torch.int32))


@pytest.mark.parametrize("make", [
    lambda x: x.contiguous(memory_format=CL),       # already channels_last: still a copy
    lambda x: x[:, ::2],                            # strided view
    lambda x: x.permute(0, 1, 3, 2),                # another permutation
])
def test_other_layouts_are_copied_by_torch(make):
    x = make(torch.randn(2, 32, 6, 5))
    got = op(x)
    assert torch.equal(got, x.contiguous(memory_format=CL))
    assert got.is_contiguous(memory_format=CL) and got.data_ptr() != x.data_ptr()


def test_dense_in_returns_a_dense_tensor_itself():
    x = torch.randn(2, 32, 6, 5)
    assert dense_in(x, torch.contiguous_format) is x
    cl = x.contiguous(memory_format=CL)
    assert dense_in(cl, CL) is cl
    got = dense_in(cl, torch.contiguous_format)  # the other way: torch's copy
    assert got.is_contiguous() and torch.equal(got, x)


@pytest.mark.skipif(not winograd_k_block(), reason="our Winograd kernels need AVX2 or AVX-512")
def test_cpu_ops_take_nchw_inputs_through_the_fast_copy():
    """An NCHW x (and residual) handed to a CPU op that computes in channels_last (here our
    Winograd conv) is made channels_last by the C++ dense_in, whose fast path is the same
    transpose: the result equals the op's on channels_last inputs bit for bit (a wrong
    transpose would permute the values) and torch's conv in float64 within float32's
    rounding."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 48, 9, 11, generator=g)
    w = torch.randn(32, 48, 3, 3, generator=g)
    b = torch.randn(32, generator=g)
    res = torch.randn(2, 32, 9, 11, generator=g)
    conv = torch.ops.resnet_fast.conv_bias_act_winograd.default
    packed = torch.ops.resnet_fast.winograd_prepack.default(w, 2)
    got = conv(x, w, packed, b, [1, 1], res, True)
    want = conv(x.contiguous(memory_format=CL), w, packed, b, [1, 1],
                res.contiguous(memory_format=CL), True)
    assert got.is_contiguous() and torch.equal(got, want)
    ref = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1)
                     + res.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_opcheck_and_gradient():
    x = torch.randn(2, 20, 5, 6)
    torch.library.opcheck(op, (x,))
    xd = torch.randn(2, 20, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op, (xd,))
    g = torch.randn(2, 20, 5, 6, dtype=torch.float64)
    (got,) = torch.autograd.grad(dense_in(xd, CL), xd, g)
    assert torch.equal(got, g)


def test_compiles_with_inductor():
    x = torch.randn(1, 32, 8, 8)
    got = torch.compile(lambda t: op(t) * 2, backend="inductor", fullgraph=True)(x)
    assert torch.equal(got, x.contiguous(memory_format=CL) * 2)
    assert got.is_contiguous(memory_format=CL)


def test_compiles_with_dynamic_shapes_and_freezing():
    """dense_in's op compiled with dynamic=True (its fake kernel's output shape and layout
    symbolic) over three shapes, and under inductor's freezing, where it runs on a frozen
    parameter: the values and the layout as torch's copy, each call."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    fn = torch.compile(lambda t: dense_in(t, CL) + 1, backend="inductor", dynamic=True,
                       fullgraph=True)
    for shape in [(1, 32, 8, 8), (3, 20, 5, 7), (2, 17, 9, 4)]:
        x = torch.randn(shape)
        got = fn(x)
        assert torch.equal(got, x.contiguous(memory_format=CL) + 1)
        assert got.is_contiguous(memory_format=CL)

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(2, 8, 6, 6), requires_grad=False)

        def forward(self, x):
            return dense_in(self.w, CL) * x

    torch._dynamo.reset()
    module = Scaled().eval()
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)
    with inductor_config.patch(freezing=True), torch.no_grad():
        got = torch.compile(module, backend="inductor", fullgraph=True)(x)
    assert torch.equal(got, module.w.contiguous(memory_format=CL) * x)


def test_wrong_rank_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected a 4-D strided tensor \(N, C, H, W\), got 3-D"):
        op(torch.randn(4, 5, 6))
