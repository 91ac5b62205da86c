"""Cells (the math) and backends (the machinery), and the registry that maps one to the other.

The cell records (CellSpec, Pointwise, Stage, ParamSpec, Weights, Query) live in seqfast.spec and are re-exported
here. A `Backend` declares what it supports as data; `Backend.not_supported_reasons` turns that into readable
reasons. Built-in cells and backends are registered exactly the way a plugin registers its own.
"""

from __future__ import annotations

import contextvars
import copy
import importlib.metadata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .cells.validation import validate_cell
from .config import setting
from .spec import (
    NAME_RE,
    RECURRENCE_KINDS,
    CellSpec,
    ParamSpec,
    Pointwise,
    Query,
    Stack,
    Stage,
    Weights,
    uniform_init,
)

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "ParamSpec",
    "Stage",
    "Pointwise",
    "CellSpec",
    "Query",
    "Stack",
    "Weights",
    "uniform_init",
    "RECURRENCE_KINDS",
    "Backend",
    "Registry",
    "registry",
    "register_cell",
    "register_backend",
    "get_cell",
    "get_backend",
    "PluginFailure",
]


# options the modules implement around any backend's single-layer scan (merging directions, masking inputs)
MODULE_OPTIONS = frozenset({"merge_mode", "input_dropout"})


class Backend:
    """Machinery that runs cells over time. Subclasses declare support as class attributes.

    A backend implements `scan` (one layer, one direction; see seqfast.functional.scan for the contract), or
    `run_stack` (a whole multi-layer module at once) when its kernels own the input projection (native). `step`
    (one step of one layer, what the cells call) runs either with T=1 unless the backend has a cheaper one.

    The seam modules call, after select_backend, and nothing else of a backend: `run_stack` where `has_stack()`,
    else `layer` per layer-direction (the input projection, then `scan`; zero states as None where
    `accepts_zero_state`); `scan_states` for return_states; `step` for the cells and Recurrent.step. `layer` and
    `step` have defaults here built on `scan` (or `run_stack`), so a backend overrides them only where its kernels
    do better; `scan_states` is implemented by the backends that declare the "return_states" option.
    """

    name: str = ""
    description: str = ""
    devices: frozenset[str] | None = frozenset({"cpu"})  # device types; None: any
    dtypes: frozenset[torch.dtype] | None = frozenset({torch.float32, torch.float64})  # None: any
    cells: frozenset[str] | None = None  # None: any cell that satisfies the requirements below
    recurrences: frozenset[str] = frozenset(RECURRENCE_KINDS)
    needs_pointwise: bool = False  # fused backends compile CellSpec.pointwise
    # scan() takes state0=None for zero initial states (modules pass it for hx=None, sparing the zero tensors)
    accepts_zero_state: bool = False
    supports_grad: bool = True
    supports_proj: bool = True
    max_hidden_size: int | None = None
    priority: int = 0  # auto prefers higher, unless auto_rank says otherwise
    # module options (Query.options) this backend's scan honours; MODULE_OPTIONS come with any scan, the module
    # doing them around it. Others are declined with declined_options' reason; inference_only_options are
    # honoured without requires_grad only.
    options: frozenset[str] = frozenset()
    inference_only_options: frozenset[str] = frozenset()
    declined_options: dict[str, str] = {}

    # --- availability -------------------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine at all (missing package, no device), else None."""
        return None

    def available(self) -> bool:
        return self.unavailable_reason() is None

    def details(self) -> list[str]:
        """Lines for `seqfast info` on how this backend runs on this machine (an available backend only)."""
        return []

    # --- support --------------------------------------------------------------------------------------------
    def not_supported_reasons(self, query: Query) -> list[str]:
        """Every reason this backend cannot run `query`; empty when it can. Derived from the declarations."""
        reasons: list[str] = []
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        cell = query.cell
        if self.cells is not None and cell.name not in self.cells:
            reasons.append(f"cell {cell.name!r} is not one of {sorted(self.cells)}")
        if cell.recurrence not in self.recurrences:
            reasons.append(f"recurrence {cell.recurrence!r} not supported (supports {sorted(self.recurrences)})")
        if self.needs_pointwise and cell.pointwise is None:
            reasons.append(f"cell {cell.name!r} has no pointwise math to compile")
        no_backward = cell.pointwise is not None and cell.pointwise.backward is None
        if self.needs_pointwise and query.requires_grad and no_backward:
            reasons.append(f"cell {cell.name!r} has no pointwise backward, so it cannot train here")
        if self.devices is not None and query.device not in self.devices:
            reasons.append(f"device {query.device!r} not supported (supports {sorted(self.devices)})")
        if self.dtypes is not None and query.dtype not in self.dtypes:
            names = sorted(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(query.dtype).replace('torch.', '')} not supported (supports {names})")
        if query.requires_grad and not self.supports_grad:
            reasons.append("backward (requires_grad) not supported")
        if query.proj_size and not self.supports_proj:
            reasons.append("proj_size > 0 not supported")
        if self.max_hidden_size is not None and query.hidden_size > self.max_hidden_size:
            reasons.append(f"hidden_size {query.hidden_size} > max {self.max_hidden_size}")
        if query.level == "scan" and not self.has_scan():
            reasons.append("runs whole modules only (no single-layer scan)")
        if query.options:
            reasons.extend(self.option_reasons(query))
        reasons.extend(self.extra_reasons(query))
        return reasons

    def option_reasons(self, query: Query) -> list[str]:
        """Why this backend cannot honour the module options query.options asks for (derived from the
        declarations above)."""
        reasons = []
        for option in sorted(query.options):
            if option in MODULE_OPTIONS and self.has_scan():
                continue
            if option not in self.options and option not in self.inference_only_options:
                if option in MODULE_OPTIONS:
                    why = "it runs whole modules only; the option needs the module's per-layer scans"
                else:
                    why = self.declined_options.get(option, "not implemented by this backend")
                reasons.append(f"option {option!r} not supported: {why}")
            elif query.requires_grad and option not in self.options:
                why = self.declined_options.get(option, "its backward does not take the option into account")
                reasons.append(f"option {option!r} cannot train (requires_grad) here: {why}")
        return reasons

    def extra_reasons(self, query: Query) -> list[str]:
        """Hook for conditions that are not simple declarations."""
        return []

    def pointwise_reasons(self, cell: CellSpec) -> list[str]:
        """Why this backend cannot compile `cell`'s pointwise code; empty when it can or compiles none. Part of
        extra_reasons for the backends that compile it (the conformance kit fails a cell on such a reason)."""
        return []

    def on_register(self) -> None:
        """Called once by register_backend: set-up that must not wait for the first (maybe compiled) call."""

    def selection_token(self) -> object:
        """Whatever outside the query this backend's reasons and rank depend on (e.g. an environment variable).
        Selection decisions are remembered per query and token; the default says: nothing."""
        return None

    def auto_rank(self, query: Query) -> float:
        """Higher is preferred by `auto` among backends with no reasons, where it does not time them
        (seqfast/calibration.py). Override to rank by shape; below zero: never `auto`'s choice for this query."""
        return float(self.priority)

    def needs_compile(self, query: Query) -> bool:
        """Whether running `query` would first compile code that no cache holds (a JIT compile taking seconds).
        `auto` does not time such a backend for its calibration; `seqfast tune` does, after compiling."""
        return False

    # --- execution ------------------------------------------------------------------------------------------
    def has_scan(self) -> bool:
        return type(self).scan is not Backend.scan

    def has_stack(self) -> bool:
        return type(self).run_stack is not Backend.run_stack

    def scan(
        self,
        cell: CellSpec,
        x_proj: Tensor,
        state0: tuple[Tensor, ...],
        weights: Weights,
        lengths: Tensor | None,
        reverse: bool,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        raise NotImplementedError

    def scan_states(self, cell: CellSpec, x_proj: Tensor, state0: tuple[Tensor, ...], weights: Weights,
                    lengths: Tensor | None, reverse: bool) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """scan, also returning every step's state: one [T, B, *] tensor per state, the state after time step t
        at index t (for reverse=True, after the reversed walk reached t), zeros past a sequence's length. What
        Recurrent(...)(x, return_states=True) runs; backends that declare the "return_states" option implement it."""
        raise NotImplementedError

    def layer(self, cell: CellSpec, x: Tensor, weight_ih: Tensor, bias_ih: Tensor | None,
              state0: tuple[Tensor, ...] | None, weights: Weights, lengths: Tensor | None, reverse: bool
              ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One layer-direction from its input x [T, B, I]: the input projection (one GEMM over all steps), then
        scan. What modules call; a backend whose kernels can take over part of the projection's work (its bias,
        its gradients) overrides it. state0=None (zero states) only for backends with accepts_zero_state."""
        return self.scan(cell, F.linear(x, weight_ih, bias_ih), state0, weights, lengths, reverse)

    def run_stack(self, cell: CellSpec, x: Tensor, lengths: Tensor | None, state0: tuple[Tensor, ...], params: list,
                  *, num_layers: int, bidirectional: bool, dropout: float, training: bool, proj_size: int
                  ) -> tuple[Tensor, tuple[Tensor, ...]]:
        raise NotImplementedError

    def stack_runner(self, cell: CellSpec, dtype: torch.dtype, stack: Stack) -> Callable[..., Any] | None:
        """A function run(x, state0, params) -> (output, final states) for one module's calls of one input shape,
        or None (the default: every call goes through run_stack or layer). The module calls it only for x
        [T, B, I] (batch_first input as a transposed view) without lengths, module options, autocast or
        inter-layer dropout; state0 is None (zeros) or one [layers * directions, B, H] tensor per state; params
        are run_stack's. run may return None for a call it declines, which then takes the usual path. A backend
        binds its per-shape work into it once (the numba backend: plans, the weights' numpy views, the kernels'
        arguments) and must still see every parameter as it is at the call (replaced, moved, updated in place)."""
        return None

    def step(self, cell: CellSpec, x: Tensor, state: tuple[Tensor, ...], params: Sequence[Tensor],
             names: Sequence[str]) -> tuple[Tensor, ...]:
        """One step of one layer: the new state tuple of `cell` from x [B, I] and state (a tuple of [B, H] tensors).

        params are the layer's parameters in torch.nn's order (weight_ih, weight_hh, bias_ih, bias_hh, then the
        cell's extras; the biases only with bias=True), exactly as run_stack takes one layer's; names are their
        base names ("weight_ih", ...). The default runs the layer (scan) or the stack with T=1."""
        if not self.has_scan():
            _, final = self.run_stack(cell, x.unsqueeze(0), None, tuple(s.unsqueeze(0) for s in state), [list(params)],
                                      num_layers=1, bidirectional=False, dropout=0.0, training=False, proj_size=0)
            return tuple(s.squeeze(0) for s in final)
        by_name = dict(zip(names, params, strict=True))
        weight_ih, bias_ih = by_name.pop("weight_ih"), by_name.pop("bias_ih", None)
        weights = Weights(weight_hh=by_name.pop("weight_hh", None), bias_hh=by_name.pop("bias_hh", None))
        weights.update(by_name)
        _, final = self.layer(cell, x.unsqueeze(0), weight_ih, bias_ih, state, weights, None, False)
        return tuple(final)

    def step_runner(self, cell: CellSpec, dtype: torch.dtype, names: Sequence[str]
                    ) -> Callable[[Tensor, tuple[Tensor, ...], Sequence[Tensor]], tuple[Tensor, ...]]:
        """step(cell, ·, ·, ·, names) for inputs of `dtype`, as a function of (x, state, params), for callers that
        run many steps of one layer (the cells, Recurrent.step): a backend binds its per-layout work into it once.
        The default calls step."""
        names = tuple(names)

        def run(x: Tensor, state: tuple[Tensor, ...], params: Sequence[Tensor]) -> tuple[Tensor, ...]:
            return self.step(cell, x, state, params, names)

        return run

    def __repr__(self) -> str:
        return f"<seqfast backend {self.name!r}>"


@dataclass
class PluginFailure:
    distribution: str
    entry_point: str
    error: str


@dataclass
class Registry:
    cells: dict[str, CellSpec] = field(default_factory=dict)
    backends: dict[str, Backend] = field(default_factory=dict)
    plugins_loaded: list[str] = field(default_factory=list)
    plugin_failures: list[PluginFailure] = field(default_factory=list)
    cell_origin: dict[str, str] = field(default_factory=dict)
    generation: int = 0  # bumped by every registration: remembered selection decisions then no longer apply

    RESERVED = ("auto",)

    def register_cell(self, spec: CellSpec, *, replace: bool = False) -> CellSpec:
        if not isinstance(spec, CellSpec):
            raise TypeError(f"register_cell expects a CellSpec, got {type(spec).__name__}")
        if spec.name in self.cells and not replace:
            raise ValueError(f"cell {spec.name!r} is already registered (by {self.cell_origin[spec.name]})")
        validate_cell(spec)
        self.cells[spec.name] = spec
        self.cell_origin[spec.name] = _current_origin.get()
        self.generation += 1
        return spec

    def register_backend(self, backend: Backend, *, replace: bool = False) -> Backend:
        if not isinstance(backend, Backend):
            raise TypeError(f"register_backend expects a seqfast.Backend instance, got {type(backend).__name__}")
        if not backend.name or not NAME_RE.match(backend.name) or backend.name in self.RESERVED:
            raise ValueError(f"invalid backend name {backend.name!r}")
        if backend.name in self.backends and not replace:
            raise ValueError(f"backend {backend.name!r} is already registered")
        if not (backend.has_scan() or backend.has_stack()):
            raise ValueError(f"backend {backend.name!r} implements neither scan nor run_stack")
        backend.on_register()
        self.backends[backend.name] = backend
        self.generation += 1
        return backend

    def get_cell(self, cell: str | CellSpec) -> CellSpec:
        if isinstance(cell, CellSpec):
            return cell
        try:
            return self.cells[cell]
        except KeyError:
            raise ValueError(f"unknown cell {cell!r}; registered cells: {sorted(self.cells)}") from None

    def get_backend(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            known = ["auto", *sorted(self.backends)]
            raise ValueError(f"unknown backend {name!r}; known backends: {known}") from None

    # --- plugins --------------------------------------------------------------------------------------------
    def load_plugins(self, entry_points: Sequence[Any] | None = None) -> None:
        """Call every `seqfast.plugins` entry point with this registry. A broken plugin becomes a warning."""
        if entry_points is None:
            if setting("disable_plugins"):
                return
            entry_points = importlib.metadata.entry_points(group="seqfast.plugins")
        for ep in entry_points:
            dist = getattr(getattr(ep, "dist", None), "name", None) or ep.value.split(":")[0]
            label = f"{dist}:{ep.name}"
            snapshot = (dict(self.cells), dict(self.backends), dict(self.cell_origin))
            token = _current_origin.set(label)
            try:
                hook = ep.load()
                hook(self)
            except Exception as exc:  # a plugin must never break the host library; it is reported instead
                self.cells, self.backends, self.cell_origin = (copy.copy(s) for s in snapshot)
                self.generation += 1
                failure = PluginFailure(dist, ep.name, f"{type(exc).__name__}: {exc}")
                self.plugin_failures.append(failure)
                warnings.warn(
                    f"seqfast plugin {ep.name!r} from distribution {dist!r} failed to load and was skipped: "
                    f"{failure.error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                self.plugins_loaded.append(label)
            finally:
                _current_origin.reset(token)


# who is registering right now: a plugin's label while its entry point runs
_current_origin: contextvars.ContextVar[str] = contextvars.ContextVar("seqfast_origin", default="seqfast")


registry = Registry()


def register_cell(spec: CellSpec, *, replace: bool = False) -> CellSpec:
    """Register a cell (built-ins use this too). Raises ValueError on a duplicate name or a broken reference."""
    return registry.register_cell(spec, replace=replace)


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    return registry.register_backend(backend, replace=replace)


def get_cell(cell: str | CellSpec) -> CellSpec:
    return registry.get_cell(cell)


def get_backend(name: str) -> Backend:
    return registry.get_backend(name)
