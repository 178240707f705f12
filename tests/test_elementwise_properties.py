"""Property-based: for any small shape, layout (NCHW, channels_last, strided views), dtype,
residual and relu choice, the C++ CPU kernels agree with the reference (add_relu bit for bit,
scale_shift_act per the tolerance rule) and keep the input's memory format."""

import torch
from _numerics import assert_within_reference_error, scale_shift_magnitude
from hypothesis import given, settings
from hypothesis import strategies as st

from resnet_fast.kernels.layout import layout_of
from resnet_fast.ops import add_relu, reference, scale_shift_act

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=4, max_size=4)))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["nchw", "channels_last", "sliced", "transposed"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)

    def one():
        base_shape = shape if layout != "sliced" else (shape[0], shape[1], shape[2] * 2 + 1, shape[3])
        t = torch.randn(base_shape, generator=g, dtype=torch.float64).to(dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        elif layout == "sliced":
            t = t[:, :, 1::2, :]
        elif layout == "transposed":
            t = t.transpose(2, 3).contiguous().transpose(2, 3)
        return t

    x, r = one(), one()
    param_dtype = draw(st.sampled_from([dtype, torch.float32]))
    scale = torch.randn(shape[1], generator=g, dtype=torch.float64).to(param_dtype)
    shift = torch.randn(shape[1], generator=g, dtype=torch.float64).to(param_dtype)
    return x, r, scale, shift


@settings(max_examples=80, deadline=None)
@given(tensors())
def test_add_relu_property(inputs):
    x, r, _, _ = inputs
    out = add_relu(x, r, backend="cpu")
    assert torch.equal(out, reference.add_relu(x, r))
    assert out.is_contiguous(memory_format=layout_of(x))


@settings(max_examples=80, deadline=None)
@given(tensors(), st.booleans(), st.booleans())
def test_scale_shift_act_property(inputs, with_residual, relu):
    x, r, scale, shift = inputs
    res = r if with_residual else None
    out = scale_shift_act(x, scale, shift, res, relu, backend="cpu")
    ref = reference.scale_shift_act(x, scale, shift, res, relu)
    truth = reference.scale_shift_act(x.double(), scale.double(), shift.double(),
                                      None if res is None else res.double(), relu)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=layout_of(x))
    assert_within_reference_error(out, ref, truth, scale_shift_magnitude(x, scale, shift, res))
