"""batch_norm_act (training BN fused with add + ReLU) against nn.BatchNorm2d -> add -> ReLU:
outputs, running statistics, num_batches_tracked and gradients, on every CPU backend (Triton in
its interpreter), both layouts, odd sizes; float64 gradcheck; reduced precision under the
tolerance rule; opcheck of every registered variant; the models' ``bn_act`` on plain
nn.BatchNorm2d modules. The CUDA kernels are checked in the gpu tier,
tests/test_gpu_native_ops.py."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from _numerics import assert_within_reference_error

import resnet_fast
from resnet_fast.models.norm import bn_act
from resnet_fast.ops import batch_norm_act

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["reference", "cpu"] + (["triton"] if INTERPRET else [])


def _inputs(shape, dtype=torch.float32, channels_last=False, seed=0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + mean).to(dtype)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last and len(shape) == 4:
        x, r = x.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    return x, r


def _bn(c, affine=True, track=True, momentum=0.1, seed=1, dtype=torch.float32):
    bn = torch.nn.BatchNorm2d(c, affine=affine, track_running_stats=track, momentum=momentum)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if affine:
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g))
        if track:
            bn.running_mean.copy_(torch.randn(c, generator=g))
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn.to(dtype)


def _eager(bn, x, r, relu):
    out = bn(x)
    if r is not None:
        out = out + r
    return torch.relu(out) if relu else out


def _ours(bn, x, r, relu, backend):
    act = copy.deepcopy(bn)
    return act, bn_act(act, x, r, relu, backend=backend)


def _compare(backend, shape, channels_last, residual, relu, affine=True, track=True,
             momentum=0.1, training=True, mean=0.0, steps=2):
    bn = _bn(shape[1], affine, track, momentum).train(training)
    ref_bn = copy.deepcopy(bn)
    ours_bn = None
    for step in range(steps):
        x, r = _inputs(shape, channels_last=channels_last, seed=step, mean=mean)
        x1, r1 = x.clone().requires_grad_(), r.clone().requires_grad_()
        x2, r2 = x.clone().requires_grad_(), r.clone().requires_grad_()
        expect = _eager(ref_bn, x1, r1 if residual else None, relu)
        if ours_bn is None:
            ours_bn, got = _ours(bn, x2, r2 if residual else None, relu, backend)
        else:
            got = bn_act(ours_bn, x2, r2 if residual else None, relu, backend=backend)
        assert got.shape == expect.shape and got.dtype == expect.dtype
        if channels_last and len(shape) == 4:
            assert got.is_contiguous(memory_format=torch.channels_last)
        if mean:
            # |mean| >> std: x itself carries fp32 rounding of the mean's size; judge both
            # against a float64 truth (docs/design.md, Tolerances) instead of against each other.
            bn64 = copy.deepcopy(ref_bn).double()
            truth = _eager(bn64.train(training), x.double(), r.double() if residual else None, relu)
            assert_within_reference_error(got.detach(), expect.detach(), truth.detach())
            return
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
        g = torch.randn(shape, generator=torch.Generator().manual_seed(100 + step), dtype=x.dtype)
        expect.backward(g)
        got.backward(g)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
        if residual:
            torch.testing.assert_close(r2.grad, r1.grad, rtol=1e-5, atol=1e-6)
        else:
            assert r2.grad is None
        if affine:
            torch.testing.assert_close(ours_bn.weight.grad, ref_bn.weight.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours_bn.bias.grad, ref_bn.bias.grad, rtol=1e-4, atol=1e-4)
            ours_bn.weight.grad = ours_bn.bias.grad = ref_bn.weight.grad = ref_bn.bias.grad = None
        if track:
            torch.testing.assert_close(ours_bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours_bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)
            assert ours_bn.num_batches_tracked.item() == ref_bn.num_batches_tracked.item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, channels_last", [((4, 8, 5, 6), False), ((4, 8, 5, 6), True),
                                                  ((3, 37, 13, 19), False), ((3, 37, 13, 19), True)])
@pytest.mark.parametrize("residual, relu", [(True, True), (False, True), (False, False)])
def test_matches_batchnorm_add_relu(backend, shape, channels_last, residual, relu):
    _compare(backend, shape, channels_last, residual, relu)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["momentum_none", "no_affine", "no_running_stats", "eval",
                                     "large_mean", "batch_of_one_image", "2d_input"])
def test_module_semantics(backend, variant):
    shape, kw = (3, 6, 7, 5), {}
    if variant == "momentum_none":
        kw = dict(momentum=None, steps=3)  # cumulative average over num_batches_tracked
    elif variant == "no_affine":
        kw = dict(affine=False)
    elif variant == "no_running_stats":
        kw = dict(track=False)
    elif variant == "eval":
        kw = dict(training=False)
    elif variant == "large_mean":
        kw = dict(mean=1000.0)  # shifted sums: the variance must not cancel away
    elif variant == "batch_of_one_image":
        shape = (1, 6, 7, 5)  # one sample but many values per channel: allowed
    elif variant == "2d_input":
        shape = (9, 6)
    if len(shape) == 2:
        bn = torch.nn.BatchNorm1d(6)
        x, r = _inputs(shape)
        act = torch.nn.BatchNorm2d(6)
        out = batch_norm_act(x, act.weight, act.bias, act.running_mean, act.running_var, True, 0.1,
                             1e-5, r, True, act.num_batches_tracked, backend=backend)
        torch.testing.assert_close(out, torch.relu(bn(x) + r), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(act.running_var, bn.running_var)
        return
    _compare(backend, shape, True, True, True, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_value_per_channel_raises_like_torch(backend):
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch.nn.BatchNorm2d(4)(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn_act(torch.nn.BatchNorm2d(4), x, backend=backend)
    # In eval mode the running statistics are used: allowed, as in torch.
    out = bn_act(torch.nn.BatchNorm2d(4).eval(), x, backend=backend)
    torch.testing.assert_close(out, torch.relu(torch.nn.BatchNorm2d(4).eval()(x)))


def test_bad_inputs_are_refused():
    x = torch.randn(2, 4, 3, 3)
    w, b = torch.ones(4), torch.zeros(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match=r"expected weight of shape \(4,\) .*got \(3,\)"):
        batch_norm_act(x, torch.ones(3), b, rm, rv, True, 0.1, 1e-5)
    with pytest.raises(TypeError, match=r"expected bias in x's dtype \(torch.float32\) or float32, got torch.float64"):
        batch_norm_act(x, w, b.double(), rm, rv, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"same shape as x \(2, 4, 3, 3\), got \(1, 4, 3, 3\)"):
        batch_norm_act(x, w, b, rm, rv, True, 0.1, 1e-5, residual=x[:1])
    with pytest.raises(ValueError, match="running_mean and running_var both or neither"):
        batch_norm_act(x, w, b, rm, None, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        batch_norm_act(x, w, b, rm, rv, True, None, 1e-5)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16 tensor for x, got torch.int64"):
        batch_norm_act(x.long(), w, b, rm, rv, True, 0.1, 1e-5)
    # The native op refuses on its own too.
    with pytest.raises(ValueError, match=r"expected weight of shape \(4,\)"):
        torch.ops.resnet_fast.bn_act_fwd(x, torch.ones(3), b, None, True, 1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64(backend, channels_last):
    x, r = _inputs((3, 4, 3, 5), torch.float64, channels_last)
    w = torch.rand(4, dtype=torch.float64) + 0.5
    b = torch.randn(4, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, w, b, r)]

    def f(x, w, b, r):
        return batch_norm_act(x, w, b, None, None, True, 0.1, 1e-5, r, True, backend=backend)
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if INTERPRET else []))
def test_reduced_precision_within_the_tolerance_rule(dtype, backend):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bfloat16 is not trustworthy "
                    "(docs/design.md, Tolerances)")
    x, r = _inputs((4, 16, 6, 6), dtype, channels_last=True)
    w, b = torch.rand(16) + 0.5, torch.randn(16)  # float32 parameters, as under autocast
    out = batch_norm_act(x, w, b, None, None, True, 0.1, 1e-5, r, True, backend=backend)
    ref = torch.relu(F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5) + r)
    truth = torch.relu(F.batch_norm(x.double(), None, None, w.double(), b.double(), True, 0.1,
                                    1e-5) + r.double())
    assert out.dtype == dtype
    assert_within_reference_error(out, ref, truth)


def _opcheck_args(channels_last=True):
    x, r = _inputs((3, 5, 4, 3), channels_last=channels_last)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    return x, w, b, r


@pytest.mark.parametrize("suffix", [""] + (["_triton"] if INTERPRET else []))
@pytest.mark.parametrize("residual", [True, False])
def test_opcheck(suffix, residual):
    x, w, b, r = _opcheck_args()
    fwd = getattr(torch.ops.resnet_fast, "bn_act_fwd" + suffix)
    bwd = getattr(torch.ops.resnet_fast, "bn_act_bwd" + suffix)
    torch.library.opcheck(fwd, (x.requires_grad_(), w.requires_grad_(), b, r if residual else None,
                                True, 1e-5))
    out, mean, var = fwd(x.detach(), w.detach(), b, r if residual else None, True, 1e-5)
    torch.library.opcheck(bwd, (torch.randn_like(out), x.detach(), out, w.detach(), mean, var,
                                1e-5, True, residual))


def test_opcheck_of_the_whole_op():
    x, w, b, r = _opcheck_args(channels_last=False)
    rm, rv, nbt = torch.zeros(5), torch.ones(5), torch.tensor(0)
    torch.library.opcheck(torch.ops.resnet_fast.batch_norm_act,
                          (x, w, b, rm, rv, True, 0.1, 1e-5, r, True, nbt))
    # Called as a registered op it updates the running statistics in place.
    rm, rv, nbt = torch.zeros(5), torch.ones(5), torch.tensor(0)
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    out = torch.ops.resnet_fast.batch_norm_act(x, w, b, rm, rv, True, 0.1, 1e-5, r, True, nbt)
    torch.testing.assert_close(out, torch.relu(bn(x) + r), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv, bn.running_var)
    assert nbt.item() == 1


def test_models_use_torchvisions_batchnorm2d():
    model = resnet_fast.resnet18().train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 20 and all(type(m) is torch.nn.BatchNorm2d for m in norms)
    assert all(b._fused_train() for b in model.modules() if hasattr(b, "_fused_train"))
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in sync.modules()) == 20
    # SyncBatchNorm must reduce across processes: the blocks run the unfused math.
    assert not any(b._fused_train() for b in sync.modules() if hasattr(b, "_fused_train"))


def test_autocast_promotes_mixed_inputs_like_eager():
    x, r = _inputs((2, 4, 3, 3))
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = batch_norm_act(x.bfloat16(), w, b, None, None, True, 0.1, 1e-5, r, True, backend="cpu")
        ref = torch.relu(F.batch_norm(x.bfloat16(), None, None, w, b, True, 0.1, 1e-5) + r)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_relu_passes_the_gradient_of_a_nan_output_as_torch(backend, channels_last):
    """A NaN in the residual makes that output NaN; torch.relu's backward (threshold_backward:
    zero only where the output is <= 0) passes that element's gradient, so ours does too, to
    the residual and through the BN (float32, and the float32 vector path with 16 channels)."""
    x, r = _inputs((2, 16, 5, 5), channels_last=channels_last, seed=3)
    r[1, 7, 2, 3] = float("nan")
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    bn = _bn(16)
    results = []
    for run in ("eager", "ours"):
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        out = (_eager(copy.deepcopy(bn), xi, ri, True) if run == "eager"
               else _ours(bn, xi, ri, True, backend)[1])
        out.backward(grad)
        results.append((out.detach(), ri.grad, xi.grad))
    (want_out, want_dr, want_dx), (out, dr, dx) = results
    assert torch.isnan(out[1, 7, 2, 3]) and torch.isnan(out).sum() == 1
    assert dr[1, 7, 2, 3] == grad[1, 7, 2, 3] != 0
    torch.testing.assert_close(dr, want_dr, rtol=0, atol=0)
    # the NaN reaches the BN's input gradient alike (its statistics saw no NaN: x has none)
    assert torch.equal(torch.isnan(dx), torch.isnan(want_dx))
    torch.testing.assert_close(dx, want_dx, equal_nan=True, rtol=1e-4, atol=1e-5)
