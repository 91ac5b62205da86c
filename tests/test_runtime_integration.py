"""seqfast modules in the rest of torch's runtime: parametrized weights, autocast, torch.compile with lengths, and
forked DataLoader workers. Every check compares against torch.nn (or eager mode) on tiny shapes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import backend_param
from torch.nn.utils import parametrizations

import seqfast

BACKENDS = [backend_param(name) for name in ("torch", "native", "numba", "triton")]


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    """Run code in a fresh interpreter (a hang fails the test through the timeout instead of blocking it)."""
    root = os.path.dirname(os.path.dirname(seqfast.__file__))  # the seqfast under test, not another install
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": path, **(env or {})}, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- parametrized weights ------------------------------------------------------------------------------------------
def _legacy_weight_norm(module: torch.nn.Module, name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations.weight_norm
        torch.nn.utils.weight_norm(module, name)


PARAMETRIZATIONS = {
    "weight_norm": parametrizations.weight_norm,
    "orthogonal": parametrizations.orthogonal,
    "spectral_norm": parametrizations.spectral_norm,
    "legacy_weight_norm": _legacy_weight_norm,
}


@pytest.mark.parametrize("how", list(PARAMETRIZATIONS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_parametrized_weights_match_torch_nn(backend, kind, how):
    torch.manual_seed(0)
    cell = kind.endswith("Cell")
    weight = "weight_hh" if cell else "weight_hh_l0"
    ref = getattr(torch.nn, kind)(3, 4)
    ours = getattr(seqfast, kind)(3, 4, backend=backend)
    for module in (ref, ours):
        PARAMETRIZATIONS[how](module, weight)
    ours.load_state_dict(ref.state_dict())  # the parametrization's own state (originals, power-iteration vectors)
    x = torch.randn(3, 4, 3) if not cell else torch.randn(2, 3)
    grads = []
    for module in (ref, ours):
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        loss = out.pow(2).sum()
        grads.append((out, torch.autograd.grad(loss, list(module.parameters()))))
    (want, want_grads), (got, got_grads) = grads
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    names = [n for n, _ in ours.named_parameters()]
    assert names == [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_a_parametrized_weight_trains(backend):
    """The module must see that training is needed when the only trainable tensor is a parametrization's."""
    torch.manual_seed(0)
    ref, ours = torch.nn.GRU(3, 4), seqfast.GRU(3, 4, backend=backend)
    for module in (ref, ours):
        parametrizations.weight_norm(module, "weight_hh_l0")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 3)
    grads = []
    for module in (ref, ours):
        for name, p in module.named_parameters():
            p.requires_grad_(name.startswith("parametrizations."))
        trained = [p for p in module.parameters() if p.requires_grad]
        if module is ours:  # what selection is told: a backend that cannot train must not be picked
            assert ours._query(x, None, "module").requires_grad
        grads.append(torch.autograd.grad(module(x)[0].sum(), trained))
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


# --- torch.compile with lengths ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [backend_param("torch"), backend_param("numba")])
def test_compile_fullgraph_with_lengths_matches_eager(backend):
    torch.manual_seed(0)
    module = seqfast.LSTM(3, 4, backend=backend).double()

    def loss(x, lengths):
        out, (h, c) = module(x, lengths=lengths)
        return out.pow(2).sum() + h.sum() + c.sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for steps, lengths in ((5, [5, 2, 3]), (4, [1, 4, 2])):  # the second shape may recompile with dynamic shapes
        x = torch.randn(steps, 3, 3, dtype=torch.float64)
        lengths = torch.tensor(lengths)
        want = loss(x, lengths)
        want_grads = torch.autograd.grad(want, list(module.parameters()))
        got = compiled(x, lengths)
        got_grads = torch.autograd.grad(got, list(module.parameters()))
        torch.testing.assert_close(got, want)
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b)
    # lengths are still checked, when the graph runs
    with pytest.raises(RuntimeError, match=r"lengths: every length must be in \[1, 4\]"):
        compiled(torch.randn(4, 3, 3, dtype=torch.float64), torch.tensor([1, 5, 2]))


# --- forked DataLoader workers ---------------------------------------------------------------------------------------
# A script's setup defines `run(i)` -> (the output for xs[i], what a worker must see) and `want`, the parent's outputs
# (the parent's calls start the OpenMP team: a team started in a forked child whose parent had one hangs).
_FORKED_LOADER = """

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return len(xs)

    def __getitem__(self, i):
        with torch.no_grad():
            return run(i)


loader = torch.utils.data.DataLoader(Data(), batch_size=None, num_workers=2, multiprocessing_context="fork")
got = list(loader)
for (out, seen), expected in zip(got, want, strict=True):
    torch.testing.assert_close(out, expected)
    assert seen == WORKER_SEES, seen
print("ok", len(got))
"""

_FORKED_SCANS = """
import torch, seqfast
from seqfast.backends.numba.schedule import num_threads, row_ranges

torch.manual_seed(0)
module = seqfast.LSTM(16, 64, backend="numba").eval()
xs = torch.randn(4, 50, 8, 16)
assert num_threads() == 2 and len(row_ranges(8, 50 * 4 * 64 * 64)) == 2  # the scans below use two threads
WORKER_SEES = 1  # threads


def run(i):
    return module(xs[i])[0], num_threads()


with torch.no_grad():
    want = [module(x)[0] for x in xs]
"""

_FORKED_CELLS = """
import torch, seqfast
from seqfast.backends.numba import schedule, step_plan

torch.manual_seed(0)
cell = seqfast.LSTMCell(128, 256, backend="numba")
xs = torch.randn(4, 1, 128)
with torch.no_grad():
    cell(xs[0])
    layout = step_plan.step_layout(cell.cell, torch.float32, tuple(cell._names))
    plan = layout.shapes[(1, 128, 256)]
    team = step_plan.team_array(layout, 2, 2).ctypes.data  # the parent's steps split over a team of two
    layout.shapes[(1, 128, 256)] = plan._replace(team=team, threads=schedule.num_threads())
    want = [cell(x) for x in xs]
assert layout.shapes[(1, 128, 256)].team == team
WORKER_SEES = 0  # no team: the worker's own thread alone


def run(i):
    return cell(xs[i]), layout.shapes[(1, 128, 256)].team
"""


@pytest.mark.parametrize("setup", [_FORKED_SCANS, _FORKED_CELLS], ids=["scans", "cell-steps"])
def test_forked_dataloader_workers_run_numba_on_their_own_thread(setup):
    out = _python(setup + _FORKED_LOADER, {"SEQFAST_NUMBA_THREADS": "2"}, timeout=60)
    assert out.strip().splitlines()[-1] == "ok 4"


# --- autocast ------------------------------------------------------------------------------------------------------
def _autocast_run(module, x, dtype):
    """(every output tensor, every parameter's gradient) of module(x) under CPU autocast to dtype."""
    with torch.autocast("cpu", dtype=dtype):
        result = module(x)
    if x.dim() == 3:  # a sequence module: (output, h) or (output, (h, c))
        result = (result[0], *(result[1] if isinstance(result[1], tuple) else (result[1],)))
    outs = list(result) if isinstance(result, tuple) else [result]
    loss = sum(o.float().pow(2).sum() for o in outs)
    return outs, torch.autograd.grad(loss, list(module.parameters()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", [None, *BACKENDS[:2], BACKENDS[3]])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_autocast_matches_torch_nn(kind, backend, dtype):
    """Output dtypes (torch.nn's, which differ by module) and values, and float32 gradients, under CPU autocast."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(3, 4)
    ours = getattr(seqfast, kind)(3, 4, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3) if kind.endswith("Cell") else torch.randn(3, 2, 3)
    try:
        want, want_grads = _autocast_run(ref, x, dtype)
    except RuntimeError as exc:  # torch.nn.LSTM's oneDNN kernel fails under autocast on some CPUs: ours still runs
        assert kind == "LSTM", exc
        got, _ = _autocast_run(ours, x, dtype)
        assert [o.dtype for o in got] == [dtype] * 3
        return
    got, got_grads = _autocast_run(ours, x, dtype)
    assert [o.dtype for o in got] == [o.dtype for o in want]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.1)


def test_autocast_numba_declines_with_a_reason():
    module = seqfast.LSTM(3, 4, backend="numba")
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.raises(seqfast.BackendNotSupportedError, match=r"(?s)dtype bfloat16 not supported.*torch\.autocast"):
        module(torch.randn(3, 2, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert seqfast.current_backend("lstm", dtype=torch.bfloat16) != "numba"
