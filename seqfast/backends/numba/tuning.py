"""Where `auto` prefers numba over torch.nn's native kernels on CPU, from benchmarks/numba_compare.py.

Measured on 2 cores (benchmarks/RESULTS.md, "Numba (CPU)"). torch.nn's LSTM runs on oneDNN, whose fused kernels
beat ours at every grid point but the smallest inference one (T100 B1 H32) and one training tie (T200 B32 H128),
so `auto` keeps native for LSTM elsewhere. torch.nn's GRU and RNN have no fused CPU training kernel (autograd over
per-step ops) and a slower inference path: numba won their inference at every grid point, and their training
up to batch x hidden = 64 x 256 (GRU) and 32 x 128 (RNN); beyond that the GEMMs dominate both sides and numba was
measured 0.91-1.01x, so `auto` keeps native there (choosing torch.nn's own kernels can never be slower than them).
"""

from __future__ import annotations

import math

from ...registry import Query

# largest batch * hidden_size at which numba beat native, per cell and mode (None: never; inf: everywhere measured)
INFERENCE_MAX_BATCH_HIDDEN: dict[str, float | None] = {"gru": math.inf, "rnn_tanh": math.inf,
                                                       "rnn_relu": math.inf, "lstm": 1 * 32}
TRAINING_MAX_BATCH_HIDDEN: dict[str, float | None] = {"gru": 64 * 256, "rnn_tanh": 32 * 128, "rnn_relu": 32 * 128,
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
