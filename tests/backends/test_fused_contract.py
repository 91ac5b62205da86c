"""The contract between the fused-backend glue (seqfast/backends/fused.py) and its implementers."""

from __future__ import annotations

import inspect

import pytest
import torch

import seqfast
from seqfast.backends import NumbaBackend, TritonBackend
from seqfast.backends.fused import FusedBackend
from seqfast.backends.fused_contract import Ownership, SavedScan, unpack_saved

IMPLEMENTERS = [NumbaBackend, TritonBackend]


@pytest.mark.parametrize("method", ["forward", "backward"])
@pytest.mark.parametrize("backend", IMPLEMENTERS, ids=lambda b: b.name)
def test_every_keyword_is_declared_by_the_base_and_taken_by_each_backend(backend, method: str) -> None:
    """x_bias=, saved_mode= and x_proj_mode= are part of FusedBackend's signatures, and every implementer takes
    each of them (implementing or declining it), with the same defaults."""
    base = inspect.signature(getattr(FusedBackend, method)).parameters
    own = inspect.signature(getattr(backend, method)).parameters
    assert "x_bias" in base and (method == "forward" or {"saved_mode", "x_proj_mode"} <= set(base))
    assert list(own) == list(base)
    assert [p.default for p in own.values()] == [p.default for p in base.values()]


def test_ownership_reads_as_its_string() -> None:
    assert Ownership.KEEP == "keep" and Ownership.CONSUME == "consume" and Ownership("consume") is Ownership.CONSUME


def test_triton_declines_an_input_bias_naming_it() -> None:
    """A backend that does not fuse the input bias says so when handed one, instead of ignoring it."""
    backend = seqfast.get_backend("triton")
    assert not backend.fuses_input_bias
    cell = seqfast.get_cell("gru")
    x = torch.zeros(2, 1, 3 * 4)
    with pytest.raises(ValueError, match=r"x_bias must be None.*shape \(12,\)"):
        backend.forward(cell, x, [torch.zeros(1, 4)], [None, None], None, False, False, x_bias=torch.zeros(12))
    with pytest.raises(ValueError, match="x_bias must be None"):
        backend.backward(cell, x, [torch.zeros(1, 4)], [None, None], None, False, x, [x[0]], [], None, [None],
                         x_bias=torch.zeros(12))


def test_unpack_saved_reads_back_the_saved_order() -> None:
    """ctx.saved_tensors in the order the autograd nodes save them, read back by name."""
    t = [torch.full((1,), float(i)) for i in range(11)]
    got = unpack_saved(tuple(t), n_state=2, n_weights=3, n_final=2)
    assert isinstance(got, SavedScan)
    names = [got.x_proj, got.lengths, *got.state0, *got.weights, got.outputs, *got.final, *got.saved]
    assert [n.item() for n in names] == list(range(11))
    assert (len(got.state0), len(got.weights), len(got.final), len(got.saved)) == (2, 3, 2, 1)
    none_state = unpack_saved((t[0], None, t[1], t[2], t[3]), n_state=0, n_weights=1, n_final=1)
    assert none_state.lengths is None and none_state.state0 == [] and none_state.saved == []
