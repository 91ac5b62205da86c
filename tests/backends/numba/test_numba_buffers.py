"""Kernel buffers (alignment, the pool) and the numpy views of weights."""

from __future__ import annotations

import pytest
import torch

import seqfast

numba = pytest.importorskip("numba")

from numba_cases import TOL, fresh_plans, make_inputs  # noqa: E402, F401 (autouse fixture)

from seqfast.backends.fused_contract import ScanInputs  # noqa: E402
from seqfast.backends.numba import buffers, schedule, views  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_like_gives_fresh_aligned_buffers_small_and_pooled(monkeypatch, dtype: torch.dtype) -> None:
    """buffers.like: a new C-contiguous tensor of the stand-in's shape and dtype, on a 64-byte line, never the
    stand-in's memory nor another live buffer's; from MIN_BYTES it comes from the pool."""
    monkeypatch.setattr(buffers, "MIN_BYTES", 1024)
    buffers.clear()
    small, large = buffers.stand_in((3, 1, 7), dtype), buffers.stand_in((2, 8, 64), dtype)
    assert small[1] == 21 * dtype.itemsize and large[1] == 1024 * dtype.itemsize
    made = [buffers.like(small), buffers.like(small), buffers.like(large), buffers.like(large)]
    for t, stand in zip(made, (small, small, large, large), strict=True):
        assert t.shape == stand[0].shape and t.dtype == dtype and t.is_contiguous() and t.data_ptr() % 64 == 0
        t.fill_(1.0)  # writable, its own memory
    assert len({t.data_ptr() for t in made}) == len(made)
    assert {t.data_ptr() for t in made[2:]} == set(buffers.kept_addresses())  # the two large ones, pooled
    buffers.clear()


@pytest.mark.parametrize("threads", [1, 2])
def test_buffers_several_threads_write_start_on_a_cache_line(monkeypatch, threads: int) -> None:
    """Outputs, final states and saved tensors that two threads write row by row start on a 64-byte line (so no
    line straddles two threads' rows); with one thread they may come from numpy. Either way they are separate,
    writable tensors holding the scan's results."""
    monkeypatch.setenv("SEQFAST_NUMBA_THREADS", str(threads))
    monkeypatch.setattr(schedule, "MIN_WORK_PER_THREAD", 0)
    schedule.clear_plans()
    backend = seqfast.registry.get_backend("numba")
    cell = seqfast.get_cell("lstm")
    x, state0, weights, _ = make_inputs(cell, 5, 6, 3, torch.float32, seed=2)
    wlist = [weights["weight_hh"], weights["bias_hh"]]
    inputs = ScanInputs(cell, x, list(state0), wlist, None, False)
    out, final, saved = backend.forward(inputs, True)
    made = [out, *final, *saved]
    if threads == 2:
        assert all(t.data_ptr() % 64 == 0 for t in made)
    assert len({t.data_ptr() for t in made}) == len(made)
    ref_out, ref_final = seqfast.get_backend("torch").scan(cell, x, state0, weights, None, False)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(final, ref_final, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_x, g_state, _ = backend.backward(inputs, out, saved, torch.ones_like(out), [None, None])
    if threads == 2:
        assert all(g.data_ptr() % 64 == 0 for g in [g_x, *g_state])
    final[0].add_(1.0)  # a result may be changed in place like any tensor
    torch.testing.assert_close(final[0], ref_final[0] + 1.0, rtol=1e-5, atol=1e-5)



def test_large_buffers_are_pooled_and_never_shared_while_alive() -> None:

    buffers.clear()
    shape = (300, 1024)  # 1.2 MB: pooled
    a = buffers.empty(shape, torch.float32)
    b = buffers.empty(shape, torch.float32)
    assert a.data_ptr() != b.data_ptr() and a.data_ptr() % 64 == 0
    first = a.data_ptr()
    view = a[5:]
    del a
    assert buffers.empty(shape, torch.float32).data_ptr() != first  # a view of it is alive
    array = view.numpy()
    del view
    assert buffers.empty(shape, torch.float32).data_ptr() != first  # so is a numpy array over it
    del array
    reused = buffers.empty(shape, torch.float32)
    assert reused.data_ptr() == first
    assert buffers.empty((2048, 1024), torch.float64).data_ptr() != first  # too large for the free one
    assert buffers.empty((4, 4), torch.float32).shape == (4, 4)  # small: plain torch.empty
    assert len(buffers.kept_addresses()) <= buffers.MAX_KEPT
    buffers.clear()
    # the threshold: an LSTM's outputs at T100 B8 H64 (200 KiB) are pooled, a batch-1 step's are not
    outputs = buffers.empty((100, 8, 64), torch.float32)
    assert buffers.kept_addresses() == [outputs.data_ptr()]
    buffers.empty((100, 1, 32), torch.float32)
    assert len(buffers.kept_addresses()) == 1
    buffers.clear()


def test_pool_and_weight_views_stay_bounded(monkeypatch) -> None:

    buffers.clear()
    monkeypatch.setattr(buffers, "MAX_KEPT_BYTES", 3 << 20)
    held = [buffers.empty((512, 1024), torch.float32) for _ in range(3)]  # 2 MiB each: the others are not kept
    assert len({t.data_ptr() for t in held}) == 3 and len(buffers.kept_addresses()) == 1
    kept = buffers.kept_addresses()[0]
    del held
    assert buffers.empty((512, 1024), torch.float32).data_ptr() == kept  # free again: reused
    larger = buffers.empty((512, 1024), torch.float64)  # 4 MiB, over the cap alone: the free buffer is dropped
    assert larger.shape == (512, 1024) and buffers.kept_addresses() == []  # to make room, and this one is not kept
    buffers.clear()
    # a weight's cached numpy view goes when the weight does (it would keep the memory alive)
    weight = torch.randn(64, 16)
    key = id(weight)
    views.host(weight)
    assert views.is_cached(key)
    del weight
    assert not views.is_cached(key)


def test_outputs_and_initial_states_stay_intact_across_calls() -> None:
    """Outputs live in pooled buffers: one a caller keeps must not be overwritten by the next call, and the
    kernels never write into the caller's initial state."""

    buffers.clear()
    torch.manual_seed(0)
    model = seqfast.LSTM(8, 256, backend="numba")  # outputs of 64 x 16 x 256 floats: 1 MiB, pooled
    x1, x2 = torch.randn(64, 16, 8), torch.randn(64, 16, 8)
    h0 = (torch.randn(1, 16, 256), torch.randn(1, 16, 256))
    kept_h0 = tuple(s.clone() for s in h0)
    with torch.no_grad():
        out1, _ = model(x1, h0)
        kept = out1.clone()
        out2, _ = model(x2, h0)
    assert {out1.data_ptr(), out2.data_ptr()} <= set(buffers.kept_addresses())  # both from the pool
    assert out1.data_ptr() != out2.data_ptr()
    assert torch.equal(out1, kept)
    assert all(torch.equal(s, k) for s, k in zip(h0, kept_h0, strict=True))
    del out1, kept  # now its buffer may serve the next call, which must still be right
    reference = seqfast.LSTM(8, 256, backend="torch")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        again, _ = model(x1, h0)
        torch.testing.assert_close(again, reference(x1, h0)[0], **TOL[torch.float32])



