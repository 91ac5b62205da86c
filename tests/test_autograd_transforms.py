"""Autograd beyond one plain backward on the fused backends (numba, triton): second derivatives (create_graph=True,
gradient penalties, gradgradcheck) and torch.func transforms (grad, vjp, jacrev), each against torch.nn or the
torch reference backend."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_param
from torch.func import functional_call, grad, jacrev, vjp

import seqfast
from seqfast.registry import Weights

FUSED = [backend_param("numba"), backend_param("triton")]
KINDS = ["LSTM", "GRU", "RNN"]


def _pair(kind: str, backend: str, *, num_layers=1, bidirectional=False, seed=0):
    """A torch.nn module and the seqfast one of the same kind and parameters (float32: triton's dtype too)."""
    torch.manual_seed(seed)
    ref = getattr(torch.nn, kind)(3, 4, num_layers=num_layers, bidirectional=bidirectional)
    mod = getattr(seqfast, kind)(3, 4, num_layers=num_layers, bidirectional=bidirectional, backend=backend)
    mod.load_state_dict(ref.state_dict(), strict=True)
    return ref, mod


def _penalty_grads(module, x, h0):
    """Gradients of a gradient-penalty loss: sum(out) + |d sum(out^2) / d x|^2 (and / d h0), as in WGAN-GP.
    h0 = (): zero initial states (the modules' own path for hx=None)."""
    x = x.clone().requires_grad_()
    h0 = tuple(h.clone().requires_grad_() for h in h0)
    out, _ = module(x, (h0 if len(h0) > 1 else h0[0]) if h0 else None)
    d_inputs = torch.autograd.grad(out.pow(2).sum(), [x, *h0], create_graph=True)
    loss = out.sum() + sum(d.pow(2).sum() for d in d_inputs)
    leaves = [x, *h0, *module.parameters()]
    return torch.autograd.grad(loss, leaves, allow_unused=True)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h0", "h0"])
def test_gradient_penalty_matches_torch_nn(backend, kind, with_h0):
    ref, mod = _pair(kind, backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, generator=gen)
    states = 2 if kind == "LSTM" else 1
    h0 = tuple(torch.randn(1, 2, 4, generator=gen) for _ in range(states)) if with_h0 else ()
    want, got = _penalty_grads(ref, x, h0), _penalty_grads(mod, x, h0)
    names = ["x", *(f"h0[{i}]" for i in range(len(h0))), *(n for n, _ in mod.named_parameters())]
    for name, g, w in zip(names, got, want, strict=True):
        assert w is not None, name
        assert g is not None, f"{name}: no gradient where torch.nn has one"
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", [backend_param("numba")])
def test_gradient_penalty_bidirectional_with_lengths(backend):
    """Two layers, both directions, packed variable lengths: every layer-direction's backward is differentiable."""
    ref, mod = _pair("LSTM", backend, num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([4, 2, 3])

    def call(m):
        x_ = x.clone().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(x_, lengths, enforce_sorted=False)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(m(packed)[0])
        (d_x,) = torch.autograd.grad(out.pow(2).sum(), x_, create_graph=True)
        return torch.autograd.grad(out.sum() + d_x.pow(2).sum(), [x_, *m.parameters()])

    for name, g, w in zip(["x", *(n for n, _ in mod.named_parameters())], call(mod), call(ref), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def _scan_inputs(cell: str, dtype, hidden=3, steps=4, batch=2, seed=0):
    spec = seqfast.get_cell(cell)
    gen = torch.Generator().manual_seed(seed)
    g = spec.num_gates
    x = torch.randn(steps, batch, g * hidden, generator=gen, dtype=dtype)
    state = tuple(torch.randn(batch, hidden, generator=gen, dtype=dtype) for _ in spec.state_names)
    w_hh = torch.randn(g * hidden, hidden, generator=gen, dtype=dtype) / hidden**0.5
    b_hh = torch.randn(g * hidden, generator=gen, dtype=dtype)
    return x, state, w_hh, b_hh


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_scan_gradient_penalty_matches_reference(backend, cell):
    """seqfast.scan (x_proj given, lengths, reverse): second derivatives as the torch backend's."""
    x, state, w_hh, b_hh = _scan_inputs(cell, torch.float32)
    lengths = torch.tensor([4, 2])

    def call(name):
        leaves = [t.clone().requires_grad_() for t in (x, *state, w_hh, b_hh)]
        xp, *st, w, b = leaves
        out, final = seqfast.scan(cell, xp, tuple(st), Weights(weight_hh=w, bias_hh=b), lengths, True,
                                  backend=name)
        d = torch.autograd.grad(out.pow(2).sum() + final[-1].sum(), [xp, w], create_graph=True)
        return torch.autograd.grad(out.sum() + sum(g.pow(2).sum() for g in d), leaves)

    for i, (g, w) in enumerate(zip(call(backend), call("torch"), strict=True)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=f"leaf {i}")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_scan_gradgradcheck_numba(cell):
    x, state, w_hh, b_hh = _scan_inputs(cell, torch.float64, hidden=2, steps=3)
    leaves = [t.requires_grad_() for t in (x, *state, w_hh, b_hh)]
    n = len(state)

    def f(xp, *rest):
        out, final = seqfast.scan(cell, xp, rest[:n], Weights(weight_hh=rest[n], bias_hh=rest[n + 1]),
                                  torch.tensor([3, 2]), backend="numba")
        return out, *final

    assert torch.autograd.gradgradcheck(f, leaves)


def _functional_pair(kind: str, backend: str):
    ref, mod = _pair(kind, backend)
    params = {n: p.detach() for n, p in ref.named_parameters()}
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(3))
    return ref, mod, params, x


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_func_grad_matches_torch_nn(backend, kind):
    ref, mod, params, x = _functional_pair(kind, backend)

    def loss(m, p, x):
        out, _ = functional_call(m, p, (x,))
        return out.sin().sum()

    torch.testing.assert_close(grad(lambda x: loss(mod, params, x))(x), grad(lambda x: loss(ref, params, x))(x),
                               rtol=1e-4, atol=1e-5)
    got = grad(lambda p: loss(mod, p, x))(params)
    want = grad(lambda p: loss(ref, p, x))(params)
    for name in params:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_func_jacrev_and_vjp_match_torch_nn(backend, kind):
    ref, mod, params, x = _functional_pair(kind, backend)

    def output(m):
        return lambda x: functional_call(m, params, (x,))[0]

    torch.testing.assert_close(jacrev(output(mod))(x), jacrev(output(ref))(x), rtol=1e-4, atol=1e-5)
    cotangent = torch.randn(4, 2, 4, generator=torch.Generator().manual_seed(4))
    (got,) = vjp(output(mod), x)[1](cotangent)
    (want,) = vjp(output(ref), x)[1](cotangent)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_func_grad_of_scan(backend):
    """torch.func.grad through seqfast.scan itself, against the torch backend's."""
    x, state, w_hh, b_hh = _scan_inputs("lstm", torch.float32)

    def loss(name):
        def f(xp, w):
            out, final = seqfast.scan("lstm", xp, state, Weights(weight_hh=w, bias_hh=b_hh), backend=name)
            return out.tanh().sum() + final[1].sum()
        return grad(f, argnums=(0, 1))(x, w_hh)

    for g, w in zip(loss(backend), loss("torch"), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
