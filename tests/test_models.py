"""The torchvision family: same modules, same state_dict, same outputs and gradients."""

import pickle
import typing

import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights, ResNet50_Weights

import resnet_fast
from resnet_fast.models import weights as weights_mod

TV_ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
            "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]

# Published parameter counts (torchvision's model docs).
TV_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnext50_32x4d": 25_028_904,
             "wide_resnet50_2": 68_883_240}


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _assert_same(ours, theirs, what):
    # Same ops in the same order: exact in practice; 1e-5 relative to the output's scale
    # is the bar.
    scale = max(1.0, theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5 * scale, f"{what}: max abs error {err:.3g} at scale {scale:.3g}"


# resnet18 and wide_resnet50_2 in the fast tier (the bottleneck and ResNeXt families' fast
# tests are test_fused_models' every-conv-fused ones); the rest in `make test` only.
FAST_ARCHS = ("resnet18", "wide_resnet50_2")


@pytest.mark.parametrize("arch", [a if a in FAST_ARCHS else pytest.param(a, marks=pytest.mark.slow)
                                  for a in TV_ARCHS])
def test_matches_torchvision(arch):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)()
    torch.manual_seed(0)
    ours = getattr(resnet_fast, arch)()

    # Structure: the same module tree, keys, shapes; the same init from the same seed.
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in tv.named_modules()]
    sd_tv, sd_ours = tv.state_dict(), ours.state_dict()
    assert list(sd_ours) == list(sd_tv)
    for k in sd_tv:
        assert sd_ours[k].shape == sd_tv[k].shape, k
        assert torch.equal(sd_ours[k], sd_tv[k]), f"{k} differs after seeded init"
    assert _n_params(ours) == _n_params(tv)
    if arch in TV_PARAMS:
        assert _n_params(ours) == TV_PARAMS[arch]

    # Strict loading both ways.
    ours.load_state_dict(sd_tv, strict=True)
    tv.load_state_dict(ours.state_dict(), strict=True)

    # Train mode, where our model runs its fused BatchNorm+add+ReLU kernels: logits, every
    # gradient and the running statistics, in float64 (the kernels run in float64 too). In
    # fp32 the comparison would be a coin toss at this batch size: a ReLU input that rounds to
    # the other side of 0 (in ours or in torchvision's fp32) drops one element's gradient and
    # moves whole gradients by percents (seen: 5% in layer3.1.conv2); the fp32 kernels are
    # checked op by op in test_batch_norm_act.py and over SGD steps in test_train_step.py.
    ours, tv = ours.double(), tv.double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    x_tv, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_tv, out_ours = tv(x_tv), ours(x_ours)
    _assert_same(out_ours, out_tv, "train logits")
    g = torch.randn_like(out_tv)
    out_tv.backward(g)
    out_ours.backward(g)
    _assert_same(x_ours.grad, x_tv.grad, "input grad")
    for (name, p_ours), p_tv in zip(ours.named_parameters(), tv.parameters()):
        _assert_same(p_ours.grad, p_tv.grad, f"grad of {name}")
    # The running statistics to 1e-10 of each buffer's scale: an element near zero carries
    # the absolute rounding of the 150 fp64 layers before it (resnet152 on an AVX-512 Xeon:
    # 1.2e-12 off in a running mean of scale 0.72, where a fixed 1e-12 failed), while a wrong
    # update (biased variance, another momentum) is off by percents.
    for (name, b_ours), b_tv in zip(ours.named_buffers(), tv.buffers()):
        scale = max(1.0, b_tv.abs().max().item()) if b_tv.is_floating_point() else 1.0
        torch.testing.assert_close(b_ours, b_tv, rtol=1e-10, atol=1e-10 * scale, msg=name)
    ours, tv = ours.float(), tv.float()
    x = x.float()

    # Eval mode (fused residual join on the default backend).
    tv.eval()
    ours.eval()
    with torch.no_grad():
        _assert_same(ours(x), tv(x), "eval logits")


def test_every_builder_is_keyword_only():
    with pytest.raises(TypeError):
        resnet_fast.resnet18(None)  # weights must be passed by name, as in torchvision


def test_bad_input_shapes_are_refused_with_a_clear_message():
    model = resnet_fast.resnet18().eval()
    with pytest.raises(ValueError, match=r"expected a 4-D \(N, 3, H, W\) input, got shape \[1, 4, 32, 32\]"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"expected a 4-D \(N, 3, H, W\) input, got shape \[3, 32, 32\]"):
        model(torch.randn(3, 32, 32))


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'resnet5'.*did you mean.*resnet50"):
        resnet_fast.get_model("resnet5")
    assert resnet_fast.create_model is resnet_fast.get_model
    assert isinstance(resnet_fast.get_model("ResNet18", num_classes=7), resnet_fast.ResNet)


def test_torchvision_style_model_registry():
    from resnet_fast import ResNet50_Weights
    assert ResNet50_Weights is torchvision.models.ResNet50_Weights
    everything = resnet_fast.list_models()
    assert len(everything) == 15 and everything == sorted(everything)
    assert resnet_fast.list_models(include="resnext*") == ["resnext101_32x8d",
                                                           "resnext101_64x4d",
                                                           "resnext50_32x4d"]
    assert resnet_fast.list_models(include=["resnet1*"], exclude="*0") == ["resnet101",
                                                                           "resnet152",
                                                                           "resnet18"]
    assert resnet_fast.list_models(module=resnet_fast.models) == everything
    with pytest.raises(ValueError, match="expected module=None"):
        resnet_fast.list_models(module=torchvision.models)
    assert (resnet_fast.get_weight("ResNet50_Weights.IMAGENET1K_V2")
            is ResNet50_Weights.IMAGENET1K_V2)
    with pytest.raises(ValueError, match="got 'ViT_B_16_Weights.DEFAULT'"):
        resnet_fast.get_weight("ViT_B_16_Weights.DEFAULT")
    # The builders' weights= is typed: the enum first, as torchvision's tooling reads it.
    hints = typing.get_type_hints(resnet_fast.resnet50)
    assert ResNet50_Weights in typing.get_args(hints["weights"])


def test_num_classes_conflicting_with_weights():
    with pytest.raises(ValueError, match=r"num_classes=10 conflicts with weights ResNet50_Weights"):
        resnet_fast.resnet50(weights="DEFAULT", num_classes=10)
    with pytest.raises(ValueError, match=r"in_channels=1 conflicts"):
        resnet_fast.resnet50(weights=ResNet50_Weights.IMAGENET1K_V2, in_channels=1)


def test_weights_of_another_architecture_are_refused():
    with pytest.raises(ValueError, match=r"resnet50: expected weights of ResNet50_Weights, got ResNet18_Weights"):
        resnet_fast.resnet50(weights=ResNet18_Weights.IMAGENET1K_V1)
    with pytest.raises(ValueError, match=r"neither one of IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        resnet_fast.resnet50(weights="IMAGENET1K_V9")
    with pytest.raises(TypeError, match=r"expected weights to be None, .* got int"):
        resnet_fast.resnet50(weights=3)


def test_fixed_architecture_arguments_are_not_overridden():
    with pytest.raises(ValueError, match=r"groups is fixed to 32 .* got groups=8"):
        resnet_fast.resnext50_32x4d(groups=8)


def test_unknown_backend_name_fails_at_construction():
    with pytest.raises(ValueError, match=r"backend=.*'fastest' is not a backend"):
        resnet_fast.resnet18(backend="fastest")


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("spec", ["DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1",
                                  ResNet18_Weights.IMAGENET1K_V1])
def test_torchvision_weights_load_through_the_hub_cache(hub_dir, spec):
    # A checkpoint in the torch.hub cache under torchvision's file name is what a download
    # leaves there; using it exercises the enum/name path without network.
    torch.manual_seed(1)
    src = torchvision.models.resnet18()
    filename = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    (hub_dir / "checkpoints").mkdir()
    torch.save(src.state_dict(), hub_dir / "checkpoints" / filename)
    model = resnet_fast.resnet18(weights=spec)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_no_network_error_names_the_file_and_where_to_put_it(hub_dir, monkeypatch):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    filename = ResNet50_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[-1]
    expected = str(hub_dir / "checkpoints" / filename)
    with pytest.raises(RuntimeError, match=rf"could not download .*put it at {expected}"):
        resnet_fast.resnet50(weights="IMAGENET1K_V2")


def test_local_checkpoint_and_state_dict(tmp_path):
    torch.manual_seed(2)
    src = resnet_fast.resnet18(num_classes=10)
    sd = src.state_dict()
    plain = tmp_path / "plain.pth"
    torch.save(sd, plain)
    # A training script's checkpoint: nested under "state_dict", DDP "module." prefix.
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    for spec in (plain, str(plain), wrapped, sd):
        model = resnet_fast.resnet18(weights=spec, num_classes=10)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match=r"fc.weight has shape \(10, 512\) \(10 classes\).*pass num_classes=10"):
        resnet_fast.resnet18(weights=plain)
    with pytest.raises(ValueError, match=r"neither .* nor an existing checkpoint file"):
        resnet_fast.resnet18(weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match=r"do not match the architecture"):
        resnet_fast.resnet34(weights=sd, num_classes=10)


class _NotData:
    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_checkpoints_are_loaded_as_data_not_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"fc.weight": torch.zeros(1), "payload": _NotData()}, f)
    with pytest.raises(pickle.UnpicklingError):
        resnet_fast.resnet18(weights=path)


def test_unwrap_refuses_non_state_dicts(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match=r"does not hold a state_dict"):
        resnet_fast.resnet18(weights=path)
    assert weights_mod.resolve("resnet18", "ResNet18_Weights", None) is None
