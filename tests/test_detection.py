"""resnet_fast.models.detection: torchvision's ResNet + FPN builders with the FPN's convs run
as prepared plans (our Winograd and 1x1 GEMM where measured faster, the top-down add in the
lateral conv's epilogue): the same modules, keys, outputs and gradients as torchvision's, the
plans rebuilt when the weights change, torchvision's forward wherever the plans cannot stand
in for the modules."""

import copy
import io

import pytest
import torch
import torchvision
from _numerics import assert_within_reference_error
from _pairs import frozen_pair
from torch import nn
from torchvision.models.detection import backbone_utils
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fast
from resnet_fast.models import detection
from resnet_fast.models._fused import ConvPlan
from resnet_fast.models.program import Kept
from resnet_fast.ops.conv_bias_act import winograd_k_block

CHANNELS = [16, 32, 64]


def _fpns(norm_layer=None):
    """(ours, torchvision's): the same FPN over CHANNELS -> 16, random biases and BN
    statistics (torchvision initializes them to the identity)."""
    torch.manual_seed(0)
    tv = torchvision.ops.FeaturePyramidNetwork(
        CHANNELS, 16, extra_blocks=torchvision.ops.feature_pyramid_network.LastLevelMaxPool(),
        norm_layer=norm_layer)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-1, 1)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return detection.fuse_fpn(copy.deepcopy(tv)), tv


def _features(batch=2, size=24, dtype=torch.float32, requires_grad=False):
    """The same values in every dtype (drawn in float32, then converted: randn in float64
    draws other numbers, and a float64 truth must see the float32 model's inputs)."""
    torch.manual_seed(1)
    return {str(i): torch.randn(batch, c, size >> i, size >> i).to(dtype)
            .requires_grad_(requires_grad) for i, c in enumerate(CHANNELS)}


def _kernels(fpn):
    plans = Kept.of(fpn)
    return [] if plans is None else [e[0] for p in plans for e in p._packed.values()]


def test_fuse_fpn_keeps_the_object_modules_and_keys():
    ours, tv = _fpns()
    assert type(ours) is detection.FeaturePyramidNetwork
    assert isinstance(ours, torchvision.ops.FeaturePyramidNetwork)
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert detection.fuse_fpn(ours) is ours

    class Mine(torchvision.ops.FeaturePyramidNetwork):
        pass

    with pytest.raises(TypeError, match="exactly.*got Mine"):
        detection.fuse_fpn(Mine(CHANNELS, 16))


@pytest.mark.parametrize("norm", [None, nn.BatchNorm2d])
def test_eval_outputs_are_torchvisions_and_run_our_kernels(prefer_ours, norm):
    ours, tv = _fpns(norm)
    ours.eval(), tv.eval()
    x = _features()
    with torch.no_grad():
        got = ours(x)
        want = tv({k: v.contiguous(memory_format=torch.channels_last) for k, v in x.items()})
        truth = copy.deepcopy(tv).double()({k: v.double() for k, v in x.items()})
    assert list(got) == list(want) == ["0", "1", "2", "pool"]
    for k in got:
        assert got[k].shape == want[k].shape
        assert got[k].is_contiguous(memory_format=torch.channels_last)
        assert_within_reference_error(got[k], want[k], truth[k])
    kernels = _kernels(ours)
    assert len(kernels) == 6  # three 1x1 laterals, three 3x3 outputs
    if winograd_k_block():
        assert kernels.count("gemm") == 3 and kernels.count("winograd") == 3


def test_training_gradients_are_torchvisions_and_plans_follow_the_step(prefer_ours,
                                                                       monkeypatch):
    """A fine-tuning step: the plans run the forward (their backward the gradients into the
    features and into every conv weight and bias, the 3x3s' both through our Winograd); after
    the optimizer's step they rebuild."""
    weight_grads = []
    real = ConvPlan._weight_grad_call
    monkeypatch.setattr(ConvPlan, "_weight_grad_call", lambda plan, grad, x, kernel: (
        weight_grads.append(kernel), real(plan, grad, x, kernel))[1])
    ours, tv = _fpns()
    ref = copy.deepcopy(tv).double()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, tv)]
    for _ in range(2):
        grads = []
        for model, dtype in ((ours, torch.float32), (tv, torch.float32), (ref, torch.float64)):
            model.zero_grad()
            x = _features(dtype=dtype, requires_grad=True)
            out = model(x)
            sum(v.square().mean() for v in out.values()).backward()
            grads.append([v.grad for v in x.values()] + [p.grad for p in model.parameters()])
        assert Kept.of(ours) is not None
        if winograd_k_block():  # the 3x3s' input and weight gradients ran as our Winograd
            # (not the 1x1s' on our GEMM: their weights train, see ConvPlan._grad_kind)
            chosen = [next(iter(e.makers)) for p in Kept.of(ours) for e in p._grads.values()
                      if e is not None]
            assert chosen == ["winograd2"] * 3
            assert weight_grads == ["winograd2"] * 3
            weight_grads.clear()
        for got, want, truth in zip(*grads):
            err = (got.double() - truth).abs().max().item()
            ref_err = (want.double() - truth).abs().max().item()
            # summed over batch and space in another order: 4x torch's own error
            assert err <= 4 * ref_err + 4 * torch.finfo(torch.float32).eps * truth.abs().max()
        for opt in opts:
            opt.step()
        with torch.no_grad():
            ref.load_state_dict(tv.state_dict())
    with torch.no_grad():
        x = _features()
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("features", [torch.float32, torch.bfloat16])
def test_under_autocast_the_plans_run_in_its_dtype(features):
    """Under CPU autocast to bfloat16 (features float32, or already bfloat16 from a body under
    autocast) the plans run with their weights cast, as autocast casts torch's convs."""
    ours, tv = _fpns()
    ours.eval(), tv.eval()
    x = _features(dtype=features)
    with torch.no_grad():
        truth = copy.deepcopy(tv).double()({k: v.double() for k, v in x.items()})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours(x)
            want = tv({k: v.contiguous(memory_format=torch.channels_last) for k, v in x.items()})
    assert Kept.of(ours) is not None
    for k in want:
        assert got[k].dtype == want[k].dtype == torch.bfloat16
        assert_within_reference_error(got[k], want[k], truth[k])


def test_what_the_plans_cannot_stand_in_for_runs_torchvisions_forward():
    ours, tv = _fpns()
    x = _features()
    with torch.no_grad():
        want = tv(x)
        # a hook on a conv
        handle = ours.layer_blocks[0][0].register_forward_hook(lambda m, i, o: o * 2)
        torch.testing.assert_close(ours(x)["0"], want["0"] * 2)
        assert Kept.of(ours) is None
        handle.remove()
        # an empty batch, and another dtype (torchvision's error)
        empty = {k: v[:0] for k, v in x.items()}
        assert all(v.shape[0] == 0 for v in ours(empty).values())
        with pytest.raises(RuntimeError):
            ours({k: v.double() for k, v in x.items()})
        # a BatchNorm in training: its batch statistics are not a fold
        bn_ours, bn_tv = _fpns(nn.BatchNorm2d)
        torch.testing.assert_close(bn_ours.train()(x)["0"], bn_tv.train()(x)["0"])
        assert Kept.of(bn_ours) is None
        # surgery: a block replaced by another module runs as that module
        ours.layer_blocks[1] = nn.Identity()
        tv.layer_blocks[1] = nn.Identity()
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-5, atol=1e-5)
        assert Kept.of(ours) is None


def test_scripting_tracing_and_compile_run_torchvisions_math():
    ours, tv = _fpns()
    ours.eval(), tv.eval()
    x = _features(batch=1, size=16)
    with torch.no_grad():
        want = tv(x)
        torch.testing.assert_close(torch.jit.script(ours)(x), want, rtol=1e-5, atol=1e-5)
        traced = torch.jit.trace(ours, (x,), strict=False)
        graph = str(traced.inlined_graph)
        assert "aten::_convolution" in graph and "resnet_fast::" not in graph
        torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(ours, fullgraph=True)
        torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-4)


def test_extractor_and_backbone_builder_mirror_torchvisions():
    torch.manual_seed(0)
    tv = backbone_utils._resnet_fpn_extractor(
        torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d), 2)
    torch.manual_seed(0)
    ours = detection._resnet_fpn_extractor(resnet_fast.resnet18(norm_layer=FrozenBatchNorm2d), 2)
    assert type(ours.fpn) is detection.FeaturePyramidNetwork
    assert type(ours.body) is detection.IntermediateLayerGetter
    assert type(ours) is backbone_utils.BackboneWithFPN
    assert list(ours.state_dict()) == list(tv.state_dict())
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in tv.named_parameters() if p.requires_grad]
    for a, b in zip(ours.fpn.parameters(), tv.fpn.parameters()):
        assert torch.equal(a, b)  # the same construction, the same random draws
    built = detection.resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                          trainable_layers=2)
    assert isinstance(built.body.layer1, nn.Sequential)
    assert type(built.body.layer1[0]) is resnet_fast.BasicBlock
    assert type(built.body.bn1) is FrozenBatchNorm2d
    assert type(built.fpn) is detection.FeaturePyramidNetwork
    with pytest.raises(ValueError, match="Trainable layers"):
        detection.resnet_fpn_backbone(backbone_name="resnet18", trainable_layers=6)
    with pytest.raises(TypeError, match="got BackboneWithFPN.*resnet_fast.models.detection"):
        resnet_fast.optimize(built)


def test_whole_backbone_runs_every_conv_fused(monkeypatch):
    torch.manual_seed(0)
    model = detection.resnet_fpn_backbone(backbone_name="resnet50", trainable_layers=3).eval()
    calls = []
    real = ConvPlan.__call__
    monkeypatch.setattr(ConvPlan, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    # the stem's conv (the body's own program), the 52 of the blocks and the 8 of the FPN
    assert len(calls) == 1 + 52 + 8 and list(out) == ["0", "1", "2", "3", "pool"]


def _extractors(trainable_layers):
    """(ours, torchvision's): a resnet18 + FrozenBatchNorm2d extractor, BN statistics away
    from the identity (``frozen_pair``), the same weights."""
    ours_body, tv_body = frozen_pair("resnet18")
    torch.manual_seed(0)
    tv = backbone_utils._resnet_fpn_extractor(tv_body, trainable_layers)
    ours = detection._resnet_fpn_extractor(ours_body, trainable_layers)
    ours.load_state_dict(tv.state_dict())
    return ours, tv


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_the_bodys_stem_runs_fused_with_torchvisions_outputs_and_gradients(fmt):
    """The body's conv1 -> bn1 -> relu -> maxpool as one stem plan: the features in eval (the
    pool in our op) within the model-level rule, and, all layers trainable, a training
    step's gradients into the image and every parameter (conv1's through the plan's
    backward) within 4x torch's own fp32 error, each against fp64."""
    ours, tv = _extractors(5)
    gen = torch.Generator().manual_seed(4)
    image = torch.randn(2, 3, 64, 48, generator=gen).contiguous(memory_format=fmt)
    ref = copy.deepcopy(tv).double()
    with torch.no_grad():
        got = ours.eval()(image)
        want = tv.eval()(image)
        truth = ref.eval()(image.double())
    assert Kept.of(ours.body) is not None and Kept.of(ours.body).stem is not None
    for k in truth:  # the model-level rule (docs/design.md): 2x torchvision's + 1e-5 of scale
        err = (got[k].double() - truth[k]).abs().max().item()
        ref_err = (want[k].double() - truth[k]).abs().max().item()
        assert err <= 2 * ref_err + 1e-5 * truth[k].abs().max().item(), k
    grads = []
    for model, dtype in ((ours, torch.float32), (tv, torch.float32), (ref, torch.float64)):
        model.train()
        x = image.to(dtype).clone().requires_grad_()  # a leaf of its own
        sum(v.square().mean() for v in model(x).values()).backward()
        grads.append([x.grad] + [p.grad for p in model.parameters()])
    assert ours.body.conv1.weight.grad is not None
    for got, want, truth in zip(*grads):
        err = (got.double() - truth).abs().max().item()
        ref_err = (want.double() - truth).abs().max().item()
        assert err <= 4 * ref_err + 4 * torch.finfo(torch.float32).eps * truth.abs().max()


def test_what_the_body_cannot_fuse_runs_torchvisions_loop():
    """A hook on the maxpool, a BatchNorm2d in training, a recording tool, an empty batch:
    torchvision's loop, with torchvision's outputs."""
    ours, tv = _extractors(3)
    x = torch.randn(1, 3, 32, 32)
    ours.body.maxpool.register_forward_hook(lambda m, i, o: None)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), tv.eval()(x), rtol=1e-4, atol=1e-4)
    assert Kept.of(ours.body) is None
    body = detection._resnet_fpn_extractor(resnet_fast.resnet18(), 5).body.train()
    body(torch.randn(2, 3, 32, 32))
    assert Kept.of(body) is None  # a BatchNorm2d in training has batch statistics
    ours, tv = _extractors(3)
    with torch.no_grad():
        traced = torch.jit.trace(ours.body.eval(), (x,), strict=False)
        assert "resnet_fast::" not in str(traced.inlined_graph)
        empty = ours.body(torch.randn(0, 3, 32, 32))
        scripted = torch.jit.script(ours.eval())
        torch.testing.assert_close(scripted(x), tv.eval()(x), rtol=1e-4, atol=1e-4)
    assert Kept.of(ours.body) is None and empty["0"].shape == (0, 64, 8, 8)


def test_a_faster_rcnn_on_the_fused_backbone_trains_as_torchvisions():
    """torchvision's FasterRCNN around our extractor: the same losses (the RPN's and the ROI
    heads' sampling seeded alike), gradients into the FPN, and a pickled backbone that runs."""
    from torchvision.models.detection import FasterRCNN

    torch.manual_seed(0)
    tv = backbone_utils._resnet_fpn_extractor(
        torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d), 3)
    ours = detection._resnet_fpn_extractor(resnet_fast.resnet18(norm_layer=FrozenBatchNorm2d), 3)
    ours.load_state_dict(tv.state_dict())
    torch.manual_seed(1)
    tv_model = FasterRCNN(tv, num_classes=5, min_size=128, max_size=128).train()
    our_model = FasterRCNN(ours, num_classes=5, min_size=128, max_size=128).train()
    our_model.load_state_dict(tv_model.state_dict())
    images = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(2))]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]), "labels": torch.tensor([1])}]
    losses = []
    for model in (tv_model, our_model):
        torch.manual_seed(3)
        losses.append(model(images, targets))
    assert Kept.of(ours.fpn) is not None
    for name, want in losses[0].items():
        torch.testing.assert_close(losses[1][name], want, rtol=1e-3, atol=1e-4, msg=name)
    sum(losses[1].values()).backward()
    assert ours.fpn.layer_blocks[0][0].weight.grad is not None
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).eval()
    assert type(loaded.fpn) is detection.FeaturePyramidNetwork and Kept.of(loaded.fpn) is None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours.eval()(x))


@pytest.mark.gpu
def test_fpn_on_cuda_matches_torchvision():
    """The FPN's plans on CUDA (the conv backends a ResNet's plans take there), eval and a
    training backward, against torchvision's FPN on the same GPU and an fp64 truth."""
    ours, tv = _fpns()
    ours, tv = ours.cuda().eval(), tv.cuda().eval()
    x = {k: v.cuda().contiguous(memory_format=torch.channels_last) for k, v in _features().items()}
    with torch.no_grad():
        got, want = ours(x), tv(x)
        truth = copy.deepcopy(tv).double()({k: v.double() for k, v in x.items()})
    assert Kept.of(ours) is not None
    for k in want:
        assert_within_reference_error(got[k], want[k], truth[k])
    ours.train()
    feats = {k: v.clone().requires_grad_() for k, v in x.items()}
    sum(v.square().mean() for v in ours(feats).values()).backward()
    assert all(torch.isfinite(v.grad).all() for v in feats.values())
    assert ours.layer_blocks[0][0].weight.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["freezing", "dynamic"])
def test_inductor_freezing_and_dynamic_give_torchvisions_numbers(mode):
    """Inductor with freezing (the weights constant-folded) and with dynamic shapes (a second
    size without recompiling wrongly): torchvision's numbers at both sizes."""
    ours, tv = _fpns()
    ours.eval(), tv.eval()
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(freezing=mode == "freezing"):
        compiled = torch.compile(ours, fullgraph=True, dynamic=mode == "dynamic")
        for size in (16, 24):
            x = _features(batch=1, size=size)
            torch.testing.assert_close(compiled(x), tv(x), rtol=1e-4, atol=1e-4)
