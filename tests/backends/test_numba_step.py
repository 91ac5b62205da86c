"""The numba backend's one-step kernels (NumbaBackend.step): the paths the shared cell tests do not reach."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_param

import seqfast

pytestmark = pytest.mark.parametrize("backend", [backend_param("numba")])


def _pair(kind: str = "LSTMCell", dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(3, 4, dtype=dtype)
    ours = getattr(seqfast, kind)(3, 4, dtype=dtype, backend="numba")
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _loss(out) -> torch.Tensor:
    outs = out if isinstance(out, tuple) else (out,)
    return sum((i + 1.5) * o.sin().sum() for i, o in enumerate(outs))


def test_a_retained_graph_gives_the_same_gradients_twice(backend):
    _, ours = _pair()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    loss = _loss(ours(x))
    first = torch.autograd.grad(loss, [x, *ours.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *ours.parameters()])
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_second_derivatives_match_torch_nn(backend):
    ref, ours = _pair("GRUCell")
    x = torch.randn(2, 3, dtype=torch.float64)
    results = []
    for module in (ref, ours):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(_loss(module(xx)), xx, create_graph=True)
        results.append(torch.autograd.grad(g.pow(2).sum(), [xx, *module.parameters()]))
    torch.testing.assert_close(results[1], results[0])


def test_a_two_step_chain_matches_torch_nn(backend):
    # the second step's hx is the first's output: gradients flow through both kernels' d_h
    ref, ours = _pair()
    xs = torch.randn(2, 2, 3, dtype=torch.float64)
    grads = []
    for module in (ref, ours):
        x = xs.clone().requires_grad_()
        state = module(x[0])
        state = module(x[1], state)
        grads.append(torch.autograd.grad(_loss(state), [x, *module.parameters()]))
    torch.testing.assert_close(grads[1], grads[0])


def test_non_contiguous_weights_and_input_are_read_correctly(backend):
    ref, ours = _pair("RNNCell")
    for module in (ref, ours):
        w = module.weight_ih.detach()
        module.weight_ih.data = w.t().contiguous().t()  # same values, column-major
    x = torch.randn(3, 4, dtype=torch.float64)[:, 1:]  # non-contiguous rows
    assert not ours.weight_ih.is_contiguous() and not x.is_contiguous()
    torch.testing.assert_close(ours(x), ref(x))
    for module in (ref, ours):  # the gradient of a column-major weight, too
        _loss(module(x)).backward()
    torch.testing.assert_close([p.grad for p in ours.parameters()], [p.grad for p in ref.parameters()])


def test_a_parameter_of_another_dtype_raises(backend):
    _, ours = _pair("GRUCell")
    ours.bias_hh.data = ours.bias_hh.data.float()
    with pytest.raises(RuntimeError, match="bias_hh is torch.float32 on cpu, expected torch.float64"):
        ours(torch.randn(2, 3, dtype=torch.float64))


def test_a_weight_replaced_between_forward_and_backward_is_read_as_torch_nn_reads_it(backend):
    """The backward reuses the addresses its forward read, unless a weight's .data was swapped in between."""
    ref, ours = _pair()
    grads = []
    for module in (ref, ours):
        x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        h = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
        loss = _loss(module(x, (h, h)))
        module.weight_hh.data = torch.linspace(-1, 1, module.weight_hh.numel(), dtype=torch.float64).view_as(
            module.weight_hh)
        loss.backward()
        grads.append([x.grad, h.grad, *(p.grad for p in module.parameters())])
    torch.testing.assert_close(grads[1], grads[0])
