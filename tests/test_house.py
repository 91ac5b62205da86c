"""The shape of the package: its import graph follows the layers, files stay short, settings are read in one place."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
# Over the limit until they are split into modules of their own jobs.
AWAITING_SPLIT: set[str] = set()


def _import_graph_tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_graph_has_no_cycle_and_no_upward_import():
    tool = _import_graph_tool()
    edges = tool.graph(ROOT)
    assert "seqfast.registry" in edges and "seqfast.spec" in edges["seqfast.registry"]
    assert tool.cycles(edges) == []
    assert tool.upward_imports(edges) == []
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "import_graph.py")], capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr


def test_import_graph_tool_reports_a_cycle_and_an_upward_import(tmp_path):
    """The check can fail: a cell importing the registry inside a function is both."""
    tool = _import_graph_tool()
    pkg = tmp_path / "seqfast"
    (pkg / "cells").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import registry\n")
    (pkg / "registry.py").write_text("def check():\n    from .cells.common import TORCH_MATH\n")
    (pkg / "cells" / "__init__.py").write_text("")
    (pkg / "cells" / "common.py").write_text("from ..registry import check\n")
    edges = tool.graph(tmp_path)
    assert tool.cycles(edges) == [["seqfast.cells.common", "seqfast.registry"]]
    assert tool.upward_imports(edges) == [
        "seqfast.cells.common (layer 'cells') imports seqfast.registry (layer 'registry', above it)"]


def _long_files_without_reason() -> list[str]:
    found = []
    for path in sorted((ROOT / "seqfast").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        if text.count("\n") <= MAX_LINES or name in AWAITING_SPLIT:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.startswith("Size:") for line in doc.splitlines()):
            found.append(f"{name}: {text.count(chr(10))} lines")
    return found


def test_long_files_state_why():
    """A module over MAX_LINES says why in a docstring line starting "Size:"; better, it is split by job."""
    assert _long_files_without_reason() == []


def test_awaiting_split_list_is_current():
    for name in AWAITING_SPLIT:
        assert (ROOT / name).read_text(encoding="utf-8").count("\n") > MAX_LINES, f"{name} is short now: unlist it"


def _environment_reads(path: Path) -> list[str]:
    """os.environ.get / os.getenv / os.environ[...] reads in a file, as 'file:line'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "getenv"):
            target = node.func.value
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            target = node.value
        name = ast.unparse(target) if target is not None else ""
        if name in ("os.environ", "os") and (name == "os.environ" or node.func.attr == "getenv"):
            found.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}")
    return found


def test_settings_are_read_through_config_only():
    allowed = {"seqfast/config.py", "seqfast/config_file.py", "seqfast/_env.py"}  # the settings machinery
    reads = [r for path in sorted((ROOT / "seqfast").rglob("*.py"))
             if path.relative_to(ROOT).as_posix() not in allowed for r in _environment_reads(path)]
    assert reads == []


def test_every_setting_is_documented():
    from seqfast.config import SETTINGS

    table = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert [s.env for s in SETTINGS.values() if f"`{s.env}`" not in table] == []
    assert "docs/settings.md" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name,value,message", [
    ("SEQFAST_NUMBA_THREADS", "two", "SEQFAST_NUMBA_THREADS: expected an integer >= 1, got 'two'"),
    ("SEQFAST_NUMBA_THREADS", "0", "SEQFAST_NUMBA_THREADS: expected an integer >= 1, got '0'"),
    ("SEQFAST_DISABLE_PLUGINS", "maybe", "SEQFAST_DISABLE_PLUGINS: expected one of 1, true, .*, got 'maybe'"),
    ("SEQFAST_TRITON_TILE", "big", "SEQFAST_TRITON_TILE: expected an integer >= 16, got 'big'"),
])
def test_a_bad_setting_names_the_variable_and_the_values_expected(monkeypatch, name, value, message):
    from seqfast import config

    setting = next(key for key, s in config.SETTINGS.items() if s.env == name)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        config.setting(setting)


def test_settings_parse(monkeypatch, tmp_path):
    from seqfast import config

    monkeypatch.setenv("SEQFAST_NUMBA_THREADS", " 3 ")
    monkeypatch.setenv("SEQFAST_NUMBA_NO_MKL", "Yes")
    assert config.setting("numba_threads") == 3 and config.setting("numba_no_mkl") is True
    monkeypatch.delenv("SEQFAST_NUMBA_THREADS")
    assert config.setting("numba_threads") is None
    monkeypatch.setenv("SEQFAST_CACHE_DIR", str(tmp_path))
    assert config.cache_root() == tmp_path
    (tmp_path / "seqfast.toml").write_text('calibrate = "no"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEQFAST_CALIBRATE", raising=False)
    with pytest.raises(ValueError, match="'calibrate' must be true or false, got 'no'"):
        config.setting("calibrate")


def test_importing_the_gemm_module_does_no_work():
    """The GEMM search (reading /proc/cpuinfo, check products) waits for first use; `import seqfast` imports
    neither numba nor triton."""
    code = ("import sys, seqfast; heavy = sorted({m.split('.')[0] for m in sys.modules} & {'numba', 'triton'}); "
            "print(heavy); from seqfast.backends.numba import _blas; print('SGEMM' in vars(_blas)); "
            "print(_blas.gemm_address('float64') == _blas.DGEMM_KERNEL, 'SGEMM' in vars(_blas))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:3] == ["[]", "False", "True True"]
