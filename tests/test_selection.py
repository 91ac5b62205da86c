"""Where a backend choice comes from, and what happens when it cannot run."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

import seqfast
from seqfast import BackendNotSupportedError, CellSpec, config_file, use_backend
from seqfast.config import resolve_choice
from seqfast.registry import registry


def choice(cell="lstm", argument=None):
    spec = seqfast.get_cell(cell)
    return resolve_choice(spec.name, spec.env_name, argument)


def test_default_is_auto():
    assert choice().name == "auto"
    assert choice().source == "default"


@pytest.mark.parametrize("source", ["argument", "context", "env_cell", "env_all", "file_cell", "file_all"])
def test_each_source_alone(source, monkeypatch, tmp_path):
    if source == "argument":
        assert choice(argument="torch") == seqfast.config.Choice("torch", "backend= argument")
        return
    if source == "context":
        with use_backend("torch"):
            assert choice().name == "torch"
        return
    if source == "env_cell":
        monkeypatch.setenv("SEQFAST_BACKEND_LSTM", "torch")
        assert choice().name == "torch" and "SEQFAST_BACKEND_LSTM" in choice().source
        assert choice("gru").name == "auto"
        return
    if source == "env_all":
        monkeypatch.setenv("SEQFAST_BACKEND", "torch")
        assert choice("gru").name == "torch" and choice("rnn_tanh").name == "torch"
        return
    if source == "file_cell":
        (tmp_path / "seqfast.toml").write_text('[backends]\nlstm = "torch"\n')
        assert choice().name == "torch" and "seqfast.toml" in choice().source
        assert choice("gru").name == "auto"
        return
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.seqfast]\nbackend = "native"\n')
    assert choice("gru").name == "native" and "pyproject.toml" in choice("gru").source


def test_precedence_chain(monkeypatch, tmp_path):
    """Each source beats every source below it: peel them off one at a time."""
    (tmp_path / "seqfast.toml").write_text('backend = "b_file_all"\n[backends]\nlstm = "b_file_cell"\n')
    monkeypatch.setenv("SEQFAST_BACKEND", "b_env_all")
    monkeypatch.setenv("SEQFAST_BACKEND_LSTM", "b_env_cell")
    with use_backend("b_context"):
        assert choice(argument="b_arg").name == "b_arg"
        assert choice().name == "b_context"
    assert choice().name == "b_env_cell"
    monkeypatch.delenv("SEQFAST_BACKEND_LSTM")
    assert choice().name == "b_env_all"
    monkeypatch.delenv("SEQFAST_BACKEND")
    assert choice().name == "b_file_cell"
    assert choice("gru").name == "b_file_all"


def test_config_file_named_by_env_beats_local_files(monkeypatch, tmp_path):
    (tmp_path / "seqfast.toml").write_text('backend = "native"\n')
    other = tmp_path / "elsewhere.toml"
    other.write_text('backend = "torch"\n')
    monkeypatch.setenv("SEQFAST_CONFIG", str(other))
    assert choice().name == "torch"
    monkeypatch.setenv("SEQFAST_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError, match="SEQFAST_CONFIG names"):
        choice()


def test_the_config_file_is_looked_for_once_an_interval(monkeypatch, tmp_path):
    """Selections look for the config file again once config_file.CONFIG_LOOK_SECONDS have passed, at once when
    SEQFAST_CONFIG changes or after forget_config_file(); in between they make no system call for it."""
    now = [100.0]
    monkeypatch.setattr(config_file, "CONFIG_LOOK_SECONDS", 1.0)
    monkeypatch.setattr(config_file, "_clock", lambda: now[0])
    config_file.forget_config_file()
    assert choice().name == "auto"
    looks = []
    real_look = config_file._look_for_config_file
    monkeypatch.setattr(config_file, "_look_for_config_file", lambda named: looks.append(named) or real_look(named))
    (tmp_path / "seqfast.toml").write_text('backend = "native"\n')
    now[0] += 0.5
    assert choice().name == "auto" and not looks  # within the interval: the last look stands, no stat
    now[0] += 0.6
    assert choice().name == "native" and looks == [""]  # the interval passed: looked again
    (tmp_path / "seqfast.toml").write_text('backend = "torch"\n')
    assert choice().name == "native"
    config_file.forget_config_file()
    assert choice().name == "torch" and len(looks) == 2
    other = tmp_path / "elsewhere.toml"
    other.write_text('backend = "numba"\n')
    monkeypatch.setenv("SEQFAST_CONFIG", str(other))
    assert choice().name == "numba" and looks[-1] == str(other)  # a new SEQFAST_CONFIG is looked up at once


def test_bad_config_file_is_a_clear_error(tmp_path):
    (tmp_path / "seqfast.toml").write_text("backend = [1, 2\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        choice()
    (tmp_path / "seqfast.toml").write_text("backend = 3\n")
    with pytest.raises(ValueError, match="'backend' must be a string"):
        choice()


def test_use_backend_mapping_merges_and_restores():
    with use_backend("native"):
        with use_backend({"gru": "torch"}):
            assert choice("gru").name == "torch"
            assert choice("lstm").name == "native"
        with use_backend("torch"):  # a plain name replaces outer per-cell choices too
            assert choice("lstm").name == "torch"
        assert choice("gru").name == "native"
    assert choice("gru").name == "auto"


def test_use_backend_restores_after_exception():
    with pytest.raises(KeyError):
        with use_backend("torch"):
            raise KeyError("boom")
    assert choice().name == "auto"


def test_use_backend_rejects_bad_arguments():
    with pytest.raises(TypeError, match="expected a backend name or a"):
        with use_backend(3):
            pass


def test_context_is_per_thread():
    seen: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def worker(name):
        with use_backend(name):
            barrier.wait()  # both threads are inside their own `with` at once
            seen[name] = choice().name

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("torch", "native")]
    with use_backend("other"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert choice().name == "other"
    assert seen == {"torch": "torch", "native": "native"}


def test_context_is_per_asyncio_task():
    async def task(name):
        with use_backend(name):
            await asyncio.sleep(0.01)
            return choice().name

    async def main():
        return await asyncio.gather(task("torch"), task("native"))

    assert asyncio.run(main()) == ["torch", "native"]


def test_unknown_backend_lists_known_names():
    module = seqfast.LSTM(2, 3, backend="nonexistent")
    known = r"unknown backend 'nonexistent'; known backends: \['auto', .*'native'.*'torch'"
    with pytest.raises(ValueError, match=known):
        module(torch.randn(3, 1, 2))
    with use_backend("also-missing"):
        with pytest.raises(ValueError, match="unknown backend 'also-missing'"):
            seqfast.GRU(2, 3)(torch.randn(3, 1, 2))


@pytest.fixture
def custom_cell():
    """A cell with only a reference step (no torch.nn kernel), registered for one test."""

    def step(x_t, state, w):
        (h,) = state
        return (torch.tanh(x_t + torch.nn.functional.linear(h, w.weight_hh, w.bias_hh)) * 0.5,)

    spec = CellSpec(name="half_tanh", num_gates=1, state_names=("h",), reference_step=step)
    seqfast.register_cell(spec)
    yield spec
    del registry.cells[spec.name]
    del registry.cell_origin[spec.name]


def test_requested_backend_that_cannot_run_raises_with_reasons(custom_cell):
    module = seqfast.Recurrent("half_tanh", 2, 3, backend="native")
    with pytest.raises(BackendNotSupportedError) as info:
        module(torch.randn(4, 1, 2))
    message = str(info.value)
    assert "backend 'native' (chosen by backend= argument) cannot run cell=half_tanh" in message
    assert "has no torch.nn fused kernel" in message
    assert "backends that can run it: ['torch'" in message
    assert info.value.reasons


def test_auto_picks_best_backend_with_no_reasons(custom_cell):
    assert seqfast.current_backend("lstm") == "native"
    assert seqfast.current_backend("half_tanh") == "torch"
    out, h = seqfast.Recurrent("half_tanh", 2, 3, num_layers=2, bidirectional=True)(torch.randn(4, 2, 2))
    assert out.shape == (4, 2, 6) and h.shape == (4, 2, 3)
    assert out.abs().max() <= 0.5  # the cell's own math ran


def test_explain_gives_every_backends_reasons(custom_cell):
    reasons = seqfast.explain("half_tanh", dtype=torch.float64)
    assert reasons["torch"] == []
    assert any("no torch.nn fused kernel" in r for r in reasons["native"])
    assert set(reasons) == set(registry.backends)


def test_available_backends_includes_reference_and_native():
    names = seqfast.available_backends()
    assert "torch" in names and "native" in names
    for name in names:
        assert registry.backends[name].unavailable_reason() is None


def test_env_choice_applies_to_modules(monkeypatch):
    calls = []
    original = registry.backends["torch"].scan

    def spy(*args, **kwargs):
        calls.append(args[0].name)
        return original(*args, **kwargs)

    monkeypatch.setattr(registry.backends["torch"], "scan", spy)
    monkeypatch.setenv("SEQFAST_BACKEND_GRU", "torch")
    seqfast.GRU(2, 3)(torch.randn(3, 1, 2))
    seqfast.LSTM(2, 3)(torch.randn(3, 1, 2))  # not affected: auto -> native
    assert calls == ["gru"]


def test_remembered_auto_decisions_follow_registrations(custom_cell):
    from seqfast.backends.reference import TorchBackend

    assert seqfast.current_backend("half_tanh") == "torch"

    class Preferred(TorchBackend):
        name = "preferred"
        priority = 50

    seqfast.register_backend(Preferred())
    try:
        assert seqfast.current_backend("half_tanh") == "preferred"
    finally:
        del registry.backends["preferred"]
    assert seqfast.current_backend("half_tanh") == "torch"


def test_fast_environment_reads_follow_every_change(monkeypatch):
    """Selection reads the environment on every call through _env.getenv (os.environ's own bytes dict)."""
    from seqfast.config import getenv

    name = "SEQFAST_TEST_FAST_ENV"
    assert getenv(name) == ""
    monkeypatch.setenv(name, " numba ")
    assert getenv(name) == "numba"
    os.environ[name] = "torch"
    assert getenv(name) == "torch"
    monkeypatch.delenv(name)
    assert getenv(name) == ""
    monkeypatch.setenv("SEQFAST_BACKEND", "torch")
    assert seqfast.current_backend("gru", hidden_size=4) == "torch"
    monkeypatch.setenv("SEQFAST_BACKEND", "native")
    assert seqfast.current_backend("gru", hidden_size=4) == "native"
