"""`seqfast bench` on tiny shapes: the JSON report's structure, the plot, the listing of what cannot run.

No timing assertions: only that every (cell, backend) comes back with a time or a reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqfast import bench
from seqfast.registry import registry

SHAPES = "5,2,3,4;3,1,2,3"
FAST = ["--shapes", SHAPES, "--repeats", "2", "--min-repeats", "1", "--no-progress"]


def run_bench(argv: list[str]) -> int:
    return bench.main(argv)


def check_entries(report: dict, cells: list[str], backends: list[str], modes: list[str]) -> None:
    shapes = [tuple(s) for s in report["settings"]["shapes"]]
    seen = {}
    for row in report["results"]:
        shape = (row["shape"]["T"], row["shape"]["B"], row["shape"]["I"], row["shape"]["H"])
        seen[(row["cell"], row["backend"], row["mode"], shape)] = row
    for cell in cells:
        for backend in [bench.TORCH_NN, bench.ONNXRUNTIME, *backends]:
            for mode in modes:
                for shape in shapes:
                    row = seen.pop((cell, backend, mode, shape))
                    if row["median_s"] is not None:
                        assert row["median_s"] > 0 and row["times_s"], row
                        assert row["reason"] is None and row["error"] is None, row
                        assert row["first_call_s"] is not None and row["first_call_s"] > 0
                    else:
                        assert row["reason"] or row["error"], f"{cell} x {backend}: neither a time nor a reason"
    assert not seen, f"unexpected entries: {list(seen)}"
    auto = {(a["cell"], a["mode"], tuple(a["shape"])): a["backend"] for a in report["auto"]}
    assert set(auto) == {(c, m, s) for c in cells for m in modes for s in shapes}
    for choice in auto.values():
        assert choice in registry.backends or choice.startswith("error:"), choice


def test_json_and_plot_cover_every_backend(tmp_path: Path, capsys) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = run_bench(["--cells", "lstm", "--json", str(out), "--plot", str(png), *FAST])
    report = json.loads(out.read_text())
    assert rc == (1 if any(r["error"] for r in report["results"]) else 0)
    assert report["schema"] == "seqfast-bench/1"
    assert isinstance(report["env"]["torch_threads"], int) and report["env"]["torch_threads"] >= 1
    # the figures name the CPU model and the libraries behind them, and how calls were sampled
    assert report["env"]["cpu_model"] and report["env"]["numba"] and "onnxruntime" in report["env"]
    assert report["settings"]["burst_calls"] == bench.BURST_CALLS
    assert report["settings"]["backends"] == list(registry.backends)
    assert report["settings"]["shapes"] == [[5, 2, 3, 4], [3, 1, 2, 3]]
    check_entries(report, ["lstm"], list(registry.backends), list(bench.MODES))
    baseline = [r for r in report["results"] if r["backend"] == bench.TORCH_NN]
    assert all(r["median_s"] and r["speedup"] == pytest.approx(1.0) for r in baseline)
    # same weights and inputs as torch.nn: whatever ran agrees with it
    for row in report["results"]:
        if row["max_abs_diff"] is not None:
            assert row["max_abs_diff"] < 1e-4, row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "torch threads:" in text and "median time per call" in text


def test_every_cell_is_listed_with_reasons(tmp_path: Path) -> None:
    """Plugin cells have no torch.nn module: they appear with that reason, not as a crash."""
    out = tmp_path / "bench.json"
    backends = [b for b in ("torch", "native") if b in registry.backends]
    rc = run_bench(["--backends", ",".join(backends), "--modes", "inference", "--json", str(out), *FAST])
    report = json.loads(out.read_text())
    assert rc == 0
    check_entries(report, list(registry.cells), backends, ["inference"])
    for row in report["results"]:
        if registry.cells[row["cell"]].native_mode is None and row["backend"] in (bench.TORCH_NN, "native"):
            assert row["median_s"] is None and row["reason"], row


def test_cli_json_on_stdout_stays_parseable() -> None:
    """`seqfast bench --json` writes only JSON to stdout; the table goes to stderr."""
    cmd = [sys.executable, "-m", "seqfast.cli", "bench", "--cells", "gru", "--backends", "native,torch",
           "--modes", "training", "--json", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    check_entries(report, ["gru"], ["native", "torch"], ["training"])
    assert "median time per call" in proc.stderr


def test_bad_names_are_refused(capsys) -> None:
    assert run_bench(["--backends", "nonesuch", *FAST]) == 2
    assert "unknown backends ['nonesuch']" in capsys.readouterr().out
    assert run_bench(["--modes", "sideways", *FAST]) == 2


def test_parse_shapes() -> None:
    assert bench.parse_shapes("100,8,64,64; 5x2x3x4") == [(100, 8, 64, 64), (5, 2, 3, 4)]
    with pytest.raises(Exception, match="T,B,I,H"):
        bench.parse_shapes("1,2,3")
    assert len(bench.GRIDS["small"]) == 3 and len(bench.GRIDS["full"]) == 5
    assert all(batch <= 4 for _, batch, _, _ in bench.GRIDS["small-batch"])
    assert all(steps == 1 for steps, _, _, _ in bench.GRIDS["one-step"])


def test_no_candidate_always_runs_right_after_the_same_one(monkeypatch) -> None:
    """What runs just before a timed call changes its time (an OpenMP team left spinning): the timing rounds
    draw a new order each round, so every candidate follows several different ones."""
    order = []
    sample = bench._sample

    def recording(fn, burst):
        order.append(fn)
        return sample(fn, burst)

    monkeypatch.setattr(bench, "_sample", recording)
    results = bench.measure_case("gru", ["torch", "native"], (3, 2, 3, 4), "inference", repeats=12, min_repeats=12,
                                 max_seconds=1.0, seed=0, onnx=False)
    timed_calls = order
    assert len(timed_calls) == 12 * len(results)
    rounds = [timed_calls[i:i + len(results)] for i in range(0, len(timed_calls), len(results))]
    predecessors: dict = {}  # within a round (a rotated order would always give the same one)
    for r in rounds:
        for previous, current in zip(r, r[1:], strict=False):
            predecessors.setdefault(current, set()).add(previous)
    assert len({tuple(map(id, r)) for r in rounds}) > 1
    assert len(predecessors) == len(results) and all(len(p) >= 2 for p in predecessors.values())


def test_float64_runs_every_candidate_in_float64(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert run_bench(["--cells", "gru", "--backends", "torch,numba", "--dtype", "float64", "--json", str(out),
                      *FAST]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["dtype"] == "float64"
    rows = [r for r in report["results"] if r["shape"]["T"] == 5]
    onnx = [r for r in rows if r["backend"] == bench.ONNXRUNTIME and r["mode"] == "inference"]
    assert onnx and all("float32 only" in r["reason"] for r in onnx)
    timed = [r for r in rows if r["backend"] in ("torch", "numba") and r["median_s"] is not None]
    assert timed and all(r["max_abs_diff"] < 1e-9 for r in timed)  # float32 would differ by ~1e-7


def test_a_sample_of_a_short_call_is_the_median_of_a_burst_without_its_first_call(monkeypatch) -> None:
    """The first call of a burst pays for what the candidate before left (threads to wake): not counted."""
    times = iter([9.0, 3.0, 1.0, 2.0, 7.0])
    monkeypatch.setattr(bench, "_timed", lambda fn: (next(times), None))
    assert bench._sample(lambda: None, 4) == 2.0
    assert bench._sample(lambda: None, 1) == 7.0


def test_a_short_call_whose_second_call_is_slow_once_is_still_sampled_in_bursts(monkeypatch) -> None:
    """A module's second call of a shape may still bind or load what it runs: the burst rule reads the faster of
    two warm calls, not the second call alone."""
    calls: dict = {}
    timed = bench._timed

    def second_call_slow(fn):
        calls[fn] = calls.get(fn, 0) + 1
        took, result = timed(fn)
        return (took + 10 * bench.BURST_BELOW_S if calls[fn] == 2 else took), result

    bursts = []
    monkeypatch.setattr(bench, "_timed", second_call_slow)
    monkeypatch.setattr(bench, "_sample", lambda fn, burst: bursts.append(burst) or 1e-6)
    bench.measure_case("gru", ["torch"], (3, 2, 3, 4), "inference", repeats=3, min_repeats=3, max_seconds=1.0,
                       seed=0, onnx=False)
    assert bursts == [bench.BURST_CALLS] * 6  # torch.nn and the torch backend, three rounds each


def test_onnxruntime_is_timed_with_its_session_closed_while_others_run(monkeypatch) -> None:
    """ONNX Runtime's threads spin between runs, taking the cores from whatever runs meanwhile: its session is open
    only while it takes a sample (after one untimed call), and its samples are interleaved with the others'."""
    events = []
    runs = []

    class FakeRun(bench.OnnxRuntimeRun):
        def __init__(self, model, x) -> None:
            self.model, self.x, self.session = model, x, None
            runs.append(self)

        def open(self) -> None:
            events.append("open")
            self.session = True

        def close(self) -> None:
            events.append("close")
            self.session = None

        def __call__(self):
            assert self.session, "ONNX Runtime ran with its session closed"
            events.append("onnx")
            with torch.no_grad():
                return self.model(self.x)[0]

    monkeypatch.setattr(bench, "onnxruntime_step_fn", lambda model, x: FakeRun(model, x))
    sample = bench._sample

    def recording(fn, burst):
        if not isinstance(fn, FakeRun):
            assert not any(r.session for r in runs), "another candidate was timed while ONNX Runtime's was open"
            events.append("other")
        return sample(fn, burst)

    monkeypatch.setattr(bench, "_sample", recording)
    results = bench.measure_case("lstm", ["torch"], (3, 2, 3, 4), "inference", repeats=6, min_repeats=6,
                                 max_seconds=1.0, seed=0, onnx=True)
    onnx = next(m for m in results if m.backend == bench.ONNXRUNTIME)
    assert onnx.ok and len(onnx.times_s) == 6 and runs[0].session is None
    # each sample: open, an untimed call, a burst, close
    sample_calls = ["open", "onnx"] + ["onnx"] * bench.BURST_CALLS + ["close"]
    text = " ".join(events)
    assert text.count(" ".join(sample_calls)) == 6
    first, last = events.index("other"), len(events) - 1 - events[::-1].index("other")
    assert "onnx" in events[first:last]  # interleaved with the others, not all before or after them
    torch_nn = next(m for m in results if m.backend == bench.TORCH_NN)
    assert onnx.vs_onnxruntime == 1.0 and torch_nn.vs_onnxruntime == onnx.median_s / torch_nn.median_s
