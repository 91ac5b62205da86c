"""Staged recurrence (Pointwise.stages): cells gated before the recurrent product.

The reset-before GRU (Keras reset_after=False) against a plain torch implementation of Keras's formula, fed
Keras-layout weights through keras_gru_weights; every backend against the torch one at module level; MGU, defined
here as a plugin would define it, through the conformance kit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_param
from staged_cells import mgu_backward, mgu_forward, mgu_gate, mgu_gate_backward, mgu_spec, mgu_step
from torch.func import functional_call

import seqfast
from seqfast.cells import keras_gru_weights
from seqfast.functional import scan, select_backend
from seqfast.registry import CellSpec, Pointwise, Query, Stage, registry
from seqfast.testing import check_cell, random_weights

CELL = "gru_reset_before"


# --- a plain Keras GRU, in Keras's own layout (gates z, r, h side by side in the columns) ----------------------
def keras_gru(x, h, kernel, recurrent_kernel, bias, reset_after):
    """x [T, B, I], h [B, H]; Keras's GRU cell step by step -> (outputs [T, B, H], last h)."""
    hidden = h.shape[1]
    k_z, k_r, k_h = kernel.split(hidden, 1)
    u_z, u_r, u_h = recurrent_kernel.split(hidden, 1)
    b_in, b_rec = (bias[0], bias[1]) if reset_after else (bias, torch.zeros_like(bias))
    bi_z, bi_r, bi_h = b_in.split(hidden)
    br_z, br_r, br_h = b_rec.split(hidden)
    outputs = []
    for x_t in x:
        z = torch.sigmoid(x_t @ k_z + bi_z + h @ u_z + br_z)
        r = torch.sigmoid(x_t @ k_r + bi_r + h @ u_r + br_r)
        if reset_after:
            hh = torch.tanh(x_t @ k_h + bi_h + r * (h @ u_h + br_h))
        else:
            hh = torch.tanh(x_t @ k_h + bi_h + (r * h) @ u_h)
        h = z * h + (1 - z) * hh
        outputs.append(h)
    return torch.stack(outputs), h


def _keras_tensors(inputs, hidden, reset_after, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kernel = torch.randn(inputs, 3 * hidden, generator=gen, dtype=dtype) * 0.5
    recurrent_kernel = torch.randn(hidden, 3 * hidden, generator=gen, dtype=dtype) * 0.5
    bias = torch.randn((2, 3 * hidden) if reset_after else (3 * hidden,), generator=gen, dtype=dtype) * 0.5
    return kernel, recurrent_kernel, bias


@pytest.mark.parametrize("backend", ["torch", backend_param("numba")])
def test_reset_before_gru_matches_keras_forward_and_gradients(backend):
    steps, batch, inputs, hidden = 4, 3, 2, 5
    kernel, recurrent_kernel, bias = (t.requires_grad_() for t in _keras_tensors(inputs, hidden, False))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, inputs, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(batch, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    weight_out = torch.randn(steps, batch, hidden, generator=gen, dtype=torch.float64)

    module = seqfast.nn.Recurrent(CELL, inputs, hidden, dtype=torch.float64, backend=backend)
    params = keras_gru_weights(kernel, recurrent_kernel, bias)  # differentiable: gradients reach Keras's tensors
    assert set(params) == {name for name, _ in module.named_parameters()}
    out, h_n = functional_call(module, params, (x, h0.unsqueeze(0)))
    ref_out, ref_h = keras_gru(x, h0, kernel, recurrent_kernel, bias, reset_after=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h_n[0], ref_h)

    leaves = (x, h0, kernel, recurrent_kernel, bias)
    got = torch.autograd.grad((out * weight_out).sum() + h_n.square().sum(), leaves)
    expected = torch.autograd.grad((ref_out * weight_out).sum() + ref_h.square().sum(), leaves)
    for name, g, e in zip(("x", "h0", "kernel", "recurrent_kernel", "bias"), got, expected, strict=True):
        torch.testing.assert_close(g, e, msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_keras_reset_after_weights_load_into_gru():
    """reset_after=True is torch.nn.GRU's math: the same import, with both biases, drives seqfast's GRU."""
    kernel, recurrent_kernel, bias = _keras_tensors(3, 4, True)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    module = seqfast.nn.GRU(3, 4, dtype=torch.float64, backend="torch")
    module.load_state_dict(keras_gru_weights(kernel, recurrent_kernel, bias))
    out, _ = module(x)
    torch.testing.assert_close(out, keras_gru(x, torch.zeros(2, 4, dtype=torch.float64), kernel, recurrent_kernel,
                                              bias, reset_after=True)[0])


def test_keras_weights_gate_order_and_suffix():
    hidden = 2
    kernel = torch.arange(3 * 3 * hidden, dtype=torch.float64).view(3, 3 * hidden)
    params = keras_gru_weights(kernel, torch.zeros(hidden, 3 * hidden), torch.arange(3 * hidden) * 1.0, layer=1,
                               reverse=True)
    assert set(params) == {"weight_ih_l1_reverse", "weight_hh_l1_reverse", "bias_ih_l1_reverse",
                           "bias_hh_l1_reverse"}
    w = params["weight_ih_l1_reverse"]
    # torch rows r, z, n are Keras columns r (H..2H), z (0..H), h (2H..3H)
    torch.testing.assert_close(w[:hidden], kernel[:, hidden : 2 * hidden].t())
    torch.testing.assert_close(w[hidden : 2 * hidden], kernel[:, :hidden].t())
    torch.testing.assert_close(w[2 * hidden :], kernel[:, 2 * hidden :].t())
    assert params["bias_ih_l1_reverse"].tolist() == [2.0, 3.0, 0.0, 1.0, 4.0, 5.0]
    assert not params["bias_hh_l1_reverse"].any()


@pytest.mark.parametrize("bad, message", [
    (dict(kernel=torch.zeros(3, 7)), "kernel must be"),
    (dict(recurrent_kernel=torch.zeros(4, 6)), "recurrent_kernel must be"),
    (dict(bias=torch.zeros(3, 12)), "bias must be"),
], ids=["kernel", "recurrent_kernel", "bias"])
def test_keras_weights_reject_bad_shapes(bad, message):
    args = dict(kernel=torch.zeros(3, 12), recurrent_kernel=torch.zeros(4, 12), bias=torch.zeros(12))
    with pytest.raises(ValueError, match=message):
        keras_gru_weights(**{**args, **bad})


# --- every backend against torch, whole modules -----------------------------------------------------------------
def _module_run(backend, state_dict, x, h0, lengths):
    module = seqfast.nn.Recurrent(CELL, x.shape[2], h0.shape[2], num_layers=2, bidirectional=True,
                                  dtype=x.dtype, backend=backend)
    module.load_state_dict(state_dict)
    x = x.detach().requires_grad_()
    h0 = h0.detach().requires_grad_()
    out, h_n = module(x, h0, lengths=lengths)
    gen = torch.Generator().manual_seed(3)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=x.dtype)).sum() + h_n.square().sum()
    loss.backward()
    return out, h_n, x.grad, h0.grad, {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("lengths", [None, [4, 2, 3]], ids=["full", "lengths"])
@pytest.mark.parametrize("backend", [backend_param("numba")])
def test_module_bidirectional_matches_torch(backend, lengths):
    torch.manual_seed(0)
    lengths = None if lengths is None else torch.tensor(lengths)
    x = torch.randn(4, 3, 2)
    h0 = torch.randn(4, 3, 5)
    state_dict = seqfast.nn.Recurrent(CELL, 2, 5, num_layers=2, bidirectional=True).state_dict()
    got = _module_run(backend, state_dict, x, h0, lengths)
    expected = _module_run("torch", state_dict, x, h0, lengths)
    for name, g, e in zip(("output", "h_n", "grad x", "grad h0"), got[:4], expected[:4], strict=True):
        torch.testing.assert_close(g, e, rtol=2e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    for name in expected[4]:
        torch.testing.assert_close(got[4][name], expected[4][name], rtol=2e-4, atol=2e-5,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("gemm", ["loop", "blas"])
def test_numba_gradcheck_both_gemm_paths(gemm):
    """float64 gradcheck of the fused scan, lengths and reverse, through the numba loop GEMM and through BLAS."""
    schedule = pytest.importorskip("seqfast.backends.numba.schedule")
    if registry.backends["numba"].unavailable_reason():
        pytest.skip(registry.backends["numba"].unavailable_reason())
    gen = torch.Generator().manual_seed(4)
    w = random_weights(seqfast.get_cell(CELL), 3, torch.float64, gen)
    x = torch.randn(3, 2, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight_hh = w["weight_hh"].requires_grad_()
    bias_hh = w["bias_hh"].requires_grad_()
    lengths = torch.tensor([3, 2])
    for reverse in (False, True):
        def run(x, h0, weight_hh, bias_hh, reverse=reverse):
            out, (h,) = scan(CELL, x, (h0,), {"weight_hh": weight_hh, "bias_hh": bias_hh}, lengths, reverse,
                             backend="numba")
            return out, h

        with schedule.forced_loop_gemm(gemm == "loop"):
            assert torch.autograd.gradcheck(run, (x, h0, weight_hh, bias_hh))


def _assert_passed(report, backend):
    if registry.backends[backend].unavailable_reason() is None:
        results = {case: result for case, result in report.items() if backend in case}
        assert results and all(result == "passed" for result in results.values()), results


def test_conformance_of_the_builtin_cell():
    report = check_cell(CELL, ["torch", "numba", "triton"], quick=True)
    _assert_passed(report, "numba")
    _assert_passed(report, "triton")


# --- MGU, registered the way a plugin registers its cell ----------------------------------------------------------
MGU = mgu_spec("test_mgu")


@pytest.fixture
def mgu():
    seqfast.register_cell(MGU)
    try:
        yield MGU
    finally:
        registry.cells.pop(MGU.name, None)
        registry.cell_origin.pop(MGU.name, None)
        registry.generation += 1


def test_mgu_plugin_cell_conforms(mgu):
    report = check_cell(mgu.name, ["torch", "numba", "triton"], quick=True)
    _assert_passed(report, "numba")
    _assert_passed(report, "triton")


def test_mgu_selects_numba_when_training(mgu):
    if registry.backends["numba"].unavailable_reason():
        pytest.skip(registry.backends["numba"].unavailable_reason())
    reasons = seqfast.explain(mgu.name, dtype=torch.float32, hidden_size=5, requires_grad=True)
    assert reasons["numba"] == []
    assert not any("staged" in why for why in reasons["triton"]), reasons["triton"]
    query = Query(mgu, dtype=torch.float32, hidden_size=5, requires_grad=True)
    assert select_backend(query)[0].name == "numba"  # triton runs it too, but auto never picks its interpreter


# --- declarations ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gates, recurrence, message", [
    ((2,), "diagonal", "dense recurrence"),
    ((0,), "dense", "increase strictly"),
    ((2,), "dense", "increase strictly"),
    ((1, 1), "dense", "increase strictly"),
], ids=["diagonal", "zero", "all-gates", "repeated"])
def test_invalid_stages_are_rejected(gates, recurrence, message):
    stages = tuple(Stage(g, mgu_gate, mgu_gate_backward) for g in gates)
    with pytest.raises(ValueError, match=message):
        CellSpec("bad_stages", 2, ("h",), mgu_step, recurrence=recurrence,
                 pointwise=Pointwise(mgu_forward, mgu_backward, stages=stages))


def test_stage_without_backward_is_rejected_when_the_cell_trains():
    with pytest.raises(ValueError, match="stages \\[0\\] have none"):
        CellSpec("bad_stages", 2, ("h",), mgu_step,
                 pointwise=Pointwise(mgu_forward, mgu_backward, stages=(Stage(1, mgu_gate),)))
