"""GRU with the reset gate applied before the recurrent product: the original GRU (Cho et al. 2014), Keras's
GRU(reset_after=False). Gates in torch's order r, z, n; parameters named and shaped as torch.nn.GRU's:
r = sigmoid(x_r + W_hr h + b_hr);  z = sigmoid(x_z + W_hz h + b_hz);  n = tanh(x_n + W_hn (r * h) + b_hn);
h' = (1 - z) * n + z * h.
The candidate's product takes r * h, formed within the step, so the cell is staged: one Stage (r * h, from gates
r, z) feeds the product of gate n.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..spec import CellSpec, Pointwise, Stage


def _step(x_t, state, w):
    (h,) = state
    hidden = h.shape[1]
    b_hh = w.bias_hh
    xr, xz, xn = x_t.chunk(3, 1)
    hr, hz = F.linear(h, w.weight_hh[: 2 * hidden], None if b_hh is None else b_hh[: 2 * hidden]).chunk(2, 1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + F.linear(r * h, w.weight_hh[2 * hidden :], None if b_hh is None else b_hh[2 * hidden :]))
    return ((1 - z) * n + z * h,)


def reset_forward(m, xg, hg, state, params):
    return m.sigmoid(xg[0] + hg[0]) * state[0]


def reset_backward(m, xg, hg, state, params, d_v):
    r = m.sigmoid(xg[0] + hg[0])
    dr = d_v * state[0] * r * (1.0 - r)
    return (dr, 0.0), (dr, 0.0), (d_v * r,), ()


def forward(m, xg, hg, state, params):
    z = m.sigmoid(xg[1] + hg[1])
    n = m.tanh(xg[2] + hg[2])
    return ((1.0 - z) * n + z * state[0],)


def backward(m, xg, hg, state, params, d_new):
    z = m.sigmoid(xg[1] + hg[1])
    n = m.tanh(xg[2] + hg[2])
    dh = d_new[0]
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (state[0] - n) * z * (1.0 - z)
    return (0.0, dz, dn), (0.0, dz, dn), (dh * z,), ()


GRU_RESET_BEFORE = CellSpec(
    name="gru_reset_before",
    num_gates=3,
    state_names=("h",),
    reference_step=_step,
    pointwise=Pointwise(forward, backward, stages=(Stage(2, reset_forward, reset_backward),)),
    description="GRU with the reset gate before the product (Keras reset_after=False; gates r, z, n)",
)


def keras_gru_weights(kernel: Tensor, recurrent_kernel: Tensor, bias: Tensor | None = None, *, layer: int = 0,
                      reverse: bool = False) -> dict[str, Tensor]:
    """Keras GRU weights as a state_dict of seqfast's GRU modules (torch.nn.GRU's names and layout).

    Keras keeps x @ kernel, gates side by side in the order z, r, h; torch's rows are r, z, n (n is Keras's h):
        weight_ih = [kernel[:, H:2H]; kernel[:, 0:H]; kernel[:, 2H:3H]]^T            [3H, I]
        weight_hh = the same reordering of recurrent_kernel                              [3H, H]
        bias [3H] (reset_after=False): bias_ih = that reordering of it, bias_hh = 0
        bias [2, 3H] (reset_after=True): bias_ih and bias_hh = its rows 0 and 1, reordered
    reset_after=False weights belong in a Recurrent("gru_reset_before", ...) module, reset_after=True ones in
    seqfast's GRU (torch.nn.GRU's math). Without a bias (use_bias=False) the module needs bias=False. The keys
    carry the layer's suffix: `_l{layer}`, plus `_reverse` for the backward direction of a bidirectional module.

    Args:
        kernel: [I, 3H] Keras `kernel`.
        recurrent_kernel: [H, 3H] Keras `recurrent_kernel`.
        bias: [3H] or [2, 3H] Keras `bias`, or None.
    Returns:
        {"weight_ih_l0": ..., "weight_hh_l0": ..., "bias_ih_l0": ..., "bias_hh_l0": ...} (float tensors; load with
        module.load_state_dict(..., strict=False) for one layer of several).
    """
    kernel, recurrent_kernel = torch.as_tensor(kernel), torch.as_tensor(recurrent_kernel)
    if kernel.dim() != 2 or kernel.shape[1] % 3:
        raise ValueError(f"kernel must be [input_size, 3 * hidden_size], got shape {tuple(kernel.shape)}")
    hidden = kernel.shape[1] // 3
    if tuple(recurrent_kernel.shape) != (hidden, 3 * hidden):
        raise ValueError(f"recurrent_kernel must be [hidden_size, 3 * hidden_size] = [{hidden}, {3 * hidden}] "
                         f"(hidden_size from kernel's {tuple(kernel.shape)}), got shape "
                         f"{tuple(recurrent_kernel.shape)}")

    def torch_order(columns: Tensor) -> Tensor:  # [..., 3H] in z, r, h order -> [..., 3H] in r, z, n order
        z, r, n = columns.split(hidden, -1)
        return torch.cat([r, z, n], -1)

    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    out = {f"weight_ih{suffix}": torch_order(kernel).t().contiguous(),
           f"weight_hh{suffix}": torch_order(recurrent_kernel).t().contiguous()}
    if bias is not None:
        bias = torch.as_tensor(bias)
        if tuple(bias.shape) == (3 * hidden,):
            out[f"bias_ih{suffix}"] = torch_order(bias)
            out[f"bias_hh{suffix}"] = torch.zeros_like(out[f"bias_ih{suffix}"])
        elif tuple(bias.shape) == (2, 3 * hidden):
            out[f"bias_ih{suffix}"], out[f"bias_hh{suffix}"] = torch_order(bias[0]), torch_order(bias[1])
        else:
            raise ValueError(f"bias must be [3 * hidden_size] = [{3 * hidden}] (reset_after=False) or "
                             f"[2, {3 * hidden}] (reset_after=True), got shape {tuple(bias.shape)}")
    return out
