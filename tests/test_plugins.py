"""Entry-point plugins: a good one works everywhere, broken ones become warnings and `seqfast info` lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGINS = {
    "good_cells": """
        import torch
        import seqfast

        def step(x_t, state, w):
            (h,) = state
            return (torch.tanh(x_t + torch.nn.functional.linear(h, w.weight_hh, w.bias_hh)) * 0.5,)

        def register(registry):
            registry.register_cell(seqfast.CellSpec("half_tanh", 1, ("h",), step))
    """,
    "broken_import": """
        raise ImportError("this plugin needs a package that is not installed")
    """,
    "duplicate_cell": """
        import seqfast

        def register(registry):
            registry.register_cell(seqfast.CellSpec("twin", 1, ("h",), lambda x, s, w: s))
            registry.register_cell(seqfast.get_cell("lstm"))  # clashes with the built-in
    """,
    "bad_reference": """
        import seqfast

        def register(registry):
            registry.register_cell(seqfast.CellSpec("wrong_arity", 2, ("h", "c"), lambda x, s, w: (s[0],)))
    """,
}


@pytest.fixture
def plugin_path(tmp_path: Path) -> Path:
    """A directory on sys.path holding one fake installed distribution per plugin, each with an entry point."""
    for name, source in PLUGINS.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        info = tmp_path / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[seqfast.plugins]\n{name} = {name}:register\n")
    return tmp_path


def _run(code: str, plugin_path: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(plugin_path), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300,
                          cwd=plugin_path)


def test_broken_plugins_warn_and_everything_else_works(plugin_path):
    code = textwrap.dedent("""
        import json, torch, seqfast
        from seqfast.cli import collect_info
        out, h = seqfast.Recurrent("half_tanh", 2, 3, num_layers=2)(torch.randn(4, 1, 2))
        assert float(out.abs().max()) <= 0.5
        out, (h, c) = seqfast.LSTM(2, 3)(torch.randn(4, 1, 2))   # the built-in survived the duplicate
        print(json.dumps(collect_info()["plugins"]))
        print(sorted(seqfast.registry.cells))
    """)
    result = _run(code, plugin_path)
    assert result.returncode == 0, result.stderr
    plugins = json.loads(result.stdout.splitlines()[0])
    cells = result.stdout.splitlines()[1]
    assert "good_cells:good_cells" in plugins["loaded"]  # beside any plugins installed in this environment
    failed = {f["distribution"]: f["error"] for f in plugins["failed"]}
    assert set(failed) == {"broken_import", "duplicate_cell", "bad_reference"}
    assert "ImportError: this plugin needs a package" in failed["broken_import"]
    assert "cell 'lstm' is already registered" in failed["duplicate_cell"]
    assert "must return a tuple of 2 state tensors" in failed["bad_reference"]
    assert "'twin'" not in cells, "a failing plugin's earlier registrations are rolled back"
    for name in failed:
        assert f"distribution {name!r} failed to load" in result.stderr  # one warning each


def test_seqfast_info_reports_plugins(plugin_path):
    result = subprocess.run([sys.executable, "-m", "seqfast.cli", "info"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(plugin_path)}, timeout=300, cwd=plugin_path)
    assert result.returncode == 0, result.stderr
    assert "loaded  good_cells:good_cells" in result.stdout
    assert "FAILED  broken_import:broken_import: ImportError" in result.stdout
    assert "FAILED  duplicate_cell:duplicate_cell: ValueError: cell 'lstm' is already registered" in result.stdout
    assert "half_tanh (good_cells:good_cells)" in result.stdout


def test_disable_plugins(plugin_path):
    result = _run("import seqfast; print('half_tanh' in seqfast.registry.cells)", plugin_path,
                  SEQFAST_DISABLE_PLUGINS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert "failed to load" not in result.stderr


def test_info_json(plugin_path):
    result = subprocess.run([sys.executable, "-m", "seqfast.cli", "info", "--json"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(plugin_path), "SEQFAST_BACKEND_GRU": "torch"},
                            timeout=300, cwd=plugin_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["cells"]["gru"]["requested"] == "torch"
    assert info["cells"]["gru"]["source"] == "environment variable SEQFAST_BACKEND_GRU"
    assert info["cells"]["lstm"]["backends"]["torch"]["cpu"]["ok"] is True
    assert info["cells"]["half_tanh"]["backends"]["native"]["cpu"]["ok"] is False
    assert info["config"]["environment"]["SEQFAST_BACKEND_GRU"] == "torch"
    assert {f["distribution"] for f in info["plugins"]["failed"]} == {"broken_import", "duplicate_cell",
                                                                       "bad_reference"}
