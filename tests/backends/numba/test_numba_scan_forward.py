"""The numba forward scan in inference: the per-step products live in the kernel's own scratch."""

from __future__ import annotations

import pytest
import torch

import seqfast

pytest.importorskip("numba")

from seqfast.backends.numba import buffers  # noqa: E402


@pytest.mark.parametrize("batch", [1, 5], ids=["B1", "B5"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inference_allocates_no_product_buffer(monkeypatch, cell: str, batch: int) -> None:
    """An inference call asks Python for its outputs only: the [1, B, G*H] product scratch is the kernel's (one per
    thread), and the result is torch.nn's."""
    monkeypatch.setenv("SEQFAST_NUMBA_THREADS", "2")  # B5: two row ranges, each thread with its own scratch
    torch.manual_seed(0)
    ref = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](3, 4)
    ours = seqfast.Recurrent(cell, 3, 4, backend="numba")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, batch, 3)
    shapes: list[tuple[int, ...]] = []
    real_new, real_like = buffers.new, buffers.like

    def spy_new(shape, dtype, shared):
        shapes.append(tuple(shape))
        return real_new(shape, dtype, shared)

    def spy_like(stand):  # a bound call's outputs
        shapes.append(tuple(stand[0].shape))
        return real_like(stand)

    monkeypatch.setattr(buffers, "new", spy_new)
    monkeypatch.setattr(buffers, "like", spy_like)
    with torch.no_grad():
        out, state = ours(x)
        expected, expected_state = ref(x)
    width = ref.weight_hh_l0.shape[0]
    assert shapes and (1, batch, width) not in shapes, shapes
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=2e-5)
    for got, want in zip(state if isinstance(state, tuple) else (state,),
                         expected_state if isinstance(expected_state, tuple) else (expected_state,), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
