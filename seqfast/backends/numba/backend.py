"""NumbaBackend: what the numba backend supports, declared, and short calls into its kernels (see __init__.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from ...registry import CellSpec, Query, Stack
from ..fused import FusedBackend, _transforms_active
from ..fused_contract import Ownership, ScanInputs
from . import gemm, scan, schedule
from .availability import DTYPES, numba_missing
from .codegen import CodegenError, check_cell, preactivation_only, step_supported, units_supported

_CONSUME = Ownership.CONSUME  # a module constant: an Enum attribute costs ~60 ns a read
# NumbaBackend.step_runner by (cell, dtype, names), for direct calls of step
_step_runners: dict[tuple, object] = {}


def _may_split_units(query: Query) -> bool:
    """Whether the scans of the query's shape may run as forward_units / backward_units (their per-step GEMM
    choice times them)."""
    if not units_supported(query.cell) or query.batch_size is None:
        return False
    return bool(schedule.unit_ranges(query.batch_size, query.hidden_size))


def _may_pipeline(query: Query) -> bool:
    """Whether an inference call of the query's shape may run forward_pipelined (the stack runner's choice, for a
    layer taking the input, or a deeper one taking one or both directions' outputs)."""
    steps, batch, hidden, gates = query.seq_len, query.batch_size, query.hidden_size, query.cell.num_gates
    if query.requires_grad or query.level != "module" or not (steps and batch and query.input_size):
        return False
    ranges = len(schedule.row_ranges(batch, steps * gates * hidden * hidden))
    return any(schedule.pipelines(ranges, steps, steps * batch * inputs * gates * hidden, inputs, hidden)
               for inputs in (query.input_size, hidden, 2 * hidden))


class NumbaBackend(FusedBackend):
    name = "numba"
    description = "fused CPU scans compiled with numba (MKL GEMM per step, vectorized gate math)"
    devices = frozenset({"cpu"})
    dtypes = frozenset(DTYPES)
    supports_proj = False  # LSTM proj_size: h would need a second GEMM per step; declined, use torch or native
    priority = 5
    forward_accepts_zero_state = True
    fuses_input_bias = True

    # --- support ---------------------------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        return numba_missing()

    def details(self) -> list[str]:
        from .gemm import gemm_name

        return [f"per-step GEMM: float32 {gemm_name('float32')}, float64 {gemm_name('float64')}"]

    def extra_reasons(self, query: Query) -> list[str]:
        return self.pointwise_reasons(query.cell)

    def pointwise_reasons(self, cell: CellSpec) -> list[str]:
        if cell.pointwise is None:
            return []  # already reported by needs_pointwise
        try:
            check_cell(cell)
        except CodegenError as exc:
            return [f"cannot compile the cell's pointwise code: {exc}"]
        return []

    def auto_rank(self, query: Query) -> float:
        if query.level == "step":
            from .tuning import step_rank

            return step_rank(query, native_priority=10.0, own_priority=float(self.priority))
        from .tuning import auto_rank

        return auto_rank(query, native_priority=10.0, own_priority=float(self.priority))

    def needs_compile(self, query: Query) -> bool:
        from .codegen import is_compiled

        kernel_names = ("forward", "backward") if query.requires_grad else ("forward",)
        if query.level == "step" and step_supported(query.cell):  # the cells run the one-step kernels
            kernel_names = tuple(f"step_{k}" for k in kernel_names)
        elif _may_split_units(query):  # timed as a way of the scans
            kernel_names = tuple(k for name in kernel_names for k in (name, name + "_units"))
        if _may_pipeline(query):
            kernel_names += ("forward_pipe",)
        return not is_compiled(query.cell, DTYPES[query.dtype], kernel_names)

    # --- one step (the cells) ----------------------------------------------------------------------------------
    def step(self, cell: CellSpec, x: Tensor, state: tuple[Tensor, ...], params, names) -> tuple[Tensor, ...]:
        key = (cell, x.dtype, tuple(names))
        run = _step_runners.get(key)
        if run is None:
            if len(_step_runners) > 256:
                _step_runners.clear()
            run = _step_runners[key] = self.step_runner(cell, x.dtype, names)
        return run(x, state, params)

    def step_runner(self, cell: CellSpec, dtype: torch.dtype, names):
        # one kernel call each way (step.py); the scan with T=1 where those kernels do not apply
        from .step import step_runner
        from .step_plan import step_layout

        names = tuple(names)
        return step_runner(step_layout(cell, dtype, names), cell, names, super().step)

    def layer(self, cell: CellSpec, x: Tensor, weight_ih: Tensor, bias_ih: Tensor | None,
              state0: tuple[Tensor, ...] | None, weights, lengths: Tensor | None, reverse: bool):
        # a one-step layer with autograd (a decoder trained step by step): the cells' step kernels, one node each
        # way, rather than the scan's setup around a single step
        if (x.shape[0] == 1 and x.shape[1] and x.shape[2] and torch.is_grad_enabled() and not _transforms_active()
                and not torch.compiler.is_compiling()):
            from .step import one_step_inputs

            found = one_step_inputs(cell, x, weight_ih, bias_ih, state0, weights)
            if found is not None:  # the step runner then runs its kernels: none of its fallbacks applies
                names, state, params = found
                new = self.step(cell, x[0], state, params, names)
                return torch.stack(new[:1]), tuple(new)  # the output apart from h's memory, as the scan's is
        return super().layer(cell, x, weight_ih, bias_ih, state0, weights, lengths, reverse)

    # --- a module's inference calls (stack.py) -------------------------------------------------------------------
    def stack_runner(self, cell: CellSpec, dtype: torch.dtype, stack: Stack):
        from .stack import stack_runner

        return stack_runner(cell, dtype, stack)

    # --- the fused scan (scan.py) ------------------------------------------------------------------------------
    def saved_shapes(self, cell: CellSpec, steps: int, batch: int, hidden: int) -> list[tuple[int, ...]]:
        return scan.saved_shapes(cell, steps, batch, hidden)

    def backward_reads_x_proj(self, cell: CellSpec) -> bool:
        return not preactivation_only(cell)

    def project(self, x: Tensor, weight_ih: Tensor) -> Tensor:
        return gemm.input_projection(x, weight_ih)

    def project_backward(self, grad: Tensor, x: Tensor, weight_ih: Tensor, need_x: bool, need_weight: bool
                         ) -> tuple[Tensor | None, Tensor | None]:
        return ((gemm.mm(grad, weight_ih) if need_x else None),
                (gemm.weight_gradient(grad, x) if need_weight else None))

    # every capability of FusedBackend's contract is implemented: zero states, x_bias, x_proj=None (preactivation
    # cells), and both ownership modes
    def forward(self, inputs: ScanInputs, need_saved: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        return scan.forward(inputs, need_saved)

    def backward(self, inputs: ScanInputs, outputs: Tensor, saved: list[Tensor], grad_outputs: Tensor | None,
                 grad_final: list[Tensor | None], saved_mode: Ownership = Ownership.KEEP,
                 x_proj_mode: Ownership = Ownership.KEEP) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
        return scan.backward(inputs, saved, grad_outputs, grad_final, saved_mode == _CONSUME, x_proj_mode == _CONSUME)
