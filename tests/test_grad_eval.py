"""An eval model called with autograd on (no torch.no_grad(): notebooks, saliency maps,
adversarial examples, fine-tuning with frozen BN statistics) runs its prepared plans and still
gives torchvision's gradients, to the input and to every conv/BN parameter: the whole model
and a block alone, float64 and float32, after an optimizer step, and with create_graph."""

import copy
from unittest import mock

import pytest
import torch
from _numerics import assert_within_reference_error
from _pairs import model_pair

from resnet_fast.models import _fused
from resnet_fast.models.program import Kept


def _kept(model):
    return [Kept.of(m) for m in model.modules() if Kept.of(m) is not None]


def _grads(model, x, loss=lambda y: y.square().mean()):
    """Input gradient, then every parameter's, of ``loss(model(x))``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    loss(model(x)).backward()
    return [x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.slow
def test_whole_model_gradients_are_torchvisions_in_float64_and_float32(arch):
    ours, tv = model_pair(arch)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    truth = _grads(copy.deepcopy(tv).double(), x.double())
    ours64 = _grads(copy.deepcopy(ours).double(), x.double())
    for got, want in zip(ours64, truth):  # rounding at 1e-16, cancelled where a sum is ~0
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10 * want.abs().max().item())
    # torch's own fp32 error, whichever errs most per tensor: torchvision's in NCHW, in
    # channels_last (the layout the fused forward runs in; it errs up to 4.4x NCHW's on
    # resnet18), and torch's autograd through the fold itself (the differentiable plans
    # torch.compile records, reached here by letting the plans see a FakeTensorMode): a BN
    # weight's gradient through the fold is sum(g * conv) - mean * sum(g), which cancels where
    # torchvision's sum(g * (conv - mean)) does not (2.8x on resnet50's layer4.2.bn3.weight).
    nchw = _grads(tv, x)
    channels_last = _grads(copy.deepcopy(tv).to(memory_format=torch.channels_last),
                           x.contiguous(memory_format=torch.channels_last))
    with mock.patch.object(_fused, "faking", lambda: True):
        through_fold = _grads(copy.deepcopy(ours), x)
    got = _grads(ours, x)
    assert _kept(ours), "the forward with autograd on ran without prepared plans"
    names = ["input"] + [n for n, _ in ours.named_parameters()]
    for name, g, e1, e2, e3, t in zip(names, got, nchw, channels_last, through_fold, truth):
        e = max(e1, e2, e3, key=lambda e: (e.double() - t).abs().max().item())
        try:
            assert_within_reference_error(g, e, t)
        except AssertionError as exc:
            raise AssertionError(f"{arch} {name}: {exc}") from None


@pytest.mark.slow
def test_plans_are_kept_across_forwards_and_rebuilt_after_a_step():
    ours, tv = model_pair("resnet50")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-4)
    opt_tv = torch.optim.SGD(tv.parameters(), lr=1e-4)
    _grads(ours, x)
    first = _kept(ours)
    _grads(ours, x)
    assert _kept(ours) == first and all(a is b for a, b in zip(_kept(ours), first))
    expected = _grads(tv, x)
    for _ in range(2):
        # the same update for both (the models' own fp32 gradients differ by rounding, which
        # a step would then amplify): a real optimizer step on each
        for p, q in zip(ours.parameters(), tv.parameters()):
            p.grad = q.grad.clone()
        opt_ours.step()
        opt_tv.step()
        before, (got, expected) = expected, (_grads(ours, x), _grads(tv, x))
        truth = _grads(copy.deepcopy(tv).double(), x.double())
        # judged against fp64: at most 2x torchvision's own fp32 error plus 1e-3 of each
        # gradient's scale (fp32 sums over the batch in another order). Not against
        # torchvision's fp32 gradients themselves: a ReLU whose input is within rounding of 0
        # flips between computations, and after the first step torchvision's fp32 (and
        # oneDNN's) layer2.0.conv1.weight gradient is 3.8% off fp64 where Winograd's is not.
        # The step itself moved the input's gradient by far more (stale plans fail).
        moved = (expected[0] - before[0]).abs().max() / expected[0].abs().max()
        assert moved > 0.01, moved
        for g, e, t in zip(got, expected, truth):
            err, ref = (g.double() - t).abs().max().item(), (e.double() - t).abs().max().item()
            assert err <= 2 * ref + 1e-3 * t.abs().max().item(), (err, ref)
    assert all(a is not b for a, b in zip(_kept(ours), first))  # the step rebuilt the plans


def test_a_block_alone_with_a_downsample_gives_torchvisions_gradients():
    ours, tv = model_pair("resnet50")
    ours_block, tv_block = ours.layer2[0].double(), tv.layer2[0].double()
    x = torch.randn(2, 256, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = x.contiguous(memory_format=torch.channels_last)  # NCHW runs torchvision's code
    got, expected = _grads(ours_block, x), _grads(tv_block, x)
    assert _kept(ours_block)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10 * e.abs().max().item())


@pytest.mark.slow
def test_frozen_parameters_saliency_and_partial_fine_tuning():
    ours, tv = model_pair("resnet18")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for model in (ours, tv):  # fine-tune the BN affine only, convs frozen
        for name, p in model.named_parameters():
            p.requires_grad_("bn" in name or "downsample.1" in name)
    got, expected = _grads(ours, x), _grads(tv, x)
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=2e-3, atol=1e-5 * e.abs().max().item())
    for model in (ours, tv):  # saliency: nothing trainable, the input's gradient only
        model.requires_grad_(False)
    got, expected = _grads(ours, x), _grads(tv, x)
    assert all(g is None for g in got[1:])
    torch.testing.assert_close(got[0], expected[0], rtol=2e-3,
                               atol=1e-5 * expected[0].abs().max().item())


@pytest.mark.slow
def test_create_graph_gives_torchvisions_second_order_gradients():
    ours, tv = (m.double() for m in model_pair("resnet18"))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def penalty(model):  # a gradient penalty: ||d loss / d x||^2, differentiated again
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(model(xi).square().sum(), xi, create_graph=True)
        gx.square().sum().backward()
        return [p.grad for p in model.parameters()]

    for g, e in zip(penalty(ours), penalty(tv)):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9 * e.abs().max().item())


@pytest.mark.slow
def test_a_parameter_changed_in_place_before_backward_is_refused_as_torch_refuses_it():
    for model in model_pair("resnet18"):
        y = model(torch.randn(1, 3, 32, 32)).sum()
        with torch.no_grad():
            model.layer1[0].bn1.weight.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


@pytest.mark.parametrize("arch, winograd, gemm", [("resnet18", 13, 0), ("resnet50", 13, 33)])
def test_input_gradients_through_our_kernels_are_torchvisions(prefer_ours, arch, winograd,
                                                               gemm):
    """Where the tuner finds them faster, a stride-1 3x3's input gradient runs as our
    Winograd (a stride-1 3x3 conv of the output gradient with the flipped, transposed weight)
    and a stride-1 1x1's as our GEMM (the weight transposed): the saliency map against fp64
    within the tolerance rule, every such conv on them."""
    from resnet_fast.ops.conv_bias_act import winograd_k_block

    if not winograd_k_block():
        pytest.skip("our Winograd kernels need AVX2 or AVX-512")

    ours, tv = model_pair(arch)
    for p in (*ours.parameters(), *tv.parameters()):
        p.requires_grad_(False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    got = _grads(ours, x)[0]
    chosen = [next(iter(e.makers)) for m in _kept(ours) for p in m.plans()
              for e in getattr(p, "_grads", {}).values() if e is not None]
    assert sorted(chosen) == ["gemm"] * gemm + ["winograd2"] * winograd
    truth = _grads(copy.deepcopy(tv).double(), x.double())[0]
    want = max((_grads(copy.deepcopy(tv).to(memory_format=fmt), x.contiguous(memory_format=fmt))[0]
                for fmt in (torch.contiguous_format, torch.channels_last)),
               key=lambda g: (g.double() - truth).abs().max().item())
    assert_within_reference_error(got, want, truth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bn", [True, False, "no weight"])
def test_the_conv_gradient_shortcut_is_autograd_through_the_fold(dtype, bn):
    """Where only convs' weights and biases want gradients (frozen-BN fine-tuning, an FPN),
    the planned backward scales the folded weight's and bias's gradients itself: bitwise what
    autograd through refold gives, for a conv with a BN, without one, and with a downsample's
    bias merged into it."""
    gen = torch.Generator().manual_seed(6)

    def pair():
        t = [torch.randn(8, 4, 3, 3, generator=gen), torch.randn(8, generator=gen),
             torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen),
             torch.randn(8, generator=gen), torch.rand(8, generator=gen) + 0.5]
        t = [v.to(dtype) for v in t]
        if bn is False:
            return 1e-5, [t[0], t[1], None, None, None, None]
        if bn == "no weight":
            t[2] = None
        return 1e-5, t

    (eps, own), (eps_ds, ds) = pair(), pair()
    for terms, tensors in [(((eps if bn is not False else None, True, True),), own),
                           (((eps if bn is not False else None, True, True),
                             (eps_ds if bn is not False else None, False, True)), own + ds)]:
        grad_w = torch.randn(8, 4, 3, 3, generator=gen).to(dtype)
        grad_b = torch.randn(8, generator=gen).to(dtype)
        wanted = [i for i, t in enumerate(tensors) if t is not None and i % 6 < 2]
        leaves = [t.detach().requires_grad_() if i in wanted else t
                  for i, t in enumerate(tensors)]
        weight, bias = _fused.refold(terms, leaves)
        want = torch.autograd.grad([weight, bias], [leaves[i] for i in wanted], [grad_w, grad_b],
                                   allow_unused=True)
        for i, w in zip(wanted, want):
            got = _fused._conv_grad(terms[i // 6], tensors[i - i % 6:i - i % 6 + 6], i % 6,
                                    grad_w, grad_b)
            if w is None:
                assert got is None, i
            else:
                assert got is not None and got.dtype == w.dtype and torch.equal(got, w), i


@pytest.mark.parametrize("geometry", [
    # (N, C, K, H, W, kernel, stride, padding): ResNet's stride-2 3x3, its strided and plain
    # 1x1s, the 7x7 stem, odd sizes whose last window overhangs, a kernel wider than the input
    (2, 5, 7, 9, 11, (3, 3), (2, 2), (1, 1)), (1, 4, 6, 8, 8, (1, 1), (2, 2), (0, 0)),
    (1, 4, 6, 8, 8, (1, 1), (1, 1), (0, 0)), (3, 3, 8, 13, 10, (7, 7), (2, 2), (3, 3)),
    (1, 2, 3, 2, 2, (3, 3), (2, 2), (1, 1)), (1, 6, 5, 7, 9, (1, 3), (1, 2), (0, 1)),
    (2, 3, 4, 5, 6, (5, 5), (3, 3), (2, 2))])
def test_gemm_backward_is_the_convolutions_gradients(geometry):
    """gemm_backward (the planned backward's GEMM choice) gives convolution_backward's input
    and weight gradients: equal in float64 (the same sums; the weight dense or channels_last,
    as a plan may keep it), within the tolerance rule in float32; each alone where the mask
    asks for one; the weight's contiguous."""
    n, c, k, h, w, kernel, stride, padding = geometry
    gen = torch.Generator().manual_seed(sum(geometry[:5]))
    cl = torch.channels_last
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(k, c, *kernel, generator=gen, dtype=torch.float64)
    out = [(s + 2 * p - d) // st + 1 for s, p, d, st in zip((h, w), padding, kernel, stride)]
    grad = torch.randn(n, k, *out, generator=gen, dtype=torch.float64)

    def torchs(dtype, mask):
        return torch.ops.aten.convolution_backward(
            grad.to(dtype), x.to(dtype), weight.to(dtype), None, list(stride), list(padding),
            [1, 1], False, [0, 0], 1, [*mask, False])[:2]

    truth = torchs(torch.float64, [True, True])
    for dtype in (torch.float64, torch.float32):
        want = torchs(dtype, [True, True])
        for mask in ([True, True], [True, False], [False, True]):
            got = _fused.gemm_backward(grad.to(dtype).contiguous(memory_format=cl),
                                       x.to(dtype).contiguous(memory_format=cl),
                                       weight.to(dtype), stride, padding, mask)
            for g, wt, t, asked in zip(got, want, truth, mask):
                if not asked:
                    assert g is None
                    continue
                assert g.shape == t.shape and g.dtype == dtype
                if dtype == torch.float64:
                    torch.testing.assert_close(g, t, rtol=1e-12, atol=1e-12)
                else:
                    assert_within_reference_error(g, wt, t)
            if mask[1]:
                assert got[1].is_contiguous()
    got = _fused.gemm_backward(grad.contiguous(memory_format=cl), x.contiguous(memory_format=cl),
                               weight.contiguous(memory_format=cl), stride, padding, [True, True])
    for g, t in zip(got, truth):
        torch.testing.assert_close(g, t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("geometry", [((3, 3), (2, 2), (1, 1)), ((1, 1), (2, 2), (0, 0)),
                                      ((1, 1), (1, 1), (0, 0)), ((7, 7), (2, 2), (3, 3))])
def test_gemm_backward_puts_non_finite_values_where_torch_does(geometry, value):
    """A NaN or infinity in grad (at a corner, whose windows reach into the padding) or in x
    reaches the same gradient entries as in torch's convolution_backward, and every finite
    entry is torch's within float32 rounding."""
    kernel, stride, padding = geometry
    gen = torch.Generator().manual_seed(4)
    cl = torch.channels_last
    x = torch.randn(2, 3, 9, 9, generator=gen)
    weight = torch.randn(4, 3, *kernel, generator=gen)
    out = [(9 + 2 * p - d) // s + 1 for p, d, s in zip(padding, kernel, stride)]
    for where in ("grad", "x"):
        g = torch.randn(2, 4, *out, generator=gen)
        xi = x.clone()
        (g if where == "grad" else xi)[1, 2, 0, 0] = value
        want = torch.ops.aten.convolution_backward(g, xi, weight, None, list(stride),
                                                   list(padding), [1, 1], False, [0, 0], 1,
                                                   [True, True, False])[:2]
        got = _fused.gemm_backward(g.contiguous(memory_format=cl), xi.contiguous(memory_format=cl),
                                   weight, stride, padding, [True, True])
        for a, b in zip(got, want):
            assert torch.equal(torch.isnan(a), torch.isnan(b)), where
            assert torch.equal(torch.isinf(a), torch.isinf(b)), where
            finite = torch.isfinite(b)
            torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4)


def test_planned_backward_runs_the_gemms_where_they_measure_faster(prefer_ours, monkeypatch,
                                                                   tmp_path):
    """Frozen-BN fine-tuning with the tuner preferring our kernels: every conv that is not a
    stride-1 3x3 (the stem, the 1x1s, the stride-2 3x3s) takes its input and weight gradients
    from gemm_backward, and every gradient is torchvision's within 4x its own error; with the
    tuner preferring oneDNN, torch's convolution_backward computes every conv's."""
    from _pairs import frozen_pair

    from resnet_fast import autotune

    calls = []
    real = _fused.ConvPlan._backward_call
    monkeypatch.setattr(_fused.ConvPlan, "_backward_call", lambda plan, grad, x, kernel, mask: (
        calls.append((kernel, tuple(plan.weight.shape[2:]), plan.geometry[0])),
        real(plan, grad, x, kernel, mask))[1])
    ours, tv = frozen_pair("resnet18")
    ref = copy.deepcopy(tv).double()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    grads = [_grads(m.train(), x.to(dt)) for m, dt in
             ((ours, torch.float32), (tv, torch.float32), (ref, torch.float64))]
    # resnet18: the stem, 3 stride-2 3x3s, 3 downsample 1x1s; the stem's input gradient
    # included (the test's input wants one)
    assert sorted(calls) == sorted([("gemm", (7, 7), [2, 2])] + [("gemm", (3, 3), [2, 2])] * 3
                                   + [("gemm", (1, 1), [2, 2])] * 3)
    for got, want, truth in zip(*grads):
        err = (got.double() - truth).abs().max().item()
        ref_err = (want.double() - truth).abs().max().item()
        assert err <= 4 * ref_err + 4 * torch.finfo(torch.float32).eps * truth.abs().max()
    calls.clear()
    monkeypatch.setattr(autotune, "_default_cpu", autotune.Tuner(
        str(tmp_path / "onednn.json"), environment=autotune.cpu_environment, measure=True,
        timer=lambda fn: 0.0 if fn.args[2] == "onednn" else 1.0))
    _grads(ours, x)
    # (every conv of resnet18's 20 now: the stride-1 3x3s' Winograd gradients lost too)
    assert len(calls) == 20 and all(kernel == "onednn" for kernel, _, _ in calls)


def test_planned_backward_keeps_torchs_where_the_patches_would_be_large(prefer_ours,
                                                                        monkeypatch):
    """A conv whose gemm_backward patches exceed the cap runs torch's convolution_backward
    without timing the GEMMs (no scratch of that size is ever made); an unpadded stride-1
    1x1, which gathers nothing, still runs the GEMMs."""
    cl = torch.channels_last
    calls = []
    real = _fused.ConvPlan._backward_call
    monkeypatch.setattr(_fused.ConvPlan, "_backward_call", lambda plan, grad, x, kernel, mask: (
        calls.append(kernel), real(plan, grad, x, kernel, mask))[1])
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=cl)
    for conv, want in ((torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), "onednn"),
                       (torch.nn.Conv2d(8, 8, 1, bias=False), "gemm")):
        plan = _fused.ConvPlan(conv, conv.weight.detach(), None, False, None, False,
                               folds=(((None, True, True),), (conv.weight, None) + (None,) * 4))
        grad = torch.randn(2, 8, *plan(x).shape[2:]).contiguous(memory_format=cl)
        size = _fused.gemm_backward_scratch(grad, x, plan.weight, *plan.geometry[:2])
        assert size == (2 * 8 * 8 * 8 * 9 * 4 if want == "onednn" else 0)
        monkeypatch.setattr(_fused, "_GEMM_BACKWARD_MAX_BYTES", size - 1 if size else 0)
        calls.clear()
        prefer_ours.kernels.clear()
        gx, gw = plan.backward(grad, x, [True, True])
        assert calls == ([want] if want == "gemm" else [])
        assert "gemm" not in prefer_ours.kernels or want == "gemm"
        wx, ww = torch.ops.aten.convolution_backward(grad, x, plan.weight, None,
                                                     *plan.geometry[:3], False, [0, 0], 1,
                                                     [True, True, False])[:2]
        torch.testing.assert_close(gx, wx, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gw, ww, rtol=1e-4, atol=1e-4)
