"""Elman RNN cells, as torch.nn.RNN: h' = act(x W_ih^T + b_ih + W_hh h + b_hh), act = tanh or relu."""

from __future__ import annotations

import torch

from ..spec import CellSpec, Pointwise
from .common import recurrent_term


def _tanh_step(x_t, state, w):
    (h,) = state
    return (torch.tanh(x_t + recurrent_term(h, w, 1, "dense")),)


def _relu_step(x_t, state, w):
    (h,) = state
    return (torch.relu(x_t + recurrent_term(h, w, 1, "dense")),)


def tanh_forward(m, xg, hg, state, params):
    return (m.tanh(xg[0] + hg[0]),)


def tanh_backward(m, xg, hg, state, params, d_new):
    h = m.tanh(xg[0] + hg[0])
    da = d_new[0] * (1.0 - h * h)
    return (da,), (da,), (0.0,), ()


def relu_forward(m, xg, hg, state, params):
    return (m.relu(xg[0] + hg[0]),)


def relu_backward(m, xg, hg, state, params, d_new):
    # as torch's threshold_backward: the gradient is dropped where the input is <= 0, so it passes a NaN input
    da = m.where(xg[0] + hg[0] <= 0.0, 0.0, d_new[0])
    return (da,), (da,), (0.0,), ()


RNN_TANH = CellSpec(
    name="rnn_tanh",
    num_gates=1,
    state_names=("h",),
    reference_step=_tanh_step,
    pointwise=Pointwise(tanh_forward, tanh_backward),
    native_mode="RNN_TANH",
    description="Elman RNN with tanh (torch.nn.RNN, nonlinearity='tanh')",
)

RNN_RELU = CellSpec(
    name="rnn_relu",
    num_gates=1,
    state_names=("h",),
    reference_step=_relu_step,
    pointwise=Pointwise(relu_forward, relu_backward),
    native_mode="RNN_RELU",
    description="Elman RNN with ReLU (torch.nn.RNN, nonlinearity='relu')",
)
