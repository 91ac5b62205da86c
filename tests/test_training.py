"""seqfast.training: truncated BPTT windows, state carrying and gradients, and the Trainer loop."""

from __future__ import annotations

import csv

import pytest
import torch

import seqfast
from seqfast.training import TBPTT, Trainer, batchify, detach_state


# --- batchify and windows ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True], ids=["tb", "bf"])
def test_batchify_rows_continue_across_windows(batch_first):
    """Row b of window k+1 starts where row b of window k ended: the stream is cut into B contiguous rows."""
    tokens = torch.arange(53)
    data = batchify(tokens, 4, batch_first=batch_first)
    assert data.shape == ((4, 13) if batch_first else (13, 4))
    rows = data if batch_first else data.T
    assert torch.equal(rows.reshape(-1), tokens[:52])  # every row contiguous, the remainder dropped
    tbptt = TBPTT(lambda x, s: (x, s), k1=5, batch_first=batch_first)
    windows = list(tbptt.windows(data))
    assert [w.end - w.loss_start for w in windows] == [5, 5, 3]
    for prev, nxt in zip(windows, windows[1:], strict=False):
        last = prev.inputs.select(tbptt.time_dim, -1)
        first = nxt.inputs.select(tbptt.time_dim, 0)
        assert torch.equal(first, last + 1)


def test_batchify_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        batchify(torch.arange(10), 0)
    with pytest.raises(ValueError, match="shorter than batch_size=4"):
        batchify(torch.arange(3), 4)
    with pytest.raises(TypeError, match="must be a Tensor"):
        batchify([1, 2, 3], 1)


@pytest.mark.parametrize("k1,k2", [(3, 3), (2, 5), (3, 4), (4, 9)], ids=lambda v: str(v))
def test_windows_from_chunks_equal_windows_from_the_whole_stream(k1, k2):
    """An iterator of uneven chunks gives the same windows (inputs, targets, positions) as the whole tensor."""
    torch.manual_seed(0)
    x, y = torch.randn(17, 2, 3), torch.randint(0, 5, (17, 2))
    tbptt = TBPTT(lambda x, s: (x, s), k1=k1, k2=k2)
    whole = list(tbptt.windows(x, y))
    cuts = [0, 1, 6, 7, 13, 17]
    chunked = list(tbptt.windows([(x[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]))
    assert len(whole) == len(chunked) == -(-17 // k1) == len(tbptt.windows(x, y))
    for n, (w, c) in enumerate(zip(whole, chunked, strict=True)):
        assert (w.start, w.loss_start, w.end) == (c.start, c.loss_start, c.end)
        assert (w.start, w.loss_start, w.end) == (max(0, (n + 1) * k1 - k2), n * k1, min(17, (n + 1) * k1))
        assert torch.equal(w.inputs, x[w.start:w.end]) and torch.equal(c.inputs, x[c.start:c.end])
        assert torch.equal(w.targets, y[w.loss_start:w.end]) and torch.equal(c.targets, y[c.loss_start:c.end])


def test_windows_reject_inconsistent_chunks():
    tbptt = TBPTT(lambda x, s: (x, s), k1=2)
    with pytest.raises(ValueError, match="chunk 1 lacks targets"):
        list(tbptt.windows([(torch.zeros(2, 1, 1), torch.zeros(2, 1)), torch.zeros(2, 1, 1)]))
    with pytest.raises(ValueError, match="chunk 0's targets have 3 steps, its inputs 2"):
        list(tbptt.windows([(torch.zeros(2, 1, 1), torch.zeros(3, 1))]))
    with pytest.raises(ValueError, match="k2 must be an int >= k1=3, got 2"):
        TBPTT(lambda x, s: (x, s), k1=3, k2=2)


def test_detach_state_walks_containers():
    a = torch.ones(2, requires_grad=True) * 2
    out = detach_state({"h": (a, [a]), "n": 3})
    assert out["n"] == 3 and out["h"][0].grad_fn is None and out["h"][1][0].grad_fn is None
    assert a.grad_fn is not None


# --- state carrying and gradients ----------------------------------------------------------------------------------
def test_backward_of_a_window_does_not_reach_the_previous_one():
    """The carried state is detached: window k's backward leaves chunk k-1's inputs without gradient."""
    torch.manual_seed(0)
    lstm = seqfast.LSTM(3, 4)
    chunks = [torch.randn(4, 2, 3, requires_grad=True) for _ in range(3)]
    tbptt = TBPTT(lstm, k1=4)
    for k, window in enumerate(tbptt.windows(iter(chunks))):
        if k > 0:
            h, c = tbptt.state
            assert h.grad_fn is None and c.grad_fn is None and not h.requires_grad
        tbptt(window).sum().backward()
        assert chunks[k].grad is not None
        assert all(chunks[j].grad is None for j in range(k)), f"window {k} reached an earlier chunk"
        chunks[k].grad = None
    assert k == 2
    assert tbptt.state[0].grad_fn is None


def test_the_state_is_carried_between_windows_and_reset_per_iteration():
    """Windows run one after another give the output of one run over the whole stream; iterating again starts over
    from the initial state."""
    torch.manual_seed(0)
    gru = seqfast.GRU(3, 5, num_layers=2, batch_first=True)
    x = torch.randn(2, 10, 3)
    full, _ = gru(x)
    tbptt = TBPTT(gru, k1=3, batch_first=True)
    for _ in range(2):
        outs = [tbptt(w) for w in tbptt.windows(x)]
        torch.testing.assert_close(torch.cat(outs, 1), full)


def _reference_window_grads(rnn, x, weights, k1, k2):
    """Per window: the gradient of sum(weights * h_t) over its loss steps, backpropagated through at most k2 steps,
    written out step by step (h_t = tanh(W x_t + b + U h_{t-1} + c)) from a detached state k2 steps back."""
    w_ih, w_hh, b_ih, b_hh = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0
    steps = x.shape[0]
    grads = []
    for n in range(-(-steps // k1)):
        loss_start, end = n * k1, min(steps, (n + 1) * k1)
        start = max(0, (n + 1) * k1 - k2)
        h = x.new_zeros(x.shape[1], w_hh.shape[0])
        with torch.no_grad():
            for t in range(start):
                h = torch.tanh(x[t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
        loss = 0
        for t in range(start, end):
            h = torch.tanh(x[t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
            if t >= loss_start:
                loss = loss + (weights[t] * h).sum()
        grads.append(torch.autograd.grad(loss, [w_ih, w_hh, b_ih, b_hh]))
    return grads


@pytest.mark.parametrize("k1,k2", [(3, 3), (2, 5), (3, 4), (2, 7), (4, 6)], ids=lambda v: str(v))
def test_k1_k2_gradients_match_the_hand_written_reference(k1, k2):
    torch.manual_seed(0)
    steps = 11
    rnn = seqfast.RNN(3, 4).double()
    x = torch.randn(steps, 2, 3, dtype=torch.float64)
    weights = torch.randn(steps, 2, 4, dtype=torch.float64)
    tbptt = TBPTT(rnn, k1=k1, k2=k2)
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]
    expected = _reference_window_grads(rnn, x, weights, k1, k2)
    windows = list(tbptt.windows(x, weights))
    assert len(windows) == len(expected)
    for n, window in enumerate(windows):
        loss = (window.targets * tbptt(window)).sum()
        got = torch.autograd.grad(loss, params)
        for name, g, e in zip(["weight_ih", "weight_hh", "bias_ih", "bias_hh"], got, expected[n], strict=True):
            torch.testing.assert_close(g, e, msg=lambda m, n=n, name=name: f"window {n} {name}: {m}")
    # the truncation matters: with k2 > k1 the gradient differs from plain chunks of k1
    if k2 > k1:
        plain = _reference_window_grads(rnn, x, weights, k1, k1)
        assert any(not torch.allclose(a[1], b[1]) for a, b in zip(expected, plain, strict=True))


# --- Trainer -------------------------------------------------------------------------------------------------------
def _regression(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = 10 * x @ torch.randn(3, 1, generator=g) + 5
    return list(zip(x.split(4), y.split(4), strict=True))


def _mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


class _RecordingSGD(torch.optim.SGD):
    """SGD that records the gradients it is about to apply."""

    def __init__(self, params, lr):
        super().__init__(params, lr)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def test_clip_grad_norm_is_applied():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = _RecordingSGD(model.parameters(), lr=1e-3)
    history = Trainer(model, opt, _mse, clip_grad_norm=0.5, progress=False).fit(_regression(), epochs=2)
    norms = [torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) for grads in opt.seen]
    assert len(norms) == 12 and max(norms) <= 0.5 + 1e-6
    assert history[0]["grad_norm"] > 0.5  # the gradients before clipping were larger: the clip did something


def test_clip_grad_value_is_applied():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = _RecordingSGD(model.parameters(), lr=1e-3)
    Trainer(model, opt, _mse, clip_grad_value=0.25, progress=False).fit(_regression(), epochs=1)
    assert max(g.abs().max() for grads in opt.seen for g in grads) == pytest.approx(0.25)


def _scripted(values):
    """A step whose validation reports values[epoch] as `score`."""
    epoch = {"n": -1, "last_train": True}

    def step(model, batch):
        if model.training:
            epoch["last_train"] = True
            return _mse(model, batch)
        if epoch["last_train"]:
            epoch["n"] += 1
            epoch["last_train"] = False
        return _mse(model, batch), {"score": values[epoch["n"]]}
    return step


@pytest.mark.parametrize("mode,values,patience,min_delta,stop_epoch,best_epoch", [
    ("max", [0.1, 0.3, 0.35, 0.34, 0.36, 0.2, 0.1, 0.5], 2, 0.02, 5, 3),
    ("min", [5.0, 4.0, 4.5, 3.9, 3.8, 3.7, 3.6, 1.0], 3, 0.0, 8, 8),
    ("min", [5.0, 4.0, 4.5, 4.1, 3.95, 3.7, 3.6, 1.0], 3, 0.1, 5, 2),
], ids=["max-delta", "min-no-stop", "min-delta"])
def test_early_stopping_stops_at_the_right_epoch(mode, values, patience, min_delta, stop_epoch, best_epoch):
    model = torch.nn.Linear(3, 1)
    data = _regression()
    trainer = Trainer(model, torch.optim.Adam(model.parameters()), _scripted(values), monitor="val_score",
                      mode=mode, patience=patience, min_delta=min_delta, progress=False)
    history = trainer.fit(data, epochs=len(values), val=data[:2])
    assert [row["val_score"] for row in history] == values[:stop_epoch]
    assert trainer.best_epoch == best_epoch and trainer.best == values[best_epoch - 1]


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = seqfast.LSTM(3, 6, batch_first=True)
        self.drop = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.drop(self.lstm(x)[0][:, -1]))


def _resumable_run(tmp_path, epochs, seed, resume=False):
    torch.manual_seed(seed)
    model = _Net()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1 / (1 + epoch))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 4, 3, generator=g), torch.randn(20, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6, shuffle=True)
    trainer = Trainer(model, opt, _mse, scheduler=sched, clip_grad_norm=1.0, checkpoint=tmp_path / "ckpt.pt",
                      csv_path=tmp_path / "metrics.csv", progress=False)
    history = trainer.fit(loader, epochs=epochs, val=[(x[:5], y[:5])], resume=resume)
    return history, model


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Dropout, a shuffling DataLoader, RMSprop and a scheduler: stopping after 2 epochs and resuming from the
    checkpoint in fresh objects (another init, another RNG state) gives the same losses and weights as 4 epochs
    in one go."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight, model_a = _resumable_run(tmp_path / "a", 4, seed=0)
    first, _ = _resumable_run(tmp_path / "b", 2, seed=0)
    assert first == straight[:2]
    resumed, model_b = _resumable_run(tmp_path / "b", 4, seed=99, resume=True)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert resumed == straight
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert len({r["lr"] for r in straight}) == 4  # the scheduler's state came back too


def test_csv_has_every_epochs_metrics(tmp_path):
    history, _ = _resumable_run(tmp_path, 3, seed=0)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert list(rows[0]) == ["epoch", "loss", "grad_norm", "val_loss", "lr"]
    for row, expected in zip(rows, history, strict=True):
        assert {k: float(v) for k, v in row.items()} == pytest.approx(expected, rel=1e-12)
    assert (tmp_path / "ckpt.best.pt").exists()


def test_progress_off_prints_nothing_and_plain_prints_a_line_per_epoch(capsys):
    model = torch.nn.Linear(3, 1)
    Trainer(model, torch.optim.Adam(model.parameters()), _mse, progress=False).fit(_regression(), epochs=2)
    assert capsys.readouterr() == ("", "")
    trainer = Trainer(model, torch.optim.Adam(model.parameters()), _mse)
    trainer.bar.kind = "plain"
    trainer.fit(_regression(), epochs=2)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[:2] for line in lines] == [["epoch", "1"], ["epoch", "2"]]


def test_trainer_rejects_bad_arguments_and_steps():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'up'"):
        Trainer(model, opt, _mse, mode="up")
    with pytest.raises(ValueError, match="clip_grad_norm must be a positive number or None, got 0"):
        Trainer(model, opt, _mse, clip_grad_norm=0)
    with pytest.raises(TypeError, match=r"scalar loss Tensor .* got \(4, 1\)"):
        Trainer(model, opt, lambda m, b: m(b[0]), progress=False).fit(_regression(), epochs=1)
    with pytest.raises(KeyError, match="monitor='val_acc' is not among"):
        Trainer(model, opt, _mse, monitor="val_acc", progress=False).fit(_regression(), 1, val=_regression())


def test_language_model_with_tbptt_and_trainer():
    """The pieces together: a stateful LSTM language model over one token stream learns a repeating pattern."""
    torch.manual_seed(0)
    tokens = torch.tensor([0, 1, 2, 3, 2, 1] * 40)
    data = batchify(tokens, 4)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lstm, self.head = torch.nn.Embedding(4, 8), seqfast.LSTM(8, 16), torch.nn.Linear(16, 4)

        def forward(self, x, state):
            out, state = self.lstm(self.emb(x), state)
            return self.head(out), state

    model = LM()
    tbptt = TBPTT(model, k1=6, k2=12)

    def step(model, window):
        return torch.nn.functional.cross_entropy(tbptt(window).flatten(0, 1), window.targets.flatten())

    trainer = Trainer(model, torch.optim.Adam(model.parameters(), 1e-2), step, clip_grad_norm=1.0, progress=False)
    history = trainer.fit(tbptt.windows(data[:-1], data[1:]), epochs=6)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
