"""Turns a CellSpec into numba kernels: one generic forward scan and one generic backward scan per cell and dtype.

Math, per step k of each batch row b (t = k, or lengths[b] - 1 - k when reverse; steps k >= lengths[b] are
padding: output 0, state kept):
    forward   hg = h W_hh^T + b_hh (dense; diagonal: w_hh * h + b_hh; none: 0)      one GEMM per step, all rows
              (training saves h W_hh^T of every step, so the backward never repeats the GEMM)
              state_t = pointwise.forward(x_proj[t], hg, state_{t-1})               fused, vectorized over units
    backward  d_x[t], d_hg[t], d_state = pointwise.backward(..., d_state + (d_out[t], 0, ...))
              d_h += d_hg[t] W_hh                                                  one GEMM per step
              after the loop: d_W_hh = sum_t d_hg[t]^T h_{t-1}   one GEMM (d_b_hh = sum_t d_hg[t]: summed in the loop)
Memory layout: x_proj / d_x [T, B, G*H] with gate g of unit j at column g*H + j; states [B, H] each; everything
C-contiguous; the generated module's header lists the buffers.

The cell's Pointwise functions are compiled from their source: the AST is rewritten so that `m.tanh(...)` calls the
numba math namespace (seqfast/backends/numba/_math.py), numeric literals take the kernel's dtype (so float32 math
stays float32 and vectorizes), and numeric globals the code reads are inlined. The time loops below are a single
template; only the unrolled tuple plumbing (G gates, S states, P per-unit params) and the recurrence term (dense,
diagonal, none) differ from cell to cell.

Each kernel also gets `<kernel>_launch` and `<kernel>_entry` (_team_kernels): the entry is the kernel's body
behind a prologue that unpacks its arguments from an int64 block, compiled as a cfunc, so torch's OpenMP team
runs the row ranges without Python (see _team.py); every call goes through it, and the plain kernel serves only
the thread-pool fallback.

The generated module is written to a cache directory (SEQFAST_CACHE_DIR, else $XDG_CACHE_HOME/seqfast/numba,
else ~/.cache/seqfast/numba; a private temporary directory when none is writable) under a name that hashes
everything it depends on, and its kernels are njit(cache=True): a later process loads the machine code instead of
compiling again.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

from ...config import cache_root
from ...registry import CellSpec
from ..pointwise_source import MATH_NAMES, parse_pointwise, per_unit_rows

TEMPLATE_VERSION = "22"
_SAFE_BUILTINS = {"abs", "min", "max", "range", "len", "float", "int", "bool", "True", "False", "None"}
_HERE = Path(__file__).resolve().parent


class CodegenError(ValueError):
    """A cell's pointwise code cannot be compiled by the numba backend (the message says why)."""


# --- the pointwise functions --------------------------------------------------------------------------------------
class _TypedNumbers(ast.NodeTransformer):
    """Numeric literals and named constants -> _F(value), so float32 kernels stay float32 (indices stay ints)."""

    def __init__(self, constants: dict[str, float]) -> None:
        self.constants = constants

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        node.value = self.visit(node.value)  # the index stays an int
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return self._typed(node.value, node)
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if isinstance(node.ctx, ast.Load) and node.id in self.constants:
            return self._typed(self.constants[node.id], node)
        return node

    @staticmethod
    def _typed(value: float, node: ast.AST) -> ast.AST:
        call = ast.Call(func=ast.Name(id="_F", ctx=ast.Load()), args=[ast.Constant(value=float(value))], keywords=[])
        return ast.copy_location(call, node)


def _function_source(fn, role: str, cell: CellSpec, nargs: int) -> str:
    """The rewritten source of one pointwise function, renamed `_pw_<role>` and without its math argument."""
    where = f"cell {cell.name!r}: pointwise {role} ({getattr(fn, '__qualname__', fn)!r})"
    node, constants = parse_pointwise(fn, where=where, nargs=nargs, new_name=f"_pw_{role}", prefix="_m_",
                                      error=CodegenError, allowed_names=_SAFE_BUILTINS)
    node.body = [_TypedNumbers(constants).visit(stmt) for stmt in node.body]
    return ast.unparse(ast.fix_missing_locations(node))


def per_unit_width(cell: CellSpec, name: str) -> int:
    """k for a per-unit extra parameter of shape [k*H] (unit j reads p[i*H + j], i < k)."""
    return per_unit_rows(cell, name, CodegenError)


_checked: dict[CellSpec, str | None] = {}


def check_cell(cell: CellSpec) -> None:
    """Raise CodegenError when the numba backend cannot compile this cell (parses, compiles nothing; memoized,
    since backend selection asks on every call)."""
    if cell not in _checked:
        try:
            _check_cell(cell)
            _checked[cell] = None
        except CodegenError as exc:
            _checked[cell] = str(exc)
    if _checked[cell] is not None:
        raise CodegenError(_checked[cell])


def _check_cell(cell: CellSpec) -> None:
    pw = cell.pointwise
    if pw is None:
        raise CodegenError(f"cell {cell.name!r} has no pointwise math")
    recurrent = [p.name for p in cell.extra_params if p.recurrent]
    unread = [n for n in recurrent if n not in pw.params]
    if unread:
        raise CodegenError(f"cell {cell.name!r}: recurrent parameters {unread} are not per-unit pointwise params")
    for name in pw.params:
        if name not in recurrent:
            raise CodegenError(f"cell {cell.name!r}: pointwise param {name!r} is not a recurrent extra parameter")
        per_unit_width(cell, name)
    _function_source(pw.forward, "forward", cell, 5)
    if pw.backward is not None:
        _function_source(pw.backward, "backward", cell, 6)
    for s, stage in enumerate(pw.stages):
        _function_source(stage.forward, f"stage{s}", cell, 5)
        if stage.backward is not None:
            _function_source(stage.backward, f"stage{s}_backward", cell, 6)


# --- the kernel template ------------------------------------------------------------------------------------------
# What every generated module starts with: imports, the dtype and its constants.
_PRELUDE = '''\
import numpy as np
from numba import carray, njit

from seqfast.backends.numba._team import address_of as _address_of
from seqfast.backends.numba._team import call_int as _call_int
from seqfast.backends.numba._team import call_int_int as _call_int_int
from seqfast.backends.numba._team import call_void as _call_void
from seqfast.backends.numba._team import gomp_parallel as _gomp_parallel
from seqfast.backends.numba._team import pointer_to as _pointer_to

from seqfast.backends.numba._blas import gemm_nn_acc as _gemm_nn_acc
from seqfast.backends.numba._blas import gemm_nn as _gemm_nn
from seqfast.backends.numba._blas import gemm_nt as _gemm_nt
from seqfast.backends.numba._blas import gemm_tn_rows as _gemm_tn_rows
from seqfast.backends.numba._blas import loop_nn_acc as _loop_nn_acc
{math_imports}

_F = np.{dtype}
_FZ, _IZ, _DZ = _F(0), np.int64(0), np.float64(0)  # element types for _pointer_to
_FSIZE = np.dtype(_F).itemsize
_U = np.uint64
_FM = {{"contract"}}  # FMA contraction only: no nnan/ninf, so NaN and inf propagate like torch
'''

_HEADER = '''\
# Generated by seqfast.backends.numba.codegen for cell {cell!r}, {dtype}. Do not edit: regenerated on change.
# Kernels: forward / backward scans over x [T, B, G*H] (gate g of unit j at column g*H + j), states [B, H] each,
# recurrent products hg [K, B, G*H] (h W_hh^T, no bias). Saved for backward, all indexed by loop step k (not time
# t: a reversed row with a length runs t = L-1-k): saved_st [S, T, B, H], every state before each step (zero at
# padding steps), and, for a dense recurrence, hg with K = T (inference passes none: the kernel's own
# [1, B, G*H] scratch, reused every step). The
# backward gets hgd [T, B, G*H] = those products (the saved ones, or for diagonal / no recurrence recomputed
# elementwise), and overwrites each (k, b) row with its gradient d_hg once read, so the weight gradient is one
# GEMM over all steps afterwards and the recurrent GEMM is never run twice. With save_preact / preact (cells that
# read x and hg only as their sum, see preactivation_only) the saved rows hold x + xbias + hg + bias instead, and
# the backward reads no x.
''' + _PRELUDE + '''

@njit(inline="always")
{forward_src}
'''

_BACKWARD_PW = '''

@njit(inline="always")
{backward_src}
'''

# A staged cell (Pointwise.stages): each stage's vector, computed per unit, is what the next group of gates takes
# its recurrent product with; these are the products of column blocks.
_STAGED_IMPORTS = '''
from seqfast.backends.numba._blas import gemm_nn_acc_cols as _gemm_nn_acc_cols
from seqfast.backends.numba._blas import gemm_nt_cols as _gemm_nt_cols
'''

_STAGE_PW = '''

@njit(inline="always")
{src}
'''

# The weight gradients' GEMM, d_W = a^T @ x over all steps, split by rows of d_W over the team (as the scans
# split their batch rows): one module per dtype, whatever the cell (see weight_grad_kernels, and
# seqfast/backends/numba/__init__.py, _weight_gradient).
_WEIGHT_GRAD = '''\
@njit(cache=_CACHE, nogil=True, fastmath=_FM, error_model='numpy')
def weight_grad(gemm_fn, small, b_lo, b_hi, a, x, c):
    """Rows b_lo..b_hi of c = a^T @ x: a [K, M], x [K, N], c [M, N], all C-contiguous (small: unused)."""
    _gemm_tn_rows(gemm_fn, a, x, c, b_lo, b_hi, _F(1.0), _F(0.0))'''
_WEIGHT_GRAD_PARAMS = [("gemm_fn", "i"), ("small", "b"), ("b_lo", "lo"), ("b_hi", "hi"), ("a", "F2"), ("x", "F2"),
                       ("c", "F2")]


def _tup(items: list[str]) -> str:
    return "(" + "".join(f"{i}, " for i in items) + ")" if items else "()"


CHUNK = 128  # units per chunk: the scratch rows' stride, a compile-time constant (see _Layout)


@dataclass(frozen=True)
class _Layout:
    """Rows of the per-kernel scratch buffer `buf[rows, CHUNK]` for one chunk of units of one batch row.

    The pointwise loop reads and writes only `buf`, at constant row offsets of a constant stride, so LLVM can prove
    its iterations independent and vectorizes it without runtime alias checks (with the kernels' many array
    arguments it otherwise gives up: "too many memory checks needed"). Copies in and out are one loop per row.
    """

    G: int
    S: int
    widths: tuple[int, ...]  # per-unit params: k of each
    recurrence: str
    groups: tuple[tuple[int, int], ...] = ()  # (first, end) gate of each recurrent product of a staged cell

    @property
    def staged(self) -> bool:
        return len(self.groups) > 1

    @property
    def P(self) -> int:
        return sum(self.widths)

    def param_rows(self, base: int) -> list[tuple[int, int, int]]:
        """(buffer row, param index, r) for every per-unit scalar."""
        rows, row = [], base
        for i, k in enumerate(self.widths):
            for r in range(k):
                rows.append((row, i, r))
                row += 1
        return rows

    def params_tuple(self, base: int) -> str:
        """The pointwise `params`: flat, k values per [k*H] parameter (value r of unit j is p[r*H + j])."""
        return _tup([f"buf[{base + q}, c]" for q in range(self.P)])


def _loop(ind: str, statements: list[str]) -> list[str]:
    """One loop over the chunk's units running `statements` (an empty list: no loop). Copies are grouped by the
    arrays they touch, a few per loop: each loop pays its vectorization's runtime overlap checks and remainder
    once, which at small hidden sizes (a 32-unit row) costs more than the copies themselves; but a loop touching
    too many arrays is left scalar (LLVM: "too many memory checks needed")."""
    if not statements:
        return []
    return [f"{ind}for c in range(cn):"] + [f"{ind}    {st}" for st in statements]


def _copy_in_params(lay: _Layout, base: int, indent: str) -> list[str]:
    return _loop(indent, [f"buf[{row}, c] = p{i}[op{i}_{r} + c]" for row, i, r in lay.param_rows(base)])


def _chunk_prologue(lay, G: int, ind: str) -> list[str]:
    """Lines shared by both scans: the sequence's own time index, the loop over 128-unit chunks, and the chunk's
    offsets."""
    lines = ["            t = L - 1 - k if reverse else k",
             f"            for j0 in range(0, H, {CHUNK}):",
             f"                n = min({CHUNK}, H - j0)"]
    return lines + _offsets(lay, ind)


def _copy_in_x(G: int, ind: str) -> list[str]:
    # the input gates are scratch rows 0..G-1 in both scans (XG = 0)
    return _loop(ind, [f"buf[{g}, c] = x[t, b, og{g} + c] + xbias[og{g} + c]" for g in range(G)])


def _offsets(lay: _Layout, ind: str) -> list[str]:
    """Unsigned chunk offsets: an index numba knows is >= 0 gets no negative-index wraparound select, which would
    otherwise turn every copy into a gather."""
    lines = [f"{ind}cn = _U(n)", f"{ind}u0 = _U(j0)"]
    lines += [f"{ind}og{g} = _U({g} * H + j0)" for g in range(lay.G)]
    lines += [f"{ind}op{i}_{r} = _U({r} * H + j0)" for _, i, r in lay.param_rows(0)]
    return lines


# Kernel parameters and their kinds: "i" int, "b" bool, "lo"/"hi" the row range, "F<n>" an n-d array of the
# kernel's dtype, "I1" int64 lengths, "D1r"/"F1r" one float64 / kernel-dtype accumulator row per range (the
# launcher takes them as [ranges, n]). One list drives the kernel's signature, its launcher and its team body.
def _common_params(lay: _Layout) -> list[tuple[str, str]]:
    w = "F2" if lay.recurrence == "dense" else "F1"
    return ([("gemm_fn", "i"), ("small", "b"), ("b_lo", "lo"), ("b_hi", "hi"), ("x", "F3"), ("xbias", "F1"),
             ("w", w), ("bias", "F1")] + [(f"p{i}", "F1") for i in range(len(lay.widths))])


def _forward_params(lay: _Layout) -> list[tuple[str, str]]:
    return (_common_params(lay) + [(f"init{i}", "F2") for i in range(lay.S)] + [(f"s{i}", "F2") for i in range(lay.S)]
            + [("lengths", "I1"), ("reverse", "b"), ("out", "F3"), ("hg", "F3"), ("saved_st", "F4"),
               ("need_saved", "b"), ("save_preact", "b"), ("gemm_nn", "b")]
            + ([("vs", "F4")] if lay.staged else []))


def _backward_params(lay: _Layout) -> list[tuple[str, str]]:
    return (_common_params(lay) + [("saved_st", "F4"), ("lengths", "I1"), ("reverse", "b"), ("grad_out", "F3")]
            + [(f"dfinal{i}", "F2") for i in range(lay.S)] + [(f"d{i}", "F2") for i in range(lay.S)]
            + [("dx", "F3"), ("write_dx", "b"), ("hgd", "F3"), ("preact", "b"), ("dbias", "D1r"), ("dxbias", "D1r")]
            + [(f"dp{i}", "F1r") for i in range(len(lay.widths))])


_ELEMENT = {"F": "_FZ", "I": "_IZ", "D": "_DZ"}


def _block_entry(name: str, kind: str, o: int) -> tuple[int, list[str], str]:
    """(entries used, the launcher's lines writing a parameter into the block at o, the team's line reading it):
    scalars as their value; arrays as address then shape; a per-range accumulator as address and row length,
    the team taking row `tid`."""
    if kind == "i":
        return 1, [f"block[{o}] = {name}"], f"{name} = block[{o}]"
    if kind == "b":
        return 1, [f"block[{o}] = 1 if {name} else 0"], f"{name} = block[{o}] != 0"
    element = _ELEMENT[kind[0]]
    if kind.endswith("r"):
        size = 8 if kind[0] == "D" else "_FSIZE"
        return 2, [f"block[{o}] = {name}.ctypes.data", f"block[{o + 1}] = {name}.shape[1]"], (
            f"{name} = carray(_pointer_to(block[{o}] + tid * block[{o + 1}] * {size}, {element}), (block[{o + 1}],))")
    dims = int(kind[1])
    shape = "".join(f"block[{o + 1 + d}], " for d in range(dims))
    return 1 + dims, [f"block[{o}] = {name}.ctypes.data"] + [f"block[{o + 1 + d}] = {name}.shape[{d}]"
                                                            for d in range(dims)], (
        f"{name} = carray(_pointer_to(block[{o}], {element}), ({shape}))")


def _team_kernels(kernel: str, params: list[tuple[str, str]], body: list[str]) -> str:
    """`<kernel>_launch` and `<kernel>_entry` (see seqfast/backends/numba/_team.py): the launcher writes every
    argument into an int64 block and, for several row ranges, starts an OpenMP team on the entry, which rebuilds
    the arguments and runs the kernel's `body` over its thread's range. Ranges a smaller team (a nested region)
    left undone, or the only one, run on the calling thread."""
    offset, pack, unpack = 6, [], []  # block: see _TEAM
    for name, kind in params:
        if kind not in ("lo", "hi"):
            used, writes, read = _block_entry(name, kind, offset)
            pack += writes
            unpack.append(read)
            offset += used
    passed = [n for n, k in params if k not in ("lo", "hi")]
    return _TEAM.format(kernel=kernel, passed=", ".join(passed), size=offset, body="\n".join(body),
                        pack="".join(f"    {line}\n" for line in pack),
                        unpack="".join(f"    {line}\n" for line in unpack))


# block: [0] omp_get_thread_num, [1] MKL_Set_Num_Threads_Local or 0, [2] ranges count, [3] ranges [count, 2],
# [4] done flags [count], [5] the range to run (-1: the OpenMP thread's own), then the parameters (_block_entry).
# `<kernel>_entry` is the kernel's body behind an unpacking prologue, made a cfunc by entry_address(); every
# call (one range or several) goes through it, so the kernel is compiled once, whatever splits its rows.
_TEAM = """\
@njit(cache=_CACHE, nogil=True)
def {kernel}_launch(gomp, entry, thread_num, mkl_local, ranges, {passed}):
    count = ranges.shape[0]
    done = np.zeros(count, dtype=np.int64)
    block = np.empty({size}, dtype=np.int64)
    block[0] = thread_num
    block[1] = mkl_local
    block[2] = count
    block[3] = ranges.ctypes.data
    block[4] = done.ctypes.data
    block[5] = -1
{pack}    if count > 1:
        _gomp_parallel(gomp, entry, block.ctypes.data, count)
    for r in range(count):
        if done[r] == 0:
            block[5] = r
            _call_void(entry, block.ctypes.data)


def {kernel}_entry(data):
    block = carray(_pointer_to(_address_of(data), _IZ), ({size},))
    tid = block[5] if block[5] >= 0 else _call_int(block[0])
    if tid >= block[2]:
        return
    ranges = carray(_pointer_to(block[3], _IZ), (block[2], 2))
    done = carray(_pointer_to(block[4], _IZ), (block[2],))
    b_lo = ranges[tid, 0]
    b_hi = ranges[tid, 1]
{unpack}    blas = block[1] != 0 and not small  # MKL held to one thread in each range
    previous = _call_int_int(block[1], 1) if blas else 0
{body}
    if blas:
        _call_int_int(block[1], previous)
    done[tid] = 1"""


def _forward_kernel(lay: _Layout) -> str:
    G, S, P = lay.G, lay.S, lay.P
    XG, HG, ST, PR = 0, G, 2 * G, 2 * G + S
    NS = PR + P
    rows = NS + S
    L: list[str] = []
    a = L.append
    a("@njit(cache=_CACHE, nogil=True, fastmath=_FM, error_model='numpy')")
    a(f"def forward({', '.join(n for n, _ in _forward_params(lay))}):")
    a('    """Rows b_lo..b_hi of the forward scan (threads take disjoint row ranges; rows never interact).')
    a('    s<i> start as a copy of init<i> (left unchanged) and end as the final states.')
    a('    small: the recurrent GEMM runs as a numba loop instead of calling MKL; gemm_nn: MKL takes it as N,N."""')
    a("    T = x.shape[0]")
    a("    H = s0.shape[1]")
    a("    one = _F(1.0)")
    a("    zero = _F(0.0)")
    a(f"    buf = np.zeros(({rows}, {CHUNK}), dtype=_F)")
    # products nobody reads after the step (inference) live in this thread's own scratch; the caller passes none
    a("    if hg.shape[0] == 0:")
    a("        hg = np.empty((1, x.shape[1], x.shape[2]), dtype=_F)")
    # explicit loops, not slice assignment: numba's broadcasting assignment costs seconds of cold compile
    a("    for b in range(b_lo, b_hi):")
    a("        for j in range(H):")
    for i in range(S):
        a(f"            s{i}[b, j] = init{i}[b, j]")
    if lay.recurrence == "dense":
        a("    h_rows = s0[b_lo:b_hi]")
        # hg = h @ W_hh^T as an N,N product over wt = W_hh^T, for the loop GEMM (the summed index outermost) and
        # for MKL's AVX-512 kernel (gemm_nn: faster N,N than T,N, see _blas._direct_kernels); other BLAS take W_hh
        # as it is (T,N). Transposed here, once per call and thread: cheaper than a numpy call from Python, and
        # never cached across calls (weights change in place, even behind autograd's back)
        a("    transposed = small or gemm_nn")
        a("    wt = np.empty((w.shape[1], w.shape[0]) if transposed else (0, 0), dtype=_F)")
        # rows of wt written in order, w read down its columns, in bands of 16 rows of w once w outgrows the L2
        # cache (each band's lines stay cached while its columns are read): H = 64 / 128 / 256 took 10 / 39 /
        # 200 us where writing down wt's columns, each write a new cache line, took 16 / 173 / 1,800
        a("    if transposed and w.shape[0] * w.shape[1] <= 65536:")
        a("        for q in range(w.shape[1]):")
        a("            for n in range(w.shape[0]):")
        a("                wt[q, n] = w[n, q]")
        a("    elif transposed:")
        a("        for n0 in range(0, w.shape[0], 16):")
        a("            for q in range(w.shape[1]):")
        a("                for n in range(n0, min(n0 + 16, w.shape[0])):")
        a("                    wt[q, n] = w[n, q]")
    a("    for k in range(T):")
    if lay.staged:
        a("        kk = k if hg.shape[0] == T else 0  # saved for backward, or one reused buffer")
        a("        hg_rows = hg[kk, b_lo:b_hi]")
        for s, (first, end) in enumerate(lay.groups):
            L.extend(_staged_product_forward("h_rows" if s == 0 else f"vs[{s - 1}, kk, b_lo:b_hi]", first, end))
            if s + 1 < len(lay.groups):
                L.extend(_stage_pass_forward(lay, s))
    elif lay.recurrence == "dense":
        a("        kk = k if hg.shape[0] == T else 0  # saved for backward, or one reused buffer")
        a("        hg_rows = hg[kk, b_lo:b_hi]")
        a("        if small:  # hg = h @ W_hh^T for these rows")
        a("            hg_rows[:, :] = zero")
        a("            _loop_nn_acc(h_rows, wt, hg_rows)")
        a("        elif gemm_nn:")
        a("            _gemm_nn(gemm_fn, h_rows, wt, hg_rows, one, zero)")
        a("        else:")
        a("            _gemm_nt(gemm_fn, h_rows, w, hg_rows, one, zero)")
    a("        for b in range(b_lo, b_hi):")
    a("            L = lengths[b]")
    a("            if k >= L:  # padding step: output 0, state kept; saved rows 0 so the weight GEMM skips them")
    a("                out[k, b, :] = zero")
    a("                if need_saved:")
    a("                    saved_st[:, k, b, :] = zero")
    a("                continue")
    ind = "                "
    L.extend(_chunk_prologue(lay, G, ind))
    L.extend(_copy_in_x(G, ind))
    rhs = {"dense": "hg[kk, b, og{g} + c] + bias[og{g} + c]",
           "diagonal": "w[og{g} + c] * s0[b, u0 + c] + bias[og{g} + c]", "none": "zero"}[lay.recurrence]
    L.extend(_loop(ind, [f"buf[{HG + g}, c] = " + rhs.format(g=g) for g in range(G)]))
    L.extend(_loop(ind, [f"buf[{ST + i}, c] = s{i}[b, u0 + c]" for i in range(S)]))
    L.extend(_copy_in_params(lay, PR, ind))
    a(f"{ind}for c in range(cn):  # the fused pointwise math, vectorized over units")
    xg = _tup([f"buf[{XG + g}, c]" for g in range(G)])
    hgv = _tup([f"buf[{HG + g}, c]" for g in range(G)])
    st = _tup([f"buf[{ST + i}, c]" for i in range(S)])
    a(f"{ind}    ns = _pw_forward({xg}, {hgv}, {st}, {lay.params_tuple(PR)})")
    for i in range(S):
        a(f"{ind}    buf[{NS + i}, c] = ns[{i}]")
    L.extend(_loop(ind, [f"s{i}[b, u0 + c] = buf[{NS + i}, c]" for i in range(S)]
                   + [f"out[t, b, u0 + c] = buf[{NS}, c]"]))
    if lay.recurrence == "dense":  # the whole pre-activation replaces h W_hh^T (see preactivation_only)
        a(f"{ind}if save_preact:")
        L.extend(_loop(ind + "    ", [f"hg[kk, b, og{g} + c] = buf[{XG + g}, c] + buf[{HG + g}, c]"
                                     for g in range(G)]))
    a(f"{ind}if need_saved:")
    L.extend(_loop(ind + "    ", [f"saved_st[{i}, k, b, u0 + c] = buf[{ST + i}, c]" for i in range(S)]))
    return "\n".join(L)


def _staged_product_forward(rows: str, first: int, end: int) -> list[str]:
    """hg's columns of gates first..end-1 = rows @ W_hh[those rows]^T (a staged cell's product of one group)."""
    c0, c1 = f"{first} * H", f"{end} * H"
    return [f"        if small:  # hg[:, gates {first}..{end - 1}] = {rows.split('[')[0]} @ W_hh[their rows]^T",
            "            for r in range(hg_rows.shape[0]):",
            f"                for q in range({c0}, {c1}):",
            "                    hg_rows[r, q] = zero",
            f"            _loop_nn_acc({rows}, wt[:, {c0}:{c1}], hg_rows[:, {c0}:{c1}])",
            "        else:",
            f"            _gemm_nt_cols(gemm_fn, {rows}, w[{c0}:{c1}], hg_rows, {c0}, one, zero)"]


def _stage_pass_forward(lay: _Layout, s: int) -> list[str]:
    """Stage s of a staged cell's forward step: its vector vs[s] from the gates before it (0 at padding steps)."""
    n = lay.groups[s][1]
    XG, HG, ST, PR = 0, lay.G, 2 * lay.G, 2 * lay.G + lay.S
    NS = PR + lay.P
    ind = "                "
    L = ["        for b in range(b_lo, b_hi):",
         "            L = lengths[b]",
         "            if k >= L:",
         "                for j in range(H):",
         f"                    vs[{s}, kk, b, j] = zero",
         "                continue"]
    L += _chunk_prologue(lay, lay.G, ind)
    L += _loop(ind, [f"buf[{g}, c] = x[t, b, og{g} + c] + xbias[og{g} + c]" for g in range(n)])
    L += _loop(ind, [f"buf[{HG + g}, c] = hg[kk, b, og{g} + c] + bias[og{g} + c]" for g in range(n)])
    L += _loop(ind, [f"buf[{ST + i}, c] = s{i}[b, u0 + c]" for i in range(lay.S)])
    L += _copy_in_params(lay, PR, ind)
    xg = _tup([f"buf[{XG + g}, c]" for g in range(n)])
    hgv = _tup([f"buf[{HG + g}, c]" for g in range(n)])
    st = _tup([f"buf[{ST + i}, c]" for i in range(lay.S)])
    L += [f"{ind}for c in range(cn):",
          f"{ind}    buf[{NS}, c] = _pw_stage{s}({xg}, {hgv}, {st}, {lay.params_tuple(PR)})"]
    L += _loop(ind, [f"vs[{s}, kk, b, u0 + c] = buf[{NS}, c]"])
    return L


class _BackwardRows(NamedTuple):
    """The scratch rows of a backward pass, in order: the input gates, the recurrent gates, the states, the new
    states' gradients, the per-unit parameters, then the results (d_xg, d_hg, d_state, d_params); `end` is the
    row count."""

    XG: int
    HG: int
    ST: int
    DN: int
    PR: int
    DX: int
    DH: int
    DS: int
    DP: int
    end: int


def _backward_rows(lay: _Layout) -> _BackwardRows:
    G, S, P = lay.G, lay.S, lay.P
    PR = 2 * G + 2 * S
    DX = PR + P
    DS = DX + 2 * G
    return _BackwardRows(0, G, 2 * G, 2 * G + S, PR, DX, DX + G, DS, DS + S, DS + S + P)


def _pointwise_backward_call(lay: _Layout, fn: str, gates: int, d_new: str, ind: str, note: str = "") -> list[str]:
    """The loop over a chunk's units that calls a pointwise backward `fn` (the cell's, or a stage's over its first
    `gates` gates) on the scratch rows and spreads its (d_xg, d_hg, d_state, d_params) into the result rows."""
    r = _backward_rows(lay)
    xg = _tup([f"buf[{r.XG + g}, c]" for g in range(gates)])
    hgv = _tup([f"buf[{r.HG + g}, c]" for g in range(gates)])
    st = _tup([f"buf[{r.ST + i}, c]" for i in range(lay.S)])
    L = [f"{ind}for c in range(cn):{note}",
         f"{ind}    res = {fn}({xg}, {hgv}, {st}, {lay.params_tuple(r.PR)}, {d_new})"]
    for g in range(gates):
        L += [f"{ind}    buf[{r.DX + g}, c] = res[0][{g}]", f"{ind}    buf[{r.DH + g}, c] = res[1][{g}]"]
    L += [f"{ind}    buf[{r.DS + i}, c] = res[2][{i}]" for i in range(lay.S)]
    L += [f"{ind}    buf[{row}, c] = res[3][{q}]" for q, (row, _, _) in enumerate(lay.param_rows(r.DP))]
    return L


def _backward_kernel(lay: _Layout) -> str:
    G, S = lay.G, lay.S
    XG, HG, ST, DN, PR, DX, DH, DS, DP, rows = _backward_rows(lay)
    L: list[str] = []
    a = L.append
    a("@njit(cache=_CACHE, nogil=True, fastmath=_FM, error_model='numpy')")
    a(f"def backward({', '.join(n for n, _ in _backward_params(lay))}):")
    a('    """Rows b_lo..b_hi of the backward scan; d<i> hold the running state gradients (start: a copy of dfinal<i>,')
    a('    the grad of the final state; end: grad of state0); dp<i> accumulate per-unit parameter gradients and')
    a('    dbias the bias gradient, sum over rows and steps of d_hg, and dxbias that of xbias, the sum of d_x (one')
    a('    thread per call). write_dx=False: d_x equals d_hg, so is neither written nor summed (see dx_is_dhg)."""')
    a("    T = hgd.shape[0]  # x may be a placeholder (preact)")
    a("    H = d0.shape[1]")
    a("    one = _F(1.0)")
    a("    zero = _F(0.0)")
    a(f"    buf = np.zeros(({rows}, {CHUNK}), dtype=_F)")
    a("    for b in range(b_lo, b_hi):")
    a("        for j in range(H):")
    for i in range(S):
        a(f"            d{i}[b, j] = dfinal{i}[b, j]")
    if lay.recurrence == "dense":
        a("    d_rows = d0[b_lo:b_hi]")
    if lay.staged:  # a step's gradients of x and hg, complete once every stage's backward has added its part
        a("    dxs = np.zeros((b_hi - b_lo, hgd.shape[2]), dtype=_F)")
        a("    dhs = np.zeros((b_hi - b_lo, hgd.shape[2]), dtype=_F)")
        a("    dv = np.zeros((b_hi - b_lo, H), dtype=_F)  # the gradient of a stage's vector")
    a("    for k in range(T - 1, -1, -1):")
    a("        for b in range(b_lo, b_hi):")
    a("            L = lengths[b]")
    a("            if k >= L:  # padding: gradients 0, the state gradient passes through")
    a("                dx[k, b, :] = zero")
    a("                hgd[k, b, :] = zero")
    if lay.staged:
        a("                dhs[b - b_lo, :] = zero")
    a("                continue")
    ind = "                "
    L.extend(_chunk_prologue(lay, G, ind))
    a(f"{ind}if preact:  # hgd holds the whole pre-activation: x and the biases are in it")
    L.extend(_loop(ind + "    ", [f"buf[{g}, c] = hgd[k, b, og{g} + c]" for g in range(G)]
                   + [f"buf[{HG + g}, c] = zero" for g in range(G)]))
    a(f"{ind}else:")
    L.extend(_copy_in_x(G, ind + "    "))
    L.extend(_loop(ind + "    ", [f"buf[{HG + g}, c] = hgd[k, b, og{g} + c] + bias[og{g} + c]" for g in range(G)]))
    L.extend(_loop(ind, [f"buf[{ST + i}, c] = saved_st[{i}, k, b, u0 + c]" for i in range(S)]))
    L.extend(_loop(ind, [f"buf[{DN}, c] = d0[b, u0 + c] + grad_out[t, b, u0 + c]"]
                   + [f"buf[{DN + i}, c] = d{i}[b, u0 + c]" for i in range(1, S)]))
    L.extend(_copy_in_params(lay, PR, ind))
    L.extend(_pointwise_backward_call(lay, "_pw_backward", G, _tup([f"buf[{DN + i}, c]" for i in range(S)]), ind,
                                      "  # the fused pointwise derivative, vectorized over units"))
    if lay.staged:
        L.extend(_loop(ind, [f"dxs[b - b_lo, og{g} + c] = buf[{DX + g}, c]" for g in range(G)]))
        L.extend(_loop(ind, [f"dhs[b - b_lo, og{g} + c] = buf[{DH + g}, c]" for g in range(G)]))
        L.extend(_loop(ind, [f"d{i}[b, u0 + c] = buf[{DS + i}, c]" for i in range(S)]))
        L.extend(_loop(ind, [f"dp{i}[op{i}_{r} + c] += buf[{row}, c]" for row, i, r in lay.param_rows(DP)]))
        for s in range(len(lay.groups) - 2, -1, -1):
            L.extend(_stage_pass_backward(lay, s))
        L.extend(_staged_gradients_out(lay))
        return "\n".join(L)
    a(f"{ind}if write_dx:")
    L.extend(_loop(ind + "    ", [f"dx[t, b, og{g} + c] = buf[{DX + g}, c]" for g in range(G)]))
    L.extend(_loop(ind + "    ", [f"dxbias[og{g} + c] += buf[{DX + g}, c]" for g in range(G)]))
    # d_hg replaces hg
    L.extend(_loop(ind, [f"hgd[k, b, og{g} + c] = buf[{DH + g}, c]" for g in range(G)]))
    L.extend(_loop(ind, [f"dbias[og{g} + c] += buf[{DH + g}, c]" for g in range(G)]))
    d_h = f"buf[{DS}, c]"
    if lay.recurrence == "diagonal":  # d h += sum_g d_hg[g] * w[g]
        d_h += " + " + " + ".join(f"buf[{DH + g}, c] * w[og{g} + c]" for g in range(G))
    L.extend(_loop(ind, [f"d0[b, u0 + c] = {d_h}"] + [f"d{i}[b, u0 + c] = buf[{DS + i}, c]" for i in range(1, S)]))
    L.extend(_loop(ind, [f"dp{i}[op{i}_{r} + c] += buf[{row}, c]" for row, i, r in lay.param_rows(DP)]))
    if lay.recurrence == "dense":
        # this step's d_hg rows are contiguous in hgd (indexed by loop step k; padding rows are 0)
        a("        dhg_rows = hgd[k, b_lo:b_hi]")
        a("        if small:  # d_h += d_hg @ W_hh")
        a("            _loop_nn_acc(dhg_rows, w, d_rows)")
        a("        else:")
        a("            _gemm_nn_acc(gemm_fn, dhg_rows, w, d_rows, one)")
    return "\n".join(L)


def _stage_pass_backward(lay: _Layout, s: int) -> list[str]:
    """Stage s of a staged cell's backward step: d_v = d_hg[next group] @ W_hh[its rows], then the stage's local
    derivative added to the step's gradients (dxs, dhs, the state's, the parameters')."""
    G, S = lay.G, lay.S
    XG, HG, ST, DN, PR, DX, DH, DS, DP, _ = _backward_rows(lay)
    n = lay.groups[s][1]
    first, end = lay.groups[s + 1]
    c0, c1 = f"{first} * H", f"{end} * H"
    ind = "                "
    L = [f"        for r in range(b_hi - b_lo):  # d_v of stage {s}: d_hg[gates {first}..{end - 1}] @ their rows",
         "            for j in range(H):",
         "                dv[r, j] = zero",
         "        if small:",
         f"            _loop_nn_acc(dhs[:, {c0}:{c1}], w[{c0}:{c1}], dv)",
         "        else:",
         f"            _gemm_nn_acc_cols(gemm_fn, dhs, {c0}, w[{c0}:{c1}], dv, one)",
         "        for b in range(b_lo, b_hi):",
         "            L = lengths[b]",
         "            if k >= L:",
         "                continue"]
    L += _chunk_prologue(lay, G, ind)
    L += _loop(ind, [f"buf[{g}, c] = x[t, b, og{g} + c] + xbias[og{g} + c]" for g in range(n)])
    L += _loop(ind, [f"buf[{HG + g}, c] = hgd[k, b, og{g} + c] + bias[og{g} + c]" for g in range(n)])
    L += _loop(ind, [f"buf[{ST + i}, c] = saved_st[{i}, k, b, u0 + c]" for i in range(S)])
    L += _loop(ind, [f"buf[{DN}, c] = dv[b - b_lo, u0 + c]"])
    L += _copy_in_params(lay, PR, ind)
    L += _pointwise_backward_call(lay, f"_pw_stage{s}_backward", n, f"buf[{DN}, c]", ind)
    L += _loop(ind, [f"dxs[b - b_lo, og{g} + c] += buf[{DX + g}, c]" for g in range(n)])
    L += _loop(ind, [f"dhs[b - b_lo, og{g} + c] += buf[{DH + g}, c]" for g in range(n)])
    L += _loop(ind, [f"d{i}[b, u0 + c] += buf[{DS + i}, c]" for i in range(S)])
    L += _loop(ind, [f"dp{i}[op{i}_{r} + c] += buf[{row}, c]" for row, i, r in lay.param_rows(DP)])
    return L


def _staged_gradients_out(lay: _Layout) -> list[str]:
    """The end of a staged cell's backward step: d_x and d_hg written (d_hg over the saved products, as for every
    cell), the bias sums, and d_h += d_hg[first group] @ W_hh[its rows]."""
    G = lay.G
    ind = "                "
    L = ["        for b in range(b_lo, b_hi):",
         "            L = lengths[b]",
         "            if k >= L:",
         "                continue",
         "            t = L - 1 - k if reverse else k",
         "            for j0 in range(0, H, " + str(CHUNK) + "):",
         f"                n = min({CHUNK}, H - j0)"]
    L += _offsets(lay, ind)
    L += _loop(ind, [f"dx[t, b, og{g} + c] = dxs[b - b_lo, og{g} + c]" for g in range(G)])
    L += _loop(ind, [f"dxbias[og{g} + c] += dxs[b - b_lo, og{g} + c]" for g in range(G)])
    L += _loop(ind, [f"hgd[k, b, og{g} + c] = dhs[b - b_lo, og{g} + c]" for g in range(G)])
    L += _loop(ind, [f"dbias[og{g} + c] += dhs[b - b_lo, og{g} + c]" for g in range(G)])
    c1 = f"{lay.groups[0][1]} * H"
    L += ["        if small:  # d_h += d_hg[first group] @ W_hh[its rows]",
          f"            _loop_nn_acc(dhs[:, :{c1}], w[:{c1}], d_rows)",
          "        else:",
          f"            _gemm_nn_acc_cols(gemm_fn, dhs, 0, w[:{c1}], d_rows, one)"]
    return L


# --- the one-step kernels (the cells: RecurrentCell through NumbaBackend.step) ------------------------------------
# One step of a dense, unstaged cell, both projections included, in one call each way:
#     forward   xg = x W_ih^T, hg = h W_hh^T (two GEMMs), state' = pointwise.forward(xg + b_ih, hg + b_hh, state)
#     backward  d_xg, d_hg, d_state = pointwise.backward(...); d_x = d_xg W_ih; d_h = d_state[0] + d_hg W_hh;
#               d_W_ih = d_xg^T x; d_W_hh = d_hg^T h; d_b_ih, d_b_hh: sums of d_xg, d_hg over rows
# x [B, I], states [B, H], work [2, B, G*H] (xg then hg, without biases: the forward writes them, the backward reads
# them and overwrites them with d_xg, d_hg). Every buffer is C-contiguous and passed by address with the sizes B, I,
# H: a call's arguments are then plain ints, which cost far less to pass than arrays. Single-threaded (MKL may
# thread a large GEMM itself).
def step_supported(cell: CellSpec) -> bool:
    """Whether the cell has one-step kernels: a dense recurrence without stages."""
    return cell.recurrence == "dense" and cell.pointwise is not None and not cell.pointwise.stages


def _step_buffers(lay: _Layout, backward: bool) -> list[tuple[str, str]]:
    """(name, shape) of every buffer a one-step kernel takes, in argument order."""
    G, S = lay.G, lay.S
    weights = [("x", "(B, I)"), ("w_ih", f"({G} * H, I)"), ("xbias", f"({G} * H,)"), ("w", f"({G} * H, H)"),
               ("bias", f"({G} * H,)")] + [(f"p{i}", f"({k} * H,)") for i, k in enumerate(lay.widths)]
    states = [(f"s{i}", "(B, H)") for i in range(S)]
    work = [("work", f"(2, B, {G} * H)")]
    if not backward:
        return weights + states + [(f"n{i}", "(B, H)") for i in range(S)] + work
    return (weights + states + work + [(f"dn{i}", "(B, H)") for i in range(S)] + [(f"d{i}", "(B, H)") for i in range(S)]
            + [("dx", "(B if need_dx else 0, I)"), ("dw_ih", f"({G} * H if need_dw else 0, I)"),
               ("dw", f"({G} * H if need_dw else 0, H)"), ("dxbias", f"({G} * H if need_dw else 0,)"),
               ("dbias", f"({G} * H if need_dw else 0,)")]
            + [(f"dp{i}", f"({k} * H if need_dw else 0,)") for i, k in enumerate(lay.widths)])


def _step_head(lay: _Layout, name: str, doc: list[str], backward: bool) -> list[str]:
    buffers = _step_buffers(lay, backward)
    flags = ["need_dx", "need_dw"] if backward else []
    args = ["gemm_fn", "B", "I", "H", *(f"{n}_a" for n, _ in buffers), *flags]
    return (["@njit(cache=_CACHE, nogil=True, fastmath=_FM, error_model='numpy')", f"def {name}({', '.join(args)}):",
             *doc] + [f"    {n} = carray(_pointer_to({n}_a, _FZ), {shape})" for n, shape in buffers]
            + ["    xg = work[0]", "    hg = work[1]", "    one = _F(1.0)", "    zero = _F(0.0)"])


def _step_prologue(lay: _Layout, ind: str) -> list[str]:
    return (["    for b in range(B):", f"        for j0 in range(0, H, {CHUNK}):",
             f"            n = min({CHUNK}, H - j0)"] + _offsets(lay, ind))


def _step_forward_kernel(lay: _Layout) -> str:
    G, S, P = lay.G, lay.S, lay.P
    XG, HG, ST, PR = 0, G, 2 * G, 2 * G + S
    NS = PR + P
    ind = "            "
    doc = ['    """One step: n<i> = the new states from x and s<i>; work = (x W_ih^T, h W_hh^T)."""']
    L = _step_head(lay, "step_forward", doc, False)
    L += ["    _gemm_nt(gemm_fn, x, w_ih, xg, one, zero)",
          "    _gemm_nt(gemm_fn, s0, w, hg, one, zero)",
          f"    buf = np.empty(({NS + S}, {CHUNK}), dtype=_F)"]
    L += _step_prologue(lay, ind)
    L += _loop(ind, [f"buf[{XG + g}, c] = xg[b, og{g} + c] + xbias[og{g} + c]" for g in range(G)])
    L += _loop(ind, [f"buf[{HG + g}, c] = hg[b, og{g} + c] + bias[og{g} + c]" for g in range(G)])
    L += _loop(ind, [f"buf[{ST + i}, c] = s{i}[b, u0 + c]" for i in range(S)])
    L += _copy_in_params(lay, PR, ind)
    xg = _tup([f"buf[{XG + g}, c]" for g in range(G)])
    hgv = _tup([f"buf[{HG + g}, c]" for g in range(G)])
    st = _tup([f"buf[{ST + i}, c]" for i in range(S)])
    L += [f"{ind}for c in range(cn):",
          f"{ind}    ns = _pw_forward({xg}, {hgv}, {st}, {lay.params_tuple(PR)})"]
    L += [f"{ind}    buf[{NS + i}, c] = ns[{i}]" for i in range(S)]
    L += _loop(ind, [f"n{i}[b, u0 + c] = buf[{NS + i}, c]" for i in range(S)])
    return "\n".join(L)


def _step_backward_kernel(lay: _Layout) -> str:
    G, S = lay.G, lay.S
    XG, HG, ST, DN, PR, DX, DH, DS, DP, rows = _backward_rows(lay)
    ind = "            "
    doc = ['    """The gradients of one step given dn<i>, those of the new states: d<i> (of s<i>), dx (need_dx),',
           '    and with need_dw dw_ih, dw, dxbias, dbias and dp<i> (all overwritten); work becomes (d_xg, d_hg)."""']
    L = _step_head(lay, "step_backward", doc, True)
    L += ["    if need_dw:",
          "        for q in range(dbias.shape[0]):",
          "            dbias[q] = zero",
          "            dxbias[q] = zero"]
    L += [f"        for q in range(dp{i}.shape[0]):\n            dp{i}[q] = zero" for i in range(len(lay.widths))]
    L += [f"    buf = np.empty(({rows}, {CHUNK}), dtype=_F)"]
    L += _step_prologue(lay, ind)
    L += _loop(ind, [f"buf[{XG + g}, c] = xg[b, og{g} + c] + xbias[og{g} + c]" for g in range(G)])
    L += _loop(ind, [f"buf[{HG + g}, c] = hg[b, og{g} + c] + bias[og{g} + c]" for g in range(G)])
    L += _loop(ind, [f"buf[{ST + i}, c] = s{i}[b, u0 + c]" for i in range(S)])
    L += _loop(ind, [f"buf[{DN + i}, c] = dn{i}[b, u0 + c]" for i in range(S)])
    L += _copy_in_params(lay, PR, ind)
    L += _pointwise_backward_call(lay, "_pw_backward", G, _tup([f"buf[{DN + i}, c]" for i in range(S)]), ind)
    L += _loop(ind, [f"xg[b, og{g} + c] = buf[{DX + g}, c]" for g in range(G)])  # now d_xg
    L += _loop(ind, [f"hg[b, og{g} + c] = buf[{DH + g}, c]" for g in range(G)])  # now d_hg
    L += _loop(ind, [f"d{i}[b, u0 + c] = buf[{DS + i}, c]" for i in range(S)])
    L += [f"{ind}if need_dw:"]
    L += _loop(ind + "    ", [f"dxbias[og{g} + c] += buf[{DX + g}, c]" for g in range(G)])
    L += _loop(ind + "    ", [f"dbias[og{g} + c] += buf[{DH + g}, c]" for g in range(G)])
    L += _loop(ind + "    ", [f"dp{i}[op{i}_{r} + c] += buf[{row}, c]" for row, i, r in lay.param_rows(DP)])
    L += ["    _gemm_nn_acc(gemm_fn, hg, w, d0, one)  # d_h += d_hg W_hh",
          "    if need_dx:",
          "        _gemm_nn(gemm_fn, xg, w_ih, dx, one, zero)",
          "    if need_dw:",
          "        _gemm_tn_rows(gemm_fn, xg, x, dw_ih, 0, dw_ih.shape[0], one, zero)",
          "        _gemm_tn_rows(gemm_fn, hg, s0, dw, 0, dw.shape[0], one, zero)"]
    return "\n".join(L)


_same_gradient: dict[CellSpec, bool] = {}


def dx_is_dhg(cell: CellSpec) -> bool:
    """Whether the cell's pointwise backward returns one expression as both d_x and d_hg: the pre-activation
    gradient of cells whose input projection and recurrent product simply add (LSTM, the RNNs). Then a forward
    scan, whose d_hg rows (by loop step) are in d_x's order (by time), writes it once and d_x_proj is that buffer.
    Decided from the source: a single `return` whose first two items are the same expression."""
    if cell not in _same_gradient:
        pw = cell.pointwise
        same = False
        if pw is not None and pw.backward is not None and not pw.stages:  # stages add to d_x, d_hg apart
            node, _ = parse_pointwise(pw.backward, where=cell.name, nargs=6, new_name="_", prefix="_m_",
                                      error=CodegenError, allowed_names=_SAFE_BUILTINS)
            returns = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
            if len(returns) == 1 and isinstance(returns[0].value, ast.Tuple) and len(returns[0].value.elts) >= 2:
                first, second = returns[0].value.elts[:2]
                same = ast.dump(first) == ast.dump(second)
        _same_gradient[cell] = same
    return _same_gradient[cell]


_sum_only: dict[CellSpec, bool] = {}


def preactivation_only(cell: CellSpec) -> bool:
    """Whether the cell's pointwise code reads its inputs only as xg[g] + hg[g] (LSTM, the RNNs; not GRU, whose
    candidate gate scales hg by the reset gate). Then a training forward scan saves that whole pre-activation,
    biases included, in place of h W_hh^T, and the backward reads it instead of x_proj: one array fewer to keep
    and to stream through. Decided from the source of both functions."""
    if cell not in _sum_only:
        pw = cell.pointwise
        # a staged cell's backward reads its saved products, which stages' vectors made (not x + hg sums of h)
        ok = pw is not None and pw.backward is not None and cell.recurrence == "dense" and not pw.stages
        for fn, nargs in (((pw.forward, 5), (pw.backward, 6)) if ok else ()):
            node, _ = parse_pointwise(fn, where=cell.name, nargs=nargs, new_name="_", prefix="_m_",
                                      error=CodegenError, allowed_names=_SAFE_BUILTINS)
            xg, hg = node.args.args[0].arg, node.args.args[1].arg  # the math argument is gone
            paired: set[int] = set()
            for sub in ast.walk(node):
                if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Add):
                    pair = [_gate_read(side, (xg, hg)) for side in (sub.left, sub.right)]
                    if None not in pair and {pair[0][0], pair[1][0]} == {xg, hg} and pair[0][1] == pair[1][1]:
                        paired.update(id(side) for side in (sub.left, sub.right))
            reads = [n for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in (xg, hg)]
            subs = [n for n in ast.walk(node) if _gate_read(n, (xg, hg)) is not None]
            ok = ok and len(reads) == len(subs) and all(id(n) in paired for n in subs)
        _sum_only[cell] = ok
    return _sum_only[cell]


def _gate_read(node: ast.AST, names: tuple[str, str]) -> tuple[str, int] | None:
    """(name, index) for `xg[i]` / `hg[i]` with a constant index, else None."""
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in names
            and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int)):
        return node.value.id, node.slice.value
    return None


def _body(kernel: str) -> list[str]:
    """A generated kernel's lines after its docstring."""
    lines = kernel.split("\n")
    closing = next(i for i, line in enumerate(lines) if i > 1 and line.rstrip().endswith('"""'))
    return lines[closing + 1:]


def generate_source(cell: CellSpec, dtype: str) -> str:
    """The complete kernel module for one cell and dtype ('float32' or 'float64')."""
    check_cell(cell)
    pw = cell.pointwise
    assert pw is not None
    groups = pw.gate_groups(cell.num_gates) if pw.stages else ()
    lay = _Layout(cell.num_gates, cell.num_states, tuple(per_unit_width(cell, n) for n in pw.params),
                  cell.recurrence, groups)
    suffix = "_f32" if dtype == "float32" else "_f64"
    alias = {"tanh": "tanh" + suffix, "sigmoid": "sigmoid" + suffix, "relu": "relu" + suffix, "abs": "fabs",
             "pow": "power"}
    math_imports = "\n".join(
        f"from seqfast.backends.numba._math import {alias.get(n, n)} as _m_{n}" for n in MATH_NAMES
    )
    src = _HEADER.format(cell=cell.name, dtype=dtype, math_imports=math_imports,
                         forward_src=_function_source(pw.forward, "forward", cell, 5))
    if pw.backward is not None:
        src += _BACKWARD_PW.format(backward_src=_function_source(pw.backward, "backward", cell, 6))
    if pw.stages:
        src += _STAGED_IMPORTS
    for s, stage in enumerate(pw.stages):
        src += _STAGE_PW.format(src=_function_source(stage.forward, f"stage{s}", cell, 5))
        if stage.backward is not None:
            src += _STAGE_PW.format(src=_function_source(stage.backward, f"stage{s}_backward", cell, 6))
    kernels = [("forward", _forward_kernel(lay), _forward_params(lay))]
    if pw.backward is not None:
        kernels.append(("backward", _backward_kernel(lay), _backward_params(lay)))
    for name, kernel, params in kernels:
        src += "\n\n" + kernel + "\n\n\n" + _team_kernels(name, params, _body(kernel)) + "\n"
    if step_supported(cell):
        src += "\n\n" + _step_forward_kernel(lay) + "\n"
        if pw.backward is not None:
            src += "\n\n" + _step_backward_kernel(lay) + "\n"
    return src


def generate_weight_grad_source(dtype: str) -> str:
    """The module holding `weight_grad` (and its team launcher) for a dtype."""
    return (f"# Generated by seqfast.backends.numba.codegen: the weight-gradient GEMM, {dtype}. Do not edit.\n"
            + _PRELUDE.format(dtype=dtype, math_imports="") + "\n\n" + _WEIGHT_GRAD + "\n\n\n"
            + _team_kernels("weight_grad", _WEIGHT_GRAD_PARAMS, _body(_WEIGHT_GRAD)) + "\n")


# --- the cache directory and loading --------------------------------------------------------------------------------
_lock = threading.Lock()
_modules: dict[tuple, ModuleType] = {}
_cache_dir: Path | None = None
cache_note: str = ""  # why kernels are not cached across processes, if they are not


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        (path / "__pycache__").mkdir(exist_ok=True)
        return os.access(path / "__pycache__", os.W_OK)
    except OSError:
        return False


def cache_dir() -> Path:
    """Where generated kernel modules (and numba's cache of their machine code) live."""
    global _cache_dir, cache_note
    if _cache_dir is None:
        chosen = cache_root() / "numba"
        if not _writable(chosen):
            cache_note = (f"{chosen} is not writable: numba kernels are compiled in a temporary directory and not "
                          "reused by later processes (set SEQFAST_CACHE_DIR to a writable directory)")
            warnings.warn(f"seqfast numba backend: {cache_note}", RuntimeWarning, stacklevel=3)
            chosen = Path(tempfile.mkdtemp(prefix="seqfast-numba-"))
        _cache_dir = chosen
    return _cache_dir


def _fingerprint(source: str) -> str:
    import numba

    h = hashlib.sha256()
    for part in (TEMPLATE_VERSION, source, numba.__version__, sys.version,
                 (_HERE / "_math.py").read_text(), (_HERE / "_blas.py").read_text(), (_HERE / "_team.py").read_text()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _load(path: Path, name: str, cache: bool) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module._CACHE = cache  # read by the decorators as the module body runs
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name, None)
        raise
    return module


def kernels(cell: CellSpec, dtype: str) -> ModuleType:
    """The compiled-on-demand kernel module (attributes `forward`, `backward`) of a cell for a dtype."""
    return _generated((cell, dtype), f"{cell.name}_{dtype}", lambda: generate_source(cell, dtype))


def weight_grad_kernels(dtype: str) -> ModuleType:
    """The compiled-on-demand module of `weight_grad` for a dtype (one for every cell)."""
    return _generated(("weight_grad", dtype), f"weight_grad_{dtype}", lambda: generate_weight_grad_source(dtype))


def _generated(key: tuple, prefix: str, source_of) -> ModuleType:
    """The generated module under `key`: written to the cache directory once per source (named by its
    fingerprint) and loaded, with numba's on-disk cache where it can keep one."""
    module = _modules.get(key)
    if module is not None:
        return module
    with _lock:
        if key in _modules:
            return _modules[key]
        source = source_of()
        stem = f"{prefix}_{_fingerprint(source)}"
        path = cache_dir() / f"{stem}.py"
        if not path.exists():  # never rewrite an existing file: numba's cache index is keyed on its mtime
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(source)
            os.replace(tmp, path)
        # a hard-coded `_CACHE` global, injected before the body runs, chooses caching; numba refuses to cache
        # when it finds no writable place for the index, in which case the module is compiled uncached
        name = f"seqfast_numba_kernels.{stem}"
        try:
            module = _load(path, name, True)
        except RuntimeError as exc:
            if "cannot cache" not in str(exc):
                raise
            module = _load(path, name, False)
        _modules[key] = module
        return module


generated_module = _generated  # for the other generated modules of the backend (gemm.py's projection)


def is_compiled(cell: CellSpec, dtype: str, kernel_names: tuple[str, ...]) -> bool:
    """Whether the named kernels ("forward", "backward") of a cell can run without a JIT compile: compiled in this
    process, or held by numba's disk cache (loading from it takes a fraction of a second, compiling seconds)."""
    module = _modules.get((cell, dtype))
    if module is not None and all((id(module), k) in _entries for k in kernel_names):
        return True
    stem = f"{cell.name}_{dtype}_{_fingerprint(generate_source(cell, dtype))}"
    index = cache_dir() / "__pycache__"
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return (cache_dir() / f"{stem}.py").exists() and all(
        any(index.glob(f"{stem}.{k}_{part}-*.{tag}.nbi")) for k in kernel_names for part in ("entry", "launch"))


_entries: dict[tuple[int, str], int] = {}


def entry_address(module: ModuleType, kernel: str) -> int:
    """The address of `<kernel>_entry` (the kernel as a cfunc taking the argument block), compiled on first use
    (or loaded from numba's cache): made at import, a cfunc would compile every kernel of a module up front."""
    key = (id(module), kernel)
    address = _entries.get(key)
    if address is None:
        from numba import cfunc, types

        with _lock:
            compiled = cfunc(types.void(types.voidptr), cache=module._CACHE, fastmath=module._FM,
                             error_model="numpy")(getattr(module, f"{kernel}_entry"))
            module.__dict__[f"_{kernel}_entry_cfunc"] = compiled  # kept alive with its module
            address = _entries[key] = compiled.address
    return address
