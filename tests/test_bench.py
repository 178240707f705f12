"""The model benchmark end to end on a tiny config, the calibration, divergence flagging,
the compile candidates, and the README's generated results block."""

import json
from pathlib import Path

import pytest
import torch
import torchvision

from resnet_fast import bench
from resnet_fast.bench import report
from resnet_fast.bench.calibrate import calibrate_

ROOT = Path(__file__).resolve().parent.parent


def test_cli_end_to_end_writes_json_markdown_and_png(tmp_path, capsys):
    rc = bench.main(["--arch", "resnet18", "--batch", "1", "--repeats", "1", "--warmup", "0",
                     "--image-size", "64", "--candidates", "eager,eager_cl,resnet_fast",
                     "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "resnet_fast:cpu" in out and "vs eager" in out
    data = json.loads((tmp_path / "resnet18_float32.json").read_text())
    names = {r["candidate"] for r in data["runs"]}
    assert {"eager", "eager_cl", "resnet_fast:reference", "resnet_fast:cpu"} <= names
    for r in data["runs"]:
        assert r["img_per_s"] > 0 and len(r["times_s"]) == 1 and not r["diverged"]
        assert r["max_abs_err_vs_torchvision"] < 1e-3
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and "git_commit" in env
    png = (tmp_path / "resnet18_float32.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "| resnet_fast:cpu |" in (tmp_path / "resnet18_float32.md").read_text()


def test_cli_rejects_bad_arguments(capsys):
    for argv, msg in ((["--batch", "x"], "expected comma-separated integers"),
                      (["--candidates", "eager,fast"], "unknown fast"),
                      (["--candidates", "eager_cl"], "must include eager"),
                      (["--weights", "/nonexistent.pth"], "no such file")):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert msg in capsys.readouterr().err


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
    broken = bench.Candidate("broken", lambda x: torch.zeros(x.shape[0], 1000), False)
    results = bench.run("resnet18", (1,), candidates=("eager",), repeats=1, warmup=0,
                        image_size=64, progress=False, extra_candidates=[broken])
    row = next(r for r in results["runs"] if r["candidate"] == "broken")
    assert row["diverged"]
    assert "broken" in report.format_table(results) and "DIVERGED" in report.format_table(results)
    assert "**DIVERGED**" in report.markdown_table(results)


def test_compile_with_freezing_candidate_matches_eager():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    fn = bench._compiled(model, None, True)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), model(x), rtol=1e-4, atol=1e-5)


def test_readme_results_block_is_generated_from_the_committed_json():
    readme = (ROOT / "README.md").read_text()
    block = report.results_block(ROOT / "benchmarks" / "results")
    assert "From `benchmarks/results/" in block  # there are committed model results
    assert block in readme, ("README results block is stale: run "
                             "`python -m resnet_fast.bench.report benchmarks/results --readme README.md`")


def test_divergence_is_judged_against_eager_in_the_same_dtype():
    # H100 bf16 numbers: eager itself is 0.337 off the fp32 logits (scale ~2); a candidate as
    # far off as eager is not diverged, one three times as far is.
    assert not bench.diverged(0.340, 0.337, 2.0, torch.bfloat16)
    assert bench.diverged(1.0, 0.337, 2.0, torch.bfloat16)
    # fp32: eager is exact (0), so the floor decides: 1e-3 of the logits' scale.
    assert not bench.diverged(1e-4, 0.0, 2.0, torch.float32)
    assert bench.diverged(1e-2, 0.0, 2.0, torch.float32)
