"""The static rule for where `auto` prefers numba over torch.nn's native kernels on CPU, used where `auto` does not
time the candidates (calibration off, a shape not yet calibrated that cannot be now: under torch.compile, or with
kernels that would first have to be compiled; see seqfast/calibration.py).

It holds only what does not depend on the CPU: torch.nn has no fused CPU training kernel for GRU and RNN (autograd
over per-step ops) and no kernel at all for plugin cells, so numba's fused scans take those. torch.nn's LSTM runs
on oneDNN, and which of the two is faster depends on the shape and on the CPU, so the static rule keeps `native`
there; calibration measures it. A one-step training call of a one-gate cell (RNN) is no per-step loop either:
torch.nn's step is two products and one pointwise op, with nothing for fusion to save.
"""

from __future__ import annotations

from ...registry import Query

# torch.nn modes whose CPU kernel is fused (oneDNN); numba is ranked below them unless calibration says otherwise
FUSED_NATIVE_MODES = frozenset({"LSTM"})


def prefer_numba(query: Query) -> bool:
    """True where numba runs fused math that torch.nn runs as separate per-step ops."""
    if query.device != "cpu" or query.proj_size:
        return False
    if query.seq_len == 1 and query.requires_grad and query.cell.num_gates == 1:
        return False
    return query.cell.native_mode not in FUSED_NATIVE_MODES


def auto_rank(query: Query, native_priority: float, own_priority: float) -> float:
    """Above native where the static rule prefers numba, else the backend's own (lower) priority."""
    return native_priority + 1.0 if prefer_numba(query) else own_priority


# One step (the cells, Query.level "step"): numba's fused one-step call against torch.nn's cell kernels (_VF).
# Which is faster depends on the cell, the shape and the CPU (an RNN cell's step is little more than its two
# products), so the static rule keeps native for the built-in cells, calibration measures them, and numba's step
# takes the cells that have no native kernel.
def step_rank(query: Query, native_priority: float, own_priority: float) -> float:
    """Above native for a step of a cell without a native kernel; below it otherwise."""
    from .codegen import step_supported

    if query.device != "cpu" or not step_supported(query.cell) or query.cell.native_mode is not None:
        return own_priority
    return native_priority + 1.0
