"""Where a scan runs: threads, row ranges, the per-shape plan, and the launch on torch's OpenMP team.

Rows of a batch never interact, so a scan splits its batch into contiguous row ranges, one per thread, each
running the whole time loop with no synchronisation. The ranges run inside an OpenMP parallel region of torch's
own libgomp, i.e. on the very threads torch uses for its GEMMs, entered from compiled code so that no team thread
runs Python (_team.py); MKL is held to one thread inside each range. Where this torch has no libgomp, a thread
pool runs them instead.
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
from ...config import setting
from . import gemm_choice
from .codegen import entry_address

# Below this much work per thread (multiply-adds of the recurrent GEMM over all steps) the second thread costs
# more than it saves. Read when a plan is made: after changing it, clear_plans().
MIN_WORK_PER_THREAD = 2_000_000
MIN_ROWS_PER_THREAD = 2

_in_forked_child = False


def _after_fork_in_child() -> None:
    global _in_forked_child, _pool
    _in_forked_child = True
    _pool, _pool_size[0] = None, 0  # the parent's pool threads do not exist here


os.register_at_fork(after_in_child=_after_fork_in_child)


def num_threads() -> int:
    """Threads a scan may use: SEQFAST_NUMBA_THREADS, else torch's intra-op thread count; one in a forked child
    (a DataLoader worker), whatever is set: libgomp is not fork-safe, and a team started in a child whose parent
    had started one hangs."""
    if _in_forked_child:
        return 1
    threads = setting("numba_threads")
    return threads if threads is not None else max(1, torch.get_num_threads())


def row_ranges(batch: int, work_per_row: int) -> list[tuple[int, int]]:
    """The batch's rows split into one contiguous (lo, hi) range per thread worth starting."""
    threads = min(num_threads(), batch // MIN_ROWS_PER_THREAD, batch * work_per_row // max(1, MIN_WORK_PER_THREAD))
    threads = max(1, threads)
    bounds = [round(i * batch / threads) for i in range(threads + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(threads)]


_forced_loop_gemm: list[bool | None] = [None]


def use_loop_gemm(kernel: str, fn: int, ranges: list[tuple[int, int]], width: int, hidden: int,
                  itemsize: int, steps: int) -> bool:
    """Run a scan's per-step GEMMs as the blocked numba loop (the kernels' `small` flag): what forced_loop_gemm()
    says, else the measured choice for a call of `steps` steps (gemm_choice), else the static rule,
    _blas.loop_gemm."""
    if _forced_loop_gemm[0] is not None:
        return _forced_loop_gemm[0]
    from ._blas import loop_gemm

    rows = max(hi - lo for lo, hi in ranges)
    measured = gemm_choice.decided(gemm_key(kernel, fn, rows, width, hidden, itemsize))
    return loop_gemm(kernel, fn, rows, width, hidden, itemsize) if measured is None else measured.choice(steps)


def gemm_key(kernel: str, fn: int, rows: int, width: int, hidden: int, itemsize: int) -> tuple:
    """What a scan's GEMM choice is measured for: the kernel ("forward" / "backward"), the BLAS routine and the
    shape one thread multiplies."""
    return kernel, fn, rows, width, hidden, itemsize


@contextlib.contextmanager
def forced_loop_gemm(loop: bool) -> Iterator[None]:
    """Inside the block every scan runs its per-step GEMMs as the numba loop (True) or in BLAS (False), whatever
    its shape: for tests and benchmarks that compare the two. Plans made inside are forgotten on the way out."""
    previous = _forced_loop_gemm[0]
    _forced_loop_gemm[0] = loop
    clear_plans()
    try:
        yield
    finally:
        _forced_loop_gemm[0] = previous
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
        itemsize = 4 if dtype_name == "float32" else 8
        zero = np.zeros((batch, hidden), dtype=dtype_name)
        measure = bool(fn and batch and _forced_loop_gemm[0] is None) and gemm_choice.may_measure()
        keys = [gemm_key(kernel, fn, max(hi - lo for lo, hi in ranges), width, hidden, itemsize)
                for kernel in ("forward", "backward")]
        forward_key, backward_key = (key if measure and gemm_choice.decided(key) is None else None for key in keys)
        return Plan(fn, ranges, use_loop_gemm("forward", fn, ranges, width, hidden, itemsize, steps), forward_key,
                    use_loop_gemm("backward", fn, ranges, width, hidden, itemsize, steps), backward_key,
                    is_avx512_kernel(fn), hidden,
                    dtype_name, np.full(batch, steps, dtype=np.int64), (zero,) * num_states,
                    np.zeros(width, dtype=dtype_name), np.array(ranges, dtype=np.int64).reshape(-1, 2))

    return memo(_plans, key, make)


def clear_plans() -> None:
    """Forget every plan: the next scan of each shape works its plan out again (after MIN_WORK_PER_THREAD, the
    BLAS kernel or the loop GEMM choice changed)."""
    _plans.clear()


_team_found: list = []  # [the addresses, or None], once looked up


def team_addresses() -> tuple[int, int, int] | None:
    """(GOMP_parallel, omp_get_thread_num, MKL_Set_Num_Threads_Local or 0): what the kernels' team launchers need
    to run a scan's row ranges on torch's own OpenMP threads (_team.py). None when this torch has no libgomp in
    torch/lib; run_rows then runs the ranges on a thread pool.

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
                found = (ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value,
                         ctypes.cast(lib.omp_get_thread_num, ctypes.c_void_p).value,
                         0 if set_local is None else ctypes.cast(set_local, ctypes.c_void_p).value)
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
    """Run `kernel` ("forward" or "backward") over the plan's row ranges: on torch's OpenMP team through the
    kernel's launcher (Python-free, see _team.py), else on the thread pool. sums: per-range accumulators
    [ranges, n], each range writing its own row."""
    launch_ranges(module, kernel, plan.fn, plan.ranges, plan.range_array, small, args, sums)


def bound_block(module, kernel: str, plan: Plan, small: bool, args: tuple) -> np.ndarray:
    """launch()'s argument block for `kernel` at the plan, written once (team_addresses() must find the team): for
    a caller that runs one shape many times, rewrites the addresses that change and calls `<kernel>_run` with
    it (stack.py)."""
    _, thread_num, mkl_local = team_addresses()
    block = np.zeros(getattr(module, kernel.upper() + "_BLOCK_SIZE"), dtype=np.int64)
    getattr(module, kernel + "_block")(block, thread_num, mkl_local, plan.range_array, plan.fn, small, *args)
    return block


def launch_ranges(module, kernel: str, fn: int, ranges: list[tuple[int, int]], range_array: np.ndarray,
                  small: bool, args: tuple, sums: tuple = ()) -> None:
    """launch() with the GEMM and the ranges given (kernels that run outside a scan's plan: weight_grad)."""
    team = team_addresses()
    if team is not None:
        gomp, thread_num, mkl_local = team
        getattr(module, kernel + "_launch")(gomp, entry_address(module, kernel), thread_num, mkl_local,
                                            range_array, fn, small, *args, *sums)
        return
    body, rows = getattr(module, kernel), {r: i for i, r in enumerate(ranges)}
    run_rows(lambda lo, hi: body(fn, small, lo, hi, *args, *(part[rows[(lo, hi)]] for part in sums)),
             ranges, blas=not small)
