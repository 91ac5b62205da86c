"""Whether a scan's per-step products run as the numba loop or in MKL: measured on this machine.

Where the two cross over depends on the CPU (its vector width, its caches, the code path MKL takes on it), and the
static rule (_blas.loop_gemm) was fitted on AVX-512 CPUs. So the first forward scan of a shape in a process (its
rows per thread, width, hidden size, dtype and BLAS routine), and the first backward scan, first run a few of the
call's own steps both ways, interleaved, and the faster is kept for the process, as torch.backends.cudnn.benchmark
picks convolution algorithms. The static rule's choice stands unless the other is MARGIN faster. The timing runs
use the same compiled kernel (its loop-or-MKL flag is an argument: nothing is compiled for them): the forward's
are inference runs writing the call's own outputs, which the call writes again afterwards; the backward's read
copies of what its kernel overwrites and write scratch buffers (scan.py). Only the rounding of a call's products
can depend on the outcome.

Only dense recurrences of unstaged cells are timed (the others have no per-step product, or products of column
blocks that keep the static rule). Nothing is timed where `auto`'s calibration is off (SEQFAST_CALIBRATE=0,
`calibrate = false`), while torch.compile traces, or inside torch.func transforms; the static rule applies there.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import torch

from ...config import calibration_setting

MARGIN = 1.10
ROUNDS = 3
WORK_PER_RUN = 1 << 22  # multiply-adds of the per-step products in one timing run
MIN_STEPS = 2

_decided: dict[tuple, bool] = {}
_lock = threading.Lock()
_clock: Callable[[], float] = time.perf_counter


def decided(key: tuple) -> bool | None:
    """The measured choice for a shape key (True: the loop), or None where none was made in this process."""
    return _decided.get(key)


def may_measure() -> bool:
    """Whether timing is allowed now (see the module's rules)."""
    enabled, _ = calibration_setting()
    return bool(enabled) and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def timing_steps(steps: int, batch: int, width: int, hidden: int) -> int:
    """How many of a call's steps a timing run takes: enough per-step products to time, at most the call's."""
    return max(1, min(steps, max(MIN_STEPS, WORK_PER_RUN // max(1, batch * width * hidden))))


def choose(key: tuple, static: bool, run: Callable[[bool], None]) -> bool:
    """Time run(loop) both ways (one untimed run each, then ROUNDS interleaved runs, best of each), keep the
    choice under `key` and return it (True: the loop)."""
    with _lock:
        known = _decided.get(key)
        if known is not None:
            return known
        ways = (static, not static)
        for loop in ways:
            run(loop)
        best = dict.fromkeys(ways, math.inf)
        for round_ in range(ROUNDS):
            for loop in (ways if round_ % 2 == 0 else ways[::-1]):
                start = _clock()
                run(loop)
                best[loop] = min(best[loop], _clock() - start)
        choice = (not static) if best[not static] * MARGIN < best[static] else static
        if len(_decided) >= 4096:  # shapes vary without bound in some programs
            _decided.clear()
        _decided[key] = choice
        return choice


def forget() -> None:
    """Drop every measured choice (tests; a changed thread count makes new keys anyway)."""
    with _lock:
        _decided.clear()


__all__ = ["MARGIN", "choose", "decided", "forget", "may_measure", "timing_steps"]
