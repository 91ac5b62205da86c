"""Inputs and arguments at the edges, against torch.nn: the exception type it raises (seqfast's is an instance of
it), empty batches, hx of the wrong dtype or device, meta tensors, constructor arguments and repr."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import all_backends, assert_close, backend_param

import seqfast

BACKENDS = [backend_param(name) for name in all_backends()]


def _raised(call) -> type[BaseException] | None:
    """The type of the exception call() raises, or None."""
    try:
        call()
    except Exception as exc:  # the type is what the test compares against
        return type(exc)
    return None


def _pair(kind: str, *args, backend: str | None = None, **kwargs):
    """(torch.nn module, seqfast module of the same class with the same weights)."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(*args, **kwargs)
    ours = getattr(seqfast, kind)(*args, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


# --- exception types: torch.nn's, with seqfast's messages ---------------------------------------------------------

def _x(*shape, **kw):
    return torch.randn(*shape, **kw)


def _z(*shape, **kw):
    return torch.zeros(*shape, **kw)


# (module class, call on a module built as Class(4, 5)); every case is one torch.nn rejects
BAD_CALLS = {
    "no-steps": ("LSTM", lambda m: m(_x(0, 2, 4))),
    "no-steps-unbatched": ("GRU", lambda m: m(_x(0, 4))),
    "feature-size": ("LSTM", lambda m: m(_x(3, 2, 3))),
    "input-rank": ("LSTM", lambda m: m(_x(3, 2, 4, 1))),
    "input-dtype": ("GRU", lambda m: m(_x(3, 2, 4, dtype=torch.float64))),
    "input-device": ("LSTM", lambda m: m(_x(3, 2, 4, device="meta"))),
    "hx-batch": ("LSTM", lambda m: m(_x(3, 2, 4), (_z(1, 3, 5), _z(1, 3, 5)))),
    "hx-size": ("LSTM", lambda m: m(_x(3, 2, 4), (_z(1, 2, 6), _z(1, 2, 5)))),
    "hx-layers": ("GRU", lambda m: m(_x(3, 2, 4), _z(2, 2, 5))),
    "hx-dtype": ("LSTM", lambda m: m(_x(3, 2, 4), (_z(1, 2, 5, dtype=torch.float64), _z(1, 2, 5)))),
    "cx-dtype": ("LSTM", lambda m: m(_x(3, 2, 4), (_z(1, 2, 5), _z(1, 2, 5, dtype=torch.float64)))),
    "hx-int": ("GRU", lambda m: m(_x(3, 2, 4), _z(1, 2, 5, dtype=torch.int64))),
    "hx-device": ("GRU", lambda m: m(_x(3, 2, 4), _z(1, 2, 5, device="meta"))),
    "hx-2d-batched": ("LSTM", lambda m: m(_x(3, 2, 4), (_z(2, 5), _z(2, 5)))),
    "hx-3d-unbatched": ("GRU", lambda m: m(_x(3, 4), _z(1, 1, 5))),
    "three-lstm-states": ("LSTM", lambda m: m(_x(3, 2, 4), (_z(1, 2, 5),) * 3)),
    "cell-feature-size": ("LSTMCell", lambda m: m(_x(2, 3))),
    "cell-input-rank": ("GRUCell", lambda m: m(_x(2, 3, 4))),
    "cell-input-dtype": ("LSTMCell", lambda m: m(_x(2, 4, dtype=torch.float64))),
    "cell-input-device": ("GRUCell", lambda m: m(_x(2, 4, device="meta"))),
    "cell-hx-batch": ("LSTMCell", lambda m: m(_x(2, 4), (_z(3, 5), _z(3, 5)))),
    "cell-hx-size": ("GRUCell", lambda m: m(_x(2, 4), _z(2, 6))),
    "cell-hx-dtype": ("LSTMCell", lambda m: m(_x(2, 4), (_z(2, 5, dtype=torch.float64), _z(2, 5)))),
    "cell-hx-int": ("GRUCell", lambda m: m(_x(2, 4), _z(2, 5, dtype=torch.int64))),
    "cell-hx-device": ("RNNCell", lambda m: m(_x(2, 4), _z(2, 5, device="meta"))),
    "cell-hx-1d-batched": ("GRUCell", lambda m: m(_x(2, 4), _z(5))),
    "cell-hx-2d-unbatched": ("LSTMCell", lambda m: m(_x(4), (_z(1, 5), _z(1, 5)))),
    "cell-three-states": ("LSTMCell", lambda m: m(_x(2, 4), (_z(2, 5),) * 3)),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_what_torch_nn_raises(case):
    kind, call = BAD_CALLS[case]
    ref, ours = _pair(kind, 4, 5)
    expected = _raised(lambda: call(ref))
    assert expected is not None, f"torch.nn accepts {case}: not a case for this test"
    with pytest.raises(expected) as info:
        call(ours)
    assert isinstance(info.value, seqfast.InputError), f"{case}: {type(info.value).__name__}: {info.value}"


def test_lstm_cell_rejects_a_c_state_of_another_dtype():
    # torch.nn's LSTMCell lets a float64 c through (its result is then float64); every other state of the wrong
    # dtype raises there, and here a c state does too
    with pytest.raises(RuntimeError, match=r"hx: expected c as torch.float32 on cpu like the input, got torch.float64"):
        seqfast.LSTMCell(4, 5)(_x(2, 4), (_z(2, 5), _z(2, 5, dtype=torch.float64)))


# --- hx dtype and device, on every backend -------------------------------------------------------------------------

HX_VARIANTS = {"int64": {"dtype": torch.int64}, "float64": {"dtype": torch.float64},
               "float16": {"dtype": torch.float16}, "meta": {"device": "meta"}}


@pytest.mark.parametrize("hx", list(HX_VARIANTS))
@pytest.mark.parametrize("kind", ["GRUCell", "LSTMCell", "GRU", "LSTM"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hx_of_another_dtype_or_device_is_rejected(backend, kind, hx):
    ref, ours = _pair(kind, 4, 8, backend=backend)
    lead = (3,) if kind.endswith("Cell") else (1, 3)
    x = _x(3, 4) if kind.endswith("Cell") else _x(2, 3, 4)
    h = _z(*lead, 8, **HX_VARIANTS[hx])
    state = (h, _z(*lead, 8)) if kind.startswith("LSTM") else h
    expected = _raised(lambda: ref(x, state))
    assert expected is not None
    with pytest.raises(expected, match=r"hx: expected h as torch.float32 on cpu"):
        ours(x, state)


# --- meta tensors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["GRUCell", "LSTM"])
def test_meta_input_runs_like_torch_nn_and_numba_declines_it(kind):
    cell = kind.endswith("Cell")
    x = _x(3, 4, device="meta") if cell else _x(2, 3, 4, device="meta")
    expected = getattr(torch.nn, kind)(4, 8, device="meta")(x)
    got = getattr(seqfast, kind)(4, 8, device="meta")(x)
    if not cell:
        expected, got = expected[0], got[0]
    assert got.device.type == "meta" and got.shape == expected.shape and got.dtype == expected.dtype
    with pytest.raises(seqfast.BackendNotSupportedError, match="device 'meta' not supported"):
        getattr(seqfast, kind)(4, 8, device="meta", backend="numba")(x)


# --- empty batch ----------------------------------------------------------------------------------------------------

def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("lengths", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_matches_torch_nn(backend, kind, lengths, train):
    ref, ours = _pair(kind, 4, 5, num_layers=2, bidirectional=True, backend=backend)
    x = _x(3, 0, 4)
    outputs = []
    for module in (ref, ours):
        xi = x.clone().requires_grad_(train)
        kw = {"lengths": torch.zeros(0, dtype=torch.int64)} if lengths and module is ours else {}
        with torch.set_grad_enabled(train):
            out, state = module(xi, **kw)
        if train:
            (out.sum() + sum(s.sum() for s in (state if isinstance(state, tuple) else (state,)))).backward()
        outputs.append((out, state, xi.grad, _grads(module)))
    (out_r, state_r, dx_r, grads_r), (out_o, state_o, dx_o, grads_o) = outputs
    assert out_o.shape == out_r.shape == (3, 0, 10)
    for s_o, s_r in zip(*(s if isinstance(s, tuple) else (s,) for s in (state_o, state_r)), strict=True):
        assert s_o.shape == s_r.shape
    if train:
        assert dx_o is not None and dx_o.shape == x.shape
        for name, g_r in grads_r.items():
            assert (g_r is None) == (grads_o[name] is None), name
            if g_r is not None:
                assert_close(grads_o[name], g_r, f"{backend} {kind} d{name}")


@pytest.mark.parametrize("hx", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_cells_match_torch_nn(backend, kind, train, hx):
    ref, ours = _pair(kind, 4, 5, backend=backend)
    for module in (ref, ours):
        x = _x(0, 4, requires_grad=train)
        state = None
        if hx:
            state = (_z(0, 5), _z(0, 5)) if kind == "LSTMCell" else _z(0, 5)
        with torch.set_grad_enabled(train):
            new = module(x, state)
        first = new[0] if isinstance(new, tuple) else new
        assert first.shape == (0, 5)
        if train:
            first.sum().backward()
            assert x.grad is not None and x.grad.shape == x.shape
    for name, g_r in _grads(ref).items():
        g_o = _grads(ours)[name]
        assert (g_r is None) == (g_o is None), name
        if g_r is not None:
            assert_close(g_o, g_r, f"{backend} {kind} d{name}")


def test_empty_lengths_are_checked_without_a_reduction_error():
    with pytest.raises(ValueError, match="1-D tensor of 0 sequence lengths"):
        seqfast.GRU(4, 5)(_x(3, 0, 4), lengths=torch.zeros(1, dtype=torch.int64))


# --- the numba backend's weight views -------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("backend", [backend_param("numba")])
def test_weight_with_new_strides_over_the_same_memory_is_read_anew(backend, train):
    # weight_hh of an RNN is [H, H]: its transpose has the same memory, shape and dtype, only the strides differ
    ref, ours = _pair("RNN", 3, 4, backend=backend)
    x = _x(5, 2, 3)
    with torch.set_grad_enabled(train):
        ours(x)  # the weight's view is made and kept here
        for module in (ref, ours):
            module.weight_hh_l0.data = module.weight_hh_l0.data.t()
        assert_close(ours(x)[0], ref(x)[0], "after weight_hh_l0.data = weight_hh_l0.data.t()")


# --- constructors ---------------------------------------------------------------------------------------------------

BAD_ARGUMENTS = {
    "input-size-0": ("LSTM", (0, 5), {}),
    "hidden-size-0": ("GRU", (3, 0), {}),
    "negative-input-size": ("RNN", (-1, 5), {}),
    "float-input-size": ("LSTM", (3.0, 5), {}),
    "float-hidden-size": ("GRU", (3, 5.0), {}),
    "str-input-size": ("RNN", ("3", 5), {}),
    "num-layers-0": ("LSTM", (3, 5), {"num_layers": 0}),
    "float-num-layers": ("LSTM", (3, 5), {"num_layers": 2.0}),
    "negative-proj-size": ("LSTM", (3, 5), {"proj_size": -1}),
    "float-proj-size": ("LSTM", (3, 5), {"proj_size": 2.0}),
    "proj-size-too-big": ("LSTM", (3, 5), {"proj_size": 5}),
    "int-bias": ("GRU", (3, 5), {"bias": 0}),
    "int-batch-first": ("LSTM", (3, 5), {"batch_first": 1}),
    "dropout-out-of-range": ("GRU", (3, 5), {"dropout": 2}),
    "cell-float-input-size": ("LSTMCell", (3.0, 5), {}),
    "cell-float-hidden-size": ("GRUCell", (3, 5.0), {}),
    "cell-negative-input-size": ("RNNCell", (-1, 5), {}),
    "cell-negative-hidden-size": ("LSTMCell", (3, -2), {}),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_constructor_argument_raises_what_torch_nn_raises(case):
    kind, args, kwargs = BAD_ARGUMENTS[case]
    expected = _raised(lambda: getattr(torch.nn, kind)(*args, **kwargs))
    assert expected is not None, f"torch.nn accepts {case}: not a case for this test"
    with pytest.raises(expected, match=r"(input_size|hidden_size|num_layers|proj_size|bias|batch_first|dropout)"):
        getattr(seqfast, kind)(*args, **kwargs)


REPR_CASES = [
    ("LSTM", (3, 5), {}),
    ("LSTM", (3, 5, 2, False, True, 0.5, True), {"proj_size": 2}),
    ("GRU", (3, 5), {"dropout": 1, "num_layers": 2}),
    ("GRU", (3, 5), {"bias": False, "batch_first": True}),
    ("RNN", (3, 5), {"nonlinearity": "relu", "bidirectional": True}),
    ("LSTMCell", (3, 5), {}),
    ("GRUCell", (3, 5), {"bias": False}),
    ("RNNCell", (3, 5), {"nonlinearity": "relu", "bias": False}),
    ("RNNCell", (3, 5), {"nonlinearity": "tanh"}),
]


@pytest.mark.parametrize("kind, args, kwargs", REPR_CASES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(REPR_CASES)])
def test_repr_is_torch_nn_s(kind, args, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout with one layer
        assert repr(getattr(seqfast, kind)(*args, **kwargs)) == repr(getattr(torch.nn, kind)(*args, **kwargs))


def test_repr_names_a_generic_cell_and_a_chosen_backend():
    assert repr(seqfast.Recurrent("gru", 3, 5, num_layers=2)) == "Recurrent('gru', 3, 5, num_layers=2)"
    assert repr(seqfast.RecurrentCell("gru", 3, 5)) == "RecurrentCell('gru', 3, 5)"
    assert repr(seqfast.LSTM(3, 5, backend="torch")) == "LSTM(3, 5, backend='torch')"
    assert repr(seqfast.GRUCell(3, 5, backend="torch")) == "GRUCell(3, 5, backend='torch')"
