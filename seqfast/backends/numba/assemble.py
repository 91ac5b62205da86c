"""Assembles a cell's numba kernel module from the templates in templates/ (the kernels as they read).

generate_source(cell, dtype) expands, for the cell's Layout: the prelude (imports, dtype, the named scratch rows
and argument-block slots of layout.py as constants), the cell's pointwise functions (pointwise.py), the forward
and backward scans with their team launcher and entry (team.py.tmpl), for a dense unstaged cell the scans with
their hidden units split over threads (forward_units, backward_units), and the one-step kernels. What varies from
cell to cell is only the unrolled tuple plumbing (G gates, S states, P per-unit values, a staged cell's stages) and
the recurrence (dense, diagonal, none), chosen by the templates' `if $FLAG:` lines (see
seqfast/backends/codegen/template.py for the template language). Every kernel body is emitted once: a kernel's
entry unpacks its argument block and calls it.
"""

from __future__ import annotations

from ...registry import CellSpec
from ..codegen import Markers, expand, read_template
from ..codegen.template import Blocks
from ..pointwise_source import MATH_NAMES
from .layout import (
    BLOCK,
    CHUNK,
    PIPE,
    PIPE_STEPS,
    WEIGHT_GRAD_PARAMS,
    BackwardRows,
    ForwardRows,
    Layout,
    backward_params,
    block_slots,
    forward_params,
    slots_used,
    step_buffers,
)
from .pointwise import check_cell, function_source, per_unit_width, step_supported, units_supported

_TEMPLATES = "seqfast.backends.numba.templates"
_ELEMENT = {"F": "_FZ", "I": "_IZ", "D": "_DZ"}


def _template(name: str, lay: Layout | None, tokens: dict[str, str], markers: Markers | None = None,
              blocks: Blocks | None = None, flags: dict[str, bool] | None = None) -> str:
    file = f"{name}.py.tmpl"
    return expand(read_template(_TEMPLATES, file), name=file, markers={**_markers(lay), **(markers or {})},
                  blocks=blocks, flags={**_flags(lay), **(flags or {})}, tokens=tokens)


def _markers(lay: Layout | None) -> Markers:
    if lay is None:
        return {}
    return {
        "@g": [{"@g": str(g)} for g in range(lay.G)],  # every gate
        "@s": [{"@s": str(i)} for i in range(lay.S)],  # every state
        "@q": [{"@q": str(i)} for i in range(1, lay.S)],  # every state after the first
        "@w": [{"@w": str(i)} for i in range(len(lay.widths))],  # every per-unit parameter
        # every per-unit value: row @p of the params block, value @pr of parameter @pi
        "@p": [{"@pi": str(i), "@pr": str(r), "@p": str(q)} for q, (i, r) in enumerate(lay.param_values())],
    }


def _flags(lay: Layout | None) -> dict[str, bool]:
    if lay is None:
        return {}
    return {"DENSE": lay.recurrence == "dense", "DIAGONAL": lay.recurrence == "diagonal", "STAGED": lay.staged,
            "PARAMS": lay.P > 0}


def _tup(items: list[str]) -> str:
    return "(" + "".join(f"{i}, " for i in items) + ")"


def _rows(prefix: str, base: str, count: int) -> str:
    """The pointwise argument tuple of `count` consecutive scratch rows from `prefix_base`."""
    return _tup([f"buf[{prefix}_{base} + {i}, c]" for i in range(count)])


def _row_tokens(lay: Layout) -> dict[str, str]:
    G, S, P = lay.G, lay.S, lay.P
    tokens = {}
    for prefix in ("F", "B"):
        tokens.update({f"{prefix}_XG_ARGS": _rows(prefix, "XG", G), f"{prefix}_HG_ARGS": _rows(prefix, "HG", G),
                       f"{prefix}_ST_ARGS": _rows(prefix, "ST", S), f"{prefix}_PR_ARGS": _rows(prefix, "PR", P)})
    tokens["B_DN_ARGS"] = _rows("B", "DN", S)
    return tokens


def _stages(lay: Layout, gates_of_stage: list[int], prefix: str) -> Blocks:
    """The STAGES block list: stage k reads gates @i (those before it) and feeds the product of gates
    @first..@last (its group's end: @end)."""
    entries = []
    for k, n in enumerate(gates_of_stage):
        first, end = lay.groups[k + 1]
        names = {"@k": str(k), "@first": str(first), "@last": str(end - 1), "@end": str(end),
                 "@xs": _rows(prefix, "XG", n), "@hs": _rows(prefix, "HG", n)}
        entries.append((names, {"@i": [{"@i": str(g)} for g in range(n)]}))
    return {"STAGES": entries}


def _constants(lay: Layout | None, kernels: list[tuple[str, list[tuple[str, str]]]]) -> list[tuple[str, int]]:
    """(name, value) of every constant the kernels read: scratch rows, the chunks, block and pipe slots."""
    out = [("CHUNK", CHUNK), ("PIPE_STEPS", PIPE_STEPS)]
    if lay is not None:
        out += [(f"F_{k}", v) for k, v in ForwardRows.of(lay)._asdict().items()]
        out += [(f"B_{k}", v) for k, v in BackwardRows.of(lay)._asdict().items()]
    out += [(f"BLOCK_{k}", v) for k, v in BLOCK()._asdict().items()]
    out += [(f"PIPE_{k}", v) for k, v in PIPE()._asdict().items()]
    for kernel, params in kernels:
        slots, size = block_slots(params)
        out += [(_slot_name(kernel, name), at) for name, at in slots.items()]
        out.append((f"{kernel.upper()}_BLOCK_SIZE", size))
    return out


def _slot_name(kernel: str, arg: str) -> str:
    return f"AT_{kernel.upper()}_{arg.upper()}"


def _block_io(kernel: str, name: str, kind: str) -> tuple[list[tuple[str, str]], str]:
    """([(slot, value) the launcher writes], the entry's expression rebuilding the argument): scalars as their
    value; arrays as address then shape; a per-range accumulator as address and row length, the entry taking
    row `tid`."""
    at = _slot_name(kernel, name)
    slot = [at] + [f"{at} + {d}" for d in range(1, slots_used(kind))]
    if kind == "i":
        return [(at, name)], f"block[{at}]"
    if kind == "b":
        return [(at, f"1 if {name} else 0")], f"block[{at}] != 0"
    element = _ELEMENT[kind[0]]
    if kind.endswith("r"):
        size = 8 if kind[0] == "D" else "_FSIZE"
        return ([(slot[0], f"{name}.ctypes.data"), (slot[1], f"{name}.shape[1]")],
                f"carray(_pointer_to(block[{slot[0]}] + tid * block[{slot[1]}] * {size}, {element}), "
                f"(block[{slot[1]}],))")
    dims = int(kind[1])
    shape = "".join(f"block[{slot[1 + d]}], " for d in range(dims))
    return ([(slot[0], f"{name}.ctypes.data")] + [(slot[1 + d], f"{name}.shape[{d}]") for d in range(dims)],
            f"carray(_pointer_to(block[{slot[0]}], {element}), ({shape}))")


def _team(kernel: str, params: list[tuple[str, str]]) -> str:
    units = kernel.endswith("_units")
    writes, reads = [], [("b_lo", "ranges[tid, 0]"), ("b_hi", "ranges[tid, 1]")]
    for name, kind in params:
        if kind not in ("lo", "hi"):
            written, read = _block_io(kernel, name, kind)
            writes += written
            reads.append((name, read))
    _, size = block_slots(params)
    markers = {"@kernel": [{"@kernel": kernel}],
               "@slot": [{"@slot": s, "@write": v} for s, v in writes],
               "@arg": [{"@arg": n, "@read": r} for n, r in reads]}
    tokens = {"PASSED": ", ".join(n for n, k in params if k not in ("lo", "hi")), "BLOCK_SIZE": str(size),
              "ARGS": ", ".join(n for n, _ in params)}
    project = kernel in ("forward", "forward_units")
    if project:
        tokens.update(X_SLOT=_slot_name(kernel, "x"), S0_SLOT=_slot_name(kernel, "s0"),
                      READY_SLOT=_slot_name(kernel, "ready"))
    if units:  # the array whose columns are the units a thread takes
        tokens["UNITS_OF"] = "s0" if kernel == "forward_units" else "d0"
    return _template("team", None, tokens, markers,
                     flags={"PROJECT": project, "UNITS": units, "SHARED_H": kernel == "forward_units",
                            "PIPELINE": kernel == "forward"})


def _prelude(title: str, lay: Layout | None, dtype: str, constants: list[tuple[str, int]], scans: bool) -> str:
    suffix = "_f32" if dtype == "float32" else "_f64"
    alias = {"tanh": "tanh" + suffix, "sigmoid": "sigmoid" + suffix, "relu": "relu" + suffix, "abs": "fabs",
             "pow": "power"}
    names = MATH_NAMES if lay is not None else ()
    markers = {"@math": [{"@math": alias.get(n, n), "@name": n} for n in names],
               "@constant": [{"@constant": k, "@value": str(v)} for k, v in constants]}
    return _template("prelude", None, {"TITLE": title, "DTYPE": dtype}, markers,
                     flags={"SCANS": scans, "STAGED": lay is not None and lay.staged})


def layout_of(cell: CellSpec) -> Layout:
    pw = cell.pointwise
    assert pw is not None
    groups = pw.gate_groups(cell.num_gates) if pw.stages else ()
    return Layout(cell.num_gates, cell.num_states, tuple(per_unit_width(cell, n) for n in pw.params),
                  cell.recurrence, groups)


def generate_source(cell: CellSpec, dtype: str) -> str:
    """The complete kernel module for one cell and dtype ('float32' or 'float64')."""
    check_cell(cell)
    pw = cell.pointwise
    assert pw is not None
    lay = layout_of(cell)
    scans = [("forward", forward_params(lay))] + ([("backward", backward_params(lay))] if pw.backward else [])
    # the scans with the hidden units split over threads (schedule.unit_ranges), for a dense recurrence of one
    # product a step; the same arguments as forward / backward, so a caller's block fits both
    units = ([("forward_units", forward_params(lay))]
             + ([("backward_units", backward_params(lay))] if pw.backward else [])) if units_supported(cell) else []
    parts = [_prelude(f"cell {cell.name!r}, {dtype}", lay, dtype, _constants(lay, scans + units), True)]
    functions = [(pw.forward, "forward", 5)] + ([(pw.backward, "backward", 6)] if pw.backward else [])
    for s, stage in enumerate(pw.stages):
        functions.append((stage.forward, f"stage{s}", 5))
        if stage.backward is not None:
            functions.append((stage.backward, f"stage{s}_backward", 6))
    parts += ['@njit(inline="always")\n' + function_source(fn, role, cell, nargs) for fn, role, nargs in functions]
    tokens = _row_tokens(lay)
    groups = lay.groups or ((0, lay.G),)
    tokens["GROUP0_END"] = str(groups[0][1])
    stage_gates = [end for _, end in groups[:-1]]  # stage k reads the gates before group k+1
    for kernel, params in scans:
        tokens[f"{kernel.upper()}_ARGS"] = ", ".join(n for n, _ in params)
        prefix = "F" if kernel == "forward" else "B"
        parts.append(_template(kernel, lay, tokens, blocks=_stages(lay, stage_gates, prefix)))
        parts.append(_team(kernel, params))
    for kernel, params in units:
        parts.append(_template(kernel, lay, {**tokens, "GATES": str(lay.G)}))
        parts.append(_team(kernel, params))
    if step_supported(cell):
        for kernel, backward in (("step_forward", False), ("step_backward", True))[:1 + bool(pw.backward)]:
            buffers = step_buffers(lay, backward)
            flags = ["need_dx", "need_dw"] if backward else []
            args = ["gemm_fn", "team", "B", "I", "H", *(f"{n}_a" for n, _ in buffers), *flags]
            tokens[f"{kernel.upper()}_ARGS"] = ", ".join(args)
            markers = {"@v": [{"@vshape": shape, "@v": n} for n, shape in buffers]}
            parts.append(_template(kernel, lay, tokens, markers))
    return "\n\n\n".join(parts) + "\n"


def generate_weight_grad_source(dtype: str) -> str:
    """The module holding `weight_grad` (and its team launcher) for a dtype."""
    kernels = [("weight_grad", WEIGHT_GRAD_PARAMS)]
    return "\n\n\n".join([_prelude(f"the weight-gradient GEMM, {dtype}", None, dtype, _constants(None, kernels),
                                   False),
                          _template("weight_grad", None, {}), _team("weight_grad", WEIGHT_GRAD_PARAMS)]) + "\n"


def generate_projection_source(dtype: str) -> str:
    """The module holding `project`, the small input projection, for a dtype."""
    return "\n\n\n".join([_prelude(f"the small input projection, {dtype}", None, dtype, [], False),
                            _template("project", None, {})]) + "\n"


__all__ = ["generate_source", "generate_weight_grad_source", "generate_projection_source", "layout_of"]
