"""The Triton elementwise kernels. Without a GPU they run on CPU tensors in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1): small shapes, float32/float16 only
(the interpreter's bfloat16 is not trustworthy). With a GPU, the gpu-tier tests in
test_add_relu.py / test_scale_shift_act.py run them on CUDA instead."""

import os

import pytest
import torch
from _numerics import assert_within_reference_error
from test_scale_shift_act import check_against_reference, make_inputs

import resnet_fast
from resnet_fast.ops import add_relu, reference, scale_shift_act

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton on CPU tensors needs its interpreter (a GPU is visible: the gpu tier covers Triton)")

SHAPES = [(3, 37, 13, 19), (2, 64, 4, 4), (2, 3, 11)]
LAYOUTS = [(shape, cl) for shape in SHAPES for cl in (False, True) if not cl or len(shape) == 4]


def test_backend_is_available_under_the_interpreter():
    status = resnet_fast.available_backends()["triton"]
    assert status.available and "interpreter" in status.detail


@pytest.mark.parametrize("shape, channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_relu(shape, channels_last, dtype):
    x, _, _, r = make_inputs(shape, dtype, channels_last=channels_last)
    out = add_relu(x, r, backend="triton")
    ref = reference.add_relu(x, r)
    assert out.stride() == x.stride()
    if dtype == torch.float32:
        assert torch.equal(out, ref)  # one fp32 add, then relu: the same bits as torch
    else:
        assert_within_reference_error(out, ref, reference.add_relu(x.double(), r.double()))


@pytest.mark.parametrize("shape, channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual, relu", [(True, True), (False, True), (True, False)])
def test_scale_shift_act(shape, channels_last, dtype, residual, relu):
    x, s, b, r = make_inputs(shape, dtype, channels_last=channels_last,
                             param_dtype=torch.float32)
    check_against_reference("triton", x, s, b, r if residual else None, relu)


def test_nan_propagates_and_zero_size():
    x = torch.tensor([float("nan"), -1.0, 2.0, float("inf")]).view(1, 4, 1, 1)
    r = torch.tensor([0.0, float("nan"), -3.0, 1.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(add_relu(x, r, backend="triton"), torch.relu(x + r),
                               equal_nan=True, rtol=0, atol=0)
    ones, zeros = torch.ones(4), torch.zeros(4)
    torch.testing.assert_close(scale_shift_act(x, ones, zeros, r, True, backend="triton"),
                               torch.relu(x + r), equal_nan=True, rtol=0, atol=0)
    empty = torch.empty(0, 4, 2, 2)
    assert add_relu(empty, empty, backend="triton").shape == empty.shape
    assert scale_shift_act(empty, ones, zeros, None, True, backend="triton").shape == empty.shape


def test_float64_is_refused_with_the_alternative():
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"triton.*expected float32, float16 or bfloat16, got torch.float64"):
        add_relu(x, x, backend="triton")


def test_opcheck():
    x, s, b, r = make_inputs((2, 5, 3, 7), torch.float32, channels_last=True)
    torch.library.opcheck(torch.ops.resnet_fast.add_relu_triton, (x, r))
    torch.library.opcheck(torch.ops.resnet_fast.scale_shift_act_triton, (x, s, b, r, True))
    torch.library.opcheck(torch.ops.resnet_fast.scale_shift_act_triton,
                          (x.clone().requires_grad_(), s.clone().requires_grad_(), b, None, False))
