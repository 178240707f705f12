"""resnet_fast.autotune: the per-layer choice of the ``auto`` backend, measured once per key
and kept on disk. On CPU there is one real kernel backend, so the tests drive the tuner with
injected candidates, timers and machine descriptions, and the models' plans with injected
candidate backends (cpu and reference both compute the same thing)."""

import json
import multiprocessing
import threading
import warnings

import pytest
import torch
import torchvision
from _numerics import assert_within_reference_error

import resnet_fast
from resnet_fast import _jsonfile, autotune, backends
from resnet_fast.autotune import Tuner, TuningCacheWarning
from resnet_fast.calibrate import calibrate_
from resnet_fast.models import _fused
from resnet_fast.models._fused import PADDED_STEM_CHANNELS
from resnet_fast.models.program import Kept

DEV = torch.device("cpu")
LAYER = {"op": "conv_bias_act", "x": [2, 64, 8, 8], "dtype": "bfloat16",
         "layout": "channels_last", "weight": [64, 64, 3, 3], "residual": False, "relu": True}


def _machine(device="NVIDIA H100 80GB HBM3", torch_version="2.11.0"):
    return lambda dev: {"device": device, "torch": torch_version, "cudnn": 91000,
                        "triton": "3.6.0", "resnet_fast": "0.1.0"}


class _Timer:
    """Fake timings: each candidate's time from ``ms``, every call recorded."""

    def __init__(self, **ms):
        self.ms, self.timed = ms, []

    def __call__(self, run):
        name = run()
        self.timed.append(name)
        return self.ms[name]


CANDIDATES = {"cuda": lambda: "cuda", "triton": lambda: "triton"}


def _tuner(path, timer, **kwargs):
    kwargs.setdefault("environment", _machine())
    return Tuner(str(path), timer=timer, measure=kwargs.pop("measure", True), **kwargs)


def test_a_slow_spell_during_one_candidates_timing_does_not_decide(tmp_path):
    """The machine slows down 3x for the first timing (another process, a frequency drop):
    timed one after another, the candidate timed first loses although it is faster;
    in interleaved rounds (the CPU tuner's) the spell lands in both candidates' samples and
    the medians keep the faster one."""
    def drifting():
        calls = []

        def timer(run):
            name = run()
            calls.append(name)
            return {"cuda": 1.0, "triton": 1.2}[name] * (3.0 if len(calls) == 1 else 1.0)
        return timer, calls

    timer, calls = drifting()
    assert _tuner(tmp_path / "one.json", timer).choose(DEV, LAYER, CANDIDATES, "x") == "triton"
    timer, calls = drifting()
    tuner = _tuner(tmp_path / "three.json", timer, rounds=3)
    assert tuner.choose(DEV, LAYER, CANDIDATES, "x") == "cuda"
    assert calls == ["cuda", "triton", "triton", "cuda", "cuda", "triton"]
    assert autotune.cpu_tuner().rounds == autotune.CPU_ROUNDS >= 3


@pytest.mark.parametrize("rounds", [0, -1, 1.5, "3"])
def test_rounds_must_be_a_positive_int(tmp_path, rounds):
    with pytest.raises(ValueError, match=f"expected rounds to be a positive int, got {rounds!r}"):
        _tuner(tmp_path / "t.json", _Timer(cuda=1.0), rounds=rounds)


def test_a_candidate_failing_in_a_later_round_loses(tmp_path):
    calls = []

    def timer(run):
        name = run()
        calls.append(name)
        if name == "cuda" and calls.count("cuda") == 2:
            raise RuntimeError("cannot run this layer")
        return {"cuda": 1.0, "triton": 2.0}[name]

    tuner = _tuner(tmp_path / "t.json", timer, rounds=3)
    assert tuner.choose(DEV, LAYER, CANDIDATES, "cuda") == "triton"
    assert calls.count("cuda") == 2 and calls.count("triton") == 3


def test_no_candidates_in_rounds_gives_the_default(tmp_path):
    tuner = _tuner(tmp_path / "t.json", _Timer(cuda=1.0), rounds=3)
    assert tuner.choose(DEV, LAYER, {}, "cuda") == "cuda"


def test_first_use_measures_and_stores_then_a_new_tuner_reads_without_measuring(tmp_path):
    path = tmp_path / "autotune.json"
    timer = _Timer(cuda=2.0, triton=1.0)
    tuner = _tuner(path, timer)
    assert tuner.choose(DEV, LAYER, CANDIDATES, "cuda") == "triton"
    assert sorted(timer.timed) == ["cuda", "triton"]
    assert tuner.choose(DEV, LAYER, CANDIDATES, "cuda") == "triton"  # from memory
    assert len(timer.timed) == 2
    table = json.loads(path.read_text())
    (key, entry), = table["entries"].items()
    assert table["format"] == autotune.FORMAT and entry == {"backend": "triton",
                                                            "ms": {"cuda": 2.0, "triton": 1.0}}
    assert json.loads(key) == {**_machine()(DEV), **LAYER}
    again = _Timer(cuda=1.0, triton=2.0)  # "another process": a new tuner on the same file
    assert _tuner(path, again).choose(DEV, LAYER, CANDIDATES, "cuda") == "triton"
    assert again.timed == []
    assert autotune.cached_entries(str(path)) == 1


def test_a_weight_read_at_memory_speed_is_added_to_the_measured_time(tmp_path):
    """With a stream bandwidth, each candidate's weight bytes cost bytes / bandwidth on top of
    its timing: the faster-timed candidate with the larger weight loses where the difference
    exceeds its lead, and the entry records both times. Without one, bytes change nothing."""
    bytes_ = {"cuda": 1_000_000, "triton": 4_000_000}  # at 2 GB/s: 0.5 and 2.0 ms
    timer = _Timer(cuda=2.0, triton=1.0)
    tuner = _tuner(tmp_path / "a.json", timer, stream_gbs=lambda: 2.0)
    assert tuner.choose(DEV, LAYER, CANDIDATES, "cuda", bytes_) == "cuda"  # 2.5 < 3.0
    (entry,) = json.loads((tmp_path / "a.json").read_text())["entries"].values()
    assert entry == {"backend": "cuda", "ms": {"cuda": 2.0, "triton": 1.0},
                     "weight_read_ms": {"cuda": 0.5, "triton": 2.0}}
    fast_memory = _tuner(tmp_path / "b.json", _Timer(cuda=2.0, triton=1.0),
                         stream_gbs=lambda: 20.0)
    assert fast_memory.choose(DEV, LAYER, CANDIDATES, "cuda", bytes_) == "triton"  # 2.05 > 1.2
    unset = _tuner(tmp_path / "c.json", _Timer(cuda=2.0, triton=1.0))
    assert unset.choose(DEV, LAYER, CANDIDATES, "cuda", bytes_) == "triton"


def test_the_cpu_stream_bandwidth_is_measured_once_and_plausible():
    gbs = autotune.cpu_stream_gbs()
    assert 0.5 < gbs < 2000  # GB/s: a real memory, not a cache or a broken timer
    assert autotune.cpu_stream_gbs() == gbs  # once per process


def test_autotune_off_never_measures(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "0")
    path = tmp_path / "autotune.json"
    timer = _Timer(cuda=2.0, triton=1.0)
    off = Tuner(str(path), environment=_machine(), timer=timer)
    assert off.choose(DEV, LAYER, CANDIDATES, "cuda") == "cuda"  # the heuristic
    assert timer.timed == [] and not path.exists()
    _tuner(path, timer).choose(DEV, LAYER, CANDIDATES, "cuda")  # measured elsewhere
    fresh = Tuner(str(path), environment=_machine(), timer=timer)
    assert fresh.choose(DEV, LAYER, CANDIDATES, "cuda") == "triton"  # what is cached
    assert len(timer.timed) == 2


@pytest.mark.parametrize("change", ["device", "torch", "shape", "dtype", "layout"])
def test_a_changed_key_measures_again(tmp_path, change):
    path = tmp_path / "autotune.json"
    _tuner(path, _Timer(cuda=2.0, triton=1.0)).choose(DEV, LAYER, CANDIDATES, "cuda")
    machine, layer = _machine(), dict(LAYER)
    if change == "device":
        machine = _machine(device="NVIDIA A100-SXM4-80GB")
    elif change == "torch":
        machine = _machine(torch_version="2.14.1")
    else:
        layer[{"shape": "x", "dtype": "dtype", "layout": "layout"}[change]] = {
            "shape": [4, 64, 8, 8], "dtype": "float16", "layout": "nchw"}[change]
    timer = _Timer(cuda=1.0, triton=2.0)
    assert _tuner(path, timer, environment=machine).choose(DEV, layer, CANDIDATES,
                                                           "triton") == "cuda"
    assert sorted(timer.timed) == ["cuda", "triton"]
    assert autotune.cached_entries(str(path)) == 2


def test_a_corrupt_file_warns_is_measured_and_rewritten(tmp_path):
    path = tmp_path / "autotune.json"
    path.write_text("{truncated")
    timer = _Timer(cuda=2.0, triton=1.0)
    with pytest.warns(_jsonfile.TableWarning, match="autotuning cache"):
        assert _tuner(path, timer).choose(DEV, LAYER, CANDIDATES, "cuda") == "triton"
    assert len(timer.timed) == 2
    assert autotune.cached_entries(str(path)) == 1


def test_a_foreign_entry_warns_once_and_is_measured(tmp_path):
    path = tmp_path / "autotune.json"
    key = json.dumps({**_machine()(DEV), **LAYER}, sort_keys=True)
    path.write_text(json.dumps({"format": autotune.FORMAT,
                                "entries": {key: {"backend": "tensorrt"}}}))
    timer = _Timer(cuda=2.0, triton=1.0)
    with pytest.warns(TuningCacheWarning, match="names none of"):
        assert _tuner(path, timer).choose(DEV, LAYER, CANDIDATES, "cuda") == "triton"
    assert json.loads(path.read_text())["entries"][key]["backend"] == "triton"


def test_an_unwritable_cache_warns_once_and_the_choice_is_still_used(tmp_path):
    path = tmp_path / "autotune.json"
    (tmp_path / "autotune.json.lock").mkdir()  # the write's lock cannot be opened (even as root)
    timer = _Timer(cuda=2.0, triton=1.0)
    tuner = _tuner(path, timer)
    with pytest.warns(TuningCacheWarning, match="cannot write") as record:
        assert tuner.choose(DEV, LAYER, CANDIDATES, "cuda") == "triton"
        other = dict(LAYER, x=[8, 64, 8, 8])
        assert tuner.choose(DEV, other, CANDIDATES, "cuda") == "triton"
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuner.choose(DEV, LAYER, CANDIDATES, "cuda") == "triton"  # memory
    assert len(timer.timed) == 4


def test_a_candidate_that_fails_loses(tmp_path):
    def broken():
        raise RuntimeError("no kernel for this shape")

    timer = _Timer(cuda=2.0)
    chosen = _tuner(tmp_path / "a.json", timer).choose(
        DEV, LAYER, {"triton": broken, "cuda": lambda: "cuda"}, "triton")
    assert chosen == "cuda"


def _write_entries(path, worker, n):
    tuner = _tuner(path, _Timer(cuda=1.0, triton=2.0))
    for i in range(n):
        tuner.choose(DEV, dict(LAYER, x=[worker, i, 8, 8]), CANDIDATES, "triton")


def test_concurrent_threads_and_processes_lose_no_entries(tmp_path):
    path = str(tmp_path / "autotune.json")
    # fork (spawn would import torch again per process) before the threads start: a child
    # forked while a thread holds a lock would inherit it held.
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_entries, args=(path, w, 5), daemon=True)
             for w in range(4, 7)]
    threads = [threading.Thread(target=_write_entries, args=(path, w, 5)) for w in range(4)]
    for t in (*procs, *threads):
        t.start()
    for t in threads:
        t.join(timeout=120)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert autotune.cached_entries(path) == 7 * 5


def test_the_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path / "here"))
    assert autotune.cache_path() == str(tmp_path / "here" / "autotune.json")
    monkeypatch.delenv(autotune.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_path() == str(tmp_path / "xdg" / "resnet_fast" / "autotune.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache_path() == str(tmp_path / "home" / ".cache" / "resnet_fast" /
                                        "autotune.json")


# --- the models' plans under auto -----------------------------------------------------------

@pytest.fixture
def two_candidates(monkeypatch, tmp_path):
    """auto on CPU measures cpu against reference (instead of cuda against triton), timed by
    a fake timer that prefers reference, with the table in tmp_path."""
    if not resnet_fast.available_backends()["cpu"].available:
        pytest.skip("C++ extension not built")
    monkeypatch.setattr(_fused, "tuned_backends", lambda op, dev: ("cpu", "reference"))
    timed = []

    def timer(run):
        timed.append(run.func)
        return 1.0 if run.func is resnet_fast.ops.reference.conv_bias_act else 2.0

    def tuner():
        return Tuner(str(tmp_path / "autotune.json"), timer=timer, measure=True)

    monkeypatch.setattr(autotune, "_default", tuner())
    monkeypatch.delenv("RESNET_FAST_BACKEND", raising=False)
    return timed, tuner


def test_plans_measure_each_layer_once_and_then_only_look_up(two_candidates, monkeypatch):
    timed, tuner = two_candidates
    torch.manual_seed(0)
    tv = calibrate_(torchvision.models.resnet18(), batch_size=4, image_size=32)
    model = resnet_fast.convert(tv).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), rtol=1e-4, atol=1e-4)
        # 20 convs, but layers of equal key (shape, weight, geometry, epilogue) share a choice
        measured = len(timed)
        assert 0 < measured < 2 * 20 and measured % 2 == 0
        blocks = Kept.of(model).blocks
        ops = {op for _, last, _ in blocks for op in last._tuned.values()}
        assert ops == {resnet_fast.ops.reference.conv_bias_act}
        expected = tv(x)
        with monkeypatch.context() as m:  # after the first call: no file, no environment
            m.setattr(_jsonfile, "read", None)
            m.setattr(autotune.os, "environ", None)
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
        assert len(timed) == measured
        # A new model with a new tuner ("another process") reads the table.
        monkeypatch.setattr(autotune, "_default", tuner())
        resnet_fast.convert(tv).eval()(x)
        assert len(timed) == measured
        model(torch.randn(3, 3, 32, 32))  # a new batch size is a new key
        assert len(timed) == 2 * measured


def test_a_named_backend_is_never_measured_and_autograd_reuses_the_choices(two_candidates):
    timed, _ = two_candidates
    torch.manual_seed(0)
    model = resnet_fast.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.set_backend("cpu")(x)
    assert timed == []
    with torch.no_grad():
        model.set_backend(None)(x)
    measured = len(timed)
    assert measured > 0
    model(x).sum().backward()  # autograd on: the same prepared plans, nothing measured again
    assert len(timed) == measured and model.fc.weight.grad is not None


def test_a_padded_stem_is_measured_on_its_staged_input(monkeypatch, tmp_path):
    # As on CUDA (auto resolving to triton, two candidates), with reference as the second
    # candidate and the timer preferring it: the measured op runs on the padded input.
    monkeypatch.setattr(_fused, "resolve", lambda op, device, backend: "triton")
    monkeypatch.setattr(_fused, "tuned_backends", lambda op, dev: ("triton", "reference"))
    monkeypatch.delenv("RESNET_FAST_BACKEND", raising=False)
    layers = []

    def timer(run):
        layers.append(run.args[0].shape)
        return 1.0 if run.func is resnet_fast.ops.reference.conv_bias_act else 2.0

    monkeypatch.setattr(autotune, "_default", Tuner(str(tmp_path / "t.json"), timer=timer,
                                                    measure=True))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False).half().eval()
    bn = torch.nn.BatchNorm2d(8).half().eval()
    plan = _fused.group_plans(None, [(conv, bn, True)], 1, differentiable=False)[0]
    x = torch.randn(2, 3, 6, 6).half()
    with torch.no_grad():
        out = plan(x)
        ref = torch.relu(bn(conv(x)))
        truth = torch.relu(bn.double()(conv.double()(x.double())))
    assert plan.pads and layers == [(2, PADDED_STEM_CHANNELS, 6, 6)] * 2
    assert_within_reference_error(out, ref, truth)  # docs/design.md, Tolerances


@pytest.mark.gpu
def test_on_cuda_auto_times_cuda_against_triton_once_per_layer(tmp_path, monkeypatch):
    if len(backends.tuned_backends("conv_bias_act", "cuda")) < 2:
        pytest.skip("needs both the cuda and the triton backend")
    monkeypatch.delenv("RESNET_FAST_BACKEND", raising=False)
    path = tmp_path / "autotune.json"
    monkeypatch.setattr(autotune, "_default", Tuner(str(path), measure=True))
    torch.manual_seed(0)
    tv = calibrate_(torchvision.models.resnet18(), batch_size=2, image_size=64).cuda()
    fast = resnet_fast.optimize(tv, dtype=torch.bfloat16, cuda_graphs=False)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        expected = tv(x)
    for _ in range(2):
        out = fast(x)
        assert (out.float() - expected).abs().max().item() < 0.15 * expected.abs().max().item()
    entries = json.loads(path.read_text())["entries"]
    assert 0 < len(entries) <= 20
    assert {e["backend"] for e in entries.values()} <= {"cuda", "triton"}
    stem = Kept.of(fast.model).stem
    assert stem.pads and stem.weight.shape[1] == PADDED_STEM_CHANNELS


def test_cpu_keys_name_the_build_this_process_loaded(monkeypatch):
    """The CPU keys' "build" is the extension file as it was when this process loaded it:
    read once, so a rebuild on disk during the run (here, os.stat now saying otherwise) never
    files the loaded kernels' timings under the new build's name."""
    import os

    from resnet_fast import _extension
    if not _extension.loaded():
        pytest.skip("the C++ extension is not built: no build to name")
    st = os.stat(_extension._C.__file__)
    build = autotune.cpu_environment(torch.device("cpu"))["build"]
    assert build == f"{st.st_size}-{st.st_mtime_ns}"

    class Rebuilt:
        st_size, st_mtime_ns = st.st_size + 1, st.st_mtime_ns + 1

    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if os.fspath(path) == _extension._C.__file__:
            return Rebuilt()
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    assert autotune.cpu_environment(torch.device("cpu"))["build"] == build
