"""Inputs and uses at the edges of what the fused training BN must get right, each against
plain PyTorch / torchvision: a gradient penalty (double backward) through batch_norm_act, an
empty batch in training mode, a float64 model under CPU bfloat16 autocast."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import resnet_fast
from resnet_fast.models.norm import bn_act
from resnet_fast.ops import batch_norm_act

BACKENDS = ["reference", "cpu"]


def _penalty_grads(forward, inputs, probe):
    """d/d inputs of ||d loss/d inputs||^2, with loss = sum(sin(out) * probe): the grad of the
    loss depends on the output itself, so the second backward goes through both the output's
    and the first backward's dependence on the inputs."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = forward(*inputs)
    grads = torch.autograd.grad((torch.sin(out) * probe).sum(), inputs, create_graph=True)
    penalty = sum((g ** 2).sum() for g in grads)
    return out, torch.autograd.grad(penalty, inputs, materialize_grads=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual, relu", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradient_penalty_through_batch_norm_act_matches_batchnorm2d(backend, residual, relu,
                                                                     channels_last):
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 5, 6)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last:
        x, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
    probe = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(4, generator=g, dtype=torch.float64)
    stats = {name: (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
             for name in ("eager", "ours")}

    def eager(x, w, b, r=None):
        out = F.batch_norm(x, *stats["eager"], w, b, True, 0.1, 1e-5)
        out = out if r is None else out + r
        return torch.relu(out) if relu else out

    def ours(x, w, b, r=None):
        return batch_norm_act(x, w, b, *stats["ours"], True, 0.1, 1e-5, r, relu, backend=backend)

    inputs = (x, w, b, r) if residual else (x, w, b)
    expect_out, expect = _penalty_grads(eager, inputs, probe)
    got_out, got = _penalty_grads(ours, inputs, probe)
    torch.testing.assert_close(got_out, expect_out, rtol=1e-10, atol=1e-12)
    for name, a, e in zip(("x", "weight", "bias", "residual"), got, expect):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11, msg=f"d penalty / d {name}")
    # Not vacuous: the second backward reaches x and the parameters.
    assert all(e.abs().max() > 1e-3 for e in expect[:3])
    for ours_stat, eager_stat in zip(stats["ours"], stats["eager"]):
        torch.testing.assert_close(ours_stat, eager_stat, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_empty_batch_in_training_matches_torchvision(arch):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)().train()
    ours = getattr(resnet_fast, arch)().train()
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(0, 3, 32, 32)
    expected, got = tv(x), ours(x)
    assert got.shape == expected.shape == (0, 1000)
    expected_state, got_state = tv.state_dict(), ours.state_dict()
    for name, value in expected_state.items():
        # Running stats untouched, num_batches_tracked incremented, as torch does.
        assert torch.equal(got_state[name], value), name
    assert got_state["bn1.num_batches_tracked"].item() == 1
    got.sum().backward()
    expected.sum().backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), tv.named_parameters()):
        assert torch.equal(p.grad, q.grad), name  # zeros, not None, as torch gives


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_through_the_module_matches_batchnorm2d(backend, momentum):
    bn = nn.BatchNorm2d(4, momentum=momentum)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    ours = nn.BatchNorm2d(4, momentum=momentum)
    ours.load_state_dict(bn.state_dict())
    x = torch.randn(0, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    r = torch.randn(0, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        expected = torch.relu(bn(x) + r)
        got = bn_act(ours, x, r, backend=backend)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    for name, value in bn.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    assert ours.num_batches_tracked.item() == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_float64_model_under_cpu_bfloat16_autocast_matches_torchvision(backend, mode):
    """Autocast leaves float64 tensors alone: torchvision's float64 model runs in float64 under
    it. Ours must too: its error against the float64 truth (no autocast) at most 2x
    torchvision's under autocast (which is zero) plus a float64 floor for a reordered
    summation over 20 layers, far below anything float32 or bfloat16 could reach."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().double().train(mode == "train")
    truth_model = copy.deepcopy(tv)
    ours = resnet_fast.convert(tv, backend=backend)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        truth = truth_model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, got = tv(x), ours(x)
    assert got.dtype == expected.dtype == torch.float64
    err_ref = (expected - truth).abs().max().item()
    err_ours = (got - truth).abs().max().item()
    floor = 1e-10 * truth.abs().max().item()
    assert err_ours <= 2 * err_ref + floor, (
        f"error against the float64 truth: {err_ours:.3g}, expected at most 2x torchvision's "
        f"{err_ref:.3g} + {floor:.3g}")
    for (name, value), (_, mine) in zip(tv.named_buffers(), ours.named_buffers()):
        torch.testing.assert_close(mine, value, rtol=1e-10, atol=1e-12, msg=name)
