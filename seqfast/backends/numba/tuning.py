"""Where `auto` prefers numba over torch.nn's native kernels on CPU, from benchmarks/numba_compare.py.

Measured on 2 cores (benchmarks/RESULTS.md, "Numba (CPU)"). torch.nn's GRU and RNN have no fused CPU training
kernel (autograd over per-step ops) and a slower inference path. In the quiet runs of
`benchmarks/numba_compare.py` numba was faster at every grid point but B64 H512, where it was even (0.99-1.01x).
torch.nn's LSTM runs on oneDNN, whose forward beats ours at LSTM inference except at batch 1. LSTM training, in
two quiet runs on 2026-11-25 (23:09 UTC, before the four-row loop GEMM, and 23:30, the final code; a disturbed
run in between gave 0.74-1.09x):
- B1 H32: 1.16x, 1.10x;
- B8 H64: 0.96x, 1.14x;
- B32 H128: 1.22x, 1.30x;
- B64 H256: 1.09x, 1.11x;
- B64 H512: 1.05x, 1.08x.
`auto` takes numba for LSTM training only where it won both runs by a clear margin (B64 H512, within noise, stays
native), and native elsewhere, unmeasured sizes included: torch.nn's own kernels can never be slower than them.
"""

from __future__ import annotations

import math

from ...registry import Query

# batch * hidden_size ranges (inclusive) where numba beat native in every quiet run, per cell and mode; absent: never
_ALL = ((0, math.inf),)
INFERENCE_RANGES: dict[str, tuple[tuple[float, float], ...]] = {
    "gru": _ALL, "rnn_tanh": _ALL, "rnn_relu": _ALL, "lstm": ((0, 1 * 32),)}
TRAINING_RANGES: dict[str, tuple[tuple[float, float], ...]] = {
    "gru": _ALL, "rnn_tanh": _ALL, "rnn_relu": _ALL, "lstm": ((0, 1 * 32), (32 * 128, 64 * 256))}


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
    return any(lo <= size <= hi for lo, hi in ranges)


def auto_rank(query: Query, native_priority: float, own_priority: float) -> float:
    """Above native where numba measured faster, else the backend's own (lower) priority."""
    return native_priority + 1.0 if prefer_numba(query) else own_priority
