"""Inputs and comparisons shared by the numba backend's tests: a scan on numba against the torch reference."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import seqfast
from seqfast.registry import CellSpec, Weights


@pytest.fixture(autouse=True)
def fresh_plans():
    """Plans made in a test may follow from settings it patched (threads, MIN_WORK_PER_THREAD, the BLAS kernel):
    each test starts and ends with none. Autouse in every module that imports it."""
    from seqfast.backends.numba import schedule

    schedule.clear_plans()
    yield
    schedule.clear_plans()


BUILTIN = ("rnn_tanh", "rnn_relu", "lstm", "gru")
TOL = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-10)}


def make_inputs(cell: CellSpec, steps: int, batch: int, hidden: int, dtype: torch.dtype, seed: int, bias: bool = True,
            lengths: bool = False):
    gen = torch.Generator().manual_seed(seed)
    g = cell.num_gates

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()

    x = rand(steps, batch, g * hidden)
    state0 = tuple(rand(batch, hidden, scale=0.5) for _ in cell.state_names)
    weights = Weights(weight_hh=None, bias_hh=None)
    if cell.recurrence == "dense":
        weights["weight_hh"] = rand(g * hidden, hidden, scale=1 / math.sqrt(hidden))
    elif cell.recurrence == "diagonal":
        weights["weight_hh"] = rand(g * hidden, scale=0.5)
    if bias and cell.recurrence != "none":
        weights["bias_hh"] = rand(g * hidden, scale=0.3)
    for p in cell.extra_params:
        if p.recurrent:
            weights[p.name] = rand(*p.shape(hidden, 0), scale=0.5)
    lens = None
    if lengths:
        lens = torch.randint(1, steps + 1, (batch,), generator=gen)
        lens[0] = steps
    return x, state0, weights, lens


def run_scan(cell, x, state0, weights, lengths, reverse, backend):
    out, final = seqfast.scan(cell, x, state0, weights, lengths, reverse, backend=backend)
    gen = torch.Generator().manual_seed(123)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    loss = loss + sum(((i + 2.0) * f).sum() for i, f in enumerate(final))
    leaves = [x, *state0, *(w for w in weights.values() if w is not None)]
    grads = torch.autograd.grad(loss, leaves)
    return out, final, grads


def compare_with_reference(cell, x, state0, weights, lengths, reverse, dtype):
    ref = run_scan(cell, x, state0, weights, lengths, reverse, "torch")
    got = run_scan(cell, x, state0, weights, lengths, reverse, "numba")
    names = ["x_proj", *(f"state0.{s}" for s in cell.state_names), *(n for n, w in weights.items() if w is not None)]
    torch.testing.assert_close(got[0], ref[0], **TOL[dtype], msg=lambda m: f"outputs: {m}")
    for name, a, b in zip(cell.state_names, got[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"final {name}: {m}")
    for name, a, b in zip(names, got[2], ref[2], strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"grad {name}: {m}")
    if lengths is not None:  # outputs past each sequence's length are exactly zero
        steps = torch.arange(x.shape[0]).unsqueeze(1)
        assert torch.all(got[0][steps >= lengths.unsqueeze(0)] == 0)



def recorded_launches(monkeypatch) -> list[str]:
    """The kernels schedule.launch runs from now on ("forward", "forward_units", "backward"), in order."""
    from seqfast.backends.numba import schedule

    kernels = []
    real = schedule.launch

    def launch(module, kernel, plan, small, args, sums=()):
        kernels.append(kernel)
        return real(module, kernel, plan, small, args, sums)

    monkeypatch.setattr(schedule, "launch", launch)
    return kernels


def run_python(code: str, env: dict[str, str]) -> str:
    """Run code in a fresh Python process; its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout
