"""seqfast.seq2seq: models that learn to reverse and copy digit strings, search that scores what the model scores,
padding that changes nothing, and errors that name the argument."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import seqfast
from seqfast.seq2seq import (
    Encoder,
    ExponentialSchedule,
    InverseSigmoidSchedule,
    LinearSchedule,
    Seq2Seq,
    beam_search,
    greedy_search,
)

PAD, BOS, EOS = 0, 1, 2
VOCAB = 13  # specials + the digits 0-9 as ids 3..12
MIN_LEN, MAX_LEN = 3, 12


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # tiny matrices: on a shared 2-core machine a second OpenMP thread makes every op wait for a busy core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digit_strings(n: int, generator: torch.Generator, held_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """n random digit strings [n, MAX_LEN] (PAD after each length) and their lengths. Training and held-out strings
    are disjoint: a string is held out when its digit sum is a multiple of 7."""
    rows, lengths = [], []
    while sum(len(r) for r in rows) < n:
        length = torch.randint(MIN_LEN, MAX_LEN + 1, (4 * n,), generator=generator)
        digits = torch.randint(3, VOCAB, (4 * n, MAX_LEN), generator=generator)
        valid = torch.arange(MAX_LEN)[None, :] < length[:, None]
        digits = digits.masked_fill(~valid, PAD)
        keep = ((digits - 3).clamp(min=0).sum(1) % 7 == 0) == held_out
        rows.append(digits[keep])
        lengths.append(length[keep])
    return torch.cat(rows)[:n], torch.cat(lengths)[:n]


def targets(src: torch.Tensor, lengths: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tgt_in = BOS + target, tgt_out = target + EOS), both [n, MAX_LEN + 1] padded with PAD."""
    positions = torch.arange(MAX_LEN)[None, :]
    valid = positions < lengths[:, None]
    if task == "reverse":
        src = src.gather(1, (lengths[:, None] - 1 - positions).clamp(min=0)).masked_fill(~valid, PAD)
    tgt_out = F.pad(src, (0, 1), value=PAD)
    tgt_out[torch.arange(len(lengths)), lengths] = EOS
    tgt_in = F.pad(src, (1, 0), value=BOS)
    return tgt_in, tgt_out


def exact_match(tokens: torch.Tensor, tgt_out: torch.Tensor) -> float:
    width = tgt_out.shape[1]
    tokens = F.pad(tokens, (0, max(0, width - tokens.shape[1])), value=PAD)
    # anything generated past the target's width must be padding too
    beyond_ok = (tokens[:, width:] == PAD).all(1)
    return ((tokens[:, :width] == tgt_out).all(1) & beyond_ok).float().mean().item()


def new_model(backend: str = "numba", **options) -> Seq2Seq:
    options = {"attention": "luong_general", **options}
    return Seq2Seq(VOCAB, VOCAB, 32, 64, pad_id=PAD, bos_id=BOS, eos_id=EOS, backend=backend, **options)


HELD_OUT = 200


# copying is learned faster when each memory position also sees the string's end (bidirectional encoder)
TASK_OPTIONS = {"reverse": {}, "copy": {"bidirectional_encoder": True}}


def train(task: str, max_steps: int = 1500) -> tuple[Seq2Seq, dict]:
    """A model trained on the numba backend until greedy decoding gets 99% of the held-out strings exactly."""
    torch.manual_seed(0)
    model = new_model("numba", **TASK_OPTIONS[task])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    held_src, held_len = digit_strings(HELD_OUT, torch.Generator().manual_seed(2), held_out=True)
    _, held_out = targets(held_src, held_len, task)
    for step in range(1, max_steps + 1):
        src, lengths = digit_strings(64, data, held_out=False)
        tgt_in, tgt_out = targets(src, lengths, task)
        loss = F.cross_entropy(model(src, lengths, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0:
            model.eval()
            tokens, _ = model.generate(held_src, held_len, max_len=MAX_LEN + 2)
            model.train()
            if exact_match(tokens, held_out) >= 0.99:
                break
    model.eval()
    return model, {"src": held_src, "lengths": held_len, "tgt_out": held_out, "steps": step, "task": task}


@pytest.fixture(scope="module")
def reverse_model():
    return train("reverse")


@pytest.fixture(scope="module")
def copy_model():
    return train("copy")


@pytest.fixture(params=["reverse", "copy"])
def trained(request, reverse_model, copy_model):
    return {"reverse": reverse_model, "copy": copy_model}[request.param]


# --- learning ---------------------------------------------------------------------------------------------------
def test_learns_the_task_greedy_and_beam(trained):
    model, held = trained
    for beam_size in (1, 4):
        tokens, _ = model.generate(held["src"], held["lengths"], max_len=MAX_LEN + 2, beam_size=beam_size)
        accuracy = exact_match(tokens, held["tgt_out"])
        assert accuracy >= 0.98, f"beam_size={beam_size}: exact match {accuracy} after {held['steps']} steps"


def test_torch_backend_runs_the_trained_weights_alike(trained):
    """The numba-trained model's weights on the torch backend: the same tokens, the same scores."""
    model, held = trained
    reference = new_model("torch", **TASK_OPTIONS[held["task"]])
    reference.load_state_dict(model.state_dict())
    reference.eval()
    src, lengths = held["src"], held["lengths"]
    for beam_size in (1, 4):
        tokens, scores = model.generate(src, lengths, max_len=MAX_LEN + 2, beam_size=beam_size)
        ref_tokens, ref_scores = reference.generate(src, lengths, max_len=MAX_LEN + 2, beam_size=beam_size)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    assert exact_match(ref_tokens, held["tgt_out"]) >= 0.98


# --- search -----------------------------------------------------------------------------------------------------
def _random_model(seed: int = 0, **options) -> Seq2Seq:
    torch.manual_seed(seed)
    return new_model(options.pop("backend", "numba"), **options).eval()


def _source(n: int = 6, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return digit_strings(n, torch.Generator().manual_seed(seed), held_out=False)


@pytest.mark.parametrize("penalties", [(0.0, 0.0), (0.6, 0.0), (1.0, 0.3)], ids=["plain", "lp0.6", "lp1-cp0.3"])
def test_beam_of_one_is_greedy(penalties):
    alpha, beta = penalties
    model = _random_model(attention="bahdanau")
    src, lengths = _source()
    encoded = model.encode(src, lengths)
    ids = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_len": 9, "length_penalty": alpha,
           "coverage_penalty": beta, "return_attention": True}
    with torch.no_grad():
        greedy = greedy_search(model.decoder, encoded, **ids)
        beam = beam_search(model.decoder, encoded, beam_size=1, **ids)
    assert torch.equal(greedy.tokens, beam.tokens)
    torch.testing.assert_close(greedy.scores, beam.scores)
    torch.testing.assert_close(greedy.attention, beam.attention)


def _rescore(model: Seq2Seq, src, lengths, tokens, alpha: float, beta: float) -> torch.Tensor:
    """The model's own score of `tokens`, from a teacher-forced forward: sum of log-probabilities up to and including
    EOS, over ((5 + len) / 6) ** alpha, plus beta * sum over valid source positions of log(min(attention sum, 1))."""
    tgt_in = torch.cat([torch.full_like(tokens[:, :1], BOS), tokens[:, :-1]], 1)
    with torch.no_grad():
        logits, attention = model(src, lengths, tgt_in, return_attention=True)
    log_probs = torch.log_softmax(logits, -1).gather(2, tokens[..., None]).squeeze(2)
    ends = (tokens == EOS).int().cumsum(1)
    used = (ends == 0) | ((ends == 1) & (tokens == EOS))  # up to and including the first EOS
    length = used.sum(1).float()
    coverage = (attention * used[..., None]).sum(1).clamp(min=1e-10, max=1.0).log()
    valid = torch.arange(src.shape[1])[None, :] < lengths[:, None]
    return (log_probs * used).sum(1) / ((5 + length) / 6) ** alpha + beta * (coverage * valid).sum(1)


@pytest.mark.parametrize("attention", ["luong_general", "bahdanau"])
@pytest.mark.parametrize("penalties", [(0.0, 0.0), (0.6, 0.2)], ids=["plain", "lp0.6-cp0.2"])
def test_beam_scores_are_the_models_log_probabilities(attention, penalties, reverse_model):
    alpha, beta = penalties
    src, lengths = _source(8)
    models = [_random_model(attention=attention)]
    if attention == "luong_general":
        models.append(reverse_model[0])
    for model in models:
        for beam_size in (1, 3):
            tokens, scores = model.generate(src, lengths, max_len=MAX_LEN + 2, beam_size=beam_size,
                                            length_penalty=alpha, coverage_penalty=beta)
            torch.testing.assert_close(scores, _rescore(model, src, lengths, tokens, alpha, beta),
                                       atol=1e-4, rtol=1e-4)
            after_eos = (tokens == EOS).int().cumsum(1) - (tokens == EOS).int() > 0
            assert (tokens[after_eos] == PAD).all()


def test_beam_search_finds_at_least_the_greedy_score():
    model = _random_model(attention="luong_general")
    src, lengths = _source(8)
    _, greedy_scores = model.generate(src, lengths, max_len=10)
    _, beam_scores = model.generate(src, lengths, max_len=10, beam_size=5)
    assert (beam_scores >= greedy_scores - 1e-5).all()
    assert (beam_scores > greedy_scores + 1e-3).any(), "a random model should leave beam search room to improve"


def test_returned_attention_is_masked_and_normalised():
    model = _random_model(attention="bahdanau")
    src, lengths = _source(5)
    for beam_size in (1, 3):
        tokens, _, attention = model.generate(src, lengths, max_len=6, beam_size=beam_size, return_attention=True)
        assert attention.shape == (*tokens.shape, src.shape[1])
        padded = torch.arange(src.shape[1])[None, :] >= lengths[:, None]
        assert (attention.masked_select(padded[:, None, :]) == 0).all()
        produced = (tokens == EOS).int().cumsum(1) - (tokens == EOS).int() == 0
        torch.testing.assert_close(attention.sum(-1), produced.float())


# --- padding ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"attention": "luong_general"},
                                     {"attention": "bahdanau", "cell": "gru", "bidirectional_encoder": True}],
                         ids=["lstm-luong", "gru-bahdanau-bi"])
def test_padded_batch_equals_each_sequence_alone(options):
    model = _random_model(**options)
    src, lengths = _source(5)
    tgt_in = torch.randint(3, VOCAB, (5, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        batch_logits = model(src, lengths, tgt_in)
    for beam_size in (1, 3):
        tokens, scores = model.generate(src, lengths, max_len=8, beam_size=beam_size)
        for i, length in enumerate(lengths.tolist()):
            alone = src[i:i + 1, :length]
            one_tokens, one_scores = model.generate(alone, None, max_len=8, beam_size=beam_size)
            width = one_tokens.shape[1]
            assert torch.equal(tokens[i, :width], one_tokens[0]) and (tokens[i, width:] == PAD).all()
            torch.testing.assert_close(scores[i:i + 1], one_scores, atol=1e-5, rtol=1e-5)
            with torch.no_grad():
                torch.testing.assert_close(batch_logits[i:i + 1], model(alone, None, tgt_in[i:i + 1]),
                                           atol=1e-5, rtol=1e-5)


def test_mask_is_an_alternative_to_lengths():
    model = _random_model()
    src, lengths = _source(4)
    mask = torch.arange(src.shape[1])[None, :] < lengths[:, None]
    tgt_in = torch.randint(3, VOCAB, (4, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(src, lengths, tgt_in), model(src, None, tgt_in, src_mask=mask))
    by_lengths = model.generate(src, lengths, max_len=6, beam_size=2)
    by_mask = model.generate(src, max_len=6, beam_size=2, src_mask=mask)
    assert torch.equal(by_lengths[0], by_mask[0])
    torch.testing.assert_close(by_lengths[1], by_mask[1])


# --- modules: every attention and cell, forward and backward ----------------------------------------------------
@pytest.mark.parametrize("backend", ["numba", "torch", "native"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("variant", [
    {"attention": "bahdanau"},
    {"attention": "luong_dot"},
    {"attention": "luong_general", "input_feeding": True},
    {"attention": "luong_general", "num_layers": 2, "bidirectional_encoder": True, "bridge": "concat",
     "dropout": 0.1},
    {"attention": "bahdanau", "bidirectional_encoder": True, "teacher_forcing": 0.5},
], ids=["bahdanau", "luong_dot", "luong_general-feed", "luong_general-L2-bi-concat", "bahdanau-bi-tf0.5"])
def test_forward_backward(backend, cell, variant):
    variant = dict(variant)
    teacher_forcing = variant.pop("teacher_forcing", 1.0)
    torch.manual_seed(0)
    model = Seq2Seq(VOCAB, VOCAB, 8, 8, cell=cell, backend=backend, **variant)
    src, lengths = _source(3)
    tgt_in = torch.randint(3, VOCAB, (3, 4))
    logits = model(src, lengths, tgt_in, teacher_forcing)
    assert logits.shape == (3, 4, VOCAB) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru_reset_before", "indrnn", "peephole_lstm", "mingru"])
@pytest.mark.parametrize("attention", ["bahdanau", "luong_general"])
def test_any_registered_cell(cell, attention):
    if cell not in seqfast.registry.cells:
        pytest.skip(f"cell {cell!r} is not registered here (its plugin is not installed)")
    torch.manual_seed(0)
    model = Seq2Seq(VOCAB, VOCAB, 8, 8, cell=cell, attention=attention, backend="torch")
    src, lengths = _source(3)
    logits = model(src, lengths, torch.randint(3, VOCAB, (3, 4)))
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    tokens, scores = model.generate(src, lengths, max_len=4, beam_size=2)
    assert tokens.shape[0] == 3 and torch.isfinite(scores).all()


def test_scan_path_equals_stepping_the_cells():
    """Teacher-forced Luong decoding runs each cell as one scan; it must equal stepping the cells one by one."""
    model = _random_model(num_layers=2)
    src, lengths = _source(4)
    tgt_in = torch.randint(3, VOCAB, (4, 6))
    with torch.no_grad():
        encoded = model.encode(src, lengths)
        decoder = model.decoder
        keys = decoder.attention.keys(encoded.memory)
        logits = decoder(tgt_in, decoder.init_state(encoded.state), encoded.memory, encoded.mask)[0]
        state, stepped = decoder.init_state(encoded.state), []
        for t in range(tgt_in.shape[1]):
            step_logits, state, _ = decoder.step(tgt_in[:, t], state, encoded.memory, keys, encoded.mask)
            stepped.append(step_logits)
    torch.testing.assert_close(logits, torch.stack(stepped, 1), atol=1e-5, rtol=1e-5)


def test_no_teacher_forcing_feeds_back_the_greedy_prediction():
    model = _random_model(attention="bahdanau")
    src, lengths = _source(4)
    tokens, _ = model.generate(src, lengths, max_len=6)
    tgt_in = torch.cat([torch.full((4, 1), BOS), torch.randint(3, VOCAB, (4, tokens.shape[1] - 1))], 1)
    with torch.no_grad():
        free = model(src, lengths, tgt_in, teacher_forcing=0.0).argmax(-1)
    before_eos = (tokens == EOS).int().cumsum(1) - (tokens == EOS).int() == 0
    assert torch.equal(free[before_eos], tokens[before_eos])


def test_bridges():
    torch.manual_seed(0)
    x, lengths = torch.randn(3, 5, 4), torch.tensor([5, 2, 3])
    summed = Encoder(4, 6, cell="lstm", bidirectional=True, num_layers=2, bridge="sum", backend="torch")
    out = summed(x, lengths)
    _, (h, c) = summed.rnn(x, lengths=lengths)
    torch.testing.assert_close(out.state[0], h.view(2, 2, 3, 6).sum(1))
    torch.testing.assert_close(out.state[1], c.view(2, 2, 3, 6).sum(1))
    assert out.memory.shape == (3, 5, 12) and torch.equal(out.mask, torch.arange(5)[None, :] < lengths[:, None])
    concat = Encoder(4, 6, cell="gru", bidirectional=True, bridge="concat", decoder_hidden_size=10)
    (state,) = concat(x, lengths).state
    _, h = concat.rnn(x, lengths=lengths)
    torch.testing.assert_close(state, concat.bridges[0](torch.cat([h[0], h[1]], -1))[None])


# --- schedules, inference mode ----------------------------------------------------------------------------------
def test_scheduled_sampling_schedules():
    linear = LinearSchedule(k=1.0, c=0.01, minimum=0.1)
    assert linear(0) == 1.0 and linear(50) == pytest.approx(0.5) and linear(1000) == 0.1
    exponential = ExponentialSchedule(0.99)
    assert exponential(0) == 1.0 and exponential(100) == pytest.approx(0.99**100)
    inverse_sigmoid = InverseSigmoidSchedule(10.0)
    assert inverse_sigmoid(0) == pytest.approx(10 / 11) and inverse_sigmoid(30) == pytest.approx(10 / (10 + math.e**3))
    for schedule in (linear, exponential, inverse_sigmoid):
        values = [schedule(step) for step in range(0, 100_000, 997)]
        assert all(0.0 <= v <= 1.0 for v in values) and values == sorted(values, reverse=True)
    with pytest.raises(ValueError, match="step"):
        linear(-1)
    with pytest.raises(ValueError, match="ExponentialSchedule"):
        ExponentialSchedule(1.5)


@pytest.mark.parametrize("attention", ["bahdanau", "luong_general"])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_inference_mode(backend, attention):
    model = _random_model(backend=backend, attention=attention)
    src, lengths = _source(3)
    expected = model.generate(src, lengths, max_len=5, beam_size=2)
    with torch.inference_mode():
        tokens, scores = model.generate(src, lengths, max_len=5, beam_size=2)
        logits = model(src, lengths, torch.full((3, 2), BOS))
    assert torch.equal(tokens, expected[0]) and torch.equal(scores, expected[1])
    assert logits.shape == (3, 2, VOCAB)


# --- errors -----------------------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    model = _random_model(backend="torch")
    src, lengths = _source(2)
    tgt_in = torch.full((2, 3), BOS)
    cases = [
        (lambda: model(src[0], lengths, tgt_in), "src"),
        (lambda: model(src.float(), lengths, tgt_in), "src"),
        (lambda: model(src + VOCAB, lengths, tgt_in), "src"),
        (lambda: model(src, torch.tensor([0, 3]), tgt_in), "src_lengths"),
        (lambda: model(src, torch.tensor([3, MAX_LEN + 1]), tgt_in), "src_lengths"),
        (lambda: model(src, torch.tensor([3]), tgt_in), "src_lengths"),
        (lambda: model(src, lengths, tgt_in[:1]), "tgt_in"),
        (lambda: model(src, lengths, tgt_in[0]), "tgt_in"),
        (lambda: model(src, lengths, tgt_in, teacher_forcing=1.5), "teacher_forcing"),
        (lambda: model(src, lengths, tgt_in, src_mask=torch.ones_like(src, dtype=torch.bool)), "src_mask"),
        (lambda: model(src, None, tgt_in, src_mask=torch.tensor([[False, True] * 6] * 2)), "src_mask"),
        (lambda: model(src, None, tgt_in, src_mask=torch.ones(2, 3, dtype=torch.bool)), "src_mask"),
        (lambda: model.generate(src, lengths, max_len=0), "max_len"),
        (lambda: model.generate(src, lengths, beam_size=VOCAB + 1), "beam_size"),
        (lambda: model.generate(src, lengths, length_penalty=-1.0), "length_penalty"),
        (lambda: Seq2Seq(VOCAB, VOCAB, 8, 8, attention="luong"), "attention"),
        (lambda: Seq2Seq(VOCAB, VOCAB, 8, 8, cell="lstmm"), "cell"),
        (lambda: Seq2Seq(VOCAB, VOCAB, 8, 8, backend="numbaa"), "backend"),
        (lambda: Encoder(4, 8, cell="lstmm"), "cell"),
        (lambda: Seq2Seq(VOCAB, VOCAB, 8, 8, attention="luong_dot", bidirectional_encoder=True), "luong_dot"),
        (lambda: Seq2Seq(VOCAB, VOCAB, 8, 8, bridge="mean"), "bridge"),
        (lambda: Seq2Seq(VOCAB, VOCAB, 8, 8, eos_id=VOCAB), "eos_id"),
        (lambda: Seq2Seq(3, VOCAB, 8, 8, pad_id=5), "pad_id"),
    ]
    for call, name in cases:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert name in str(info.value), f"{name!r} not named in: {info.value}"
    assert isinstance(pytest.raises(seqfast.InputError, lambda: model(src[0], lengths, tgt_in)).value, RuntimeError)


@pytest.mark.parametrize("backend", ["numba", "triton", "native"])
@pytest.mark.parametrize("attention", ["bahdanau", "luong_general"])
def test_every_backend_matches_the_torch_backend(backend, attention):
    """The same weights give the torch backend's logits, gradients and beam search on every backend (triton under
    the interpreter on CPU, at a tiny size)."""
    why = seqfast.registry.backends[backend].unavailable_reason()
    if why:
        pytest.skip(why)
    torch.manual_seed(0)
    reference = Seq2Seq(VOCAB, VOCAB, 6, 5, cell="lstm", attention=attention, bidirectional_encoder=True,
                        backend="torch")
    model = Seq2Seq(VOCAB, VOCAB, 6, 5, cell="lstm", attention=attention, bidirectional_encoder=True,
                    backend=backend)
    model.load_state_dict(reference.state_dict())
    src, lengths = _source(2)
    tgt_in = torch.randint(3, VOCAB, (2, 3))
    results = []
    for m in (reference, model):
        logits = m(src, lengths, tgt_in)
        logits.logsumexp(-1).sum().backward()
        tokens, scores = m.generate(src, lengths, max_len=3, beam_size=2)
        results.append((logits.detach(), {n: p.grad for n, p in m.named_parameters()}, tokens, scores))
    (ref_logits, ref_grads, ref_tokens, ref_scores), (logits, grads, tokens, scores) = results
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-5)
