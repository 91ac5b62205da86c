"""A cell's Pointwise functions read as source, for the backends that compile them (numba, triton).

Both backends turn `def forward(m, xg, hg, state, params): ... m.tanh(...)` into a function of their own: the
math argument dropped, `m.f(...)` renamed to the backend's `<prefix>f(...)`, and every other free name checked to
be a number constant. First the code is checked against the pointwise contract (CONTRACT: the Python every backend
compiles, with torch's semantics); a construct outside it is an error naming the construct and its line, which the
backends report as their reason for declining the cell. Operators whose Python semantics a backend lacks (triton's
% is C's fmod) become calls of its own functions. What differs per backend (numeric typing, how constants are
bound) happens afterwards.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import math
import textwrap
from collections.abc import Callable, Collection

from ..registry import CellSpec

# The math namespace `m` of pointwise code, name -> number of arguments (README, "Writing a cell", documents it).
# Every backend that compiles pointwise code implements each of these with torch's semantics (TORCH_MATH).
MATH_FUNCTIONS = {
    "exp": 1, "log": 1, "log1p": 1, "expm1": 1, "sqrt": 1, "abs": 1, "sin": 1, "cos": 1,
    "tanh": 1, "sigmoid": 1, "relu": 1, "softplus": 1,
    "pow": 2, "maximum": 2, "minimum": 2, "clamp": 3, "where": 3,
}
MATH_NAMES = tuple(MATH_FUNCTIONS)

# The Python a pointwise function may use besides `m.f(...)`; anything else is rejected with the construct named.
ARITHMETIC = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Mod: "%", ast.FloorDiv: "//",
              ast.Pow: "**"}
CONDITION_JOINS = {ast.BitAnd: "&", ast.BitOr: "|"}  # between comparisons only
COMPARISONS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
SIGNS = {ast.USub: "-", ast.UAdd: "+"}
CONTRACT = ("assignments (also to tuples of names and +=, -=, ...), `return`, numbers, tuples, indexing with a "
            f"non-negative int literal (xg[0]), {' '.join(ARITHMETIC.values())}, unary - and +, one comparison "
            f"({' '.join(COMPARISONS.values())}), & and | between comparisons, abs(x), and m.f(...) for f in "
            f"{', '.join(MATH_NAMES)}")


class _Contract:
    """Rejects any construct outside CONTRACT, naming it and its line: what passes, every backend compiles."""

    def __init__(self, namespace: str, where: str, error: type[Exception], source: str, first_line: int) -> None:
        self.namespace, self.where, self.error = namespace, where, error
        self.source, self.first_line = source, first_line

    def fail(self, node: ast.AST, why: str) -> None:
        segment = ast.get_source_segment(self.source, node) or type(node).__name__
        line = self.first_line + getattr(node, "lineno", 1) - 1
        raise self.error(f"{self.where}, line {line}: `{segment}`: {why} (pointwise code may use {CONTRACT})")

    def statement(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                self.target(target)
            self.expr(node.value)
        elif isinstance(node, ast.AugAssign):
            if type(node.op) not in ARITHMETIC:
                self.fail(node, "only arithmetic operators may update a variable")
            self.target(node.target)
            self.expr(node.value)
        elif isinstance(node, ast.Return):
            if node.value is None:
                self.fail(node, "a pointwise function must return its values")
            self.expr(node.value)
        elif not isinstance(node, ast.Pass):
            hint = "; use m.where(condition, a, b)" if isinstance(node, ast.If) else ""
            self.fail(node, f"a {type(node).__name__} statement is not elementwise code{hint}")

    def target(self, node: ast.expr) -> None:
        if isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                self.target(elt)
        elif not isinstance(node, ast.Name):
            self.fail(node, "only plain names (or tuples of names) can be assigned")

    def expr(self, node: ast.expr) -> None:
        if isinstance(node, ast.Name):
            if node.id == self.namespace:
                self.fail(node, f"the math namespace {self.namespace!r} can only be called as "
                                f"{self.namespace}.<function>(...)")
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                self.fail(node, "only int and float literals are numbers here")
        elif isinstance(node, ast.Tuple):
            for elt in node.elts:
                if isinstance(elt, ast.Starred):
                    self.fail(elt, "unpacking with * is not supported; list the values")
                self.expr(elt)
        elif isinstance(node, ast.Subscript):
            index = node.slice
            if not (isinstance(node.value, ast.Name) and node.value.id != self.namespace
                    and isinstance(index, ast.Constant) and type(index.value) is int and index.value >= 0):
                self.fail(node, "index a tuple argument by a non-negative int literal, e.g. xg[0]")
        elif isinstance(node, ast.BinOp):
            if type(node.op) in CONDITION_JOINS:
                for side in (node.left, node.right):
                    if not self.is_condition(side):
                        self.fail(side, f"{CONDITION_JOINS[type(node.op)]} joins comparisons only")
            elif type(node.op) not in ARITHMETIC:
                self.fail(node, "this operator is not supported")
            self.expr(node.left)
            self.expr(node.right)
        elif isinstance(node, ast.UnaryOp):
            if type(node.op) not in SIGNS:
                self.fail(node, "`not` and ~ are not elementwise here; compare instead, or use m.where")
            self.expr(node.operand)
        elif isinstance(node, ast.Compare):
            if len(node.ops) != 1 or type(node.ops[0]) not in COMPARISONS:
                self.fail(node, "use one comparison at a time (join them with & or |)")
            self.expr(node.left)
            self.expr(node.comparators[0])
        elif isinstance(node, ast.Call):
            self.call(node)
        elif isinstance(node, ast.IfExp):
            self.fail(node, "`a if c else b` is not elementwise; use m.where(c, a, b)")
        elif isinstance(node, ast.BoolOp):
            self.fail(node, "`and` / `or` are not elementwise; join comparisons with & or |")
        else:
            self.fail(node, f"{type(node).__name__} expressions are not supported")

    def is_condition(self, node: ast.expr) -> bool:
        return isinstance(node, ast.Compare) or (
            isinstance(node, ast.BinOp) and type(node.op) in CONDITION_JOINS)

    def call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id == "abs":
            name, arity = "abs", 1
        elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
              and func.value.id == self.namespace):
            if func.attr not in MATH_FUNCTIONS:
                self.fail(node, f"the math namespace does not provide {func.attr!r} (it provides "
                                f"{', '.join(MATH_NAMES)})")
            name, arity = f"{self.namespace}.{func.attr}", MATH_FUNCTIONS[func.attr]
        else:
            self.fail(node, f"only {self.namespace}.<function>(...) and abs(...) can be called")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args) or len(node.args) != arity:
            self.fail(node, f"{name} takes exactly {arity} positional argument{'s' if arity > 1 else ''}")
        for arg in node.args:
            self.expr(arg)


class _Operators(ast.NodeTransformer):
    """`a <op> b` (and `x <op>= b`) -> `<prefix><name>(a, b)` for the operators a backend implements as functions,
    and the builtin abs(x) -> the math namespace's abs."""

    def __init__(self, functions: dict[type[ast.operator], str], prefix: str) -> None:
        self.functions, self.prefix = functions, prefix

    def _call(self, name: str, args: list[ast.expr], like: ast.AST) -> ast.Call:
        call = ast.Call(func=ast.Name(id=self.prefix + name, ctx=ast.Load()), args=args, keywords=[])
        return ast.copy_location(call, like)

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        name = self.functions.get(type(node.op))
        return node if name is None else self._call(name, [node.left, node.right], node)

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        self.generic_visit(node)
        name = self.functions.get(type(node.op))
        if name is None:
            return node
        current = ast.Name(id=node.target.id, ctx=ast.Load())
        assign = ast.Assign(targets=[node.target], value=self._call(name, [current, node.value], node))
        return ast.copy_location(assign, node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "abs":
            node.func = ast.copy_location(ast.Name(id=self.prefix + "abs", ctx=ast.Load()), node.func)
        return node


class _FloatLiterals(ast.NodeTransformer):
    """Number literals -> float literals (pointwise math is float math; `1 - x` must not be integer arithmetic in a
    backend that types constants by their Python type). Indices stay ints."""

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        node.value = self.visit(node.value)
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if type(node.value) is int:
            return ast.copy_location(ast.Constant(value=float(node.value)), node)
        return node


class _MathCalls(ast.NodeTransformer):
    """`m.f` -> `<prefix>f` (the contract has checked every use of `m`)."""

    def __init__(self, namespace: str, prefix: str) -> None:
        self.namespace, self.prefix = namespace, prefix

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if isinstance(node.value, ast.Name) and node.value.id == self.namespace:
            return ast.copy_location(ast.Name(id=self.prefix + node.attr, ctx=ast.Load()), node)
        return self.generic_visit(node)


def parse_pointwise(fn: Callable, *, where: str, nargs: int, new_name: str, prefix: str, error: type[Exception],
                    allowed_names: Collection[str] = (), operators: dict[type[ast.operator], str] | None = None,
                    float_numbers: bool = False) -> tuple[ast.FunctionDef, dict[str, float]]:
    """(the def of `fn` without its math argument, renamed, with `m.f` and abs -> `<prefix>f`; the number constants
    it reads by name). `operators` maps operators the backend implements as functions (e.g. ast.Mod: "mod") to
    `<prefix>name`; `float_numbers` makes every number literal and constant outside an index a float.
    Raises `error` with a sentence naming `where` for anything outside the pointwise contract."""
    try:
        lines, first_line = inspect.getsourcelines(fn)
        source = textwrap.dedent("".join(lines))
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
    contract = _Contract(namespace, where, error, source, max(first_line, 1))
    for statement in node.body:
        contract.statement(statement)
    node = _Operators(operators or {}, prefix).visit(node)
    if float_numbers:
        node = _FloatLiterals().visit(node)
    node = _MathCalls(namespace, prefix).visit(node)

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
            constants[name] = float(value) if float_numbers else value
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
