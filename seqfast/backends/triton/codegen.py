"""Turns a CellSpec into a Python module of Triton kernels: the cell's pointwise code inlined into the templates.

How: the source of `Pointwise.forward` / `.backward` is parsed (ast), its first parameter (the math namespace `m`)
is dropped and every `m.name` (and %, //, **, abs) becomes a call of a `_sf_name` jit function of the math prelude
(kernels.py); number constants it reads (module globals or closure variables) are copied in as constexpr globals.
Anything else it reads (a helper function, an object) or any construct outside the pointwise contract is a
CodegenError, which the backend reports as its reason for not running the cell.
The tuples xg, hg, state, params (and d_new_state) stay tuples: the kernels build them from block variables and
Triton passes tuples to jit functions, so the cell's code runs as written. A staged cell's Stage functions become
pw_stage<k> and pw_stage<k>_backward the same way. The kernel templates (kernels.py; coop_kernels.py for cells
without stages) are expanded for the cell's number of gates, states, per-unit parameter values and stages, and the
whole module is written to a cache file (Triton needs inspectable source) and imported.
Nothing here imports triton: only the generated module does, when it is loaded.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ...config import setting
from ...registry import CellSpec
from ..pointwise_source import parse_pointwise, per_unit_rows
from .coop_kernels import COOP_BACKWARD_TEMPLATE, COOP_FORWARD_TEMPLATE, COOP_PRELUDE
from .kernels import BACKWARD_TEMPLATE, FORWARD_TEMPLATE, MATH_EXTENSIONS, MATH_PRELUDE

__all__ = ["CodegenError", "param_layout", "generate_source", "load_kernels", "cache_dir"]

_MATH_PREFIX = "_sf_"
# Triton's % is C's fmod, its // rejects floats and ** is missing: these become the prelude's functions, which
# follow Python's (and torch's) floor semantics
_OPERATOR_FUNCTIONS = {ast.Mod: "mod", ast.FloorDiv: "floordiv", ast.Pow: "pow"}


class CodegenError(ValueError):
    """A cell's pointwise code cannot be compiled to Triton (the message says which construct and why)."""


def param_layout(cell: CellSpec) -> list[tuple[str, int]]:
    """The per-unit parameter values a pointwise function receives, in order: (parameter name, row).

    Each name in Pointwise.params is a recurrent extra parameter of shape [k*H]; it contributes k values, value
    r of unit j being p[r*H + j].
    """
    if cell.pointwise is None:
        return []
    return [(name, row) for name in cell.pointwise.params
            for row in range(per_unit_rows(cell, name, CodegenError))]


def pointwise_source(fn: Callable, new_name: str, cell: str) -> tuple[str, dict[str, float]]:
    """(source of a Triton jit function equivalent to `fn` without its math argument, constants it reads)."""
    role = "backward" if new_name.endswith("backward") else "forward"
    where = f"cell {cell!r}: pointwise {role} ({getattr(fn, '__qualname__', fn)!s})"
    fdef, constants = parse_pointwise(fn, where=where, nargs=6 if role == "backward" else 5, new_name=new_name,
                                      prefix=_MATH_PREFIX, error=CodegenError, allowed_names=dir(builtins),
                                      operators=_OPERATOR_FUNCTIONS, float_numbers=True)
    return ast.unparse(ast.fix_missing_locations(fdef)), constants


_LIST_RE = re.compile(r"\$([A-Z0-9_]+)")
_STAGE_LOOP_RE = re.compile(r"^( *)for @k in (STAGES|reversed\(STAGES\)):")

# A line marker and the substitutions of each copy of the line, in order (@pptr and @prow before @p).
Markers = dict[str, list[dict[str, str]]]


def _gates(name: str, first: int, end: int) -> Markers:
    return {name: [{name: str(g)} for g in range(first, end)]}


def _expand_line(line: str, markers: Markers) -> list[str]:
    """`line` once per combination of the markers it holds (none: the line itself)."""
    for marker, copies in markers.items():
        if marker in line:
            out = []
            for subs in copies:
                text = line
                for key, value in subs.items():
                    text = text.replace(key, value)
                out.extend(_expand_line(text, markers))
            return out
    return [line]


def _expand(template: str, markers: Markers, stages: list[tuple[dict[str, str], Markers]], tokens: dict[str, str]
            ) -> str:
    """Repeat the lines of `template` holding a marker (@g, @s, @p, ...), unroll its `for @k in STAGES:` loops
    (one copy of the body per stage, with that stage's markers), then substitute the $TOKENS."""
    out: list[str] = []
    lines = template.splitlines()
    i = 0
    while i < len(lines):
        loop = _STAGE_LOOP_RE.match(lines[i])
        i += 1
        if loop is None:
            out.extend(_expand_line(lines[i - 1], markers))
            continue
        indent = len(loop.group(1))
        body = []
        while i < len(lines) and lines[i].startswith(" " * (indent + 1)):
            body.append(lines[i][4:])
            i += 1
        for names, stage_markers in stages if loop.group(2) == "STAGES" else stages[::-1]:
            for line in body:
                for key, value in names.items():
                    line = line.replace(key, value)
                out.extend(_expand_line(line, {**markers, **stage_markers}))
    text = "\n".join(out)

    def sub(match: re.Match) -> str:
        key = match.group(1)
        if key not in tokens:
            raise KeyError(f"template token ${key} has no value")
        return tokens[key]

    return _LIST_RE.sub(sub, text)


def _names(prefix: str, n: int) -> str:
    return "".join(f"{prefix}{i}, " for i in range(n))


def generate_source(cell: CellSpec) -> str:
    """The full source of the kernel module for `cell` (deterministic: it is also the cache key)."""
    pw = cell.pointwise
    if pw is None:
        raise CodegenError(f"cell {cell.name!r} has no pointwise math to compile")
    g, s = cell.num_gates, cell.num_states
    layout = param_layout(cell)
    names = list(dict.fromkeys(name for name, _ in layout))
    per_param = [(names.index(name), row) for name, row in layout]
    npv = len(layout)
    fwd_src, constants = pointwise_source(pw.forward, "pw_forward", cell.name)
    stage_srcs = []
    for k, stage in enumerate(pw.stages):
        src, more = pointwise_source(stage.forward, f"pw_stage{k}", cell.name)
        stage_srcs.append(src)
        constants.update(more)
        if pw.backward is not None:
            src, more = pointwise_source(stage.backward, f"pw_stage{k}_backward", cell.name)
            stage_srcs.append(src)
            constants.update(more)
    parts = [
        f"# generated by seqfast.backends.triton.codegen for cell {cell.name!r}; do not edit",
        "import os",
        "",
        "import triton",
        "import triton.language as tl",
        "",
        '_SF_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")',
        "",
        "",
        "def _sf_const(value):",
        "    # jit code may only read constexpr globals; the interpreter runs it as Python and wants the number",
        "    return value if _SF_INTERPRET else tl.constexpr(value)",
        "",
        MATH_PRELUDE,
        MATH_EXTENSIONS,
    ]
    bwd_src = None
    if pw.backward is not None:
        bwd_src, more = pointwise_source(pw.backward, "pw_backward", cell.name)
        constants.update(more)
    parts += [f"{k} = _sf_const({v!r})" for k, v in sorted(constants.items())]
    parts += ["", "@triton.jit", fwd_src, ""]
    for src in stage_srcs:
        parts += ["@triton.jit", src, ""]
    if bwd_src is not None:
        parts += ["@triton.jit", bwd_src, ""]
    tokens = {
        "G": str(g),
        "S": str(s),
        "P_ARGS": _names("P", len(names)),
        "S0_ARGS": _names("S0_", s),
        "SF_ARGS": _names("SF_", s),
        "SV_ARGS": _names("SV_", s),
        "GF_ARGS": _names("GF_", s),
        "DS0_ARGS": _names("DS0_", s),
        "DP_ARGS": _names("DP_", npv),
        "XG": _names("xg", g),
        "HGS": _names("hg", g),
        "ST": _names("st", s),
        "PV": _names("pv", npv),
        "DN": _names("dn", s),
        # the tiled forward's workspace rows (of B*H values): states [2, S] (ping-pong), each stage's vector,
        # then this step's hg [G, B, H]; the last group's product reads h (row `src`) or the last stage's vector
        "V_ROW": str(2 * s),
        "HG_ROW": str(2 * s + len(pw.stages)),
        "HK_ROW": str(2 * s + len(pw.stages) - 1) if pw.stages else "src",
    }
    # gate groups: the first takes its recurrent product with h, each later one with the stage vector before it
    groups = pw.gate_groups(g)
    markers: Markers = {
        "@p": [{"@pptr": f"P{ptr}", "@prow": str(row), "@p": str(p)} for p, (ptr, row) in enumerate(per_param)],
        **_gates("@g", 0, g),  # every gate
        "@s": [{"@s": str(i)} for i in range(s)],
        **_gates("@f", *groups[0]),  # the first group's gates
        **_gates("@l", *groups[-1]),  # the last group's gates
        **_gates("@e", 0, groups[-1][0]),  # the gates before the last group
        "@k": [{"@k": str(k)} for k in range(len(pw.stages))],
    }
    stages = [({"@k": str(k), "@op": "src" if k == 0 else str(2 * s + k - 1),
                "@xs": _names("xg", stage.gates), "@hs": _names("hg", stage.gates)},
               {**_gates("@i", 0, stage.gates),  # the gates stage k reads
                **_gates("@c", *groups[k]),  # the group that ends at stage k (its product takes @op's row)
                **_gates("@b", 0, groups[k][0]),  # the gates before that group
                **_gates("@n", *groups[k + 1])})  # the group whose product takes stage k's vector
              for k, stage in enumerate(pw.stages)]
    parts.append(_expand(FORWARD_TEMPLATE, markers, stages, tokens))
    if bwd_src is not None:
        parts.append(_expand(BACKWARD_TEMPLATE, markers, stages, tokens))
    if not pw.stages:  # the cooperative kernels exchange h once per step, with no stage vectors (coop_kernels.py)
        parts += [COOP_PRELUDE, _expand(COOP_FORWARD_TEMPLATE, markers, stages, tokens)]
        if bwd_src is not None:
            parts.append(_expand(COOP_BACKWARD_TEMPLATE, markers, stages, tokens))
    return "\n".join(parts) + "\n"


def cache_dir() -> Path:
    """Where generated kernel modules are written: $SEQFAST_CACHE_DIR/triton, else a per-user temp folder."""
    root = setting("cache_dir")
    user = os.getuid() if hasattr(os, "getuid") else "user"
    base = Path(root) if root else Path(tempfile.gettempdir()) / f"seqfast-{user}"
    path = base / "triton"
    path.mkdir(parents=True, exist_ok=True)
    return path


_LOADED: dict[tuple[str, bool], ModuleType] = {}  # (source digest, interpret) -> module
_BY_CELL: dict[tuple[CellSpec, bool], ModuleType] = {}  # the per-call fast path: no source generation
_LOCK = threading.Lock()


def load_kernels(cell: CellSpec, interpret: bool | None = None) -> ModuleType:
    """The generated kernel module of `cell` (scan_forward, scan_backward), built once per source and mode.

    TRITON_INTERPRET is read here, when the kernels are first defined: @triton.jit picks interpreter or compiler
    at decoration time, so a module is cached per mode. `interpret` overrides the variable (aot.py compiles
    real kernels while the tests run under the interpreter).
    """
    interpret = setting("triton_interpret") if interpret is None else interpret
    fast = _BY_CELL.get((cell, interpret))  # CellSpec is a frozen dataclass: hashed by value
    if fast is not None:
        return fast
    source = generate_source(cell)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    key = (digest, interpret)
    with _LOCK:
        if key in _LOADED:
            _BY_CELL[(cell, interpret)] = _LOADED[key]
            return _LOADED[key]
        path = cache_dir() / f"{cell.name}_{digest}.py"
        if not path.exists() or path.read_text() != source:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(source)
            os.replace(tmp, path)  # atomic: concurrent processes never import a half-written file
        modname = f"seqfast_triton_{cell.name}_{digest}_{'interp' if interpret else 'jit'}"
        spec = importlib.util.spec_from_file_location(modname, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            spec.loader.exec_module(module)
        except Exception:
            sys.modules.pop(modname, None)
            raise
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
        _LOADED[key] = module
        _BY_CELL[(cell, interpret)] = module
        return module
