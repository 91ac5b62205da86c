"""The contract between the fused-backend glue (seqfast/backends/fused.py) and its implementers."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from pointwise_backend import PointwiseTorchBackend

import seqfast
from seqfast.backends import NumbaBackend, TritonBackend
from seqfast.backends.fused import FusedBackend, _ops_for
from seqfast.backends.fused_contract import Ownership, SavedScan, ScanInputs, unpack_saved

IMPLEMENTERS = [NumbaBackend, TritonBackend, PointwiseTorchBackend]


@pytest.mark.parametrize("method", ["forward", "backward"])
@pytest.mark.parametrize("backend", IMPLEMENTERS, ids=lambda b: b.name)
def test_every_keyword_is_declared_by_the_base_and_taken_by_each_backend(backend, method: str) -> None:
    """The scan travels as one ScanInputs (x_bias among its fields); saved_mode= and x_proj_mode= are part of
    FusedBackend.backward's signature; every implementer takes each of them (implementing or declining it), with
    the same defaults."""
    base = inspect.signature(getattr(FusedBackend, method)).parameters
    own = inspect.signature(getattr(backend, method)).parameters
    assert list(base)[:2] == ["self", "inputs"]
    assert "x_bias" in {f.name for f in dataclasses.fields(ScanInputs)}
    assert method == "forward" or {"saved_mode", "x_proj_mode"} <= set(base)
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
    inputs = ScanInputs(cell, x, [torch.zeros(1, 4)], [None, None], None, False, x_bias=torch.zeros(12))
    with pytest.raises(ValueError, match=r"x_bias must be None.*shape \(12,\)"):
        backend.forward(inputs, False)
    with pytest.raises(ValueError, match="x_bias must be None"):
        backend.backward(inputs, x, [], None, [None])


def _gru_inputs(**changes) -> ScanInputs:
    cell = seqfast.get_cell("gru")
    hidden = 4
    inputs = ScanInputs(cell, torch.zeros(2, 1, 3 * hidden), [torch.zeros(1, hidden)],
                        [torch.zeros(3 * hidden, hidden), None], None, False)
    return dataclasses.replace(inputs, **changes)


# (capability flag, what the input takes without it, the error's words)
CAPABILITIES = [
    ("fuses_input_bias", {"x_bias": torch.zeros(12)}, r"triton backend: x_bias must be None"),
    ("forward_accepts_zero_state", {"state0": None}, r"state0 must be a list of 1 \[B, H\] tensors .* got None"),
]


@pytest.mark.parametrize(("flag", "changes", "message"), CAPABILITIES, ids=[c[0] for c in CAPABILITIES])
@pytest.mark.parametrize("backend", [TritonBackend, PointwiseTorchBackend], ids=lambda b: b.name)
def test_a_backend_without_a_capability_declines_its_input(backend, flag: str, changes: dict, message: str) -> None:
    """Each input a capability flag governs is refused by a backend lacking it, with an error naming the
    argument, what was expected and what came, in forward and in backward alike."""
    instance = backend()
    assert not getattr(instance, flag)
    inputs = _gru_inputs(**changes)
    message = message.replace("triton", instance.name)
    with pytest.raises(ValueError, match=message):
        instance.forward(inputs, True)
    out = torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match=message):
        instance.backward(inputs, out, [], out, [None])


def test_a_backend_that_reads_x_proj_declines_a_backward_without_it() -> None:
    instance = PointwiseTorchBackend()
    assert instance.backward_reads_x_proj(seqfast.get_cell("gru"))
    out = torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match=r"backward needs x_proj \(backward_reads_x_proj is True for cell 'gru'\)"):
        instance.backward(_gru_inputs(x_proj=None), out, [], out, [None])


@pytest.mark.skipif(not seqfast.get_backend("numba").available(), reason="numba not installed")
def test_numba_implements_every_capability() -> None:
    """numba declares every capability, and honours it: zero states given as None and an x_bias added to x_proj
    give the torch reference's scan of the same inputs spelled out."""
    backend = seqfast.get_backend("numba")
    assert backend.fuses_input_bias and backend.forward_accepts_zero_state
    cell = seqfast.get_cell("gru")
    gen = torch.Generator().manual_seed(0)
    x_proj, x_bias = torch.randn(3, 2, 12, generator=gen), torch.randn(12, generator=gen)
    weights = [torch.randn(12, 4, generator=gen), torch.randn(12, generator=gen)]
    out, final, _ = backend.forward(ScanInputs(cell, x_proj, None, weights, None, True, x_bias), False)
    want_out, want_final = seqfast.get_backend("torch").scan(
        cell, x_proj + x_bias, (torch.zeros(2, 4),), seqfast.Weights(weight_hh=weights[0], bias_hh=weights[1]),
        None, True)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(final[0], want_final[0])


def test_fuses_input_bias_without_zero_states_is_refused_at_registration() -> None:
    class Inconsistent(PointwiseTorchBackend):
        name = "inconsistent_fused"
        fuses_input_bias = True

    with pytest.raises(ValueError, match="'inconsistent_fused': fuses_input_bias requires forward_accepts_zero_state"):
        seqfast.register_backend(Inconsistent())
    assert "inconsistent_fused" not in seqfast.available_backends()


def test_scan_inputs_round_trip() -> None:
    """ScanInputs gives back exactly the objects it was built from, positionally or by keyword; replace() changes
    only what it names; tensors compare by identity, and the record has no __dict__ (slots)."""
    cell = seqfast.get_cell("lstm")
    x_proj, lengths, bias = torch.randn(3, 2, 8), torch.tensor([3, 1]), torch.randn(8)
    state0, weights = [torch.randn(2, 2), torch.randn(2, 2)], [torch.randn(8, 2), None]
    values = (cell, x_proj, state0, weights, lengths, True, bias)
    inputs = ScanInputs(*values)
    assert tuple(getattr(inputs, f.name) for f in dataclasses.fields(ScanInputs)) == values
    by_name = ScanInputs(**{f.name: v for f, v in zip(dataclasses.fields(ScanInputs), values, strict=True)})
    assert all(getattr(by_name, f.name) is getattr(inputs, f.name) for f in dataclasses.fields(ScanInputs))
    assert ScanInputs(cell, x_proj, None, weights, None, False).x_bias is None
    changed = dataclasses.replace(inputs, reverse=False, x_bias=None)
    assert (changed.reverse, changed.x_bias) == (False, None) and changed.x_proj is x_proj
    assert inputs.reverse is True and inputs.x_bias is bias
    assert inputs == inputs and inputs != by_name  # identity, never an elementwise tensor comparison
    assert not hasattr(inputs, "__dict__")


class _Recording(PointwiseTorchBackend):
    """Records the ScanInputs forward() and backward() receive."""

    name = "recording_fused"

    def __init__(self) -> None:
        self.seen: list[tuple[str, ScanInputs]] = []

    def forward(self, inputs, need_saved):
        self.seen.append(("forward", inputs))
        return super().forward(inputs, need_saved)

    def backward(self, inputs, outputs, saved, grad_outputs, grad_final, saved_mode="keep", x_proj_mode="keep"):
        self.seen.append(("backward", inputs))
        return super().backward(inputs, outputs, saved, grad_outputs, grad_final, saved_mode, x_proj_mode)


@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_the_glue_hands_each_scan_its_inputs_unchanged(path: str) -> None:
    """What scan() is given reaches forward() and backward() as a ScanInputs of the same tensors (weights in
    recurrent_param_names order), through the eager autograd Function and through the custom ops."""
    backend = _Recording()
    cell = seqfast.get_cell("gru")
    gen = torch.Generator().manual_seed(1)
    x_proj = torch.randn(4, 2, 9, generator=gen, requires_grad=True)
    state0 = (torch.randn(2, 3, generator=gen),)
    w_hh, b_hh = torch.randn(9, 3, generator=gen, requires_grad=True), torch.randn(9, generator=gen)
    lengths = torch.tensor([4, 2])
    if path == "eager":
        out, final = backend.scan(cell, x_proj, state0, seqfast.Weights(weight_hh=w_hh, bias_hh=b_hh), lengths,
                                  True)
    else:
        result = _ops_for(backend)[0](cell.name, x_proj, list(state0), [w_hh, b_hh], lengths, True, True)
        out, final = result[0], result[1:2]
    (out.sum() + final[0].sum()).backward()
    assert [kind for kind, _ in backend.seen] == ["forward", "backward"]
    for _, inputs in backend.seen:
        assert inputs.cell is cell and inputs.reverse is True and inputs.x_bias is None
        assert torch.equal(inputs.lengths, lengths) and torch.equal(inputs.x_proj, x_proj)
        assert len(inputs.state0) == 1 and torch.equal(inputs.state0[0], state0[0])
        assert [w.shape for w in inputs.weights] == [w_hh.shape, b_hh.shape]
        assert torch.equal(inputs.weights[0], w_hh) and torch.equal(inputs.weights[1], b_hh)
    assert x_proj.grad is not None and w_hh.grad is not None


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
