"""The per-call fast paths of the sequence modules (remembered queries and backend choices, parameters read
anew on every call, cached environment values) must still see every change: replaced, parametrized or
reassigned weights, a new dtype, grad mode, requires_grad, environment variables and backend= spellings."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, backend_param
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
