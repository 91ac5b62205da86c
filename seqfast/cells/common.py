"""Pieces shared by cell definitions: the recurrent term and the torch math namespace."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import CellSpec, Weights


def recurrent_term(h: Tensor, w: Weights, num_gates: int, recurrence: str) -> Tensor:
    """The recurrent pre-activations [B, G*H] of a cell: W_hh h + b_hh (dense), w_hh * h + b_hh (diagonal)."""
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


def _where(cond, a, b):
    return torch.where(cond, torch.as_tensor(a), torch.as_tensor(b))


# The math namespace `m` that pointwise code is written against, evaluated with torch tensors.
# Fused backends provide the same names (numba scalar functions, triton tl functions).
TORCH_MATH = SimpleNamespace(
    exp=torch.exp,
    log=torch.log,
    tanh=torch.tanh,
    sigmoid=torch.sigmoid,
    relu=torch.relu,
    sqrt=torch.sqrt,
    abs=torch.abs,
    maximum=torch.maximum,
    minimum=torch.minimum,
    where=_where,
)
