"""The seam between modules and backends: backend selection, and `scan`, one layer in one direction.

scan contract
    x_proj  [T, B, G*H]   the input projection incl. bias_ih, computed outside the loop by one GEMM
    state0  tuple of [B, *] tensors (LSTM: h [B, P or H], c [B, H]; GRU/RNN: h [B, H]); modules pass None for
            zero states to backends with accepts_zero_state (scan() below always takes tensors)
    weights {name: tensor}: weight_hh [G*H, H] (dense) or [G*H] (diagonal) or None, bias_hh [G*H] or None,
            then the cell's recurrent extras (and weight_hr [P, H] for LSTM with proj_size)
    lengths optional [B] int tensor, 1 <= lengths <= T. Steps past a sequence's length leave its state untouched
            and write zeros to its output. reverse=True walks each sequence from its own last valid step to 0.
    returns (outputs [T, B, H_out] where outputs[t] is the new state[0], final state tuple at each sequence's
            own last valid step)
Modules reach it through Backend.layer (registry.py), which forms x_proj first; a backend may override layer to
take part of the projection's work into its kernels (the numba backend adds bias_ih there).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from . import calibration
from .config import Choice, resolve_choice
from .registry import Backend, CellSpec, Query, Weights, get_cell, registry

__all__ = [
    "BackendNotSupportedError",
    "InputError",
    "scan",
    "select_backend",
    "explain",
    "current_backend",
    "available_backends",
    "make_query",
    "check_lengths",
]


class BackendNotSupportedError(RuntimeError):
    """A requested backend cannot run this input. Carries every reason, and what the other backends say."""

    def __init__(self, backend: str, choice: Choice, query: Query, reasons: list[str], others: dict[str, list[str]]):
        self.backend, self.choice, self.query, self.reasons, self.others = backend, choice, query, reasons, others
        lines = [
            f"backend {backend!r} (chosen by {choice.source}) cannot run {query.describe()}:",
            *(f"  - {r}" for r in reasons),
        ]
        able = [name for name, why in others.items() if not why]
        if able:
            lines.append(f"backends that can run it: {able}")
        lines.extend(f"  {name}: {'; '.join(why)}" for name, why in others.items() if why)
        if _autocast_enabled(query.device):
            lines.append(f"(dtype {str(query.dtype).replace('torch.', '')} is torch.autocast's, which runs "
                         f"recurrences in its dtype: choose a backend that supports it, or run outside autocast)")
        super().__init__("\n".join(lines))


class InputError(ValueError, RuntimeError):
    """An input (or argument) a module cannot take: a wrong shape, dtype or device, no time steps, the wrong number
    of states. torch.nn raises RuntimeError for most of these and ValueError for some; this is both, so code written
    against either (or against seqfast's earlier ValueError) catches it."""


def _autocast_enabled(device: str) -> bool:
    from torch.amp.autocast_mode import is_autocast_available

    return is_autocast_available(device) and torch.is_autocast_enabled(device)


def explain(cell: str | CellSpec | Query, **query_fields) -> dict[str, list[str]]:
    """Every registered backend's reasons for not running a cell (empty list: it can).

    >>> seqfast.explain("lstm", device="cpu", dtype=torch.float64, requires_grad=True)
    """
    query = cell if isinstance(cell, Query) else Query(get_cell(cell), **query_fields)
    return {name: backend.not_supported_reasons(query) for name, backend in registry.backends.items()}


def _best(query: Query) -> Backend | None:
    """`auto`'s choice: the fastest backend measured on this machine for the query's shape bucket
    (seqfast/calibration.py), else the static rule: the highest auto_rank."""
    able = [b for b in registry.backends.values() if not b.not_supported_reasons(query)]
    if len(able) > 1:
        measured = calibration.choose(query, able)
        if measured is not None:
            return measured
    return max(able, key=lambda b: b.auto_rank(query), default=None)


def select_backend(query: Query, requested: str | None = None) -> tuple[Backend, Choice]:
    """The backend that runs `query`: the requested one (or the one configured), or the best under `auto`.

    A backend that was asked for and cannot run raises BackendNotSupportedError; it is never silently replaced.
    Under torch.compile the choice is made eagerly at trace time and enters the graph as a constant: it reads
    files, the environment and cell sources, none of which dynamo can (or should) trace.
    """
    if torch.compiler.is_compiling():
        dtype = str(query.dtype).replace("torch.", "")
        name, source = _select_while_compiling(
            query.cell.name, query.device, dtype, query.hidden_size, query.input_size, query.batch_size,
            query.seq_len, query.proj_size, query.requires_grad, query.level, requested).split("\0")
        return registry.backends[name], Choice(name, source)
    return _select(query, requested)


def _select_while_compiling(cell: str, device: str, dtype: str, hidden: int, input_size: int | None,
                            batch: int | None, steps: int | None, proj: int, requires_grad: bool, level: str,
                            requested: str | None) -> str:
    query = Query(get_cell(cell), device, getattr(torch, dtype), hidden, input_size, batch, steps, proj,
                  requires_grad, level)
    with calibration.stored_only():  # nothing is timed while tracing
        backend, choice = _select(query, requested)
    return f"{backend.name}\0{choice.source}"  # a str: constants must be plain Python values


# What torch.compiler.assume_constant_result(fn) does, without importing torch._dynamo (and with it triton) at
# `import seqfast`, which would double the import time. tests/backends/numba/test_numba_backend.py compiles in a
# fresh process.
_select_while_compiling._dynamo_marked_constant = True  # type: ignore[attr-defined]


# Decisions already made, by (query, requested name, registry generation, backends' selection tokens): every
# module call selects, and computing every backend's reasons each time costs tens of microseconds.
_decisions: dict[tuple, Backend] = {}


_tokens: list = [None, ()]  # [registry generation, backends that override selection_token]


def _token_backends() -> tuple[Backend, ...]:
    """The backends whose selection depends on something outside the query (few: asking every one per call was
    a measurable part of a small module call)."""
    if _tokens[0] != registry.generation:
        _tokens[1] = tuple(b for b in registry.backends.values()
                           if type(b).selection_token is not Backend.selection_token)
        _tokens[0] = registry.generation
    return _tokens[1]


def selection_stamp() -> tuple:
    """What a remembered decision depends on beside its query and the requested name: the registry generation
    and the selection tokens of the backends that have one."""
    generation = registry.generation
    backends = _tokens[1] if _tokens[0] == generation else _token_backends()
    if len(backends) == 1:  # the usual case (triton): spared a generator
        return generation, backends[0].selection_token()
    return (generation, *[b.selection_token() for b in backends])


def _select(query: Query, requested: str | None) -> tuple[Backend, Choice]:
    choice = resolve_choice(query.cell.name, query.cell.env_name, requested)  # sources can change at any time
    key = (query, choice.name, *selection_stamp())
    backend = _decisions.get(key)
    if backend is None or registry.backends.get(backend.name) is not backend:
        backend = _decide(query, choice)
        if len(_decisions) > 4096:  # shapes vary without bound in some programs
            _decisions.clear()
        _decisions[key] = backend
    return backend, choice


def _decide(query: Query, choice: Choice) -> Backend:
    if choice.name == "auto":
        best = _best(query)
        if best is None:
            reasons = ["no registered backend can run this"]
            raise BackendNotSupportedError("auto", choice, query, reasons, explain(query))
        return best
    backend = registry.get_backend(choice.name)
    reasons = backend.not_supported_reasons(query)
    if reasons:
        others = {k: v for k, v in explain(query).items() if k != backend.name}
        raise BackendNotSupportedError(backend.name, choice, query, reasons, others)
    return backend


def current_backend(cell: str | CellSpec, device: str = "cpu", **query_fields) -> str:
    """The name of the backend that would run `cell` now, given every source of choice in force."""
    query = Query(get_cell(cell), device=torch.device(device).type, **query_fields)
    return select_backend(query)[0].name


def available_backends() -> list[str]:
    """Names of the registered backends that can run on this machine (their package and device are present)."""
    return [name for name, backend in registry.backends.items() if backend.available()]


def check_lengths(lengths: Tensor, batch: int, steps: int, what: str = "lengths") -> Tensor:
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"{what}: expected a 1-D tensor of {batch} sequence lengths, got shape {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{what}: expected an integer tensor, got dtype {lengths.dtype}")
    if lengths.numel() == 0:  # an empty batch: nothing to check
        return lengths.to(torch.int64)
    if torch.compiler.is_compiling():
        # a length's value is not known while tracing: the graph checks it when it runs
        torch._assert_async((lengths >= 1).all() & (lengths <= steps).all(),
                            f"{what}: every length must be in [1, {steps}] (the input's time steps)")
        return lengths.to(torch.int64)
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1:
        raise ValueError(f"{what}: every sequence needs at least one step; got a length of {lo}")
    if hi > steps:
        raise ValueError(f"{what}: a length of {hi} exceeds the {steps} time steps of the input")
    return lengths.to(torch.int64)


def make_query(cell: CellSpec, x_proj: Tensor, state0: tuple[Tensor, ...], weights: Mapping[str, Tensor | None],
               level: str = "module") -> Query:
    tensors = [x_proj, *state0, *(w for w in weights.values() if w is not None)]
    return Query(
        cell=cell,
        device=x_proj.device.type,
        dtype=x_proj.dtype,
        hidden_size=x_proj.shape[-1] // cell.num_gates,
        batch_size=x_proj.shape[1],
        seq_len=x_proj.shape[0],
        proj_size=0 if weights.get("weight_hr") is None else weights["weight_hr"].shape[0],
        requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in tensors),
        level=level,
    )


def _check_scan_inputs(cell: CellSpec, x_proj: Tensor, state0, weights: Mapping) -> None:
    if not isinstance(x_proj, Tensor) or x_proj.dim() != 3:
        got = f"{x_proj.dim()}-D tensor" if isinstance(x_proj, Tensor) else type(x_proj).__name__
        raise ValueError(f"x_proj: expected a 3-D tensor [T, B, {cell.num_gates}*H], got {got}")
    steps, batch, width = x_proj.shape
    if steps == 0:
        raise ValueError("x_proj: expected at least one time step, got T=0")
    if width % cell.num_gates:
        raise ValueError(f"x_proj: last dim must be {cell.num_gates}*hidden_size for cell {cell.name!r}, got {width}")
    hidden = width // cell.num_gates
    if not isinstance(state0, tuple) or len(state0) != cell.num_states:
        got = f"{type(state0).__name__} of length {len(state0)}" if isinstance(state0, (tuple, list)) else state0
        raise ValueError(f"state0: expected a tuple of {cell.num_states} tensors {cell.state_names}, got {got}")
    proj = weights.get("weight_hr")
    for name, s in zip(cell.state_names, state0, strict=True):
        size = proj.shape[0] if (proj is not None and name == cell.state_names[0]) else hidden
        if s.shape != (batch, size):
            raise ValueError(f"state0[{name!r}]: expected shape ({batch}, {size}), got {tuple(s.shape)}")
        if s.dtype != x_proj.dtype or s.device != x_proj.device:
            raise ValueError(f"state0[{name!r}]: expected {x_proj.dtype} on {x_proj.device} like x_proj, "
                             f"got {s.dtype} on {s.device}")
    for name in cell.recurrent_param_names(proj is not None):
        w = weights.get(name)
        if w is None and (name == "weight_hh" and cell.recurrence != "none"):
            raise ValueError(f"weights: cell {cell.name!r} needs 'weight_hh'")
        if w is not None and (w.dtype != x_proj.dtype or w.device != x_proj.device):
            raise ValueError(f"weights[{name!r}]: expected {x_proj.dtype} on {x_proj.device} like x_proj, "
                             f"got {w.dtype} on {w.device}")


def scan(
    cell: str | CellSpec,
    x_proj: Tensor,
    state0: tuple[Tensor, ...],
    weights: Mapping[str, Tensor | None],
    lengths: Tensor | None = None,
    reverse: bool = False,
    *,
    backend: str | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Run one layer of `cell` in one direction over time (see the module docstring for the contract)."""
    spec = get_cell(cell)
    weights = Weights(weights)
    weights.setdefault("bias_hh", None)
    weights.setdefault("weight_hh", None)
    _check_scan_inputs(spec, x_proj, tuple(state0), weights)
    if lengths is not None:
        lengths = check_lengths(lengths, x_proj.shape[1], x_proj.shape[0])
    chosen, _ = select_backend(make_query(spec, x_proj, tuple(state0), weights, level="scan"), backend)
    return chosen.scan(spec, x_proj, tuple(state0), weights, lengths, reverse)
