"""Detection backbones: a resnet_fast ResNet built with torchvision's FrozenBatchNorm2d (what
torchvision's detection models and detectron2-style code use) fuses each conv -> frozen BN in
eval mode, and gives torchvision's outputs and gradients through torchvision's own FPN
extractor (``_resnet_fpn_extractor``), whose IntermediateLayerGetter calls the stem's modules
and each block on its own."""

import pytest
import torch
from _numerics import assert_within_reference_error
from _pairs import frozen_pair
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fast
from resnet_fast.models._fused import ConvPlan
from resnet_fast.models.program import Kept


def _counting():
    calls = []
    real = ConvPlan.__call__
    return calls, lambda *a, **k: calls.append(1) or real(*a, **k)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_whole_model_fuses_frozen_bn_and_matches_torchvision(channels_last, monkeypatch):
    ours, tv = frozen_pair()
    calls, spy = _counting()
    monkeypatch.setattr(ConvPlan, "__call__", spy)
    x = torch.randn(2, 3, 64, 64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        truth = tv.double()(x.double())
        expected = tv.float()(x)
        got = ours(x)
    # every conv of ResNet-50 fused, and the fc as a plan
    assert len(calls) == 53 + 1 and Kept.of(ours) is not None
    assert_within_reference_error(got, expected, truth)


@pytest.mark.parametrize("channels_last, training", [
    pytest.param(False, False, marks=pytest.mark.slow),
    pytest.param(True, False, marks=pytest.mark.slow),
    (False, True), (True, True)])
def test_fpn_extractor_outputs_and_gradients_are_torchvisions(channels_last, training,
                                                              monkeypatch):
    """Eval, and training (a fine-tuning step: FrozenBatchNorm2d is the same affine in both
    modes, so the blocks run fused there too)."""
    ours, tv = frozen_pair()
    fpn_ours = _resnet_fpn_extractor(ours, trainable_layers=3).train(training)
    fpn_tv = _resnet_fpn_extractor(tv, trainable_layers=3).train(training)
    fpn_tv.load_state_dict(fpn_ours.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fpn_ours.to(memory_format=fmt)
    # the reference runs in the layout of our outputs (channels_last either way, below):
    # torch's own channels_last convs err up to 4.4x their NCHW ones (tests/test_grad_eval.py)
    fpn_tv.to(memory_format=torch.channels_last)
    calls, spy = _counting()
    monkeypatch.setattr(ConvPlan, "__call__", spy)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)

    def run(model, x):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        feats = model(xi)
        sum(f.square().mean() for f in feats.values()).backward()
        return list(feats.values()), [xi.grad] + [p.grad for p in model.parameters()
                                                  if p.requires_grad]

    feats_ours, grads_ours = run(fpn_ours, x)
    # the blocks (called on their own) run fused, the stem's modules and the FPN run as they
    # are; NCHW images: the first block converts once, and every block returns channels_last
    assert len(calls) == 52
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats_ours)
    feats_tv, grads_tv = run(fpn_tv, x.contiguous(memory_format=torch.channels_last))
    fpn_64 = _resnet_fpn_extractor(frozen_pair()[1], trainable_layers=3).train(training)
    fpn_64.load_state_dict(fpn_tv.state_dict())
    fpn_64.double()
    feats_64, grads_64 = run(fpn_64, x.double())
    for got, want, truth in zip(feats_ours, feats_tv, feats_64):
        assert_within_reference_error(got, want, truth)
    assert len(grads_ours) == len(grads_tv) > 1
    for got, want, truth in zip(grads_ours, grads_tv, grads_64):
        # gradients sum over the batch and space in another order: 4x torch's own error
        # (channels_last torchvision itself errs up to 4.4x NCHW's, tests/test_grad_eval.py)
        err = (got.double() - truth).abs().max().item()
        ref = (want.double() - truth).abs().max().item()
        assert err <= 4 * ref + 4 * torch.finfo(torch.float32).eps * truth.abs().max().item()


def test_frozen_bn_changes_rebuild_the_plans():
    ours, tv = frozen_pair("resnet18")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours(x)
        for model in (ours, tv):
            model.layer1[0].bn1.running_var.mul_(4)  # an in-place write to a frozen buffer
            model.layer1[0].bn1.eps = 1e-3
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-4, atol=1e-4)


def test_training_with_an_active_regularizer_runs_torchvisions_code(monkeypatch):
    torch.manual_seed(0)
    model = resnet_fast.resnet18(norm_layer=FrozenBatchNorm2d, drop_path_rate=0.5).train()
    calls, spy = _counting()
    monkeypatch.setattr(ConvPlan, "__call__", spy)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    # DropPath acts in training: those blocks run as modules; the stem and the first block
    # (stochastic depth 0 there: no DropPath) run fused
    assert model.layer1[0].drop_path is None and model.layer1[1].drop_path is not None
    assert len(calls) == 1 + 2
    calls.clear()
    model.eval()(x)
    assert len(calls) == 20  # in eval it is the identity: all fused
