"""Peephole LSTM (Gers & Schmidhuber 2000): the gates also see the cell state through diagonal weights.

i = sigmoid(x_i + h_i + p_i * c);  f = sigmoid(x_f + h_f + p_f * c);  g = tanh(x_g + h_g)
c' = f * c + i * g;  o = sigmoid(x_o + h_o + p_o * c');  h' = o * tanh(c')
The peepholes p = (p_i, p_f, p_o) are one [3*H] parameter per layer-direction, `weight_peep_l{k}`.
"""

from __future__ import annotations

import torch

import seqfast
from seqfast.cells import recurrent_term


def reference_step(x_t, state, w):
    h, c = state
    hidden = c.shape[1]
    i, f, g, o = (x_t + recurrent_term(h, w, 4, "dense")).chunk(4, 1)
    p_i, p_f, p_o = w.weight_peep[:hidden], w.weight_peep[hidden : 2 * hidden], w.weight_peep[2 * hidden :]
    i = torch.sigmoid(i + p_i * c)
    f = torch.sigmoid(f + p_f * c)
    c = f * c + i * torch.tanh(g)
    o = torch.sigmoid(o + p_o * c)
    return o * torch.tanh(c), c


def forward(m, xg, hg, state, params):
    c = state[1]
    i = m.sigmoid(xg[0] + hg[0] + params[0] * c)
    f = m.sigmoid(xg[1] + hg[1] + params[1] * c)
    g = m.tanh(xg[2] + hg[2])
    c_new = f * c + i * g
    o = m.sigmoid(xg[3] + hg[3] + params[2] * c_new)
    return (o * m.tanh(c_new), c_new)


def backward(m, xg, hg, state, params, d_new):
    c = state[1]
    i = m.sigmoid(xg[0] + hg[0] + params[0] * c)
    f = m.sigmoid(xg[1] + hg[1] + params[1] * c)
    g = m.tanh(xg[2] + hg[2])
    c_new = f * c + i * g
    o = m.sigmoid(xg[3] + hg[3] + params[2] * c_new)
    tc = m.tanh(c_new)
    do = d_new[0] * tc * o * (1.0 - o)
    dc_new = d_new[1] + d_new[0] * o * (1.0 - tc * tc) + do * params[2]
    di = dc_new * g * i * (1.0 - i)
    df = dc_new * c * f * (1.0 - f)
    dg = dc_new * i * (1.0 - g * g)
    dc = dc_new * f + di * params[0] + df * params[1]
    d_gates = (di, df, dg, do)
    return d_gates, d_gates, (0.0, dc), (di * c, df * c, do * c_new)


PEEPHOLE_LSTM = seqfast.CellSpec(
    name="peephole_lstm",
    num_gates=4,
    state_names=("h", "c"),
    reference_step=reference_step,
    extra_params=(seqfast.ParamSpec("weight_peep", lambda hidden, proj: (3 * hidden,)),),
    pointwise=seqfast.Pointwise(forward, backward, params=("weight_peep",)),
    description="LSTM with peephole connections (diagonal cell-to-gate weights)",
)


def register(registry) -> None:
    registry.register_cell(PEEPHOLE_LSTM)
