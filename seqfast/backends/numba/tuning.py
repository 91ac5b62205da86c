"""Where `auto` prefers numba over torch.nn's native kernels on CPU, from benchmarks/numba_compare.py.

Measured on 2 cores (benchmarks/RESULTS.md, "Numba (CPU)"). torch.nn's LSTM runs on oneDNN, whose fused kernels
beat or tie ours at every grid point but the smallest inference one (T100 B1 H32): numba's LSTM training measured
0.85-1.08x from run to run, so `auto` keeps native for LSTM elsewhere. torch.nn's GRU and RNN have no fused CPU
training kernel (autograd over per-step ops) and a slower inference path. numba won their inference at every grid
point. Since the backward reuses the forward's recurrent products, it also won their training at every grid
point, in every run (GRU 1.13-16x, RNN 1.01-6.3x).
"""

from __future__ import annotations

import math

from ...registry import Query

# largest batch * hidden_size at which numba beat native, per cell and mode (None: never; inf: everywhere measured)
INFERENCE_MAX_BATCH_HIDDEN: dict[str, float | None] = {"gru": math.inf, "rnn_tanh": math.inf,
                                                       "rnn_relu": math.inf, "lstm": 1 * 32}
TRAINING_MAX_BATCH_HIDDEN: dict[str, float | None] = {"gru": math.inf, "rnn_tanh": math.inf, "rnn_relu": math.inf,
                                                      "lstm": None}


def prefer_numba(query: Query) -> bool:
    """True where numba was measured faster than torch.nn's native kernels for this query."""
    if query.device != "cpu" or query.proj_size:
        return False
    name = query.cell.name
    if query.cell.native_mode is None:
        return True  # no native kernel to compare with: numba is the fused choice
    table = TRAINING_MAX_BATCH_HIDDEN if query.requires_grad else INFERENCE_MAX_BATCH_HIDDEN
    limit = table.get(name)
    if limit is None or query.batch_size is None:  # a query without its shape was not measured: keep native
        return False
    return query.batch_size * query.hidden_size <= limit


def auto_rank(query: Query, native_priority: float, own_priority: float) -> float:
    """Above native where numba measured faster, else the backend's own (lower) priority."""
    return native_priority + 1.0 if prefer_numba(query) else own_priority
