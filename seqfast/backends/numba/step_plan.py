"""What a cell's one-step kernels (step.py) work out once: per (cell, dtype, parameter names) where each parameter
goes among the kernels' arguments (StepLayout), per shape what follows from the sizes (ShapePlan): the weights'
slots, the GEMM of a batch's products, the team of the forward's, the last two measured on a shape's first call
where timing is allowed (gemm_choice)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ...registry import CellSpec
from . import buffers, gemm, gemm_choice, schedule
from ._blas import gemm_address, threaded_gemm_address
from .codegen import entry_address, kernels, per_unit_width, step_supported


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
    shapes: dict  # (batch, input size, hidden size) -> ShapePlan


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


class ShapePlan(NamedTuple):
    """What a step of one (batch, input size, hidden size) works out from its sizes, kept in StepLayout.shapes."""

    slots: tuple[tuple[int, int], ...]  # (index into params or -1 where absent, elements) for w_ih, b_ih, w_hh, b_hh
    # and the extras, in the kernels' order
    grad_slots: tuple[tuple[int, int], ...]  # those of the weight gradients, in the backward kernel's order: w_ih,
    # w_hh, b_ih, b_hh, the extras
    gemm_fn: int | None  # the GEMM for the step's products: the layout's own for small ones, MKL's threaded ?gemm_
    # from gemm.SMALL_TORCH_GEMM multiply-adds (the threshold torch's own small GEMMs keep to one thread below), or
    # None: to be measured on the shape's first call (measured_gemm). A one-row step's products are loops
    # (_rows.py), whatever this says.
    work: tuple[Tensor, int]  # the work buffer's buffers.stand_in: a training step's comes from buffers.like
    final: Tensor  # a [1, B, H] stand-in: a module's final state, from empty_like (a third cheaper than empty)
    team: int | None  # the forward's products: 0 on the calling thread (or the GEMM's threads), or split over
    # threads (the address _rows.pair_nt reads), or None: to be measured on the next call (step_team)
    threads: int  # the thread count a team was chosen for


def shape_plan(layout: StepLayout, batch: int, inputs: int, hidden: int) -> ShapePlan:
    """Work out and keep layout.shapes' entry for these sizes; a call looks the entry up first, inline."""
    width = layout.gates * hidden
    sizes = (width * inputs, width, width * hidden, width, *(k * hidden for k in layout.widths))
    order = (layout.w_ih, layout.b_ih, layout.w_hh, layout.b_hh, *layout.extras)
    slots = tuple(zip(order, sizes, strict=True))
    small = batch * max(inputs, hidden) * width < gemm.SMALL_TORCH_GEMM
    if batch == 1 or small or layout.fn == layout.threaded_fn:  # nothing to measure
        fn = layout.fn
    else:  # MKL's own kernel or its threaded ?gemm_: measured, where timing is allowed
        fn = gemm_choice.decided(_gemm_key(layout, batch, inputs, hidden))
        fn = fn or (None if gemm_choice.may_measure() else layout.threaded_fn)
    # a team for the forward's products, measured on the shape's first call, where they may be worth one
    team = None if batch * width * (inputs + hidden) >= MIN_TEAM_PRODUCTS else 0
    if len(layout.shapes) >= 64:
        layout.shapes.clear()
    plan = layout.shapes[(batch, inputs, hidden)] = ShapePlan(
        slots, tuple(slots[j] for j in (0, 2, 1, 3, *range(4, len(slots)))), fn,
        buffers.stand_in((2, batch, width), layout.dtype), buffers.stand_in((1, batch, hidden), layout.dtype)[0],
        team, 0)
    return plan


# multiply-adds of a step's forward products from which splitting them over threads is timed: starting a team
# costs microseconds, below this about what the products take
MIN_TEAM_PRODUCTS = 1 << 16
_teams: dict[tuple[int, int, int], np.ndarray] = {}  # (kernel module, parts, threads) -> what pair_nt reads


def team_array(layout: StepLayout, parts: int, threads: int) -> np.ndarray:
    """The int64 array _rows.pair_nt reads for a team of `threads` splitting the products in `parts` (the same
    but in tests), each part of a batch above one row on the layout's single-threaded GEMM, kept for the
    process."""
    key = (id(layout.module), parts, threads)
    found = _teams.get(key)
    if found is None:
        team, module = schedule.team_addresses(), layout.module
        backward = entry_address(module, "step_rows_backward") if hasattr(module, "step_rows_backward_entry") else 0
        found = _teams[key] = np.array([team.gomp, team.thread_num, entry_address(module, "step_rows"), backward,
                                        layout.fn, parts, threads], dtype=np.int64)
    return found


def step_team(layout: StepLayout, plan: ShapePlan, sizes: tuple[int, int, int], args: list) -> int:
    """The team of a step's forward products, for the thread count now: measured on the shape's first call (both
    ways run it on its own data, writing only its new states and work buffer, which the call then writes again),
    after its GEMM, where the threads and the team exist and timing is allowed; else 0 (the calling thread, or
    the GEMM's own threads). Kept with the plan."""
    threads = min(schedule.num_threads(), schedule.usable_cores())
    team = 0
    if threads >= 2 and schedule.team_addresses() is not None:
        key = ("step team", layout.dtype, *sizes, layout.gates, threads)
        team = gemm_choice.decided(key)
        if team is None and gemm_choice.may_measure():
            address = team_array(layout, threads, threads).ctypes.data
            team = gemm_choice.choose(key, (0, address), lambda way: layout.module.step_forward(
                plan.gemm_fn, way, *args))
    team = team or 0
    layout.shapes[sizes] = plan._replace(team=team, threads=schedule.num_threads())
    return team


def _gemm_key(layout: StepLayout, batch: int, inputs: int, hidden: int) -> tuple:
    return ("step", layout.dtype, batch, inputs, hidden, layout.gates, torch.get_num_threads())


def measured_gemm(layout: StepLayout, plan: ShapePlan, sizes: tuple[int, int, int], args: tuple) -> int:
    """The GEMM of a large step on a CPU where MKL's own kernel is not its threaded ?gemm_ (a non-Intel CPU, where
    ?gemm_ takes a generic path): both run the shape's first call, on its own data (they write only its new states
    and work buffer, which the call then writes again), and the faster is kept with the shape's plan. On a 2-core
    Zen 5 EPYC the kernel on one thread ran LSTM/GRU/RNN cell steps from B97 H51 to B32 H512 1.06-1.9x faster in
    float32; in float64 up to B64 H256, not at LSTM B32 H512 (0.84x)."""
    fn = gemm_choice.choose(_gemm_key(layout, *sizes), (layout.threaded_fn, layout.fn),
                            lambda way: layout.module.step_forward(way, 0, *args))
    layout.shapes[sizes] = plan._replace(gemm_fn=fn)
    return fn


__all__ = ["MIN_TEAM_PRODUCTS", "ShapePlan", "StepLayout", "measured_gemm", "step_team", "shape_plan",
           "step_layout", "team_array"]
