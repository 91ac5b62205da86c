"""The records that describe a cell and a request: CellSpec, Pointwise, Stage, ParamSpec, Weights, Query.

A `CellSpec` describes a recurrent cell once: its gates, its state, its recurrence kind, its torch reference step
(the executable specification) and, optionally, the pointwise math of one hidden unit that fused backends compile.
Cells build on this module alone; the registry (seqfast.registry) stores them and re-exports these names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["ParamSpec", "Stage", "Pointwise", "CellSpec", "Weights", "Query", "Stack", "uniform_init",
           "RECURRENCE_KINDS", "NAME_RE"]

RECURRENCE_KINDS = ("dense", "diagonal", "none")
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")  # cell and backend names


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
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
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


class Stack(NamedTuple):
    """A module's layers as Backend.stack_runner binds them."""

    num_layers: int
    bidirectional: bool
    requires_grad: bool  # whether the calls build an autograd graph
    names: tuple[tuple[str, ...], ...]  # per layer-direction: its parameters' base names, in torch.nn's order


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
    # module options beyond torch.nn's that the run needs (see Backend.options): "return_states",
    # "merge_mode", "input_dropout", "recurrent_dropout", "zoneout"
    options: frozenset[str] = frozenset()

    def describe(self) -> str:
        parts = [f"cell={self.cell.name}", f"device={self.device}", f"dtype={str(self.dtype).replace('torch.', '')}"]
        for key in ("seq_len", "batch_size", "input_size", "hidden_size"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={value}")
        if self.proj_size:
            parts.append(f"proj_size={self.proj_size}")
        parts.append(f"requires_grad={self.requires_grad}")
        if self.options:
            parts.append(f"options={sorted(self.options)}")
        return ", ".join(parts)
