"""The plugin API: the pointwise contract (README, "Writing a cell"), the math namespace on every backend that
compiles it, registration's checks of a cell's backward, and the conformance kit's verdicts.

Cells here are written the way a third party would write them, from the README alone.
"""

from __future__ import annotations

import re
import unittest
from pathlib import Path

import pytest
import torch

import seqfast
import seqfast.testing
from seqfast.backends.pointwise_source import MATH_NAMES
from seqfast.backends.reference import TorchBackend
from seqfast.cells import TORCH_MATH, recurrent_term
from seqfast.functional import scan
from seqfast.registry import Query, Weights, registry

COMPILING = [name for name in ("numba", "triton") if name in registry.backends]


def _runnable(backend: str):
    why = registry.backends[backend].unavailable_reason()
    return pytest.param(backend, id=backend, marks=pytest.mark.skipif(why is not None, reason=str(why)))


def _dtypes(backend: str) -> list[torch.dtype]:
    dtypes = registry.backends[backend].dtypes
    return [d for d in (torch.float32, torch.float64) if dtypes is None or d in dtypes]


def _torch_step(forward):
    return lambda x, s, w: forward(TORCH_MATH, (x,), None, s, ())


def _torch_step_of(forward, gates):
    return lambda x, s, w: forward(TORCH_MATH, x.chunk(gates, 1), None, s, ())


@pytest.fixture
def register():
    """Registers cells for one test and removes them afterwards."""
    names = []

    def add(spec):
        seqfast.register_cell(spec)
        names.append(spec.name)
        return spec

    yield add
    for name in names:
        registry.cells.pop(name, None)


# --- the math namespace and operators, each against torch ------------------------------------------------------
# One gate and one state per expression; the backend's result is compared expression by expression.
EXPRESSIONS = (
    "exp", "log", "log1p", "expm1", "sqrt", "abs", "abs()", "sin", "cos", "tanh", "sigmoid", "relu", "softplus",
    "pow", "pow(2,x)", "pow(x,y)", "**3", "maximum(x,0)", "minimum(0.5,x)", "clamp", "where",
    "%", "%-1.5", "//", "//-0.7", "tanh(x%1)",
)


def _math_forward(m, xg, hg, state, params):
    return (
        m.exp(xg[0]), m.log(xg[1]), m.log1p(xg[2]), m.expm1(xg[3]), m.sqrt(xg[4]), m.abs(xg[5]), abs(xg[6]),
        m.sin(xg[7]), m.cos(xg[8]), m.tanh(xg[9]), m.sigmoid(xg[10]), m.relu(xg[11]), m.softplus(xg[12]),
        m.pow(xg[13], 2.0), m.pow(2, xg[14]), m.pow(xg[15], xg[0]), xg[16] ** 3, m.maximum(xg[17], 0.0),
        m.minimum(0.5, xg[18]), m.clamp(xg[19], -0.5, 1), m.where((xg[20] > 0.0) & (xg[0] < 1.0), xg[20], 0.25),
        xg[21] % 1.5, xg[22] % -1.5, xg[23] // 2, xg[24] // -0.7, m.tanh(xg[25] % 1.0),
    )


def _math_reference(x_t, state, w):
    return _math_forward(TORCH_MATH, x_t.chunk(len(EXPRESSIONS), 1), None, state, ())


# float32-representable inputs covering the functions' special regions: signs, zero, around softplus'
# threshold of 20, tiny arguments of log1p / expm1, large ones, inf and NaN
SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -2.5, 3.0, 1e-7, -1e-7, 19.5, 20.5, -30.0, 60.0, -60.0,
           float("inf"), float("-inf"), float("nan")]


def _math_inputs(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    n = len(EXPRESSIONS)
    rand = torch.randn(24, n, generator=gen, dtype=torch.float64) * 3
    special = torch.tensor(SPECIAL, dtype=torch.float64).unsqueeze(1).expand(-1, n)
    return torch.cat([rand, special]).to(dtype).unsqueeze(0)  # [T=1, B, G*H] with H = 1


@pytest.fixture
def math_cell(register):
    n = len(EXPRESSIONS)
    return register(seqfast.CellSpec("test_api_math", n, tuple(f"s{i}" for i in range(n)), _math_reference,
                                     recurrence="none", pointwise=seqfast.Pointwise(_math_forward)))


@pytest.mark.parametrize("backend", [_runnable(b) for b in COMPILING])
def test_math_namespace_and_operators_match_torch(math_cell, backend):
    """Every function of m, numbers as arguments, and % // ** with Python's (torch's) floor semantics: triton's %
    used to be C's fmod and its **, // and abs() crashed at run time."""
    for dtype in _dtypes(backend):
        x = _math_inputs(dtype)
        state = tuple(torch.zeros(x.shape[1], 1, dtype=dtype) for _ in math_cell.state_names)
        w = Weights(weight_hh=None, bias_hh=None)
        expected = _math_reference(x[0], state, w)
        _, got = scan(math_cell, x, state, w, backend=backend)
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
        for name, a, b in zip(EXPRESSIONS, got, expected, strict=True):
            torch.testing.assert_close(a, b.to(dtype), equal_nan=True, **tol,
                                       msg=lambda msg, name=name, dtype=dtype: f"{backend} {dtype} {name!r}: {msg}")


def _remainder_forward(m, xg, hg, state, params):
    return (m.tanh(xg[0] % 1.0), xg[1] % -1.5)


def test_triton_remainder_takes_the_divisors_sign(register):
    """Triton's % is C's fmod: tanh(x % 1.0) used to be off by up to 1.14 for negative x."""
    if "triton" not in registry.backends or not registry.backends["triton"].available():
        pytest.skip("triton cannot run here")
    reference = _torch_step_of(_remainder_forward, 2)
    spec = register(seqfast.CellSpec("test_api_remainder", 2, ("a", "b"), reference, recurrence="none",
                                     pointwise=seqfast.Pointwise(_remainder_forward)))
    x = torch.tensor([[[-2.25, -0.5], [0.75, 3.5], [-0.75, 0.5], [-3.0, 2.0]]])  # [T=1, B=4, G*H=2]
    state = (torch.zeros(4, 1), torch.zeros(4, 1))
    _, got = scan(spec, x, state, Weights(weight_hh=None, bias_hh=None), backend="triton")
    torch.testing.assert_close(got, reference(x[0], state, None))


def test_torch_math_takes_numbers_where_torch_broadcasts():
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    assert TORCH_MATH.maximum(x, 0.0).tolist() == [0.0, 0.5, 2.0]
    assert TORCH_MATH.minimum(1, x).dtype == torch.float64
    assert TORCH_MATH.clamp(x, -0.5, 1.0).tolist() == [-0.5, 0.5, 1.0]
    assert TORCH_MATH.pow(2.0, x).tolist() == [0.5, 2 ** 0.5, 4.0]
    assert TORCH_MATH.where(x > 0, x, 0.0).tolist() == [0.0, 0.5, 2.0]
    assert sorted(vars(TORCH_MATH)) == sorted(MATH_NAMES)


def _relu_cap_forward(m, xg, hg, state, params):
    return (m.maximum(xg[0] + hg[0], 0.0),)


def test_numbers_as_arguments_register():
    """m.maximum(x, 0.0) used to fail at registration (torch.maximum takes tensors only)."""
    spec = seqfast.CellSpec("test_api_cap", 1, ("h",),
                            lambda x, s, w: (torch.relu(x + recurrent_term(s[0], w, 1, "dense")),),
                            pointwise=seqfast.Pointwise(_relu_cap_forward))
    seqfast.register_cell(spec)
    registry.cells.pop(spec.name)


# --- two third-party cells written from the README, through the conformance kit -------------------------------
def _softclip_reference(x_t, state, w):
    return (torch.clamp(torch.nn.functional.softplus(x_t + recurrent_term(state[0], w, 1, "dense")) - 1.0,
                        -0.9, 0.9),)


def _softclip_forward(m, xg, hg, state, params):
    return (m.clamp(m.softplus(xg[0] + hg[0]) - 1.0, -0.9, 0.9),)


def _softclip_backward(m, xg, hg, state, params, d_new):
    a = xg[0] + hg[0]
    s = m.softplus(a) - 1.0
    da = m.where((s > -0.9) & (s < 0.9), d_new[0] * m.sigmoid(a), 0.0)
    return (da,), (da,), (0.0,), ()


SOFTCLIP = seqfast.CellSpec("test_api_softclip", 1, ("h",), _softclip_reference,
                            pointwise=seqfast.Pointwise(_softclip_forward, _softclip_backward))

_WAVE = 0.1  # a module constant read by the pointwise code


def _wave_reference(x_t, state, w):
    (h,) = state
    hidden = h.shape[1]
    x0, x1 = x_t.chunk(2, 1)
    h0, h1 = recurrent_term(h, w, 2, "diagonal").chunk(2, 1)
    z = torch.sigmoid(x0 + h0)
    a = x1 + h1
    n = torch.sin(a) * w.weight_amp[:hidden] + _WAVE * torch.log1p(a ** 2) + 0.05 * torch.expm1(-(a ** 2))
    n = n + 0.2 * torch.cos(w.weight_amp[hidden:] * a) + 0.1 * torch.pow(torch.abs(a) + 1.0, 1.5)
    return (z * h + (1 - z) * n,)


def _wave_forward(m, xg, hg, state, params):
    z = m.sigmoid(xg[0] + hg[0])
    a = xg[1] + hg[1]
    n = m.sin(a) * params[0] + _WAVE * m.log1p(a ** 2) + 0.05 * m.expm1(-(a ** 2))
    n += 0.2 * m.cos(params[1] * a) + 0.1 * m.pow(abs(a) + 1.0, 1.5)
    return (z * state[0] + (1.0 - z) * n,)


def _wave_backward(m, xg, hg, state, params, d_new):
    z = m.sigmoid(xg[0] + hg[0])
    a = xg[1] + hg[1]
    n = m.sin(a) * params[0] + _WAVE * m.log1p(a ** 2) + 0.05 * m.expm1(-(a ** 2))
    n += 0.2 * m.cos(params[1] * a) + 0.1 * m.pow(abs(a) + 1.0, 1.5)
    sin_b = m.sin(params[1] * a)
    dn_da = (m.cos(a) * params[0] + _WAVE * 2.0 * a / (1.0 + a * a) - 0.1 * a * (m.expm1(-(a * a)) + 1.0)
             - 0.2 * params[1] * sin_b + 0.15 * m.pow(abs(a) + 1.0, 0.5) * m.where(a > 0.0, 1.0, -1.0))
    dh = d_new[0]
    dz = dh * (state[0] - n) * z * (1.0 - z)
    da = dh * (1.0 - z) * dn_da
    return (dz, da), (dz, da), (dh * z,), (dh * (1.0 - z) * m.sin(a), -dh * (1.0 - z) * 0.2 * a * sin_b)


WAVE = seqfast.CellSpec("test_api_wave", 2, ("h",), _wave_reference, recurrence="diagonal",
                        extra_params=(seqfast.ParamSpec("weight_amp", lambda hidden, proj: (2 * hidden,)),),
                        pointwise=seqfast.Pointwise(_wave_forward, _wave_backward, params=("weight_amp",)))


@pytest.mark.parametrize("spec", [SOFTCLIP, WAVE], ids=lambda s: s.name)
@pytest.mark.parametrize("backend", [_runnable(b) for b in COMPILING])
def test_third_party_cells_pass_the_conformance_kit(register, spec, backend):
    register(spec)
    report = seqfast.testing.check_cell(spec.name, [backend], quick=True)
    skipped = {case: why for case, why in report.items() if why != "passed"}
    assert not skipped, skipped  # every case ran: the backend compiled the cell, forward and backward


# --- what a backend cannot compile is a reason, before anything runs --------------------------------------------
def _helper(v):
    return v * 2.0


def _ifexp_forward(m, xg, hg, state, params):
    return (m.tanh(xg[0]) * 2.0 if 1.0 > 0.0 else xg[0],)


def _helper_forward(m, xg, hg, state, params):
    return (_helper(xg[0]),)


def _method_forward(m, xg, hg, state, params):
    return (xg[0].exp(),)


def _arity_forward(m, xg, hg, state, params):
    return (m.clamp(xg[0], 0.0),)


def _unknown_forward(m, xg, hg, state, params):
    return (m.erf(xg[0]),)


@pytest.mark.parametrize("forward,match", [
    (_ifexp_forward, r"line \d+: `m.tanh\(xg\[0\]\) \* 2.0 if 1.0 > 0.0 else xg\[0\]`: .*use m.where"),
    (_helper_forward, r"`_helper\(xg\[0\]\)`: only m.<function>\(...\) and abs\(...\) can be called"),
    (_method_forward, r"`xg\[0\].exp\(\)`"),
], ids=["if-expression", "helper-function", "method"])
def test_code_outside_the_contract_is_every_compiling_backends_reason(register, forward, match):
    """triton used to crash at run time on code it cannot compile, with no reason in seqfast.explain."""
    spec = register(seqfast.CellSpec("test_api_outside", 1, ("h",), _torch_step(forward), recurrence="none",
                                     pointwise=seqfast.Pointwise(forward)))
    explained = seqfast.explain(spec)
    for backend in COMPILING:
        assert any(re.search(match, r) for r in explained[backend]), (backend, explained[backend])
        if registry.backends[backend].available():
            x, state = torch.randn(2, 1, 3), (torch.zeros(1, 3),)
            with pytest.raises(seqfast.BackendNotSupportedError, match=re.escape(explained[backend][0][:60])):
                scan(spec, x, state, Weights(weight_hh=None, bias_hh=None), backend=backend)
    # auto runs it on a backend that can
    x, state = torch.randn(2, 1, 3), (torch.zeros(1, 3),)
    out, _ = scan(spec, x, state, Weights(weight_hh=None, bias_hh=None))
    torch.testing.assert_close(out[1], forward(TORCH_MATH, (x[1],), None, (out[0],), ())[0])


@pytest.mark.parametrize("forward,match", [
    (_arity_forward, r"m.clamp takes exactly 3 positional arguments"),
    (_unknown_forward, r"does not provide 'erf' \(it provides exp, log, log1p, .*, clamp, where\)"),
], ids=["arity", "unknown-math-name"])
def test_code_torch_cannot_run_either_is_named_by_every_compiling_backend(forward, match):
    spec = seqfast.CellSpec("test_api_outside", 1, ("h",), _torch_step(forward), recurrence="none",
                            pointwise=seqfast.Pointwise(forward))
    for backend in COMPILING:
        reasons = registry.backends[backend].not_supported_reasons(Query(spec))
        assert any(re.search(match, r) for r in reasons), (backend, reasons)


def test_unknown_math_name_fails_registration_with_the_names_m_provides():
    spec = seqfast.CellSpec("test_api_unknown", 1, ("h",), lambda x, s, w: (x,), recurrence="none",
                            pointwise=seqfast.Pointwise(_unknown_forward))
    with pytest.raises(ValueError, match=r"m has no 'erf'; it provides exp, log, log1p, .*, clamp"):
        seqfast.register_cell(spec)


# --- registration checks the backward ---------------------------------------------------------------------------
def _two_gate_reference(x_t, state, w):
    x0, x1 = (x_t + recurrent_term(state[0], w, 2, "dense")).chunk(2, 1)
    return (torch.tanh(x0) * torch.sigmoid(x1),)


def _two_gate_forward(m, xg, hg, state, params):
    return (m.tanh(xg[0] + hg[0]) * m.sigmoid(xg[1] + hg[1]),)


def _gate_gradients(m, xg, hg, d_new):
    t = m.tanh(xg[0] + hg[0])
    s = m.sigmoid(xg[1] + hg[1])
    return d_new[0] * s * (1.0 - t * t), d_new[0] * t * s * (1.0 - s)


def _backward_too_few(m, xg, hg, state, params, d_new):
    d0, d1 = _gate_gradients(m, xg, hg, d_new)
    return (d0,), (d0, d1), (0.0,), ()


def _backward_too_many(m, xg, hg, state, params, d_new):
    d0, d1 = _gate_gradients(m, xg, hg, d_new)
    return (d0, d1), (d0, d1), (0.0,), (), ()


def _backward_nested(m, xg, hg, state, params, d_new):
    d0, d1 = _gate_gradients(m, xg, hg, d_new)
    return (d0, d1), (d0, d1), ((0.0, 0.0),), ()


def _backward_wrong_value(m, xg, hg, state, params, d_new):
    d0, d1 = _gate_gradients(m, xg, hg, d_new)
    return (d0, d1 * 0.5), (d0, d1), (0.0,), ()


def _backward_right(m, xg, hg, state, params, d_new):
    d0, d1 = _gate_gradients(m, xg, hg, d_new)
    return (d0, d1), (d0, d1), (0.0,), ()


STRUCTURE = r"\(d_xg: 2 values, d_hg: 2 values, d_state: 1 values, d_params: 0 values\)"


@pytest.mark.parametrize("backward,match", [
    (_backward_too_few, r"'test_api_bwd': Pointwise.backward must return " + STRUCTURE + r"; got \(\(tensor"),
    (_backward_too_many, r"'test_api_bwd': Pointwise.backward must return " + STRUCTURE),
    (_backward_nested, r"'test_api_bwd': Pointwise.backward's d_state\[0\] \('h'\) must be a number or one value"),
    (_backward_wrong_value, r"'test_api_bwd': Pointwise.backward's d_xg\[1\] disagrees with autograd"),
], ids=["too-few", "too-many", "nested", "wrong-derivative"])
def test_registration_rejects_a_wrong_backward_naming_it(backward, match):
    """These used to register, and training then failed inside a generated file (numba TypingError) or, for a
    wrong derivative, trained on wrong gradients."""
    spec = seqfast.CellSpec("test_api_bwd", 2, ("h",), _two_gate_reference,
                            pointwise=seqfast.Pointwise(_two_gate_forward, backward))
    with pytest.raises(ValueError, match=match):
        seqfast.register_cell(spec)
    assert "test_api_bwd" not in registry.cells


def test_registration_accepts_the_right_backward(register):
    register(seqfast.CellSpec("test_api_bwd", 2, ("h",), _two_gate_reference,
                              pointwise=seqfast.Pointwise(_two_gate_forward, _backward_right)))


# --- the conformance kit's verdicts -----------------------------------------------------------------------------
def test_kit_fails_when_a_compiling_backend_cannot_compile_the_cell(register):
    """A cell whose pointwise code a fused backend cannot compile used to pass the kit with those cases skipped."""
    spec = register(seqfast.CellSpec("test_api_uncompiled", 1, ("h",), _torch_step(_helper_forward),
                                     recurrence="none", pointwise=seqfast.Pointwise(_helper_forward)))
    backends = [b for b in COMPILING if registry.backends[b].available()]
    if not backends:
        pytest.skip("no compiling backend available")
    with pytest.raises(AssertionError, match=r"cannot compile cell 'test_api_uncompiled'.*_helper"):
        seqfast.testing.check_cell(spec.name, backends, quick=True)


class _RaisesValueError(TorchBackend):
    name = "test_api_raises"

    def scan(self, cell, x_proj, state0, weights, lengths, reverse):
        raise ValueError("broken inside")


@pytest.fixture
def raising_backend():
    backend = seqfast.register_backend(_RaisesValueError())
    yield backend
    del registry.backends[backend.name]
    registry.generation += 1


def test_kit_reports_every_failure_whatever_it_raised(raising_backend):
    """A backend raising ValueError used to stop check_cell at the first case with that bare ValueError."""
    with pytest.raises(AssertionError) as info:
        seqfast.testing.check_cell("rnn_tanh", ["torch", raising_backend.name], quick=True)
    message = str(info.value)
    failed_cases = re.findall(r"^rnn_tanh-test_api_raises-(\w+)\S*: ValueError: broken inside", message, re.M)
    assert {"scan", "module", "nan"} <= set(failed_cases), message
    assert "rnn_tanh-torch" not in message  # the torch cases ran and passed


def test_kit_skips_what_a_backend_declines():
    """Declared limits (here: no backward) stay skips with the reason."""
    def forward(m, xg, hg, state, params):
        return (m.tanh(xg[0]),)

    spec = seqfast.CellSpec("test_api_nobwd", 1, ("h",), _torch_step(forward), recurrence="none",
                            pointwise=seqfast.Pointwise(forward))
    seqfast.register_cell(spec)
    try:
        backend = next((b for b in COMPILING if registry.backends[b].available()), None)
        if backend is None:
            pytest.skip("no compiling backend available")
        case = next(c for c in seqfast.testing.cases(spec.name, [backend]) if c.check == "scan")
        with pytest.raises(unittest.SkipTest, match="no pointwise backward"):
            case.run()
    finally:
        registry.cells.pop(spec.name)


# --- the README documents the contract ---------------------------------------------------------------------------
def test_readme_plugin_section_names_every_math_function_and_operator():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Writing a cell (plugins)")[1].split("\n## ")[0]
    for name in MATH_NAMES:
        assert re.search(rf"\b{name}\b", section), name
    for text in ("`+ - * / % // **`", "weight_hh", "ParamSpec(name, shape, init", "d_params: P values"):
        assert text in section, text
