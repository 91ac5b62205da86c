"""A cell's Pointwise functions read as source, for the backends that compile them (numba, triton).

Both backends turn `def forward(m, xg, hg, state, params): ... m.tanh(...)` into a function of their own: the
math argument dropped, `m.f(...)` renamed to the backend's `<prefix>f(...)`, and every other free name checked to
be a number constant. What differs per backend (numeric typing, how constants are bound) happens afterwards.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import math
import textwrap
from collections.abc import Callable, Collection

from ..registry import CellSpec

# the math namespace `m` of pointwise code (seqfast.registry.Pointwise documents it)
MATH_NAMES = ("exp", "log", "tanh", "sigmoid", "relu", "sqrt", "abs", "maximum", "minimum", "where")


class _MathCalls(ast.NodeTransformer):
    def __init__(self, namespace: str, prefix: str, where: str, error: type[Exception]) -> None:
        self.namespace, self.prefix, self.where, self.error = namespace, prefix, where, error

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if isinstance(node.value, ast.Name) and node.value.id == self.namespace:
            if node.attr not in MATH_NAMES:
                raise self.error(f"{self.where} uses {self.namespace}.{node.attr}, which the math namespace does "
                                 f"not provide (it provides {', '.join(MATH_NAMES)})")
            return ast.copy_location(ast.Name(id=self.prefix + node.attr, ctx=ast.Load()), node)
        return self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id == self.namespace:
            raise self.error(f"{self.where} uses the math namespace {self.namespace!r} other than as "
                             f"{self.namespace}.<function>")
        return node


def parse_pointwise(fn: Callable, *, where: str, nargs: int, new_name: str, prefix: str, error: type[Exception],
                    allowed_names: Collection[str] = ()) -> tuple[ast.FunctionDef, dict[str, float]]:
    """(the def of `fn` without its math argument, renamed, with `m.f` -> `<prefix>f`; the number constants it
    reads by name). Raises `error` with a sentence naming `where` for anything that cannot be compiled."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as exc:
        raise error(f"{where}: its source is not available ({exc}); pointwise code is compiled from source") from None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        raise error(f"{where}: its source could not be parsed on its own (a lambda?); use a def") from None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef):
        raise error(f"{where}: expected a plain def, got {type(node).__name__}")
    args = node.args
    positional = args.posonlyargs + args.args
    if args.vararg or args.kwarg or args.kwonlyargs or len(positional) != nargs:
        raise error(f"{where}: expected exactly {nargs} positional arguments (m, xg, hg, state, params"
                    f"{', d_new_state' if nargs == 6 else ''})")
    namespace = positional[0].arg
    args.posonlyargs, args.args, args.defaults = [], positional[1:], []
    for a in args.args:
        a.annotation = None
    node.returns, node.decorator_list, node.name = None, [], new_name
    if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
        node.body = node.body[1:] or [ast.Pass()]  # the docstring
    node = _MathCalls(namespace, prefix, where, error).visit(node)

    local = {a.arg for a in args.args}
    local |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
    try:
        closure = inspect.getclosurevars(fn)
        scope = {**closure.builtins, **closure.globals, **closure.nonlocals}
    except (TypeError, ValueError):
        scope = dict(getattr(fn, "__globals__", {}))
    constants: dict[str, float] = {}
    for name in sorted({n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}):
        if name in local or name.startswith(prefix) or name in allowed_names:
            continue
        value = scope.get(name, getattr(builtins, name, None))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            constants[name] = value
        else:
            raise error(f"{where}: refers to {name!r} ({type(value).__name__}); only numbers and the math "
                        f"namespace {namespace}.* can be used inside pointwise code")
    return node, constants


def per_unit_rows(cell: CellSpec, name: str, error: type[Exception]) -> int:
    """k for a per-unit parameter of shape [k*H] named in Pointwise.params (unit j reads p[r*H + j], r < k)."""
    spec = next((p for p in cell.extra_params if p.name == name), None)
    if spec is None:
        raise error(f"cell {cell.name!r}: pointwise parameter {name!r} is not one of its extra_params")
    sizes = [math.prod(spec.shape(h, 0)) for h in (1, 2, 5)]
    if sizes[0] < 1 or sizes != [sizes[0] * h for h in (1, 2, 5)]:
        raise error(f"cell {cell.name!r}: parameter {name!r} is not a [k*H] per-unit vector")
    return sizes[0]
