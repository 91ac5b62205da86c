"""The `triton` backend against the `torch` reference, on CPU through Triton's interpreter (TRITON_INTERPRET=1,
set by tests/conftest.py before any kernel is built). Shapes stay tiny: the interpreter runs kernels as Python.

Every test compares outputs, final states and every gradient (x_proj, each initial state, each weight).
The GPU-only facts (speed, register use on a real device) are not checked here; `test_kernels_compile_for_sm90`
at least builds the real kernels to cubin with Triton's bundled ptxas.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqfast
import seqfast.testing
from seqfast.backends.reference import TorchBackend
from seqfast.cells import recurrent_term
from seqfast.registry import Query, Weights, registry

BACKEND = registry.backends.get("triton")
pytestmark = pytest.mark.skipif(BACKEND is None or not BACKEND.available(),
                                reason=str(BACKEND and BACKEND.unavailable_reason()))
# the interpreter runs on CPU tensors; with TRITON_INTERPRET=0 on a GPU machine the same tests run the real kernels
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"

BUILTIN = ("rnn_tanh", "rnn_relu", "lstm", "gru")


# --- two test cells covering what the built-ins do not: diagonal / no recurrence, per-unit parameters ---------
_GAIN = 1.5  # a module constant read by pointwise code: the generator copies it into the kernel module


def _diag_step(x_t, state, w):
    (h,) = state
    hidden = h.shape[1]
    x0, x1 = x_t.chunk(2, 1)
    h0, h1 = recurrent_term(h, w, 2, "diagonal").chunk(2, 1)
    p0, p1 = w.alpha[:hidden], w.alpha[hidden:]
    z = torch.sigmoid(x0 + h0 + p0 * h)
    n = torch.tanh(_GAIN * (x1 + h1))
    return ((1 - z) * h + z * n * p1,)


def _diag_forward(m, xg, hg, state, params):
    z = m.sigmoid(xg[0] + hg[0] + params[0] * state[0])
    n = m.tanh(_GAIN * (xg[1] + hg[1]))
    return ((1.0 - z) * state[0] + z * n * params[1],)


def _diag_backward(m, xg, hg, state, params, d_new):
    z = m.sigmoid(xg[0] + hg[0] + params[0] * state[0])
    n = m.tanh(_GAIN * (xg[1] + hg[1]))
    dh = d_new[0]
    dz = dh * (n * params[1] - state[0]) * z * (1.0 - z)
    dn = dh * z * params[1] * (1.0 - n * n) * _GAIN
    return (dz, dn), (dz, dn), (dh * (1.0 - z) + dz * params[0],), (dz * state[0], dh * z * n)


def _none_step(x_t, state, w):
    h, c = state
    x0, x1 = x_t.chunk(2, 1)
    c = torch.sigmoid(x0) * c + x1
    return torch.tanh(c), c


def _none_forward(m, xg, hg, state, params):
    c = m.sigmoid(xg[0]) * state[1] + xg[1]
    return (m.tanh(c), c)


def _none_backward(m, xg, hg, state, params, d_new):
    f = m.sigmoid(xg[0])
    t = m.tanh(f * state[1] + xg[1])
    dc = d_new[1] + d_new[0] * (1.0 - t * t)
    return (dc * state[1] * f * (1.0 - f), dc), (0.0, 0.0), (0.0, dc * f), ()


TEST_CELLS = (
    seqfast.CellSpec("tt_diag", 2, ("h",), _diag_step, recurrence="diagonal",
                     extra_params=(seqfast.ParamSpec("alpha", lambda hidden, proj: (2 * hidden,)),),
                     pointwise=seqfast.Pointwise(_diag_forward, _diag_backward, params=("alpha",))),
    seqfast.CellSpec("tt_none", 2, ("h", "c"), _none_step, recurrence="none",
                     pointwise=seqfast.Pointwise(_none_forward, _none_backward)),
)


@pytest.fixture(scope="module", autouse=True)
def _test_cells():
    for spec in TEST_CELLS:
        seqfast.register_cell(spec, replace=True)
    yield
    for spec in TEST_CELLS:
        registry.cells.pop(spec.name, None)


@pytest.fixture(autouse=True)
def _fp32_dots(monkeypatch):
    """On a GPU, float32 dots follow cudnn.allow_tf32 (TF32 by default); compare at float32 accuracy (3xTF32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture
def tiled(monkeypatch):
    """Force the large-H path (hidden dimension tiled, weights streamed) at a small size."""
    monkeypatch.setattr(BACKEND, "tile_hidden", 16)


# --- helpers ------------------------------------------------------------------------------------------------
def _inputs(cell: str, steps: int, batch: int, hidden: int, *, lengths: bool, bias: bool = True, seed: int = 0,
            dtype=torch.float32):
    spec = seqfast.get_cell(cell)
    gen = torch.Generator().manual_seed(seed)
    w = seqfast.testing.random_weights(spec, hidden, torch.float32, gen)
    if not bias:
        w["bias_hh"] = None
    x = torch.randn(steps, batch, spec.num_gates * hidden, generator=gen)
    state = tuple(torch.randn(batch, hidden, generator=gen) * 0.5 for _ in spec.state_names)
    lens = None
    if lengths:
        lens = torch.randint(1, steps + 1, (batch,), generator=gen)
        lens[batch // 2] = steps
    cast = lambda t: None if t is None else t.to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return cast(x), tuple(cast(s) for s in state), Weights({k: cast(v) for k, v in w.items()}), lens


def _run(backend: str, cell: str, x, state, w, lengths, reverse: bool, seed: int = 1):
    """Outputs, final state and the gradient of a loss that weighs every element differently."""
    out, final = seqfast.scan(cell, x, state, w, lengths, reverse, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t.float() * torch.randn(t.shape, generator=gen).to(t.device)).sum() for t in (out, *final))
    leaves = [x, *state, *(v for v in w.values() if v is not None)]
    return out, final, torch.autograd.grad(loss, leaves)


def _half_reference(cell: str, x, state, w, lengths, reverse: bool, dtype):
    """The float32 reference on the same (rounded) inputs, rounding where the kernels do: h where it enters the
    recurrent product, and that product hg (saved for backward in `dtype`). Otherwise a ReLU pre-activation near 0
    may fall on different sides. hg is rounded where the gates add it to x_proj (rnn, lstm); gru's r * hg_n
    is smooth, so only h is rounded there."""
    spec = seqfast.get_cell(cell)
    rnd = lambda t: t.to(dtype).float()  # noqa: E731

    def step(x_t, s, wts):
        h = rnd(s[0])
        if cell == "gru":
            return spec.reference_step(x_t, (h, *s[1:]), wts)
        hg = rnd(torch.nn.functional.linear(h, wts.weight_hh, wts.bias_hh))
        return spec.reference_step(x_t + hg, (h, *s[1:]), Weights(weight_hh=torch.zeros_like(wts.weight_hh),
                                                                   bias_hh=None))

    up = lambda t: None if t is None else t.detach().float().requires_grad_()  # noqa: E731
    x, state, w = up(x), tuple(up(s) for s in state), Weights({k: up(v) for k, v in w.items()})
    out, final = TorchBackend().scan(dataclasses.replace(spec, reference_step=step), x, state, w, lengths, reverse)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen).to(t.device)).sum() for t in (out, *final))
    return out, final, torch.autograd.grad(loss, [x, *state, *(v for v in w.values() if v is not None)])


def _close(actual, expected, what: str, dtype) -> None:
    if dtype == torch.float32:
        assert_close(actual, expected, what, dtype)
    else:  # h is rounded to bf16 / fp16 before each recurrent dot (as cuDNN does); the reference never rounds
        tol = 6e-2 if dtype == torch.bfloat16 else 1e-2
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _compare(cell: str, x, state, w, lengths, reverse: bool, *, dtype=torch.float32) -> None:
    out, final, grads = _run("triton", cell, x, state, w, lengths, reverse)
    if dtype == torch.float32:
        out_r, final_r, grads_r = _run("torch", cell, x, state, w, lengths, reverse)
    else:
        out_r, final_r, grads_r = _half_reference(cell, x, state, w, lengths, reverse, dtype)
    names = ["x_proj", *(f"state0[{n}]" for n in seqfast.get_cell(cell).state_names),
             *(k for k, v in w.items() if v is not None)]
    _close(out.float(), out_r, "outputs", dtype)
    for a, b, name in zip(final, final_r, seqfast.get_cell(cell).state_names, strict=True):
        _close(a.float(), b, f"final {name}", dtype)
    for a, b, name in zip(grads, grads_r, names, strict=True):
        _close(a.float(), b, f"grad {name}", dtype)
    if lengths is not None:  # padding is exactly zero, not merely close
        for b, n in enumerate(lengths.tolist()):
            assert torch.equal(out[n:, b], torch.zeros_like(out[n:, b])), f"outputs past length {n} of row {b}"


# (steps, batch, hidden, reverse, lengths, bias)
SCAN_CASES = [(5, 3, 5, False, False, True), (6, 3, 5, True, True, True), (4, 3, 33, False, True, True),
              (5, 2, 7, True, False, False)]


def _case_id(cell, steps, batch, hidden, reverse, lengths, bias) -> str:
    return "-".join([cell, f"T{steps}", f"B{batch}", f"H{hidden}"] + (["rev"] if reverse else [])
                    + (["len"] if lengths else []) + ([] if bias else ["nobias"]))


@pytest.mark.parametrize("cell,case", [(c, k) for c in BUILTIN for k in SCAN_CASES],
                         ids=[_case_id(c, *k) for c in BUILTIN for k in SCAN_CASES])
def test_scan_matches_reference(cell, case):
    steps, batch, hidden, reverse, lengths, bias = case
    assert BACKEND.plan(seqfast.get_cell(cell), hidden, torch.float32).on_chip
    x, state, w, lens = _inputs(cell, steps, batch, hidden, lengths=lengths, bias=bias)
    _compare(cell, x, state, w, lens, reverse)


@pytest.mark.parametrize("cell", BUILTIN + ("tt_diag", "tt_none"), ids=lambda c: f"{c}-T5-B3-H33-tile16-rev-len")
def test_tiled_path_matches_reference(cell, tiled):
    plan = BACKEND.plan(seqfast.get_cell(cell), 33, torch.float32)
    assert not plan.on_chip and plan.block_h == 16  # 3 tiles, the last one masked
    x, state, w, lens = _inputs(cell, 5, 3, 33, lengths=True)
    _compare(cell, x, state, w, lens, True)


@pytest.mark.parametrize("path", ["on_chip", "tiled"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_several_programs_each_own_a_batch_tile(cell, path, monkeypatch):
    """B=18 > 16 rows per program: two programs, the second one mostly masked."""
    if path == "tiled":
        monkeypatch.setattr(BACKEND, "tile_hidden", 16)
    x, state, w, lens = _inputs(cell, 3, 18, 17 if path == "tiled" else 5, lengths=True, seed=3)
    _compare(cell, x, state, w, lens, True)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", ["tt_diag", "tt_none"])
def test_diagonal_none_and_per_unit_params_on_chip(cell, reverse):
    x, state, w, lens = _inputs(cell, 5, 3, 5, lengths=True)
    _compare(cell, x, state, w, lens, reverse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell", BUILTIN)
def test_half_precision_inputs_fp32_state(cell, dtype):
    # the interpreter's half-precision tl.dot is wrong, so DOT_F32 upcasts the rounded operands there; loads,
    # stores and casts of bf16/fp16 run as on a GPU
    x, state, w, lens = _inputs(cell, 5, 3, 5, lengths=True, dtype=dtype)
    _compare(cell, x, state, w, lens, True, dtype=dtype)
    assert seqfast.scan(cell, x, state, w, lens, True, backend="triton")[0].dtype == dtype


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-tanh", "RNN-relu"])
def test_module_bidirectional_multilayer_packed_matches_torch_nn(kind):
    name, _, nonlinearity = kind.partition("-")
    kwargs = dict(num_layers=2, bidirectional=True, **({"nonlinearity": nonlinearity} if nonlinearity else {}))
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(4, 5, **kwargs).to(DEVICE)
    ours = getattr(seqfast, name)(4, 5, backend="triton", **kwargs).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 4, device=DEVICE, requires_grad=True)
    lengths = torch.tensor([3, 5, 2])  # unsorted
    results = []
    for module in (ref, ours):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, state = module(packed)
        out, _ = pad_packed_sequence(out, total_length=5)
        states = state if isinstance(state, tuple) else (state,)
        gen = torch.Generator().manual_seed(2)
        loss = sum((t * torch.randn(t.shape, generator=gen).to(DEVICE)).sum() for t in (out, *states))
        results.append((out, states, torch.autograd.grad(loss, [x, *module.parameters()])))
    (out_r, states_r, grads_r), (out, states, grads) = results
    assert_close(out, out_r, "output")
    for a, b in zip(states, states_r, strict=True):
        assert_close(a, b, "final state")
    names = ["input", *(n for n, _ in ours.named_parameters())]
    for a, b, n in zip(grads, grads_r, names, strict=True):
        assert_close(a, b, f"grad {n}")


def test_torch_compile_traces_the_custom_op():
    x, state, w, _ = _inputs("lstm", 4, 3, 5, lengths=False)

    def f(x, h, c, w_hh, b_hh):
        out, final = seqfast.scan("lstm", x, (h, c), {"weight_hh": w_hh, "bias_hh": b_hh}, None, True,
                                  backend="triton")
        return out.sum() + final[1].sum()

    args = (x, *state, w.weight_hh, w.bias_hh)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), f(*args))
    torch.testing.assert_close(torch.autograd.grad(compiled(*args), args), torch.autograd.grad(f(*args), args))


# --- code generation ------------------------------------------------------------------------------------------
def test_generated_module_inlines_the_cells_own_math():
    from seqfast.backends.triton import generate_source

    source = generate_source(seqfast.get_cell("tt_diag"))
    assert "def pw_forward(xg, hg, state, params):" in source
    assert "_sf_sigmoid(xg[0] + hg[0] + params[0] * state[0])" in source  # the cell's line, m. rewritten
    assert "_GAIN = _sf_const(1.5)" in source
    assert "pv1 = tl.load(P0 + 1 * H" in source  # the second value of the [2*H] per-unit parameter


def _bad_m(m, xg, hg, state, params):
    return (m.erf(xg[0]),)


_NOT_A_NUMBER = object()


def _bad_global(m, xg, hg, state, params):
    return (xg[0] * _NOT_A_NUMBER,)


@pytest.mark.parametrize("forward,match", [
    (lambda m, xg, hg, state, params: (xg[0],), "plain def"),
    (_bad_m, "m.erf"),
    (_bad_global, "_NOT_A_NUMBER"),
], ids=["lambda", "unknown-math", "global-object"])
def test_uncompilable_pointwise_is_a_reason_not_a_crash(forward, match):
    spec = seqfast.CellSpec("tt_bad", 1, ("h",), lambda x, s, w: (x,), recurrence="none",
                            pointwise=seqfast.Pointwise(forward))
    reasons = BACKEND.not_supported_reasons(Query(spec))
    assert any("cannot be compiled to Triton" in r and match in r for r in reasons), reasons


# --- availability, devices, paths -----------------------------------------------------------------------------
def test_devices_and_reasons_follow_the_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert BACKEND.devices == {"cuda", "cpu"}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert BACKEND.devices == {"cuda"}
    if not torch.cuda.is_available():
        assert BACKEND.unavailable_reason() == "no CUDA device (set TRITON_INTERPRET=1 to run on CPU)"
    from seqfast.backends.triton import backend as triton_backend

    monkeypatch.setattr(triton_backend, "_triton_installed", lambda: False)  # the package lookup is cached
    assert BACKEND.unavailable_reason() == "triton not installed"


def test_importing_seqfast_does_not_import_triton():
    code = "import sys, seqfast; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_auto_never_picks_the_interpreter():
    assert seqfast.current_backend("lstm", "cpu") != "triton"
    assert BACKEND.auto_rank(Query(seqfast.get_cell("lstm"), device="cpu")) < 0


def test_path_for_names_the_path(monkeypatch):
    lstm = seqfast.get_cell("lstm")
    small = BACKEND.path_for(Query(lstm, device="cuda", hidden_size=64))
    large = BACKEND.path_for(Query(lstm, device="cuda", hidden_size=1024, dtype=torch.bfloat16))
    assert "W_hh on chip (64 KiB in shared memory)" in small and "hidden tiled: 16 x 64 units/step" in large
    assert "no recurrent matrix" in BACKEND.path_for(Query(seqfast.get_cell("tt_none"), hidden_size=8))
    monkeypatch.setenv("SEQFAST_TRITON_TILE", "32")
    assert "hidden tiled: 2 x 32 units/step" in BACKEND.path_for(Query(lstm, device="cuda", hidden_size=64))
    monkeypatch.setenv("SEQFAST_TRITON_TILE", "24")
    with pytest.raises(ValueError, match="power of two"):
        BACKEND.plan(lstm, 64, torch.float32)


def test_proj_size_is_declined_with_a_reason():
    reasons = BACKEND.not_supported_reasons(Query(seqfast.get_cell("lstm"), proj_size=3, hidden_size=5))
    assert "proj_size > 0 not supported" in reasons


def test_kernels_compile_for_sm90():
    """The real (non-interpreted) kernels through Triton's whole pipeline to a cubin, no GPU needed: they build,
    and the plan's shared-memory estimate holds (an H100 block has 227 KiB)."""
    pytest.importorskip("triton.backends.nvidia")
    configs = {"lstm:64:float32": True, "gru:128:float32": True, "lstm:128:bfloat16": True,
               "gru:33:bfloat16:16": False, "rnn_relu:100:float16": True, "lstm:1024:float32": False,
               # a staged cell (a second recurrent product within a step), on chip and tiled
               "gru_reset_before:64:float32": True, "gru_reset_before:128:float32": True,
               "gru_reset_before:33:bfloat16:16": False}
    # the example plugins, when installed: diagonal and no recurrence, per-unit parameters
    plugins = {"indrnn:64:float32": True, "mingru:33:float16:16": False, "peephole_lstm:64:float32": True}
    configs.update({c: v for c, v in plugins.items() if c.split(":")[0] in registry.cells})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the seqfast under test, wherever the working directory is (the tests run in a temporary one)
    root = str(Path(seqfast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "seqfast.backends.triton.aot", *configs], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = {r["config"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    for config, on_chip in configs.items():
        assert report[config]["on_chip"] == on_chip, config
        kernels = report[config]["kernels"]
        assert set(kernels) == {"scan_forward", "scan_backward"}
        for name, usage in kernels.items():
            assert usage["shared_bytes"] <= 227 * 1024, (config, name, usage)
            assert usage.get("spill_bytes", 0) == 0, (config, name, usage)
