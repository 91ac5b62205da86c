"""LSTM, as torch.nn.LSTM. Gates in torch's order i, f, g, o:
c' = sigmoid(f) * c + sigmoid(i) * tanh(g);  h' = sigmoid(o) * tanh(c');  with proj_size: h' <- h' W_hr^T.
"""

from __future__ import annotations

import torch

from ..spec import CellSpec, Pointwise
from .common import recurrent_term


def _step(x_t, state, w):
    h, c = state
    i, f, g, o = (x_t + recurrent_term(h, w, 4, "dense")).chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if w.get("weight_hr") is not None:
        h = h @ w["weight_hr"].t()
    return h, c


def forward(m, xg, hg, state, params):
    i = m.sigmoid(xg[0] + hg[0])
    f = m.sigmoid(xg[1] + hg[1])
    g = m.tanh(xg[2] + hg[2])
    o = m.sigmoid(xg[3] + hg[3])
    c = f * state[1] + i * g
    return (o * m.tanh(c), c)


def backward(m, xg, hg, state, params, d_new):
    i = m.sigmoid(xg[0] + hg[0])
    f = m.sigmoid(xg[1] + hg[1])
    g = m.tanh(xg[2] + hg[2])
    o = m.sigmoid(xg[3] + hg[3])
    c = f * state[1] + i * g
    tc = m.tanh(c)
    dc = d_new[1] + d_new[0] * o * (1.0 - tc * tc)
    di = dc * g * i * (1.0 - i)
    df = dc * state[1] * f * (1.0 - f)
    dg = dc * i * (1.0 - g * g)
    do = d_new[0] * tc * o * (1.0 - o)
    d_gates = (di, df, dg, do)
    return d_gates, d_gates, (0.0, dc * f), ()


LSTM = CellSpec(
    name="lstm",
    num_gates=4,
    state_names=("h", "c"),
    reference_step=_step,
    pointwise=Pointwise(forward, backward),
    native_mode="LSTM",
    supports_proj=True,
    description="LSTM (torch.nn.LSTM, gates i, f, g, o; proj_size supported)",
)
