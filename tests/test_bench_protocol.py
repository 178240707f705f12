"""The benchmark's protocol on fake candidates: a candidate's time does not depend on which
one ran before it (rotated warm blocks), per-round ratios, a failing candidate becomes a row
that says why while the others run, and an interrupted run leaves the batches it finished."""

import ctypes
import json
import os
import signal
import statistics
import time
from functools import partial

import pytest
import torch
import torchvision

from resnet_fast.bench import candidates, inference, outputs, peers, report, runner, timing
from resnet_fast.calibrate import reference_model
from resnet_fast.cli import bench as bench_cli

CPU = torch.device("cpu")


# The fakes below sleep instead of computing, so that what they measure is the schedule, not
# the load other processes put on a shared 2-core machine.
BUSY = 0.010  # seconds of a fake call's own work
LEFTOVER = 0.015  # how long a fake leaves the machine busy after it returns / takes to wake


class Machine:
    """The cores the fake candidates share. A runtime that leaves its worker threads spinning
    after it returns keeps them busy a while longer: anyone else's call waits that out."""

    def __init__(self) -> None:
        self.last: str | None = None  # who ran last
        self.busy_until, self.spinner = 0.0, None

    def work(self, name: str) -> None:
        if name != self.spinner:  # the spinner's own next call puts its spinning threads to work
            time.sleep(max(0.0, self.busy_until - time.perf_counter()))
        time.sleep(BUSY)
        self.last = name

    def spinning(self) -> None:
        """ONNX Runtime with its default ``allow_spinning``."""
        self.work("spinning")
        self.busy_until, self.spinner = time.perf_counter() + LEFTOVER, "spinning"

    def waking(self) -> None:
        """A runtime whose thread pool goes idle when another one ran since its last call
        (OpenVINO): it pays to wake it."""
        if self.last != "waking":
            time.sleep(LEFTOVER)
        self.work("waking")

    def steady(self) -> None:
        self.work("steady")


def test_a_candidates_time_does_not_depend_on_which_ran_before_it():
    # Measured with the old single-call interleave (A B C A B C): ONNX Runtime's spinning
    # workers slowed the next candidate 1.5-1.9x at batch 1, and OpenVINO's idle pool cost it
    # 20%. With these fakes that interleave (spinning, steady, waking, ...) reads ~2.5x for
    # steady (always right after spinning) and waking (always waking up). In warm blocks the
    # warm-up call pays, not the timed ones.
    machine = Machine()
    alone = statistics.median(timing.time_once(machine.steady, CPU) for _ in range(5))
    candidates = {"spinning": machine.spinning, "steady": machine.steady,
                  "waking": machine.waking}
    times = timing.warm_blocks(candidates, CPU, repeats=12, block=4, warmup=1)
    # p90, not only the median: blocks without their warm-up call would have one slow call in
    # four (the first), which a median would not see. (Sleep wake-ups on a loaded VM: <1.4x.)
    slowed = {name: round(timing.quantile(timing.flat(blocks), 0.9) / alone, 2)
              for name, blocks in times.items()}
    assert all(s < 1.5 for s in slowed.values()), f"p90 / time alone: {slowed}"


def test_warm_blocks_time_each_candidate_back_to_back_rotating_the_order_every_round():
    calls = []
    fakes = {name: partial(calls.append, name) for name in "abc"}
    times = timing.warm_blocks(fakes, CPU, repeats=7, block=3, warmup=1)
    # 7 calls in blocks of at most 3: rounds of 3, 2, 2; each block after one warm-up call.
    assert "".join(calls) == "aaaabbbbcccc" + "bbbcccaaa" + "cccaaabbb"
    assert {name: [len(r) for r in blocks] for name, blocks in times.items()} == {
        name: [3, 2, 2] for name in "abc"}
    assert timing.block_sizes(9, 3) == [3, 3, 3] and timing.block_sizes(10, 3) == [3, 3, 2, 2]
    assert timing.block_sizes(1, 3) == [1]
    with pytest.raises(ValueError, match="expected repeats >= 1 and block >= 1, got 0 and 3"):
        timing.block_sizes(0, 3)


def test_ratios_are_medians_of_per_round_ratios():
    # Round 2 ran on a machine twice as slow: each round's ratio is still 2.
    baseline = [[2.0, 2.2, 1.8], [4.0, 4.4, 3.6], [2.0, 2.0, 2.0]]
    candidate = [[1.0, 1.1, 0.9], [2.0, 2.2, 1.8], [1.0, 1.0, 1.0]]
    assert timing.round_ratio(baseline, candidate) == pytest.approx(2.0)
    assert timing.round_ratio([[1.0], [3.0], [1.0]], [[1.0], [1.0], [2.0]]) == 1.0
    with pytest.raises(ValueError):  # rounds must pair up
        timing.round_ratio([[1.0], [1.0]], [[1.0]])


def _calls_of(fn):
    """``fn`` and a per-batch-size count of its calls: {batch size: calls so far}."""
    counts: dict[int, int] = {}

    def call(x):
        counts[x.shape[0]] = counts.get(x.shape[0], 0) + 1
        return fn(x, counts[x.shape[0]])
    return call, counts


@pytest.mark.slow
def test_a_failing_candidate_is_a_row_that_says_why_and_the_others_still_run(tmp_path):
    truth = reference_model("resnet18")

    def no_kernel(x, n):
        raise RuntimeError(f"no kernel for batch {x.shape[0]}\nsecond line | of it")

    def fails_when_timed(x, n):
        if n > 1:  # its first call (judged) works, its first timed call does not
            raise ValueError("out of memory")
        return truth(x)

    first, _ = _calls_of(no_kernel)
    later, _ = _calls_of(fails_when_timed)
    results = inference.run("resnet18", (1, 2), candidates=("eager", "eager_cl"), repeats=2,
                            block=1, warmup=0, image_size=32, progress=False,
                            extra_candidates=[candidates.Candidate("first", first, False),
                                              candidates.Candidate("later", later, False)])
    rows = {(r["candidate"], r["batch_size"]): r for r in results["runs"]}
    assert list(rows) == [(n, b) for b in (1, 2) for n in ("eager", "eager_cl", "first", "later")]
    for bs in (1, 2):
        assert rows["first", bs]["failed"] == (f"RuntimeError: no kernel for batch {bs}\n"
                                               "second line | of it")
        assert "first_call_s" not in rows["first", bs] and "times_s" not in rows["first", bs]
        assert rows["later", bs]["failed"] == "ValueError: out of memory"
        # Its first call was judged before it failed: the error is kept, no timing is.
        assert rows["later", bs]["max_abs_err_vs_torchvision"] < 1e-3
        assert "img_per_s" not in rows["later", bs]
        for name in ("eager", "eager_cl"):
            assert "failed" not in rows[name, bs] and len(rows[name, bs]["times_s"]) == 2
        assert rows["eager_cl", bs]["speedup_vs_eager"] > 0
    lines = report.format_table(results).splitlines()
    assert [line.split()[:2] for line in lines if "failed: " in line] == [
        ["first", "1"], ["later", "1"], ["first", "2"], ["later", "2"]]
    assert ("failed: RuntimeError: no kernel for batch 1 second line | of it"  # on one line
            in next(line for line in lines if line.startswith("first")))
    md = report.markdown_table(results)
    assert ("| later **FAILED** | 2 | failed: ValueError: out of memory | "
            + " | ".join(["-"] * 8) + " |") in md
    assert "| first **FAILED** | 1 | failed: RuntimeError: no kernel for batch 1 second line \\| " \
        "of it |" in md  # a | in the message would split the cell
    paths = outputs.write_outputs(results, tmp_path)  # the plot leaves the failed rows out
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    assert json.loads(paths[0].read_text())["runs"][2]["failed"].startswith("RuntimeError")


def test_when_eager_fails_the_others_are_not_run_at_that_batch_size():
    def broken():
        raise RuntimeError("boom")

    batch = runner.Batch({"eager": broken, "other": lambda: 1.0},
                         judge=lambda outputs: pytest.fail("nothing to judge"))
    results = runner.run_batches(lambda bs: batch, (1,), CPU, runner.Schedule(1, 1, 0), {},
                                 None, False, "")
    assert results["runs"] == [
        {"candidate": "eager", "batch_size": 1, "failed": "RuntimeError: boom"},
        {"candidate": "other", "batch_size": 1, "first_call_s": pytest.approx(0, abs=1),
         "peak_memory_mb": None,
         "failed": "not run: eager failed (the baseline of every error and ratio)"}]


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_an_interrupted_run_writes_the_batch_sizes_it_finished(tmp_path, monkeypatch, capsys,
                                                                how):
    build = inference.build_candidates

    def interrupt(x, n):
        if x.shape[0] == 2 and n == 2:  # batch 2's first timed call
            if how == "SIGINT":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # what a batch job's time limit sends
            time.sleep(5)  # the handler raises in this thread before the sleep ends
        return eager.fn(x)

    def with_interrupting(*args):
        nonlocal eager
        cands, skipped = build(*args)
        eager = cands[0]
        return cands + [candidates.Candidate("interrupting", _calls_of(interrupt)[0], False)], \
            skipped

    eager = None
    monkeypatch.setattr(inference, "build_candidates", with_interrupting)
    previous = signal.getsignal(signal.SIGTERM)
    rc = bench_cli.main(["--arch", "resnet18", "--batch", "1,2", "--repeats", "2", "--block", "1",
                         "--warmup", "0", "--image-size", "32", "--candidates", "eager",
                         "--out", str(tmp_path), "--no-progress", "--no-plot"])
    assert rc == 128 + getattr(signal, how)
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back
    data = json.loads((tmp_path / "resnet18_float32.json").read_text())
    assert [(r["candidate"], r["batch_size"]) for r in data["runs"]] == [
        ("eager", 1), ("interrupting", 1)]
    assert all(len(r["times_s"]) == 2 for r in data["runs"])
    assert data["interrupted"] == f"{how} after batch size(s) 1 of 1, 2"
    md = (tmp_path / "resnet18_float32.md").read_text()
    assert f"- interrupted ({how} after batch size(s) 1 of 1, 2)" in md
    assert "interrupting" in capsys.readouterr().out


def test_openvino_leaves_the_signal_stack_as_it_found_it():
    # OpenVINO's compile_model installs a small alternate signal stack on the calling thread;
    # Python's handlers run on it, and Ctrl-C or SIGTERM then crashed the bench (SIGSEGV).
    pytest.importorskip("openvino")
    libc = ctypes.CDLL(None, use_errno=True)

    def stack():
        s = peers._SignalStack()
        assert libc.sigaltstack(None, ctypes.byref(s)) == 0
        return s.ss_sp, s.ss_flags, s.ss_size

    before = stack()
    model = torchvision.models.resnet18(num_classes=10).eval()
    peers.OpenVino(model, torch.float32)(torch.randn(1, 3, 32, 32))
    assert stack() == before
