"""The numba backend against the torch reference (scan level) and torch.nn (module level), forward and backward,
and what it declares it supports."""

from __future__ import annotations

import pytest
import torch

import seqfast
from seqfast.cells.common import recurrent_term
from seqfast.registry import CellSpec, Pointwise, Query

numba = pytest.importorskip("numba")

from numba_cases import BUILTIN, TOL, compare_with_reference, fresh_plans, make_inputs, run_python  # noqa: E402, F401 (autouse fixture)

from seqfast.backends import numba as numba_backend  # noqa: E402
from seqfast.backends.numba import availability  # noqa: E402

SCAN_CASES = [
    # (T, B, H, reverse, lengths, dtype)
    (7, 3, 5, False, False, torch.float32),
    (7, 3, 5, True, True, torch.float32),
    (11, 4, 130, False, True, torch.float32),  # H > one 128-unit chunk, odd remainder
    (5, 1, 1, True, False, torch.float32),
    (6, 5, 9, True, True, torch.float64),
    (4, 2, 3, False, False, torch.float64),
]


def _case_id(case) -> str:
    steps, batch, hidden, reverse, lengths, dtype = case
    return (f"T{steps}-B{batch}-H{hidden}" + ("-rev" if reverse else "") + ("-len" if lengths else "")
            + ("-f32" if dtype == torch.float32 else "-f64"))


@pytest.mark.parametrize("case", SCAN_CASES, ids=_case_id)
@pytest.mark.parametrize("cell_name", BUILTIN)
def test_scan_matches_reference(cell_name: str, case) -> None:
    steps, batch, hidden, reverse, lengths, dtype = case
    cell = seqfast.get_cell(cell_name)
    x, state0, weights, lens = make_inputs(cell, steps, batch, hidden, dtype, seed=hash(case) % 1000, lengths=lengths)
    compare_with_reference(cell, x, state0, weights, lens, reverse, dtype)


@pytest.mark.parametrize("cell_name", ["lstm", "gru"])
def test_scan_without_bias(cell_name: str) -> None:
    cell = seqfast.get_cell(cell_name)
    x, state0, weights, lens = make_inputs(cell, 6, 3, 4, torch.float64, seed=3, bias=False, lengths=True)
    compare_with_reference(cell, x, state0, weights, lens, True, torch.float64)



def test_inference_fast_path_matches_op() -> None:
    cell = seqfast.get_cell("lstm")
    x, state0, weights, lens = make_inputs(cell, 6, 3, 4, torch.float32, seed=4, lengths=True)
    with torch.no_grad():
        direct = seqfast.scan(cell, x, state0, weights, lens, True, backend="numba")
    via_op = seqfast.scan(cell, x, state0, weights, lens, True, backend="numba")
    assert via_op[0].grad_fn is not None
    torch.testing.assert_close(direct[0], via_op[0].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_layer_projection_takes_its_gradient_only_when_the_graph_is_freed(monkeypatch, bidirectional: bool) -> None:
    """In a module's layer (FusedBackend.layer) d_x_proj is written over the layer's own x_proj once the graph is
    freed (GRU reads x_proj in its backward), never while it is retained: every pass gives torch.nn's gradients."""
    seen: list[tuple[str, bool]] = []
    real = numba_backend.NumbaBackend.backward

    def spy(self, inputs, *args, **kwargs):
        result = real(self, inputs, *args, **kwargs)
        seen.append((kwargs.get("x_proj_mode", "keep"), result[0].data_ptr() == inputs.x_proj.data_ptr()))
        return result

    monkeypatch.setattr(numba_backend.NumbaBackend, "backward", spy)
    torch.manual_seed(0)
    ref = torch.nn.GRU(5, 7, num_layers=2, bidirectional=bidirectional)
    ours = seqfast.GRU(5, 7, num_layers=2, bidirectional=bidirectional, backend="numba")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 5, requires_grad=True)
    weight = torch.linspace(-1, 1, 6 * 3 * 7 * (2 if bidirectional else 1))

    def grads(model, passes):
        out, _ = model(x)
        loss = (out.flatten() * weight).sum()
        return [torch.autograd.grad(loss, [x, *model.parameters()], retain_graph=i < passes - 1)
                for i in range(passes)]

    first, second, last = grads(ours, 3)
    layers = 2 * (2 if bidirectional else 1)
    assert seen == [("keep", False)] * 2 * layers + [("consume", True)] * layers
    expected = grads(ref, 1)[0]
    for a, b, c, e in zip(first, second, last, expected, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
        torch.testing.assert_close(a, e, **TOL[torch.float32])


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_saved_products_are_scratch_only_when_the_graph_is_freed(monkeypatch, reverse: bool) -> None:
    """The backward reuses the forward's saved h W_hh^T as its gradient buffer, except when the graph is retained
    for another backward: then every pass gives the same gradients, equal to the reference's."""
    cell = seqfast.get_cell("gru")
    modes: list[str] = []
    real = numba_backend.NumbaBackend.backward

    def spy(self, *args, saved_mode="keep"):
        modes.append(saved_mode)
        return real(self, *args, saved_mode=saved_mode)

    monkeypatch.setattr(numba_backend.NumbaBackend, "backward", spy)
    x, state0, weights, lens = make_inputs(cell, 5, 4, 6, torch.float32, seed=3, lengths=True)
    leaves = [x, *state0, *(w for w in weights.values() if w is not None)]
    out, final = seqfast.scan(cell, x, state0, weights, lens, reverse, backend="numba")
    loss = (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum() + final[0].sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves, retain_graph=True)
    last = torch.autograd.grad(loss, leaves)
    assert modes == ["keep", "keep", "consume"]
    out_r, final_r = seqfast.scan(cell, x, state0, weights, lens, reverse, backend="torch")
    expected = torch.autograd.grad((out_r * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
                                   + final_r[0].sum(), leaves)
    for a, b, c, e in zip(first, second, last, expected, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
        torch.testing.assert_close(a, e, **TOL[torch.float32])


@pytest.mark.parametrize("cell_name", BUILTIN)
def test_gradcheck_float64(cell_name: str) -> None:
    cell = seqfast.get_cell(cell_name)
    x, state0, weights, lens = make_inputs(cell, 4, 3, 3, torch.float64, seed=11, lengths=True)
    names = [n for n, w in weights.items() if w is not None]

    def fn(x, *rest):
        st, ws = rest[: cell.num_states], rest[cell.num_states :]
        out, final = seqfast.scan(cell, x, tuple(st), dict(zip(names, ws, strict=True)), lens, True, backend="numba")
        return (out, *final)

    assert torch.autograd.gradcheck(fn, (x, *state0, *(weights[n] for n in names)), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("cell_name", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_nan_and_inf_propagate_like_torch(cell_name: str) -> None:
    cell = seqfast.get_cell(cell_name)
    x, state0, weights, _ = make_inputs(cell, 6, 4, 5, torch.float32, seed=7)
    x = x.detach().clone()
    x[1, 0, 0] = float("nan")  # row 0 turns NaN from step 1 on, through the recurrence
    x[2, 1, :] = float("inf")  # saturating inputs: no NaN from the fast tanh/sigmoid
    x[3, 2, :] = -float("inf")
    x[4, 3, :] = 1e30
    ref, ref_final = seqfast.scan(cell, x, state0, weights, None, False, backend="torch")
    got, got_final = seqfast.scan(cell, x, state0, weights, None, False, backend="numba")
    torch.testing.assert_close(got, ref, **TOL[torch.float32], equal_nan=True)
    for a, b in zip(got_final, ref_final, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32], equal_nan=True)
    assert torch.isnan(got[:, 0]).any()



def test_uncompilable_cell_gets_a_reason() -> None:
    def fwd(m, xg, hg, state, params):
        return (m.erf(xg[0] + hg[0]),)

    cell = CellSpec(name="test_numba_bad", num_gates=1, state_names=("h",),
                    reference_step=lambda x, s, w: (x + recurrent_term(s[0], w, 1, "dense"),),
                    pointwise=Pointwise(fwd))
    reasons = seqfast.get_backend("numba").not_supported_reasons(Query(cell))
    assert any("m.erf" in r for r in reasons), reasons


def test_reasons_for_unsupported_queries() -> None:
    backend = seqfast.get_backend("numba")
    lstm = seqfast.get_cell("lstm")
    assert any("proj_size" in r for r in backend.not_supported_reasons(Query(lstm, proj_size=3)))
    assert any("device" in r for r in backend.not_supported_reasons(Query(lstm, device="cuda")))
    assert any("float16" in r for r in backend.not_supported_reasons(Query(lstm, dtype=torch.float16)))
    assert backend.not_supported_reasons(Query(lstm, requires_grad=True)) == []
    with pytest.raises(seqfast.BackendNotSupportedError, match="proj_size"):
        seqfast.LSTM(4, 6, proj_size=3, backend="numba")(torch.randn(3, 2, 4))


def test_static_rule_takes_numba_only_where_torch_nn_has_no_fused_kernel() -> None:
    """Without calibration (tests/conftest.py turns it off), numba takes the cells torch.nn runs as per-step ops
    (but for a one-step RNN in training), and LSTM, whose oneDNN kernel may be faster depending on shape and CPU,
    stays on native."""
    pick = seqfast.current_backend
    assert pick("gru", batch_size=1, hidden_size=32, seq_len=100, requires_grad=True) == "numba"
    assert pick("rnn_tanh", batch_size=64, hidden_size=512, seq_len=50) == "numba"
    assert pick("gru", batch_size=64, hidden_size=512, seq_len=50, requires_grad=True) == "numba"
    assert pick("peephole_lstm", batch_size=8, hidden_size=64, seq_len=100) == "numba"
    for batch, hidden, grad in [(64, 512, True), (1, 32, True), (8, 64, False), (1, 80, True), (256, 512, False)]:
        assert pick("lstm", batch_size=batch, hidden_size=hidden, seq_len=100, requires_grad=grad) == "native"
    # one training step of a one-gate cell: torch.nn's step is its two products and one op, nothing to fuse
    assert pick("rnn_tanh", batch_size=1, hidden_size=32, seq_len=1, requires_grad=True) == "native"
    assert pick("rnn_tanh", batch_size=1, hidden_size=32, seq_len=2, requires_grad=True) == "numba"
    assert pick("rnn_tanh", batch_size=1, hidden_size=32, seq_len=1) == "numba"
    assert pick("gru", batch_size=1, hidden_size=32, seq_len=1, requires_grad=True) == "numba"


def test_numba_missing_is_a_reason(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else real(name, *a))
    availability.recheck()
    try:
        backend = seqfast.get_backend("numba")
        assert backend.unavailable_reason() == "numba not installed (pip install 'seqfast[numba]')"
        assert "numba" not in seqfast.available_backends()
        assert seqfast.current_backend("lstm") != "numba"
    finally:
        monkeypatch.undo()
        availability.recheck()



# --- module level: seqfast.<Cell>(backend="numba") vs torch.nn -----------------------------------------------------
MODULES = [
    ("LSTM", {}),
    ("GRU", {}),
    ("RNN", {"nonlinearity": "tanh"}),
    ("RNN", {"nonlinearity": "relu"}),
]


@pytest.mark.parametrize("name,kwargs", MODULES, ids=["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_module_matches_torch_nn_packed_bidirectional(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(5, 7, num_layers=2, bidirectional=True, **kwargs).double()
    mod = getattr(seqfast, name)(5, 7, num_layers=2, bidirectional=True, backend="numba", **kwargs).double()
    mod.load_state_dict(ref.state_dict())
    lengths = torch.tensor([4, 9, 2, 6])  # unsorted
    x = torch.randn(9, 4, 5, dtype=torch.float64)
    outs, grads = [], []
    for model in (ref, mod):
        xi = x.clone().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(xi, lengths, enforce_sorted=False)
        out, hidden = model(packed)
        padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out)
        finals = hidden if isinstance(hidden, tuple) else (hidden,)
        loss = (padded * torch.linspace(-1, 1, padded.numel(), dtype=padded.dtype).view_as(padded)).sum()
        loss = loss + sum((f * 1.5).sum() for f in finals)
        loss.backward()
        outs.append((padded.detach(), [f.detach() for f in finals]))
        grads.append([xi.grad, *(p.grad for p in model.parameters())])
    torch.testing.assert_close(outs[1][0], outs[0][0])
    for a, b in zip(outs[1][1], outs[0][1], strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,kwargs", MODULES, ids=["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_module_gradcheck_float64(name: str, kwargs: dict) -> None:
    """gradcheck through a module: the layer path (the projection's bias added and its gradient summed in the
    kernels, d_W_ih and d_x formed from the kernels' d_x_proj), both directions, lengths, given initial states."""
    torch.manual_seed(3)
    mod = getattr(seqfast, name)(3, 3, bidirectional=True, backend="numba", **kwargs).double()
    params = list(mod.parameters())
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True) for _ in mod.cell.state_names]
    lengths = torch.tensor([4, 3])

    def fn(x, *leaves):
        hx = leaves[: len(states)]
        out, hidden = torch.func.functional_call(mod, dict(zip([n for n, _ in mod.named_parameters()],
                                                               leaves[len(states):], strict=True)),
                                                 (x, hx if len(hx) > 1 else hx[0]), {"lengths": lengths})
        return (out, *(hidden if isinstance(hidden, tuple) else (hidden,)))

    assert torch.autograd.gradcheck(fn, (x, *states, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_module_partial_gradients_match_torch_nn(bias: bool) -> None:
    """Frozen input weights, an input without grad and only the final state used (the outputs get no gradient):
    each gradient the layer path skips or forms must still match torch.nn's."""
    torch.manual_seed(4)
    ref = torch.nn.GRU(5, 6, num_layers=2, bias=bias).double()
    mod = seqfast.GRU(5, 6, num_layers=2, bias=bias, backend="numba").double()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    grads = []
    for model in (ref, mod):
        model.weight_ih_l0.requires_grad_(False)
        _, h = model(x)
        (h * torch.arange(1.0, h.numel() + 1, dtype=h.dtype).view_as(h)).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[1]["weight_ih_l0"] is None and grads[0]["weight_ih_l0"] is None
    for n, g in grads[0].items():
        if g is not None:
            torch.testing.assert_close(grads[1][n], g, rtol=1e-9, atol=1e-10, msg=n)


def test_module_float32_dropout_batch_first_trains() -> None:
    torch.manual_seed(1)
    ref = torch.nn.LSTM(6, 8, num_layers=2, batch_first=True)
    mod = seqfast.LSTM(6, 8, num_layers=2, batch_first=True, dropout=0.3, backend="numba")
    mod.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 10, 6)
    mod.eval()
    torch.testing.assert_close(mod(x)[0], ref(x)[0], rtol=1e-4, atol=2e-5)
    mod.train()
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    out, _ = mod(x)
    out.pow(2).mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in mod.parameters())


def test_torch_compile_fullgraph_trains() -> None:
    """A model holding a seqfast LSTM compiles with fullgraph=True (the custom op, no graph break) and its
    gradients match eager mode."""
    torch.manual_seed(2)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = seqfast.LSTM(4, 6, backend="numba")
            self.head = torch.nn.Linear(6, 1)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out).sum()

    model = Model().double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    eager_loss = model(x)
    eager = torch.autograd.grad(eager_loss, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    got = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b)


_COMPILE_FRESH = """
import torch, seqfast
model = seqfast.LSTM(4, 6, num_layers=2, backend="numba")
compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
out, _ = compiled(torch.randn(5, 3, 4))  # compiled before any eager call in this process
out.sum().backward()
print("ok")
"""


def test_torch_compile_fullgraph_in_a_fresh_process() -> None:
    assert run_python(_COMPILE_FRESH, {}).strip().endswith("ok")



def test_module_pickles_without_its_call_caches(tmp_path) -> None:
    model = seqfast.GRU(4, 6, backend="numba")
    with torch.no_grad():
        model(torch.randn(3, 2, 4))
    assert "_queries" in model.__dict__
    path = tmp_path / "m.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert "_queries" not in loaded.__dict__
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)



