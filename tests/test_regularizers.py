"""Stochastic depth and DropBlock: off in eval, active in train at the configured rate,
reproducible with a seed; plus the other course-style extras (grayscale stem, features)."""

import math

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast.models import DropBlock2d, DropPath


def _regularized_pair():
    torch.manual_seed(0)
    plain = resnet_fast.resnet18(num_classes=10)
    reg = resnet_fast.resnet18(num_classes=10, drop_path_rate=0.3, drop_block_prob=0.2,
                               drop_block_size=3)
    reg.load_state_dict(plain.state_dict())  # regularizers add no parameters or buffers
    return plain, reg


def test_regularizers_do_nothing_in_eval():
    plain, reg = _regularized_pair()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reg.eval()(x), plain.eval()(x))


def test_regularizers_are_active_in_train_and_reproducible_with_a_seed():
    plain, reg = _regularized_pair()
    x = torch.randn(4, 3, 64, 64)
    reg.train()
    plain.train()
    with torch.no_grad():
        torch.manual_seed(5)
        a = reg(x)
        torch.manual_seed(5)
        b = reg(x)
        torch.manual_seed(6)
        c = reg(x)
        ref = plain(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, ref)


def test_drop_path_schedule_is_linear_over_blocks():
    model = resnet_fast.resnet50(drop_path_rate=0.2)
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    rates = [0.0 if b.drop_path is None else b.drop_path.p for b in blocks]
    assert len(rates) == 16
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert all(s == pytest.approx(0.2 / 15) for s in steps)


def test_drop_block_only_on_stages_3_and_4():
    model = resnet_fast.resnet18(drop_block_prob=0.1, drop_block_size=5)
    assert all(b.drop_block is None for b in (*model.layer1, *model.layer2))
    assert all(isinstance(b.drop_block, DropBlock2d) and b.drop_block.block_size == 5
               for b in (*model.layer3, *model.layer4))


def test_drop_path_keep_rate():
    # 20,000 independent per-sample Bernoulli draws: the kept fraction has standard error
    # sqrt(p(1-p)/n) = 0.0032 for p = 0.3; 5 standard errors (false alarm ~1e-6) is the bound.
    p, n = 0.3, 20_000
    torch.manual_seed(0)
    out = DropPath(p).train()(torch.ones(n, 2, 1, 1))
    kept = (out[:, 0, 0, 0] != 0).double()
    assert abs(kept.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(out[kept.bool()], torch.full_like(out[kept.bool()], 1 / (1 - p)))
    assert torch.equal(out[:, 0], out[:, 1])  # a whole sample is kept or dropped


@pytest.mark.parametrize("block_size", [3, 4, 7])
def test_drop_block_keep_rate_matches_the_paper_model(block_size):
    # Expected keep rate, derived independently of the implementation: a position is dropped
    # when any of the k valid block seeds covering it fires, each with probability gamma, so
    # P(keep) = (1 - gamma)^k, averaged over positions. Overlaps make 1 - P(keep) a bit lower
    # than p; that is the paper's model, not an error. The bound is 5 standard errors of the
    # mean of the per-map keep fractions (maps are independent; pixels within one are not).
    p, h = 0.2, 14
    valid = h - block_size + 1
    gamma = p / block_size**2 * h * h / valid**2
    seeds = torch.zeros(1, 1, h, h)
    seeds[..., :valid, :valid] = 1.0
    # Seed (i, j) covers rows i..i+bs-1 -> coverage count via a full correlation.
    coverage = F.conv2d(F.pad(seeds, (block_size - 1, 0, block_size - 1, 0)),
                        torch.ones(1, 1, block_size, block_size))
    expected = ((1 - gamma) ** coverage).mean().item()

    torch.manual_seed(0)
    out = DropBlock2d(p, block_size).train()(torch.ones(64, 32, h, h))
    keep = out != 0
    per_map = keep.double().mean(dim=(2, 3)).flatten()
    se = per_map.std().item() / math.sqrt(per_map.numel())
    assert abs(per_map.mean().item() - expected) < 5 * se + 1e-4
    # Kept activations are rescaled so the mean is preserved exactly.
    assert out.mean().item() == pytest.approx(1.0, rel=1e-5)
    # Dropped regions are whole squares: every dropped pixel lies in some fully dropped
    # block_size x block_size window.
    dropped = (~keep).float()
    windows = (F.avg_pool2d(dropped.view(-1, 1, h, h), block_size, stride=1) > 0.999).float()
    covered = F.conv_transpose2d(windows, torch.ones(1, 1, block_size, block_size)) > 0
    assert torch.equal(covered, dropped.view(-1, 1, h, h).bool())


def test_regularizer_arguments_are_validated():
    with pytest.raises(ValueError, match=r"drop_path_rate in \[0, 1\), got 1.5"):
        resnet_fast.resnet18(drop_path_rate=1.5)
    with pytest.raises(ValueError, match=r"drop probability in \[0, 1\), got -0.1"):
        resnet_fast.resnet18(drop_block_prob=-0.1)
    with pytest.raises(ValueError, match=r"block_size >= 1, got 0"):
        DropBlock2d(0.1, 0)


def test_grayscale_stem():
    model = resnet_fast.resnet18(in_channels=1, num_classes=10).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.in_channels == 1
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.forward_features(torch.randn(2, 1, 28, 28)).shape == (2, 512, 4, 4)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\) input, got shape \[2, 3, 28, 28\]"):
        model(torch.randn(2, 3, 28, 28))


def test_features_head_and_return_features():
    torch.manual_seed(0)
    model = resnet_fast.resnet50(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 2048, 2, 2)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, 2048)
        logits = model(x)
        assert torch.equal(model.forward_head(feats), logits)
        model.return_features = True
        out_logits, out_feats = model(x)
    assert torch.equal(out_logits, logits) and torch.equal(out_feats, pooled)
    assert resnet_fast.resnet18(return_features=True).return_features
