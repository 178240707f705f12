"""torchvision's own tooling on our models, as its test_models.py and test_feature_extraction.py
use it: torch.jit.script (and a save/load round trip), torch.jit.trace, torch.fx.symbolic_trace
and create_feature_extractor on layer1..layer4 in train and eval mode, get_model_weights; plus
torch.hub.load on this clone. Outputs against the eager fused model, graphs against
torchvision's. FX, feature extraction and get_model_weights on every torchvision
architecture; scripting and tracing (slow on deep models: 20-25 s each for resnet152) on one
of each structure (BasicBlock, Bottleneck, grouped, wide: the deeper ones only repeat
blocks), and on a CIFAR ResNet."""

import io
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import resnet_fast
from resnet_fast.models import TORCHVISION_ARCHS

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {f"layer{i}": f"c{i}" for i in range(1, 5)}


STRUCTURES = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2")


def _pair(arch):
    """(ours, torchvision's) with the same weights, eval mode, and an input."""
    torch.manual_seed(0)
    ours = getattr(resnet_fast, arch)(num_classes=50).eval()
    tv = getattr(torchvision.models, arch)(num_classes=50).eval()
    tv.load_state_dict(ours.state_dict())
    return ours, tv, torch.randn(2, 3, 32, 32)


def _resnet18_fast(archs):
    """resnet18 in the fast tier, the rest (seconds each to build and record) in `make test`."""
    return [a if a == "resnet18" else pytest.param(a, marks=pytest.mark.slow) for a in archs]


@pytest.fixture(scope="module", params=_resnet18_fast(TORCHVISION_ARCHS))
def pair(request):
    return _pair(request.param)


@pytest.fixture(scope="module", params=_resnet18_fast(STRUCTURES))
def structure(request):
    return _pair(request.param)


def _close(got, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def test_script_runs_torchvisions_code_and_round_trips(structure):
    ours, _, x = structure
    scripted = torch.jit.script(ours)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        expected = ours(x)
        _close(scripted(x), expected)
        _close(loaded(x), expected)
    # Only torchvision's code was compiled: the graph calls no resnet_fast op.
    assert "resnet_fast::" not in str(scripted.inlined_graph)


def test_trace_records_torchvisions_graph_at_any_batch(structure):
    ours, tv, x = structure
    with torch.no_grad():
        traced = torch.jit.trace(ours, (x,), check_trace=False)
        x3 = torch.randn(3, 3, 32, 32)
        _close(traced(x3), ours(x3))
    assert "resnet_fast::" not in str(traced.inlined_graph)
    assert list(traced.state_dict()) == list(tv.state_dict())


def test_fx_graph_is_torchvisions(pair):
    ours, tv, x = pair
    graph = torch.fx.symbolic_trace(ours)
    expected = torch.fx.symbolic_trace(tv)
    assert ([(n.op, n.name, str(n.target)) for n in graph.graph.nodes]
            == [(n.op, n.name, str(n.target)) for n in expected.graph.nodes])
    with torch.no_grad():
        _close(graph(x), ours(x))
    assert get_graph_node_names(ours) == get_graph_node_names(tv)


def _extract(ours, tv, x, train):
    ours.train(train)
    tv.train(train)
    try:
        features = create_feature_extractor(ours, LAYERS)
        expected = create_feature_extractor(tv, LAYERS)
        with torch.no_grad():
            got, want = features(x), expected(x)
    finally:
        ours.eval()
        tv.eval()
    assert list(got) == list(LAYERS.values())
    for name in want:
        _close(got[name], want[name])


def test_feature_extraction_of_layer1_to_layer4(pair):
    _extract(*pair, train=False)


def test_feature_extraction_in_training_mode(structure):
    _extract(*structure, train=True)


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_get_model_weights(arch):
    builder = getattr(resnet_fast, arch)
    expected = torchvision.models.get_model_weights(arch)
    assert torchvision.models.get_model_weights(builder) is expected
    assert resnet_fast.get_model_weights(arch) is expected
    assert resnet_fast.get_model_weights(builder) is expected
    assert getattr(resnet_fast, expected.__name__) is expected


def test_cifar_model_scripts_traces_and_extracts():
    model = resnet_fast.resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        _close(torch.jit.script(model)(x), expected)
        _close(torch.jit.trace(model, (x,), check_trace=False)(x), expected)
        _close(torch.fx.symbolic_trace(model)(x), expected)
        got = create_feature_extractor(model, {"layer3": "out"})(x)["out"]
    _close(got, model.forward_features(x))
    with pytest.raises(ValueError, match="resnet20 has no pretrained weights"):
        resnet_fast.get_model_weights("resnet20")


def test_hub_load_from_this_clone():
    model = torch.hub.load(str(ROOT), "resnet18", source="local", num_classes=7)
    assert isinstance(model, resnet_fast.ResNet) and model.fc.out_features == 7
