"""Where `auto` prefers numba over torch.nn's native kernels on CPU, from benchmarks/numba_compare.py.

The boxes below are where numba beat torch.nn in every run on the benchmark machine (benchmarks/RESULTS.md, "CPU":
the grid and the off-grid LSTM shapes). torch.nn's GRU and RNN have no fused CPU training kernel (autograd over
per-step ops) and a slower inference path; numba beat them at every grid point, so it takes them at every shape.
torch.nn's LSTM runs on oneDNN: numba takes LSTM inference up to B8 and H64, and training at H <= 64 with
batch * hidden <= 128, at B8 H64, and for batch * hidden from 32 * 128 to 128 * 512 (batch <= 128, hidden <= 512).
Elsewhere, unmeasured shapes included, native runs: torch.nn's own kernels are never slower than themselves. At
small batches torch.nn's own LSTM time flips between two levels about 2x apart from one process to the next, so
single figures there are soft.

LSTM speed-ups behind the boxes (T = 100 unless the grid says otherwise; two figures: two runs):
- inference: B1 H32 2.24x, 2.33x; B2 H32 2.44x; B4 H32 1.88x; B8 H32 1.35x; B1 H64 2.80x; B2 H64 2.34x;
  B8 H64 1.04x, 1.04x; B4 H128 0.94x; B2 H256 0.39x; from B32 H128 up 0.70-0.77x.
- training: B1 H32 1.18x, 1.18x; B2 H32 1.43x; B4 H32 1.33x; B8 H32 1.02x; B1 H64 1.75x; B2 H64 1.90x;
  B8 H64 1.07x, 1.09x; B4 H128 1.03x; B2 H256 0.74x; B32 H128 1.26x, 1.27x; B64 H256 1.13x, 1.12x.
- training with MKL's AVX-512 kernel (_blas._direct_kernels): B64 H512 1.15-1.29x over thirteen grid runs;
  B32 H512 1.06x, B128 H256 1.34x, B128 H512 1.23x; B16 H512 0.99x.
"""

from __future__ import annotations

import math

from ...registry import Query

# Where numba beat native, per cell and mode: boxes of (largest batch, largest hidden_size, smallest and largest
# batch * hidden_size)
_ALL = ((math.inf, math.inf, 0, math.inf),)
INFERENCE_RANGES: dict[str, tuple[tuple[float, float, float, float], ...]] = {
    "gru": _ALL, "rnn_tanh": _ALL, "rnn_relu": _ALL, "lstm": ((8, 64, 0, math.inf),)}
TRAINING_RANGES: dict[str, tuple[tuple[float, float, float, float], ...]] = {
    "gru": _ALL, "rnn_tanh": _ALL, "rnn_relu": _ALL,
    "lstm": ((math.inf, 64, 0, 128), (8, 64, 512, 512), (math.inf, math.inf, 32 * 128, 64 * 256),
             (128, 512, 64 * 256, 128 * 512))}


def prefer_numba(query: Query) -> bool:
    """True where numba was measured faster than torch.nn's native kernels for this query."""
    if query.device != "cpu" or query.proj_size:
        return False
    if query.cell.native_mode is None:
        return True  # no native kernel to compare with: numba is the fused choice
    table = TRAINING_RANGES if query.requires_grad else INFERENCE_RANGES
    ranges = table.get(query.cell.name, ())
    if query.batch_size is None:  # a query without its shape was not measured: keep native
        return False
    size = query.batch_size * query.hidden_size
    return any(query.batch_size <= batch and query.hidden_size <= hidden and lo <= size <= hi
               for batch, hidden, lo, hi in ranges)


def auto_rank(query: Query, native_priority: float, own_priority: float) -> float:
    """Above native where numba measured faster, else the backend's own (lower) priority."""
    return native_priority + 1.0 if prefer_numba(query) else own_priority


# One step (the cells, Query.level "step"): numba's fused one-step call against torch.nn's cell kernels (_VF). On
# the 2-core benchmark machine numba's step did not beat _VF's for the built-in cells (its call costs more Python
# than the kernels save at these sizes), so auto keeps native for them and takes numba's step for cells that have
# no native kernel.
def step_rank(query: Query, native_priority: float, own_priority: float) -> float:
    """Above native for a step of a cell without a native kernel; below it otherwise."""
    from .codegen import step_supported

    if query.device != "cpu" or not step_supported(query.cell) or query.cell.native_mode is not None:
        return own_priority
    return native_priority + 1.0
