"""What an adversarial sweep of the drop-in found silently wrong (on 0cff05c), each checked
against torchvision doing the same thing: a correct result, or a clear refusal.

- weights swapped for views of the same memory (same pointer and version) rebuild the plans;
- a block's or the stem's ``relu`` replaced by another module runs as that module;
- ``convert``/``optimize`` keep model surgery instead of resetting it to stock;
- an empty spatial input is refused (as torchvision refuses it), not answered from garbage;
- a forward under a ``FakeTensorMode`` leaves no fake plans behind;
- forward-mode AD gets torchvision's JVP, with and without grad mode;
- CPU autocast runs the fused convs in the autocast dtype;
- mkldnn inputs run, sparse ones are refused with a message about the layout;
- a valid but wrong ``autotune.json`` is a warning, never a crash.
"""

import copy
import json

import pytest
import torch
import torchvision
from _numerics import assert_within_reference_error
from _pairs import assert_close_logits as _close
from _pairs import model_pair as _pair
from torch import nn
from torch.autograd import forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fast
from resnet_fast import autotune
from resnet_fast.calibrate import calibrate_
from resnet_fast.models.program import Kept
from resnet_fast.ops.conv_bias_act import onednn_dtypes

CPU = resnet_fast.available_backends()["cpu"].available
needs_cpu = pytest.mark.skipif(not CPU, reason="C++ extension not built")


def _x(batch=2, size=32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- plans follow views assigned to .data ------------------------------------------------------

def _prune_through_views(model, keep):
    """layer1[0]'s first conv pruned to ``keep`` output channels through views of the same
    memory: same data pointers, same versions."""
    block = model.layer1[0]
    block.conv1.weight.data = block.conv1.weight.data[:keep]
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(block.bn1, name)
        t.data = t.data[:keep]
    block.conv2.weight.data = block.conv2.weight.data[:, :keep]


def _transpose_through_a_view(model):
    w = model.layer2[1].conv2.weight
    w.data = w.data.transpose(2, 3)


@pytest.mark.parametrize("change", [_transpose_through_a_view,
                                    lambda m: _prune_through_views(m, 32)],
                         ids=["transpose", "prune"])
def test_views_assigned_to_data_rebuild_the_plans(change):
    model, tv = _pair()
    x = _x()
    with torch.no_grad():
        model(x)  # plans made and kept
        change(model)
        change(tv)
        _close(model(x), tv(x))


# --- the exact ReLU only --------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["block", "stem"])
@pytest.mark.parametrize("replacement", [nn.SiLU, nn.Identity])
@pytest.mark.slow
def test_a_replaced_relu_runs_as_itself_in_eval_and_training(where, replacement):
    model, tv = _pair()

    def swap(m):
        (m.layer2[1] if where == "block" else m).relu = replacement()

    swap(model)
    swap(tv)
    x = _x(batch=4, size=64)  # training: enough values per channel for stable batch stats
    with torch.no_grad():
        _close(model(x), tv(x))
    model.train()
    tv.train()
    _close(model(x), tv(x))


# --- convert and optimize keep surgery ------------------------------------------------------------

def _surgeries():
    def pools(tv):
        tv.maxpool = nn.Identity()
        tv.avgpool = nn.AdaptiveMaxPool2d(1)

    def silu_in_a_stage(tv):
        tv.layer2[0].relu = nn.SiLU()
        tv.layer3 = nn.Sequential(*tv.layer3, nn.SiLU())

    def small_image_stem(tv):
        tv.conv1.stride = (1, 1)

    def cifar_stem(tv):
        tv.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        tv.maxpool = nn.Identity()

    def no_layer4(tv):
        tv.layer4 = nn.Identity()
        tv.fc = nn.Linear(256, 10)

    def a_block_removed(tv):
        tv.layer3[1] = nn.Identity()

    def a_downsample_added(tv):
        tv.layer1[1].downsample = nn.Sequential(nn.Conv2d(64, 64, 1, bias=False),
                                                nn.BatchNorm2d(64))

    def one_activation_shared(tv):
        tv.layer1[0].relu = tv.layer1[1].relu = nn.SiLU()

    def weight_normed(tv):
        tv.layer2[0].conv1 = torch.nn.utils.parametrizations.weight_norm(tv.layer2[0].conv1)

    def a_subclass(tv):
        tv.__class__ = type("MyResNet", (torchvision.models.ResNet,), {})
        tv.fc = nn.Sequential(nn.Dropout(0.0), nn.Linear(512, 7))

    return [pools, silu_in_a_stage, small_image_stem, cifar_stem, no_layer4, a_block_removed,
            a_downsample_added, one_activation_shared, weight_normed, a_subclass]


@pytest.mark.parametrize("surgery", _surgeries(), ids=lambda f: f.__name__)
@pytest.mark.slow
def test_convert_and_optimize_keep_model_surgery(surgery):
    torch.manual_seed(0)
    tv = calibrate_(torchvision.models.resnet18(), batch_size=4, image_size=32, seed=0)
    surgery(tv)
    tv.eval()
    ours = resnet_fast.convert(tv)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in tv.named_modules()]
    assert ([type(m).__name__ for m in ours.modules()][1:]
            == [type(m).__name__ for m in tv.modules()][1:])
    x = _x(batch=4)
    with torch.no_grad():
        expected = tv(x)
        _close(ours(x), expected)
        _close(resnet_fast.optimize(tv)(x), expected)
    tv.train()
    ours.train()
    _close(ours(x), tv(x))  # training: every path of ours, not only the fused eval one


def test_convert_refuses_a_module_torch_cannot_copy_with_its_path():
    import torch.nn.utils.prune

    tv = torchvision.models.resnet18()
    torch.nn.utils.prune.l1_unstructured(tv.layer2[0].conv1, "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"cannot copy layer2\.0\.conv1 \(Conv2d\)"):
        resnet_fast.convert(tv)


def test_convert_keeps_hooks_on_submodules_and_refuses_them_on_the_model():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    seen = []
    tv.layer2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    ours = resnet_fast.convert(tv)
    with torch.no_grad():
        ours(_x())
    assert seen == [(2, 128, 4, 4)]
    tv.register_forward_hook(lambda m, i, o: o)
    with pytest.raises(ValueError, match="hooks registered on itself"):
        resnet_fast.convert(tv)


def test_convert_refuses_a_resnet_with_its_own_forward():
    class Two(torchvision.models.ResNet):
        def forward(self, x):
            return super().forward(x) * 2

    model = Two(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    with pytest.raises(TypeError, match="overrides torchvision's ResNet forward"):
        resnet_fast.convert(model)


# --- empty inputs ---------------------------------------------------------------------------------

@needs_cpu
@pytest.mark.parametrize("shape", [(1, 3, 0, 32), (2, 3, 32, 0)])
def test_an_input_too_small_for_the_stem_is_refused_like_torchvision(shape):
    model, tv = _pair()
    x = torch.randn(shape)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            tv(x)
        with pytest.raises(ValueError, match="of the output would be"):
            model(x)


@needs_cpu
def test_conv_bias_act_refuses_a_padded_input_smaller_than_the_kernel():
    # The C++ op's output size divided toward zero: (0 + 6 - 7) / 2 + 1 == 1, an output of
    # uninitialised memory.
    x = torch.randn(1, 3, 0, 32)
    w = torch.randn(8, 3, 7, 7)
    with pytest.raises(ValueError, match="height of the output would be 0"):
        resnet_fast.ops.conv_bias_act(x, w, None, 2, 3, backend="cpu")
    with pytest.raises(ValueError, match="height of the output would be 0"):
        resnet_fast.ops.conv_bias_act(x, w, None, 2, 3, backend="reference")


def test_an_empty_batch_gives_an_empty_output_like_torchvision():
    model, tv = _pair()
    x = torch.randn(0, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == tv(x).shape == (0, 1000)


# --- fake tensors ---------------------------------------------------------------------------------

def test_a_forward_under_fake_tensor_mode_keeps_no_fake_plans():
    from torch._subclasses.fake_tensor import FakeTensorMode

    model, tv = _pair()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor(_x())
        with torch.no_grad():
            out = model(fake)
    assert out.shape == (2, 1000)
    x = _x()
    with torch.no_grad():
        _close(model(x), tv(x))


# --- forward-mode AD ------------------------------------------------------------------------------

def _jvp(model, x, v):
    with fwAD.dual_level():
        out = model(fwAD.make_dual(x, v))
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent


@pytest.mark.parametrize("grad_mode", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.slow
def test_forward_mode_ad_gives_torchvisions_jvp(grad_mode, training):
    model, tv = _pair()
    model.train(training)
    tv.train(training)
    x, v = _x(seed=1), _x(seed=2)
    with torch.set_grad_enabled(grad_mode):
        expected = _jvp(tv, x, v)
        got = _jvp(model, x, v)
    assert expected[1] is not None and got[1] is not None, "no tangent"
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


# --- autocast -------------------------------------------------------------------------------------

class _ConvDtypes(TorchDispatchMode):
    """The dtype of x at every convolution, ours or ATen's."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "conv" in name and "backward" not in name and "prepack" not in name:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@needs_cpu
def test_cpu_bfloat16_autocast_runs_the_fused_convs_in_bfloat16():
    if torch.bfloat16 not in onednn_dtypes():
        pytest.skip("oneDNN runs no bfloat16 on this CPU")
    model, tv = _pair()
    x = _x(batch=4)
    with torch.no_grad():
        truth = copy.deepcopy(tv).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = tv(x)
            model(x)  # plans made
            spy = _ConvDtypes()
            with spy:
                got = model(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert spy.dtypes and set(spy.dtypes) == {torch.bfloat16}, spy.dtypes
    assert_within_reference_error(got.double(), expected.double(), truth)
    with torch.no_grad():  # autocast off again: float32 plans
        _close(model(x), tv(x))


def test_a_forward_on_the_meta_device_gives_the_shape():
    model = resnet_fast.resnet18().eval().to("meta")
    with torch.no_grad():
        assert model(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 1000)


# --- layouts --------------------------------------------------------------------------------------

def test_an_mkldnn_input_runs_like_torchvision_and_a_sparse_one_is_refused():
    model, tv = _pair()
    x = _x()
    with torch.no_grad():
        got, expected = model(x.to_mkldnn()), tv(x.to_mkldnn())
        assert got.layout == expected.layout
        _close(got.to_dense(), expected.to_dense())
        block = model.layer1[0]
        feats = torch.randn(2, 64, 8, 8)
        _close(block(feats.to_mkldnn()).to_dense(), tv.layer1[0](feats))
    with pytest.raises(ValueError, match="expected a strided"):
        resnet_fast.ops.conv_bias_act(x.to_sparse(), torch.randn(8, 3, 3, 3), None,
                                      backend="reference")


@needs_cpu
def test_the_cpu_op_refuses_a_sparse_input_with_a_message_about_the_layout():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="expected a strided"):
        resnet_fast.ops.conv_bias_act(x.to_sparse(), torch.randn(8, 3, 3, 3), None,
                                      backend="cpu")
    with pytest.raises(ValueError, match="expected a strided"):
        resnet_fast.ops.add_relu(x, x.to_sparse(), backend="cpu")
    with pytest.raises(ValueError, match="expected a strided .* for weight"):
        resnet_fast.ops.conv_bias_act(x, torch.randn(8, 3, 3, 3).to_sparse(), None,
                                      backend="cpu")


# --- the autotuning table -------------------------------------------------------------------------

_KEY, _ENV = {"op": "conv_bias_act"}, {"device": "cpu"}


@pytest.mark.parametrize("content", [
    json.dumps({"format": autotune.FORMAT,
                "entries": {json.dumps({**_ENV, **_KEY}, sort_keys=True): {"backend": ["cuda"]}}}),
    "[" * 100_000 + "]" * 100_000,
], ids=["list-as-backend", "deep-nesting"])
def test_a_valid_but_wrong_autotune_table_is_a_warning(tmp_path, content):
    path = tmp_path / "autotune.json"
    path.write_text(content)
    tuner = autotune.Tuner(str(path), environment=lambda d: _ENV, measure=False)
    with pytest.warns(UserWarning, match="ignoring"):
        chosen = tuner.choose(torch.device("cpu"), _KEY, {"cuda": None, "triton": None}, "cuda")
    assert chosen == "cuda"


# --- the Triton interpreter's bfloat16 ---------------------------------------------------------

def test_the_triton_interpreter_refuses_bfloat16_convs():
    from resnet_fast.backends import interpreting_triton
    if not interpreting_triton():
        pytest.skip("Triton runs on a GPU here, where bfloat16 is computed right")
    pytest.importorskip("triton")
    x = torch.randn(1, 4, 5, 5, dtype=torch.bfloat16)
    w = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="computes bfloat16 tl.dot wrong"):
        resnet_fast.ops.conv_bias_act(x, w, None, 1, 1, backend="triton")


# --- vector_to_parameters: the documented blind spot, and its remedy --------------------------

def test_vector_to_parameters_then_an_edit_of_the_vector_needs_refresh():
    from pathlib import Path

    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    readme = Path(__file__).resolve().parents[1] / "README.md"
    refresh_paragraph = next(p for p in readme.read_text().split("\n\n")
                             if "resnet_fast.refresh(model)" in p)
    assert "vector_to_parameters" in refresh_paragraph
    model, tv = _pair()
    x = _x()
    with torch.no_grad():
        for m in (model, tv):
            vec = parameters_to_vector(m.parameters())
            vector_to_parameters(vec, m.parameters())
            m(x)  # ours keeps plans of the parameters as they are now
            vec.mul_(0.5)  # the parameters are .data views of vec: no version bump
        resnet_fast.refresh(model)
        _close(model(x), tv(x))


# --- memory: dropped plans are freed at once --------------------------------------------------

@needs_cpu
def test_dropped_plans_free_their_weights_without_the_cyclic_gc():
    """A plan referring to itself (a bound method stored on it) kept every dropped plan's
    folded and packed weights until the cyclic GC ran: +2 GB over 20 rebuilds of ResNet-50."""
    import gc
    import weakref

    model, _ = _pair()
    x = _x()
    with torch.no_grad():
        model(x)
        program = Kept.of(model)
        plans = program.plans()
        weights = [weakref.ref(p.weight) for p in plans]
        del program, plans
        gc.disable()
        try:
            resnet_fast.refresh(model)
            model(x)
            assert all(w() is None for w in weights), "dropped plans are still alive"
        finally:
            gc.enable()
