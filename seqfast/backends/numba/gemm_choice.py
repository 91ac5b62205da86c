"""GEMM choices measured on this machine: the scans' per-step products (numba loop or MKL) and the input projection
(MKL's own kernel, torch's mm or oneDNN's linear).

Which is faster depends on the CPU (its vector width, its caches, the code path MKL and oneDNN take on it), and the
static rules (_blas.loop_gemm, gemm.ONEDNN_MIN_OUTPUTS) were fitted on AVX-512 CPUs. So the first call of a shape
in a process runs the candidates on its own data, interleaved, and keeps the fastest for the process, as
torch.backends.cudnn.benchmark picks convolution algorithms; the static rule's choice stands unless another is
clearly faster (MARGIN). Only the rounding of a call's products can depend on the outcome.

- Per-step products: the first forward scan of a shape (its rows per thread, width, hidden size, dtype and BLAS
  routine), and the first backward scan, run a few of the call's own steps both ways, at two step counts. A way's
  cost is fitted as a cost per call plus one per step (StepCosts): the forward's loop transposes W_hh once per call
  and thread, which a short timing run would otherwise charge to every step, and which a long call spreads thin.
  The choice then follows each call's length. Where a scan could split its hidden units over threads instead
  (schedule.unit_ranges: up to 16 rows), that is a third way, UNITS, timed alike; its _units kernel is compiled
  for the timing if neither this process nor numba's disk cache has it. The loop and MKL share one compiled kernel
  (the loop-or-MKL flag is an argument: nothing is compiled for them): the forward's are inference runs writing the
  call's own outputs, which the call writes again afterwards; the backward's read copies of what its kernel
  overwrites and write scratch buffers (scan.py). Only dense recurrences of unstaged cells are timed (the others
  have no per-step product, or products of column blocks that keep the static rule).
- Input projections (gemm.py) of at least SMALL_TORCH_GEMM multiply-adds, per bucket of rows, width, input size
  and thread count: the first call's product on at most gemm.PROJECTION_TIMING_ROWS of its rows, by each way.

Nothing is timed where `auto`'s calibration is off (SEQFAST_CALIBRATE=0, `calibrate = false`), while torch.compile
traces, or inside torch.func transforms; the static rules apply there.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from ...config import calibration_setting

MARGIN = 1.10
UNITS = "units"  # the scans' third way, their _units kernel (the ways are True: the loop, False: MKL, and this)
ROUNDS = 3
WORK_PER_RUN = 1 << 22  # multiply-adds of the per-step products in one timing run
MIN_STEPS = 2

_decided: dict[tuple, object] = {}
_lock = threading.Lock()
_clock: Callable[[], float] = time.perf_counter


def decided(key: tuple) -> object:
    """The measured choice for a shape key (a way choose() was given, or choose_for_steps()'s StepCosts), or None
    where none was made in this process."""
    return _decided.get(key)


def may_measure() -> bool:
    """Whether timing is allowed now (see the module's rules)."""
    enabled, _ = calibration_setting()
    return bool(enabled) and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def timing_steps(steps: int, batch: int, width: int, hidden: int) -> int:
    """How many of a call's steps the longer timing run takes: enough per-step products to time, at most the
    call's."""
    return max(1, min(steps, max(MIN_STEPS, WORK_PER_RUN // max(1, batch * width * hidden))))


def choose(key: tuple, ways: tuple, run: Callable[[object], None]) -> object:
    """Time run(way) for each of `ways` (one untimed run each, then ROUNDS interleaved runs, best of each), keep
    the choice under `key` and return it: the fastest way where it is MARGIN faster than ways[0] (the static
    rule's), else ways[0]."""
    with _lock:
        known = _decided.get(key)
        if known is not None:
            return known
        for way in ways:
            run(way)
        best = dict.fromkeys(ways, math.inf)
        for round_ in range(ROUNDS):
            for way in (ways if round_ % 2 == 0 else ways[::-1]):
                start = _clock()
                run(way)
                best[way] = min(best[way], _clock() - start)
        fastest = min(ways, key=best.__getitem__)
        choice = fastest if best[fastest] * MARGIN < best[ways[0]] else ways[0]
        if len(_decided) >= 4096:  # shapes vary without bound in some programs
            _decided.clear()
        _decided[key] = choice
        return choice


class StepCosts(NamedTuple):
    """A scan's measured per-step GEMM choice: each way's fitted cost per call and per step, in seconds."""

    static: bool  # the static rule's way (_blas.loop_gemm)
    per_call: dict[object, float]
    per_step: dict[object, float]

    def choice(self, steps: int, ways: tuple | None = None) -> object:
        """The way for a call of `steps` steps, of `ways` (default: every way timed): the cheapest where it is
        MARGIN faster than the static one, else the static one."""
        cost = {way: self.per_call[way] + steps * self.per_step[way] for way in (ways or self.per_call)}
        best = min(cost, key=cost.__getitem__)
        return best if cost[best] * MARGIN < cost[self.static] else self.static


def choose_for_steps(key: tuple, static: bool, run: Callable[[object, int], None], steps: int,
                     more: tuple = ()) -> StepCosts:
    """Time run(way, k) for the loop and MKL (True, False) and the `more` ways, at k = steps and at a quarter of
    it (one untimed run each, then ROUNDS interleaved rounds, best of each), fit each way's cost per call and per
    step through the two, keep the fit under `key` and return it. steps >= 2."""
    with _lock:
        known = _decided.get(key)
        if known is not None:
            return known
        counts = (max(1, steps // 4), steps)
        ways = (static, not static, *more)
        for way in ways:
            run(way, steps)
        best = {(way, k): math.inf for way in ways for k in counts}
        for round_ in range(ROUNDS):
            for way in (ways if round_ % 2 == 0 else ways[::-1]):
                for k in counts:
                    start = _clock()
                    run(way, k)
                    best[way, k] = min(best[way, k], _clock() - start)
        per_call, per_step = {}, {}
        for way in ways:
            per_call[way], per_step[way] = _fit(counts, best[way, counts[0]], best[way, counts[1]])
        costs = StepCosts(static, per_call, per_step)
        if len(_decided) >= 4096:  # shapes vary without bound in some programs
            _decided.clear()
        _decided[key] = costs
        return costs


def _fit(counts: tuple[int, int], short_time: float, long_time: float) -> tuple[float, float]:
    """(cost per call, cost per step) through two timed runs of counts[0] < counts[1] steps. Where the longer run
    was not the slower (a disturbed run), there is no slope to read: its time, spread over its steps."""
    short, long = counts
    if long <= short or long_time <= short_time:
        return 0.0, long_time / long
    per_step = (long_time - short_time) / (long - short)
    return max(0.0, short_time - short * per_step), per_step


def forget() -> None:
    """Drop every measured choice (tests; a changed thread count makes new keys anyway)."""
    with _lock:
        _decided.clear()


__all__ = ["MARGIN", "UNITS", "StepCosts", "choose", "choose_for_steps", "decided", "forget", "may_measure",
           "timing_steps"]
