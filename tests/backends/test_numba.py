"""The numba backend against the torch reference (scan level) and torch.nn (module level), forward and backward."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import seqfast
from seqfast.cells.common import recurrent_term
from seqfast.registry import CellSpec, ParamSpec, Pointwise, Query, Weights

numba = pytest.importorskip("numba")

from seqfast.backends import numba as numba_backend  # noqa: E402
from seqfast.backends.fused import FusedBackend  # noqa: E402
from seqfast.backends.numba import _blas, _math  # noqa: E402

BUILTIN = ("rnn_tanh", "rnn_relu", "lstm", "gru")
TOL = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-10)}


# --- the fast float32 tanh / sigmoid ------------------------------------------------------------------------------
@numba.njit
def _worst_error(which: int, start: int, stop: int, step: int):
    """(max |approx - exact|, its x, NaN mismatches, out-of-range results) over the float32 bit patterns
    start, start + step, ... < stop (exact: float64 libm)."""
    word = np.empty(1, dtype=np.uint32)
    floats = word.view(np.float32)
    worst, worst_x, nan_bad, out_of_range = 0.0, 0.0, 0, 0
    for i in range(start, stop, step):
        word[0] = i
        x = floats[0]
        if which == 0:
            y = _math.tanh_f32(x)
            exact = math.tanh(np.float64(x))
            bad_range = abs(y) > 1.0
        else:
            y = _math.sigmoid_f32(x)
            exact = 1.0 / (1.0 + math.exp(-np.float64(x)))
            bad_range = y < 0.0 or y > 1.0
        if x != x:
            nan_bad += y == y
            continue
        out_of_range += bad_range
        err = abs(np.float64(y) - exact)
        if err > worst:
            worst, worst_x = err, x
    return worst, worst_x, nan_bad, out_of_range


@pytest.mark.parametrize("which", ["tanh", "sigmoid"])
def test_fast_math_whole_float32_range(which: str) -> None:
    """Every 257th float32 bit pattern (every sign and exponent, ~17M inputs incl. infs and NaNs) and every 31st in
    [-16, 16] (~70M): the documented worst-case error holds, results stay in range, NaN propagates. (Every input,
    2**32 of them, was checked once when the bounds were measured; that takes minutes.)"""
    index = 0 if which == "tanh" else 1
    bound = _math.TANH_F32_MAX_ABS_ERROR if which == "tanh" else _math.SIGMOID_F32_MAX_ABS_ERROR
    worst, x, nan_bad, out_of_range = _worst_error(index, 0, 2**32, 257)
    assert nan_bad == 0 and out_of_range == 0
    assert worst <= bound, f"{which}: error {worst:.3g} at x={x} exceeds the documented {bound:.3g}"
    for lo, hi in ((0x00000000, 0x41800000), (0x80000000, 0xC1800000)):  # [0, 16] and [-16, -0]
        worst, x, nan_bad, out_of_range = _worst_error(index, lo, hi, 31)
        assert worst <= bound and nan_bad == 0 and out_of_range == 0, (which, worst, x)


def test_fast_math_specials() -> None:
    specials = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 3.4e38, -3.4e38, 1e-45, -1e-45, 88.0, -104.0],
                        dtype=np.float32)

    @numba.njit
    def apply(xs):
        out = np.empty((2, xs.shape[0]), dtype=np.float32)
        for i in range(xs.shape[0]):
            out[0, i] = _math.tanh_f32(xs[i])
            out[1, i] = _math.sigmoid_f32(xs[i])
        return out

    got = apply(specials)
    ref = torch.from_numpy(specials)
    torch.testing.assert_close(torch.from_numpy(got[0]), torch.tanh(ref), atol=5e-7, rtol=0, equal_nan=True)
    torch.testing.assert_close(torch.from_numpy(got[1]), torch.sigmoid(ref), atol=3e-7, rtol=0, equal_nan=True)
    assert got[0, 0] == 1.0 and got[0, 1] == -1.0  # saturates to exactly +-1 at inf


# --- scan level: numba vs the torch reference ----------------------------------------------------------------------
def _inputs(cell: CellSpec, steps: int, batch: int, hidden: int, dtype: torch.dtype, seed: int, bias: bool = True,
            lengths: bool = False):
    gen = torch.Generator().manual_seed(seed)
    g = cell.num_gates

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()

    x = rand(steps, batch, g * hidden)
    state0 = tuple(rand(batch, hidden, scale=0.5) for _ in cell.state_names)
    weights = Weights(weight_hh=None, bias_hh=None)
    if cell.recurrence == "dense":
        weights["weight_hh"] = rand(g * hidden, hidden, scale=1 / math.sqrt(hidden))
    elif cell.recurrence == "diagonal":
        weights["weight_hh"] = rand(g * hidden, scale=0.5)
    if bias and cell.recurrence != "none":
        weights["bias_hh"] = rand(g * hidden, scale=0.3)
    for p in cell.extra_params:
        if p.recurrent:
            weights[p.name] = rand(*p.shape(hidden, 0), scale=0.5)
    lens = None
    if lengths:
        lens = torch.randint(1, steps + 1, (batch,), generator=gen)
        lens[0] = steps
    return x, state0, weights, lens


def _run(cell, x, state0, weights, lengths, reverse, backend):
    out, final = seqfast.scan(cell, x, state0, weights, lengths, reverse, backend=backend)
    gen = torch.Generator().manual_seed(123)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    loss = loss + sum(((i + 2.0) * f).sum() for i, f in enumerate(final))
    leaves = [x, *state0, *(w for w in weights.values() if w is not None)]
    grads = torch.autograd.grad(loss, leaves)
    return out, final, grads


def _compare(cell, x, state0, weights, lengths, reverse, dtype):
    ref = _run(cell, x, state0, weights, lengths, reverse, "torch")
    got = _run(cell, x, state0, weights, lengths, reverse, "numba")
    names = ["x_proj", *(f"state0.{s}" for s in cell.state_names), *(n for n, w in weights.items() if w is not None)]
    torch.testing.assert_close(got[0], ref[0], **TOL[dtype], msg=lambda m: f"outputs: {m}")
    for name, a, b in zip(cell.state_names, got[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"final {name}: {m}")
    for name, a, b in zip(names, got[2], ref[2], strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"grad {name}: {m}")
    if lengths is not None:  # outputs past each sequence's length are exactly zero
        steps = torch.arange(x.shape[0]).unsqueeze(1)
        assert torch.all(got[0][steps >= lengths.unsqueeze(0)] == 0)


SCAN_CASES = [
    # (T, B, H, reverse, lengths, dtype)
    (7, 3, 5, False, False, torch.float32),
    (7, 3, 5, True, True, torch.float32),
    (11, 4, 130, False, True, torch.float32),  # H > one 128-unit chunk, odd remainder
    (5, 1, 1, True, False, torch.float32),
    (6, 5, 9, True, True, torch.float64),
    (4, 2, 3, False, False, torch.float64),
]


def _case_id(case) -> str:
    steps, batch, hidden, reverse, lengths, dtype = case
    return (f"T{steps}-B{batch}-H{hidden}" + ("-rev" if reverse else "") + ("-len" if lengths else "")
            + ("-f32" if dtype == torch.float32 else "-f64"))


@pytest.mark.parametrize("case", SCAN_CASES, ids=_case_id)
@pytest.mark.parametrize("cell_name", BUILTIN)
def test_scan_matches_reference(cell_name: str, case) -> None:
    steps, batch, hidden, reverse, lengths, dtype = case
    cell = seqfast.get_cell(cell_name)
    x, state0, weights, lens = _inputs(cell, steps, batch, hidden, dtype, seed=hash(case) % 1000, lengths=lengths)
    _compare(cell, x, state0, weights, lens, reverse, dtype)


@pytest.mark.parametrize("cell_name", ["lstm", "gru"])
def test_scan_without_bias(cell_name: str) -> None:
    cell = seqfast.get_cell(cell_name)
    x, state0, weights, lens = _inputs(cell, 6, 3, 4, torch.float64, seed=3, bias=False, lengths=True)
    _compare(cell, x, state0, weights, lens, True, torch.float64)


@pytest.mark.parametrize("runner", ["team", "pool"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_batch_split_over_threads(monkeypatch, reverse: bool, runner: str) -> None:
    """Rows split over threads give the single-thread result: torch's OpenMP team running the kernels' cfunc
    (the default), or a thread pool where torch has no libgomp (the split is on by size; forced on here)."""
    launched = []
    if runner == "team":
        if numba_backend._team_addresses() is None:
            pytest.skip("this torch has no libgomp: no OpenMP team")
        found = numba_backend._team_addresses
        monkeypatch.setattr(numba_backend, "_team_addresses", lambda: launched.append(1) or found())
    else:
        monkeypatch.setattr(numba_backend, "_team_addresses", lambda: None)
    _one_thread_equals_three(monkeypatch, "lstm", reverse)
    assert bool(launched) == (runner == "team")  # the scans went through the launcher, or the pool


def _one_thread_equals_three(monkeypatch, cell_name: str, reverse: bool) -> None:
    """A scan (forward and every gradient) on one thread equals the same scan split over three row ranges."""
    cell = seqfast.get_cell(cell_name)
    x, state0, weights, lens = _inputs(cell, 9, 7, 6, torch.float64, seed=5, lengths=True)
    monkeypatch.setenv("SEQFAST_NUMBA_THREADS", "1")
    one = _run(cell, x, state0, weights, lens, reverse, "numba")
    monkeypatch.setenv("SEQFAST_NUMBA_THREADS", "3")
    monkeypatch.setattr(numba_backend, "MIN_WORK_PER_THREAD", 0)
    monkeypatch.setattr(numba_backend, "_plans", {})  # plans are memoised: forget any made before the patch
    assert len(numba_backend._row_ranges(7, 1)) == 3
    three = _run(cell, x, state0, weights, lens, reverse, "numba")
    for a, b in zip([one[0], *one[1], *one[2]], [three[0], *three[1], *three[2]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
def test_buffers_several_threads_write_start_on_a_cache_line(monkeypatch, threads: int) -> None:
    """Outputs, final states and saved tensors that two threads write row by row start on a 64-byte line (so no
    line straddles two threads' rows); with one thread they may come from numpy. Either way they are separate,
    writable tensors holding the scan's results."""
    monkeypatch.setenv("SEQFAST_NUMBA_THREADS", str(threads))
    monkeypatch.setattr(numba_backend, "MIN_WORK_PER_THREAD", 0)
    monkeypatch.setattr(numba_backend, "_plans", {})
    backend = seqfast.registry.get_backend("numba")
    cell = seqfast.get_cell("lstm")
    x, state0, weights, _ = _inputs(cell, 5, 6, 3, torch.float32, seed=2)
    wlist = [weights["weight_hh"], weights["bias_hh"]]
    out, final, saved = backend.forward(cell, x, list(state0), wlist, None, False, True)
    made = [out, *final, *saved]
    if threads == 2:
        assert all(t.data_ptr() % 64 == 0 for t in made)
    assert len({t.data_ptr() for t in made}) == len(made)
    ref_out, ref_final = seqfast.get_backend("torch").scan(cell, x, state0, weights, None, False)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(final, ref_final, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_x, g_state, _ = backend.backward(cell, x, list(state0), wlist, None, False, out, final, saved,
                                       torch.ones_like(out), [None, None])
    if threads == 2:
        assert all(g.data_ptr() % 64 == 0 for g in [g_x, *g_state])
    final[0].add_(1.0)  # a result may be changed in place like any tensor
    torch.testing.assert_close(final[0], ref_final[0] + 1.0, rtol=1e-5, atol=1e-5)


def test_ranges_a_smaller_team_leaves_run_on_the_caller(monkeypatch) -> None:
    """Inside a nested parallel region the team may get one thread: the launcher runs the ranges it left."""
    import ctypes

    if numba_backend._team_addresses() is None:
        pytest.skip("this torch has no libgomp: no OpenMP team")
    gomp, thread_num, mkl_local = numba_backend._team_addresses()
    body_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
    def team_of_one(body, data, threads, flags):  # GOMP_parallel as a nested region runs it: thread 0 only
        body_type(body)(data)

    address = ctypes.cast(team_of_one, ctypes.c_void_p).value
    monkeypatch.setattr(numba_backend, "_team_addresses", lambda: (address, thread_num, mkl_local))
    _one_thread_equals_three(monkeypatch, "gru", True)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "mm"])
def test_input_projection_matches_mm(monkeypatch, onednn: bool) -> None:
    """The projection of a large layer (oneDNN's linear where torch has it, else a pooled mm) is x W_ih^T."""
    backend = seqfast.registry.get_backend("numba")
    linear = numba_backend._onednn_linear()
    if onednn and linear is None:
        pytest.skip("this torch has no oneDNN linear")
    calls = []
    monkeypatch.setattr(numba_backend, "_linear_op",
                        [(lambda *args: calls.append(1) or linear(*args)) if onednn else None])
    x, weight = torch.randn(2048, 24), torch.randn(520, 24)  # over a million outputs
    torch.testing.assert_close(backend.project(x, weight), x.double().mm(weight.double().t()).float(),
                               rtol=1e-5, atol=1e-5)
    assert len(calls) == (1 if onednn else 0)  # the path named is the one taken


@pytest.mark.parametrize("hidden", [130, 150])
def test_loop_gemm_matches_mkl(monkeypatch, hidden: int) -> None:
    """The per-step GEMM as a numba loop matches the MKL path, forward and backward: 6 rows (a block of four and
    two left over) and K = 130 or 390 (not a multiple of the loop's eight k-steps). At H = 150 W_hh has over
    65,536 entries, and the forward builds its transpose in bands of 16 rows."""
    if not _blas.SGEMM:
        pytest.skip("this torch has no MKL: every GEMM is the loop")
    cell = seqfast.get_cell("gru")
    x, state0, weights, lens = _inputs(cell, 5, 6, hidden, torch.float64, seed=9, lengths=True)
    results = []
    for loop in (False, True):
        monkeypatch.setattr(numba_backend, "_use_loop_gemm", lambda *args, loop=loop: loop)
        monkeypatch.setattr(numba_backend, "_plans", {})
        results.append(_run(cell, x, state0, weights, lens, True, "numba"))
    mkl, loop = results
    for a, b in zip([mkl[0], *mkl[1], *mkl[2]], [loop[0], *loop[1], *loop[2]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gemm_check_tells_a_wrong_routine() -> None:
    """The exact-product check that admits MKL's kernels accepts sgemm_ and rejects routines that leave C alone or
    ignore beta (both called like sgemm_, on the check's own float32 buffers)."""
    if not _blas.SGEMM:
        pytest.skip("this torch has no MKL")
    signature = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 13)
    assert _blas._ctypes_gemm_agrees(signature(_blas.SGEMM))
    assert not _blas._ctypes_gemm_agrees(signature(lambda *args: None))
    sgemm = signature(_blas.SGEMM)
    zero = ctypes.c_float(0.0)

    def beta_ignored(*args):
        sgemm(*args[:10], ctypes.addressof(zero), *args[11:])

    assert not _blas._ctypes_gemm_agrees(signature(beta_ignored))


def test_direct_kernels_follow_cpu_and_switch(monkeypatch) -> None:
    """MKL's AVX-512 and AVX2 kernels are called directly only where the CPU has their instructions, never on
    Intel (sgemm_'s own dispatch picks them there), and not with SEQFAST_NUMBA_MKL_KERNELS=0."""
    if not _blas.SGEMM:
        pytest.skip("this torch has no MKL")
    avx512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"}
    monkeypatch.setattr(_blas, "_cpu", lambda: ("AuthenticAMD", avx512))
    found = _blas._direct_kernels()
    if set(found) != {"avx512", "avx2"}:
        pytest.skip("this torch's MKL exports no AVX2 / AVX-512 kernel")
    assert found["avx512"] != found["avx2"] and _blas.SGEMM not in found.values()
    monkeypatch.setattr(_blas, "_cpu", lambda: ("AuthenticAMD", {"avx2", "fma"}))
    assert _blas._direct_kernels() == {"avx2": found["avx2"]}
    monkeypatch.setattr(_blas, "_cpu", lambda: ("AuthenticAMD", {"sse4_2"}))
    assert _blas._direct_kernels() == {}
    monkeypatch.setattr(_blas, "_cpu", lambda: ("GenuineIntel", avx512))
    assert _blas._direct_kernels() == {}
    monkeypatch.setattr(_blas, "_cpu", lambda: ("AuthenticAMD", avx512))
    monkeypatch.setenv("SEQFAST_NUMBA_MKL_KERNELS", "0")
    assert _blas._direct_kernels() == {}


def _blas_kernels() -> list[int]:
    """The float32 GEMMs a scan may call here: sgemm_ and MKL's kernels that _direct_kernels admitted."""
    return [_blas.SGEMM, *_blas._DIRECT.values()]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_float32_scans_on_mkl_match_reference(monkeypatch, reverse: bool) -> None:
    """float32 LSTM scans whose per-step GEMMs run in MKL on two row ranges match the torch reference, with
    lengths, through each GEMM they may call: MKL's AVX-512 kernel (N,N forward and backward), its AVX2 kernel
    and sgemm_ (T,N forward: W_hh 296 KiB, past the loop's limit against them)."""
    if not _blas.SGEMM:
        pytest.skip("this torch has no MKL: every GEMM is the loop")
    cell = seqfast.get_cell("lstm")
    x, state0, weights, lens = _inputs(cell, 12, 8, 136, torch.float32, seed=21, lengths=True)
    for kernel in _blas_kernels():
        monkeypatch.setattr(_blas, "SGEMM_KERNEL", kernel)
        monkeypatch.setattr(numba_backend, "_plans", {})
        plan = numba_backend._plan("float32", 12, 8, 4 * 136, 136)
        nn = kernel == _blas._DIRECT.get("avx512")
        assert (plan.fn, plan.forward_nn, plan.loop_forward, plan.loop_backward) == (kernel, nn, False, not nn)
        assert len(plan.ranges) == min(2, numba_backend.num_threads())
        _compare(cell, x, state0, weights, lens, reverse, torch.float32)


def test_weight_gradient_on_the_team_matches_mm(monkeypatch) -> None:
    """a^T @ x split by rows of the result over the thread team (MKL's own kernel, one weight_grad module per
    dtype) matches torch's mm, with row counts that are not a multiple of the split's 16, and the module's weight
    gradients (d_W_ih through project_backward, d_W_hh through the backward) match torch.nn's where it is taken."""
    if _blas.SGEMM_KERNEL == _blas.SGEMM or numba_backend.num_threads() < 2:
        pytest.skip("needs MKL's own kernel and two threads")
    taken = []
    real = numba_backend._launch_ranges
    monkeypatch.setattr(numba_backend, "_launch_ranges",
                        lambda m, kernel, *a: (taken.append(kernel), real(m, kernel, *a))[1])
    gen = torch.Generator().manual_seed(5)
    for k, m, n in [(700, 520, 64), (96, 33, 300), (4096, 256, 40)]:
        a, x = torch.randn(k, m, generator=gen), torch.randn(k, n, generator=gen)
        got = numba_backend._weight_gradient(a, x)
        torch.testing.assert_close(got, a.double().t().mm(x.double()).float(), rtol=1e-4, atol=1e-4)
    assert taken == ["weight_grad"] * 3
    monkeypatch.setattr(numba_backend, "num_threads", lambda: 4)  # 40 rows: two ranges of 16+, never an empty one
    for k, m, n in [(9000, 40, 64), (700, 520, 64)]:
        a, x = torch.randn(k, m, generator=gen), torch.randn(k, n, generator=gen)
        got = numba_backend._weight_gradient(a, x)
        torch.testing.assert_close(got, a.double().t().mm(x.double()).float(), rtol=1e-4, atol=1e-4)
    assert numba_backend._output_ranges[(40, 4)][0] == [(0, 16), (16, 40)]
    monkeypatch.undo()
    monkeypatch.setattr(numba_backend, "_launch_ranges",
                        lambda m, kernel, *a: (taken.append(kernel), real(m, kernel, *a))[1])
    taken.clear()
    ref = torch.nn.LSTM(48, 64)
    ours = seqfast.LSTM(48, 64, backend="numba")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(16, 8, 48, generator=gen)
    for model in (ref, ours):
        out, _ = model(x)
        (out * torch.linspace(-1, 1, 64)).sum().backward()
    assert taken.count("weight_grad") == 2  # d_W_hh and d_W_ih
    # one weight_grad module per dtype, not a copy in every cell's module
    assert not hasattr(numba_backend.kernels(seqfast.get_cell("lstm"), "float32"), "weight_grad")
    for (name, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    small = torch.randn(10, 8), torch.randn(10, 4)  # below SMALL_TORCH_GEMM: torch's mm, on one MKL thread
    torch.testing.assert_close(numba_backend._weight_gradient(*small), small[0].t().mm(small[1]))
    assert taken.count("weight_grad") == 2


@pytest.mark.parametrize("direct", [True, False], ids=["avx512-kernel", "sgemm_"])
def test_loop_gemm_choices(monkeypatch, direct: bool) -> None:
    """Against sgemm_ the per-step GEMMs run as the loop up to a 256 KiB W_hh in the forward and 4 MiB in the
    backward (LSTM H512); against MKL's AVX-512 kernel, called directly, both run in MKL from two rows a range
    up."""
    if not _blas.SGEMM:
        pytest.skip("this torch has no MKL: every GEMM is the loop")
    if direct and "avx512" not in _blas._DIRECT:
        pytest.skip("MKL's AVX-512 kernel is not called directly on this CPU")
    monkeypatch.setattr(_blas, "SGEMM_KERNEL", _blas._DIRECT["avx512"] if direct else _blas.SGEMM)
    monkeypatch.setattr(numba_backend, "_plans", {})

    def loops(batch: int, hidden: int) -> tuple[bool, bool]:
        plan = numba_backend._plan("float32", 50, batch, 4 * hidden, hidden)
        assert (plan.fn, plan.forward_nn) == (_blas.SGEMM_KERNEL, direct)
        return plan.loop_forward, plan.loop_backward

    assert loops(64, 512) == (False, not direct)
    assert loops(64, 1024) == (False, False)
    assert loops(64, 64) == (not direct, not direct)
    assert loops(1, 128) == (True, True)  # one row: a matrix-vector product, where the loop wins


@numba.njit
def _blocked(a, b, c):
    _blas.loop_nn_acc(a, b, c)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_loop_gemm_blocks_and_leftovers(dtype) -> None:
    """The blocked loop GEMM (four rows, eight k-steps) against a float64 product, at shapes with leftover rows and
    k-steps, a lone row, and widths that are not a multiple of the vector length."""
    rng = np.random.default_rng(0)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for m, k, n in [(1, 8, 5), (3, 7, 33), (4, 16, 17), (6, 17, 64), (9, 40, 3), (5, 3, 128)]:
        a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
        c0 = rng.standard_normal((m, n)).astype(dtype)
        got = c0.copy()
        _blocked(a, b, got)
        expected = c0.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * k, err_msg=str((m, k, n)))


def test_inference_fast_path_matches_op() -> None:
    cell = seqfast.get_cell("lstm")
    x, state0, weights, lens = _inputs(cell, 6, 3, 4, torch.float32, seed=4, lengths=True)
    with torch.no_grad():
        direct = seqfast.scan(cell, x, state0, weights, lens, True, backend="numba")
    via_op = seqfast.scan(cell, x, state0, weights, lens, True, backend="numba")
    assert via_op[0].grad_fn is not None
    torch.testing.assert_close(direct[0], via_op[0].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_layer_projection_takes_its_gradient_only_when_the_graph_is_freed(monkeypatch, bidirectional: bool) -> None:
    """In a module's layer (FusedBackend.layer) d_x_proj is written over the layer's own x_proj once the graph is
    freed (GRU reads x_proj in its backward), never while it is retained: every pass gives torch.nn's gradients."""
    seen: list[tuple[str, bool]] = []
    real = numba_backend.NumbaBackend.backward

    def spy(self, cell, x_proj, *args, **kwargs):
        result = real(self, cell, x_proj, *args, **kwargs)
        seen.append((kwargs.get("x_proj_mode", "keep"), result[0].data_ptr() == x_proj.data_ptr()))
        return result

    monkeypatch.setattr(numba_backend.NumbaBackend, "backward", spy)
    torch.manual_seed(0)
    ref = torch.nn.GRU(5, 7, num_layers=2, bidirectional=bidirectional)
    ours = seqfast.GRU(5, 7, num_layers=2, bidirectional=bidirectional, backend="numba")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 5, requires_grad=True)
    weight = torch.linspace(-1, 1, 6 * 3 * 7 * (2 if bidirectional else 1))

    def grads(model, passes):
        out, _ = model(x)
        loss = (out.flatten() * weight).sum()
        return [torch.autograd.grad(loss, [x, *model.parameters()], retain_graph=i < passes - 1)
                for i in range(passes)]

    first, second, last = grads(ours, 3)
    layers = 2 * (2 if bidirectional else 1)
    assert seen == [("keep", False)] * 2 * layers + [("consume", True)] * layers
    expected = grads(ref, 1)[0]
    for a, b, c, e in zip(first, second, last, expected, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
        torch.testing.assert_close(a, e, **TOL[torch.float32])


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_saved_products_are_scratch_only_when_the_graph_is_freed(monkeypatch, reverse: bool) -> None:
    """The backward reuses the forward's saved h W_hh^T as its gradient buffer, except when the graph is retained
    for another backward: then every pass gives the same gradients, equal to the reference's."""
    cell = seqfast.get_cell("gru")
    modes: list[str] = []
    real = numba_backend.NumbaBackend.backward

    def spy(self, *args, saved_mode="keep"):
        modes.append(saved_mode)
        return real(self, *args, saved_mode=saved_mode)

    monkeypatch.setattr(numba_backend.NumbaBackend, "backward", spy)
    x, state0, weights, lens = _inputs(cell, 5, 4, 6, torch.float32, seed=3, lengths=True)
    leaves = [x, *state0, *(w for w in weights.values() if w is not None)]
    out, final = seqfast.scan(cell, x, state0, weights, lens, reverse, backend="numba")
    loss = (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum() + final[0].sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves, retain_graph=True)
    last = torch.autograd.grad(loss, leaves)
    assert modes == ["keep", "keep", "consume"]
    out_r, final_r = seqfast.scan(cell, x, state0, weights, lens, reverse, backend="torch")
    expected = torch.autograd.grad((out_r * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
                                   + final_r[0].sum(), leaves)
    for a, b, c, e in zip(first, second, last, expected, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
        torch.testing.assert_close(a, e, **TOL[torch.float32])


@pytest.mark.parametrize("cell_name", BUILTIN)
def test_gradcheck_float64(cell_name: str) -> None:
    cell = seqfast.get_cell(cell_name)
    x, state0, weights, lens = _inputs(cell, 4, 3, 3, torch.float64, seed=11, lengths=True)
    names = [n for n, w in weights.items() if w is not None]

    def fn(x, *rest):
        st, ws = rest[: cell.num_states], rest[cell.num_states :]
        out, final = seqfast.scan(cell, x, tuple(st), dict(zip(names, ws, strict=True)), lens, True, backend="numba")
        return (out, *final)

    assert torch.autograd.gradcheck(fn, (x, *state0, *(weights[n] for n in names)), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("cell_name", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_nan_and_inf_propagate_like_torch(cell_name: str) -> None:
    cell = seqfast.get_cell(cell_name)
    x, state0, weights, _ = _inputs(cell, 6, 4, 5, torch.float32, seed=7)
    x = x.detach().clone()
    x[1, 0, 0] = float("nan")  # row 0 turns NaN from step 1 on, through the recurrence
    x[2, 1, :] = float("inf")  # saturating inputs: no NaN from the fast tanh/sigmoid
    x[3, 2, :] = -float("inf")
    x[4, 3, :] = 1e30
    ref, ref_final = seqfast.scan(cell, x, state0, weights, None, False, backend="torch")
    got, got_final = seqfast.scan(cell, x, state0, weights, None, False, backend="numba")
    torch.testing.assert_close(got, ref, **TOL[torch.float32], equal_nan=True)
    for a, b in zip(got_final, ref_final, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32], equal_nan=True)
    assert torch.isnan(got[:, 0]).any()


# --- a plugin-style cell compiled through the same generator -------------------------------------------------------
LEAK = 0.25  # a module-level constant read by the pointwise code: inlined by the generator


def _leaky_step(x_t, state, w):
    (h,) = state
    a = x_t + recurrent_term(h, w, 1, "diagonal")
    return (torch.tanh(a) * w["gain"] + LEAK * h,)


def _leaky_forward(m, xg, hg, state, params):
    return (m.tanh(xg[0] + hg[0]) * params[0] + LEAK * state[0],)


def _leaky_backward(m, xg, hg, state, params, d_new):
    t = m.tanh(xg[0] + hg[0])
    da = d_new[0] * params[0] * (1 - t * t)
    return (da,), (da,), (LEAK * d_new[0],), (d_new[0] * t,)


LEAKY = CellSpec(
    name="test_numba_leaky",
    num_gates=1,
    state_names=("h",),
    reference_step=_leaky_step,
    recurrence="diagonal",
    extra_params=(ParamSpec("gain", lambda hidden, proj: (hidden,)),),
    pointwise=Pointwise(_leaky_forward, _leaky_backward, params=("gain",)),
)


@pytest.fixture
def leaky_cell():
    seqfast.register_cell(LEAKY, replace=True)
    yield LEAKY
    seqfast.registry.cells.pop(LEAKY.name, None)


@pytest.mark.parametrize("threads", [1, 3], ids=["1thread", "3threads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_plugin_cell_diagonal_with_param(monkeypatch, leaky_cell, dtype, threads: int) -> None:
    """A diagonal recurrence with a per-unit parameter; on three threads its gradient is summed per row range."""
    monkeypatch.setenv("SEQFAST_NUMBA_THREADS", str(threads))
    monkeypatch.setattr(numba_backend, "MIN_WORK_PER_THREAD", 0)
    monkeypatch.setattr(numba_backend, "_plans", {})
    assert len(numba_backend._row_ranges(6, 1)) == threads
    x, state0, weights, lens = _inputs(leaky_cell, 8, 6, 6, dtype, seed=2, lengths=True)
    _compare(leaky_cell, x, state0, weights, lens, True, dtype)


def _leaky_backward_rebuilt(m, xg, hg, state, params, d_new):
    t = m.tanh(xg[0] + hg[0])
    da = d_new[0] * params[0] * (1 - t * t)
    return (da,), (da * 1.0,), (LEAK * d_new[0],), (d_new[0] * t,)  # equal values, not one expression


def test_shared_pre_activation_gradient_is_read_from_the_source(leaky_cell) -> None:
    """d_x is written once (and is the d_hg buffer) only where the source returns one expression for both."""
    from seqfast.backends.numba.codegen import dx_is_dhg

    assert [dx_is_dhg(seqfast.get_cell(n)) for n in ("lstm", "rnn_tanh", "rnn_relu", "gru")] == [True] * 3 + [False]
    assert dx_is_dhg(leaky_cell)
    other = dataclasses.replace(leaky_cell, name="test_numba_leaky_rebuilt",
                                pointwise=Pointwise(_leaky_forward, _leaky_backward_rebuilt, params=("gain",)))
    assert not dx_is_dhg(other)
    x, state0, weights, lens = _inputs(leaky_cell, 7, 3, 5, torch.float32, seed=5, lengths=True)
    for cell in (leaky_cell, other):  # both ways give the reference's gradients, forward and reversed
        for reverse in (False, True):
            _compare(cell, x, state0, weights, lens, reverse, torch.float32)


def _leaky_forward_apart(m, xg, hg, state, params):
    return (state[0] * LEAK + params[0] * m.tanh(xg[0] + 0.5 * hg[0]),)  # hg scaled on its own


def test_saved_pre_activation_only_where_the_source_adds_xg_and_hg() -> None:
    """A training forward saves xg + hg (biases in) instead of h W_hh^T only for cells whose code reads them as
    that sum, with a dense recurrence; the backward then never reads x_proj. Both ways match the reference."""
    from seqfast.backends.numba.codegen import preactivation_only

    names = ("lstm", "rnn_tanh", "rnn_relu", "gru")
    assert [preactivation_only(seqfast.get_cell(n)) for n in names] == [True, True, True, False]
    backend = seqfast.registry.get_backend("numba")
    assert not backend.backward_reads_x_proj(seqfast.get_cell("lstm"))
    assert backend.backward_reads_x_proj(seqfast.get_cell("gru"))
    dense = dataclasses.replace(LEAKY, name="test_numba_leaky_dense", recurrence="dense")
    apart = dataclasses.replace(dense, name="test_numba_leaky_apart",
                                pointwise=Pointwise(_leaky_forward_apart, _leaky_backward, params=("gain",)))
    assert preactivation_only(dense) and not preactivation_only(apart)
    assert not preactivation_only(LEAKY)  # diagonal: no saved product to replace


def test_uncompilable_cell_gets_a_reason() -> None:
    def fwd(m, xg, hg, state, params):
        return (m.erf(xg[0] + hg[0]),)

    cell = CellSpec(name="test_numba_bad", num_gates=1, state_names=("h",),
                    reference_step=lambda x, s, w: (x + recurrent_term(s[0], w, 1, "dense"),),
                    pointwise=Pointwise(fwd))
    reasons = seqfast.get_backend("numba").not_supported_reasons(Query(cell))
    assert any("m.erf" in r for r in reasons), reasons


def test_reasons_for_unsupported_queries() -> None:
    backend = seqfast.get_backend("numba")
    lstm = seqfast.get_cell("lstm")
    assert any("proj_size" in r for r in backend.not_supported_reasons(Query(lstm, proj_size=3)))
    assert any("device" in r for r in backend.not_supported_reasons(Query(lstm, device="cuda")))
    assert any("float16" in r for r in backend.not_supported_reasons(Query(lstm, dtype=torch.float16)))
    assert backend.not_supported_reasons(Query(lstm, requires_grad=True)) == []
    with pytest.raises(seqfast.BackendNotSupportedError, match="proj_size"):
        seqfast.LSTM(4, 6, proj_size=3, backend="numba")(torch.randn(3, 2, 4))


def test_static_rule_takes_numba_only_where_torch_nn_has_no_fused_kernel() -> None:
    """Without calibration (tests/conftest.py turns it off), numba takes the cells torch.nn runs as per-step ops,
    and LSTM, whose oneDNN kernel may be faster depending on shape and CPU, stays on native."""
    pick = seqfast.current_backend
    assert pick("gru", batch_size=1, hidden_size=32, seq_len=100, requires_grad=True) == "numba"
    assert pick("rnn_tanh", batch_size=64, hidden_size=512, seq_len=50) == "numba"
    assert pick("gru", batch_size=64, hidden_size=512, seq_len=50, requires_grad=True) == "numba"
    assert pick("peephole_lstm", batch_size=8, hidden_size=64, seq_len=100) == "numba"
    for batch, hidden, grad in [(64, 512, True), (1, 32, True), (8, 64, False), (1, 80, True), (256, 512, False)]:
        assert pick("lstm", batch_size=batch, hidden_size=hidden, seq_len=100, requires_grad=grad) == "native"


def test_numba_missing_is_a_reason(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else real(name, *a))
    monkeypatch.setattr(numba_backend, "_availability", {})
    try:
        backend = seqfast.get_backend("numba")
        assert backend.unavailable_reason() == "numba not installed (pip install 'seqfast[numba]')"
        assert "numba" not in seqfast.available_backends()
        assert seqfast.current_backend("lstm") != "numba"
    finally:
        monkeypatch.undo()


# --- module level: seqfast.<Cell>(backend="numba") vs torch.nn -----------------------------------------------------
MODULES = [
    ("LSTM", {}),
    ("GRU", {}),
    ("RNN", {"nonlinearity": "tanh"}),
    ("RNN", {"nonlinearity": "relu"}),
]


@pytest.mark.parametrize("name,kwargs", MODULES, ids=["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_module_matches_torch_nn_packed_bidirectional(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(5, 7, num_layers=2, bidirectional=True, **kwargs).double()
    mod = getattr(seqfast, name)(5, 7, num_layers=2, bidirectional=True, backend="numba", **kwargs).double()
    mod.load_state_dict(ref.state_dict())
    lengths = torch.tensor([4, 9, 2, 6])  # unsorted
    x = torch.randn(9, 4, 5, dtype=torch.float64)
    outs, grads = [], []
    for model in (ref, mod):
        xi = x.clone().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(xi, lengths, enforce_sorted=False)
        out, hidden = model(packed)
        padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out)
        finals = hidden if isinstance(hidden, tuple) else (hidden,)
        loss = (padded * torch.linspace(-1, 1, padded.numel(), dtype=padded.dtype).view_as(padded)).sum()
        loss = loss + sum((f * 1.5).sum() for f in finals)
        loss.backward()
        outs.append((padded.detach(), [f.detach() for f in finals]))
        grads.append([xi.grad, *(p.grad for p in model.parameters())])
    torch.testing.assert_close(outs[1][0], outs[0][0])
    for a, b in zip(outs[1][1], outs[0][1], strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,kwargs", MODULES, ids=["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_module_gradcheck_float64(name: str, kwargs: dict) -> None:
    """gradcheck through a module: the layer path (the projection's bias added and its gradient summed in the
    kernels, d_W_ih and d_x formed from the kernels' d_x_proj), both directions, lengths, given initial states."""
    torch.manual_seed(3)
    mod = getattr(seqfast, name)(3, 3, bidirectional=True, backend="numba", **kwargs).double()
    params = list(mod.parameters())
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True) for _ in mod.cell.state_names]
    lengths = torch.tensor([4, 3])

    def fn(x, *leaves):
        hx = leaves[: len(states)]
        out, hidden = torch.func.functional_call(mod, dict(zip([n for n, _ in mod.named_parameters()],
                                                               leaves[len(states):], strict=True)),
                                                 (x, hx if len(hx) > 1 else hx[0]), {"lengths": lengths})
        return (out, *(hidden if isinstance(hidden, tuple) else (hidden,)))

    assert torch.autograd.gradcheck(fn, (x, *states, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_module_partial_gradients_match_torch_nn(bias: bool) -> None:
    """Frozen input weights, an input without grad and only the final state used (the outputs get no gradient):
    each gradient the layer path skips or forms must still match torch.nn's."""
    torch.manual_seed(4)
    ref = torch.nn.GRU(5, 6, num_layers=2, bias=bias).double()
    mod = seqfast.GRU(5, 6, num_layers=2, bias=bias, backend="numba").double()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    grads = []
    for model in (ref, mod):
        model.weight_ih_l0.requires_grad_(False)
        _, h = model(x)
        (h * torch.arange(1.0, h.numel() + 1, dtype=h.dtype).view_as(h)).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[1]["weight_ih_l0"] is None and grads[0]["weight_ih_l0"] is None
    for n, g in grads[0].items():
        if g is not None:
            torch.testing.assert_close(grads[1][n], g, rtol=1e-9, atol=1e-10, msg=n)


def test_module_float32_dropout_batch_first_trains() -> None:
    torch.manual_seed(1)
    ref = torch.nn.LSTM(6, 8, num_layers=2, batch_first=True)
    mod = seqfast.LSTM(6, 8, num_layers=2, batch_first=True, dropout=0.3, backend="numba")
    mod.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 10, 6)
    mod.eval()
    torch.testing.assert_close(mod(x)[0], ref(x)[0], rtol=1e-4, atol=2e-5)
    mod.train()
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    out, _ = mod(x)
    out.pow(2).mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in mod.parameters())


def test_torch_compile_fullgraph_trains() -> None:
    """A model holding a seqfast LSTM compiles with fullgraph=True (the custom op, no graph break) and its
    gradients match eager mode."""
    torch.manual_seed(2)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = seqfast.LSTM(4, 6, backend="numba")
            self.head = torch.nn.Linear(6, 1)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out).sum()

    model = Model().double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    eager_loss = model(x)
    eager = torch.autograd.grad(eager_loss, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    got = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b)


_COMPILE_FRESH = """
import torch, seqfast
model = seqfast.LSTM(4, 6, num_layers=2, backend="numba")
compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
out, _ = compiled(torch.randn(5, 3, 4))  # compiled before any eager call in this process
out.sum().backward()
print("ok")
"""


def test_torch_compile_fullgraph_in_a_fresh_process() -> None:
    assert _python(_COMPILE_FRESH, {}).strip().endswith("ok")


# --- import, caching ----------------------------------------------------------------------------------------------
def _python(code: str, env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_does_not_import_numba() -> None:
    out = _python("import sys, seqfast; print('numba' in sys.modules)", {})
    assert out.strip() == "False"


_CACHE_PROBE = """
import json, torch, seqfast
from seqfast.backends.numba.codegen import kernels
cell = seqfast.get_cell("rnn_tanh")
seqfast.scan(cell, torch.randn(3, 2, 4), (torch.zeros(2, 4),), {"weight_hh": torch.randn(4, 4)}, backend="numba")
module = kernels(cell, "float32")
stats = module.forward_launch.stats  # the launcher (njit) and the kernel's entry (a cfunc)
print(json.dumps({"hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values()),
                  "entry_hits": module._forward_entry_cfunc.cache_hits}))
"""


def test_second_process_loads_compiled_kernels(tmp_path) -> None:
    env = {"SEQFAST_CACHE_DIR": str(tmp_path)}
    first = json.loads(_python(_CACHE_PROBE, env).strip().splitlines()[-1])
    second = json.loads(_python(_CACHE_PROBE, env).strip().splitlines()[-1])
    assert first == {"hits": 0, "misses": 1, "entry_hits": 0}
    assert second == {"hits": 1, "misses": 0, "entry_hits": 1}


def test_unwritable_cache_dir_falls_back(tmp_path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = subprocess.run([sys.executable, "-c", _CACHE_PROBE], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SEQFAST_CACHE_DIR": str(blocker / "cache")})
    assert result.returncode == 0, result.stderr
    assert "not writable" in result.stderr


def test_large_buffers_are_pooled_and_never_shared_while_alive() -> None:
    from seqfast.backends.numba import _buffers

    _buffers.clear()
    shape = (300, 1024)  # 1.2 MB: pooled
    a = _buffers.empty(shape, torch.float32)
    b = _buffers.empty(shape, torch.float32)
    assert a.data_ptr() != b.data_ptr() and a.data_ptr() % 64 == 0
    first = a.data_ptr()
    view = a[5:]
    del a
    assert _buffers.empty(shape, torch.float32).data_ptr() != first  # a view of it is alive
    array = view.numpy()
    del view
    assert _buffers.empty(shape, torch.float32).data_ptr() != first  # so is a numpy array over it
    del array
    reused = _buffers.empty(shape, torch.float32)
    assert reused.data_ptr() == first
    assert _buffers.empty((2048, 1024), torch.float64).data_ptr() != first  # too large for the free one
    assert _buffers.empty((4, 4), torch.float32).shape == (4, 4)  # small: plain torch.empty
    assert len(_buffers._kept) <= _buffers.MAX_KEPT
    _buffers.clear()
    # the threshold: an LSTM's outputs at T100 B8 H64 (200 KiB) are pooled, a batch-1 step's are not
    outputs = _buffers.empty((100, 8, 64), torch.float32)
    assert [b.ctypes.data for b in _buffers._kept] == [outputs.data_ptr()]
    _buffers.empty((100, 1, 32), torch.float32)
    assert len(_buffers._kept) == 1
    _buffers.clear()


def test_pool_and_weight_views_stay_bounded(monkeypatch) -> None:
    from seqfast.backends.numba import _buffers

    _buffers.clear()
    monkeypatch.setattr(_buffers, "MAX_KEPT_BYTES", 3 << 20)
    held = [_buffers.empty((512, 1024), torch.float32) for _ in range(3)]  # 2 MiB each: the others are not kept
    assert len({t.data_ptr() for t in held}) == 3 and len(_buffers._kept) == 1
    kept = _buffers._kept[0].ctypes.data
    del held
    assert _buffers.empty((512, 1024), torch.float32).data_ptr() == kept  # free again: reused
    larger = _buffers.empty((512, 1024), torch.float64)  # 4 MiB, over the cap alone: the free buffer is dropped
    assert larger.shape == (512, 1024) and _buffers._kept == []  # to make room, and this one is not kept
    _buffers.clear()
    # a weight's cached numpy view goes when the weight does (it would keep the memory alive)
    weight = torch.randn(64, 16)
    key = id(weight)
    numba_backend._host(weight)
    assert key in numba_backend._views
    del weight
    assert key not in numba_backend._views


def test_outputs_and_initial_states_stay_intact_across_calls() -> None:
    """Outputs live in pooled buffers: one a caller keeps must not be overwritten by the next call, and the
    kernels never write into the caller's initial state."""
    from seqfast.backends.numba import _buffers

    _buffers.clear()
    torch.manual_seed(0)
    model = seqfast.LSTM(8, 256, backend="numba")  # outputs of 64 x 16 x 256 floats: 1 MiB, pooled
    x1, x2 = torch.randn(64, 16, 8), torch.randn(64, 16, 8)
    h0 = (torch.randn(1, 16, 256), torch.randn(1, 16, 256))
    kept_h0 = tuple(s.clone() for s in h0)
    with torch.no_grad():
        out1, _ = model(x1, h0)
        kept = out1.clone()
        out2, _ = model(x2, h0)
    assert {out1.data_ptr(), out2.data_ptr()} <= {b.ctypes.data for b in _buffers._kept}  # both from the pool
    assert out1.data_ptr() != out2.data_ptr()
    assert torch.equal(out1, kept)
    assert all(torch.equal(s, k) for s, k in zip(h0, kept_h0, strict=True))
    del out1, kept  # now its buffer may serve the next call, which must still be right
    reference = seqfast.LSTM(8, 256, backend="torch")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        again, _ = model(x1, h0)
        torch.testing.assert_close(again, reference(x1, h0)[0], **TOL[torch.float32])


def test_module_pickles_without_its_call_caches(tmp_path) -> None:
    model = seqfast.GRU(4, 6, backend="numba")
    with torch.no_grad():
        model(torch.randn(3, 2, 4))
    assert "_queries" in model.__dict__
    path = tmp_path / "m.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert "_queries" not in loaded.__dict__
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_small_torch_gemms_run_on_one_mkl_thread(monkeypatch) -> None:
    """_mm holds MKL to one thread (on this thread only, then restores it) below SMALL_TORCH_GEMM, and its results
    are torch.mm's; project_backward gives the default FusedBackend gradients."""
    calls = []

    def set_local(n: int) -> int:
        calls.append(n)
        return 7  # the setting before

    monkeypatch.setattr(_blas, "_set_local_threads", set_local)
    a, b = torch.randn(100, 32), torch.randn(32, 128)  # 0.41M multiply-adds: small
    assert torch.equal(numba_backend._mm(a, b), torch.mm(a, b)) and calls == [1, 7]
    calls.clear()
    big = torch.randn(32, 256)  # 0.82M: left to torch's threads
    assert torch.equal(numba_backend._mm(a, big), torch.mm(a, big)) and calls == []
    out = torch.empty(100, 128)
    assert numba_backend._mm(a, b, out=out) is out and torch.equal(out, torch.mm(a, b))
    backend = seqfast.get_backend("numba")
    grad, x, w = torch.randn(50, 64), torch.randn(50, 16), torch.randn(64, 16)
    for need_x, need_w in ((True, True), (False, True), (True, False)):
        got = backend.project_backward(grad, x, w, need_x, need_w)
        want = FusedBackend.project_backward(backend, grad, x, w, need_x, need_w)
        for g, e in zip(got, want, strict=True):
            assert (g is None) == (e is None) and (g is None or torch.allclose(g, e, atol=1e-5))
