"""Scheduling a numba scan: row ranges over threads (torch's OpenMP team or the pool), plans, the loop-GEMM choice."""

from __future__ import annotations

import ctypes

import pytest
import torch

import seqfast

numba = pytest.importorskip("numba")

from numba_cases import compare_with_reference, fresh_plans, make_inputs, run_scan  # noqa: E402, F401 (autouse fixture)

from seqfast.backends.numba import _blas, schedule  # noqa: E402


@pytest.mark.parametrize("runner", ["team", "pool"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_batch_split_over_threads(monkeypatch, reverse: bool, runner: str) -> None:
    """Rows split over threads give the single-thread result: torch's OpenMP team running the kernels' cfunc
    (the default), or a thread pool where torch has no libgomp (the split is on by size; forced on here)."""
    launched = []
    if runner == "team":
        if schedule.team_addresses() is None:
            pytest.skip("this torch has no libgomp: no OpenMP team")
        found = schedule.team_addresses
        monkeypatch.setattr(schedule, "team_addresses", lambda: launched.append(1) or found())
    else:
        monkeypatch.setattr(schedule, "team_addresses", lambda: None)
    _one_thread_equals_three(monkeypatch, "lstm", reverse)
    assert bool(launched) == (runner == "team")  # the scans went through the launcher, or the pool


def _one_thread_equals_three(monkeypatch, cell_name: str, reverse: bool) -> None:
    """A scan (forward and every gradient) on one thread equals the same scan split over three row ranges."""
    cell = seqfast.get_cell(cell_name)
    x, state0, weights, lens = make_inputs(cell, 9, 7, 6, torch.float64, seed=5, lengths=True)
    monkeypatch.setenv("SEQFAST_NUMBA_THREADS", "1")
    one = run_scan(cell, x, state0, weights, lens, reverse, "numba")
    monkeypatch.setenv("SEQFAST_NUMBA_THREADS", "3")
    monkeypatch.setattr(schedule, "MIN_WORK_PER_THREAD", 0)
    schedule.clear_plans()  # plans are memoised: forget any made before the patch
    assert len(schedule.row_ranges(7, 1)) == 3
    three = run_scan(cell, x, state0, weights, lens, reverse, "numba")
    for a, b in zip([one[0], *one[1], *one[2]], [three[0], *three[1], *three[2]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)



def test_ranges_a_smaller_team_leaves_run_on_the_caller(monkeypatch) -> None:
    """Inside a nested parallel region the team may get one thread: the launcher runs the ranges it left."""

    if schedule.team_addresses() is None:
        pytest.skip("this torch has no libgomp: no OpenMP team")
    team = schedule.team_addresses()
    body_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
    def team_of_one(body, data, threads, flags):  # GOMP_parallel as a nested region runs it: thread 0 only
        body_type(body)(data)

    address = ctypes.cast(team_of_one, ctypes.c_void_p).value
    monkeypatch.setattr(schedule, "team_addresses", lambda: team._replace(gomp=address))
    _one_thread_equals_three(monkeypatch, "gru", True)



@pytest.mark.parametrize("hidden", [130, 150])
def test_loop_gemm_matches_mkl(monkeypatch, hidden: int) -> None:
    """The per-step GEMM as a numba loop matches the MKL path, forward and backward: 6 rows (a block of four and
    two left over) and K = 130 or 390 (not a multiple of the loop's eight k-steps). At H = 150 W_hh has over
    65,536 entries, and the forward builds its transpose in bands of 16 rows."""
    if not _blas.SGEMM:
        pytest.skip("this torch has no MKL: every GEMM is the loop")
    cell = seqfast.get_cell("gru")
    x, state0, weights, lens = make_inputs(cell, 5, 6, hidden, torch.float64, seed=9, lengths=True)
    results = []
    for loop in (False, True):
        with schedule.forced_loop_gemm(loop):
            results.append(run_scan(cell, x, state0, weights, lens, True, "numba"))
    mkl, loop = results
    for a, b in zip([mkl[0], *mkl[1], *mkl[2]], [loop[0], *loop[1], *loop[2]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)



def _blas_kernels() -> list[int]:
    """The float32 GEMMs a scan may call here: sgemm_ and MKL's kernels that direct_kernels admitted."""
    return [_blas.SGEMM, *_blas.DIRECT_KERNELS.values()]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_float32_scans_on_mkl_match_reference(monkeypatch, reverse: bool) -> None:
    """float32 LSTM scans whose per-step GEMMs run in MKL on two row ranges match the torch reference, with
    lengths, through each GEMM they may call: MKL's AVX-512 kernel (N,N forward and backward), its AVX2 kernel
    and sgemm_ (T,N forward: W_hh 296 KiB, past the loop's limit against them)."""
    if not _blas.SGEMM:
        pytest.skip("this torch has no MKL: every GEMM is the loop")
    cell = seqfast.get_cell("lstm")
    x, state0, weights, lens = make_inputs(cell, 12, 8, 136, torch.float32, seed=21, lengths=True)
    for kernel in _blas_kernels():
        monkeypatch.setattr(_blas, "SGEMM_KERNEL", kernel)
        schedule.clear_plans()
        plan = schedule.plan("float32", 12, 8, 4 * 136, 136)
        nn = kernel == _blas.DIRECT_KERNELS.get("avx512")
        assert (plan.fn, plan.forward_nn, plan.loop_forward, plan.loop_backward) == (kernel, nn, False, not nn)
        assert len(plan.ranges) == min(2, schedule.num_threads())
        compare_with_reference(cell, x, state0, weights, lens, reverse, torch.float32)



@pytest.mark.parametrize("direct", [True, False], ids=["avx512-kernel", "sgemm_"])
def test_loop_gemm_choices(monkeypatch, direct: bool) -> None:
    """Against sgemm_ the per-step GEMMs run as the loop up to a 256 KiB W_hh in the forward and 4 MiB in the
    backward (LSTM H512); against MKL's AVX-512 kernel, called directly, both run in MKL from two rows a range
    up."""
    if not _blas.SGEMM:
        pytest.skip("this torch has no MKL: every GEMM is the loop")
    if direct and "avx512" not in _blas.DIRECT_KERNELS:
        pytest.skip("MKL's AVX-512 kernel is not called directly on this CPU")
    monkeypatch.setattr(_blas, "SGEMM_KERNEL", _blas.DIRECT_KERNELS["avx512"] if direct else _blas.SGEMM)
    schedule.clear_plans()

    def loops(batch: int, hidden: int) -> tuple[bool, bool]:
        plan = schedule.plan("float32", 50, batch, 4 * hidden, hidden)
        assert (plan.fn, plan.forward_nn) == (_blas.SGEMM_KERNEL, direct)
        return plan.loop_forward, plan.loop_backward

    assert loops(64, 512) == (False, not direct)
    assert loops(64, 1024) == (False, False)
    assert loops(64, 64) == (not direct, not direct)
    assert loops(1, 128) == (True, True)  # one row: a matrix-vector product, where the loop wins



