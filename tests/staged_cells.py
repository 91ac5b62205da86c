"""MGU (minimal gated unit), a staged cell written the way a plugin writes it: h~ = tanh(x_h + U_h (f * h)).
Shared by the tests of staged recurrence on every backend."""

from __future__ import annotations

import torch

from seqfast.registry import CellSpec, Pointwise, Stage


def mgu_step(x_t, state, w):
    (h,) = state
    hidden = h.shape[1]
    x_f, x_h = x_t.chunk(2, 1)
    f = torch.sigmoid(x_f + h @ w.weight_hh[:hidden].t() + w.bias_hh[:hidden])
    candidate = torch.tanh(x_h + (f * h) @ w.weight_hh[hidden:].t() + w.bias_hh[hidden:])
    return ((1 - f) * h + f * candidate,)


def mgu_gate(m, xg, hg, state, params):
    return m.sigmoid(xg[0] + hg[0]) * state[0]


def mgu_gate_backward(m, xg, hg, state, params, d_v):
    f = m.sigmoid(xg[0] + hg[0])
    d_f = d_v * state[0] * f * (1.0 - f)
    return (d_f,), (d_f,), (d_v * f,), ()


def mgu_forward(m, xg, hg, state, params):
    f = m.sigmoid(xg[0] + hg[0])
    candidate = m.tanh(xg[1] + hg[1])
    return ((1.0 - f) * state[0] + f * candidate,)


def mgu_backward(m, xg, hg, state, params, d_new):
    f = m.sigmoid(xg[0] + hg[0])
    candidate = m.tanh(xg[1] + hg[1])
    dh = d_new[0]
    d_f = dh * (candidate - state[0]) * f * (1.0 - f)
    d_c = dh * f * (1.0 - candidate * candidate)
    return (d_f, d_c), (d_f, d_c), (dh * (1.0 - f),), ()


def mgu_spec(name: str) -> CellSpec:
    """The MGU cell under `name` (each test module registers its own)."""
    return CellSpec(name, 2, ("h",), mgu_step,
                    pointwise=Pointwise(mgu_forward, mgu_backward,
                                        stages=(Stage(1, mgu_gate, mgu_gate_backward),)),
                    description="minimal gated unit: h~ = tanh(x_h + U_h (f * h))")
