"""fuse_bn (deployment folding) and convert (torchvision -> resnet_fast)."""

import warnings

import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from resnet_fast.calibrate import calibrate_


def _close(a, b, rel=1e-5):
    err = (a - b).abs().max().item()
    assert err <= rel * max(1.0, b.abs().max().item()), err


@pytest.mark.parametrize("source", ["torchvision", "resnet_fast"])
@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow),
                                  pytest.param("resnext50_32x4d", marks=pytest.mark.slow)])
def test_fuse_bn_on_resnets(source, arch):
    torch.manual_seed(0)
    lib = torchvision.models if source == "torchvision" else resnet_fast
    model = calibrate_(getattr(lib, arch)(), batch_size=2, image_size=64)
    x = torch.randn(2, 3, 64, 64)
    fused = resnet_fast.fuse_bn(model)
    assert fused is not model and type(fused) is type(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # not inplace
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    with torch.no_grad():
        _close(fused(x), model(x), rel=1e-4)
    assert resnet_fast.fuse_bn(model, inplace=True) is model


def test_fuse_bn_generic_model_through_fx_with_odd_bns():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(8, affine=False),
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4),
    )
    calibrate_(model, batch_size=4, image_size=16)
    fused = resnet_fast.fuse_bn(model)
    assert isinstance(fused, torch.fx.GraphModule)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _close(fused(x), model(x), rel=1e-5)


class _Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv output also bypasses its BN


def test_fuse_bn_refusals():
    with pytest.raises(ValueError, match=r"output of conv conv feeds add besides BN bn"):
        resnet_fast.fuse_bn(_Branching().eval())
    with pytest.raises(ValueError, match=r"model.bn1 is in training mode, .* call model.eval\(\) first"):
        resnet_fast.fuse_bn(torchvision.models.resnet18().train())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"no running statistics"):
        resnet_fast.fuse_bn(model)
    with pytest.raises(TypeError, match=r"expected an nn.Module, got int"):
        resnet_fast.fuse_bn(3)


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)


class _SharedConv(_ConvBN):
    def forward(self, x):
        # The same conv module runs twice; only its first call is followed by the BN.
        return self.conv(torch.relu(self.bn(self.conv(x))))


class _SharedBN(_ConvBN):
    def forward(self, x):
        # The BN also normalizes x itself, which no conv precedes.
        return self.bn(self.conv(x)) + self.bn(x)


class _SharedConvWithoutBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        # conv2 runs twice but feeds no BN: nothing is folded into it, so sharing it is fine.
        return self.conv2(torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def test_fuse_bn_refuses_modules_called_more_than_once():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"conv conv is called 2 times in the forward; folding BN "
                                         r"bn into it would change the calls not followed by"):
        resnet_fast.fuse_bn(calibrate_(_SharedConv(), batch_size=4, image_size=8, in_channels=4))
    with pytest.raises(ValueError, match=r"BN bn is called 2 times in the forward; folding it "
                                         r"into conv conv would leave the other calls"):
        resnet_fast.fuse_bn(calibrate_(_SharedBN(), batch_size=4, image_size=8, in_channels=4))
    model = calibrate_(_SharedConvWithoutBN(), batch_size=4, image_size=8, in_channels=4)
    fused = resnet_fast.fuse_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        _close(fused(x), model(x), rel=1e-5)


@pytest.mark.parametrize("arch, kwargs", [
    ("resnet18", {}), pytest.param("resnet50", {}, marks=pytest.mark.slow),
    pytest.param("resnext50_32x4d", {}, marks=pytest.mark.slow), pytest.param("wide_resnet50_2", {}, marks=pytest.mark.slow),
    pytest.param("resnet50", {"replace_stride_with_dilation": [False, True, True]}, marks=pytest.mark.slow),
    pytest.param("resnet34", {"num_classes": 10}, marks=pytest.mark.slow),
])
def test_convert_torchvision_models(arch, kwargs):
    torch.manual_seed(0)
    tv = calibrate_(getattr(torchvision.models, arch)(**kwargs), batch_size=2, image_size=64)
    ours = resnet_fast.convert(tv)
    assert isinstance(ours, resnet_fast.ResNet) and not ours.training
    assert list(ours.state_dict()) == list(tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _close(ours(x), tv(x), rel=1e-4)


@pytest.mark.parametrize("head", [
    pytest.param(nn.Identity(), marks=pytest.mark.slow),  # a feature extractor: (N, 512) embeddings
    nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 7)),
    pytest.param(nn.Linear(512, 5, bias=False), marks=pytest.mark.slow),
])
def test_convert_keeps_a_replaced_fc_head(head):
    torch.manual_seed(0)
    tv = calibrate_(torchvision.models.resnet18(), batch_size=2, image_size=32)
    tv.fc = head.eval()
    ours = resnet_fast.convert(tv)
    assert type(ours.fc) is type(head) and ours.fc is not head
    assert list(ours.state_dict()) == list(tv.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(ours(x), tv(x), rel=1e-4)


@pytest.mark.slow
def test_convert_keeps_each_modules_mode_and_each_parameters_requires_grad():
    torch.manual_seed(0)
    tv = calibrate_(torchvision.models.resnet18(), batch_size=2, image_size=32).double().train()
    for m in tv.layer1.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # a frozen BN inside a training model: its running stats must not move
    tv.conv1.requires_grad_(False)
    tv.bn1.requires_grad_(False)
    ours = resnet_fast.convert(tv)
    assert ({n: m.training for n, m in ours.named_modules()}
            == {n: m.training for n, m in tv.named_modules()})
    assert ({n: p.requires_grad for n, p in ours.named_parameters()}
            == {n: p.requires_grad for n, p in tv.named_parameters()})
    frozen = tv.layer1[0].bn1.running_mean.clone()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    expected, got = tv(x), ours(x)
    _close(got, expected, rel=1e-9)
    assert torch.equal(ours.layer1[0].bn1.running_mean, frozen)
    for (name, theirs), (_, mine) in zip(tv.named_buffers(), ours.named_buffers()):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12, msg=name)
    got.sum().backward()
    assert ours.conv1.weight.grad is None and ours.bn1.weight.grad is None
    assert ours.layer1[0].conv1.weight.grad is not None


def test_convert_refuses_other_models():
    with pytest.raises(TypeError, match=r"expected a torchvision ResNet, got Sequential"):
        resnet_fast.convert(nn.Sequential())
    ours = resnet_fast.resnet18()
    assert resnet_fast.convert(ours) is ours


@pytest.mark.slow
def test_optimize_a_torchvision_model():
    torch.manual_seed(0)
    tv = calibrate_(torchvision.models.resnet18(), batch_size=2, image_size=64)
    x = torch.randn(2, 3, 64, 64)
    fast = resnet_fast.optimize(tv, example_input=x)
    assert isinstance(tv.layer1[0].bn1, nn.BatchNorm2d)  # the argument is untouched
    with torch.no_grad():
        expected = tv(x)
    _close(fast(x), expected, rel=1e-4)
    half = resnet_fast.optimize(tv, dtype=torch.bfloat16, backend="cpu")
    out = half(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max().item() < 0.1 * expected.abs().max().item()


_ONEDNN = torch.backends.mkldnn.is_available()


@pytest.mark.parametrize("dtype, native", [
    (torch.bfloat16, _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    (torch.float16, _ONEDNN and torch.ops.mkldnn._is_mkldnn_fp16_supported()),
    (torch.float32, True)])
def test_optimize_says_when_this_cpu_emulates_the_dtype(dtype, native):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resnet_fast.optimize(resnet_fast.resnet18(), dtype=dtype)
    said = [str(w.message) for w in caught if w.category is RuntimeWarning]
    if native:
        assert said == []
    else:
        assert len(said) == 1
        assert f"oneDNN has no {dtype} convolution for this CPU" in said[0]
        assert "dtype=None" in said[0]


def test_optimize_refusals():
    with pytest.raises(TypeError, match=r"expected a resnet_fast or torchvision ResNet, got Linear"):
        resnet_fast.optimize(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"cuda_graphs=True needs the model on a CUDA device, got cpu"):
        resnet_fast.optimize(resnet_fast.resnet18(), cuda_graphs=True)
    with pytest.raises(ValueError, match=r"'fastest' is not a backend"):
        resnet_fast.optimize(resnet_fast.resnet18(), backend="fastest")


@pytest.mark.gpu
def test_optimize_cuda_graphs_match_eager_and_recapture_per_shape():
    torch.manual_seed(0)
    tv = calibrate_(torchvision.models.resnet50(), batch_size=2, image_size=64).cuda()
    fast = resnet_fast.optimize(tv, dtype=torch.bfloat16)
    for batch in (1, 4, 1):
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        with torch.no_grad():
            expected = tv(x)
        out = fast(x)
        assert (out.float() - expected).abs().max().item() < 0.15 * expected.abs().max().item()
    assert len(fast._graphs) == 2
