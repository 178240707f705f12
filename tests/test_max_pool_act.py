"""max_pool_act on CPU (act(max_pool2d(x))) against torch's max_pool2d (+ relu): the same
values bit for bit in every floating dtype and layout, NaN where torch puts it; opcheck, fp64
gradcheck, clear errors; and the models' programs, which pool the stem's output with it (the
stem's ReLU behind it) with gradients off, and with the module otherwise."""

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import resnet_fast
from resnet_fast._extension import has_kernel
from resnet_fast.calibrate import calibrate_

pytestmark = pytest.mark.skipif(not has_kernel("max_pool_act", "CPU"),
                                reason="needs the C++ extension's CPU kernels")
op = torch.ops.resnet_fast.max_pool_act

GEOMETRIES = [  # (N, C, H, W), kernel_size, stride, padding
    ((2, 64, 16, 15), (3, 3), (2, 2), (1, 1)),  # the stem's maxpool
    ((1, 19, 9, 8), (3, 3), (2, 2), (1, 1)),
    ((1, 3, 7, 7), (2, 2), (2, 2), (0, 0)),
    ((3, 33, 6, 5), (3, 2), (1, 2), (1, 0)),
]


def _torch(x, k, s, p, relu):
    y = F.max_pool2d(x, k, s, p)
    return y.relu() if relu else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("relu,channels_last", list(itertools.product([False, True], [False, True])))
def test_matches_torch_exactly(dtype, geometry, relu, channels_last):
    shape, k, s, p = geometry
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
    x[0, 1, 2, 3] = float("nan")
    x[-1, -1, 0, 0] = float("inf")
    x[0, 0, 1, 1] = float("-inf")
    x[-1, 0] = -x[-1, 0].abs()  # a plane of negatives,
    x[-1, 0, :2, :2] = -0.0  # with -0.0 where windows start: torch's relu keeps it
    out = op(x, list(k), list(s), list(p), relu)
    want = _torch(x, k, s, p, relu)
    assert out.dtype == dtype and out.shape == want.shape
    assert out.is_contiguous(memory_format=fmt)
    assert torch.isnan(want).any() and (want == 0).any()  # the case is what it says
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    real = ~torch.isnan(want)
    assert torch.equal(torch.signbit(out[real]), torch.signbit(want[real]))  # each zero's sign


def test_opcheck_and_gradcheck():
    x = torch.randn(2, 5, 7, 6).contiguous(memory_format=torch.channels_last)
    for relu in (False, True):
        torch.library.opcheck(op, (x, [3, 3], [2, 2], [1, 1], relu))
        # distinct values: no ties, so the gradient is defined everywhere
        xd = torch.randperm(2 * 5 * 7 * 6, dtype=torch.float64).view(2, 5, 7, 6) / 50 - 4
        xd.requires_grad_()
        assert torch.autograd.gradcheck(lambda t, r=relu: op(t, [3, 3], [2, 2], [1, 1], r), (xd,))
        out = op(xd, [3, 3], [2, 2], [1, 1], relu)
        (got,) = torch.autograd.grad(out.sum(), xd)
        (want,) = torch.autograd.grad(_torch(xd, 3, 2, 1, relu).sum(), xd)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_empty_batch():
    out = op(torch.randn(0, 4, 8, 8), [3, 3], [2, 2], [1, 1], True)
    assert out.shape == (0, 4, 4, 4)


def test_bad_arguments_say_what_was_expected():
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = torch.randn(1, 4, 8, 8)
    cases = [
        ((torch.randn(4, 8, 8), [3, 3], [2, 2], [1, 1]), ValueError, r"\(N, C, H, W\)"),
        ((x, [3, 3], [2, 2], [2, 2]), ValueError, "padding <= kernel_size / 2"),
        ((x, [3, 3], [0, 2], [1, 1]), ValueError, "stride > 0"),
        ((torch.randn(1, 4, 2, 8), [5, 5], [1, 1], [1, 1]), ValueError, "at least the window"),
        ((x.int(), [3, 3], [2, 2], [1, 1]), TypeError, "float32"),
        ((torch.randn(4, 8, 8).int(), [3, 3], [2, 2], [1, 1]), TypeError, "float32"),
        ((x, [3], [2, 2], [1, 1]), ValueError, "2 values each"),
    ]
    for args, error, words in cases:
        with pytest.raises(error, match=words):
            op(*args)
        with FakeTensorMode() as mode, pytest.raises(error, match=words):
            op(mode.from_tensor(args[0]), *args[1:])


def _ops_run(model, x, grad):
    with torch.set_grad_enabled(grad), torch.profiler.profile(record_shapes=True) as prof:
        out = model(x)
    return out, [(e.name, e.input_shapes) for e in prof.events()]


def test_the_program_pools_with_it_and_moves_the_stems_relu_behind_it():
    torch.manual_seed(0)
    tv = calibrate_(torchvision.models.resnet18(num_classes=10), batch_size=4, image_size=64)
    ours = resnet_fast.resnet18(num_classes=10)
    ours.load_state_dict(tv.state_dict())
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    x[0, :, 10:14, 20:24] = float("nan")  # NaN through the stem and the pool, as torchvision
    out, ops = _ops_run(ours, x, grad=False)
    names = [n for n, _ in ops]
    assert "resnet_fast::max_pool_act" in names and "aten::max_pool2d_with_indices" not in names
    stem_out = [2, 64, 32, 32]
    assert not any(n in ("aten::relu_", "aten::clamp_min_") and shapes[:1] == [stem_out]
                   for n, shapes in ops)  # no ReLU pass over the stem's output
    with torch.no_grad():
        want = tv.eval()(x)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4, equal_nan=True)
    # Gradients on: the module (torch's maxpool and its backward); the same values.
    grad_out, ops = _ops_run(ours, x, grad=True)
    names = [n for n, _ in ops]
    assert "resnet_fast::max_pool_act" not in names and "aten::max_pool2d_with_indices" in names
    torch.testing.assert_close(grad_out, out, rtol=1e-5, atol=1e-5, equal_nan=True)
    # A pool the op does not compute exactly (ceil_mode) runs as itself.
    ours.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    _, ops = _ops_run(ours, x, grad=False)
    assert "resnet_fast::max_pool_act" not in [n for n, _ in ops]
