"""Pieces shared by cell definitions: the recurrent term and the torch math namespace."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..spec import CellSpec, Weights

# keys of the module options the torch backend passes in a step's Weights (see backends/reference.py)
RECURRENT_MASK = "_recurrent_dropout_mask"
RECURRENT_MASK_APPLIED = "_recurrent_dropout_mask_applied"
ZONEOUT_MASKS = "_zoneout_masks"


def recurrent_term(h: Tensor, w: Weights, num_gates: int, recurrence: str) -> Tensor:
    """The recurrent pre-activations [B, G*H] of a cell: W_hh h + b_hh (dense), w_hh * h + b_hh (diagonal).
    With variational recurrent dropout (w[RECURRENT_MASK], a [B, H] scaled mask), h is masked here, in the
    product only: the state the cell carries keeps the unmasked h."""
    mask = w.get(RECURRENT_MASK)
    if mask is not None:
        h = h * mask
        w[RECURRENT_MASK_APPLIED] = True
    if recurrence == "dense":
        return F.linear(h, w.weight_hh, w.bias_hh)
    if recurrence == "diagonal":
        out = h.repeat(1, num_gates) * w.weight_hh
        return out if w.bias_hh is None else out + w.bias_hh
    return h.new_zeros(h.shape[0], num_gates * h.shape[1])


def pointwise_recurrent_term(cell: CellSpec, x: Tensor, state: tuple[Tensor, ...], w: Weights, params: tuple,
                             m) -> Tensor:
    """The hg [B, G*H] that a cell's Pointwise code sees: recurrent_term, or for a staged cell each group of gates'
    product with its stage's vector (h for the first group), the stages evaluated with the math namespace m."""
    g = cell.num_gates
    stages = cell.pointwise.stages if cell.pointwise is not None else ()
    if not stages:
        return recurrent_term(state[0], w, g, cell.recurrence)
    hidden = state[0].shape[1]
    xg, parts, vector = x.chunk(g, 1), [], state[0]
    for (first, end), stage in zip(cell.pointwise.gate_groups(g), (*stages, None), strict=True):
        rows = slice(first * hidden, end * hidden)
        parts.append(F.linear(vector, w.weight_hh[rows], None if w.bias_hh is None else w.bias_hh[rows]))
        if stage is not None:
            hg = torch.cat(parts, 1).chunk(end, 1)
            vector = stage.forward(m, xg[:end], hg, state, params)
    return torch.cat(parts, 1)


def _tensors(*args) -> tuple[Tensor, ...]:
    """Numbers become tensors as torch broadcasts them: the dtype and device of the first floating tensor
    argument (float64 when there is none, so constants stay exact)."""
    like = next((a for a in args if isinstance(a, Tensor) and a.is_floating_point()), None)
    dtype = like.dtype if like is not None else torch.float64
    device = like.device if like is not None else None
    return tuple(a if isinstance(a, Tensor) else torch.as_tensor(a, dtype=dtype, device=device) for a in args)


def _numbers_as_tensors(fn):
    def wrapped(*args):
        return fn(*_tensors(*args))

    wrapped.__name__ = wrapped.__qualname__ = fn.__name__
    return wrapped


def _clamp(x, low, high):
    # min(max(x, low), high), as torch.clamp: NaN propagates, and low > high gives high
    return torch.minimum(torch.maximum(x, low), high)


def _where(cond, a, b):
    return torch.where(cond, *_tensors(a, b))


class _MathNamespace(SimpleNamespace):
    def __getattr__(self, name: str):  # only for a name it lacks
        raise AttributeError(f"the math namespace m has no {name!r}; it provides {', '.join(vars(self))}")


# The math namespace `m` that pointwise code is written against, evaluated with torch tensors: the semantics every
# backend's version of a name follows (seqfast.backends.pointwise_source.MATH_FUNCTIONS lists the names). Every
# argument may be a number where torch would broadcast one.
TORCH_MATH = _MathNamespace(
    **{fn.__name__.lstrip("_"): _numbers_as_tensors(fn) for fn in (
        torch.exp, torch.log, torch.log1p, torch.expm1, torch.sqrt, torch.abs, torch.sin, torch.cos,
        torch.tanh, torch.sigmoid, torch.relu, F.softplus, torch.pow, torch.maximum, torch.minimum, _clamp)},
    where=_where,
)
