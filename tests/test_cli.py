"""The resnet-fast command's conventions: --help for every subcommand, --version, --json for
check and backends, bad arguments refused by argparse (exit 2), errors in one line without a
traceback unless --debug (exit 1)."""

import json
import subprocess
import sys

import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast.cli import main

# A device index no machine has: refused whether or not a GPU is visible.
NO_SUCH_CUDA = "cuda:99"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["bench", "check", "fuse", "backends"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: resnet-fast {command}")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"resnet-fast {resnet_fast.__version__}"


@pytest.mark.slow
def test_module_entry_points_and_bench_help_without_its_extras():
    # python -m resnet_fast bench --help, with tqdm and matplotlib unimportable: a run needs
    # them, its --help must not.
    blocked = ("import runpy, sys; sys.modules['tqdm'] = sys.modules['matplotlib'] = None; "
               "sys.argv = ['resnet_fast', 'bench', '--help']; "
               "runpy.run_module('resnet_fast', run_name='__main__')")
    bench_help = _run("-c", blocked)
    assert bench_help.returncode == 0, bench_help.stderr
    assert bench_help.stdout.startswith("usage: resnet-fast bench")
    assert "--repeats" in bench_help.stdout and "--train" in bench_help.stdout
    doctor = _run("-m", "resnet_fast.doctor", "--json")
    assert doctor.returncode == 0, doctor.stderr
    assert json.loads(doctor.stdout)["resnet_fast"] == resnet_fast.__version__


def test_backends_report(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path))
    (tmp_path / "autotune.json").write_text('{"format": 1, "entries": {"a": {}, "b": {}}}')
    assert main(["backends", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__ and report["torchvision"] == torchvision.__version__
    assert report["torch_cuda"] == torch.version.cuda
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["extension"]["loaded"] == (report["extension"]["error"] is None)
    assert report["backends"]["reference"] == {"available": True,
                                               "detail": "plain PyTorch, any device"}
    assert set(report["backends"]) == set(resnet_fast.available_backends())
    assert report["autotune_cache"] == {"path": str(tmp_path / "autotune.json"), "entries": 2}
    assert main(["backends"]) == 0
    text = capsys.readouterr().out
    assert "cpu_capability" in text and "extension" in text and "reference  yes" in text
    assert f"autotune cache {tmp_path / 'autotune.json'} (2 entries)" in text


@pytest.mark.parametrize("argv, message", [
    (["check", "--arch", "resnet18", "--batch", "0"],
     "argument --batch: expected an integer >= 1, got '0'"),
    (["check", "--arch", "resnet18", "--image-size", "0"],
     "argument --image-size: expected an integer >= 1, got '0'"),
    (["check", "--arch", "resnet18", "--device", NO_SUCH_CUDA],
     f"argument --device: expected a visible CUDA device, got '{NO_SUCH_CUDA}'"),
    (["check", "--arch", "resnet18", "--device", "tpu"],
     "argument --device: expected cpu or cuda[:N], got 'tpu'"),
    (["fuse", "--arch", "resnet18", "--out", "x.pt2", "--num-classes", "0"],
     "argument --num-classes: expected an integer >= 1, got '0'"),
    (["fuse", "--arch", "resnet18", "--out", "x.pt2", "--format", "trace"],
     "argument --format: invalid choice: 'trace'"),
    (["bench", "--repeats", "0"], "argument --repeats: expected an integer >= 1, got '0'"),
    (["bench", "--batch", "1,0"], "argument --batch: expected comma-separated integers >= 1"),
    (["bench", "--warmup", "-1"], "argument --warmup: expected an integer >= 0, got '-1'"),
    (["bench", "--device", NO_SUCH_CUDA], "argument --device: expected a visible CUDA device"),
    (["check", "--arch", "resnet18", "--tolerance", "nan"],
     "argument --tolerance: expected a finite number > 0, got 'nan'"),
    (["fuse", "--arch", "resnet18", "--out", "x.pt2", "--tolerance", "-1"],
     "argument --tolerance: expected a finite number > 0, got '-1'"),
    (["backends", "--verbose"], "unrecognized arguments: --verbose"),
    (["deploy"], "invalid choice: 'deploy'"),
    ([], "the following arguments are required: command"),
])
def test_bad_arguments_exit_2_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"resnet-fast {command}: error: "), err
    return err


def test_errors_print_one_line_and_exit_1(tmp_path, capsys):
    empty, text = tmp_path / "empty.pth", tmp_path / "notes.pth"
    empty.write_bytes(b"")
    text.write_text("epoch 1: loss 0.5\n")
    fine_tuned = tmp_path / "ft.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), fine_tuned)
    base = ["--arch", "resnet18", "--image-size", "32"]
    out = ["--out", str(tmp_path / "r18.pt2")]
    for argv, message in (
            (["fuse", *base, *out, "--weights", str(empty)], "got an empty file"),
            (["fuse", *base, *out, "--weights", str(text)],
             "notes.pth is not a PyTorch checkpoint"),
            (["check", *base, "--weights", str(tmp_path / "nope.pth")], "(no such file)"),
            (["check", *base, "--weights", str(tmp_path)], "got a directory"),
            (["check", *base, "--weights", str(fine_tuned), "--num-classes", "10"],
             "expected num_classes to match the checkpoint's fc.weight (3 classes), got 10"),
            (["fuse", *base, "--out", str(text / "r18.pt2")], f"cannot write {text}/r18.pt2"),
            (["bench", *base, "--weights", str(text), "--candidates", "eager"],
             "is not a PyTorch checkpoint")):
        assert main(argv) == 1, argv
        assert message in _error_line(capsys, argv[0])
    with pytest.raises(ValueError, match=r"got an empty file"):
        main(["--debug", "check", *base, "--weights", str(empty)])


def test_bench_out_must_be_a_writable_folder(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--out", str(afile / "results")])
    assert exit_.value.code == 2
    assert f"--out: expected a folder it can write, got {afile}/results" in capsys.readouterr().err


def test_an_onnx_artefact_counts_its_external_data_file(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from resnet_fast.deploy import artefact_files

    weight = numpy_helper.from_array(torch.randn(64, 64).numpy(), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    out = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph), out, save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    files = artefact_files("onnx", out)
    assert files == [out, tmp_path / "m.onnx.data"]
    assert files[1].stat().st_size >= 64 * 64 * 4 > out.stat().st_size
    assert artefact_files("export", tmp_path / "m.pt2") == [tmp_path / "m.pt2"]
