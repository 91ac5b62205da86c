"""Checks run when a cell registers: its reference step accepts the declared gates and returns the state, and its
pointwise forward and backward agree with the reference step and with autograd (float64, tiny random inputs)."""

from __future__ import annotations

from typing import Any

import torch

from ..spec import CellSpec, Weights
from .common import TORCH_MATH, pointwise_recurrent_term

__all__ = ["validate_cell"]


def validate_cell(spec: CellSpec) -> None:
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
        if not torch.allclose(torch.as_tensor(a, dtype=b.dtype), b, rtol=1e-9, atol=1e-9, equal_nan=True):
            raise ValueError(f"cell {spec.name!r}: Pointwise.forward's new {name!r} disagrees with reference_step "
                             f"(max difference {(torch.as_tensor(a) - b).abs().max().item():.3g})")
    if spec.pointwise.backward is not None:
        params_of = [f"{name}[{r}]" for name in spec.pointwise.params
                     for r in range(weights[name].numel() // hidden)]
        _validate_pointwise_backward(spec, x.chunk(g, 1), hg.chunk(g, 1), state, tuple(params), params_of)


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"({', '.join(_describe(v) for v in value)}{',' if len(value) == 1 else ''})"
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    return type(value).__name__ if not isinstance(value, (int, float)) else repr(value)


def _validate_pointwise_backward(spec: CellSpec, xg: tuple, hg: tuple, state: tuple, params: tuple,
                                 param_values: list[str]) -> None:
    """The pointwise backward must return (d_xg, d_hg, d_state, d_params) of the declared sizes, each value a
    number or a tensor of one unit's shape, and equal autograd of the pointwise forward (float64, random inputs)."""
    g, s, p = spec.num_gates, spec.num_states, len(params)
    unit = state[0].shape
    expected = f"(d_xg: {g} values, d_hg: {g} values, d_state: {s} values, d_params: {p} values)"
    params = tuple(v.expand(unit) for v in params)  # one value per unit and batch row, like the states
    leaves = [t.detach().clone().requires_grad_() for t in (*xg, *hg, *state, *params)]
    xg_, hg_, state_, params_ = (tuple(leaves[a:b]) for a, b in ((0, g), (g, 2 * g), (2 * g, 2 * g + s),
                                                                   (2 * g + s, 2 * g + s + p)))
    gen = torch.Generator().manual_seed(1)
    d_new = tuple(torch.randn(unit, generator=gen, dtype=state[0].dtype) for _ in range(s))
    try:
        got = spec.pointwise.backward(TORCH_MATH, xg_, hg_, state_, params_, d_new)
    except Exception as exc:
        raise ValueError(f"cell {spec.name!r}: Pointwise.backward failed on {g} gates, {s} states and {p} "
                         f"parameter values: {type(exc).__name__}: {exc}") from exc
    sizes = (g, g, s, p)
    if not (isinstance(got, tuple) and len(got) == 4
            and all(isinstance(part, tuple) and len(part) == n for part, n in zip(got, sizes, strict=True))):
        raise ValueError(f"cell {spec.name!r}: Pointwise.backward must return {expected}; got {_describe(got)}")
    names = ([f"d_xg[{i}]" for i in range(g)] + [f"d_hg[{i}]" for i in range(g)]
             + [f"d_state[{i}] ({n!r})" for i, n in enumerate(spec.state_names)]
             + [f"d_params[{i}] ({v})" for i, v in enumerate(param_values)])
    values = [v for part in got for v in part]
    for name, value in zip(names, values, strict=True):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number and not (isinstance(value, torch.Tensor) and value.is_floating_point()
                               and torch.broadcast_shapes(value.shape, unit) == unit):
            raise ValueError(f"cell {spec.name!r}: Pointwise.backward's {name} must be a number or one value per "
                             f"unit (shape {list(unit)} here), got {_describe(value)}; it returns {expected}")
    new = spec.pointwise.forward(TORCH_MATH, xg_, hg_, state_, params_)
    outputs = [(o, d) for o, d in zip(new, d_new, strict=True) if isinstance(o, torch.Tensor) and o.requires_grad]
    autograd = (torch.autograd.grad([o for o, _ in outputs], leaves, [d for _, d in outputs], allow_unused=True)
                if outputs else [None] * len(leaves))
    for i, (name, value, ref, leaf) in enumerate(zip(names, values, autograd, leaves, strict=True)):
        if g <= i < 2 * g and spec.recurrence == "none":
            continue  # there is no recurrent term: this gradient is never used
        ref = torch.zeros_like(leaf) if ref is None else ref
        mine = torch.as_tensor(value, dtype=leaf.dtype).detach().expand(unit)
        if not torch.allclose(mine, ref, rtol=1e-6, atol=1e-9, equal_nan=True):
            raise ValueError(f"cell {spec.name!r}: Pointwise.backward's {name} disagrees with autograd of "
                             f"Pointwise.forward (max difference {(mine - ref).abs().max().item():.3g} on random "
                             f"float64 inputs); it returns {expected}")
