"""GRU, as torch.nn.GRU. Gates in torch's order r, z, n; the reset gate applies to W_hn h + b_hn:
r = sigmoid(x_r + h_r);  z = sigmoid(x_z + h_z);  n = tanh(x_n + r * h_n);  h' = (1 - z) * n + z * h.
"""

from __future__ import annotations

import torch

from ..spec import CellSpec, Pointwise
from .common import recurrent_term


def _step(x_t, state, w):
    (h,) = state
    xr, xz, xn = x_t.chunk(3, 1)
    hr, hz, hn = recurrent_term(h, w, 3, "dense").chunk(3, 1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return ((1 - z) * n + z * h,)


def forward(m, xg, hg, state, params):
    r = m.sigmoid(xg[0] + hg[0])
    z = m.sigmoid(xg[1] + hg[1])
    n = m.tanh(xg[2] + r * hg[2])
    return ((1.0 - z) * n + z * state[0],)


def backward(m, xg, hg, state, params, d_new):
    r = m.sigmoid(xg[0] + hg[0])
    z = m.sigmoid(xg[1] + hg[1])
    n = m.tanh(xg[2] + r * hg[2])
    dh = d_new[0]
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (state[0] - n) * z * (1.0 - z)
    dr = dn * hg[2] * r * (1.0 - r)
    return (dr, dz, dn), (dr, dz, dn * r), (dh * z,), ()


GRU = CellSpec(
    name="gru",
    num_gates=3,
    state_names=("h",),
    reference_step=_step,
    pointwise=Pointwise(forward, backward),
    native_mode="GRU",
    description="GRU (torch.nn.GRU, gates r, z, n)",
)
