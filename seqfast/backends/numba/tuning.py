"""Where `auto` prefers numba over torch.nn's native kernels on CPU, from benchmarks/numba_compare.py.

Measured on 2 cores (benchmarks/RESULTS.md, "Numba (CPU)"). torch.nn's GRU and RNN have no fused CPU training
kernel (autograd over per-step ops) and a slower inference path. numba won their inference and training at
every grid point, in every run. torch.nn's LSTM runs on oneDNN, whose fused kernels beat ours at LSTM inference
except at batch 1. For training, repeated interleaved measurements on 2026-11-25 gave:
- B1 H32: 1.09-1.16x;
- B8 H64: 0.92-0.96x;
- B32 H128: 1.21-1.24x;
- B64 H256: 1.04-1.09x;
- B64 H512: 0.99-1.05x.
`auto` takes numba only inside the batch x hidden ranges where it won every time, and native elsewhere,
unmeasured sizes included: choosing torch.nn's own kernels can never be slower than them.
"""

from __future__ import annotations

import math

from ...registry import Query

# batch * hidden_size ranges (inclusive) where numba beat native in every run, per cell and mode; absent: never
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
