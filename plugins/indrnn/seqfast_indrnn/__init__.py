"""IndRNN (Li et al. 2018): each unit recurs only onto itself.  h' = relu(x W_ih^T + b_ih + u * h + b_hh),
with u = weight_hh a [H] vector (a diagonal recurrence).
"""

from __future__ import annotations

import torch

import seqfast
from seqfast.cells import recurrent_term


def reference_step(x_t, state, w):
    (h,) = state
    return (torch.relu(x_t + recurrent_term(h, w, 1, "diagonal")),)


def forward(m, xg, hg, state, params):
    return (m.relu(xg[0] + hg[0]),)


def backward(m, xg, hg, state, params, d_new):
    da = m.where(xg[0] + hg[0] > 0.0, d_new[0], 0.0)
    return (da,), (da,), (0.0,), ()


INDRNN = seqfast.CellSpec(
    name="indrnn",
    num_gates=1,
    state_names=("h",),
    reference_step=reference_step,
    recurrence="diagonal",
    pointwise=seqfast.Pointwise(forward, backward),
    description="IndRNN: diagonal recurrence with ReLU",
)


def register(registry) -> None:
    registry.register_cell(INDRNN)
