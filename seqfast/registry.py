"""Cells (the math) and backends (the machinery), and the registry that maps one to the other.

A `CellSpec` describes a recurrent cell once: its gates, its state, its recurrence kind, its torch reference step
(the executable specification) and, optionally, the pointwise math of one hidden unit that fused backends compile.
A `Backend` declares what it supports as data; `Backend.not_supported_reasons` turns that into readable reasons.
Built-in cells and backends are registered exactly the way a plugin registers its own.
"""

from __future__ import annotations

import contextvars
import copy
import importlib.metadata
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "ParamSpec",
    "Stage",
    "Pointwise",
    "CellSpec",
    "Query",
    "Backend",
    "Registry",
    "registry",
    "register_cell",
    "register_backend",
    "get_cell",
    "get_backend",
    "PluginFailure",
]

RECURRENCE_KINDS = ("dense", "diagonal", "none")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def uniform_init(tensor: Tensor, hidden_size: int) -> None:
    """torch.nn's initialisation of every recurrent parameter: U(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
    torch.nn.init.uniform_(tensor, -bound, bound)


@dataclass(frozen=True)
class ParamSpec:
    """A per-layer, per-direction parameter beyond weight_ih/weight_hh/bias_ih/bias_hh.

    `shape(hidden_size, proj_size)` gives its shape; the module names it `{name}_l{k}[_reverse]`.
    `recurrent=True` means the scan receives it (after weight_hh and bias_hh, in declaration order).
    """

    name: str
    shape: Callable[[int, int], tuple[int, ...]]
    init: Callable[[Tensor, int], None] = uniform_init
    recurrent: bool = True
    bias: bool = False  # created only when the module has bias=True


@dataclass(frozen=True)
class Stage:
    """One intermediate vector of a staged cell: computed per unit from the gates before it, it takes the place of
    h in the recurrent product of the gates after it (e.g. the reset-before GRU's r * h, MGU's f * h).

    gates: how many leading gates this stage reads; the gates from here up to the next stage's `gates` (or to the
        last gate) take their recurrent product with this stage's vector: hg[g] = (W_hh[g rows] v + b_hh)[g].
    forward(m, xg, hg, state, params) -> v
        xg, hg: the first `gates` gates only (their products already formed); state, params as in Pointwise.
    backward(m, xg, hg, state, params, d_v) -> (d_xg, d_hg, d_state, d_params)
        the local derivative of v, tuples as in Pointwise.backward but over the first `gates` gates.
    """

    gates: int
    forward: Callable[..., Any]
    backward: Callable[..., tuple] | None = None


@dataclass(frozen=True)
class Pointwise:
    """The math of one hidden unit, written once against a math namespace `m` (exp, tanh, sigmoid, relu, ...).

    forward(m, xg, hg, state, params) -> new_state
        xg: tuple of num_gates input pre-activations (x W_ih^T + b_ih) of unit j, i.e. x_proj[..., g*H + j];
        hg: the recurrent ones: (W_hh h + b_hh)[g*H + j] (dense), w_hh[g*H + j] * h_j + b_hh[g*H + j]
            (diagonal), 0.0 (none);
        state: this unit's previous state values (one per CellSpec.state_names);
        params: this unit's values of the per-unit parameters named in Pointwise.params, in that order; a
            parameter of shape [k*H] (a recurrent extra_param) contributes k values, value r of unit j being
            p[r*H + j] (e.g. a peephole LSTM's [3*H] cell-to-gate weights give 3 values).
        new_state[0] is the unit's output.
    backward(m, xg, hg, state, params, d_new_state) -> (d_xg, d_hg, d_state, d_params)
        the local derivative: gradients of the same arguments given the gradient of the new state. d_state is
        the pointwise part only (the scan adds the recurrent part, d_hg @ W_hh); a literal 0.0 is allowed.
        Backends sum d_params over batch and time.
    The math namespace m offers exp, log, tanh, sigmoid, relu, sqrt, abs, maximum, minimum, where(c, a, b).
    Fused backends compile these into their generic time loops; with backward=None they decline to train.

    stages (dense recurrence only): cells gated before the product. Gates [0, stages[0].gates) take their product
    with h; each Stage's vector v, computed from the gates before it, is what the next group of gates multiply
    instead (see Stage). forward and backward still see every gate, hg[g] being the product of g's own group;
    backward's d_hg of a later group reaches h through the stages (the scan chains d_v = d_hg[group] W_hh[group]
    into Stage.backward). Without stages every gate's product is with h.
    """

    forward: Callable[..., tuple]
    backward: Callable[..., tuple] | None = None
    params: tuple[str, ...] = ()  # names of the recurrent extra_params read per unit, see `params` above
    stages: tuple[Stage, ...] = ()

    def gate_groups(self, num_gates: int) -> tuple[tuple[int, int], ...]:
        """(first, end) gate of each recurrent product: one group without stages, one more per stage."""
        bounds = (0, *(s.gates for s in self.stages), num_gates)
        return tuple(zip(bounds[:-1], bounds[1:], strict=True))


@dataclass(frozen=True)
class CellSpec:
    """A recurrent cell, described once.

    reference_step(x_t, state, w) -> new_state is the specification every backend is tested against:
    x_t is [B, G*H] (input projection incl. bias_ih), state a tuple of [B, *] tensors, w a `Weights` holding
    weight_hh, bias_hh (None when absent) and every recurrent extra parameter by name.
    The output of a step is new_state[0].
    """

    name: str
    num_gates: int
    state_names: tuple[str, ...]
    reference_step: Callable[..., tuple]
    recurrence: str = "dense"
    extra_params: tuple[ParamSpec, ...] = ()
    pointwise: Pointwise | None = None
    native_mode: str | None = None  # torch.nn's mode ("LSTM", "GRU", "RNN_TANH", "RNN_RELU") for built-ins
    supports_proj: bool = False  # LSTM's proj_size: h is projected by weight_hr after each step
    description: str = ""

    # the suffix of this cell's SEQFAST_BACKEND_<CELL> variable; a plain field, computed once, so that
    # torch.compile can read it without tracing a cached_property's lock
    env_name: str = field(init=False, repr=False, compare=False)
    # hashed on every backend selection (as part of a Query key): the generated hash would hash every field,
    # reference functions and pointwise source included, which cost microseconds per call
    _hash: int = field(init=False, repr=False, compare=False)
    _param_names: tuple[tuple[str, ...], tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            problems.append("name must be lowercase letters, digits and '_', starting with a letter; "
                            f"got {self.name!r}")
        if not isinstance(self.num_gates, int) or self.num_gates < 1:
            problems.append(f"num_gates must be a positive int, got {self.num_gates!r}")
        if not self.state_names or not all(isinstance(s, str) for s in self.state_names):
            problems.append(f"state_names must be a non-empty tuple of str, got {self.state_names!r}")
        if self.recurrence not in RECURRENCE_KINDS:
            problems.append(f"recurrence must be one of {RECURRENCE_KINDS}, got {self.recurrence!r}")
        if not callable(self.reference_step):
            problems.append("reference_step must be callable")
        stages = self.pointwise.stages if isinstance(self.pointwise, Pointwise) else ()
        if stages:
            if self.recurrence != "dense":
                problems.append(f"Pointwise.stages need a dense recurrence, got {self.recurrence!r}")
            bounds = [s.gates if isinstance(s, Stage) else None for s in stages]
            if not all(isinstance(b, int) for b in bounds) or bounds != sorted(set(bounds)) \
                    or not 0 < bounds[0] <= bounds[-1] < self.num_gates:
                problems.append("Pointwise.stages must be Stage records whose gates increase strictly within "
                                f"1..num_gates-1 ({self.num_gates - 1}), got gates {bounds}")
            missing = [i for i, s in enumerate(stages) if self.pointwise.backward is not None
                       and isinstance(s, Stage) and s.backward is None]
            if missing:
                problems.append(f"Pointwise has a backward but stages {missing} have none")
        if problems:
            raise ValueError(f"invalid cell {self.name!r}: " + "; ".join(problems))
        object.__setattr__(self, "env_name", re.sub(r"[^A-Za-z0-9]", "_", self.name).upper())
        object.__setattr__(self, "_hash", hash((self.name, self.num_gates, self.state_names, self.recurrence)))
        names = ("weight_hh", "bias_hh", *(p.name for p in self.extra_params if p.recurrent))
        object.__setattr__(self, "_param_names", (names, (*names, "weight_hr")))

    def __hash__(self) -> int:  # equal specs share name, gates, states and recurrence, so this agrees with ==
        return self._hash

    @property
    def num_states(self) -> int:
        return len(self.state_names)


    def recurrent_param_names(self, proj: bool = False) -> tuple[str, ...]:
        """Names of the weights the scan receives, in order."""
        return self._param_names[1 if proj else 0]  # not [bool]: torch.compile rejects bool indices


class Weights(dict):
    """The recurrent weights of one layer-direction, by name, with attribute access (w.weight_hh)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class Query:
    """What a backend is asked to run: enough to decide support and to rank candidates for `auto`."""

    cell: CellSpec
    device: str = "cpu"  # device type
    dtype: torch.dtype = torch.float32
    hidden_size: int = 1
    input_size: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    proj_size: int = 0
    requires_grad: bool = False
    # "module" (a whole stack, may use Backend.run_stack), "scan" (one layer-direction) or "step" (one step of one
    # layer: the cells, through Backend.step)
    level: str = "module"

    def describe(self) -> str:
        parts = [f"cell={self.cell.name}", f"device={self.device}", f"dtype={str(self.dtype).replace('torch.', '')}"]
        for key in ("seq_len", "batch_size", "input_size", "hidden_size"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={value}")
        if self.proj_size:
            parts.append(f"proj_size={self.proj_size}")
        parts.append(f"requires_grad={self.requires_grad}")
        return ", ".join(parts)


class Backend:
    """Machinery that runs cells over time. Subclasses declare support as class attributes.

    A backend implements `scan` (one layer, one direction; see seqfast.functional.scan for the contract), or
    `run_stack` (a whole multi-layer module at once) when its kernels own the input projection (native). `step`
    (one step of one layer, what the cells call) runs either with T=1 unless the backend has a cheaper one.
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

    # --- availability -------------------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine at all (missing package, no device), else None."""
        return None

    def available(self) -> bool:
        return self.unavailable_reason() is None

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
        reasons.extend(self.extra_reasons(query))
        return reasons

    def extra_reasons(self, query: Query) -> list[str]:
        """Hook for conditions that are not simple declarations."""
        return []

    def on_register(self) -> None:
        """Called once by register_backend: set-up that must not wait for the first (maybe compiled) call."""

    def selection_token(self) -> object:
        """Whatever outside the query this backend's reasons and rank depend on (e.g. an environment variable).
        Selection decisions are remembered per query and token; the default says: nothing."""
        return None

    def auto_rank(self, query: Query) -> float:
        """Higher is preferred by `auto` among backends with no reasons. Override to rank by shape."""
        return float(self.priority)

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
        _validate_reference(spec)
        self.cells[spec.name] = spec
        self.cell_origin[spec.name] = _current_origin.get()
        self.generation += 1
        return spec

    def register_backend(self, backend: Backend, *, replace: bool = False) -> Backend:
        if not isinstance(backend, Backend):
            raise TypeError(f"register_backend expects a seqfast.Backend instance, got {type(backend).__name__}")
        if not backend.name or not _NAME_RE.match(backend.name) or backend.name in self.RESERVED:
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
            if os.environ.get("SEQFAST_DISABLE_PLUGINS", "").strip() not in ("", "0"):
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


def _validate_reference(spec: CellSpec) -> None:
    """Run the reference step once on tiny inputs: it must accept the declared gates and return the state."""
    hidden, batch = 3, 2
    gen = torch.Generator().manual_seed(0)
    g = spec.num_gates
    weights = Weights(weight_hh=None, bias_hh=None)
    if spec.recurrence == "dense":
        weights["weight_hh"] = torch.randn(g * hidden, hidden, generator=gen, dtype=torch.float64)
    elif spec.recurrence == "diagonal":
        weights["weight_hh"] = torch.randn(g * hidden, generator=gen, dtype=torch.float64)
    if spec.recurrence != "none":
        weights["bias_hh"] = torch.randn(g * hidden, generator=gen, dtype=torch.float64)
    for p in spec.extra_params:
        if p.recurrent:
            weights[p.name] = torch.randn(p.shape(hidden, 0), generator=gen, dtype=torch.float64)
    x = torch.randn(batch, g * hidden, generator=gen, dtype=torch.float64)
    state = tuple(torch.randn(batch, hidden, generator=gen, dtype=torch.float64) for _ in spec.state_names)
    try:
        new = spec.reference_step(x, state, weights)
    except Exception as exc:
        raise ValueError(
            f"cell {spec.name!r}: reference_step failed on x_t [{batch}, {g}*{hidden}] "
            f"(num_gates={g}) and {spec.num_states} state tensors [{batch}, {hidden}]: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(new, tuple) or len(new) != spec.num_states:
        raise ValueError(
            f"cell {spec.name!r}: reference_step must return a tuple of {spec.num_states} state tensors "
            f"{spec.state_names}, got {type(new).__name__} of length {len(new) if isinstance(new, tuple) else '-'}"
        )
    for name, old, value in zip(spec.state_names, state, new, strict=True):
        if not isinstance(value, torch.Tensor) or value.shape != old.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"cell {spec.name!r}: reference_step's new {name!r} has shape {got}, "
                             f"expected {tuple(old.shape)}")
    if spec.pointwise is not None:
        _validate_pointwise(spec, x, state, weights, new)


def _validate_pointwise(spec: CellSpec, x, state, weights: Weights, expected: tuple) -> None:
    """The pointwise forward, evaluated with torch, must reproduce the reference step it claims to fuse."""
    from .cells.common import TORCH_MATH, pointwise_recurrent_term  # cells build on this module; import at use

    extras = {p.name for p in spec.extra_params if p.recurrent}
    unknown = [n for n in spec.pointwise.params if n not in extras]
    if unknown:
        raise ValueError(f"cell {spec.name!r}: Pointwise.params {unknown} are not recurrent extra_params "
                         f"(those are {sorted(extras)})")
    g, hidden = spec.num_gates, state[0].shape[1]
    params = []
    for name in spec.pointwise.params:
        vec = weights[name]
        params += [vec[r * hidden : (r + 1) * hidden] for r in range(vec.numel() // hidden)]
    try:
        hg = pointwise_recurrent_term(spec, x, state, weights, tuple(params), TORCH_MATH)
    except Exception as exc:
        raise ValueError(f"cell {spec.name!r}: a Pointwise stage failed: {type(exc).__name__}: {exc}") from exc
    try:
        got = spec.pointwise.forward(TORCH_MATH, x.chunk(g, 1), hg.chunk(g, 1), state, tuple(params))
    except Exception as exc:
        raise ValueError(f"cell {spec.name!r}: Pointwise.forward failed on {g} gates: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(got, tuple) or len(got) != spec.num_states:
        raise ValueError(f"cell {spec.name!r}: Pointwise.forward must return {spec.num_states} state values")
    for name, a, b in zip(spec.state_names, got, expected, strict=True):
        if not torch.allclose(torch.as_tensor(a, dtype=b.dtype), b, rtol=1e-9, atol=1e-9):
            raise ValueError(f"cell {spec.name!r}: Pointwise.forward's new {name!r} disagrees with reference_step "
                             f"(max difference {(torch.as_tensor(a) - b).abs().max().item():.3g})")


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
