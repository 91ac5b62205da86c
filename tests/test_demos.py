"""`seqfast demo`: each demo's `--quick` run end to end (data, training, evaluation, plot), the listing, and the
errors that come before any work (a missing optional package, a backend that cannot run)."""

from __future__ import annotations

import math
import sys

import pytest

from seqfast import cli
from seqfast.demos import DEMOS, DemoOptions, run_demo

_results: dict[tuple[str, str], object] = {}


def quick(name: str, backend: str, out) -> object:
    """A demo's quick run, done once per (demo, backend) for the tests that look at its figures."""
    missing = DEMOS[name].missing()
    if missing:
        pytest.skip(f"demo {name} needs {missing} (pip install 'seqfast[demos]')")
    if (name, backend) not in _results:
        options = DemoOptions(backend=backend, quick=True, out=out, progress=False, threads=1)
        _results[name, backend] = run_demo(name, options)
    return _results[name, backend]


# the seq2seq demos (dates, digits-speech) have their own quick runs in tests/test_demos_seq2seq.py
@pytest.mark.parametrize("name", ["charlm", "chorales", "sunspots"])
def test_quick_demo_beats_its_trivial_baseline(name, tmp_path, capsys):
    result = quick(name, "auto", tmp_path)
    for row, values in result.table.items():
        assert all(math.isfinite(v) for v in values.values()), (row, values)
    assert result.beats(result.trivial), result.table
    assert result.seconds_per_epoch > 0 and result.epochs > 0
    for path in result.files:
        assert path.exists() and path.stat().st_size > 0
    assert result.files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert result.trivial in printed and "s per epoch" in printed


def test_chorales_writes_a_midi_file(tmp_path):
    result = quick("chorales", "auto", tmp_path)
    midi = [p for p in result.files if p.suffix == ".mid"]
    assert midi and midi[0].read_bytes()[:4] == b"MThd"


def test_sunspots_quality_is_the_same_on_the_torch_backend(tmp_path):
    default = quick("sunspots", "auto", tmp_path)
    reference = quick("sunspots", "torch", tmp_path / "torch")
    assert reference.backend == "torch"
    for metric in ("MAE", "sMAPE %"):
        assert reference.value(metric=metric) == pytest.approx(default.value(metric=metric), rel=0.02)


def test_list_names_every_demo(capsys):
    assert cli.main(["demo", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(DEMOS)


def test_a_missing_package_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "statsmodels", None)  # import statsmodels now fails, as if not installed
    assert cli.main(["demo", "sunspots", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "statsmodels" in err and "pip install 'seqfast[demos]'" in err
    assert not list(tmp_path.iterdir())
    assert cli.main(["demo", "--list"]) == 0
    assert "needs: pip install 'seqfast[demos]'" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["demo", "nope"], ["unknown demo 'nope'", "sunspots"]),
    (["demo", "sunspots", "--backend", "nope"], ["--backend", "'nope'", "native"]),
    (["demo", "sunspots", "--threads", "0"], ["--threads", "got 0"]),
])
def test_bad_arguments_are_named_before_any_work(argv, words, capsys, tmp_path):
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
    assert not list(tmp_path.iterdir())
