"""Options beyond torch.nn's surface: mask=, per-step states, step()/Stateful, merge modes, dropout variants.
Each is checked against a hand-written reference on the torch backend (a loop of cells), and across backends."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_param
from torch import nn

import seqfast
from seqfast.functional import BackendNotSupportedError, explain, select_backend
from seqfast.registry import Query, get_backend, get_cell

T, B, I, H = 5, 3, 4, 6
LENGTHS = torch.tensor([5, 3, 2])
SEQ_BACKENDS = [backend_param("torch"), backend_param("numba")]


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, I, generator=gen, dtype=torch.float64)


def _cell_loop(module, x, lengths=None, masks=None):
    """A multi-layer unidirectional LSTM run step by step with torch.nn.LSTMCell on module's weights; masks
    (optional) give the dropout variants as sampled: input, recurrent and zoneout masks per layer. Returns the
    output and every step's (h, c) per layer ([L, T, B, H]), zeros past each length as the modules return."""
    steps, batch = x.shape[:2]
    lengths = torch.full((batch,), steps) if lengths is None else lengths
    layer_input, hs, cs = x, [], []
    for layer in range(module.num_layers):
        cell = nn.LSTMCell(layer_input.shape[2], module.hidden_size, dtype=x.dtype)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).data.copy_(getattr(module, f"{name}_l{layer}").detach())
        if masks and f"weight_hh_l{layer}" in masks:
            cell.weight_hh.data.mul_(masks[f"weight_hh_l{layer}"] / (1 - module.weight_dropout))
        if masks and f"input_l{layer}" in masks:
            layer_input = layer_input * masks[f"input_l{layer}"]
        h, c = x.new_zeros(batch, module.hidden_size), x.new_zeros(batch, module.hidden_size)
        out, h_seq, c_seq = [], [], []
        for t in range(steps):
            h_in = h * masks[f"recurrent_l{layer}"] if masks and f"recurrent_l{layer}" in masks else h
            # the recurrent mask on h enters the product only: run the cell on h_in, carry c as is
            h_new, c_new = cell(layer_input[t], (h_in, c))
            if masks and f"zoneout_l{layer}" in masks:
                zh, zc = masks[f"zoneout_l{layer}"]
                h_new, c_new = torch.where(zh[t], h, h_new), torch.where(zc[t], c, c_new)
            valid = (t < lengths).unsqueeze(1)
            h, c = torch.where(valid, h_new, h), torch.where(valid, c_new, c)
            out.append(torch.where(valid, h, 0.0))
            h_seq.append(torch.where(valid, h, 0.0))
            c_seq.append(torch.where(valid, c, 0.0))
        layer_input = torch.stack(out)
        hs.append(torch.stack(h_seq))
        cs.append(torch.stack(c_seq))
    return layer_input, torch.stack(hs), torch.stack(cs)


# --- mask= --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True], ids=["TB", "BT"])
def test_mask_equals_lengths(batch_first):
    m = seqfast.GRU(I, H, batch_first=batch_first, dtype=torch.float64)
    x = _inputs()
    mask = torch.arange(T).unsqueeze(1) < LENGTHS.unsqueeze(0)  # [T, B]
    if batch_first:
        x, mask = x.transpose(0, 1), mask.t()
    out_mask, h_mask = m(x, mask=mask)
    out_len, h_len = m(x, lengths=LENGTHS)
    torch.testing.assert_close(out_mask, out_len)
    torch.testing.assert_close(h_mask, h_len)


@pytest.mark.parametrize("bad, message", [
    ("holes", "sequence 1 has a False before a True"),
    ("empty", "sequence 2 has no valid step"),
    ("shape", "expected shape (5, 3)"),
    ("dtype", "must be a bool tensor"),
    ("both", "either lengths= or mask="),
])
def test_mask_errors(bad, message):
    m = seqfast.GRU(I, H, dtype=torch.float64)
    mask = torch.arange(T).unsqueeze(1) < LENGTHS.unsqueeze(0)
    kwargs = {}
    if bad == "holes":
        mask[0, 1] = False
    elif bad == "empty":
        mask[:, 2] = False
    elif bad == "shape":
        mask = mask.t()
    elif bad == "dtype":
        mask = mask.int()
    elif bad == "both":
        kwargs["lengths"] = LENGTHS
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        m(_inputs(), mask=mask, **kwargs)


# --- per-step states ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", SEQ_BACKENDS)
def test_states_match_a_cell_loop(backend):
    torch.manual_seed(0)
    m = seqfast.LSTM(I, H, num_layers=2, dtype=torch.float64, backend=backend)
    x = _inputs()
    with torch.no_grad():
        out, (h_n, c_n), (hs, cs) = m(x, lengths=LENGTHS, return_states=True)
    ref_out, ref_h, ref_c = _cell_loop(m, x, LENGTHS)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(hs, ref_h)
    torch.testing.assert_close(cs, ref_c)
    last = LENGTHS - 1
    torch.testing.assert_close(c_n, cs[:, last, torch.arange(B)])  # the final state is the last valid step's


@pytest.mark.parametrize("backend", [backend_param("torch"), backend_param("numba"), backend_param("triton")])
def test_states_bidirectional_match_torch(backend):
    torch.manual_seed(0)
    m = seqfast.GRU(I, H, bidirectional=True, batch_first=True)
    x = _inputs().float().transpose(0, 1)
    with torch.no_grad():
        ref_out, _, ref_states = m(x, lengths=LENGTHS, return_states=True)
        m.backend = backend
        out, _, states = m(x, lengths=LENGTHS, return_states=True)
    assert states.shape == (2, B, T, H)
    torch.testing.assert_close(states, ref_states, atol=1e-5, rtol=1e-4)
    # h_t is the output of each direction
    torch.testing.assert_close(states.permute(1, 2, 0, 3).reshape(B, T, 2 * H), out)


def test_states_gradients_flow_on_torch():
    torch.manual_seed(0)
    m = seqfast.LSTM(I, H, dtype=torch.float64, backend="torch")
    x = _inputs().requires_grad_()
    _, _, (hs, cs) = m(x, return_states=True)
    cs[0, 2].sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    _, _, ref_c = _cell_loop(m, ref_x)
    ref_c[0, 2].sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_states_declines_are_reasoned():
    cell = get_cell("lstm")
    query = Query(cell, requires_grad=True, options=frozenset({"return_states"}))
    reasons = explain(query)
    assert any("per-step c_t" in r for r in reasons["native"])
    assert any("cannot train" in r and "return_states" in r for r in reasons["numba"])
    assert not get_backend("torch").not_supported_reasons(query)
    assert not get_backend("numba").not_supported_reasons(Query(cell, options=frozenset({"return_states"})))
    assert select_backend(query)[0].name == "torch"
    m = seqfast.LSTM(I, H, backend="native")
    with pytest.raises(BackendNotSupportedError, match="return_states"):
        m(_inputs().float(), return_states=True)


# --- step() and Stateful ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [backend_param("torch"), backend_param("numba"), backend_param("native")])
def test_step_matches_forward(backend):
    torch.manual_seed(0)
    m = seqfast.LSTM(I, H, num_layers=2, backend=backend)
    x = _inputs().float()
    with torch.no_grad():
        out, (h_n, c_n) = m(x)
        state, steps = None, []
        for t in range(T):
            y, state = m.step(x[t], state)
            steps.append(y)
    torch.testing.assert_close(torch.stack(steps), out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state[1], c_n, atol=1e-5, rtol=1e-4)


def test_step_rejects_bidirectional():
    with pytest.raises(ValueError, match="unidirectional"):
        seqfast.GRU(I, H, bidirectional=True).step(torch.randn(B, I))


def test_stateful_carries_state_and_resets_rows():
    torch.manual_seed(0)
    m = seqfast.GRU(I, H, batch_first=True)
    x = torch.randn(B, T, I)
    whole, _ = m(x)
    s = seqfast.Stateful(m)
    with torch.no_grad():
        first = s(x[:, :2])
        second = s(x[:, 2:])
        assert second.grad_fn is None and s.state.grad_fn is None
    torch.testing.assert_close(torch.cat([first, second], 1), whole.detach())
    # a reset row restarts from zeros, the others go on
    kept = s.state.clone()
    s.reset_state(rows=torch.tensor([False, True, False]))
    torch.testing.assert_close(s.state[:, [0, 2]], kept[:, [0, 2]])
    assert torch.count_nonzero(s.state[:, 1]) == 0
    s.reset_state(rows=[0])
    assert torch.count_nonzero(s.state[:, 0]) == 0
    with pytest.raises(ValueError, match="bool mask must have shape"):
        s.reset_state(rows=torch.tensor([True]))
    s.reset_state()
    assert s.state is None
    # step by step (cells and sequence modules alike)
    with torch.no_grad():
        outs = [s.step(x[:, t]) for t in range(T)]
    torch.testing.assert_close(torch.stack(outs, 1), whole.detach())


def test_stateful_detaches_between_calls():
    m = seqfast.LSTMCell(I, H)
    s = seqfast.Stateful(m)
    s(torch.randn(B, I))
    assert all(not t.requires_grad for t in s.state)
    attached = seqfast.Stateful(m, detach=False)
    attached(torch.randn(B, I))
    assert all(t.requires_grad for t in attached.state)


# --- merge modes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sum", "mean", "mul"])
@pytest.mark.parametrize("backend", SEQ_BACKENDS)
def test_merge_modes_recombine_concat(mode, backend):
    torch.manual_seed(0)
    merged = seqfast.LSTM(I, H, bidirectional=True, merge_mode=mode, dtype=torch.float64, backend=backend)
    ref = nn.LSTM(I, H, bidirectional=True, dtype=torch.float64)
    assert list(merged.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(merged.state_dict())
    x = _inputs()
    out, (h_n, _) = merged(x)
    ref_out, (ref_h, _) = ref(x)
    fwd, bwd = ref_out[..., :H], ref_out[..., H:]
    expected = {"sum": fwd + bwd, "mean": (fwd + bwd) / 2, "mul": fwd * bwd}[mode]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(h_n, ref_h)


def test_merge_mode_sets_next_layer_input():
    m = seqfast.GRU(I, H, num_layers=2, bidirectional=True, merge_mode="sum")
    assert m.weight_ih_l1.shape == (3 * H, H)
    assert seqfast.GRU(I, H, num_layers=2, bidirectional=True).weight_ih_l1.shape == (3 * H, 2 * H)
    out, _ = m(torch.randn(T, B, I))
    assert out.shape == (T, B, H)
    assert select_backend(Query(get_cell("gru"), options=frozenset({"merge_mode"})))[0].name != "native"
    with pytest.raises(ValueError, match="merge_mode must be one of"):
        seqfast.GRU(I, H, merge_mode="ave")


# --- dropout variants ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["input_dropout", "recurrent_dropout", "weight_dropout", "zoneout", "all"])
def test_dropout_variants_match_manual_loop(option):
    kwargs = dict.fromkeys(["input_dropout", "recurrent_dropout", "weight_dropout", "zoneout"]
                           if option == "all" else [option], 0.3)
    torch.manual_seed(0)
    m = seqfast.LSTM(I, H, num_layers=2, dtype=torch.float64, **kwargs)
    x = _inputs()
    out, _, (hs, cs) = m(x, lengths=LENGTHS, return_states=True)
    assert select_backend(Query(get_cell("lstm"), dtype=torch.float64, requires_grad=True,
                                options=m._options(True)))[0].name == "torch"
    masks = dict(m.sampled_masks)
    assert masks and all(key.split("_l")[0] in option or option == "all" or key.startswith("weight_hh")
                         for key in masks)
    ref_out, ref_h, ref_c = _cell_loop(m, x, LENGTHS, masks)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(cs, ref_c)
    # deterministic under the seed; off in eval()
    torch.manual_seed(0)
    again = seqfast.LSTM(I, H, num_layers=2, dtype=torch.float64, **kwargs)
    torch.testing.assert_close(again(x, lengths=LENGTHS)[0], out)
    m.eval()
    plain = seqfast.LSTM(I, H, num_layers=2, dtype=torch.float64)
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x)[0], plain(x)[0])


def test_dropconnect_runs_on_every_backend():
    """weight_dropout is a masked weight_hh handed to the backend: same result on numba, native and torch."""
    m = seqfast.LSTM(I, H, weight_dropout=0.5)
    x = _inputs().float()
    results = []
    for backend in ("torch", "numba", "native"):
        m.backend = backend
        torch.manual_seed(1)
        results.append(m(x)[0])
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("option", ["recurrent_dropout", "zoneout"])
def test_kernel_dropouts_are_declined_with_reasons(option):
    reasons = explain(Query(get_cell("lstm"), options=frozenset({option})))
    for name in ("numba", "native"):
        assert any(option in r for r in reasons[name]), reasons[name]
    assert not reasons["torch"]
    m = seqfast.LSTM(I, H, backend="numba", **{option: 0.2})
    with pytest.raises(BackendNotSupportedError, match=option):
        m(torch.randn(T, B, I))
    m.eval()
    m(torch.randn(T, B, I))  # off in eval(): numba runs it
