"""Staged cells (Pointwise.stages) on the `triton` backend against the `torch` reference, through Triton's
interpreter: the reset-before GRU and MGU (defined here as a plugin would), on the on-chip and the tiled path,
with lengths and reverse; outputs, final states and every gradient. Shapes stay tiny (the interpreter is slow).
"""

from __future__ import annotations

import os

import pytest
import torch
from staged_cells import mgu_spec

import seqfast
import seqfast.testing
from seqfast.backends.triton.codegen import generate_source
from seqfast.registry import Query, Weights, registry

BACKEND = registry.backends.get("triton")
pytestmark = pytest.mark.skipif(BACKEND is None or not BACKEND.available(),
                                reason=str(BACKEND and BACKEND.unavailable_reason()))
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"


# --- MGU, as tests/test_staged_recurrence.py registers it (a plugin's cell) --------------------------------------
MGU = mgu_spec("tts_mgu")

STAGED = ("gru_reset_before", MGU.name)


@pytest.fixture(scope="module", autouse=True)
def _mgu_cell():
    seqfast.register_cell(MGU, replace=True)
    yield
    registry.cells.pop(MGU.name, None)
    registry.cell_origin.pop(MGU.name, None)
    registry.generation += 1


@pytest.fixture(autouse=True)
def _fp32_dots(monkeypatch):
    """On a GPU, float32 dots follow cudnn.allow_tf32; compare at float32 accuracy (3xTF32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


# --- helpers ------------------------------------------------------------------------------------------------------
def _inputs(cell: str, steps: int, batch: int, hidden: int, *, lengths, bias: bool = True, seed: int = 0,
            dtype=torch.float32):
    spec = seqfast.get_cell(cell)
    gen = torch.Generator().manual_seed(seed)
    w = seqfast.testing.random_weights(spec, hidden, torch.float32, gen)
    if not bias:
        w["bias_hh"] = None
    x = torch.randn(steps, batch, spec.num_gates * hidden, generator=gen)
    state = tuple(torch.randn(batch, hidden, generator=gen) * 0.5 for _ in spec.state_names)
    cast = lambda t: None if t is None else t.to(DEVICE, dtype).requires_grad_()  # noqa: E731
    lens = None if lengths is None else torch.tensor(lengths)
    return cast(x), tuple(cast(s) for s in state), Weights({k: cast(v) for k, v in w.items()}), lens


def _run(backend: str, cell: str, x, state, w, lengths, reverse: bool):
    """Outputs, final state and the gradient of a loss that weighs every element differently."""
    out, final = seqfast.scan(cell, x, state, w, lengths, reverse, backend=backend)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t.float() * torch.randn(t.shape, generator=gen).to(t.device)).sum() for t in (out, *final))
    leaves = [x, *state, *(v for v in w.values() if v is not None)]
    return out, final, torch.autograd.grad(loss, leaves)


def _compare(cell: str, x, state, w, lengths, reverse: bool, *, tol: float | None = None) -> None:
    """triton against torch on the same inputs (torch's in float32 when the inputs are half)."""
    got = _run("triton", cell, x, state, w, lengths, reverse)
    up = lambda t: None if t is None else t.detach().float().requires_grad_()  # noqa: E731
    ref_in = (up(x), tuple(up(s) for s in state), Weights({k: up(v) for k, v in w.items()}))
    expected = _run("torch", cell, *ref_in, lengths, reverse)
    names = ["x_proj", "state0", *(k for k, v in w.items() if v is not None)]
    kw = {} if tol is None else dict(rtol=tol, atol=tol)
    torch.testing.assert_close(got[0].float(), expected[0], **kw, msg=lambda m: f"outputs: {m}")
    torch.testing.assert_close(got[1][0].float(), expected[1][0], **kw, msg=lambda m: f"final h: {m}")
    for a, b, name in zip(got[2], expected[2], names, strict=True):
        torch.testing.assert_close(a.float(), b, **kw, msg=lambda m, name=name: f"grad {name}: {m}")
    if lengths is not None:  # padding is exactly zero, not merely close
        for b, n in enumerate(lengths.tolist()):
            assert torch.equal(got[0][n:, b], torch.zeros_like(got[0][n:, b])), f"outputs past length {n}"


# (steps, batch, hidden, reverse, lengths, bias)
CASES = [(3, 2, 5, False, None, True), (4, 3, 5, True, [4, 2, 3], True), (4, 3, 3, False, [2, 4, 1], False)]


def _case_id(cell, steps, batch, hidden, reverse, lengths, bias) -> str:
    return "-".join([cell, f"T{steps}", f"B{batch}", f"H{hidden}"] + (["rev"] if reverse else [])
                    + (["len"] if lengths else []) + ([] if bias else ["nobias"]))


# --- tests --------------------------------------------------------------------------------------------------------
def test_staged_cells_are_supported():
    for cell in STAGED:
        query = Query(seqfast.get_cell(cell), device=DEVICE, hidden_size=5, requires_grad=True)
        assert BACKEND.not_supported_reasons(query) == [], cell


# MGU's reference step (as tests/test_staged_recurrence.py has it) needs bias_hh
ON_CHIP_CASES = [(c, k) for c in STAGED for k in CASES if k[-1] or c == "gru_reset_before"]


@pytest.mark.parametrize("cell,case", ON_CHIP_CASES, ids=[_case_id(c, *k) for c, k in ON_CHIP_CASES])
def test_on_chip_matches_torch(cell, case):
    steps, batch, hidden, reverse, lengths, bias = case
    assert BACKEND.plan(seqfast.get_cell(cell), hidden, torch.float32).on_chip
    x, state, w, lens = _inputs(cell, steps, batch, hidden, lengths=lengths, bias=bias)
    _compare(cell, x, state, w, lens, reverse)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", STAGED)
def test_tiled_path_matches_torch(cell, reverse, monkeypatch):
    """The large-H path, forced through SEQFAST_TRITON_TILE: H=17 in two tiles of 16, the second masked."""
    monkeypatch.setenv("SEQFAST_TRITON_TILE", "16")
    plan = BACKEND.plan(seqfast.get_cell(cell), 17, torch.float32)
    assert not plan.on_chip and plan.block_h == 16
    x, state, w, lens = _inputs(cell, 3, 3, 17, lengths=[3, 1, 2], seed=2)
    _compare(cell, x, state, w, lens, reverse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("tile", [None, "16"], ids=["on_chip", "tiled"])
@pytest.mark.parametrize("cell", STAGED)
def test_half_precision(cell, dtype, tile, monkeypatch):
    if tile:
        monkeypatch.setenv("SEQFAST_TRITON_TILE", tile)
    x, state, w, lens = _inputs(cell, 3, 2, 5, lengths=[3, 2], dtype=dtype, seed=4)
    out, final = seqfast.scan(cell, x, state, w, lens, True, backend="triton")
    assert out.dtype == dtype and final[0].dtype == dtype
    # h and the stage vector are rounded where they enter a product, hg as it is saved: half accuracy
    _compare(cell, x, state, w, lens, True, tol=6e-2 if dtype == torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("tile", [None, "16"], ids=["on_chip", "tiled"])
@pytest.mark.parametrize("lengths", [None, [3, 1, 2]], ids=["full", "lengths"])
def test_bidirectional_module_matches_torch(lengths, tile, monkeypatch):
    """Two layers, both directions, through the modules (the reverse direction walks each row from its end)."""
    if tile:
        monkeypatch.setenv("SEQFAST_TRITON_TILE", tile)
    torch.manual_seed(0)
    lengths = None if lengths is None else torch.tensor(lengths)
    x = torch.randn(3, 3, 2)
    h0 = torch.randn(4, 3, 4)
    state_dict = seqfast.nn.Recurrent(MGU.name, 2, 4, num_layers=2, bidirectional=True).state_dict()
    results = []
    for backend in ("triton", "torch"):
        module = seqfast.nn.Recurrent(MGU.name, 2, 4, num_layers=2, bidirectional=True, backend=backend)
        module.load_state_dict(state_dict)
        xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
        out, h_n = module(xi, hi, lengths=lengths)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().add(h_n.square().sum()).backward()
        results.append((out, h_n, xi.grad, hi.grad, {n: p.grad for n, p in module.named_parameters()}))
    (got, expected) = results
    for name, a, b in zip(("output", "h_n", "grad x", "grad h0"), got[:4], expected[:4], strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    for name in expected[4]:
        torch.testing.assert_close(got[4][name], expected[4][name], msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("cell", STAGED)
def test_conformance_kit_runs_triton(cell):
    report = seqfast.testing.check_cell(cell, ["torch", "triton"], quick=True)
    triton = {case: result for case, result in report.items() if "triton" in case}
    assert triton and all(result == "passed" for result in triton.values()), triton


def test_generated_kernels_call_the_stage_code():
    source = generate_source(seqfast.get_cell("gru_reset_before"))
    assert "def pw_stage0(xg, hg, state, params)" in source
    assert "def pw_stage0_backward(xg, hg, state, params, d_v)" in source
    # the candidate gate (2) takes its product with the stage vector, the others with h
    assert "hg2 = tl.dot(vd, wt2" in source and "hg0 = tl.dot(hd, wt0" in source
    assert "tl.dot(hd, wt2" not in source
