"""NumbaBackend.step: one step of a cell (RecurrentCell) as one compiled call each way.

The kernels are codegen.py's step_forward / step_backward, generated from the cell's pointwise code with the scans:
both projections (x W_ih^T, h W_hh^T) and the pointwise math in one call; in training the backward (pointwise
derivative, d_x, d_h and every parameter's gradient) is one call too, behind one autograd.Function.
The kernels read every tensor by its address, taken on each call (nothing about a weight is cached), so in-place
updates, `.data` assignments and `to()` show through. Under torch.func transforms, torch.compile, or for a cell without
one-step kernels, the backend's default step (its scan with T=1) runs instead.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch
from torch import Tensor

from ..._memo import any_requires_grad as _any_requires_grad
from ...registry import CellSpec
from ..fused import _grads_by_recomputing, _graph_retained, _transforms_active
from ..reference import TorchBackend
from . import gemm
from ._blas import gemm_address, threaded_gemm_address
from .codegen import kernels, per_unit_width, step_supported

_REFERENCE = TorchBackend()


class StepLayout(NamedTuple):
    """Where a cell's parameters (in torch.nn's order, by base name) go in the kernels' arguments, worked out once
    per (cell, dtype, names)."""

    module: object  # the generated kernel module
    fn: int  # the BLAS GEMM's address, for products below gemm.SMALL_TORCH_GEMM multiply-adds
    threaded_fn: int  # for larger ones: MKL's ?gemm_, which uses MKL's threads
    dtype: torch.dtype
    w_ih: int  # index into params
    b_ih: int  # -1: absent (zeros)
    w_hh: int
    b_hh: int
    extras: tuple[int, ...]  # per Pointwise.params entry: index into params, or -1 (absent: zeros)
    widths: tuple[int, ...]  # k of each [k*H] extra
    gates: int
    slots: dict  # (input size, hidden size) -> ((index into params or -1, elements), ...) in the kernels' order


_layouts: dict[tuple, StepLayout | None] = {}


def step_layout(cell: CellSpec, dtype: torch.dtype, names) -> StepLayout | None:
    """The layout, or None where the one-step kernels do not apply (no dense recurrence, stages, no backward
    when training is asked for is left to run_step, no MKL)."""
    key = (cell, dtype, tuple(names))
    if key in _layouts:
        return _layouts[key]
    dtype_name = {torch.float32: "float32", torch.float64: "float64"}.get(dtype)
    layout = None
    fn = gemm_address(dtype_name) if dtype_name else 0
    if fn and step_supported(cell):
        index = {n: i for i, n in enumerate(names)}
        pw = cell.pointwise
        layout = StepLayout(kernels(cell, dtype_name), fn, threaded_gemm_address(dtype_name), dtype,
                            index["weight_ih"], index.get("bias_ih", -1), index["weight_hh"], index.get("bias_hh", -1),
                            tuple(index.get(n, -1) for n in pw.params),
                            tuple(per_unit_width(cell, n) for n in pw.params), cell.num_gates, {})
    if len(_layouts) > 256:
        _layouts.clear()
    _layouts[key] = layout
    return layout


_zeros: dict[tuple[torch.dtype, int], Tensor] = {}


def _zeros_address(dtype: torch.dtype, n: int) -> int:
    """The address of n zeros (read only: an absent bias or extra), kept for the process."""
    zeros = _zeros.get((dtype, n))
    if zeros is None:
        zeros = _zeros[(dtype, n)] = torch.zeros(n, dtype=dtype)
    return zeros.data_ptr()


def _readable(t: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    """t itself when the kernels can read it by address (C-contiguous, on the CPU, of the step's dtype), else a
    contiguous copy; a tensor of another dtype or device raises, as torch.nn's kernels do."""
    if t.dtype is dtype and t.is_cpu and t.is_contiguous():
        return t
    if t.dtype != dtype or not t.is_cpu:
        raise RuntimeError(f"numba backend: {what} is {t.dtype} on {t.device}, expected {dtype} on cpu like the input")
    return t if t.is_contiguous() else t.contiguous()


def _slots(layout: StepLayout, inputs: int, hidden: int) -> tuple[tuple[int, int], ...]:
    """((index into params, or -1 where absent; elements), ...) for w_ih, b_ih, w_hh, b_hh and the extras."""
    slots = layout.slots.get((inputs, hidden))
    if slots is None:
        width = layout.gates * hidden
        sizes = (width * inputs, width, width * hidden, width, *(k * hidden for k in layout.widths))
        order = (layout.w_ih, layout.b_ih, layout.w_hh, layout.b_hh, *layout.extras)
        if len(layout.slots) >= 64:
            layout.slots.clear()
        slots = layout.slots[(inputs, hidden)] = tuple(zip(order, sizes, strict=True))
    return slots


def _weights(layout: StepLayout, params, names, inputs: int, hidden: int) -> tuple[list[Tensor], list[int]]:
    """([w_ih, b_ih, w_hh, b_hh, *extras] as read (contiguous, of the step's dtype; None where absent), kept alive
    for the call; their addresses, zeros where absent). Each one's size is checked: the kernels read them by
    address."""
    dtype = layout.dtype
    tensors, addresses = [], []
    for i, n in _slots(layout, inputs, hidden):
        if i < 0:
            tensors.append(None)
            addresses.append(_zeros_address(dtype, n))
            continue
        t = params[i]
        # the usual case, checked inline: a step's few microseconds of Python are most of its time at small sizes
        if t.dtype is not dtype or not t.is_cpu or not t.is_contiguous():
            t = _readable(t, dtype, names[i])
        if t.numel() != n:
            raise RuntimeError(f"numba backend: {names[i]} has shape {tuple(t.shape)}, expected {n} elements "
                               f"for input size {inputs} and hidden size {hidden}")
        tensors.append(t)
        addresses.append(t.data_ptr())
    return tensors, addresses


def _gemm_for(layout: StepLayout, batch: int, inputs: int, hidden: int) -> int:
    """The GEMM for a step's products: the layout's own for small ones, MKL's threaded ?gemm_ from
    gemm.SMALL_TORCH_GEMM multiply-adds (the threshold torch's own small GEMMs keep to one thread below)."""
    if batch * max(inputs, hidden) * layout.gates * hidden < gemm.SMALL_TORCH_GEMM:
        return layout.fn
    return layout.threaded_fn


def run_step(layout: StepLayout, cell: CellSpec, x: Tensor, state: tuple[Tensor, ...], params, names
             ) -> tuple[Tensor, ...]:
    """The new states; differentiable (through _Step) when grad mode is on and any input requires grad."""
    if torch.is_grad_enabled() and (x.requires_grad or _any_requires_grad(state) or _any_requires_grad(params)):
        if cell.pointwise.backward is None:
            raise RuntimeError(f"numba backend: cell {cell.name!r} has no pointwise backward")
        return _apply_step(layout, cell, names, len(state), x, *state, *params)
    return _forward(layout, x, state, params, names, _scratch)[0]


_scratch_by_thread: dict[tuple, Tensor] = {}


def _scratch(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The work buffer of an inference step, kept per thread and reused: nothing reads it after the call, and the
    kernel writes it before reading it."""
    key = (threading.get_ident(), dtype, shape)
    work = _scratch_by_thread.get(key)
    if work is None:
        if len(_scratch_by_thread) >= 64:
            _scratch_by_thread.clear()
        work = _scratch_by_thread[key] = torch.empty(shape, dtype=dtype)
    return work


def _fresh(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype)


def _forward(layout: StepLayout, x: Tensor, state, params, names, work_buffer=_fresh):
    """-> (new states, work [2, B, G*H]: x W_ih^T and h W_hh^T, what the backward reads, the weights as read,
    their addresses). work_buffer(shape, dtype) gives work: a fresh tensor where the backward keeps it."""
    dtype = layout.dtype
    batch, inputs, hidden = x.shape[0], x.shape[1], state[0].shape[1]
    kept, weights = _weights(layout, params, names, inputs, hidden)
    if x.dtype is not dtype or not x.is_cpu or not x.is_contiguous():
        x = _readable(x, dtype, "input")
    state = [s if s.dtype is dtype and s.is_cpu and s.is_contiguous() else _readable(s, dtype, "hx") for s in state]
    new = [torch.empty_like(s) for s in state]  # contiguous [B, H]: the states are, once readable
    work = work_buffer((2, batch, layout.gates * hidden), dtype)
    layout.module.step_forward(_gemm_for(layout, batch, inputs, hidden), batch, inputs, hidden, x.data_ptr(),
                               *weights, *[s.data_ptr() for s in state], *[n.data_ptr() for n in new],
                               work.data_ptr())
    return tuple(new), work, kept, weights


class _Step(torch.autograd.Function):
    """One step, forward and backward each one kernel call. A backward that must itself be differentiable
    (create_graph=True) recomputes the step on the torch reference and differentiates that."""

    @staticmethod
    def forward(ctx, layout, cell, names, n_state, x, *tensors):
        new, work, kept, weights = _forward(layout, x, tensors[:n_state], tensors[n_state:], names)
        ctx.layout, ctx.cell, ctx.names, ctx.n_state, ctx.work = layout, cell, names, n_state, work
        # the backward reads the weights the forward read, by the same addresses: aliases keep that memory even
        # where a weight's .data is replaced in between (torch.nn's backward, too, reads the forward's weights);
        # an in-place change raises through the version check of the tensors saved below
        ctx.kept, ctx.weights = [t if t is None else t.detach() for t in kept], weights
        ctx.save_for_backward(x, *tensors)
        return new

    @staticmethod
    def backward(ctx, *grads):
        layout, n_state, names = ctx.layout, ctx.n_state, ctx.names
        x, *tensors = ctx.saved_tensors
        state = tensors[:n_state]
        needs = ctx.needs_input_grad[4:]
        if torch.is_grad_enabled() or _transforms_active():
            def step(x, *t):
                return _REFERENCE.step(ctx.cell, x, tuple(t[:n_state]), t[n_state:], names)

            got = _grads_by_recomputing(step, [x, *tensors], needs, list(grads))
            return (None, None, None, None, *got)
        dtype = layout.dtype
        batch, hidden = x.shape[0], state[0].shape[1]
        width = layout.gates * hidden
        # the kernel overwrites work with d_xg, d_hg: a copy when the graph is kept for another backward
        retained = _graph_retained()
        work = ctx.work.clone() if retained else ctx.work
        kept, weights = ctx.kept, ctx.weights
        if not retained:  # the node may outlive this backward: let go of what only it needed
            ctx.kept = ctx.weights = ctx.work = None
        x = _readable(x, dtype, "input")
        state = [_readable(s, dtype, "hx") for s in state]  # contiguous [B, H]: what empty_like copies below
        d_new = [torch.zeros_like(s) if g is None else _readable(g, dtype, "a gradient")
                 for g, s in zip(grads, state, strict=True)]
        d_state = [torch.empty_like(s) for s in state]
        need_dx, need_dw = needs[0], any(needs[1 + n_state:])
        dx = torch.empty_like(x) if need_dx else _empty(dtype)
        # in the kernel's order: d_W_ih, d_W_hh, d_b_ih, d_b_hh, the extras'; each shaped as its parameter (the
        # kernel writes an absent one's too)
        if need_dw:
            w_ih, b_ih, w_hh, b_hh, *extras = kept
            sizes = ((width,), (width,), *((k * hidden,) for k in layout.widths))
            d_weights = [torch.empty_like(w_ih), torch.empty_like(w_hh),
                         *(torch.empty(size, dtype=dtype) if t is None else torch.empty_like(t)
                           for t, size in zip((b_ih, b_hh, *extras), sizes, strict=True))]
        else:
            d_weights = [_empty(dtype)] * (4 + len(layout.widths))
        layout.module.step_backward(_gemm_for(layout, batch, x.shape[1], hidden), batch, x.shape[1], hidden,
                                    x.data_ptr(), *weights,
                                    *[s.data_ptr() for s in state], work.data_ptr(),
                                    *[g.data_ptr() for g in d_new], *[d.data_ptr() for d in d_state], dx.data_ptr(),
                                    *[d.data_ptr() for d in d_weights], need_dx, need_dw)
        d_w_ih, d_w_hh, d_b_ih, d_b_hh, *d_extras = d_weights
        by_index = {layout.w_ih: d_w_ih, layout.b_ih: d_b_ih, layout.w_hh: d_w_hh, layout.b_hh: d_b_hh}
        by_index.update(zip(layout.extras, d_extras, strict=True))
        g_params = [by_index[i] if need else None for i, need in enumerate(needs[1 + n_state:])]
        g_state = [d if need else None for d, need in zip(d_state, needs[1:1 + n_state], strict=True)]
        return (None, None, None, None, dx if need_dx else None, *g_state, *g_params)


_empties: dict[torch.dtype, Tensor] = {}


def _empty(dtype: torch.dtype) -> Tensor:
    """A 0-element tensor: an output the kernel is told not to write."""
    empty = _empties.get(dtype)
    if empty is None:
        empty = _empties[dtype] = torch.empty(0, dtype=dtype)
    return empty


# autograd.Function.apply without its Python wrapper, which binds arguments for the setup_context form and unwraps
# dead torch.func wrappers, neither of which applies here: _Step is ctx-form, and NumbaBackend.step sends calls
# under torch.func transforms to the scan instead.
_apply_step = super(torch.autograd.Function, _Step).apply

__all__ = ["run_step", "step_layout", "StepLayout"]
