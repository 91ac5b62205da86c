"""The numba backend's stack runner (stack.py): a module's inference calls bound to their shape. Every call must
match torch.nn and the torch reference as the general path does, and see every change to the parameters and the
plan; calls it does not take (training, lengths, options) go the general way."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from conftest import assert_close, backend_param
from torch import nn

import seqfast
from seqfast.backends.fused import FusedBackend
from seqfast.backends.numba import gemm_choice, schedule, stack
from seqfast.functional import InputError

pytestmark = pytest.mark.parametrize("backend", [backend_param("numba")])


@pytest.fixture
def general_calls(monkeypatch):
    """How many layer-directions ran through FusedBackend.layer (the general path), per call."""
    calls = []
    real = FusedBackend.layer

    def layer(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FusedBackend, "layer", layer)
    return calls


def _pair(kind: str, *args, **kwargs):
    torch.manual_seed(0)
    ref = getattr(nn, kind)(*args, **kwargs)
    ours = getattr(seqfast, kind)(*args, backend="numba", **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("layout", [
    {"num_layers": 1}, {"num_layers": 2, "bidirectional": True}, {"num_layers": 3, "batch_first": True},
    {"num_layers": 2, "bias": False, "nonlinearity": "relu"}])
def test_inference_calls_match_torch_nn_and_skip_the_general_path(backend, kind, layout, general_calls):
    if "nonlinearity" in layout and kind != "RNN":
        layout = {k: v for k, v in layout.items() if k != "nonlinearity"}
    ref, ours = _pair(kind, 5, 6, **layout)
    gen = torch.Generator().manual_seed(1)
    layers = layout["num_layers"] * (2 if layout.get("bidirectional") else 1)
    states = 2 if kind == "LSTM" else 1
    with torch.no_grad():
        for call, shape in enumerate([(4, 3, 5), (4, 3, 5), (1, 1, 5), (7, 5), (4, 3, 5)]):
            x = torch.randn(*shape, generator=gen)
            batch = 1 if x.dim() == 2 else shape[0 if layout.get("batch_first") else 1]
            hx = [torch.randn(layers, batch, 6, generator=gen) for _ in range(states)]
            if x.dim() == 2:
                hx = [h[:, 0] for h in hx]
            hx = None if call % 2 else (tuple(hx) if states == 2 else hx[0])
            general_calls.clear()
            got, want = ours(x, hx), ref(x, hx)
            assert_close(got[0], want[0], f"output of call {call}, input {shape}")
            assert_close(got[1], want[1], f"final states of call {call}, input {shape}")
            if call:  # the first call of a shape may measure its GEMM choice on the general path
                assert general_calls == [] or shape != (4, 3, 5), f"call {call} ran the general path"
    assert not general_calls


def test_every_change_to_a_parameter_or_the_plan_shows_through(backend, general_calls):
    ref, ours = _pair("LSTM", 4, 4, num_layers=2)
    x = torch.randn(6, 3, 4)

    def check(what: str) -> None:
        with torch.no_grad():
            general_calls.clear()
            got, want = ours(x), ref(x)
            assert_close(got[0], want[0], what)
            assert_close(got[1], want[1], what)
            assert not general_calls, f"{what}: ran the general path"

    with torch.no_grad():
        ours(x)
    check("a second call")
    with torch.no_grad():
        for module in (ref, ours):
            module.weight_hh_l1.add_(0.25)  # in place, as an optimizer step
    check("after an in-place update")
    new = torch.randn(16, 4)
    for module in (ref, ours):
        module.weight_ih_l0 = nn.Parameter(new.clone())
    check("after replacing weight_ih_l0")
    for module in (ref, ours):
        module.bias_hh_l0.data = torch.randn(16)
        ours.bias_hh_l0.data = ref.bias_hh_l0.data.clone()
    check("after bias_hh_l0.data = ...")
    ours.weight_ih_l1.data = ours.weight_ih_l1.data.view(4, 16).t()  # same data pointer, a transposed layout
    ref.weight_ih_l1.data = ours.weight_ih_l1.data.clone()
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert_close(got[0], want[0], "after a transposed .data view")
    with torch.no_grad():  # a non-contiguous weight updated in place: the call must read it anew
        for module in (ref, ours):
            module.weight_ih_l1.mul_(-2.0)
        got, want = ours(x), ref(x)
    assert_close(got[0], want[0], "after an in-place update of a non-contiguous weight")
    for module in (ref, ours):
        module.weight_ih_l1.data = module.weight_ih_l1.data.contiguous()
    check("with the weight contiguous again")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        check("on one thread")
    finally:
        torch.set_num_threads(threads)
    for module in (ref, ours):
        module.double()
    with torch.no_grad():
        got, want = ours(x.double()), ref(x.double())
    assert_close(got[0], want[0], "after .double()", torch.float64)


def test_a_plan_made_again_is_bound_again(backend, general_calls):
    ref, ours = _pair("GRU", 3, 5)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        ours(x)
        ours(x)
        schedule.clear_plans()
        general_calls.clear()
        got = ours(x)
    assert_close(got[0], ref(x)[0], "after the plans were cleared")


def test_training_lengths_and_options_take_the_general_path(backend, general_calls):
    ref, ours = _pair("LSTM", 3, 4)
    x = torch.randn(5, 2, 3)
    ours(x)[0].sum().backward()
    assert general_calls == [1]
    with torch.no_grad():
        general_calls.clear()
        ours(x, lengths=torch.tensor([5, 3]))
        assert general_calls == [1]
        states = ours(x, return_states=True)[2]
    assert states[0].shape == (1, 5, 2, 4)


# every kind the kernels take: dense, staged (gru_reset_before), none (mingru), diagonal (indrnn), extras (peephole)
@pytest.mark.parametrize("cell", ["lstm", "gru_reset_before", "mingru", "indrnn", "peephole_lstm"])
def test_every_cell_matches_the_torch_reference(backend, cell, general_calls):
    torch.manual_seed(0)
    ours = seqfast.Recurrent(cell, 3, 5, num_layers=2, bidirectional=True, backend="numba")
    ref = seqfast.Recurrent(cell, 3, 5, num_layers=2, bidirectional=True, backend="torch")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(6, 4, 3)
    hx = tuple(torch.randn(4, 4, 5) for _ in range(ours.cell.num_states))
    with torch.no_grad():
        for call in range(3):
            general_calls.clear()
            got = ours(x, hx if call else None)
            want = ref(x, hx if call else None)
            assert_close(got[0], want[0], f"{cell} output, call {call}")
            assert_close(got[1], want[1], f"{cell} final states, call {call}")
    assert not general_calls


@pytest.fixture
def general_entries(monkeypatch):
    """How many calls entered forward's general path (Recurrent._prepare) rather than a bound inference call."""
    calls = []
    real = seqfast.Recurrent._prepare

    def prepare(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(seqfast.Recurrent, "_prepare", prepare)
    return calls


def test_a_bound_inference_call_gives_way_wherever_the_general_path_differs(backend, general_entries, monkeypatch):
    """A shape the stack runner took without autograd is called again without the general path's checks
    (_bound_inference), and matches torch.nn; grad mode, autocast, another backend choice, dropout in training, a
    changed weight dtype and another shape take the general path (with its results and errors). Copies and pickles
    of a module holding bound calls work."""
    ref, ours = _pair("LSTM", 3, 4, num_layers=2, batch_first=True)
    x = torch.randn(2, 5, 3)
    hx = (torch.randn(2, 2, 4), torch.randn(2, 2, 4))

    def call(*args, general: bool, what: str, **kwargs):
        general_entries.clear()
        got, want = ours(*args, **kwargs), ref(*args, **kwargs)
        assert_close(got[0], want[0], what)
        assert_close(got[1], want[1], what)
        assert general_entries == ([1] if general else []), f"{what}: general path {general_entries}"
        return got

    with torch.no_grad():
        call(x, general=True, what="a first call")
        call(x, general=False, what="the same shape again")
        call(x, hx, general=False, what="with hx")
        with pytest.raises(InputError, match=r"hx: expected h of shape \(2, 2, 4\), got \(2, 1, 4\)"):
            ours(x, (hx[0][:, :1], hx[1]))
        call(x[:1], general=True, what="another batch size")
        call(x[:1], general=False, what="that batch size again")
    call(x, general=True, what="grad mode on")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            seqfast.BackendNotSupportedError, match="torch.autocast"):
        ours(x)  # the general path's answer (numba has no bfloat16), not a float32 run
    monkeypatch.setenv("SEQFAST_BACKEND", "torch")  # a module with backend="numba": the argument still wins
    with torch.no_grad():
        call(x, general=False, what="an environment choice the argument beats")
    ours.backend = "native"
    with torch.no_grad():
        call(x, general=True, what="backend changed to native")
        call(x, general=True, what="native again (its calls take the general path)")
    ours.backend = "numba"
    for module in (ref, ours):
        module.dropout = 0.5
    torch.manual_seed(3)
    with torch.no_grad():
        general_entries.clear()
        a, b = ours(x)[0], ours(x)[0]
    assert general_entries == [1, 1] and not torch.equal(a, b), "inter-layer dropout in training mode"
    ours.eval()
    ref.eval()
    with torch.no_grad():
        call(x, general=False, what="eval mode: no dropout drawn, the bound call again")
        blob = pickle.dumps(ours)
        for other in (copy.deepcopy(ours), pickle.loads(blob)):
            assert_close(other(x)[0], ref(x)[0], "a copy of a module with bound calls")
        ours.weight_hh_l1.data = ours.weight_hh_l1.data.double()  # torch.nn raises for this too
        with pytest.raises(ValueError, match=r"every parameter must be torch.float32 .* got one of shape \(16, 4\) "
                                             r"as torch.float64"):
            ours(x)


@pytest.mark.parametrize("small_gemm", [1 << 19, 0], ids=["projection-in-the-scan-call", "projection-by-torch"])
def test_both_ways_of_projecting_match_torch_nn(backend, small_gemm, monkeypatch, general_calls):
    """A bound call projects a small input inside the scan's own call and a larger one through input_projection
    (gemm.SMALL_TORCH_GEMM decides, read when the shape is bound); both give torch.nn's results, with hx."""
    from seqfast.backends.numba import gemm

    monkeypatch.setattr(gemm, "SMALL_TORCH_GEMM", small_gemm)
    ref, ours = _pair("GRU", 5, 6, num_layers=2, bidirectional=True)
    x, hx = torch.randn(4, 3, 5), torch.randn(4, 3, 6)
    with torch.no_grad():
        for call in range(3):
            general_calls.clear()
            got, want = ours(x, hx if call else None), ref(x, hx if call else None)
            assert_close(got[0], want[0], f"output, call {call}")
            assert_close(got[1], want[1], f"final state, call {call}")
    assert not general_calls


def test_calls_from_several_threads_at_once_match_torch_nn(backend):
    """A shape's binding writes its argument blocks on every call: a call made while another thread runs the same
    binding takes the general path instead, and every result is right."""
    ref, ours = _pair("LSTM", 8, 16)
    inputs = [torch.randn(30, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        wants = [ref(x)[0] for x in inputs]
        ours(inputs[0])
    failures = []

    def work(worker: int) -> None:
        with torch.no_grad():
            for round in range(40):
                i = (worker + round) % len(inputs)
                got = ours(inputs[i])[0]
                if not torch.allclose(got, wants[i], rtol=1e-4, atol=1e-5):
                    failures.append((worker, round))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.parametrize("layers", [1, 2])  # one layer-direction, or two layers of two directions
@pytest.mark.parametrize("cells_kernels", [True, False], ids=["cells-kernels", "scan"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_a_one_step_call_runs_the_way_measured_and_matches_torch_nn(backend, kind, cells_kernels, layers,
                                                                     monkeypatch):
    # a one-step inference call measures the cells' kernels against the scan once per input shape (both run on
    # the call's own data), then keeps the outcome; either way matches torch.nn, and h_n is not the output's memory
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    gemm_choice.forget()  # no decision of another test's
    measured, stepped = [], []

    def choose(key, ways, run):
        for way in ways:
            run(way)
        measured.append(key)
        return cells_kernels

    def one_step(*args):
        stepped.append(1)
        return real(*args)

    real = stack._one_step
    monkeypatch.setattr(gemm_choice, "choose", choose)
    monkeypatch.setattr(stack, "_one_step", one_step)
    ref, ours = _pair(kind, 5, 6, num_layers=layers, bidirectional=layers > 1)
    gen = torch.Generator().manual_seed(2)
    states = 2 if kind == "LSTM" else 1
    calls = 0
    with torch.no_grad():
        for batch in (1, 3, 1):
            for given in (False, True, "strided"):
                x = torch.randn(1, batch, 5, generator=gen)
                shape = (4 if layers > 1 else 1, batch, 12 if given == "strided" else 6)  # layer-directions, B, H
                hx = tuple(torch.randn(shape, generator=gen)[..., :6] for _ in range(states)) if given else None
                hx = hx if hx is None or states > 1 else hx[0]
                got, want = ours(x, hx), ref(x, hx)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
                h_n = got[1][0] if states > 1 else got[1]
                assert h_n.untyped_storage().data_ptr() != got[0].untyped_storage().data_ptr()
                calls += 1
    assert len(measured) == 2  # batch 1 and batch 3, once each
    # each measurement runs each way once before choose and once in it
    assert len(stepped) == 2 * len(measured) + (calls if cells_kernels else 0)


def test_a_one_step_call_keeps_the_scan_where_timing_is_off(backend, monkeypatch):
    monkeypatch.setattr(stack, "_one_step", lambda *args: pytest.fail("the cells' kernels ran"))
    ref, ours = _pair("LSTM", 5, 6)
    x = torch.randn(1, 2, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=2e-5)


def test_measuring_a_one_step_call_makes_the_choices_inside_it_first(backend, monkeypatch):
    # at B64 I64 H64 the scan's input projection and the step's GEMM are measured choices of their own: made
    # inside the one-step timing, under gemm_choice's lock, they would wait for it forever
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    gemm_choice.forget()
    ref, ours = _pair("LSTM", 64, 64)
    x = torch.randn(1, 64, 64)
    got = []

    def infer():
        with torch.no_grad():  # grad mode is per thread
            got.append(ours(x))

    call = threading.Thread(target=infer, daemon=True)
    call.start()
    call.join(120)
    assert not call.is_alive(), "the measured one-step call did not return"
    with torch.no_grad():
        torch.testing.assert_close(got[0], ref(x), rtol=1e-4, atol=2e-5)
    assert any(key[0] == "one step" for key in gemm_choice._decided)


def test_a_one_step_call_trains_after_one_made_in_inference_mode(backend, monkeypatch):
    # the zero states a one-step call without hx reads are kept for the process: one made under inference_mode
    # must still be a tensor a training step can save for its backward
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    gemm_choice.forget()
    ref, ours = _pair("GRU", 8, 8)
    x = torch.randn(1, 1, 8)
    with torch.inference_mode():
        ours(x)
    out, _ = ours(x)
    want, _ = ref(x)
    grads = [torch.autograd.grad(o.sum(), list(m.parameters())) for o, m in ((out, ours), (want, ref))]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=2e-5)
