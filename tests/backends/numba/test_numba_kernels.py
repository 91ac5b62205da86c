"""The numba kernels themselves: fast float32 math, the BLAS and loop GEMMs, code generation for a plugin cell, the
disk cache."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import seqfast
from seqfast.cells.common import recurrent_term
from seqfast.registry import CellSpec, ParamSpec, Pointwise

numba = pytest.importorskip("numba")

from numba_cases import compare_with_reference, fresh_plans, make_inputs, run_python  # noqa: E402, F401 (autouse fixture)

from seqfast.backends.numba import _blas, _math, schedule  # noqa: E402


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


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in units in the last place between float64 arrays (0 where both are NaN or equal)."""
    ia, ib = a.view(np.int64), b.view(np.int64)
    ia = np.where(ia < 0, np.int64(-(2**63)) - ia, ia)  # order the bit patterns like the values
    ib = np.where(ib < 0, np.int64(-(2**63)) - ib, ib)
    return np.where((a == b) | (np.isnan(a) & np.isnan(b)), 0, np.abs(ia - ib))


def test_fast_math_float64_within_its_ulps_of_libm() -> None:
    """float64 tanh and sigmoid against libm (math.tanh, 1 / (1 + math.exp(-x))) over [-50, 50], around 0 and the
    clamps, tiny and subnormal inputs, infs and NaN: within the documented ulps, -0.0 kept, NaN propagated."""
    rng = np.random.default_rng(0)
    xs = np.concatenate([np.linspace(-50, 50, 400_001), rng.standard_normal(200_000) * 3,
                         rng.standard_normal(50_000) * 1e-6, rng.uniform(-1.01, 1.01, 50_000) / 2,
                         np.array([0.0, -0.0, 1e-310, -1e-310, 5e-324, np.inf, -np.inf, 709.0, -709.0, 745.0, -745.0,
                                   1e300, -1e300, 19.99, 20.01, 36.9, 37.5, 40.01, -40.01, -709.9, -710.1])])

    @numba.njit(fastmath={"contract"}, error_model="numpy")
    def apply(values):
        out = np.empty((2, values.shape[0]))
        for i in range(values.shape[0]):
            out[0, i] = _math.tanh_f64(values[i])
            out[1, i] = _math.sigmoid_f64(values[i])
        return out

    got = apply(xs)
    want_tanh = np.array([math.tanh(x) for x in xs])
    want_sigmoid = np.array([0.0 if x < -709 else 1 / (1 + math.exp(-x)) for x in xs])
    assert _ulps(got[0], want_tanh).max() <= _math.TANH_F64_MAX_ULPS
    assert _ulps(got[1], want_sigmoid).max() <= _math.SIGMOID_F64_MAX_ULPS
    assert np.array_equal(np.signbit(got[0]), np.signbit(xs))  # odd: -0.0 and every negative input keep the sign
    nan = apply(np.array([np.nan]))
    assert np.isnan(nan).all()


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



def test_gemm_check_tells_a_wrong_routine_in_either_dtype() -> None:
    """The exact-product check that admits MKL's kernels accepts sgemm_ (and dgemm_ on float64 buffers) and rejects
    routines that leave C alone, ignore beta, or read another dtype (all called like sgemm_, on the check's own
    buffers)."""
    if not _blas.SGEMM:
        pytest.skip("this torch has no MKL")
    signature = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 13)
    assert _blas.gemm_agrees(signature(_blas.SGEMM))
    assert not _blas.gemm_agrees(signature(lambda *args: None))
    sgemm = signature(_blas.SGEMM)
    zero = ctypes.c_float(0.0)

    def beta_ignored(*args):
        sgemm(*args[:10], ctypes.addressof(zero), *args[11:])

    assert not _blas.gemm_agrees(signature(beta_ignored))
    assert _blas.gemm_agrees(signature(_blas.DGEMM), ctypes.c_double)
    assert not _blas.gemm_agrees(signature(_blas.SGEMM), ctypes.c_double)  # reads doubles as floats


def test_direct_kernels_follow_cpu_and_switch(monkeypatch) -> None:
    """MKL's AVX-512 and AVX2 kernels are called directly only where the CPU has their instructions, never on
    Intel (sgemm_'s own dispatch picks them there), and not with SEQFAST_NUMBA_MKL_KERNELS=0."""
    if not _blas.SGEMM:
        pytest.skip("this torch has no MKL")
    avx2, avx512 = {"avx2", "fma"}, {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"}
    _, real = _blas.cpu_vendor_and_flags()
    if not avx2 <= real:
        pytest.skip("this CPU has no AVX2")
    # claim only instructions this CPU has: the check product runs every kernel that is found
    claimed = avx512 if avx512 <= real else avx2
    monkeypatch.setattr(_blas, "cpu_vendor_and_flags", lambda: ("AuthenticAMD", claimed))
    found = _blas.direct_kernels()
    isas = {"avx512", "avx2"} if claimed is avx512 else {"avx2"}
    if set(found) != isas:
        pytest.skip(f"this torch's MKL exports no {' / '.join(sorted(isas - set(found)))} kernel")
    assert len(set(found.values())) == len(found) and _blas.SGEMM not in found.values()
    monkeypatch.setattr(_blas, "cpu_vendor_and_flags", lambda: ("AuthenticAMD", avx2))
    assert _blas.direct_kernels() == {"avx2": found["avx2"]}
    monkeypatch.setattr(_blas, "cpu_vendor_and_flags", lambda: ("AuthenticAMD", {"sse4_2"}))
    assert _blas.direct_kernels() == {}
    monkeypatch.setattr(_blas, "cpu_vendor_and_flags", lambda: ("GenuineIntel", claimed))
    assert _blas.direct_kernels() == {}
    monkeypatch.setattr(_blas, "cpu_vendor_and_flags", lambda: ("AuthenticAMD", claimed))
    found_64 = _blas.direct_kernels("float64")  # the dgemm kernels: other entry points, the same rules
    assert set(found_64) <= isas and not set(found_64.values()) & {*found.values(), _blas.SGEMM, _blas.DGEMM}
    monkeypatch.setenv("SEQFAST_NUMBA_MKL_KERNELS", "0")
    assert _blas.direct_kernels() == {} and _blas.direct_kernels("float64") == {}
    monkeypatch.setattr(_blas, "cpu_vendor_and_flags", lambda: ("GenuineIntel", claimed))
    monkeypatch.delenv("SEQFAST_NUMBA_MKL_KERNELS")
    assert _blas.direct_kernels("float64") == {}


@numba.njit
def _blocked(a, b, c):
    _blas.loop_nn_acc(a, b, c)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_loop_gemm_blocks_and_leftovers(dtype) -> None:
    """The blocked loop GEMM (blocks of four and two rows by four k-steps, a lone row by eight) against a float64
    product, at every row count up to 11 (each mix of blocks and a lone row), k-steps left over by either block
    size, and widths that are not a multiple of the vector length."""
    rng = np.random.default_rng(0)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    shapes = [(m, k, n) for m in range(1, 12) for k, n in ((8, 5), (7, 33), (17, 64), (3, 128), (13, 16))]
    for m, k, n in shapes + [(9, 40, 3), (4, 16, 17)]:
        a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
        c0 = rng.standard_normal((m, n)).astype(dtype)
        got = c0.copy()
        _blocked(a, b, got)
        expected = c0.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * k, err_msg=str((m, k, n)))



@numba.njit
def _transposed(a, out):
    _blas.transpose_into(a, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_transpose_into_tiles_and_edges(dtype) -> None:
    """W_hh's transposition for the loop GEMM (8 x 8 tiles, then the edge rows and columns) is exact, for shapes
    with and without edges on either side."""
    rng = np.random.default_rng(1)
    for rows, cols in ((1, 1), (3, 5), (8, 8), (16, 24), (188, 47), (9, 17), (24, 7), (520, 130)):
        a = rng.standard_normal((rows, cols)).astype(dtype)
        out = np.full((cols, rows), np.nan, dtype=dtype)
        _transposed(a, out)
        np.testing.assert_array_equal(out, a.T, err_msg=str((rows, cols)))


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
    monkeypatch.setattr(schedule, "MIN_WORK_PER_THREAD", 0)
    schedule.clear_plans()
    assert len(schedule.row_ranges(6, 1)) == threads
    x, state0, weights, lens = make_inputs(leaky_cell, 8, 6, 6, dtype, seed=2, lengths=True)
    compare_with_reference(leaky_cell, x, state0, weights, lens, True, dtype)


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
    x, state0, weights, lens = make_inputs(leaky_cell, 7, 3, 5, torch.float32, seed=5, lengths=True)
    for cell in (leaky_cell, other):  # both ways give the reference's gradients, forward and reversed
        for reverse in (False, True):
            compare_with_reference(cell, x, state0, weights, lens, reverse, torch.float32)


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



# --- import, caching ----------------------------------------------------------------------------------------------
def test_import_does_not_import_numba() -> None:
    out = run_python("import sys, seqfast; print('numba' in sys.modules)", {})
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
    first = json.loads(run_python(_CACHE_PROBE, env).strip().splitlines()[-1])
    second = json.loads(run_python(_CACHE_PROBE, env).strip().splitlines()[-1])
    assert first == {"hits": 0, "misses": 1, "entry_hits": 0}
    assert second == {"hits": 1, "misses": 0, "entry_hits": 1}


def test_unwritable_cache_dir_falls_back(tmp_path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = subprocess.run([sys.executable, "-c", _CACHE_PROBE], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SEQFAST_CACHE_DIR": str(blocker / "cache")})
    assert result.returncode == 0, result.stderr
    assert "not writable" in result.stderr





def test_cells_need_the_one_step_kernels_compiled_not_the_scans(tmp_path, monkeypatch) -> None:
    """auto's calibration asks needs_compile before timing numba: for a cell (level "step") that is the one-step
    kernels, which a cell runs, not the scans."""
    from seqfast.backends.codegen import loader

    monkeypatch.setitem(loader._dirs, "numba", tmp_path)  # an empty kernel cache: nothing compiled on disk
    cell = dataclasses.replace(seqfast.get_cell("rnn_tanh"), name="test_numba_needs_compile_rnn")
    seqfast.register_cell(cell, replace=True)
    try:
        backend = seqfast.get_backend("numba")
        step = seqfast.Query(cell, hidden_size=3, input_size=2, batch_size=2, seq_len=1, level="step")
        module = seqfast.Query(cell, hidden_size=3, input_size=2, batch_size=2, seq_len=4)
        assert backend.needs_compile(step) and backend.needs_compile(module)
        ours = seqfast.RecurrentCell(cell.name, 2, 3, backend="numba")
        with torch.no_grad():
            ours(torch.randn(2, 2))
        assert not backend.needs_compile(step)
        assert backend.needs_compile(module)  # the scans are still uncompiled
        assert backend.needs_compile(dataclasses.replace(step, requires_grad=True))  # and the step's backward
    finally:
        from seqfast.registry import registry

        del registry.cells[cell.name]
        registry.cell_origin.pop(cell.name, None)
        registry.generation += 1


def test_info_names_the_cpu_and_the_gemm_numba_calls(monkeypatch) -> None:
    """`seqfast info` shows the CPU (with family and model) and which GEMM numba's per-step products call, per
    dtype: MKL's own kernel by its name, sgemm_ / dgemm_, or numba's loop without MKL."""
    from seqfast import calibration
    from seqfast.cli import collect_info
    from seqfast.registry import get_backend

    info = collect_info()
    assert info["cpu"] == calibration.cpu_model()
    assert info["backends"]["numba"]["details"][0].startswith("per-step GEMM: float32 ")
    _blas.gemm_address("float32")  # the search has run: what is patched below stays
    numba_backend = get_backend("numba")
    for name, value in {"SGEMM": 1, "DGEMM": 2, "SGEMM_KERNEL": 11, "DGEMM_KERNEL": 22,
                        "DIRECT_KERNELS": {"avx512": 11, "avx2": 12}, "DIRECT_KERNELS_64": {"avx512": 22}}.items():
        monkeypatch.setattr(_blas, name, value)
    assert numba_backend.details() == ["per-step GEMM: float32 MKL's own mkl_blas_avx512_xsgemm, float64 MKL's own "
                                       "mkl_blas_avx512_xdgemm"]
    monkeypatch.setattr(_blas, "SGEMM_KERNEL", 12)
    monkeypatch.setattr(_blas, "DGEMM_KERNEL", 2)
    assert numba_backend.details() == ["per-step GEMM: float32 MKL's own mkl_blas_avx2_xsgemm, float64 dgemm_"]
    for name in ("SGEMM_KERNEL", "DGEMM_KERNEL"):
        monkeypatch.setattr(_blas, name, 0)
    assert numba_backend.details() == ["per-step GEMM: float32 numba's loop (this torch has no MKL), float64 "
                                       "numba's loop (this torch has no MKL)"]
