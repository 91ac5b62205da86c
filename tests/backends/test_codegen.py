"""The code generation shared by the kernel backends: the template expander, the loader, and what the generated
numba and triton modules look like (each kernel body once, named scratch rows, no environment change)."""

from __future__ import annotations

import os
import re

import pytest

import seqfast
from seqfast.backends.codegen import CodegenError, expand

_TEMPLATE = """\
def kernel($ARGS):
    x@g = load(@g)
    pair(@g, @s)
    for @k in STAGES:
        stage(@k, @i)
    if $DENSE:  # dropped with its line
        dense()
    elif not $STAGED:
        plain()
    else:
        other()
    if ready:
        kept()
"""


def _expand(template: str = _TEMPLATE, **changes):
    given = dict(name="demo.tmpl", markers={"@g": [{"@g": "0"}, {"@g": "1"}], "@s": [{"@s": "a"}, {"@s": "b"}]},
                 blocks={"STAGES": [({"@k": "0"}, {"@i": [{"@i": "0"}]}),
                                    ({"@k": "1"}, {"@i": [{"@i": "0"}, {"@i": "1"}]})]},
                 flags={"DENSE": False, "STAGED": False}, tokens={"ARGS": "a, b"})
    return expand(template, **{**given, **changes})


def test_expander_repeats_unrolls_chooses_and_substitutes():
    assert _expand().splitlines() == [
        "def kernel(a, b):",
        "    x0 = load(0)", "    x1 = load(1)",
        "    pair(0, a)", "    pair(0, b)", "    pair(1, a)", "    pair(1, b)",
        "    stage(0, 0)", "    stage(1, 0)", "    stage(1, 1)",
        "    plain()",
        "    if ready:", "        kept()"]


def test_expander_takes_the_first_true_branch_and_reverses_blocks():
    text = _expand(flags={"DENSE": True, "STAGED": True}).splitlines()
    assert "    dense()" in text and "    plain()" not in text and "    other()" not in text
    assert "    other()" in _expand(flags={"DENSE": False, "STAGED": True}).splitlines()
    reverse = _expand("for @k in reversed(STAGES):\n    s(@k)\n").splitlines()
    assert reverse == ["s(1)", "s(0)"]


def test_a_marker_without_copies_removes_its_lines():
    assert _expand("a\nb(@g)\nc\n", markers={"@g": []}).splitlines() == ["a", "c"]


@pytest.mark.parametrize("template,changes,message", [
    ("f($NOPE)\n", {}, r"template demo.tmpl: token \$NOPE has no value"),
    ("if $WHAT:\n    x()\n", {}, r"template demo.tmpl, line 1: flag \$WHAT has no value"),
    ("a\nfor @k in LAYERS:\n    x(@k)\n", {}, r"template demo.tmpl, line 2: block list LAYERS has no value"),
    ("if $DENSE:\nx()\n", {}, r"template demo.tmpl, line 1: 'if \$DENSE:' has no indented body"),
])
def test_a_bad_template_names_its_problem(template, changes, message):
    with pytest.raises(CodegenError, match=message):
        _expand(template, **changes)


def test_one_codegen_error_for_every_backend():
    from seqfast.backends.numba import codegen as numba_codegen
    from seqfast.backends.triton import codegen as triton_codegen

    assert numba_codegen.CodegenError is CodegenError is triton_codegen.CodegenError


@pytest.mark.parametrize("name", ["lstm", "gru", "gru_reset_before"])
def test_numba_module_emits_each_kernel_once_with_named_rows(name):
    from seqfast.backends.numba.codegen import generate_source, units_supported

    cell = seqfast.get_cell(name)
    source = generate_source(cell, "float32")
    scans = ("forward", "backward", *(("forward_units",) if units_supported(cell) else ()))
    for kernel in scans:
        assert source.count(f"\ndef {kernel}(") == 1
        body = source.split(f"\ndef {kernel}_entry(")[1].split("\ndef ")[0]
        assert f"{kernel}(gemm_fn, small, b_lo, b_hi, " in body  # the entry calls the kernel
        assert "for c in range" not in body  # and holds no copy of its body
    assert source.count("buf = np.zeros((F_ROWS, CHUNK)") == len(scans) - 1  # once in each forward
    assert re.findall(r"buf\[\d", source) == [] and re.findall(r"block\[\d", source) == []
    compile(source, name, "exec")


def test_triton_loading_leaves_the_environment_alone(monkeypatch):
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from seqfast.backends.triton.codegen import load_kernels

    cell = seqfast.get_cell("rnn_tanh")
    for value in (None, "1", "0"):
        if value is None:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", value)
        before = dict(os.environ)
        interpreted, compiled = load_kernels(cell, interpret=True), load_kernels(cell, interpret=False)
        assert dict(os.environ) == before
        assert isinstance(interpreted.scan_forward, InterpretedFunction) and interpreted._SF_INTERPRET
        assert isinstance(compiled.scan_forward, JITFunction) and not compiled._SF_INTERPRET
