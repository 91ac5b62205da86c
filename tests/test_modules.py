"""Every backend against torch.nn: outputs, final states and every gradient, on random module configurations."""

from __future__ import annotations

import pytest
import torch
from conftest import Config, all_backends, assert_close, backend_param, random_configs
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqfast
from seqfast.registry import Query, get_cell

CONFIGS = random_configs(16, seed=1)


def _skip_unless_supported(backend: str, config: Config, dtype=torch.float32) -> None:
    cell = get_cell({"LSTM": "lstm", "GRU": "gru", "RNN": f"rnn_{config.nonlinearity}"}[config.kind])
    query = Query(cell, dtype=dtype, hidden_size=config.hidden_size, proj_size=config.proj_size, requires_grad=True)
    reasons = seqfast.get_backend(backend).not_supported_reasons(query)
    if reasons:
        pytest.skip(f"{backend} declares it cannot run this: {'; '.join(reasons)}")


def _hx(config: Config, ref: torch.nn.Module, gen: torch.Generator, batched: bool = True):
    layers = config.num_layers * (2 if config.bidirectional else 1)
    lead = (layers, config.batch) if batched else (layers,)
    h = torch.randn(*lead, config.proj_size or config.hidden_size, generator=gen, requires_grad=True)
    if config.kind == "LSTM":
        return h, torch.randn(*lead, config.hidden_size, generator=gen, requires_grad=True)
    return h


def _loss(out, state, gen):
    """A loss that weighs every output and state element differently, so every gradient is checked."""
    parts = [out] + (list(state) if isinstance(state, tuple) else [state])
    return sum((p * torch.randn(p.shape, generator=gen)).sum() for p in parts)


def _grads(module, loss, extra):
    return torch.autograd.grad(loss, [*extra, *module.parameters()], retain_graph=True)


@pytest.mark.parametrize("backend", [backend_param(b) for b in all_backends()])
@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_matches_torch_nn_forward_and_backward(backend, config):
    _skip_unless_supported(backend, config)
    torch.manual_seed(0)
    ref, ours = config.modules(backend)
    gen = torch.Generator().manual_seed(1)
    shape = (config.batch, config.steps) if config.batch_first else (config.steps, config.batch)
    x = torch.randn(*shape, config.input_size, generator=gen, requires_grad=True)
    hx = _hx(config, ref, gen)
    hx_list = list(hx) if isinstance(hx, tuple) else [hx]
    out_ref, state_ref = ref(x, hx)
    out, state = ours(x, hx)
    assert out.shape == out_ref.shape
    assert_close(out, out_ref, "output")
    for s, r in zip(state if isinstance(state, tuple) else (state,), state_ref if isinstance(state_ref, tuple)
                    else (state_ref,), strict=True):
        assert_close(s, r, "final state")
    g_ref = _grads(ref, _loss(out_ref, state_ref, torch.Generator().manual_seed(2)), [x, *hx_list])
    g = _grads(ours, _loss(out, state, torch.Generator().manual_seed(2)), [x, *hx_list])
    names = ["input", *(f"hx[{i}]" for i in range(len(hx_list))), *(n for n, _ in ours.named_parameters())]
    for name, a, b in zip(names, g, g_ref, strict=True):
        assert_close(a, b, f"grad of {name}")


@pytest.mark.parametrize("backend", [backend_param(b) for b in all_backends()])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_packed_sequence_unsorted_with_hx(backend, kind):
    config = Config(kind, "tanh", 2, True, True, True, steps=5, batch=4, input_size=3, hidden_size=4)
    _skip_unless_supported(backend, config)
    torch.manual_seed(0)
    ref, ours = config.modules(backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 3, generator=gen)
    lengths = torch.tensor([2, 5, 1, 3])  # unsorted
    hx = _hx(config, ref, gen)
    hx_list = list(hx) if isinstance(hx, tuple) else [hx]
    leaf = x.clone().requires_grad_()
    packed_ref = pack_padded_sequence(leaf, lengths, batch_first=True, enforce_sorted=False)
    packed = pack_padded_sequence(leaf, lengths, batch_first=True, enforce_sorted=False)
    out_ref, state_ref = ref(packed_ref, hx)
    out, state = ours(packed, hx)
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(out.batch_sizes, out_ref.batch_sizes)
    assert torch.equal(out.sorted_indices, out_ref.sorted_indices)
    assert_close(out.data, out_ref.data, "packed output")
    assert_close(seqfast_state := (state if isinstance(state, tuple) else (state,)),
                 state_ref if isinstance(state_ref, tuple) else (state_ref,), "final state")
    assert len(seqfast_state) == len(hx_list)
    g_ref = _grads(ref, _loss(out_ref.data, state_ref, torch.Generator().manual_seed(4)), [leaf, *hx_list])
    g = _grads(ours, _loss(out.data, state, torch.Generator().manual_seed(4)), [leaf, *hx_list])
    for a, b in zip(g, g_ref, strict=True):
        assert_close(a, b, "gradient through PackedSequence")


@pytest.mark.parametrize("backend", [backend_param(b) for b in all_backends()])
def test_lengths_keyword_zeroes_padding_and_matches_packed(backend):
    config = Config("GRU", "tanh", 1, True, False, True, steps=6, batch=3, input_size=2, hidden_size=3)
    _skip_unless_supported(backend, config)
    torch.manual_seed(0)
    ref, ours = config.modules(backend)
    x = torch.randn(6, 3, 2)
    lengths = torch.tensor([6, 2, 4])
    out, h = ours(x, lengths=lengths)
    out_ref, h_ref = ref(pack_padded_sequence(x, lengths, enforce_sorted=False))
    padded_ref, _ = pad_packed_sequence(out_ref, total_length=6)
    assert_close(out, padded_ref, "padded output")
    assert_close(h, h_ref, "final state")
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(out[n:, b] == 0), "outputs past a sequence's length must be exactly zero"


@pytest.mark.parametrize("backend", [backend_param(b) for b in all_backends()])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_unbatched_input(backend, kind):
    config = Config(kind, "tanh", 2, True, False, True, steps=4, batch=1, input_size=3, hidden_size=5)
    _skip_unless_supported(backend, config)
    torch.manual_seed(0)
    ref, ours = config.modules(backend)
    x = torch.randn(4, 3)
    hx = _hx(config, ref, torch.Generator().manual_seed(0), batched=False)
    out_ref, state_ref = ref(x, hx)
    out, state = ours(x, hx)
    assert out.shape == out_ref.shape == (4, 10)
    assert_close(out, out_ref, "unbatched output")
    assert_close(state, state_ref, "unbatched state")


@pytest.mark.parametrize("backend", [backend_param(b) for b in all_backends()])
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_cells_match_torch_nn(backend, kind, batched):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(3, 4)
    ours = getattr(seqfast, kind)(3, 4, backend=backend)
    ours.load_state_dict(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    gen = torch.Generator().manual_seed(0)
    lead = (2,) if batched else ()
    x = torch.randn(*lead, 3, generator=gen, requires_grad=True)
    h = torch.randn(*lead, 4, generator=gen, requires_grad=True)
    hx = (h, torch.randn(*lead, 4, generator=gen)) if kind == "LSTMCell" else h
    out_ref, out = ref(x, hx), ours(x, hx)
    assert_close(out, out_ref, f"{kind} step")
    loss_ref = _loss(out_ref[0] if isinstance(out_ref, tuple) else out_ref, out_ref, torch.Generator().manual_seed(1))
    loss = _loss(out[0] if isinstance(out, tuple) else out, out, torch.Generator().manual_seed(1))
    for a, b in zip(_grads(ours, loss, [x, h]), _grads(ref, loss_ref, [x, h]), strict=True):
        assert_close(a, b, f"{kind} gradient")
    assert_close(ours(x), ref(x), f"{kind} with hx=None")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_state_dict_and_parameters_identical_to_torch_nn(kind):
    kw = {"proj_size": 2} if kind == "LSTM" else {}
    ref = getattr(torch.nn, kind)(5, 6, num_layers=3, bidirectional=True, **kw)
    ours = getattr(seqfast, kind)(5, 6, num_layers=3, bidirectional=True, **kw)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [(n, p.shape) for n, p in ours.named_parameters()]
    ours.load_state_dict(ref.state_dict())  # torch.nn -> seqfast
    fresh = getattr(torch.nn, kind)(5, 6, num_layers=3, bidirectional=True, **kw)
    fresh.load_state_dict(ours.state_dict())  # seqfast -> torch.nn
    for (n, a), b in zip(fresh.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b), n


def test_initialisation_distribution_matches_torch_nn():
    torch.manual_seed(0)
    ours = seqfast.LSTM(10, 64, num_layers=2)
    bound = 1 / 64**0.5
    values = torch.cat([p.detach().reshape(-1) for p in ours.parameters()])
    assert values.abs().max() <= bound
    assert values.abs().max() > 0.95 * bound  # uniform over the whole range, not a narrower one
    assert abs(values.mean().item()) < 0.05 * bound


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    ours = seqfast.GRU(3, 8, num_layers=2, dropout=0.5, backend="torch")
    x = torch.randn(5, 2, 3)
    ours.eval()
    a, _ = ours(x)
    b, _ = ours(x)
    assert torch.equal(a, b)
    ours.train()
    torch.manual_seed(1)
    c, _ = ours(x)
    # the same computation by hand: layer 0, dropout with the same RNG draw, layer 1
    layer0 = seqfast.GRU(3, 8, backend="torch")
    layer1 = seqfast.GRU(8, 8, backend="torch")
    sd = ours.state_dict()
    layer0.load_state_dict({k: v for k, v in sd.items() if k.endswith("_l0")})
    layer1.load_state_dict({k.replace("_l1", "_l0"): v for k, v in sd.items() if k.endswith("_l1")})
    torch.manual_seed(1)
    mid, _ = layer0(x)
    expected, _ = layer1(torch.nn.functional.dropout(mid, 0.5, training=True))
    assert_close(c, expected, "training output with inter-layer dropout")
    assert not torch.allclose(c, a)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_gradcheck_float64_torch_backend(kind):
    torch.manual_seed(0)
    module = getattr(seqfast, kind)(2, 3, num_layers=2, bidirectional=True, backend="torch").double()
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2])
    params = list(module.parameters())

    def run(inp, *weights):
        state = dict(zip((n for n, _ in module.named_parameters()), weights, strict=True))
        out, _ = torch.func.functional_call(module, state, (inp,), {"lengths": lengths})
        return out

    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-6)


def test_generic_recurrent_matches_named_module():
    torch.manual_seed(0)
    named = seqfast.LSTM(3, 4, num_layers=2, batch_first=True)
    generic = seqfast.Recurrent("lstm", 3, 4, num_layers=2, batch_first=True)
    generic.load_state_dict(named.state_dict())
    x = torch.randn(2, 5, 3)
    assert_close(generic(x)[0], named(x)[0], "Recurrent('lstm') vs LSTM")


# --- bad input: clear errors naming the argument, what was expected, what came -----------------------------------

@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m(torch.randn(2, 3, 4, 5)), "expected input to be 2-D .* or 3-D .* got 4-D"),
        (lambda m: m(torch.randn(5, 2, 7)), "input_size. Expected 3, got 7"),
        (lambda m: m(torch.randn(5, 2, 3, dtype=torch.float64)), "input must have the type torch.float32"),
        (lambda m: m(torch.randn(0, 2, 3)), "no time steps"),
        (lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4))),
         r"hx: expected h of shape \(2, 2, 4\)"),
        (lambda m: m(torch.randn(5, 2, 3), torch.zeros(2, 2, 4)), "hx: expected a tuple of 2 tensors"),
        (lambda m: m(torch.randn(5, 2, 3), lengths=torch.tensor([5, 0])), "at least one step; got a length of 0"),
        (lambda m: m(torch.randn(5, 2, 3), lengths=torch.tensor([6, 1])), "exceeds the 5 time steps"),
        (lambda m: m(torch.randn(5, 2, 3), lengths=torch.tensor([5])), "1-D tensor of 2 sequence lengths"),
        (lambda m: m(torch.randn(5, 2, 3), lengths=torch.tensor([5.0, 1.0])), "integer tensor"),
        (lambda m: m([1, 2, 3]), "must be a Tensor or PackedSequence"),
    ],
    ids=["rank", "feature-size", "dtype", "empty", "hx-shape", "hx-arity", "zero-length", "long-length",
         "lengths-shape", "lengths-dtype", "not-a-tensor"],
)
def test_bad_input_errors(call, match):
    module = seqfast.LSTM(3, 4, num_layers=2)
    with pytest.raises((ValueError, TypeError), match=match):
        call(module)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: seqfast.LSTM(3, 0), "hidden_size must be an int >= 1, got 0"),
        (lambda: seqfast.LSTM(3, 4, num_layers=0), "num_layers must be an int >= 1"),
        (lambda: seqfast.LSTM(3, 4, dropout=1.5), "dropout must be a number in"),
        (lambda: seqfast.LSTM(3, 4, proj_size=4), "proj_size has to be smaller than hidden_size"),
        (lambda: seqfast.GRU(3, 4, proj_size=2), "unexpected keyword|proj_size"),
        (lambda: seqfast.Recurrent("gru", 3, 4, proj_size=2), "proj_size is only supported"),
        (lambda: seqfast.RNN(3, 4, nonlinearity="sigmoid"), "nonlinearity must be 'tanh' or 'relu'"),
        (lambda: seqfast.Recurrent("nope", 3, 4), "unknown cell 'nope'; registered cells"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
