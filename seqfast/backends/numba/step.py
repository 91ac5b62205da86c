"""NumbaBackend.step: one step of a cell (RecurrentCell) as one compiled call each way.

The kernels are codegen.py's step_forward / step_backward, generated from the cell's pointwise code with the scans:
both projections (x W_ih^T, h W_hh^T) and the pointwise math in one call; in training the backward (pointwise
derivative, d_x, d_h and every parameter's gradient) is one call too, behind one autograd.Function.
Weights are read through _host's numpy views (same memory, keyed on the tensor and its layout), so in-place updates,
`.data` assignments and `to()` show through. Under torch.func transforms, torch.compile, or for a cell without
one-step kernels, the backend's default step (its scan with T=1) runs instead.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ...registry import CellSpec
from ..fused import _grads_by_recomputing, _transforms_active
from ..reference import TorchBackend
from ._blas import gemm_address
from .codegen import kernels, per_unit_width, step_supported

_REFERENCE = TorchBackend()


class StepLayout(NamedTuple):
    """Where a cell's parameters (in torch.nn's order, by base name) go in the kernels' arguments, worked out once
    per (cell, dtype, names)."""

    module: object  # the generated kernel module
    fn: int  # the BLAS GEMM's address
    dtype_name: str
    w_ih: int  # index into params
    b_ih: int  # -1: absent (zeros)
    w_hh: int
    b_hh: int
    extras: tuple[int, ...]  # per Pointwise.params entry: index into params, or -1 (absent: zeros)
    widths: tuple[int, ...]  # k of each [k*H] extra
    has_backward: bool


_layouts: dict[tuple, StepLayout | None] = {}


def step_layout(cell: CellSpec, dtype: torch.dtype, names) -> StepLayout | None:
    """The layout, or None where the one-step kernels do not apply (no dense recurrence, stages, no MKL)."""
    key = (cell, dtype, tuple(names))
    if key in _layouts:
        return _layouts[key]
    dtype_name = {torch.float32: "float32", torch.float64: "float64"}.get(dtype)
    layout = None
    fn = gemm_address(dtype_name) if dtype_name else 0
    if fn and step_supported(cell):
        index = {n: i for i, n in enumerate(names)}
        pw = cell.pointwise
        layout = StepLayout(kernels(cell, dtype_name), fn, dtype_name, index["weight_ih"], index.get("bias_ih", -1),
                            index["weight_hh"], index.get("bias_hh", -1),
                            tuple(index.get(n, -1) for n in pw.params),
                            tuple(per_unit_width(cell, n) for n in pw.params), pw.backward is not None)
    if len(_layouts) > 256:
        _layouts.clear()
    _layouts[key] = layout
    return layout


def _arrays(layout: StepLayout, params, hidden: int, host) -> list[np.ndarray]:
    """[w_ih, b_ih, w_hh, b_hh, *extras] as numpy arrays; absent ones as zeros."""
    width = params[layout.w_hh].shape[0]

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=layout.dtype_name)

    out = [host(params[layout.w_ih]), zeros(width) if layout.b_ih < 0 else host(params[layout.b_ih]),
           host(params[layout.w_hh]), zeros(width) if layout.b_hh < 0 else host(params[layout.b_hh])]
    out += [zeros(k * hidden) if i < 0 else host(params[i]) for i, k in zip(layout.extras, layout.widths,
                                                                              strict=True)]
    return out


def run_step(layout: StepLayout, cell: CellSpec, x: Tensor, state: tuple[Tensor, ...], params, names, host
             ) -> tuple[Tensor, ...]:
    """The new states; differentiable (through _Step) when grad mode is on and any input requires grad."""
    if torch.is_grad_enabled() and (x.requires_grad or any(s.requires_grad for s in state)
                                    or any(p.requires_grad for p in params)):
        return _Step.apply(layout, cell, names, host, len(state), x, *state, *params)
    return _forward(layout, x, state, params, host)[0]


def _forward(layout: StepLayout, x: Tensor, state, params, host):
    """-> (new states, x as numpy, states as numpy, weight arrays, xg, hg)."""
    dtype = layout.dtype_name
    batch, hidden = x.shape[0], state[0].shape[1]
    arrays = _arrays(layout, params, hidden, host)
    width = arrays[2].shape[0]
    x_np = x.detach().contiguous().numpy()
    s_np = [s.detach().contiguous().numpy() for s in state]
    new = [np.empty((batch, hidden), dtype=dtype) for _ in state]
    xg, hg = np.empty((batch, width), dtype=dtype), np.empty((batch, width), dtype=dtype)
    layout.module.step_forward(layout.fn, x_np, *arrays, *s_np, *new, xg, hg)
    return tuple(torch.from_numpy(n) for n in new), x_np, s_np, arrays, xg, hg


class _Step(torch.autograd.Function):
    """One step, forward and backward each one kernel call. A backward that must itself be differentiable
    (create_graph=True) recomputes the step on the torch reference and differentiates that."""

    @staticmethod
    def forward(ctx, layout, cell, names, host, n_state, x, *tensors):
        state, params = tensors[:n_state], tensors[n_state:]
        new, x_np, s_np, arrays, xg, hg = _forward(layout, x, state, params, host)
        ctx.layout, ctx.cell, ctx.names, ctx.n_state = layout, cell, names, n_state
        ctx.arrays = (x_np, s_np, arrays, xg, hg)
        ctx.save_for_backward(x, *tensors)  # version checks: an in-place change before backward raises
        return new

    @staticmethod
    def backward(ctx, *grads):
        layout, n_state = ctx.layout, ctx.n_state
        x, *tensors = ctx.saved_tensors
        params = tensors[n_state:]
        needs = ctx.needs_input_grad[5:]
        if torch.is_grad_enabled() or _transforms_active():
            def step(x, *t):
                return _REFERENCE.step(ctx.cell, x, tuple(t[:n_state]), t[n_state:], ctx.names)

            got = _grads_by_recomputing(step, [x, *tensors], needs, list(grads))
            return (None, None, None, None, None, *got)
        x_np, s_np, arrays, xg, hg = ctx.arrays
        dtype = layout.dtype_name
        batch, width, hidden = xg.shape[0], xg.shape[1], s_np[0].shape[1]
        d_new = [np.zeros((batch, hidden), dtype=dtype) if g is None else g.detach().contiguous().numpy()
                 for g in grads]
        d_state = [np.empty((batch, hidden), dtype=dtype) for _ in range(n_state)]
        dxg, dhg = np.empty((batch, width), dtype=dtype), np.empty((batch, width), dtype=dtype)
        need_dx = needs[0]
        need_dw = any(needs[1 + n_state:])
        dx = np.empty(x_np.shape if need_dx else (0, 0), dtype=dtype)
        shapes = [a.shape for a in arrays] if need_dw else [(0, 0), (0,), (0, 0), (0,)] + [(0,)] * len(arrays[4:])
        d_arrays = [np.empty(s, dtype=dtype) for s in shapes]
        d_w_ih, d_b_ih, d_w_hh, d_b_hh, *d_extras = d_arrays
        layout.module.step_backward(layout.fn, x_np, *arrays, *s_np, xg, hg, *d_new, *d_state, dxg, dhg, dx,
                                    d_w_ih, d_w_hh, d_b_ih, d_b_hh, *d_extras, need_dx, need_dw)
        by_index = {layout.w_ih: d_w_ih, layout.b_ih: d_b_ih, layout.w_hh: d_w_hh, layout.b_hh: d_b_hh}
        by_index.update(zip(layout.extras, d_extras, strict=True))
        g_params = [torch.from_numpy(by_index[i]).view(p.shape) if need else None
                    for i, (p, need) in enumerate(zip(params, needs[1 + n_state:], strict=True))]
        g_state = [torch.from_numpy(d) if need else None for d, need in zip(d_state, needs[1:1 + n_state],
                                                                            strict=True)]
        return (None, None, None, None, None, torch.from_numpy(dx) if need_dx else None, *g_state, *g_params)


__all__ = ["run_step", "step_layout", "StepLayout"]
