"""The model benchmark end to end on a tiny config, the calibration, divergence flagging,
the compile candidates, the peers (ONNX Runtime, OpenVINO), the ratio columns, timing hygiene
and the generated results block of benchmarks/results/README.md; the same for the training
step benchmark (``--train``)."""

import copy
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from _examples import load_script

from resnet_fast.bench import candidates, inference, peers, report, runner, timing, training
from resnet_fast.calibrate import calibrate_, reference_model
from resnet_fast.cli import bench as bench_cli

ROOT = Path(__file__).resolve().parent.parent


def test_cli_end_to_end_writes_json_markdown_and_png(tmp_path, capsys):
    rc = bench_cli.main(["--arch", "resnet18", "--batch", "1", "--repeats", "1", "--warmup", "0",
                         "--image-size", "64", "--candidates", "eager,eager_cl,resnet_fast",
                         "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "resnet_fast:cpu" in out and "vs eager_cl" in out and "vs best peer" in out
    assert "best peer at batch 1: none ran" in out  # no compile variant or runtime asked for
    data = json.loads((tmp_path / "resnet18_float32.json").read_text())
    names = {r["candidate"] for r in data["runs"]}
    assert {"eager", "eager_cl", "resnet_fast:reference", "resnet_fast:cpu"} <= names
    for r in data["runs"]:
        assert r["img_per_s"] > 0 and len(r["times_s"]) == 1 and not r["diverged"]
        assert r["max_abs_err_vs_torchvision"] < 1e-3 and r["precision"] == "float32"
        assert r["speedup_vs_eager_cl"] > 0 and r["best_peer"] is None
        assert r["speedup_vs_best_peer"] is None
    env = data["environment"]
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and "git_commit" in env
    png = (tmp_path / "resnet18_float32.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "| resnet_fast:cpu |" in (tmp_path / "resnet18_float32.md").read_text()


def test_grad_cli_times_forwards_that_record_a_graph(tmp_path, capsys, monkeypatch):
    from resnet_fast.bench import inference
    recorded = []
    real = inference.build_candidates

    def spying(*args):  # every timed call's output: does it carry a graph?
        cands, skipped = real(*args)
        for c in cands:
            c.fn = (lambda fn: lambda x: recorded.append(fn(x).grad_fn is not None) or fn(x))(c.fn)
        return cands, skipped

    monkeypatch.setattr(inference, "build_candidates", spying)
    assert bench_cli.main(["--grad", "--arch", "resnet18", "--batch", "1", "--repeats", "1",
                           "--warmup", "0", "--image-size", "64", "--out", str(tmp_path),
                           "--no-progress", "--no-plot"]) == 0
    assert recorded and all(recorded)
    data = json.loads((tmp_path / "resnet18_float32_grad.json").read_text())
    assert data["mode"] == "grad"
    assert {r["candidate"] for r in data["runs"]} >= {"eager", "eager_cl", "resnet_fast:cpu"}
    assert all(not r["diverged"] for r in data["runs"])
    assert "autograd on" in (tmp_path / "resnet18_float32_grad.md").read_text()


def test_cli_rejects_bad_arguments(capsys):
    for argv, msg in ((["--batch", "x"], "expected comma-separated integers"),
                      (["--candidates", "eager,fast"], "unknown fast"),
                      (["--candidates", "eager_cl"], "must include eager"),
                      (["--weights", "/nonexistent.pth"], "no such file"),
                      (["--weights", "/"], "expected a checkpoint file, got a directory")):
        with pytest.raises(SystemExit):
            bench_cli.main(argv)
        assert msg in capsys.readouterr().err


def test_cli_takes_a_fine_tuned_checkpoint_as_training_scripts_save_it(tmp_path, capsys):
    torch.manual_seed(0)
    state = calibrate_(torchvision.models.resnet18(num_classes=3), batch_size=2,
                       image_size=32).state_dict()
    ckpt = tmp_path / "ft.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, ckpt)
    assert bench_cli.main(["--arch", "resnet18", "--batch", "1", "--repeats", "1", "--warmup", "0",
                           "--image-size", "32", "--candidates", "eager,resnet_fast", "--weights",
                           str(ckpt), "--out", str(tmp_path), "--no-progress", "--no-plot"]) == 0
    data = json.loads((tmp_path / "resnet18_float32.json").read_text())
    assert data["weights"] == str(ckpt)
    assert all(r["max_abs_err_vs_torchvision"] < 1e-3 for r in data["runs"])


def test_calibration_gives_sane_logits():
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        raw = model.eval()(x).abs().max().item()
        calibrate_(model, batch_size=4, image_size=64)
        calibrated = model(x).abs().max().item()
    assert not model.training
    assert 1e-2 < calibrated < 1e2, calibrated
    # Random-init eval stats (mean 0, var 1) let activations grow through 16 blocks.
    assert raw > 10 * calibrated
    assert model.bn1.momentum == 0.1  # restored


def test_a_diverging_candidate_is_flagged_not_hidden():
    truth = reference_model("resnet18")  # what the bench judges against
    # Every image's true class comes last: top-1 agreement 0.
    broken = candidates.Candidate("broken", lambda x: -truth(x), False)
    results = inference.run("resnet18", (4,), candidates=("eager",), repeats=1, warmup=0,
                        image_size=64, progress=False, extra_candidates=[broken])
    row = next(r for r in results["runs"] if r["candidate"] == "broken")
    eager = next(r for r in results["runs"] if r["candidate"] == "eager")
    assert row["diverged"]
    assert row["top1_agreement_vs_torchvision"] == 0.0
    assert eager["top1_agreement_vs_torchvision"] == 1.0
    assert "top-1 agree" in report.format_table(results)
    assert "broken" in report.format_table(results) and "DIVERGED" in report.format_table(results)
    assert "**DIVERGED**" in report.markdown_table(results)


def test_compile_with_freezing_candidate_matches_eager():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU()).eval()
    fn = candidates.compiled(model, None, True)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), model(x), rtol=1e-4, atol=1e-5)


def test_results_readme_block_is_generated_from_the_committed_json():
    readme = (ROOT / "benchmarks" / "results" / "README.md").read_text()
    block = report.results_block(ROOT / "benchmarks" / "results")
    assert "From [`benchmarks/results/" in block  # there are committed model results
    assert block in readme, ("benchmarks/results/README.md's results block is stale: run "
                             "`python -m resnet_fast.bench.report benchmarks/results`")


def test_update_readme_writes_the_block_into_the_results_folders_readme(tmp_path):
    (tmp_path / "README.md").write_text(f"# results\n\n{report.BEGIN}\nold\n{report.END}\ntail\n")
    for path in (ROOT / "benchmarks" / "results" / "h100").glob("resnet50_*.json"):
        (tmp_path / "h100").mkdir(exist_ok=True)
        (tmp_path / "h100" / path.name).write_text(path.read_text())
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# results\n") and text.endswith("\ntail\n") and "\nold\n" not in text
    assert "(h100/resnet50_bfloat16.json)" in text  # the link resolves from the README
    assert not report.update_readme(tmp_path)  # up to date now


def _plot_results() -> dict:
    """A made-up result: every kind of candidate at two batch sizes, one of ours diverged."""
    runs = []
    for bs in (1, 4):
        for name, ips, peer_ratio in (("eager", 10.0, 0.5), ("eager_cl", 12.0, 0.6),
                                      ("compile", 20.0, 1.0), ("onnxruntime", 18.0, 0.9),
                                      ("resnet_fast:cpu", 22.0, 1.1),
                                      ("resnet_fast_nchw", 21.0, None), ("optimize", 24.0, 1.2)):
            median = 1e3 * bs / ips
            runs.append({"candidate": name, "batch_size": bs, "img_per_s": ips,
                         "latency_ms": {"p10": 0.9 * median, "median": median,
                                        "p90": 1.2 * median, "max": 2 * median},
                         "speedup_vs_best_peer": peer_ratio,
                         "diverged": name == "resnet_fast_nchw"})
    return {"arch": "resnet18", "dtype": "float32", "runs": runs,
            "environment": {"gpu": None, "cpu": "some CPU", "cpu_capability": "AVX2",
                            "threads": 2}}


def test_plot_colours_ours_peers_and_eager_apart_and_labels_each_bar():
    from matplotlib.colors import to_rgba
    from matplotlib.container import BarContainer

    kinds = {name: report.candidate_kind(name) for name in (
        "resnet_fast:cpu", "resnet_fast_nchw", "optimize", "eager", "eager_cl", "compile",
        "compile_max_autotune", "onnxruntime", "openvino")}
    assert kinds == {"resnet_fast:cpu": "ours", "resnet_fast_nchw": "ours", "optimize": "ours",
                     "eager": "eager", "eager_cl": "eager", "compile": "peer",
                     "compile_max_autotune": "peer", "onnxruntime": "peer", "openvino": "peer"}
    assert len({report.bar_color(n) for n in ("optimize", "compile", "eager")}) == 3
    results = _plot_results()
    fig = report.figure(results)
    try:
        axes = [ax for ax in fig.axes if ax.get_title().startswith("batch")]
        assert [ax.get_title() for ax in axes] == ["batch 1", "batch 4"]
        for ax in axes:
            bars = next(c for c in ax.containers if isinstance(c, BarContainer))
            names = [t.get_text() for t in ax.get_yticklabels()]
            assert names == list(dict.fromkeys(r["candidate"] for r in results["runs"]))
            for bar, name in zip(bars, names):
                assert bar.get_facecolor() == to_rgba(report.bar_color(name)), name
                assert (bar.get_hatch() == "//") == (name == "resnet_fast_nchw")
            labels = [t.get_text() for t in ax.texts]
            assert labels[names.index("optimize")] == "24.0  1.20x best peer"
            assert labels[names.index("resnet_fast_nchw")] == "21.0  DIVERGED"
            # error bars: from the p90 latency's img/s to the p10 latency's
            segments = bars.errorbar.lines[2][0].get_segments()
            (lo, _), (hi, _) = segments[names.index("optimize")]
            assert lo == pytest.approx(24.0 / 1.2) and hi == pytest.approx(24.0 / 0.9)
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_divergence_is_judged_against_eager_in_the_same_dtype():
    # H100 bf16 numbers: eager itself is 0.337 off the fp32 logits (scale ~2); a candidate as
    # far off as eager is not diverged, one three times as far is.
    assert not inference.diverged(0.340, 0.337, 2.0, torch.bfloat16)
    assert inference.diverged(1.0, 0.337, 2.0, torch.bfloat16)
    # fp32: eager is exact (0), so the floor decides: 1e-3 of the logits' scale.
    assert not inference.diverged(1e-4, 0.0, 2.0, torch.float32)
    assert inference.diverged(1e-2, 0.0, 2.0, torch.float32)


TINY_TRAIN = ["--train", "--arch", "resnet18", "--batch", "2", "--repeats", "1", "--warmup", "0",
              "--image-size", "64", "--no-progress"]


@pytest.mark.slow
def test_train_cli_end_to_end_writes_json_markdown_png_and_readme_block(tmp_path, capsys):
    # compile is left out: compiling resnet18's forward and backward takes ~40 s on 2 cores.
    # The compiled training step is tested on its own below, on a tiny model.
    out = tmp_path / "cpu-test"
    assert bench_cli.main(TINY_TRAIN + [
        "--candidates", "eager,eager_cl,resnet_fast,resnet_fast_nchw", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training step" in printed and "resnet_fast" in printed and "DIVERGED" not in printed
    data = json.loads((out / "resnet18_float32_train.json").read_text())
    assert data["mode"] == "train" and data["step"]["autocast"] is None
    assert data["command"].startswith("resnet-fast bench --train --arch resnet18")
    assert [r["candidate"] for r in data["runs"]] == ["eager", "eager_cl", "resnet_fast",
                                                      "resnet_fast_nchw"]
    for r in data["runs"]:
        assert r["img_per_s"] > 0 and len(r["times_s"]) == 1 and not r["diverged"]
        assert r["speedup_vs_eager"] > 0 and r["speedup_vs_best_peer"] is None
        # Same weights, batch and labels: the same loss, and after one update a lower one.
        assert r["loss_step1_abs_diff_vs_eager"] < 1e-3 * r["loss_step1"]
        assert r["loss_step2"] < r["loss_step1"]
    png = (out / "resnet18_float32_train.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| resnet_fast | 2 |" in (out / "resnet18_float32_train.md").read_text()
    block = report.results_block(tmp_path)
    assert ("From [`benchmarks/results/cpu-test/resnet18_float32_train.json`]"
            "(cpu-test/resnet18_float32_train.json)") in block
    assert "training step (forward, cross-entropy, backward" in block
    assert "| eager_cl | 2 |" in block


@pytest.mark.slow
def test_a_train_step_updates_every_weight_with_eagers_gradients():
    reference = reference_model("resnet18")
    names = ("eager", "eager_cl", "resnet_fast")
    steps = training.build_train_steps(names, "resnet18", reference, torch.float32,
                                    torch.device("cpu"))
    # float64: at batch 2 the last stages normalize over 8 to 32 values per channel, and an fp32
    # rounding difference that flips one ReLU moves a conv's gradient by several percent (seen:
    # 5% in layer3.1.conv2 of resnet_fast for one seed, 1e-13 in float64). .double() keeps the
    # Parameter objects the optimizers hold.
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = torch.tensor([3, 7])
    start = {name: p.double() for name, p in reference.named_parameters()}
    for step in steps:
        step.model.double()
        step(x.contiguous(memory_format=torch.channels_last) if step.channels_last_input else x,
             labels)
        for name, p in step.model.named_parameters():
            assert not torch.equal(p, start[name]), f"{step.name}: {name} was not updated"
    eager = dict(steps[0].model.named_parameters())
    for step in steps[1:]:
        for name, p in step.model.named_parameters():
            scale = eager[name].grad.abs().max()  # measured: <= 1e-13 of it apart
            torch.testing.assert_close(p.grad, eager[name].grad, rtol=0, atol=1e-9 * scale,
                                       msg=lambda m, s=step.name, n=name: f"{s} {n}: {m}")


def _tiny_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 10))


def test_compiled_train_step_matches_eager():
    model, cpu = _tiny_classifier(), torch.device("cpu")
    eager = training.TrainStep("eager", copy.deepcopy(model), False, False, torch.float32, cpu)
    compiled = training.TrainStep("compile", copy.deepcopy(model), True, True, torch.float32, cpu)
    x, labels = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4])
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # the second step runs on the weights the first one updated
        torch.testing.assert_close(compiled(x_cl, labels), eager(x, labels), rtol=1e-5, atol=1e-6)
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_reset_restarts_from_the_weights_with_a_fresh_optimizer():
    model = _tiny_classifier()
    start = copy.deepcopy(model.state_dict())
    step = training.TrainStep("eager", model, False, False, torch.float32, torch.device("cpu"))
    x, labels = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4])
    first = torch.stack([step(x, labels) for _ in range(3)])
    assert first[2] < first[1] < first[0]
    step.reset(start)
    # Momentum left over from the first run would make steps 2 and 3 differ.
    torch.testing.assert_close(torch.stack([step(x, labels) for _ in range(3)]), first)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_train_step_keeps_fp32_weights_and_scales_fp16_losses(dtype):
    step = training.TrainStep("eager", _tiny_classifier(), False, False, dtype, torch.device("cpu"))
    before = [p.detach().clone() for p in step.model.parameters()]
    loss = step(torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # cross_entropy runs in fp32
    assert all(p.dtype == torch.float32 for p in step.model.parameters())
    assert all(not torch.equal(p, b) for p, b in zip(step.model.parameters(), before))
    assert step.scaler.is_enabled() == (dtype == torch.float16)


def test_train_and_grad_cli_reject_candidates_they_cannot_run(capsys):
    for flags, names, msg in (
            (["--train"], "eager,compile_freezing,optimize",
             "compile_freezing, optimize cannot run with --train; "
             "expected some of eager, eager_cl, compile, resnet_fast"),
            (["--grad"], "eager,onnxruntime,resnet_fast",
             "onnxruntime cannot run with --grad; expected some of eager, eager_cl, resnet_fast"),
            (["--train", "--grad"], "eager", "expected one of them"),
            (["--train"], "eager,fast", "unknown fast; expected some of eager, eager_cl"),
            (["--train"], "eager_cl,resnet_fast", "must include eager")):
        with pytest.raises(SystemExit):
            bench_cli.main([*flags, "--candidates", names])
        assert msg in capsys.readouterr().err


def test_train_divergence_is_relative_to_eagers_loss_and_catches_nan():
    assert not training.train_diverged(6.905, 6.9, torch.float32)  # 7e-4 relative
    assert training.train_diverged(6.92, 6.9, torch.float32)  # 3e-3
    assert not training.train_diverged(7.1, 6.9, torch.bfloat16)  # 3e-2: bf16 rounding
    assert training.train_diverged(7.5, 6.9, torch.float16)  # 9e-2
    assert training.train_diverged(float("nan"), 6.9, torch.float32)
    assert training.train_diverged(float("inf"), 6.9, torch.bfloat16)


def test_host_overhead_benchmark_end_to_end(tmp_path, capsys):
    from resnet_fast.bench import overhead
    out = tmp_path / "overhead.json"
    assert overhead.main(["--repeats", "3", "--inner", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"torchvision", "torchvision_direct", "resnet_fast",
                                    "resnet_fast_direct"}
    for name in ("torchvision", "resnet_fast"):
        assert "overhead_us_per_conv" in data["results"][name]
        assert "overhead_us_per_conv" in data["host_only"][name]
    for name, r in data["host_only"].items():
        # The kernels answered from a recording: much less work than the real forward. (The
        # fastest repeats: this VM stalls for tens of ms now and then, which a median of 3
        # can still catch.)
        assert r["p10_us"] < 0.5 * data["results"][name]["p10_us"], name
    # Every replaced function is torch's own again afterwards.
    import torch.nn.functional as F
    assert F.conv2d is torch.conv2d and F.relu.__module__ == "torch.nn.functional"
    assert F.batch_norm.__module__ == "torch.nn.functional"
    assert "us/conv" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        overhead.main(["--repeats", "0"])


# Peers: ONNX Runtime and OpenVINO on the same weights, built on their first call.

@pytest.mark.slow
def test_peers_run_on_the_same_weights_and_are_judged_like_every_candidate():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    results = inference.run("resnet18", (1, 2), candidates=("eager", "onnxruntime", "openvino"),
                            repeats=2, warmup=0, image_size=64, progress=False)
    rows = {(r["candidate"], r["batch_size"]): r for r in results["runs"]}
    assert set(rows) == {(n, b) for n in ("eager", "onnxruntime", "openvino") for b in (1, 2)}
    for (name, bs), r in rows.items():
        assert not r["diverged"] and r["max_abs_err_vs_torchvision"] < 1e-3, (name, bs)
        assert r["precision"] == "float32"
        # The best peer is the faster of the two runtimes at this batch.
        fastest = min(("onnxruntime", "openvino"),
                      key=lambda n: rows[n, bs]["latency_ms"]["median"])
        assert r["best_peer"] == fastest
    # The export/conversion is part of the first call, as compilation is for torch.compile.
    for name in ("onnxruntime", "openvino"):
        assert rows[name, 1]["first_call_s"] > 5 * rows[name, 1]["latency_ms"]["median"] / 1e3
    assert rows["onnxruntime", 1]["speedup_vs_best_peer"] == pytest.approx(
        timing.round_ratio(rows[rows["eager", 1]["best_peer"], 1]["times_s"],
                           rows["onnxruntime", 1]["times_s"]))
    # Its worker threads do not spin after a run (they slowed whoever ran next), and the JSON
    # says so.
    assert results["peer_settings"]["onnxruntime"]["session.intra_op.allow_spinning"] == "0"
    assert results["peer_settings"]["openvino"]["PERFORMANCE_HINT"] == "LATENCY"


@pytest.mark.slow
def test_bfloat16_peers_say_what_they_ran_in_or_why_they_did_not_run():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    results = inference.run("resnet18", (1,), dtype=torch.bfloat16,
                            candidates=("eager", "onnxruntime", "openvino"), repeats=1, warmup=0,
                            image_size=64, progress=False)
    assert "no bfloat16 convolution" in results["skipped_candidates"]["onnxruntime"]
    ov = next(r for r in results["runs"] if r["candidate"] == "openvino")
    # OpenVINO runs bf16 where the CPU has it natively and silently f32 elsewhere: the row
    # carries what the compiled model reports, and the table shows it when it is not bf16.
    assert ov["precision"] in ("bfloat16", "float32") and not ov["diverged"]
    table = report.format_table(results)
    assert ("openvino [float32]" in table) == (ov["precision"] == "float32")
    assert "onnxruntime not run: onnxruntime's CPU provider" in table


def test_a_missing_peer_is_skipped_with_the_reason_and_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    model = torchvision.models.resnet18()
    cands, skipped = candidates.build_candidates(("eager", "openvino"), "resnet18", model,
                                                 torch.float32, torch.device("cpu"))
    assert [c.name for c in cands] == ["eager"]
    assert "openvino is not installed (pip install resnet_fast[peers])" in skipped["openvino"]
    _, skipped = candidates.build_candidates(("compile_reduce_overhead", "compile_max_autotune"),
                                             "resnet18", model, torch.float32,
                                             torch.device("cpu"))
    assert "GPU only (CUDA graphs)" in skipped["compile_reduce_overhead"]
    assert "GPU only" in skipped["compile_max_autotune"]
    assert "OpenVINO is benchmarked on CPU" in peers.openvino_unsupported(torch.device("cuda"))


def test_best_peer_is_the_fastest_torch_compile_or_runtime_that_did_not_diverge():
    times = {"eager": [[4.0], [4.0]], "eager_cl": [[3.0], [3.0]], "optimize": [[1.0], [1.0]],
             "compile": [[2.5], [2.5]], "openvino": [[1.5], [1.5]],
             "onnxruntime": [[2.0], [2.0]]}
    assert runner.best_peer(times, set()) == "openvino"  # optimize is ours, not a peer
    assert runner.best_peer(times, {"openvino"}) == "onnxruntime"
    assert runner.best_peer({"eager": [[1.0]]}, set()) is None
    row = runner.speed(times, "optimize", 2, "openvino")
    assert row["speedup_vs_eager"] == 4.0 and row["speedup_vs_eager_cl"] == 3.0
    assert row["speedup_vs_best_peer"] == 1.5 and row["img_per_s"] == 2.0
    assert runner.speed({"eager": [[1.0]]}, "eager", 1, None)["speedup_vs_eager_cl"] is None


def test_outliers_are_counted_and_named_not_dropped():
    times = {"eager": [[1.0, 1.0, 1.1], [0.9, 3.0]]}
    row = runner.speed(times, "eager", 1, None)
    assert row["outliers"] == 1 and row["latency_ms"]["max"] == 3000.0
    assert row["latency_ms"]["median"] == 1000.0  # the stall stays in the data, not the median


def test_the_collector_is_off_while_timing_and_back_on_after():
    seen = []
    timing.warm_blocks({"a": lambda: seen.append(gc.isenabled())}, torch.device("cpu"),
                       repeats=3, block=3, warmup=1)
    assert seen == [False] * 4  # warm-up calls included: it is off for all the rounds
    assert gc.isenabled() and gc.get_freeze_count() == 0
    fn = lambda: None  # noqa: E731
    assert timing.synchronized(fn, torch.device("cpu")) is fn


@pytest.mark.slow
@pytest.mark.parametrize("imported, not_loaded", [
    ("resnet_fast.deploy, resnet_fast.cli", "resnet_fast.bench"),  # only `bench` loads it
    ("resnet_fast.bench", "resnet_fast.cli"),  # a library the CLI calls, never the reverse
], ids=["deployment-cli-without-the-benchmark", "benchmark-without-the-cli"])
def test_imports_go_one_way(imported, not_loaded):
    code = (f"import sys, {imported}; "
            f"print(sorted(m for m in sys.modules if m.startswith({not_loaded!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_cpu_profile_script_groups_every_runtimes_time(tmp_path):
    """benchmarks/profile_cpu.py on a tiny model: each runtime's per-forward time lands in
    kinds (conv among them) and per conv geometry, the JSON is written, a missing peer is
    said, not fatal. (Which kind takes longest in one forward of a 32 px resnet18 is the
    machine's load, not the script's logic: not asserted.)"""
    profile = load_script(ROOT / "benchmarks" / "profile_cpu.py")
    out = tmp_path / "prof.json"
    result = profile.main(["--arch", "resnet18", "--batch", "1", "--image-size", "32",
                           "--iters", "1", "--json", str(out)])
    assert json.loads(out.read_text())["batches"]["1"].keys() == result["batches"][1].keys()
    table = result["batches"][1]
    assert set(table) == {"optimize", "onnxruntime", "openvino"}
    for name, row in table.items():
        if "not_run" in row:
            assert name == "openvino" and "openvino" in row["not_run"]
            continue
        assert row["kinds"]["conv"] > 0, (name, row)
        assert sum(row["kinds"].values()) == pytest.approx(sum(row["ops"].values()))
        # resnet18 at 32 px has 11 conv geometries; every runtime times each of them
        assert len(row["layers"]) == 11 and min(row["layers"].values()) > 0, (name, row)
        assert "3x32x32 k7x7 -> 64" in row["layers"]
        assert row["forwards_ms"] == [pytest.approx(sum(row["ops"].values()))]  # --iters 1


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                         and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="oneDNN runs no bf16 on this CPU (needs AVX-512 or AVX-NE-CONVERT)")
@pytest.mark.slow
def test_cpu_profile_script_in_bfloat16():
    """--dtype bfloat16: ours runs its bf16 oneDNN convs (each geometry timed), ONNX Runtime
    is said not to run (no bf16 CPU convolution), OpenVINO reports the precision it ran."""
    profile = load_script(ROOT / "benchmarks" / "profile_cpu.py")
    result = profile.main(["--arch", "resnet18", "--batch", "1", "--image-size", "32",
                           "--iters", "1", "--dtype", "bfloat16"])
    table = result["batches"][1]
    assert result["dtype"] == "bfloat16"
    assert "no bfloat16 convolution" in table["onnxruntime"]["not_run"]
    ours = table["optimize"]
    assert ours["kinds"]["conv"] > 0 and len(ours["layers"]) == 11
    if "not_run" not in table["openvino"]:
        assert result["openvino_precision"] in ("bf16", "f32")
        assert table["openvino"]["kinds"]["conv"] > 0


def test_fpn_backbone_benchmark_times_both_modes_and_layouts(tmp_path):
    """benchmarks/fpn_backbone.py at 64 px: inference (whole, and the body alone) and train
    step, NCHW and channels_last, each with both models timed, the features checked, the JSON
    written."""
    fpn = load_script(ROOT / "benchmarks" / "fpn_backbone.py")
    out = tmp_path / "fpn.json"
    result = fpn.main(["--batch", "1", "--image-size", "64", "--repeats", "1", "--block", "1",
                       "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {(r["mode"], r["layout"]) for r in result["runs"]} == {
        (m, layout) for m in ("inference", "body inference", "train step")
        for layout in ("nchw", "channels_last")}
    for r in result["runs"]:
        assert set(r["median_ms"]) == {"torchvision", "resnet_fast"}
        assert min(r["median_ms"].values()) > 0 and r["speedup_vs_torchvision"] > 0
        if r["mode"] != "train step":
            assert r["max_abs_err_vs_torchvision"] <= 1e-4 * r["feature_scale"]


def test_onednn_direct_probe_keeps_nan_and_matches_the_truth(tmp_path):
    """benchmarks/onednn_direct.py at 32 px, batch 1, float32: built against the
    onednn-cpu-gomp wheels (requirements-peers.txt), each distinct ResNet-50 conv run through
    torch's oneDNN op and a direct primitive, both timed; the direct one errs within twice
    torch's op against fp64 and keeps NaN where torch.relu does (its elu(-0.0) post-op)."""
    probe = load_script(ROOT / "benchmarks" / "onednn_direct.py")
    if probe.onednn_prefix() is None:
        pytest.skip("onednn-cpu-gomp / onednn-devel-cpu-gomp not installed")
    out = tmp_path / "direct.json"
    result = probe.main(["--batch-sizes", "1", "--dtypes", "float32", "--image-size", "32",
                         "--repeats", "1", "--block", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert len(result["layers"]) == 23 and set(result["totals_ms"]) == {"float32 batch 1"}
    for row in result["layers"]:
        assert row["nan_kept"], row
        err = row["max_abs_error"]
        assert err["direct"] <= 2 * err["torch_op"] + 1e-6, row
        assert min(row["ms"].values()) > 0 and row["torch_op_over_direct"] > 0
