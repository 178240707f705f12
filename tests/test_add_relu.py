"""add_relu: the extension's op (CPU here; CUDA in the gpu tier) against the reference."""

import os

import pytest
import torch

import resnet_fast
from resnet_fast import BackendUnavailableError, _extension
from resnet_fast.ops import add_relu, reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# One deliberately odd shape (nothing a multiple of a vector width), one ResNet-like shape,
# one 2-D and one 0-d tensor.
SHAPES = [(3, 37, 13, 19), (2, 64, 8, 8), (5, 7), ()]
LAYOUTS = [(shape, cl) for shape in SHAPES for cl in (False, True) if not cl or len(shape) == 4]


def test_extension_is_built():
    # `make test` builds the extension first; a missing build is a failure, not a skip.
    status = resnet_fast.available_backends()["cpu"]
    assert status.available, status.detail
    assert _extension.has_kernel("add_relu", "CPU")


@pytest.mark.skipif(os.environ.get("RESNET_FAST_REQUIRE_CUDA_BUILD") != "1",
                    reason="set RESNET_FAST_REQUIRE_CUDA_BUILD=1 where a CUDA toolkit is present "
                           "(make test does) to require the CUDA kernels to have compiled")
def test_cuda_kernels_compiled():
    assert _extension.has_kernel("add_relu", "CUDA")


def _inputs(shape, dtype, device="cpu", channels_last=False):
    # Drawn on the device itself: fp64 randn of a 51M-element GPU case on the host took 4 s.
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, device=device).to(dtype)
    r = torch.randn(shape, generator=g, dtype=torch.float64, device=device).to(dtype)
    if channels_last:
        x, r = x.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    return x, r


def _check_exact(backend, device, shape, dtype, channels_last):
    x, r = _inputs(shape, dtype, device, channels_last)
    x0, r0 = x.clone(), r.clone()
    out = add_relu(x, r, backend=backend)
    # Same math as eager (float accumulation, one rounding): bit-exact in every dtype.
    assert torch.equal(out, reference.add_relu(x, r))
    assert out.dtype == x.dtype and out.stride() == x.stride()
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, channels_last", LAYOUTS)
def test_cpu_matches_reference_bit_exactly(shape, dtype, channels_last):
    _check_exact("cpu", "cpu", shape, dtype, channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, channels_last",
                         LAYOUTS + [((64, 256, 56, 56), False), ((64, 256, 56, 56), True)])
def test_gpu_matches_reference_bit_exactly(backend, shape, dtype, channels_last):
    _check_exact(backend, "cuda", shape, dtype, channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_int64_indexing(backend):
    # 2^31 + 17 half elements: offsets past int32 must not wrap.
    n = 2**31 + 17
    x = torch.full((n,), -1.0, dtype=torch.float16, device="cuda")
    x[-5:] = 2.0
    r = torch.ones(n, dtype=torch.float16, device="cuda")
    out = add_relu(x, r, backend=backend)
    assert out[-5:].eq(3.0).all() and out[-6].item() == 0.0 and out[:1000].eq(0).all()
    del out
    s, b = torch.ones(1, device="cuda"), torch.zeros(1, device="cuda")
    out = resnet_fast.ops.scale_shift_act(x.view(1, 1, n), s, b, r.view(1, 1, n), True,
                                          backend=backend)
    assert out[0, 0, -5:].eq(3.0).all() and out[0, 0, -6].item() == 0.0


def test_non_contiguous_and_mixed_layouts():
    x, r = _inputs((4, 6, 10, 12), torch.float32)
    xs = x[:, ::2, :, 1:]  # a strided view
    rs = r[:, ::2, :, 1:].contiguous(memory_format=torch.channels_last)
    out = add_relu(xs, rs, backend="cpu")
    assert torch.equal(out, torch.relu(xs + rs))
    xl = x.contiguous(memory_format=torch.channels_last)
    out = add_relu(xl, r, backend="cpu")  # residual in the other layout
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, torch.relu(x + r))


def test_nan_inf_and_zero_size():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -1.0, 0.0, float("nan")] * 5)
    r = torch.tensor([1.0, 1.0, 1.0, float("nan"), 0.5, -0.0, float("inf")] * 5)
    out = add_relu(x, r, backend="cpu")
    torch.testing.assert_close(out, torch.relu(x + r), equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(out).sum() == torch.isnan(x + r).sum()
    empty = torch.empty(0, 3, 4, 4)
    assert add_relu(empty, empty, backend="cpu").shape == (0, 3, 4, 4)


def test_backward_passes_the_gradient_of_a_nan_output_as_torch():
    """torch.relu's backward zeroes the gradient only where the output is <= 0, so a NaN
    output (from a NaN or an inf - inf input) passes its gradient; the op's backward alike."""
    x = torch.tensor([float("nan"), float("inf"), 1.0, -1.0, 0.0, 2.0] * 3)
    r = torch.tensor([1.0, -float("inf"), -2.0, 0.5, -0.0, -1.0] * 3)
    grad = torch.arange(1.0, 19.0)
    grads = []
    for f in (lambda a, b: torch.relu(a + b), lambda a, b: add_relu(a, b, backend="cpu")):
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        f(xi, ri).backward(grad)
        grads.append((xi.grad, ri.grad))
    (want_x, want_r), (got_x, got_r) = grads
    assert want_x[0] == grad[0] and want_x[1] == grad[1]  # NaN outputs pass it in torch
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=0)
    torch.testing.assert_close(got_r, want_r, rtol=0, atol=0)


def test_bad_inputs_are_refused():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"same shape as x \(2, 3, 4, 4\), got \(1, 3, 4, 4\) \(no broadcasting\)"):
        add_relu(x, x[:1])
    with pytest.raises(TypeError, match=r"same dtype as x \(torch.float32\), got torch.float16"):
        add_relu(x, x.half())
    with pytest.raises(TypeError, match=r"float32, float64, float16 or bfloat16 tensor for x, got torch.int64"):
        add_relu(x.long(), x.long())
    with pytest.raises(TypeError, match=r"expected residual to be a torch.Tensor, got float"):
        add_relu(x, 1.0)
    # The native op refuses the same inputs on its own.
    with pytest.raises(ValueError, match=r"same shape as x"):
        torch.ops.resnet_fast.add_relu(x, x[:1])


def test_backend_choice():
    x, r = _inputs((2, 3, 4, 4), torch.float32)
    with pytest.raises(BackendUnavailableError, match=r"'cuda' cannot run add_relu on cpu tensors"):
        add_relu(x, r, backend="cuda")
    with pytest.raises(ValueError, match=r"'fast' is not a backend"):
        add_relu(x, r, backend="fast")
    assert torch.equal(add_relu(x, r, backend="reference"), torch.relu(x + r))
    status = resnet_fast.available_backends()
    assert set(status) == {"reference", "cpu", "cuda", "triton"}
    for name, st in status.items():
        assert st.detail, f"{name} gives no reason"


def test_backend_from_environment(monkeypatch):
    x, r = _inputs((2, 3, 4, 4), torch.float32)
    monkeypatch.setenv("RESNET_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match=r"'cuda' cannot run add_relu on cpu"):
        add_relu(x, r)
    monkeypatch.setenv("RESNET_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"\$RESNET_FAST_BACKEND='nonsense' is not a backend"):
        add_relu(x, r)
    monkeypatch.setenv("RESNET_FAST_BACKEND", "reference")
    assert torch.equal(add_relu(x, r), torch.relu(x + r))


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    x, r = _inputs((2, 5, 3, 7), torch.float32, channels_last=channels_last)
    torch.library.opcheck(torch.ops.resnet_fast.add_relu, (x, r))
    torch.library.opcheck(torch.ops.resnet_fast.add_relu,
                          (x.clone().requires_grad_(), r.clone().requires_grad_()))


def test_gradcheck_float64():
    x, r = _inputs((2, 3, 5, 4), torch.float64)
    x.requires_grad_()
    r.requires_grad_()
    assert torch.autograd.gradcheck(torch.ops.resnet_fast.add_relu, (x, r))


def test_compiles_with_fullgraph():
    x, r = _inputs((2, 3, 5, 4), torch.float32)
    fn = torch.compile(lambda a, b: torch.ops.resnet_fast.add_relu(a, b) * 2, fullgraph=True,
                       backend="eager")
    assert torch.equal(fn(x, r), torch.relu(x + r) * 2)
