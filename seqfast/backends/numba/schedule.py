"""Where a scan runs: threads, row ranges, the per-shape plan, and the launch on torch's OpenMP team.

Rows of a batch never interact, so a scan splits its batch into contiguous row ranges, one per thread, each
running the whole time loop with no synchronisation. The ranges run inside an OpenMP parallel region of torch's
own libgomp, i.e. on the very threads torch uses for its GEMMs, entered from compiled code so that no team thread
runs Python (_team.py); MKL is held to one thread inside each range. Where this torch has no libgomp, a thread
pool runs them instead.

A small batch can split its hidden units instead: forward_units and backward_units, whose threads each multiply
by their own rows (columns) of W_hh and meet at a barrier every step (unit_ranges). A step of a few rows reads all of
W_hh for a few multiply-adds per element, and each row range reads all of it again; split by units, each thread
reads its share once.
Whether it runs is measured with the per-step GEMM choice (gemm_choice.UNITS).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from ..._memo import memo
from ...config import reader
from . import gemm_choice
from .codegen import entry_address

# Below this much work per thread (multiply-adds of the recurrent GEMM over all steps) the second thread costs
# more than it saves. Read when a plan is made: after changing it, clear_plans().
MIN_WORK_PER_THREAD = 2_000_000
MIN_ROWS_PER_THREAD = 2
# forward_units / backward_units: for batches up to UNITS_MAX_BATCH rows; each thread takes at least
# MIN_UNITS_PER_THREAD hidden units, its range starting on a multiple of UNIT_ALIGN units (64 bytes of float32),
# so that no two threads write one cache line of a row
UNITS_MAX_BATCH = 16
MIN_UNITS_PER_THREAD = 32
UNIT_ALIGN = 16

_in_forked_child = False


def _after_fork_in_child() -> None:
    global _in_forked_child, _pool
    _in_forked_child = True
    _pool, _pool_size[0] = None, 0  # the parent's pool threads do not exist here


os.register_at_fork(after_in_child=_after_fork_in_child)


_read_numba_threads = reader("numba_threads")  # every bound inference call checks its plan, and so reads this


def num_threads() -> int:
    """Threads a scan may use: SEQFAST_NUMBA_THREADS, else torch's intra-op thread count; one in a forked child
    (a DataLoader worker), whatever is set: libgomp is not fork-safe, and a team started in a child whose parent
    had started one hangs."""
    if _in_forked_child:
        return 1
    threads = _read_numba_threads()
    return threads if threads is not None else max(1, torch.get_num_threads())


def row_ranges(batch: int, work_per_row: int) -> list[tuple[int, int]]:
    """The batch's rows split into one contiguous (lo, hi) range per thread worth starting."""
    threads = min(num_threads(), batch // MIN_ROWS_PER_THREAD, batch * work_per_row // max(1, MIN_WORK_PER_THREAD))
    threads = max(1, threads)
    bounds = [round(i * batch / threads) for i in range(threads + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(threads)]


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def unit_ranges(batch: int, hidden: int) -> list[tuple[int, int]]:
    """The hidden units split into one contiguous (lo, hi) range per thread, for the _units kernels: up to
    UNITS_MAX_BATCH rows, where the team exists and every thread gets MIN_UNITS_PER_THREAD units; else []. No more
    threads than cores this process may run on: a thread waiting at the barrier for one that is not running would
    spin through the scheduler's time slices."""
    threads = min(num_threads(), usable_cores(), hidden // MIN_UNITS_PER_THREAD)
    if threads < 2 or batch > UNITS_MAX_BATCH or team_addresses() is None:
        return []
    bounds = [0, *(round(i * hidden / threads / UNIT_ALIGN) * UNIT_ALIGN for i in range(1, threads)), hidden]
    return [(bounds[i], bounds[i + 1]) for i in range(threads)]


# forward_pipelined: at least this many steps (two chunks of the projecting thread's), a projection of at least this
# many multiply-adds (what the overlap saves must pay for starting a team of two), and inputs at most this many
# times the hidden size (the projecting thread must keep ahead of the scan: a step's recurrent product runs far
# below a GEMM's speed, but a much wider input would make the scan wait)
PIPELINE_MIN_STEPS = 16
PIPELINE_MIN_PRODUCTS = 1 << 18
PIPELINE_MAX_INPUTS_PER_UNIT = 2


def pipelines(ranges: int, steps: int, products: int, inputs: int, hidden: int) -> bool:
    """Whether an inference scan overlaps its input projection (products multiply-adds) with the recurrence
    (forward_pipelined): where its rows run as one range, one thread would scan while the other idles. Needs two
    threads on two cores (the scan spins while it waits for a step's rows) and the team."""
    return (ranges == 1 and steps >= PIPELINE_MIN_STEPS and products >= PIPELINE_MIN_PRODUCTS
            and 0 < inputs <= PIPELINE_MAX_INPUTS_PER_UNIT * hidden
            and min(num_threads(), usable_cores()) >= 2 and team_addresses() is not None)


_forced_loop_gemm: list[bool | None] = [None]
_forced_units: list[bool | None] = [None]


def use_loop_gemm(kernel: str, fn: int, rows: int, width: int, hidden: int, itemsize: int, steps: int,
                  parts: int = 0) -> bool:
    """Run a scan's per-step GEMMs as the blocked numba loop (the kernels' `small` flag): what forced_loop_gemm()
    says, else the measured choice for a call of `steps` steps (gemm_choice), else the static rule,
    _blas.loop_gemm. rows: the most rows one thread runs; parts: the forward's unit ranges (0: none)."""
    if _forced_loop_gemm[0] is not None:
        return _forced_loop_gemm[0]
    from ._blas import loop_gemm

    measured = gemm_choice.decided(gemm_key(kernel, fn, rows, width, hidden, itemsize, parts))
    if measured is None:
        return loop_gemm(kernel, fn, rows, width, hidden, itemsize)
    return measured.choice(steps, (True, False))


def use_units(kernel: str, fn: int, rows: int, width: int, hidden: int, itemsize: int, steps: int,
              parts: int) -> bool:
    """Run a scan ("forward" / "backward") as its _units kernel over `parts` unit ranges: what forced_units() says,
    else where the measured choice for a call of `steps` steps is gemm_choice.UNITS (no static rule picks it)."""
    if parts < 2:
        return False
    if _forced_units[0] is not None:
        return _forced_units[0]
    measured = gemm_choice.decided(gemm_key(kernel, fn, rows, width, hidden, itemsize, parts))
    return measured is not None and measured.choice(steps) == gemm_choice.UNITS


def gemm_key(kernel: str, fn: int, rows: int, width: int, hidden: int, itemsize: int, parts: int = 0) -> tuple:
    """What a scan's GEMM choice is measured for: the kernel ("forward" / "backward"), the BLAS routine, the
    shape one thread multiplies, and the unit ranges it may run over instead (0: none)."""
    return kernel, fn, rows, width, hidden, itemsize, parts


@contextlib.contextmanager
def forced_loop_gemm(loop: bool) -> Iterator[None]:
    """Inside the block every scan runs its per-step GEMMs as the numba loop (True) or in BLAS (False), whatever
    its shape: for tests and benchmarks that compare the two. Plans made inside are forgotten on the way out."""
    with _forced(_forced_loop_gemm, loop):
        yield


@contextlib.contextmanager
def forced_units(units: bool) -> Iterator[None]:
    """Inside the block every scan with unit ranges (of a dense, unstaged cell) runs as its _units kernel (True) or
    over its row ranges (False), whatever the measured choice: for tests and benchmarks. Plans made inside are
    forgotten on the way out."""
    with _forced(_forced_units, units):
        yield


@contextlib.contextmanager
def _forced(flag: list, value: bool) -> Iterator[None]:
    previous = flag[0]
    flag[0] = value
    clear_plans()
    try:
        yield
    finally:
        flag[0] = previous
        clear_plans()


class Plan(NamedTuple):
    """Everything about a scan that follows from its shape, worked out once: a small scan's whole kernel takes
    tens of microseconds, and redoing this on each call was a measurable part of it."""

    fn: int  # the BLAS GEMM's address (0: none)
    ranges: list[tuple[int, int]]  # batch rows per thread
    loop_forward: bool  # the per-step GEMM as the numba loop, in the forward scan
    measure_forward: tuple | None  # gemm_choice's key while loop_forward is the static rule's, unmeasured
    loop_backward: bool  # and in the backward scan
    measure_backward: tuple | None  # as measure_forward
    forward_nn: bool  # the forward's MKL call takes W_hh transposed (N,N), see _blas.is_avx512_kernel
    units_forward: bool  # the forward runs as forward_units over unit_array (a dense unstaged cell's)
    units_backward: bool  # and the backward as backward_units
    unit_array: np.ndarray  # unit_ranges() as int64 [threads, 2]; [0, 2] where there are none
    hidden: int
    dtype_name: str
    full_lengths: np.ndarray  # lengths of a batch without them (read-only)
    zero_states: tuple[np.ndarray, ...]  # [B, H] zeros, per state (read-only)
    zero_bias: np.ndarray  # [G*H] zeros: an absent bias (read-only)
    range_array: np.ndarray  # ranges as int64 [threads, 2], for the kernels' team launchers


_plans: dict[tuple, Plan] = {}


def plan(dtype_name: str, steps: int, batch: int, width: int, hidden: int, num_states: int = 1) -> Plan:
    """The plan of a scan of this shape, memoised (clear_plans() forgets them)."""
    key = (dtype_name, steps, batch, width, hidden, num_states, num_threads())
    found = _plans.get(key)
    if found is not None:  # every scan asks: spared building make() below
        return found

    def make() -> Plan:
        from ._blas import gemm_address, is_avx512_kernel

        fn = gemm_address(dtype_name)
        ranges = row_ranges(batch, steps * width * hidden)
        units = unit_ranges(batch, hidden)
        itemsize = 4 if dtype_name == "float32" else 8
        zero = np.zeros((batch, hidden), dtype=dtype_name)
        measure = (bool(fn and batch and _forced_loop_gemm[0] is None and _forced_units[0] is None)
                   and gemm_choice.may_measure())
        rows, parts = max(hi - lo for lo, hi in ranges), len(units)
        keys = [gemm_key(kernel, fn, rows, width, hidden, itemsize, parts) for kernel in ("forward", "backward")]
        forward_key, backward_key = (key if measure and gemm_choice.decided(key) is None else None for key in keys)
        shape = (fn, rows, width, hidden, itemsize, steps)
        return Plan(fn, ranges, use_loop_gemm("forward", *shape, parts), forward_key,
                    use_loop_gemm("backward", *shape, parts), backward_key, is_avx512_kernel(fn),
                    use_units("forward", *shape, parts), use_units("backward", *shape, parts),
                    np.array(units, dtype=np.int64).reshape(-1, 2), hidden,
                    dtype_name, np.full(batch, steps, dtype=np.int64), (zero,) * num_states,
                    np.zeros(width, dtype=dtype_name), np.array(ranges, dtype=np.int64).reshape(-1, 2))

    return memo(_plans, key, make)


def clear_plans() -> None:
    """Forget every plan: the next scan of each shape works its plan out again (after MIN_WORK_PER_THREAD, the
    BLAS kernel or the loop GEMM choice changed)."""
    _plans.clear()


class Team(NamedTuple):
    """The addresses the kernels' team launchers call (_team.py)."""

    gomp: int  # GOMP_parallel
    thread_num: int  # omp_get_thread_num
    mkl_local: int  # MKL_Set_Num_Threads_Local, or 0
    team_size: int  # omp_get_num_threads


_team_found: list = []  # [the addresses, or None], once looked up


def team_addresses() -> Team | None:
    """What the kernels' team launchers need to run a scan's ranges on torch's own OpenMP threads (_team.py).
    None when this torch has no libgomp in torch/lib; run_rows then runs the row ranges on a thread pool.

    torch's own runtime, not a pool of our own: right after a torch op (the input projection) torch's OpenMP worker
    keeps spinning for a while, and a separate thread lost most of the second core to it (LSTM inference at T200
    B32 H128: 20 ms instead of 13). Inside a region of torch's runtime the spinning worker simply takes the work,
    and MKL (same runtime) stays single-threaded: numba, MKL and torch share one pool of threads."""
    if not _team_found:
        found = None
        path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
        try:
            if os.path.exists(path):
                from ._blas import MKL_SET_LOCAL_THREADS as set_local

                lib = ctypes.CDLL(path)

                def address(fn) -> int:
                    return ctypes.cast(fn, ctypes.c_void_p).value

                found = Team(address(lib.GOMP_parallel), address(lib.omp_get_thread_num),
                             0 if set_local is None else address(set_local), address(lib.omp_get_num_threads))
        except (OSError, AttributeError):
            found = None
        _team_found.append(found)
    return _team_found[0]


_pool: ThreadPoolExecutor | None = None
_pool_size = [0]
_pool_lock = threading.Lock()


def run_rows(call: Callable[[int, int], None], ranges: list[tuple[int, int]], blas: bool = True) -> None:
    """call(lo, hi) for every row range: one range here, several concurrently on a thread pool (kernels release the
    GIL; used only where team_addresses() finds no libgomp). MKL is held to one thread inside each call, so k
    ranges use exactly k cores. blas=False: the kernels call no BLAS (loop GEMMs), so MKL's setting is left
    alone."""
    global _pool
    from ._blas import single_threaded_blas

    def task(lo: int, hi: int) -> None:
        with single_threaded_blas():
            call(lo, hi)

    if len(ranges) == 1:
        if blas:
            task(*ranges[0])
        else:
            call(*ranges[0])
        return
    with _pool_lock:
        if _pool is None or _pool_size[0] < len(ranges) - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool_size[0] = len(ranges) - 1
            _pool = ThreadPoolExecutor(max_workers=_pool_size[0], thread_name_prefix="seqfast-numba")
        pool = _pool
    futures = [pool.submit(task, lo, hi) for lo, hi in ranges[1:]]
    try:
        task(*ranges[0])
    finally:
        for f in futures:
            f.result()


def launch(module, kernel: str, plan: Plan, small: bool, args: tuple, sums: tuple = ()) -> None:
    """Run `kernel` ("forward", "backward") over the plan's row ranges, or "forward_units" / "backward_units"
    over its unit ranges: on torch's OpenMP team through the kernel's launcher (Python-free, see _team.py), else
    (row ranges) on the thread pool. sums: per-range accumulators [ranges, n], each range writing its own row (at
    least as many rows as ranges)."""
    if kernel.endswith("_units"):  # only planned where the team exists
        team = team_addresses()
        getattr(module, kernel + "_launch")(team.gomp, entry_address(module, kernel), team.thread_num,
                                            team.team_size, team.mkl_local, plan.unit_array, plan.fn, small, *args,
                                            *sums)
        return
    launch_ranges(module, kernel, plan.fn, plan.ranges, plan.range_array, small, args, sums)


def bound_block(module, kernel: str, plan: Plan, small: bool, args: tuple) -> np.ndarray:
    """launch()'s argument block for `kernel` at the plan, written once (team_addresses() must find the team): for
    a caller that runs one shape many times, rewrites the addresses that change and calls `<kernel>_run` with
    it (stack.py)."""
    team = team_addresses()
    block = np.zeros(getattr(module, kernel.upper() + "_BLOCK_SIZE"), dtype=np.int64)
    ranges = plan.unit_array if kernel.endswith("_units") else plan.range_array
    getattr(module, kernel + "_block")(block, team.thread_num, team.team_size, team.mkl_local, ranges, plan.fn,
                                       small, *args)
    return block


def launch_ranges(module, kernel: str, fn: int, ranges: list[tuple[int, int]], range_array: np.ndarray,
                  small: bool, args: tuple, sums: tuple = ()) -> None:
    """launch() with the GEMM and the ranges given (kernels that run outside a scan's plan: weight_grad)."""
    team = team_addresses()
    if team is not None:
        getattr(module, kernel + "_launch")(team.gomp, entry_address(module, kernel), team.thread_num,
                                            team.team_size, team.mkl_local, range_array, fn, small, *args, *sums)
        return
    body, rows = getattr(module, kernel), {r: i for i, r in enumerate(ranges)}
    run_rows(lambda lo, hi: body(fn, small, lo, hi, *args, *(part[rows[(lo, hi)]] for part in sums)),
             ranges, blas=not small)
