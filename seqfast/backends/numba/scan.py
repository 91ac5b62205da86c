"""The host side of the numba scans: kernel arguments in, result tensors out (NumbaBackend.forward / backward).

Kept lean: at small shapes (T100 B1 H32) a whole kernel runs ~30 us, and every torch call here costs ~1 us.
Buffers come from buffers.new: 64-byte aligned where several threads write them, pooled from 64 KiB.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ...registry import CellSpec
from ..fused_contract import ScanInputs
from . import buffers, gemm_choice, schedule
from .availability import DTYPES, numba_missing
from .codegen import dx_is_dhg, kernels, per_unit_width, preactivation_only, units_supported
from .gemm import mm, weight_gradient
from .views import NO_PRODUCTS, NO_SAVED, NO_X, host, state_array

_kernels: dict[tuple[CellSpec, torch.dtype], object] = {}


def kernel_module(cell: CellSpec, dtype: torch.dtype):
    """The cell's generated kernel module for this dtype (compiled or loaded from the disk cache on first use)."""
    module = _kernels.get((cell, dtype))
    if module is not None:
        return module
    if dtype not in DTYPES:
        raise TypeError(f"numba backend: dtype {dtype} not supported (float32, float64)")
    why = numba_missing()
    if why:
        raise RuntimeError(f"numba backend: {why}")
    module = _kernels[(cell, dtype)] = kernels(cell, DTYPES[dtype])
    return module


def saved_shapes(cell: CellSpec, steps: int, batch: int, hidden: int) -> list[tuple[int, ...]]:
    """Every state before each step and, for a dense recurrence, h W_hh^T of each step, both by loop step. The
    backward overwrites the saved products with their gradients in place, so its peak memory is no higher than
    recomputing them would need, and the recurrent GEMM runs once instead of twice."""
    shapes = [(cell.num_states, steps, batch, hidden)]
    if cell.recurrence == "dense":
        shapes.append((steps, batch, cell.num_gates * hidden))
    if cell.pointwise is not None and cell.pointwise.stages:  # each stage's vector: its group's weight gradient
        shapes.append((len(cell.pointwise.stages), steps, batch, hidden))
    return shapes


def prepare(cell: CellSpec, x_proj: Tensor | None, weights: list[Tensor | None], lengths: Tensor | None,
            x_bias: Tensor | None, like: Tensor | None = None):
    """What both scans start from: (kernel module, plan, x_proj as numpy, [x_bias, W_hh, b_hh, *extras] as
    numpy, lengths as numpy). x_proj None (a backward that does not read it): shapes come from `like`."""
    src = like if x_proj is None else x_proj
    module = _kernels.get((cell, src.dtype)) or kernel_module(cell, src.dtype)
    if not src.is_cpu:
        raise ValueError(f"numba backend: tensors must be on the CPU, got {src.device}")
    steps, batch, width = src.shape
    plan = schedule.plan(DTYPES[src.dtype], steps, batch, width, width // cell.num_gates, cell.num_states)
    if len(weights) > 2 + len(cell.pointwise.params):
        raise ValueError("numba backend: proj_size (weight_hr) is not supported")
    for t in (x_bias, *weights):  # the kernels read every array as the input's dtype, as torch.nn's do
        if t is not None and (t.dtype != src.dtype or not t.is_cpu):
            raise ValueError(f"numba backend: every parameter must be {src.dtype} on the CPU like the input, got one "
                             f"of shape {tuple(t.shape)} as {t.dtype} on {t.device}")
    w = weights[0] if weights else None
    if w is None:
        shape = (width, plan.hidden) if cell.recurrence == "dense" else (width,)
        w_np = np.zeros(shape, dtype=plan.dtype_name)
    else:
        w_np = host(w)
    bias = weights[1] if len(weights) > 1 else None
    arrays = [plan.zero_bias if x_bias is None else host(x_bias), w_np,
              plan.zero_bias if bias is None else host(bias)]
    # the kernel takes the per-unit extras in Pointwise.params order; an absent one (a bias-like extra under
    # bias=False) reads as zeros
    if cell.pointwise.params:
        given = dict(zip(cell.recurrent_param_names()[2:], weights[2:], strict=False))
        arrays += [np.zeros(per_unit_width(cell, name) * plan.hidden, dtype=plan.dtype_name)
                   if given.get(name) is None else host(given[name]) for name in cell.pointwise.params]
    if lengths is None:
        lens = plan.full_lengths
    else:
        lens = lengths.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()
    x_np = NO_X[plan.dtype_name] if x_proj is None else x_proj.detach().contiguous().numpy()
    return module, plan, x_np, arrays, lens


def forward(inputs: ScanInputs, need_saved: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """FusedBackend.forward on the numba kernels."""
    cell, x_proj, state0, reverse = inputs.cell, inputs.x_proj, inputs.state0, inputs.reverse
    module, plan, x_np, arrays, lens = prepare(cell, x_proj, inputs.weights, inputs.lengths, inputs.x_bias)
    steps, batch, width = x_np.shape
    dtype = x_proj.dtype
    new = buffers.new
    init = plan.zero_states if state0 is None else [state_array(s, dtype) for s in state0]
    # the scans with their hidden units split over threads: one dense product a step
    units_possible = _units_possible(cell, plan)
    shared = len(plan.ranges) > 1 or units_possible
    # the finals (the kernel copies init in); separate tensors: a custom op's outputs may not share storage
    states = [new((batch, plan.hidden), dtype, shared) for _ in init]
    out = new((steps, batch, plan.hidden), dtype, shared)
    saved = [new(s, dtype, shared) for s in saved_shapes(cell, steps, batch, plan.hidden)] if need_saved else []
    if batch > 0:
        # the per-step products: saved for the backward (dense), else a reused [1, B, G*H] scratch buffer
        # that the kernel allocates per thread
        name = plan.dtype_name
        stages = len(cell.pointwise.stages)

        def args_for(x, lens, out, hg, saved_st, need_saved):
            # the stages' vectors: saved, or one reused step (like hg)
            vectors = (saved[2][1] if saved else new((stages, 1, batch, plan.hidden), dtype, shared)[1]
                       ) if stages else None
            return forward_args(cell, plan, x, arrays, init, [s[1] for s in states], lens, reverse, out, hg,
                                saved_st, need_saved, vectors)

        # the per-step products: saved for the backward (dense), else a reused [1, B, G*H] scratch buffer
        # that the kernel allocates per thread
        args = args_for(x_np, lens, out[1], saved[1][1] if len(saved) > 1 else NO_PRODUCTS[name],
                        saved[0][1] if saved else NO_SAVED[name], need_saved)
        small, units = plan.loop_forward, units_possible and plan.units_forward
        if plan.measure_forward is not None and not stages and cell.recurrence == "dense" and steps > 1:
            # measured (gemm_choice) on inference runs of this call's first steps: they write the call's
            # outputs, which the call itself then writes again
            def timing(k):
                return args_for(x_np[:k], np.minimum(lens, k), out[1][:k], NO_PRODUCTS[name], NO_SAVED[name], False)

            costs = _measured(module, "forward", plan, steps, timing,
                              more=(gemm_choice.UNITS,) if units_possible else ())
            small = costs.choice(steps, (True, False))
            units = units_possible and costs.choice(steps) == gemm_choice.UNITS
        schedule.launch(module, "forward_units" if units else "forward", plan, small, args)
    return out[0], [s[0] for s in states], [s[0] for s in saved]


def forward_args(cell: CellSpec, plan: schedule.Plan, x: np.ndarray, arrays: list[np.ndarray], init, finals,
                 lens: np.ndarray, reverse: bool, out: np.ndarray, hg: np.ndarray, saved_st: np.ndarray,
                 need_saved: bool, stage_vectors: np.ndarray | None) -> tuple:
    """The forward kernel's arguments, in its order: x_proj, prepare()'s arrays, the initial states, the arrays the
    final states go to, lengths, ..., no `ready` count (x_proj is written in full), and for a cell with stages their
    vectors."""
    args = (x, *arrays, *init, *finals, lens, bool(reverse), out, hg, saved_st, bool(need_saved),
            bool(need_saved) and preactivation_only(cell), plan.forward_nn, 0)
    return args if stage_vectors is None else (*args, stage_vectors)


def _units_possible(cell: CellSpec, plan: schedule.Plan) -> bool:
    """Whether a scan of the plan's shape may run as a _units kernel."""
    return len(plan.unit_array) > 1 and units_supported(cell)


def _measured(module, kernel: str, plan: schedule.Plan, steps: int, timing: Callable[[int], tuple],
              sums: tuple = (), more: tuple = ()) -> gemm_choice.StepCosts:
    """The per-step GEMM choice for `kernel` at the plan's shape (gemm_choice: the loop, MKL and the `more` ways),
    timed on timing(k), the arguments of a run of the call's first k steps; the plans are made again with it."""
    key, static = ((plan.measure_forward, plan.loop_forward) if kernel == "forward"
                   else (plan.measure_backward, plan.loop_backward))
    longest = gemm_choice.timing_steps(steps, plan.full_lengths.shape[0], plan.zero_bias.shape[0], plan.hidden)
    args_of: dict[int, tuple] = {}  # a timing run's arguments, by its step count

    def run(way: object, count: int) -> None:
        if count not in args_of:
            args_of[count] = timing(count)
        if way == gemm_choice.UNITS:
            schedule.launch(module, kernel + "_units", plan, True, args_of[count], sums)
        else:
            schedule.launch(module, kernel, plan, way, args_of[count], sums)

    costs = gemm_choice.choose_for_steps(key, static, run, longest, more)
    schedule.clear_plans()
    return costs


def backward(inputs: ScanInputs, saved: list[Tensor], grad_outputs: Tensor | None, grad_final: list[Tensor | None],
             consume_saved: bool, consume_x_proj: bool) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
    """FusedBackend.backward on the numba kernels. consume_saved: the saved products may be written over;
    consume_x_proj: d_x_proj may be written over x_proj (layer()'s own projection, read for the last time)."""
    cell, x_proj, weights, reverse, x_bias = inputs.cell, inputs.x_proj, inputs.weights, inputs.reverse, inputs.x_bias
    if cell.pointwise is None or cell.pointwise.backward is None:
        raise RuntimeError(f"numba backend: cell {cell.name!r} has no pointwise backward")
    preact = preactivation_only(cell)  # the forward saved whole pre-activations: x_proj is not read
    module, plan, x_np, (x_bias_np, w, bias, *extras), lens = prepare(
        cell, None if preact else x_proj, weights, inputs.lengths, x_bias, like=saved[1] if preact else None)
    dtype, hidden, dtype_name = saved[0].dtype, plan.hidden, plan.dtype_name
    steps, batch, width = saved[1].shape if preact else x_np.shape
    saved_st = saved[0].detach().contiguous()
    # hgd: the recurrent products of every step, without bias, or with preact the whole pre-activations (the
    # kernel overwrites them with d_hg). Dense: the forward's own, copied when they must stay unchanged;
    # elementwise otherwise
    if cell.recurrence == "dense":
        hgd = saved[1] if consume_saved else buffers.empty(saved[1].shape, dtype).copy_(saved[1])
    elif cell.recurrence == "diagonal":
        h_prev = saved_st[0].view(steps * batch, hidden)
        hgd = (h_prev.repeat(1, cell.num_gates) * torch.from_numpy(w)).view(steps, batch, width)
    else:
        hgd = torch.zeros((steps, batch, width), dtype=dtype)
    grad_out = (np.zeros((steps, batch, hidden), dtype=dtype_name) if grad_outputs is None
                else grad_outputs.detach().contiguous().numpy())
    d_final = [plan.zero_states[0] if g is None else state_array(g, dtype) for g in grad_final]
    units_possible = _units_possible(cell, plan)
    # threads (row or unit ranges) that may write the results; the accumulators take a row each
    count = max(len(plan.ranges), len(plan.unit_array) if units_possible else 0)
    d_states = [buffers.new((batch, hidden), dtype, count > 1) for _ in d_final]  # the kernel copies d_final in
    # where d_x equals d_hg and both are in time order, the kernel writes d_hg only and d_x is that buffer
    write_dx = reverse or not dx_is_dhg(cell)
    hgd_np = hgd.numpy()
    if not write_dx:
        dx = (hgd, hgd_np)
    elif consume_x_proj and x_proj is not None and x_np.ctypes.data == x_proj.data_ptr():
        # over x_proj itself: a row's chunk of d_x is written after that chunk of x is read, and never read
        # again (GRU at T50 B64 H512: 20 MB less at the training peak)
        dx = (x_proj, x_np)
    else:
        dx = buffers.new((steps, batch, width), dtype, count > 1)
    # sums over rows and steps (the bias gradients, of b_hh and of x_bias, and the per-unit parameter ones):
    # one accumulator per thread, added afterwards; the bias ones in float64, since they sum T*B terms
    sums = [np.zeros((count, width)), np.zeros((count, width)),
            *(np.zeros((count, e.shape[0]), dtype=dtype_name) for e in extras)]
    if batch > 0:
        def args_for(x, saved_st, lens, grad_out, dx, hgd):  # the kernel's arguments, in its order
            return (x, x_bias_np, w, bias, *extras, saved_st, lens, bool(reverse), grad_out, *d_final,
                    *(d[1] for d in d_states), dx, write_dx, hgd, preact)

        saved_np = saved_st.numpy()
        args = args_for(x_np, saved_np, lens, grad_out, dx[1], hgd_np)
        small, units = plan.loop_backward, units_possible and plan.units_backward
        if (plan.measure_backward is not None and not cell.pointwise.stages and cell.recurrence == "dense"
                and steps > 1):
            # measured (gemm_choice) on runs over this call's first steps that read copies of what the kernel
            # overwrites and write scratch buffers: the call's own inputs stay as they are
            def timing(k):
                hgd_k = hgd_np[:k].copy()  # d_hg is written over it
                return args_for(x_np if preact else x_np[:k], np.ascontiguousarray(saved_np[:, :k]),
                                np.minimum(lens, k), grad_out[:k],
                                np.empty_like(hgd_k) if write_dx else hgd_k, hgd_k)  # d_x_proj: [k, B, G*H]

            costs = _measured(module, "backward", plan, steps, timing, tuple(np.zeros_like(part) for part in sums),
                              more=(gemm_choice.UNITS,) if units_possible else ())
            small = costs.choice(steps, (True, False))
            units = units_possible and costs.choice(steps) == gemm_choice.UNITS
        schedule.launch(module, "backward_units" if units else "backward", plan, small, args, tuple(sums))
    d_bias, d_x_bias, *d_extras = (part[0] if count == 1 else part.sum(0) for part in sums)
    grads: list[Tensor | None] = [None] * len(weights)
    if weights and weights[0] is not None:
        # the recurrent-weight gradient: one GEMM over every step (padding rows of d_hg are zero)
        flat_dhg = hgd.view(steps * batch, width)  # now d_hg
        h_prev = saved_st.select(0, 0).view(steps * batch, hidden)
        if cell.pointwise.stages:  # each group of rows: its d_hg columns times what its product took
            inputs = [h_prev, *saved[2].detach().view(-1, steps * batch, hidden)]
            grads[0] = torch.cat([mm(flat_dhg[:, first * hidden:end * hidden].t(), v) for (first, end), v
                                  in zip(cell.pointwise.gate_groups(cell.num_gates), inputs, strict=True)])
        elif cell.recurrence == "dense":
            grads[0] = weight_gradient(flat_dhg, h_prev)
        else:  # diagonal: d w[g*H + j] = sum over steps of d_hg[., g*H + j] * h_prev[., j]
            grads[0] = (flat_dhg.view(-1, cell.num_gates, hidden) * h_prev.unsqueeze(1)).sum(0).view(width)
    if len(weights) > 1 and weights[1] is not None:
        grads[1] = torch.from_numpy(d_bias.astype(dtype_name))
    if extras:
        d_by_name = dict(zip(cell.pointwise.params, d_extras, strict=True))
        for i, name in enumerate(cell.recurrent_param_names()[2:len(weights)]):
            p = weights[i + 2]
            grads[i + 2] = None if p is None else torch.from_numpy(d_by_name[name]).view(p.shape)
    if x_bias is not None:  # its gradient comes last (see FusedBackend.backward)
        grads.append(torch.from_numpy((d_x_bias if write_dx else d_bias).astype(dtype_name)))
    return dx[0], [d[0] for d in d_states], grads
