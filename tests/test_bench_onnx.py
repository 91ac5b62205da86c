"""`seqfast bench`'s ONNX Runtime column on a tiny grid: ratios when onnxruntime is installed, a reason when not."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch

from seqfast import bench

FAST = ["--shapes", "5,2,3,4;3,1,2,3", "--repeats", "2", "--min-repeats", "1", "--no-progress"]


def run_report(tmp_path: Path, argv: list[str]) -> tuple[int, dict]:
    out = tmp_path / "bench.json"
    rc = bench.main([*argv, "--json", str(out), *FAST])
    return rc, json.loads(out.read_text())


def rows_of(report: dict, backend: str) -> list[dict]:
    return [r for r in report["results"] if r["backend"] == backend]


def test_onnxruntime_column_has_ratios(tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    rc, report = run_report(tmp_path, ["--cells", "lstm,gru,rnn_tanh", "--backends", "native"])
    assert rc == 0
    onnx = rows_of(report, bench.ONNXRUNTIME)
    assert len(onnx) == 3 * 2 * 2  # cells x shapes x modes
    for row in onnx:
        if row["mode"] == "inference":
            assert row["error"] is None and row["reason"] is None, row
            assert row["median_s"] > 0 and row["speedup"] > 0 and row["vs_onnxruntime"] == pytest.approx(1.0)
            assert row["max_abs_diff"] <= bench.ONNX_ATOL, row
        else:
            assert row["median_s"] is None and "inference only" in row["reason"]
    for row in rows_of(report, "native"):
        assert (row["vs_onnxruntime"] is not None) == (row["mode"] == "inference"), row
    text = capsys.readouterr().out
    assert bench.ONNXRUNTIME in text and f"native vs {bench.ONNXRUNTIME}" in text


def test_onnxruntime_output_is_checked_before_timing() -> None:
    pytest.importorskip("onnxruntime")
    model, x = torch.nn.GRU(3, 4), torch.randn(5, 2, 3)
    run = bench.onnxruntime_step_fn(model, x)
    with pytest.raises(RuntimeError, match="session is closed"):  # its threads spin only while it is timed
        run()
    run.open()
    with torch.no_grad():
        torch.testing.assert_close(run(), model(x)[0], atol=bench.ONNX_ATOL, rtol=0)
        with pytest.raises(AssertionError, match="differs from torch.nn"):
            bench.onnxruntime_step_fn(_Mismatched(model), x)
    run.close()


class _Mismatched(torch.nn.Module):
    """Exports as `inner`, but answers torch.nn's call with a shifted output."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, h = self.inner(x)
        if torch.onnx.is_in_onnx_export():
            return out, h
        return out + 1e-3, h


def test_without_onnxruntime_the_column_gives_the_reason(tmp_path: Path, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    rc, report = run_report(tmp_path, ["--cells", "lstm", "--backends", "native", "--modes", "inference"])
    assert rc == 0
    onnx = rows_of(report, bench.ONNXRUNTIME)
    assert len(onnx) == 2
    for row in onnx:
        assert row["median_s"] is None and row["error"] is None
        assert row["reason"].startswith("onnxruntime is not installed"), row
    assert all(r["median_s"] and r["vs_onnxruntime"] is None for r in rows_of(report, "native"))


def test_no_onnxruntime_flag_leaves_the_column_out(tmp_path: Path) -> None:
    rc, report = run_report(tmp_path, ["--cells", "gru", "--backends", "native", "--modes", "inference",
                                       "--no-onnxruntime"])
    assert rc == 0 and report["settings"]["onnxruntime"] is False
    assert not rows_of(report, bench.ONNXRUNTIME)
