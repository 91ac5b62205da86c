"""The per-call fast paths of the sequence modules (remembered queries and backend choices, parameters read
anew on every call, cached environment values) must still see every change: replaced, parametrized or
reassigned weights, a new dtype, grad mode, requires_grad, environment variables and backend= spellings."""

from __future__ import annotations

import pytest
import torch
from conftest import CountingBackend, assert_close, backend_param, walk_the_sources_of_a_gru_choice
from torch import nn
from torch.nn.utils import parametrize

import seqfast
from seqfast.config import getenv, resolve_choice

NATIVE = backend_param("native")


def _pair(kind: str, *args, backend: str = "native", **kwargs):
    torch.manual_seed(0)
    ref = getattr(nn, kind)(*args, **kwargs)
    ours = getattr(seqfast, kind)(*args, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


class _Halve(nn.Module):
    def forward(self, w):
        return w * 0.5


@pytest.mark.parametrize("backend", [NATIVE, backend_param("torch")])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_a_parametrized_weight_runs_as_its_current_value(kind, backend):
    ref, ours = _pair(kind, 3, 4, backend=backend)
    x = torch.randn(5, 2, 3)
    ours(x)  # a first call: whatever it remembers must not hide the parametrization registered next
    for module in (ref, ours):
        parametrize.register_parametrization(module, "weight_hh_l0", _Halve())
    out, _ = ours(x)
    assert_close(out, ref(x)[0], f"{kind} with a parametrized weight_hh_l0")
    out.sum().backward()
    original = ours.parametrizations.weight_hh_l0.original
    assert original.grad is not None and original.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", [NATIVE, backend_param("numba"), backend_param("torch")])
@pytest.mark.parametrize("kind", ["RNNCell", "GRUCell", "LSTMCell"])
def test_a_cell_reads_its_weights_by_name_whatever_their_order_or_parametrization(kind, backend):
    """A cell takes its parameters straight from _parameters while they sit in torch.nn's order; a weight
    registered again (now last in _parameters) or parametrized (no longer in it) is still read by its name."""
    ref, ours = _pair(kind, 3, 4, backend=backend)
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    hx = (h, h.clone()) if kind == "LSTMCell" else h
    assert_close(ours(x, hx), ref(x, hx), "before any change")
    for module in (ref, ours):
        weight = module.weight_ih.detach() * 2
        del module.weight_ih
        module.register_parameter("weight_ih", nn.Parameter(weight))
    assert list(ours._parameters)[-1] == "weight_ih"
    assert_close(ours(x, hx), ref(x, hx), "after weight_ih was registered again, last")
    for module in (ref, ours):
        parametrize.register_parametrization(module, "weight_hh", _Halve())
    got = ours(x, hx)
    assert_close(got, ref(x, hx), "with a parametrized weight_hh")
    (got[0] if isinstance(got, tuple) else got).sum().backward()
    assert ours.parametrizations.weight_hh.original.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_replaced_and_reassigned_parameters_show_through(kind):
    ref, ours = _pair(kind, 3, 4, num_layers=2, bidirectional=True, backend="native")
    x = torch.randn(4, 2, 3)
    assert_close(ours(x)[0], ref(x)[0], "before any change")
    new = torch.randn_like(ref.weight_ih_l1_reverse)
    ref.weight_ih_l1_reverse = nn.Parameter(new.clone())
    ours.weight_ih_l1_reverse = nn.Parameter(new.clone())
    assert_close(ours(x)[0], ref(x)[0], "after replacing weight_ih_l1_reverse")
    with torch.no_grad():
        data = torch.randn_like(ref.bias_hh_l0)
        ref.bias_hh_l0.data = data.clone()
        ours.bias_hh_l0.data = data.clone()
    assert_close(ours(x)[0], ref(x)[0], "after bias_hh_l0.data = ...")


@pytest.mark.parametrize("backend", [NATIVE])
def test_dtype_grad_mode_and_requires_grad_changes_are_seen(backend):
    ref, ours = _pair("LSTM", 3, 4, backend=backend)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        assert ours(x)[0].grad_fn is None
    assert ours(x)[0].grad_fn is not None
    ours.requires_grad_(False)
    assert ours(x)[0].grad_fn is None
    x_grad = x.clone().requires_grad_()
    out = ours(x_grad)[0]
    out.sum().backward()
    assert x_grad.grad is not None
    ours.requires_grad_(True)
    ref, ours = ref.double(), ours.double()
    out, (h, c) = ours(x.double())
    assert out.dtype == h.dtype == c.dtype == torch.float64
    assert_close(out, ref(x.double())[0], "after .double()", torch.float64)
    with pytest.raises(RuntimeError, match="type"):
        ours(x)  # float32 input into float64 weights: still checked after the dtype changed


def test_backend_argument_spellings_and_errors_are_resolved_every_time():
    assert resolve_choice("lstm", "LSTM", " Native ").name == "native"
    assert resolve_choice("lstm", "LSTM", "native").name == "native"
    for _ in range(2):  # a remembered argument must not turn a bad one into a good one
        with pytest.raises(TypeError, match="backend"):
            resolve_choice("lstm", "LSTM", "   ")
    model = seqfast.LSTM(3, 4, backend="no_such_backend")
    for _ in range(2):
        with pytest.raises(ValueError, match="no_such_backend"):
            model(torch.randn(2, 1, 3))


def test_environment_values_are_read_anew(monkeypatch):
    monkeypatch.setenv("SEQFAST_TEST_VALUE", "  numba ")
    assert getenv("SEQFAST_TEST_VALUE") == "numba"
    monkeypatch.setenv("SEQFAST_TEST_VALUE", "torch")
    assert getenv("SEQFAST_TEST_VALUE") == "torch"
    monkeypatch.delenv("SEQFAST_TEST_VALUE")
    assert getenv("SEQFAST_TEST_VALUE") == ""
    monkeypatch.setenv("SEQFAST_BACKEND_GRU", "torch")
    assert seqfast.current_backend("gru") == "torch"
    monkeypatch.setenv("SEQFAST_BACKEND_GRU", "native")
    assert seqfast.current_backend("gru") == "native"


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_zero_states_and_single_layer_weights_match_torch_nn(kind):
    ref, ours = _pair(kind, 3, 4, backend="native")
    for shape in ((5, 2, 3), (5, 3), (1, 1, 3)):
        x = torch.randn(*shape)
        out, state = ours(x)
        want, want_state = ref(x)
        assert_close(out, want, f"output for input {shape}")
        assert_close(state, want_state, f"state for input {shape}")


def test_a_modules_kept_decision_follows_every_source_of_the_choice(counting, monkeypatch, tmp_path):
    # the backend a module call runs on is kept per input kind; the choice's sources may change between calls
    ref, ours = _pair("GRU", 3, 4, backend=None)
    x = torch.randn(5, 2, 3)

    def call() -> None:
        with torch.no_grad():
            assert_close(ours(x)[0], ref(x)[0], "GRU output")

    walk_the_sources_of_a_gru_choice(ours, call, monkeypatch, tmp_path)


def test_a_modules_kept_decision_follows_a_backend_registered_in_its_place(counting):
    ref, ours = _pair("LSTM", 3, 4, backend="counting")
    x = torch.randn(5, 2, 3)
    assert_close(ours(x)[0], ref(x)[0], "LSTM output")

    class Replacement(CountingBackend):
        calls = 0

    seqfast.register_backend(Replacement("counting"), replace=True)
    assert_close(ours(x)[0], ref(x)[0], "LSTM output on the replacement")
    assert (CountingBackend.calls, Replacement.calls) == (1, 1)


@pytest.mark.parametrize("backend", [NATIVE, backend_param("numba"), backend_param("torch"),
                                     pytest.param(None, id="auto")])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_a_module_called_with_changing_shapes_dtype_grad_and_lengths_matches_torch_nn(kind, backend):
    # each call kind (shape, dtype, device, grad) keeps its own decision; the parameters are read on every call
    ref, ours = _pair(kind, 3, 5, backend=backend)
    gen = torch.Generator().manual_seed(3)
    tol = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-9, "atol": 1e-10}}
    for dtype, steps, batch, with_lengths in ((torch.float32, 4, 2, False), (torch.float32, 6, 3, True),
                                              (torch.float32, 4, 2, False), (torch.float64, 6, 3, False),
                                              (torch.float64, 4, 1, True), (torch.float32, 4, 2, True)):
        for module in (ref, ours):
            module.to(dtype)
        x = torch.randn(steps, batch, 3, generator=gen, dtype=dtype)
        lengths = steps - torch.arange(batch) % steps if with_lengths else None
        packed = None if lengths is None else nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        with torch.no_grad():
            got = ours(x, lengths=lengths)
            want = ref(x if packed is None else packed)
        want_out = want[0] if packed is None else nn.utils.rnn.pad_packed_sequence(want[0], total_length=steps)[0]
        torch.testing.assert_close(got[0], want_out, **tol[dtype])
        torch.testing.assert_close(got[1], want[1], **tol[dtype])
        x_grad = x.clone().requires_grad_()
        ours(x_grad, lengths=lengths)[0].sin().sum().backward()
        x_ref = x.clone().requires_grad_()
        out_ref = ref(x_ref if packed is None else
                      nn.utils.rnn.pack_padded_sequence(x_ref, lengths, enforce_sorted=False))[0]
        if packed is not None:
            out_ref = nn.utils.rnn.pad_packed_sequence(out_ref, total_length=steps)[0]
        out_ref.sin().sum().backward()
        torch.testing.assert_close(x_grad.grad, x_ref.grad, **tol[dtype])
        torch.testing.assert_close(ours.weight_hh_l0.grad, ref.weight_hh_l0.grad, **tol[dtype])
        with torch.no_grad():
            for module in (ref, ours):
                module.zero_grad()
                module.weight_hh_l0.mul_(0.9)  # in place, between calls of the same kind
