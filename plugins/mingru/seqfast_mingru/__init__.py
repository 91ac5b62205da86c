"""minGRU (Feng et al. 2024, "Were RNNs all we needed?"): the gates see only the input.
z = sigmoid(x_z);  h' = (1 - z) * h + z * x_h.  No recurrent matrix (recurrence "none"), two gates.
"""

from __future__ import annotations

import torch

import seqfast


def reference_step(x_t, state, w):
    (h,) = state
    xz, xh = x_t.chunk(2, 1)
    z = torch.sigmoid(xz)
    return ((1 - z) * h + z * xh,)


def forward(m, xg, hg, state, params):
    z = m.sigmoid(xg[0])
    return ((1.0 - z) * state[0] + z * xg[1],)


def backward(m, xg, hg, state, params, d_new):
    z = m.sigmoid(xg[0])
    dh = d_new[0]
    dz = dh * (xg[1] - state[0]) * z * (1.0 - z)
    return (dz, dh * z), (0.0, 0.0), (dh * (1.0 - z),), ()


MINGRU = seqfast.CellSpec(
    name="mingru",
    num_gates=2,
    state_names=("h",),
    reference_step=reference_step,
    recurrence="none",
    pointwise=seqfast.Pointwise(forward, backward),
    description="minGRU: input-only gates, no recurrent matrix",
)


def register(registry) -> None:
    registry.register_cell(MINGRU)
