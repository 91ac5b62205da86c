"""Where `auto` prefers numba over torch.nn's native kernels on CPU, from benchmarks/numba_compare.py.

Measured on 2 cores (benchmarks/RESULTS.md, "Numba (CPU)"). torch.nn's GRU and RNN have no fused CPU training
kernel (autograd over per-step ops) and a slower inference path: numba was faster at every grid point in both
runs of 2026-11-26 but GRU inference at B64 H256 (0.97x, 1.00x). torch.nn's LSTM runs on oneDNN. Speed-up of
numba over torch.nn for LSTM on 2026-11-26, T = 100 unless the grid says otherwise (grid points: its two full
runs; the rest: one run of `numba_compare.py --cells lstm --shape T,B,I,H ...` with all nine shapes):
- inference: B1 H32 2.24x, 2.33x; B2 H32 2.44x; B4 H32 1.88x; B8 H32 1.35x; B1 H64 2.80x; B2 H64 2.34x;
  B8 H64 1.04x, 1.04x; B4 H128 0.94x; B2 H256 0.39x; from B32 H128 up 0.70-0.77x.
- training: B1 H32 1.18x, 1.18x; B2 H32 1.43x; B4 H32 1.33x; B8 H32 1.02x; B1 H64 1.75x; B2 H64 1.90x;
  B8 H64 1.07x, 1.09x; B4 H128 1.03x; B2 H256 0.74x; B32 H128 1.26x, 1.27x; B64 H256 1.13x, 1.12x; B64 H512
  1.04x, 1.05x.
At small batches torch.nn's own time flips between two levels about 2x apart from one process to the next (B1
H128 inference: 0.44 ms in one run, 0.86 ms in another; B16 H32: 0.51 vs 1.10 ms within one run), so single
figures there are soft. `auto` takes numba for LSTM only where it won every run: inference up to B8 and H64;
training at hidden <= 64 with batch * hidden <= 128, at B8 H64, and from B32 H128 to B64 H256. A third full run
(01:53 UTC, torch.nn in its slow level at small batch) agreed: B8 H64 1.33x / 1.15x. Native elsewhere,
unmeasured shapes included, since torch.nn's own kernels are never slower than themselves. Session 7 (MKL's
AVX-512 kernel, see _blas._direct_kernels) moved LSTM training at B64 H512 to 1.15-1.29x in thirteen full runs
(and 1.06x in one more, which a busy host slowed throughout), so a fourth box takes numba from
B * H = 64 * 256 to 128 * 512, for batches up to 128 and hidden sizes up to 512; by
`numba_compare.py --cells lstm --modes train --shape ...`: B32 H512 1.06x, B128 H256 1.34x, B128 H512 1.23x
(B16 H512, inside the third box, 0.99x). Session 4's seven
full runs (thread team from compiled code, oneDNN input projection, saved pre-activation) kept these boxes:
LSTM training B1 H32 1.26-1.56x, B8 H64 1.09-1.35x, B32 H128 1.24-1.40x, B64 H256 0.96-1.23x, and B64 H512
0.96-1.12x, still native; inference B8 H64 0.99-1.37x, from B32 H128 up 0.70-0.88x.
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
