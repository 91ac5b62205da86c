"""Shared fixtures: random module configurations and comparison helpers, for every backend."""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Triton's interpreter must be chosen before its kernels are built; CPU tests run triton this way.
os.environ.setdefault("TRITON_INTERPRET", "1")

import seqfast  # noqa: E402
from seqfast import config_file  # noqa: E402
from seqfast.registry import Backend, get_backend, registry  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_selection_env(monkeypatch, tmp_path):
    """Tests start with no backend chosen by the environment or a config file in the working directory, and with
    auto's calibration off: tests that expect a backend get the static rule, whatever this machine measures, and
    none spends time timing backends. tests/test_calibration.py turns it on where it tests it."""
    for key in list(os.environ):
        if key.startswith("SEQFAST_BACKEND") or key == "SEQFAST_CONFIG":
            monkeypatch.delenv(key)
    monkeypatch.setenv("SEQFAST_CALIBRATE", "0")
    monkeypatch.chdir(tmp_path)
    # every selection looks for the config file (a test writes one and expects the next call to see it);
    # tests/test_selection.py tests the look's interval itself
    monkeypatch.setattr(config_file, "CONFIG_LOOK_SECONDS", 0.0)


def all_backends() -> list[str]:
    return list(registry.backends)


def backend_param(name: str):
    """A pytest param for a backend, skipped with its own reason when it cannot run on this machine."""
    why = registry.backends[name].unavailable_reason()
    return pytest.param(name, id=name, marks=pytest.mark.skipif(why is not None, reason=str(why)))


@dataclass(frozen=True)
class Config:
    """One random recurrent-module configuration; its id reads like `lstm-L2-bi-T5-B3-I4-H6-bf-nobias-P3`."""

    kind: str  # torch.nn class name: LSTM, GRU, RNN
    nonlinearity: str
    num_layers: int
    bidirectional: bool
    batch_first: bool
    bias: bool
    steps: int
    batch: int
    input_size: int
    hidden_size: int
    proj_size: int = 0

    @property
    def id(self) -> str:
        cell = {"LSTM": "lstm", "GRU": "gru", "RNN": f"rnn_{self.nonlinearity}"}[self.kind]
        parts = [cell, f"L{self.num_layers}", "bi" if self.bidirectional else "uni", f"T{self.steps}",
                 f"B{self.batch}", f"I{self.input_size}", f"H{self.hidden_size}"]
        parts += ["bf"] if self.batch_first else []
        parts += [] if self.bias else ["nobias"]
        parts += [f"P{self.proj_size}"] if self.proj_size else []
        return "-".join(parts)

    def kwargs(self) -> dict:
        kw = dict(num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first,
                  bidirectional=self.bidirectional)
        if self.kind == "RNN":
            kw["nonlinearity"] = self.nonlinearity
        if self.proj_size:
            kw["proj_size"] = self.proj_size
        return kw

    def modules(self, backend: str, dtype=torch.float32):
        """(torch.nn module, seqfast module with the same weights)."""
        ref = getattr(torch.nn, self.kind)(self.input_size, self.hidden_size, **self.kwargs()).to(dtype)
        ours = getattr(seqfast, self.kind)(self.input_size, self.hidden_size, backend=backend, **self.kwargs())
        ours = ours.to(dtype)
        ours.load_state_dict(ref.state_dict())
        return ref, ours


def random_configs(n: int, seed: int, max_size: int = 7, proj: bool = True) -> list[Config]:
    rng = random.Random(seed)
    kinds = [("LSTM", "tanh"), ("GRU", "tanh"), ("RNN", "tanh"), ("RNN", "relu")]
    out = []
    for i in range(n):
        kind, nl = kinds[i % len(kinds)]
        hidden = rng.randint(1, max_size)
        out.append(Config(
            kind=kind, nonlinearity=nl, num_layers=rng.choice([1, 2]), bidirectional=rng.random() < 0.6,
            batch_first=rng.random() < 0.5, bias=rng.random() < 0.8, steps=rng.randint(1, 6),
            batch=rng.randint(1, 4), input_size=rng.randint(1, max_size), hidden_size=hidden,
            proj_size=rng.randint(1, hidden - 1) if proj and kind == "LSTM" and hidden > 1 and rng.random() < 0.4
            else 0,
        ))
    return out


def assert_close(actual, expected, what: str, dtype=torch.float32):
    tol = {torch.float64: 1e-9, torch.float32: 2e-5}.get(dtype, 2e-2)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def flat_state(state):
    return torch.cat([s.reshape(-1) for s in state]) if isinstance(state, tuple) else state.reshape(-1)


class CountingBackend(Backend):
    """The torch backend's scan and step, counted: which backend a module's or a cell's call ran on."""

    calls = 0

    def __init__(self, name: str) -> None:
        self.name = name

    def scan(self, cell, x_proj, state0, weights, lengths, reverse):
        type(self).calls += 1
        return get_backend("torch").scan(cell, x_proj, state0, weights, lengths, reverse)

    def step(self, cell, x, state, params, names):
        type(self).calls += 1
        return get_backend("torch").step(cell, x, state, params, names)


@pytest.fixture
def counting():
    """CountingBackend registered as "counting" for the test."""
    backend = seqfast.register_backend(CountingBackend("counting"))
    CountingBackend.calls = 0
    yield backend
    registry.backends.pop("counting")
    registry.generation += 1


def walk_the_sources_of_a_gru_choice(module, call, monkeypatch, tmp_path) -> None:
    """A GRU module (or cell) with no backend= must run on "counting" exactly while a source of the choice names it:
    use_backend(), SEQFAST_BACKEND (unless SEQFAST_BACKEND_GRU names another), a config file, the backend
    attribute. call() runs the module once, checking its result."""
    monkeypatch.chdir(tmp_path)
    for var in ("SEQFAST_BACKEND", "SEQFAST_BACKEND_GRU", "SEQFAST_CONFIG"):
        monkeypatch.delenv(var, raising=False)

    def runs_on_counting() -> bool:
        before = CountingBackend.calls
        call()
        return CountingBackend.calls == before + 1

    assert not runs_on_counting()
    with seqfast.use_backend("counting"):
        assert runs_on_counting()
    with seqfast.use_backend({"gru": "counting"}):
        assert runs_on_counting()
    assert not runs_on_counting()
    monkeypatch.setenv("SEQFAST_BACKEND", "counting")
    assert runs_on_counting()
    monkeypatch.setenv("SEQFAST_BACKEND_GRU", "torch")
    assert not runs_on_counting()
    monkeypatch.delenv("SEQFAST_BACKEND_GRU")
    monkeypatch.delenv("SEQFAST_BACKEND")
    assert not runs_on_counting()
    (tmp_path / "seqfast.toml").write_text('backend = "counting"\n')
    assert runs_on_counting()
    (tmp_path / "seqfast.toml").unlink()
    assert not runs_on_counting()
    module.backend = "counting"
    assert runs_on_counting()
