"""The models' per-layer plans (models/_fused.py) and the ops as pure functions: never stale,
never another tensor's data, safe in threads, correct under inductor, and the fused path taken
only where it computes exactly what the modules compute. Every expected value comes from
torchvision (or plain PyTorch) on the same weights. Also what the plans prepare for speed: the
padded stem (cuda/triton, half precision), the downsample's bias folded into the block's last
conv, and the input and head without layout copies."""

import collections
import copy
import gc
import io
import os
import threading
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize
import torch.nn.utils.prune
from _numerics import assert_within_reference_error
from _pairs import assert_close_logits as _close
from _pairs import model_pair as _pair
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fast
from resnet_fast.calibrate import calibrate_
from resnet_fast.models import _fused
from resnet_fast.models._fused import (
    PADDED_STEM_CHANNELS,
    ConvPlan,
    pad_weight,
    padded_in_channels,
    stage_padded,
)
from resnet_fast.models.program import Kept
from resnet_fast.ops.conv_bias_act import onednn_dtypes

CPU = resnet_fast.available_backends()["cpu"].available
needs_cpu = pytest.mark.skipif(not CPU, reason="C++ extension not built")


def _fused_calls(model, x):
    """How many fused convs a forward runs (plan calls; not the fc's plan, Kept.head_for)."""
    calls = []
    real = ConvPlan.__call__

    def spy(plan, *args, **kwargs):
        calls.append(plan)
        return real(plan, *args, **kwargs)

    ConvPlan.__call__ = spy
    try:
        with torch.no_grad():
            model(x)
    finally:
        ConvPlan.__call__ = real
    head = model.__dict__.get(Kept.HEAD)
    return sum(1 for plan in calls if head is None or plan is not head.program)


@needs_cpu
def test_the_fc_runs_as_a_kept_plan_that_follows_the_module():
    model, tv = _pair("resnet18")
    x = torch.randn(2, 3, 64, 64)

    def head():
        kept = model.__dict__.get(Kept.HEAD)
        return None if kept is None else kept.program

    with torch.no_grad():
        _close(model(x), tv(x))
        plan = head()
        assert plan is not None and model(x) is not None and head() is plan  # kept
        with torch.no_grad():
            model.fc.weight.mul_(2)  # an in-place change: a new version, a new plan
            tv.fc.weight.mul_(2)
        _close(model(x), tv(x))
        assert head() is not plan
        model.fc = tv.fc = nn.Linear(512, 7)  # module surgery: the new module's weights
        _close(model(x), tv(x))
        assert head().weight.shape[0] == 7
        model.fc = tv.fc = nn.Sequential(nn.Linear(512, 3))  # not a Linear: the module runs
        _close(model(x), tv(x))
        handle = model.fc[0].register_forward_hook(lambda m, i, o: o * 0)
        assert torch.equal(model(x), torch.zeros(2, 3))  # a hooked module runs as itself
        handle.remove()
        model.fc = nn.Linear(512, 3, bias=False)  # no bias: the module (addmm)
        tv.fc = model.fc
        _close(model(x), tv(x))
        pruned = nn.Linear(512, 3)
        torch.nn.utils.prune.random_unstructured(pruned, "weight", 0.5)  # weight not a Parameter
        model.fc = tv.fc = pruned
        _close(model(x), tv(x))
    # A weight of a tensor subclass (it may override F.linear): the module, its override runs.
    class Logged(torch.Tensor):
        calls = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is F.linear:
                cls.calls += 1
            return super().__torch_function__(func, types, args, kwargs or {})

    model.fc = nn.Linear(512, 3)
    with torch.no_grad():
        model.fc.weight = nn.Parameter(model.fc.weight.detach().as_subclass(Logged))
        model(x)
    assert Logged.calls == 1  # the module ran (a plan would have bypassed the override)
    # Features of the wrong width: torchvision's error (the module's), not ours.
    model.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(512, 8, 1))
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be multiplied"):
        model(x)
    model.avgpool = tv.avgpool
    # Gradients on: the module, and gradients reach its weight.
    model.fc = nn.Linear(512, 4)
    model(x).sum().backward()
    assert model.fc.weight.grad is not None


# --- torch.compile with inductor (never a stand-in backend) and export -----------------------

_MODES = {
    "default": dict(),
    "dynamic": dict(dynamic=True),
    "max-autotune-no-cudagraphs": dict(mode="max-autotune-no-cudagraphs"),
    "freezing": dict(),
}


@pytest.mark.parametrize("mode", list(_MODES))
@pytest.mark.slow
def test_inductor_resnet18_matches_torchvision_both_layouts(mode):
    model, tv = _pair("resnet18")
    torch._dynamo.reset()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch._inductor.config.patch(freezing=mode == "freezing"):
        compiled = torch.compile(model, fullgraph=True, **_MODES[mode])
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf = x.contiguous(memory_format=fmt)
            _close(compiled(xf), tv(xf))
        if mode == "dynamic":
            x3 = torch.randn(3, 3, 32, 32)
            _close(compiled(x3), tv(x3))
        if mode != "freezing":  # freezing bakes the weights in: that is its contract
            model.layer1[0].conv1.weight.data.mul_(1.5)
            tv.layer1[0].conv1.weight.data.mul_(1.5)
            _close(compiled(x), tv(x))


@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d"])
@pytest.mark.slow
def test_inductor_bottleneck_models_match_torchvision(arch):
    model, tv = _pair(arch)
    torch._dynamo.reset()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _close(torch.compile(model, fullgraph=True)(x), tv(x))


@pytest.mark.slow
def test_inductor_training_step_matches_eager():
    model, _ = _pair("resnet18")
    model = model.double().train()
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss_c = compiled(x).square().mean()
    loss_e = eager(x).square().mean()
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, c, msg=name)


@pytest.mark.slow
def test_export_with_a_dynamic_batch():
    model, tv = _pair("resnet18")
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        ep = torch.export.export(model, (torch.randn(2, 3, 32, 32),),
                                 dynamic_shapes={"x": {0: batch}})
        for n in (1, 5):
            x = torch.randn(n, 3, 32, 32)
            _close(ep.module()(x), tv(x))


@needs_cpu
def test_every_op_under_inductor_matches_eager():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 8, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3, generator=g) / 8
    b, s = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5
    geo = ([1, 1], [1, 1], [1, 1], 1)
    packed = torch.ops.resnet_fast.prepack_conv_weight(w, *geo, list(x.shape))
    rm, rv = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5
    cases = {
        "add_relu": (lambda: torch.ops.resnet_fast.add_relu(x, r)),
        "scale_shift_act": (lambda: torch.ops.resnet_fast.scale_shift_act(x, s, b, r, True)),
        "conv_bias_act": (lambda: torch.ops.resnet_fast.conv_bias_act(x, w, b, *geo, r, True)),
        "conv_bias_act_packed": (
            lambda: torch.ops.resnet_fast.conv_bias_act_packed(x, packed, b, *geo, r, True)),
        "bn_act_fwd": (lambda: torch.ops.resnet_fast.bn_act_fwd(x, s, b, r, True, 1e-5)[0]),
        "batch_norm_act eval": (lambda: torch.ops.resnet_fast.batch_norm_act(
            x, s, b, rm, rv, False, 0.1, 1e-5, r, True)),
    }
    for name, fn in cases.items():
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(), fn(), msg=name)


# --- staleness: every way weights change ------------------------------------------------------

@pytest.mark.slow
def test_plans_follow_every_kind_of_weight_change():
    model, tv = _pair("resnet18")
    x = torch.randn(2, 3, 32, 32)

    def check():
        with torch.no_grad():
            _close(model(x), tv(x))

    check()
    # an optimizer step (in place, versions bumped)
    for m in (model, tv):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.01)
        torch.optim.SGD(m.parameters(), lr=1.0).step()
    check()
    # load_state_dict
    _, other = _pair("resnet18", seed=3)
    model.load_state_dict(other.state_dict())
    tv.load_state_dict(other.state_dict())
    check()
    # .data.copy_ bypasses version counters: refresh() is the documented remedy
    new = torch.randn_like(tv.layer2[0].conv1.weight) * 0.05
    model.layer2[0].conv1.weight.data.copy_(new)
    tv.layer2[0].conv1.weight.data.copy_(new)
    resnet_fast.refresh(model)
    check()
    # w.data = new tensor (pointer changes, version does not)
    model.layer3[0].conv2.weight.data = new_w = torch.randn_like(model.layer3[0].conv2.weight) * 0.03
    tv.layer3[0].conv2.weight.data = new_w.clone()
    check()
    # eps
    model.layer4[1].bn1.eps = tv.layer4[1].bn1.eps = 0.5
    check()
    # .to(float64)
    model.double()
    tv.double()
    with torch.no_grad():
        _close(model(x.double()), tv(x.double()), rel=1e-10)
    # a train-mode forward moves the running stats (without bumping their versions)
    model.train()(x.double())
    tv.train()(x.double())
    model.eval()
    tv.eval()
    with torch.no_grad():
        _close(model(x.double()), tv(x.double()), rel=1e-10)


@pytest.mark.slow
def test_plans_follow_changes_to_the_model_itself():
    # After the plans exist: conv geometry edited (output-stride-16 surgery, as segmentation
    # backbones do), a block swapped out, a hook added, one block's backend changed.
    model, tv = _pair("resnet18")
    x = torch.randn(2, 3, 64, 64)

    def check(expect_fused):
        with torch.no_grad():
            _close(model(x), tv(x))
        assert _fused_calls(model, x) == expect_fused

    check(20)
    for m in (model, tv):
        m.layer4[0].conv1.stride = m.layer4[0].downsample[0].stride = (1, 1)
        for block in m.layer4:
            block.conv2.dilation = block.conv2.padding = (2, 2)
    check(20)
    for m in (model, tv):
        m.layer3[1] = nn.Identity()
    check(18)
    for m in (model, tv):
        m.layer2[0].register_forward_hook(lambda mod, i, o: o * 2)
    check(18)  # the model goes block by block; the hooked block runs fused and its hook fires
    model.layer1[1].backend = "reference"
    check(18)
    plans = Kept.of(model.layer1[1]).plans()
    assert all(p.dense_op is resnet_fast.ops.reference.conv_bias_act for p in plans)


def test_a_swapped_shortcut_module_is_called():
    # The CIFAR ResNet's parameter-free shortcut is a module the fused program calls: a new
    # one must be called, not the one the program was built with.
    class Halved(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0.5

    torch.manual_seed(0)
    model = resnet_fast.models.CifarResNet(depth=20).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        block = model.layer2[0]
        block.downsample = Halved(block.downsample)
        fused = model(x)
        handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
        try:
            unfused = model(x)  # global hooks: every module runs as itself
        finally:
            handle.remove()
    _close(fused, unfused)


@pytest.mark.parametrize("impl", ["extension", "python"])
def test_tensor_states_see_version_pointer_dtype_sizes_and_strides(impl):
    from resnet_fast import _extension
    if impl == "extension" and not hasattr(_extension._C, "tensor_states"):
        pytest.skip("C++ extension not built")
    states = (_extension.tensor_states if impl == "extension"
              else _extension._tensor_states_py)
    w = torch.randn(8, 4, 3, 3)
    before = states([w])
    assert states([w]) == before
    for view in (w.data[:4], w.data.transpose(2, 3), w.data.view(torch.int32)):
        # the same pointer and version (0), other sizes, strides or dtype
        assert view.data_ptr() == w.data_ptr() and view._version == w._version == 0
        assert states([view]) != before
    w.add_(0)  # in place: the version moves
    assert states([w]) != before
    assert states([w.clone()]) != states([w])  # another pointer
    assert states([w, w[0, 0, 0]]) != states([w, w[0, 0, 1]])  # per tensor, in order
    with torch.inference_mode():
        frozen = torch.randn(2)
    with pytest.raises(RuntimeError, match="inference tensors"):
        states([frozen])
    if impl == "extension":
        with pytest.raises(TypeError, match="expected a list of tensors, got int at index 1"):
            states([w, 3])


@pytest.mark.slow
def test_two_models_never_see_each_others_weights():
    a, tv_a = _pair("resnet18", seed=0)
    b, tv_b = _pair("resnet18", seed=5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for _ in range(2):
            _close(a(x), tv_a(x))
            _close(b(x), tv_b(x))


@needs_cpu
@pytest.mark.slow
def test_a_recycled_address_never_serves_a_stale_plan():
    # Weights freed and new ones allocated (often at the same address) in a loop: each forward
    # must use the weights it was given.
    model, tv = _pair("resnet18")
    x = torch.randn(1, 3, 32, 32)
    conv, tv_conv = model.layer1[0].conv1, tv.layer1[0].conv1
    for i in range(8):
        w = torch.randn_like(tv_conv.weight, generator=None) * 0.05 * (i + 1)
        conv.weight = nn.Parameter(w.clone())
        tv_conv.weight = nn.Parameter(w)
        del w
        gc.collect()
        with torch.no_grad():
            _close(model(x), tv(x))


@pytest.mark.slow
def test_the_same_address_and_version_with_new_data_is_not_stale():
    # Direct construction of the collision a (version, address) key alone would miss: a
    # weight replaced by a tensor at the old address with the same version.
    model, tv = _pair("resnet18")
    x = torch.randn(1, 3, 32, 32)
    conv = model.layer1[0].conv1
    with torch.no_grad():
        model(x)
        old_ptr = conv.weight.data_ptr()
        conv.weight.data = conv.weight.detach().clone()
        tv.layer1[0].conv1.weight.data = conv.weight.detach().clone() * 2
        conv.weight.data = tv.layer1[0].conv1.weight.detach().clone()
        # The plans hold the old storage alive, so the new weight cannot sit at old_ptr.
        assert conv.weight.data_ptr() != old_ptr
        _close(model(x), tv(x))


# --- the plans' own memory ---------------------------------------------------------------------

@needs_cpu
def _kept_plans(model):
    """Every ConvPlan the model's modules keep (the programs of the model and its blocks)."""
    return [p for m in model.modules() if Kept.of(m) is not None for p in Kept.of(m).plans()]


@pytest.mark.slow
def test_plans_do_not_grow_with_gradients_or_batch_sizes():
    model, tv = _pair("resnet18")
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()  # gradients on: the same prepared plans, one program
    assert len(_kept_plans(model)) == 20
    with torch.no_grad():
        for n in range(1, 12):
            model(torch.randn(n, 3, 32, 32))
    sizes = [len(p._packed) for p in _kept_plans(model) if hasattr(p, "_packed")]
    assert len(sizes) == 20 and max(sizes) <= 4  # resnet18: 20 fused convs, one program


@needs_cpu
def test_weights_are_packed_again_for_another_thread_count():
    # oneDNN lays a packed weight out for the thread count it was packed under (used under
    # another it ran 12x slower): a plan keeps one per (input size, threads).
    model, tv = _pair("resnet18")
    x = torch.randn(2, 3, 32, 32)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            for n in (threads, 1, threads):
                torch.set_num_threads(n)
                _close(model(x), tv(x))
    finally:
        torch.set_num_threads(threads)
    plans = [p for p in _kept_plans(model) if hasattr(p, "_packed")]
    assert len(plans) == 20
    for plan in plans:
        assert sorted({n for _, n, _ in plan._packed}) == sorted({1, threads})


@pytest.mark.slow
def test_pickle_and_deepcopy_do_not_carry_plans():
    model, tv = _pair("resnet18")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        clone = copy.deepcopy(model)
        for m in (loaded, clone):
            assert not _kept_plans(m)
            _close(m(x), tv(x))


# --- threads -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_four_threads_on_one_model_and_on_different_models():
    models = [_pair("resnet18", seed=s) for s in (0, 1)]
    inputs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i))
              for i in range(4)]
    with torch.no_grad():
        expected = {(m, i): tv(x) for m, (_, tv) in enumerate(models) for i, x in enumerate(inputs)}
    errors = []
    barrier = threading.Barrier(4)

    def work(t):
        barrier.wait()
        with torch.no_grad():
            for rep in range(3):
                m = (t + rep) % 2
                for i, x in enumerate(inputs):
                    out = models[m][0](x)
                    err = (out - expected[(m, i)]).abs().max().item()
                    if err > 1e-4 * expected[(m, i)].abs().max().item():
                        errors.append((t, m, i, err))
                    if t == 0 and rep == 1 and i == 0:
                        resnet_fast.refresh(models[m][0])  # plans rebuilt while others run

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "deadlock"
    assert errors == []


# --- the fused path runs only where the fold is exact -------------------------------------------

def _with(model_change, tv_change, expect_fused):
    model, tv = _pair("resnet18")
    model_change(model)
    tv_change(tv)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(model(x), tv(x))
    assert _fused_calls(model, x) == expect_fused


@pytest.mark.slow
def test_hooks_fire_and_hooked_blocks_run_unfused():
    seen = []
    hook = lambda m, i, o: seen.append(o.shape)  # noqa: E731
    _with(lambda m: m.layer1[0].bn1.register_forward_hook(hook), lambda tv: None, 20 - 2)
    assert len(seen) == 2  # _with runs two forwards
    # A hook that changes the output must change ours like torchvision's.
    double = lambda m, i, o: o * 2  # noqa: E731
    _with(lambda m: m.layer2[0].conv1.register_forward_hook(double),
          lambda tv: tv.layer2[0].conv1.register_forward_hook(double), 20 - 3)


@pytest.mark.slow
def test_pruning_parametrizations_and_subclasses_run_unfused():
    def prune(m):
        torch.nn.utils.prune.l1_unstructured(m.layer1[0].conv1, "weight", amount=0.5)

    def prune_same(tv):
        torch.nn.utils.prune.l1_unstructured(tv.layer1[0].conv1, "weight", amount=0.5)

    _with(prune, prune_same, 20 - 2)

    class Scale(nn.Module):
        def forward(self, w):
            return w * 0.5

    def param(m):
        torch.nn.utils.parametrize.register_parametrization(m.layer2[1].conv2, "weight", Scale())

    _with(param, param, 20 - 2)

    class WSConv(nn.Conv2d):  # weight standardisation
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def swap(m):
        old = m.layer3[0].conv1
        new = WSConv(old.in_channels, old.out_channels, 3, old.stride, 1, bias=False)
        new.weight = old.weight
        m.layer3[0].conv1 = new

    _with(swap, swap, 20 - 3)


@pytest.mark.slow
def test_global_module_hooks_disable_fusion():
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(1))
    try:
        _with(lambda m: None, lambda tv: None, 0)
    finally:
        handle.remove()
    assert seen


# --- more silent-wrong paths ------------------------------------------------------------------

@needs_cpu
@pytest.mark.slow
def test_nan_and_inf_propagate_like_torchvision():
    model, tv = _pair("resnet18")
    x = torch.randn(2, 3, 32, 32)
    x[0, 0, 5, 5] = float("nan")
    x[1, 1, 3, 3] = float("inf")
    with torch.no_grad():
        ours, ref = model(x), tv(x)
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours.isinf(), ref.isinf())


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_relu_keeps_nan_and_inf(dtype):
    # bf16 runs its ReLU on the values' bits (relu_inplace): -0.0, a tiny negative and a
    # negative NaN all have the sign bit; only the NaN stays. (Not inf or denormals in bf16:
    # oneDNN's bf16 conv itself turns a 1-channel inf into NaN, inf times its zero-padded
    # channels, and flushes denormals.)
    if dtype not in onednn_dtypes():
        pytest.skip(f"oneDNN runs no {dtype} convolution on this CPU")
    values = [float("nan"), -1.0, 2.0, -0.0, -1e-30, 0.0, 3e38]
    if dtype == torch.float32:
        values += [float("inf"), -float("inf"), -1e-40]
    x = torch.tensor(values, dtype=dtype).view(1, 1, 1, -1)
    x = torch.cat([x, -x], dim=3)  # -nan too
    w = torch.ones(1, 1, 1, 1, dtype=dtype)
    ref = torch.relu(F.conv2d(x.float(), w.float())).to(dtype)
    out = resnet_fast.ops.conv_bias_act(x, w, None, 1, 0, 1, 1, backend="cpu")
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=0, atol=0)
    packed = torch.ops.resnet_fast.prepack_conv_weight(w, [1, 1], [0, 0], [1, 1], 1,
                                                       list(x.shape))
    out = torch.ops.resnet_fast.conv_bias_act_packed(x, packed, None, [1, 1], [0, 0], [1, 1], 1)
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=0, atol=0)
    real = ~torch.isnan(ref)
    assert torch.equal(torch.signbit(out[real]), torch.signbit(ref[real]))  # each zero's sign


@needs_cpu
@pytest.mark.parametrize("bias", ["strided", "expanded"])
def test_non_contiguous_bias(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 7, 7, generator=g)
    w = torch.randn(16, 8, 3, 3, generator=g)
    b = torch.randn(32, generator=g)[::2] if bias == "strided" else torch.randn(1, generator=g).expand(16)
    out = resnet_fast.ops.conv_bias_act(x, w, b, 1, 1, 1, 1, backend="cpu")
    torch.testing.assert_close(out, torch.relu(F.conv2d(x, w, b, padding=1)))


@pytest.mark.slow
def test_model_built_under_inference_mode():
    with torch.inference_mode():
        model, tv = _pair("resnet18")
        x = torch.randn(2, 3, 32, 32)
        # Nothing to watch: the plans are rebuilt on every forward, correct and said to be slow.
        with pytest.warns(RuntimeWarning, match="inference tensors"):
            _close(model(x), tv(x))
        _close(model(x), tv(x))


@pytest.mark.slow
def test_torch_func_ensembles_and_per_sample_grads():
    models = [_pair("resnet18", seed=s) for s in (0, 1)]
    ours = [m for m, _ in models]
    tvs = [tv for _, tv in models]
    x = torch.randn(2, 3, 32, 32)
    params, buffers = torch.func.stack_module_state(ours)
    base = copy.deepcopy(ours[0]).to("meta")

    def run(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))

    out = torch.func.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    with torch.no_grad():
        for i, tv in enumerate(tvs):
            _close(out[i], tv(x))
    # per-sample gradients of the eval model
    model, tv = models[0]
    p = {k: v.detach() for k, v in model.named_parameters()}
    b = dict(model.named_buffers())

    def loss(p, xi):
        return torch.func.functional_call(model, (p, b), (xi[None],)).square().sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(p, x)
    tv_p = dict(tv.named_parameters())
    for i in range(2):
        tv.zero_grad()
        tv(x[i:i + 1]).square().sum().backward()
        for name in ("conv1.weight", "layer4.1.bn2.weight", "fc.bias"):
            # fp32 gradients summed in another order (vmap batches the convs): judged
            # against the gradient's scale, not element by element.
            _close(grads[name][i], tv_p[name].grad, rel=1e-3)


@needs_cpu
def test_cpu_outputs_can_be_resized_and_written_with_out():
    x = torch.randn(4, 64, 64, 64)  # outputs of 1 MiB and more come from the buffer cache
    out = torch.ops.resnet_fast.conv_bias_act(x, torch.randn(64, 64, 1, 1) / 8, None, [1, 1],
                                              [0, 0], [1, 1], 1, None, True)
    y = torch.randn(8, 64, 64, 64)
    out.resize_(0)
    torch.add(y, 1, out=out)  # grows the storage
    torch.testing.assert_close(out, y + 1)


# --- padded stem, shortcut bias, layout copies -----------------------------------------------

HALF = (torch.float16, torch.bfloat16)
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton on CPU tensors needs its interpreter")


class _Ops(TorchDispatchMode):
    """Counts the aten ops called from Python (a custom op counts once, not its insides)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self.zeroed = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func).split(".")[1] if str(func).startswith("aten.") else str(func)
        self.calls[name] += 1
        if name == "zero_":
            self.zeroed.append(args[0].numel())
        return func(*args, **(kwargs or {}))

    def copies(self):
        return sum(self.calls[n] for n in ("clone", "copy_", "_to_copy", "copy",
                                           "resnet_fast.to_channels_last.default"))


# --- padded stem --------------------------------------------------------------------------

@pytest.mark.parametrize("backend, dtype, channels, groups, expected", [
    ("cuda", torch.bfloat16, 3, 1, PADDED_STEM_CHANNELS),
    ("cuda", torch.float16, 3, 1, PADDED_STEM_CHANNELS),
    ("triton", torch.bfloat16, 3, 1, PADDED_STEM_CHANNELS),
    ("triton", torch.float16, 3, 1, PADDED_STEM_CHANNELS),
    ("cuda", torch.float32, 3, 1, 3),      # fp32 has no tensor-core NHWC constraint to meet
    ("triton", torch.float64, 3, 1, 3),
    ("cpu", torch.bfloat16, 3, 1, 3),      # CPU backends: nothing changes
    ("reference", torch.float16, 3, 1, 3),
    ("cuda", torch.bfloat16, 1, 1, 1),     # only the 3-channel stem is padded
    ("cuda", torch.bfloat16, 64, 1, 64),
    ("cuda", torch.bfloat16, 3, 3, 3),     # depthwise
])
def test_which_convs_are_padded(backend, dtype, channels, groups, expected):
    assert padded_in_channels(backend, dtype, channels, groups) == expected


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_staged_input_and_padded_weight_compute_the_unpadded_conv(layout):
    # float64: the padded conv adds exact zeros, so it equals the unpadded one to rounding.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 19, 23, dtype=torch.float64, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(2, 6, 19, 46, dtype=torch.float64, generator=g)[:, ::2, :, ::2]
    x[1, 2, 4, 5] = float("nan")
    w = torch.randn(16, 3, 7, 7, dtype=torch.float64, generator=g)
    staged, padded = stage_padded(x, 8), pad_weight(w, 8)
    assert staged.shape == (2, 8, 19, 23) and padded.shape == (16, 8, 7, 7)
    assert staged.is_contiguous(memory_format=torch.channels_last)
    assert padded.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(staged[:, :3], x, equal_nan=True, rtol=0, atol=0)
    assert staged[:, 3:].eq(0).all() and padded[:, 3:].eq(0).all()
    assert torch.equal(padded[:, :3], w)
    torch.testing.assert_close(F.conv2d(staged, padded, stride=2, padding=3),
                               F.conv2d(x, w, stride=2, padding=3), equal_nan=True,
                               rtol=1e-12, atol=1e-12)


def test_staging_copies_x_once_and_zero_fills_only_the_extra_channels():
    x = torch.randn(2, 3, 16, 16)
    with _Ops() as ops:
        stage_padded(x, 8)
    assert ops.copies() == 1
    assert ops.zeroed == [2 * 5 * 16 * 16]


def _stem(dtype):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return conv.to(dtype).eval(), bn.to(dtype).eval()


@interpreter
def test_padded_stem_plan_on_triton_matches_the_unpadded_conv():
    # Rule (docs/design.md, Tolerances): fp16 error vs an fp64 truth <= 2x the fp16 PyTorch
    # reference's + 2 eps at the output's magnitude. (bf16 is not trustworthy in the
    # interpreter.)
    conv, bn = _stem(torch.float16)
    plan = _fused.group_plans("triton", [(conv, bn, True)], 1, differentiable=False)[0]
    assert plan.pads and plan.weight.shape == (16, PADDED_STEM_CHANNELS, 7, 7)
    x = torch.randn(2, 3, 21, 18).half()
    with torch.no_grad():
        ours = plan(x)
        ref = torch.relu(bn(conv(x.float().half())))
        truth = torch.relu(bn.double()(conv.double()(x.double())))
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert_within_reference_error(ours, ref, truth)


@interpreter
@pytest.mark.slow
def test_a_model_with_a_padded_stem_matches_torchvisions_code():
    # fp16 on Triton's interpreter, the one program and block by block (a hooked block). Rule
    # as above, against the same model's torchvision code in fp16.
    torch.manual_seed(0)
    model = calibrate_(resnet_fast.create_model("resnet20"), batch_size=4, image_size=16)
    truth_model = copy.deepcopy(model).double()
    model.half().set_backend("triton")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        truth = truth_model(x.double())
        xh = x.half()
        plain = model.fc(torch.flatten(model.avgpool(model._forward_plain_features(xh)), 1))
        assert_within_reference_error(model(xh), plain, truth)
        assert Kept.of(model).stem.pads
        model.layer1[0].register_forward_hook(lambda m, i, o: None)
        assert_within_reference_error(model(xh), plain, truth)
        assert Kept.of(model).stem.pads and not Kept.of(model).blocks  # the stem alone


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", HALF)
def test_padded_stem_on_cuda_matches_the_unpadded_conv(backend, dtype):
    # Rule as above (docs/design.md, Tolerances), against the same-dtype cuDNN conv -> BN.
    if not resnet_fast.available_backends()[backend].available:
        pytest.skip(f"{backend} is not available")
    conv, bn = (m.cuda() for m in _stem(dtype))
    plan = _fused.group_plans(backend, [(conv, bn, True)], 1, differentiable=False)[0]
    assert plan.pads
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=dtype)
    with torch.no_grad():
        ours = plan(x)
        ref = torch.relu(bn(conv(x)))
        truth = torch.relu(bn.double()(conv.double()(x.double())))
    assert_within_reference_error(ours, ref, truth)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cpu_backends_do_not_pad(backend):
    if not resnet_fast.available_backends()[backend].available:
        pytest.skip(f"{backend} is not available")
    for dtype in (torch.float32, *HALF):
        conv, bn = _stem(dtype)
        plan = _fused.group_plans(backend, [(conv, bn, True)], 1, differentiable=False)[0]
        assert not plan.pads and plan.weight.shape == (16, 3, 7, 7)


# --- the downsample's bias in the block's last conv ---------------------------------------

def _shortcuts(model):
    """(last plan, downsample plan, block) of every block with a fused downsample."""
    blocks = Kept.of(model).blocks
    with_ds = [b for stage in model._stages() for b in stage if b.downsample is not None]
    return [(last, ds, b) for (_, last, ds), b in zip([b for b in blocks if b[2] is not None],
                                                      with_ds)]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.slow
def test_downsample_bias_moves_into_the_last_conv(arch):
    model, tv = _pair(arch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(model(x), tv(x))
        shortcuts = _shortcuts(model)
        assert len(shortcuts) == (3 if arch == "resnet18" else 4)
        for last, ds, block in shortcuts:
            assert isinstance(ds, ConvPlan) and ds.bias is None and not ds.relu
            b_last = resnet_fast.ops.fold_bn(*block._pairs()[-1])[1]
            b_ds = resnet_fast.ops.fold_bn(*block.downsample)[1]
            torch.testing.assert_close(last.bias, b_last + b_ds)
        # The plans depend on the downsample BN: a change to its bias after a forward is seen.
        for m in (model, tv):
            m.layer2[0].downsample[1].bias.add_(0.75)
        _close(model(x), tv(x))
    with torch.inference_mode():
        _close(model(x), tv(x))
        model.layer3[0].downsample[1].running_mean.sub_(0.5)
        tv.layer3[0].downsample[1].running_mean.sub_(0.5)
        _close(model(x), tv(x))
    _close(resnet_fast.optimize(tv)(x), tv(x))


def test_a_block_on_its_own_moves_the_bias_too():
    model, tv = _pair("resnet18")
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _close(model.layer2[0](x), tv.layer2[0](x))
        conv1, conv2, ds = Kept.of(model.layer2[0]).plans()
        assert ds.bias is None and not ds.relu


@pytest.mark.slow
def test_frozen_bn_gradients_flow_into_both_biases():
    # With gradients into the parameters the summed bias is built with autograd: both BNs'
    # biases get torchvision's gradients.
    model, tv = _pair("resnet18")
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    tv(x).square().sum().backward()
    for name in ("layer2.0.bn2.bias", "layer2.0.downsample.1.bias"):
        ours, theirs = model.get_parameter(name).grad, tv.get_parameter(name).grad
        _close(ours, theirs, rel=1e-3)


# --- layouts: the input copied once, the head pooled in channels_last ---------------------

@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.slow
def test_a_forward_copies_the_input_once_and_pools_channels_last(backend):
    if not resnet_fast.available_backends()[backend].available:
        pytest.skip(f"{backend} is not available")
    model, tv = _pair("resnet18")
    model.set_backend(backend)
    x = torch.randn(2, 3, 32, 32)  # NCHW
    with torch.no_grad():
        model(x)
        with _Ops() as ops:
            out = model(x)
        _close(out, tv(x))
        assert ops.copies() == 1  # the staging into channels_last; none before the pooling
        feats = model.forward_features(x)
        assert feats.is_contiguous()  # forward_features still answers in the input's layout


@pytest.mark.slow
def test_optimize_casts_and_lays_out_the_input_in_one_copy():
    _, tv = _pair("resnet18")
    optimized = resnet_fast.optimize(tv, dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32)
    optimized(x)
    with _Ops() as ops:
        out = optimized(x)
    assert ops.copies() == 1
    _close(out.float(), tv(x))


def test_a_block_on_its_own_runs_fused_and_returns_channels_last_for_any_layout():
    model, tv = _pair("resnet50")
    block, tv_block = model.layer2[0], tv.layer2[0]
    x = torch.randn(2, 256, 8, 8)
    x0 = x.clone()
    calls = []
    real = ConvPlan.__call__
    with torch.no_grad(), mock.patch.object(ConvPlan, "__call__",
                                            lambda *a, **k: calls.append(1) or real(*a, **k)):
        out = block(x)  # NCHW: converted once, fused, channels_last out
        assert len(calls) == 4 and out.is_contiguous(memory_format=torch.channels_last)
        _close(out, tv_block(x))
        assert x.is_contiguous() and torch.equal(x, x0)  # the caller's tensor is left as it was
        cl = x.contiguous(memory_format=torch.channels_last)
        out = block(cl)
        assert len(calls) == 8 and out.is_contiguous(memory_format=torch.channels_last)
        _close(out, tv_block(x))
    # a 3-d input runs torchvision's code, which refuses it (BatchNorm2d) as torchvision does
    for b in (block, tv_block):
        with pytest.raises(ValueError, match="expected 4D input"):
            b(x[0])
