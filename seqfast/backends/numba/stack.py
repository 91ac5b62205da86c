"""NumbaBackend.stack_runner: a module's inference calls of one shape with little Python around the kernels.

The general path (the module, FusedBackend.layer, scan.forward) checks and converts every argument anew and makes
a dozen tensors a call, each torch call costing about a microsecond: at T1 B1 H4 that came to ~80 us around ~5 us
of kernels. A runner binds, per input shape, what scan.forward works out from the shape and the weights: each
layer-direction's kernel argument block (team.py.tmpl), written once with the weights' addresses and shapes, the
plan's row ranges and GEMM choice. A call then writes only the addresses that change (input, initial and final
states, output) and makes one compiled call per layer-direction, which for a small product also runs the input
projection; where the plan splits the hidden units over threads (schedule.unit_ranges), the blocks are
forward_units'. Where the rows run as one range, the second thread projects the input while the first scans
(forward_pipelined, schedule.pipelines). Each call compares the parameters' layouts (data pointer, shape,
strides, dtype) and the plan (thread count, GEMM choice) with the bound ones and binds again on any change;
in-place updates show through the addresses. A call of two steps or more that the general path must see first
(its GEMM choice not yet measured; a one-step call keeps the static rule until then) is declined, and so is one
with a non-contiguous parameter (the kernels read it by address), a parameter of another dtype or device (the
general path's checks report it), or one made while another thread runs the same binding (the blocks are its
own). A one-step call may run on the cells' step kernels instead (_one_step), where its first call measured that
way faster (gemm_choice; the scan is the static rule).
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ...registry import CellSpec, Stack
from ..fused import _transforms_active
from . import buffers, gemm, gemm_choice, schedule
from .availability import DTYPES
from .codegen import entry_address, units_supported
from .scan import forward_args, prepare
from .step import inference_step, zero_state
from .step_plan import StepLayout, step_layout
from .views import NO_PRODUCTS, NO_SAVED, layout


def stack_runner(cell: CellSpec, dtype: torch.dtype, stack: Stack):
    """Backend.stack_runner on the numba kernels, for calls without autograd (training keeps the general path)."""
    if (stack.requires_grad or dtype not in DTYPES or any("weight_hr" in names for names in stack.names)
            or schedule.team_addresses() is None):
        return None
    gates = cell.num_gates
    measured = cell.recurrence == "dense" and not cell.pointwise.stages  # scan.forward measures its GEMM choice
    recurrent = cell.recurrent_param_names(proj=False)
    # per layer-direction: where weight_ih, bias_ih and each weight the scan takes sit among its parameters
    positions = [(names.index("weight_ih"), _position(names, "bias_ih"), [_position(names, n) for n in recurrent])
                 for names in stack.names]
    directions = 2 if stack.bidirectional else 1
    bound: dict[tuple[int, ...], _Bound] = {}
    names = stack.names[0]
    one_step = step_layout(cell, dtype, names) if all(n == names for n in stack.names) else None
    # per (input shape, thread count): whether a one-step call runs on the cells' kernels, as measured
    steps_measured: dict[tuple, bool] = {}

    def run(x: Tensor, state0: tuple[Tensor, ...] | None, params: list[list[Tensor]]):
        if _transforms_active():
            return None
        if x.shape[0] == 1 and one_step is not None:
            way = steps_measured.get((x.shape, torch.get_num_threads()))
            if way is None:
                way = measure_one_step(x, state0, params)
            if way:
                return _one_step(one_step, names, cell.num_states, directions, x, state0, params)
        return scan(x, state0, params)

    def measure_one_step(x: Tensor, state0: tuple[Tensor, ...] | None, params: list[list[Tensor]]) -> bool:
        """A one-step call on the cells' kernels or as a scan, by gemm_choice (the scan is the static rule): the
        cells' kernels transpose nothing and take a batch-1 step's products as loops, the scan has less Python
        per layer."""
        threads = torch.get_num_threads()
        key = ("one step", dtype, *x.shape[1:], width_of(params), len(params), threads)
        way = gemm_choice.decided(key)
        if way is None:
            if not gemm_choice.may_measure():
                return False

            def run_way(on_cells: bool):
                if on_cells:
                    return _one_step(one_step, names, cell.num_states, directions, x, state0, params)
                return scan(x, state0, params)

            # each way once first, outside choose's lock: a choice either makes (the input projection's way, a
            # large step's GEMM) is measured there, and then only looked up
            run_way(False)
            run_way(True)
            way = gemm_choice.choose(key, (False, True), run_way)
        if len(steps_measured) >= 16:
            steps_measured.clear()
        steps_measured[(x.shape, threads)] = way
        return way

    def width_of(params: list[list[Tensor]]) -> int:
        return params[0][positions[0][0]].shape[0]

    def scan(x: Tensor, state0: tuple[Tensor, ...] | None, params: list[list[Tensor]]):
        found = bound.get(x.shape)
        if found is not None:
            result = found(x, state0, params)
            if result is not _STALE:
                return result
        steps, batch = x.shape[0], x.shape[1]
        width = width_of(params)
        plan = schedule.plan(DTYPES[dtype], steps, batch, width, width // gates, cell.num_states)
        if not batch or (measured and plan.measure_forward is not None and steps > 1):  # scan.forward measures
            return None
        if len(bound) >= 16:  # shapes vary without bound in some programs
            bound.clear()
        found = bound[x.shape] = _Bound(cell, dtype, plan, positions, directions, x.shape, params)
        result = found(x, state0, params)
        return None if result is _STALE else result

    return run


_STALE = object()  # a binding's answer when the parameters or the plan changed since it was made


class _LayerCall(NamedTuple):
    """A layer-direction's part of a bound call."""

    block: np.ndarray  # its kernel argument block (schedule.bound_block)
    weight_ih: int  # where weight_ih sits among its parameters
    projection_gemm: int  # the GEMM of an input projection run in the scan's own call; 0: input_projection's
    weight_ih_address: int
    rows: int  # the projection's rows (T * B) and inputs
    inputs: int
    pipelined: bool  # the projection runs on a second thread as the scan goes (forward_pipelined)
    reverse: bool
    held: tuple  # what the block points to besides the parameters and the plan: kept alive with it


class _Bound:
    """One input shape's inference calls: every layer-direction's kernel argument block, written once."""

    def __init__(self, cell: CellSpec, dtype: torch.dtype, plan: schedule.Plan, positions, directions: int,
                 shape: tuple[int, ...], params: list[list[Tensor]]) -> None:
        steps, batch, inputs = shape
        hidden, name = plan.hidden, plan.dtype_name
        self.plan, self.dtype, self.directions = plan, dtype, directions
        self.plan_key = (name, steps, batch, hidden * cell.num_gates, hidden, cell.num_states)
        self.layouts = [layout(t) for p in params for t in p]
        self.lock = threading.Lock()
        self.out_shape = (steps, batch, hidden)
        self.final_shape = (len(params), batch, hidden)
        # the outputs come from buffers.like: 64-byte aligned, as threads sharing their rows need
        self.out_like = buffers.stand_in(self.out_shape, dtype)
        self.final_like = buffers.stand_in(self.final_shape, dtype)
        self.state_bytes = batch * hidden * dtype.itemsize
        kernel = "forward_units" if plan.units_forward and units_supported(cell) else "forward"
        # the kernels read every parameter by its address
        self.usable = all(t.dtype == dtype and t.is_cpu and t.is_contiguous() for p in params for t in p)
        if not self.usable:
            return
        gomp = schedule.team_addresses().gomp
        stages = len(cell.pointwise.stages)
        self.layers: list[_LayerCall] = []
        for index, p in enumerate(params):
            ih, bias_ih, weights = positions[index]
            # prepare() reads the shape of `like`; the other arrays are stand-ins of the right shapes, whose
            # addresses each call replaces
            like = torch.empty((steps, batch, hidden * cell.num_gates), dtype=dtype)
            module, _, _, arrays, lens = prepare(cell, None, [None if i is None else p[i] for i in weights],
                                                 None, None if bias_ih is None else p[bias_ih], like=like)
            vectors = torch.empty((stages, 1, batch, hidden), dtype=dtype).numpy() if stages else None
            block = schedule.bound_block(module, kernel, plan, plan.loop_forward, forward_args(
                cell, plan, like.numpy(), arrays, plan.zero_states, [np.empty((batch, hidden), dtype=name)] *
                cell.num_states, lens, index % directions == 1, np.empty(self.out_shape, dtype=name),
                NO_PRODUCTS[name], NO_SAVED[name], False, vectors))
            rows, layer_inputs = steps * batch, inputs if index < directions else hidden * directions
            products = rows * hidden * cell.num_gates * layer_inputs
            pipelined = bool(kernel == "forward" and plan.fn
                             and schedule.pipelines(len(plan.ranges), steps, products, layer_inputs, hidden))
            in_kernel = plan.fn and layer_inputs and (pipelined or products < gemm.SMALL_TORCH_GEMM)
            self.layers.append(_LayerCall(block, ih, plan.fn if in_kernel else 0, p[ih].data_ptr(), rows,
                                          layer_inputs, pipelined, index % directions == 1, (arrays, lens, vectors)))
        self.gomp, self.entry = gomp, entry_address(module, kernel)
        if any(call.pipelined for call in self.layers):
            self.pipe_entry, self.pipelined = entry_address(module, "forward_pipe"), module.forward_pipelined
        self.run_block, self.projected = getattr(module, kernel + "_run"), getattr(module, kernel + "_projected")
        at = f"AT_{kernel.upper()}_"
        self.slot_x, self.slot_out = getattr(module, at + "X"), getattr(module, at + "OUT")
        self.slot_init = [getattr(module, f"{at}INIT{i}") for i in range(cell.num_states)]
        self.slot_final = [getattr(module, f"{at}S{i}") for i in range(cell.num_states)]
        self.zero_states = [z.ctypes.data for z in plan.zero_states]

    def __call__(self, x: Tensor, state0: tuple[Tensor, ...] | None, params: list[list[Tensor]]):
        """(output, final states); _STALE where the parameters or the plan changed since the binding; None for a
        call it declines."""
        if not self._same_layouts(params) or schedule.plan(*self.plan_key) is not self.plan:
            return _STALE
        if not self.usable or x.dtype is not self.dtype or not self.lock.acquire(blocking=False):
            return None
        try:
            return self._run(x if x.is_contiguous() else x.contiguous(), state0, params)
        finally:
            self.lock.release()

    def _same_layouts(self, params: list[list[Tensor]]) -> bool:
        """Whether every parameter has the layout it was bound with. Loops, not comprehensions, here and in _run:
        at small sizes a call's Python is much of its time, and each comprehension is a call of its own."""
        bound, i = self.layouts, 0
        for p in params:
            for t in p:
                if i == len(bound) or layout(t) != bound[i]:
                    return False
                i += 1
        return i == len(bound)

    def _run(self, x: Tensor, state0: tuple[Tensor, ...] | None, params: list[list[Tensor]]):
        if state0 is not None:
            kept, inits = [], []  # kept: the contiguous copies, alive to the kernels' return
            for s in state0:
                if s.dtype is not self.dtype:
                    return None
                s = s if s.is_contiguous() else s.contiguous()
                kept.append(s)
                inits.append(s.data_ptr())
        finals, at_final = [], []
        for _ in self.slot_final:
            f = buffers.like(self.final_like)
            finals.append(f)
            at_final.append(f.data_ptr())
        gomp, entry, size = self.gomp, self.entry, self.state_bytes
        directions = self.directions
        layer_input = x
        outputs = []
        batch = self.out_shape[1]
        for index, (block, ih, fn, w_at, rows, inputs, pipelined, reverse, _) in enumerate(self.layers):
            out = buffers.like(self.out_like)
            block[self.slot_out] = out.data_ptr()
            for s, slot in enumerate(self.slot_final):
                block[slot] = at_final[s] + index * size
            for s, slot in enumerate(self.slot_init):
                block[slot] = self.zero_states[s] if state0 is None else inits[s] + index * size
            if pipelined:
                self.pipelined(gomp, entry, self.pipe_entry, block, fn, layer_input.data_ptr(), w_at, rows, inputs,
                               batch, reverse)
            elif fn:
                self.projected(gomp, entry, block, fn, layer_input.data_ptr(), w_at, rows, inputs)
            else:
                x_proj = gemm.input_projection(layer_input.view(rows, inputs), params[index][ih])
                block[self.slot_x] = x_proj.data_ptr()
                self.run_block(gomp, entry, block)
            outputs.append(out)
            if len(outputs) == directions:
                layer_input = outputs[0] if directions == 1 else torch.cat(outputs, 2)
                outputs = []
        return layer_input, tuple(finals)


def _one_step(kernels: StepLayout, names: tuple[str, ...], num_states: int, directions: int, x: Tensor,
              state0: tuple[Tensor, ...] | None, params: list[list[Tensor]]):
    """A one-step call (x [1, B, I]) run layer-direction by layer-direction on the cells' step kernels (step.py),
    which take a batch-1 step's products as loops and transpose nothing: (output [1, B, D*H], final states
    [L*D, B, H], h's apart from the output's memory as torch.nn's is). None (the general path) for an empty batch
    or input; a parameter of another dtype or device raises, naming it."""
    batch, inputs = x.shape[1], x.shape[2]
    if not batch or not inputs or x.dtype is not kernels.dtype:
        return None
    if state0 is None:
        state = (zero_state(kernels.dtype, batch, params[0][kernels.w_hh].shape[-1]),) * num_states
    if len(params) == 1:  # one layer-direction: the step writes the final states, the output is h's copy
        final = inference_step(kernels, x, state if state0 is None else state0, params[0], names, final=True)
        return final[0].clone(), tuple(final)
    finals: list[list[Tensor]] = [[] for _ in range(num_states)]
    layer_input, outputs = x[0], []
    for index, p in enumerate(params):
        if state0 is not None:
            state = [s[index] for s in state0]
        new = inference_step(kernels, layer_input, state, p, names)
        for store, s in zip(finals, new, strict=True):
            store.append(s)
        outputs.append(new[0])
        if len(outputs) == directions:
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, 1)
            outputs = []
    return layer_input.unsqueeze(0), tuple(torch.stack(store) for store in finals)


def _position(names: tuple[str, ...], name: str) -> int | None:
    return names.index(name) if name in names else None
