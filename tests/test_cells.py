"""Cell definitions: registration checks, and each built-in cell's pointwise math against its reference step.

The pointwise forward and backward are what the fused backends compile; here they run in plain torch through the
FusedBackend custom-op glue (tests/pointwise_backend.py), which also checks that glue with torch.compile.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from pointwise_backend import PointwiseTorchBackend

import seqfast
from seqfast import CellSpec
from seqfast.cells import BUILTIN_CELLS, TORCH_MATH
from seqfast.cells.common import pointwise_recurrent_term
from seqfast.registry import registry

CELLS = [c.name for c in BUILTIN_CELLS]


@pytest.fixture(scope="module", autouse=True)
def pointwise_backend():
    backend = seqfast.register_backend(PointwiseTorchBackend())
    yield backend
    del registry.backends[backend.name]


@pytest.mark.parametrize("cell", CELLS)
def test_pointwise_forward_equals_reference_step(cell):
    spec = seqfast.get_cell(cell)
    gen = torch.Generator().manual_seed(0)
    g, hidden = spec.num_gates, 6
    x = torch.randn(4, g * hidden, generator=gen, dtype=torch.float64) * 3
    state = tuple(torch.randn(4, hidden, generator=gen, dtype=torch.float64) for _ in spec.state_names)
    w = seqfast.Weights(weight_hh=torch.randn(g * hidden, hidden, generator=gen, dtype=torch.float64),
                        bias_hh=torch.randn(g * hidden, generator=gen, dtype=torch.float64))
    expected = spec.reference_step(x, state, w)
    hg = pointwise_recurrent_term(spec, x, state, w, (), TORCH_MATH)  # for a staged cell, through its stages
    got = spec.pointwise.forward(TORCH_MATH, x.chunk(g, 1), hg.chunk(g, 1), state, ())
    assert_close(got, expected, f"{cell} pointwise forward", torch.float64)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_pointwise_backward_through_fused_glue(cell, reverse):
    spec = seqfast.get_cell(cell)
    if spec.pointwise.stages:
        pytest.skip("staged cells: the test double declines them (tests/test_staged_recurrence.py checks them)")
    gen = torch.Generator().manual_seed(1)
    g, hidden, batch, steps = spec.num_gates, 5, 3, 6
    leaves = [torch.randn(steps, batch, g * hidden, generator=gen, dtype=torch.float64)]
    leaves += [torch.randn(batch, hidden, generator=gen, dtype=torch.float64) for _ in spec.state_names]
    leaves += [torch.randn(g * hidden, hidden, generator=gen, dtype=torch.float64) / 2,
               torch.randn(g * hidden, generator=gen, dtype=torch.float64)]
    lengths = torch.tensor([6, 2, 4])
    results = []
    for backend in ("torch", "pointwise_torch"):
        ts = [t.clone().requires_grad_() for t in leaves]
        x, state, w = ts[0], tuple(ts[1 : 1 + spec.num_states]), ts[1 + spec.num_states :]
        out, final = seqfast.scan(cell, x, state, {"weight_hh": w[0], "bias_hh": w[1]}, lengths, reverse,
                                  backend=backend)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        loss = loss + sum((f * (i + 2)).sum() for i, f in enumerate(final))
        results.append((out, final, torch.autograd.grad(loss, ts)))
    (o1, f1, g1), (o2, f2, g2) = results
    assert_close(o2, o1, "outputs", torch.float64)
    assert_close(f2, f1, "final state", torch.float64)
    for name, a, b in zip(["x_proj", *spec.state_names, "weight_hh", "bias_hh"], g2, g1, strict=True):
        assert_close(a, b, f"grad {name}", torch.float64)


def test_fused_glue_gradcheck():
    lstm = seqfast.LSTM(2, 3, bidirectional=True, backend="pointwise_torch").double()
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)

    def run(inp, *weights):
        params = dict(zip((n for n, _ in lstm.named_parameters()), weights, strict=True))
        out, (h, c) = torch.func.functional_call(lstm, params, (inp,), {"lengths": torch.tensor([4, 3])})
        return out, h, c

    assert torch.autograd.gradcheck(run, (x, *lstm.parameters()))


def test_fused_glue_compiles_fullgraph_and_trains():
    torch.manual_seed(0)
    lstm = seqfast.LSTM(3, 4, num_layers=2, backend="pointwise_torch")
    eager = seqfast.LSTM(3, 4, num_layers=2, backend="torch")
    eager.load_state_dict(lstm.state_dict())

    def head(module, x):
        out, (h, c) = module(x)
        return out.pow(2).mean() + h.sum() * 0.1

    compiled = torch.compile(lambda x: head(lstm, x), fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 2, 3)
    loss = compiled(x)
    loss.backward()
    ref = head(eager, x)
    ref.backward()
    assert_close(loss, ref, "compiled loss")
    for (name, a), b in zip(lstm.named_parameters(), eager.parameters(), strict=True):
        assert_close(a.grad, b.grad, f"compiled grad {name}")


def test_register_cell_validates():
    with pytest.raises(ValueError, match="num_gates must be a positive int"):
        CellSpec("bad", 0, ("h",), lambda x, s, w: s)
    with pytest.raises(ValueError, match="name must be lowercase"):
        CellSpec("Bad Name", 1, ("h",), lambda x, s, w: s)
    with pytest.raises(ValueError, match="recurrence must be one of"):
        CellSpec("bad", 1, ("h",), lambda x, s, w: s, recurrence="sparse")
    with pytest.raises(ValueError, match="already registered"):
        seqfast.register_cell(seqfast.get_cell("gru"))
    with pytest.raises(ValueError, match="reference_step failed on x_t"):
        seqfast.register_cell(CellSpec("bad_math", 2, ("h",), lambda x, s, w: (x @ x,)))
    with pytest.raises(ValueError, match="new 'h' has shape"):
        seqfast.register_cell(CellSpec("bad_shape", 2, ("h",), lambda x, s, w: (x,)))
    assert "bad_math" not in registry.cells and "bad_shape" not in registry.cells


def test_register_backend_validates():
    with pytest.raises(TypeError, match="expects a seqfast.Backend instance"):
        seqfast.register_backend(object())
    with pytest.raises(ValueError, match="already registered"):
        seqfast.register_backend(PointwiseTorchBackend())
    with pytest.raises(ValueError, match="implements neither scan nor run_stack"):
        seqfast.register_backend(type("Empty", (seqfast.Backend,), {"name": "empty"})())
