"""A cell's pointwise functions compiled for the numba kernels, and what their source says about the cell.

The AST of each Pointwise function (seqfast/backends/pointwise_source.py) is rewritten so that `m.tanh(...)` calls
the numba math namespace (seqfast/backends/numba/_math.py), numeric literals take the kernel's dtype (so float32
math stays float32 and vectorizes), and numeric globals the code reads are inlined; the result is spliced into the
kernel templates as `_pw_forward`, `_pw_backward` and `_pw_stage<k>[_backward]`. check_cell decides, compiling
nothing, whether the backend can run a cell; dx_is_dhg and preactivation_only read the source for two shortcuts
the scans take.
"""

from __future__ import annotations

import ast

from ...registry import CellSpec
from ..codegen import CodegenError
from ..pointwise_source import parse_pointwise, per_unit_rows

_SAFE_BUILTINS = {"abs", "min", "max", "range", "len", "float", "int", "bool", "True", "False", "None"}


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


def function_source(fn, role: str, cell: CellSpec, nargs: int) -> str:
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
    function_source(pw.forward, "forward", cell, 5)
    if pw.backward is not None:
        function_source(pw.backward, "backward", cell, 6)
    for s, stage in enumerate(pw.stages):
        function_source(stage.forward, f"stage{s}", cell, 5)
        if stage.backward is not None:
            function_source(stage.backward, f"stage{s}_backward", cell, 6)


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


def step_supported(cell: CellSpec) -> bool:
    """Whether the cell has one-step kernels: a dense recurrence without stages."""
    return cell.recurrence == "dense" and cell.pointwise is not None and not cell.pointwise.stages


def units_supported(cell: CellSpec) -> bool:
    """Whether the cell has forward_units / backward_units, the scans with their hidden units split over threads:
    the same cells (one dense product a step, which each thread computes for its own units)."""
    return step_supported(cell)


__all__ = ["CodegenError", "function_source", "per_unit_width", "check_cell", "dx_is_dhg", "preactivation_only",
           "step_supported", "units_supported"]
