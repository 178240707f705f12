"""CIFAR ResNets (He et al. 2015, section 4.2)."""

import pytest
import torch

import resnet_fast
from resnet_fast.models import CifarResNet, PadShortcut


@pytest.mark.parametrize("arch, millions, digits", [
    # Table 6 of the paper gives 0.27M, 0.46M, 0.66M, 0.85M, 1.7M.
    ("resnet20", 0.27, 2), ("resnet32", 0.46, 2), ("resnet44", 0.66, 2),
    ("resnet56", 0.85, 2), ("resnet110", 1.7, 1),
])
def test_parameter_counts_match_the_paper(arch, millions, digits):
    model = resnet_fast.create_model(arch)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, digits) == millions


def test_structure_and_shapes():
    model = resnet_fast.resnet20(num_classes=100).eval()
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [3, 3, 3]
    assert isinstance(model.layer2[0].downsample, PadShortcut)
    assert model.layer1[0].downsample is None
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 64, 8, 8)
    assert model(x).shape == (2, 100)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0


class _UnfusedBN(torch.nn.BatchNorm2d):
    """A BatchNorm the fused path does not recognise: the model then runs eager conv->BN."""


@pytest.mark.slow
def test_fused_eval_matches_unfused_eval_on_every_backend():
    torch.manual_seed(0)
    model = resnet_fast.resnet56(drop_path_rate=0.1)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        model.train()(x)  # calibrate BN running stats on one batch
    unfused = resnet_fast.resnet56(norm_layer=_UnfusedBN)
    unfused.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = unfused.eval()(x)
        model.eval()
        for backend in ("reference", "cpu"):
            out = model.set_backend(backend)(x)
            err = (out - expected).abs().max().item()
            assert err <= 1e-4 * expected.abs().max().item(), (backend, err)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"depth = 6n\+2 .* got 21"):
        CifarResNet(21)
    with pytest.raises(ValueError, match=r"neither .*nor an existing checkpoint file"):
        resnet_fast.resnet20(weights="DEFAULT")  # no torchvision weights for CIFAR models
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) input, got shape \[2, 1, 32, 32\]"):
        resnet_fast.resnet20()(torch.randn(2, 1, 32, 32))
    gray = resnet_fast.resnet20(in_channels=1)
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 10)
