"""Whole-model pickling: torch.save / torch.load(weights_only=True), copy.deepcopy and pickle keep a module's cell by
its registered name, so only seqfast's public module classes need allow-listing."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import seqfast
from seqfast.registry import registry


class LanguageModel(torch.nn.Module):
    """A small model holding seqfast modules of built-in and plugin cells, as a user's program would."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 5)
        self.lstm = seqfast.LSTM(5, 6, num_layers=2, bidirectional=True)
        self.cell = seqfast.GRUCell(5, 6)
        self.plugin = seqfast.Recurrent("peephole_lstm", 5, 6)
        self.head = torch.nn.Linear(12, 11)

    def forward(self, tokens):
        x = self.embed(tokens)
        out, _ = self.lstm(x)
        h = self.cell(x[0])
        p, _ = self.plugin(x)
        return self.head(out) + h.sum() + p.sum()


ALLOWED = [LanguageModel, seqfast.LSTM, seqfast.GRUCell, seqfast.Recurrent, torch.nn.Embedding, torch.nn.Linear]


def _outputs(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.fixture
def model_and_tokens():
    if "peephole_lstm" not in registry.cells:
        pytest.skip("the example plugin seqfast-peephole is not installed")
    torch.manual_seed(0)
    return LanguageModel(), torch.randint(0, 11, (4, 3))


def test_torch_load_weights_only_with_public_classes_allow_listed(model_and_tokens):
    model, tokens = model_and_tokens
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.serialization.safe_globals(ALLOWED):
        loaded = torch.load(buf, weights_only=True)
    assert loaded.lstm.cell is registry.cells["lstm"]
    assert loaded.plugin.cell is registry.cells["peephole_lstm"]
    torch.testing.assert_close(_outputs(loaded, tokens), _outputs(model, tokens), rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_run_and_train_like_the_original(model_and_tokens, how):
    model, tokens = model_and_tokens
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(_outputs(clone, tokens), _outputs(model, tokens), rtol=0, atol=0)
    clone(tokens).sum().backward()
    assert all(p.grad is not None for p in clone.parameters())
    # the parameters' initialisers (a plugin's own, for its extra parameters) come back with the cell
    assert clone.plugin._inits == model.plugin._inits
    clone.plugin.reset_parameters()


def test_pickle_holds_the_cell_name_not_its_functions(model_and_tokens):
    model, _ = model_and_tokens
    data = pickle.dumps(model)
    assert b"CellSpec" not in data and b"reference_step" not in data


def test_loading_an_unregistered_cell_names_the_cell_and_its_plugin(model_and_tokens, monkeypatch):
    model, _ = model_and_tokens
    data = pickle.dumps(model.plugin)
    cells = dict(registry.cells)
    del cells["peephole_lstm"]
    monkeypatch.setattr(registry, "cells", cells)
    with pytest.raises(RuntimeError, match=r"'peephole_lstm'.*not registered.*plugin 'seqfast[-_]peephole"):
        pickle.loads(data)


def test_an_unregistered_cellspec_still_pickles_plainly():
    spec = registry.cells["rnn_tanh"]
    private = seqfast.CellSpec(name="private_rnn", num_gates=1, state_names=("h",),
                               reference_step=spec.reference_step, recurrence="dense")
    module = seqfast.Recurrent(private, 3, 4, backend="torch")
    clone = copy.deepcopy(module)
    assert clone.cell is not None and clone.cell.name == "private_rnn"
    x = torch.randn(2, 1, 3)
    torch.testing.assert_close(clone(x)[0], module(x)[0], rtol=0, atol=0)
