"""NumbaBackend.step: one step of a cell (RecurrentCell) as one compiled call each way.

The kernels are codegen.py's step_forward / step_backward, generated from the cell's pointwise code with the scans:
both projections (x W_ih^T, h W_hh^T) and the pointwise math in one call; in training the backward (pointwise
derivative, d_x, d_h and every parameter's gradient) is one call too, behind one autograd.Function.
The kernels read every tensor by its address, taken on each call (nothing about a weight is cached), so in-place
updates, `.data` assignments and `to()` show through. Under torch.func transforms, torch.compile, or for a cell without
one-step kernels, the backend's default step (its scan with T=1) runs instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._memo import any_requires_grad as _any_requires_grad
from ...registry import CellSpec
from ..fused import _grads_by_recomputing, _graph_retained, _transforms_active
from ..reference import TorchBackend
from . import buffers, schedule
from .step_plan import StepLayout, measured_gemm, shape_plan, step_layout, step_team

_REFERENCE = TorchBackend()


_zeros: dict[tuple[torch.dtype, int], Tensor] = {}


def _zeros_address(dtype: torch.dtype, n: int) -> int:
    """The address of n zeros (read only: an absent bias or extra), kept for the process."""
    zeros = _zeros.get((dtype, n))
    if zeros is None:
        zeros = _zeros[(dtype, n)] = torch.zeros(n, dtype=dtype)
    return zeros.data_ptr()


_zero_states: dict[tuple[torch.dtype, int, int], Tensor] = {}


def zero_state(dtype: torch.dtype, batch: int, hidden: int) -> Tensor:
    """A [batch, hidden] state of zeros, kept for the process: only for kernels that read it (a module's call
    without hx), never handed to the caller. Made outside inference mode, so a training step can save it."""
    zeros = _zero_states.get((dtype, batch, hidden))
    if zeros is None:
        if len(_zero_states) >= 64:
            _zero_states.clear()
        with torch.inference_mode(False):
            zeros = _zero_states[(dtype, batch, hidden)] = torch.zeros(batch, hidden, dtype=dtype)
    return zeros


def _readable(t: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    """t itself when the kernels can read it by address (C-contiguous, on the CPU, of the step's dtype), else a
    contiguous copy; a tensor of another dtype or device raises, as torch.nn's kernels do."""
    if t.dtype is dtype and t.is_cpu and t.is_contiguous():
        return t
    if t.dtype != dtype or not t.is_cpu:
        raise RuntimeError(f"numba backend: {what} is {t.dtype} on {t.device}, expected {dtype} on cpu like the input")
    return t if t.is_contiguous() else t.contiguous()


def step_runner(layout: StepLayout | None, cell: CellSpec, names: tuple[str, ...], scan_step):
    """The cell's step as a function of (x [B, I], state, params) -> the new states, for NumbaBackend.step_runner:
    one kernel call each way, or scan_step(cell, x, state, params, names) (the scan with T=1) where the kernels do
    not apply (layout None, an empty batch or input, torch.func transforms, torch.compile). Differentiable
    (through _Step) when grad mode is on and any input requires grad."""
    backward = cell.pointwise.backward is not None

    def run(x: Tensor, state: tuple[Tensor, ...], params) -> tuple[Tensor, ...]:
        if layout is None or not x.shape[0] or not x.shape[1] or _transforms_active() or torch.compiler.is_compiling():
            return scan_step(cell, x, state, params, names)
        if torch.is_grad_enabled() and (x.requires_grad or _any_requires_grad(state) or _any_requires_grad(params)):
            if not backward:
                raise RuntimeError(f"numba backend: cell {cell.name!r} has no pointwise backward")
            return _apply_step((layout, cell, names, len(state)), x, *state, *params)
        return tuple(_forward(layout, x, state, params, names, False)[0])

    return run


def inference_step(layout: StepLayout, x: Tensor, state, params, names, final: bool = False) -> list[Tensor]:
    """One step's new states without autograd, for a caller that checked grad mode, transforms and the sizes
    itself (stack.py's one-step module calls). final: x is a module's [1, B, I], the states may be [1, B, H], and
    the new states are its final states, [1, B, H] each."""
    return _forward(layout, x, state, params, names, False, final)[0]


def one_step_inputs(cell: CellSpec, x: Tensor, weight_ih: Tensor, bias_ih: Tensor | None,
                    state0: tuple[Tensor, ...] | None, weights) -> tuple[tuple[str, ...], tuple, list] | None:
    """For FusedBackend.layer at x [1, B, I] (a one-step call of a module): (names, state, params) that the
    backend's step runner takes, to run the layer as one step node each way instead of the scan's; None where the
    step kernels do not apply. At T = 1 lengths are all 1 and the direction does not matter."""
    names, params = ["weight_ih"], [weight_ih]
    if bias_ih is not None:
        names.append("bias_ih")
        params.append(bias_ih)
    for name, w in weights.items():
        if w is not None:
            names.append(name)
            params.append(w)
    names = tuple(names)
    layout = step_layout(cell, x.dtype, names)
    if layout is None or cell.pointwise.backward is None:
        return None
    if state0 is None:
        state0 = (zero_state(x.dtype, x.shape[1], params[layout.w_hh].shape[-1]),) * cell.num_states
    return names, state0, params


# A weight gradient from this size comes from the buffer pool: glibc returns freed buffers this large to the system,
# and a fresh one page-faults in again every step; below it (1 MiB: LSTMCell at H256) the pool's bookkeeping cost
# more than the faults it saved
POOLED_GRADIENT_BYTES = 1 << 21

_WEIGHTS_AT = 4  # step_forward's arguments: B, I, H, x, then the weights in slot order


def _forward(layout: StepLayout, x: Tensor, state, params, names, training: bool, final: bool = False):
    """One call of the forward kernel -> (new states, work, the weights as read (absent ones left out), the kernel's
    arguments: the weights' addresses, zeros' where absent, from args[_WEIGHTS_AT], one per slot). work: with
    training, [2, B, G*H] x W_ih^T and h W_hh^T, what the backward reads; else None, and the kernel allocates its
    own. final: as inference_step's.
    Loops, not comprehensions: at small sizes this Python is most of a step's time, and each comprehension is a
    call of its own."""
    dtype = layout.dtype
    batch, inputs = x.shape[-2], x.shape[-1]
    hidden = state[0].shape[-1]
    plan = layout.shapes.get((batch, inputs, hidden)) or shape_plan(layout, batch, inputs, hidden)
    if x.dtype is not dtype or not x.is_cpu or not x.is_contiguous():
        x = _readable(x, dtype, "input")
    args = [batch, inputs, hidden, x.data_ptr()]
    kept = []
    for i, n in plan.slots:  # each weight's size is checked: the kernels read them by address
        if i < 0:
            args.append(_zeros_address(dtype, n))
            continue
        t = params[i]
        if t.dtype is not dtype or not t.is_cpu or not t.is_contiguous():
            t = _readable(t, dtype, names[i])
        if t.numel() != n:
            raise RuntimeError(f"numba backend: {names[i]} has shape {tuple(t.shape)}, expected {n} elements "
                               f"for input size {inputs} and hidden size {hidden}")
        kept.append(t)
        args.append(t.data_ptr())
    new, copies = [], []  # copies: a non-contiguous state's, alive to the kernel's return
    for s in state:
        if s.dtype is not dtype or not s.is_cpu or not s.is_contiguous():
            s = _readable(s, dtype, "hx")
            copies.append(s)
        args.append(s.data_ptr())
        new.append(torch.empty_like(plan.final if final else s))  # contiguous [B, H] (final: [1, B, H])
    for n in new:
        args.append(n.data_ptr())
    work = buffers.like(plan.work) if training else None
    args.append(work.data_ptr() if training else 0)
    gemm_fn, team = plan.gemm_fn, plan.team
    if gemm_fn is None:
        gemm_fn = measured_gemm(layout, plan, (batch, inputs, hidden), args)
    if team is None or (team and plan.threads != schedule.num_threads()):  # a forked child's is 1
        team = step_team(layout, plan._replace(gemm_fn=gemm_fn), (batch, inputs, hidden), args)
    layout.module.step_forward(gemm_fn, team, *args)
    return new, work, kept, args


class _Step(torch.autograd.Function):
    """One step, forward and backward each one kernel call. A backward that must itself be differentiable
    (create_graph=True) recomputes the step on the torch reference and differentiates that."""

    @staticmethod
    def forward(ctx, spec, x, *tensors):
        layout, cell, names, n_state = spec  # one argument: each further non-tensor one costs apply time
        new, work, kept, args = _forward(layout, x, tensors[:n_state], tensors[n_state:], names, True)
        ctx.layout, ctx.cell, ctx.names, ctx.n_state, ctx.work = layout, cell, names, n_state, work
        # the backward reads the weights the forward read, by the same addresses: their storages keep that memory
        # even where a weight's .data is replaced in between (torch.nn's backward, too, reads the forward's
        # weights); an in-place change raises through the version check of the tensors saved below
        ctx.kept = [t.untyped_storage() for t in kept]
        ctx.weights = args[_WEIGHTS_AT:_WEIGHTS_AT + 4 + len(layout.extras)]  # w_ih, b_ih, w_hh, b_hh, the extras
        ctx.save_for_backward(x, *tensors)
        return tuple(new)

    @staticmethod
    def backward(ctx, *grads):
        layout, n_state = ctx.layout, ctx.n_state
        x, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled() or _transforms_active():
            names = ctx.names

            def step(x, *t):
                return _REFERENCE.step(ctx.cell, x, tuple(t[:n_state]), t[n_state:], names)

            got = _grads_by_recomputing(step, [x, *tensors], needs[1:], list(grads))
            return (None, *got)
        # the kernel overwrites work with d_xg, d_hg: a copy when the graph is kept for another backward
        work, weights, kept = ctx.work, ctx.weights, ctx.kept  # kept: what `weights` point into, held to the end
        if _graph_retained():
            work = work.clone()
        else:  # the node may outlive this backward: let go of what only it needed
            ctx.kept = ctx.weights = ctx.work = None
        dtype = layout.dtype
        batch, inputs = x.shape
        hidden = tensors[0].shape[1]
        plan = layout.shapes.get((batch, inputs, hidden)) or shape_plan(layout, batch, inputs, hidden)
        # the saved tensors are those the forward took, which it checked (dtype, device): only their layout may
        # need a copy; the gradients come in the outputs' dtype and device. Loops, as in _forward.
        x = x if x.is_contiguous() else x.contiguous()
        # the forward measured the GEMM and the team, which the backward's products take too (a plan made again
        # since, 64 shapes later, has the static rules' until its next forward)
        team = plan.team
        if team and plan.threads != schedule.num_threads():
            team = 0
        args = [plan.gemm_fn or layout.threaded_fn, team or 0, batch, inputs, hidden, x.data_ptr(), *weights]
        state = []
        for s in tensors[:n_state]:
            s = s if s.is_contiguous() else s.contiguous()
            state.append(s)
            args.append(s.data_ptr())
        args.append(work.data_ptr())
        d_new = []  # held to the call
        for g, s in zip(grads, state, strict=True):
            if g is None:
                g = torch.zeros_like(s)
            elif not g.is_contiguous() or g.dtype is not dtype:
                g = _readable(g, dtype, "a gradient")
            d_new.append(g)
            args.append(g.data_ptr())
        d_state = []
        for s in state:
            d = torch.empty_like(s)  # contiguous [B, H], as the state now is
            d_state.append(d)
            args.append(d.data_ptr())
        need_dx = needs[1]
        first_param = 2 + n_state
        need_dw = any(needs[first_param:])
        dx = torch.empty_like(x) if need_dx else _empty(dtype)
        args.append(dx.data_ptr())
        params = tensors[n_state:]
        # in the kernel's order: d_W_ih, d_W_hh, d_b_ih, d_b_hh, the extras'; each shaped as its parameter,
        # C-contiguous (the kernel writes an absent one's too)
        grad_slots = plan.grad_slots
        d_weights = []
        for i, n in grad_slots:
            if not need_dw:
                d = _empty(dtype)
            elif n * dtype.itemsize >= POOLED_GRADIENT_BYTES:
                d = buffers.empty(params[i].shape if i >= 0 else (n,), dtype)
            elif i >= 0 and params[i].is_contiguous():
                d = torch.empty_like(params[i])
            else:
                d = torch.empty(params[i].shape if i >= 0 else n, dtype=dtype)
            d_weights.append(d)
            args.append(d.data_ptr())
        layout.module.step_backward(*args, need_dx, need_dw)
        del kept
        g_params: list[Tensor | None] = [None] * len(params)
        if need_dw:
            for (i, _), d in zip(grad_slots, d_weights, strict=True):
                if i >= 0 and needs[first_param + i]:
                    g_params[i] = d
        for j in range(n_state):
            if not needs[2 + j]:
                d_state[j] = None
        return (None, dx if need_dx else None, *d_state, *g_params)


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

__all__ = ["inference_step", "one_step_inputs", "step_runner", "zero_state"]
