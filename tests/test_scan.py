"""The scan contract, backend by backend: lengths, reverse, initial state, and the errors of bad arguments."""

from __future__ import annotations

import pytest
import torch
from conftest import all_backends, assert_close, backend_param

import seqfast
from seqfast.registry import Weights, registry

SCAN_BACKENDS = [backend_param(b) for b in all_backends() if registry.backends[b].has_scan()]


def _inputs(cell: str, steps=5, batch=3, hidden=4, dtype=torch.float64, seed=0):
    spec = seqfast.get_cell(cell)
    gen = torch.Generator().manual_seed(seed)
    g = spec.num_gates
    x = torch.randn(steps, batch, g * hidden, generator=gen, dtype=dtype)
    state = tuple(torch.randn(batch, hidden, generator=gen, dtype=dtype) for _ in spec.state_names)
    w = Weights(weight_hh=torch.randn(g * hidden, hidden, generator=gen, dtype=dtype) / hidden**0.5,
                bias_hh=torch.randn(g * hidden, generator=gen, dtype=dtype))
    return x, state, w


def _manual(cell, x, state, w, lengths, reverse):
    """Each sequence on its own, cut to its length, walked in the requested direction with the reference step."""
    spec = seqfast.get_cell(cell)
    outs = torch.zeros(x.shape[0], x.shape[1], state[0].shape[1], dtype=x.dtype)
    finals = []
    for b in range(x.shape[1]):
        n = int(lengths[b]) if lengths is not None else x.shape[0]
        s = tuple(t[b : b + 1] for t in state)
        order = range(n - 1, -1, -1) if reverse else range(n)
        for t in order:
            s = spec.reference_step(x[t, b : b + 1], s, w)
            outs[t, b] = s[0][0]
        finals.append(s)
    return outs, tuple(torch.cat([f[i] for f in finals]) for i in range(spec.num_states))


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_scan_contract(backend, cell, reverse, with_lengths):
    dtypes = seqfast.get_backend(backend).dtypes
    dtype = torch.float64 if dtypes is None or torch.float64 in dtypes else torch.float32
    x, state, w = _inputs(cell, dtype=dtype)
    reasons = seqfast.explain(cell, dtype=x.dtype, level="scan")[backend]
    if reasons:
        pytest.skip("; ".join(reasons))
    lengths = torch.tensor([5, 2, 4]) if with_lengths else None
    out, final = seqfast.scan(cell, x, state, w, lengths, reverse, backend=backend)
    expected_out, expected_final = _manual(cell, x, state, w, lengths, reverse)
    assert_close(out, expected_out, "outputs", dtype)
    assert_close(final, expected_final, "final state", dtype)
    if lengths is not None:
        for b, n in enumerate(lengths.tolist()):
            assert torch.all(out[n:, b] == 0)


def test_scan_outputs_past_length_are_zero_even_with_nan_input():
    x, state, w = _inputs("gru")
    x[3:, 1] = float("nan")  # padding garbage must not leak into outputs or the final state
    out, (h,) = seqfast.scan("gru", x, state, w, torch.tensor([5, 2, 4]), backend="torch")
    assert torch.all(out[2:, 1] == 0)
    assert torch.isfinite(h).all()


def test_nan_inside_a_sequence_propagates_like_torch():
    x, state, w = _inputs("lstm", dtype=torch.float32)
    x[1, 0, 0] = float("nan")
    out, _ = seqfast.scan("lstm", x, state, w, backend="torch")
    assert torch.isnan(out[1:, 0]).any() and torch.isfinite(out[:, 1:]).all()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "x_proj": a["x_proj"][0]}, "x_proj: expected a 3-D tensor"),
        (lambda a: {**a, "x_proj": a["x_proj"][..., :-1]}, "last dim must be 4\\*hidden_size"),
        (lambda a: {**a, "x_proj": a["x_proj"][:0]}, "at least one time step"),
        (lambda a: {**a, "state0": a["state0"][:1]}, "expected a tuple of 2 tensors"),
        (lambda a: {**a, "state0": (a["state0"][0][:, :2], a["state0"][1])}, r"state0\['h'\]: expected shape \(3, 4\)"),
        (lambda a: {**a, "state0": (a["state0"][0].float(), a["state0"][1])}, r"state0\['h'\]: expected torch.float64"),
        (lambda a: {**a, "weights": Weights(bias_hh=None)}, "needs 'weight_hh'"),
        (lambda a: {**a, "lengths": torch.tensor([1, 2])}, "1-D tensor of 3 sequence lengths"),
    ],
    ids=["rank", "gates", "empty", "state-arity", "state-shape", "state-dtype", "no-weight", "lengths"],
)
def test_scan_argument_errors(mutate, match):
    x, state, w = _inputs("lstm")
    args = mutate({"x_proj": x, "state0": state, "weights": w, "lengths": None})
    with pytest.raises(ValueError, match=match):
        seqfast.scan("lstm", args["x_proj"], args["state0"], args["weights"], args["lengths"], backend="torch")


def test_scan_level_excludes_module_only_backends():
    x, state, w = _inputs("lstm")
    with pytest.raises(seqfast.BackendNotSupportedError, match="runs whole modules only"):
        seqfast.scan("lstm", x, state, w, backend="native")
