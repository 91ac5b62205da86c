"""The fused backends' math at the edges of float32, against torch: saturating tanh / sigmoid (exactly +-1, 1 and 0
where torch's are, so saturated gates pass exactly zero gradient) and NaN / inf propagation through the built-in
cells, forward and backward, compared with torch.nn element by element."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import seqfast
from seqfast.registry import registry

# the interpreter runs on CPU tensors; with TRITON_INTERPRET=0 on a GPU machine the triton cases run on the device
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"


def _backend(name: str):
    backend = registry.backends.get(name)
    why = "not registered" if backend is None else backend.unavailable_reason()
    return pytest.param(name, id=name, marks=pytest.mark.skipif(why is not None, reason=str(why)))


FUSED = [_backend("numba"), _backend("triton")]


# --- tanh and sigmoid over float32 ----------------------------------------------------------------------------------
def _sweep() -> np.ndarray:
    """Every 4099th float32 bit pattern (every sign and exponent, +-inf, NaNs), a dense grid over [-100, 100] (where
    both functions leave and reach their extremes), every float32 around the saturation thresholds, and specials."""
    patterns = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    grid = np.linspace(-100, 100, 400_001, dtype=np.float32)
    edges = [np.arange(*np.array([lo, hi], dtype=np.float32).view(np.int32)).view(np.float32)
             for lo, hi in ((8.9, 9.1), (16.5, 16.8), (88.6, 88.8))]
    edges = [e for edge in edges for e in (edge, -edge)]
    specials = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38], dtype=np.float32)
    return np.concatenate([patterns, grid, *edges, specials])


def _numba_apply(which: str, x: np.ndarray) -> np.ndarray:
    from numba import njit

    from seqfast.backends.numba import _math

    fn = _math.tanh_f32 if which == "tanh" else _math.sigmoid_f32

    @njit(fastmath={"contract"}, error_model="numpy")  # as the kernels compile it
    def apply(xs, out):
        for i in range(xs.shape[0]):
            out[i] = fn(xs[i])

    out = np.empty_like(x)
    apply(x, out)
    return out


_triton_fn = None  # the jit function _triton_apply runs: a global, since Triton resolves names as globals


def _triton_apply(which: str, x: np.ndarray) -> np.ndarray:
    import triton
    import triton.language as tl

    from seqfast.backends.triton.codegen import load_kernels

    global _triton_fn
    module = load_kernels(registry.cells["lstm"])  # every generated module holds the math namespace
    _triton_fn = module._sf_tanh if which == "tanh" else module._sf_sigmoid

    @triton.jit
    def apply(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        tl.store(Y + offs, _triton_fn(tl.load(X + offs, mask=mask)), mask=mask)

    xt = torch.from_numpy(x).to(TRITON_DEVICE)
    out = torch.empty_like(xt)
    block = 1 << 16
    with np.errstate(over="ignore", under="ignore"):
        apply[(triton.cdiv(x.size, block),)](xt, out, x.size, BLOCK=block)
    return out.cpu().numpy()


def _ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| in units in the last place of want (0 where both are equal or both NaN)."""
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64)) / np.spacing(np.abs(want)).astype(np.float64)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    return np.where(same, 0.0, diff)


def _max_ulps(backend: str, which: str) -> int:
    if backend == "numba":
        from seqfast.backends.numba import _math

        return _math.TANH_F32_MAX_ULPS if which == "tanh" else _math.SIGMOID_F32_MAX_ULPS
    from seqfast.backends.triton.kernels import SIGMOID_F32_MAX_ULPS, TANH_F32_MAX_ULPS

    return TANH_F32_MAX_ULPS if which == "tanh" else SIGMOID_F32_MAX_ULPS


@pytest.mark.parametrize("which", ["tanh", "sigmoid"])
@pytest.mark.parametrize("backend", FUSED)
def test_tanh_sigmoid_match_torch_over_float32(backend: str, which: str) -> None:
    """Where torch's float32 result is an extreme (+-1, or sigmoid's 0) ours is the same; elsewhere it is within the
    backend's documented ulp bound of torch's, tiny sigmoid values and subnormals included; NaN stays NaN."""
    x = _sweep()
    want = (torch.tanh if which == "tanh" else torch.sigmoid)(torch.from_numpy(x)).numpy()
    got = (_numba_apply if backend == "numba" else _triton_apply)(which, x)
    assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN where torch has none, or a number where it has NaN"
    extreme = np.isin(want, [-1.0, 0.0, 1.0]) & (x != 0)
    wrong = np.nonzero(extreme & (got != want))[0]
    assert wrong.size == 0, (f"{backend} {which}: not exactly torch's extreme at x = {x[wrong[:5]]} "
                             f"(got {got[wrong[:5]]}, torch {want[wrong[:5]]})")
    ulps = _ulps(got, want)
    worst = int(np.argmax(ulps))
    bound = _max_ulps(backend, which)
    assert ulps[worst] <= bound, (f"{backend} {which}: {ulps[worst]:.3g} ulps from torch at x = {x[worst]!r} "
                                  f"(got {got[worst]!r}, torch {want[worst]!r}); documented bound {bound}")


# --- modules against torch.nn ---------------------------------------------------------------------------------------
CELLS = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
         "rnn_relu": ("RNN", {"nonlinearity": "relu"})}


def _results(module, x: torch.Tensor, grad_seed: int) -> dict[str, torch.Tensor]:
    """Output, final states and the gradient of x and of every parameter, for a fixed random output gradient."""
    x = x.clone().requires_grad_()
    out, state = module(x)
    states = state if isinstance(state, tuple) else (state,)
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=gen).to(out.device)
    grad_states = [torch.randn(s.shape, generator=gen).to(s.device) for s in states]
    loss = (out * grad_out).sum() + sum((s * g).sum() for s, g in zip(states, grad_states, strict=True))
    names = [name for name, _ in module.named_parameters()]
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    found = {"output": out, **{f"state{i}": s for i, s in enumerate(states)}, "grad x": grads[0]}
    found.update({f"grad {n}": g for n, g in zip(names, grads[1:], strict=True)})
    return {k: v.detach().cpu() for k, v in found.items()}


def _compare(cell: str, backend: str, x: torch.Tensor, *, exact_zeros: bool, equal_nan: bool, seed: int = 0):
    kind, kwargs = CELLS[cell]
    torch.manual_seed(seed)
    ref = getattr(torch.nn, kind)(x.shape[-1], 5, **kwargs)
    ours = getattr(seqfast, kind)(x.shape[-1], 5, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    want = _results(ref, x, seed + 1)
    got = _results(ours.to(device), x.to(device), seed + 1)
    for name, expected in want.items():
        actual = got[name]
        scale = float(expected[expected.isfinite()].abs().max()) if expected.isfinite().any() else 1.0
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=equal_nan,
                                   msg=lambda m, name=name: f"{backend} {cell} {name}: {m}")
        if exact_zeros:
            leaked = (expected == 0) & (actual != 0)
            assert not leaked.any(), (f"{backend} {cell} {name}: nonzero where torch.nn's is exactly 0, at "
                                      f"{leaked.nonzero()[:5].tolist()}: {actual[leaked][:5].tolist()}")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend", FUSED)
def test_saturated_gates_match_torch_nn(backend: str, cell: str) -> None:
    """Inputs x1e3 drive every gate into saturation: outputs and every gradient match torch.nn's, and where torch.nn
    has an exact zero (a saturated gate passes none) so do we."""
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(3)) * 1e3
    _compare(cell, backend, x, exact_zeros=True, equal_nan=False)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("backend", FUSED)
def test_non_finite_input_matches_torch_nn(backend: str, cell: str, value: float) -> None:
    """One non-finite input value at one step: NaN and inf reach the outputs and every gradient exactly where they
    reach torch.nn's (e.g. a weight gradient's 0 * inf is NaN, a ReLU passes the gradient of a NaN input)."""
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(5))
    x[1, 1, 0] = value
    _compare(cell, backend, x, exact_zeros=False, equal_nan=True)
