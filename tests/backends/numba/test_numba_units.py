"""forward_units: the inference forward with its hidden units split over threads that meet at a barrier after every
step, against the same scan over its row range and against the torch reference."""

from __future__ import annotations

import ctypes

import pytest
import torch

import seqfast

numba = pytest.importorskip("numba")

from numba_cases import TOL, fresh_plans, make_inputs, recorded_launches, run_scan  # noqa: E402, F401 (autouse)

from seqfast.backends.numba import gemm_choice, schedule  # noqa: E402

pytestmark = pytest.mark.skipif(schedule.team_addresses() is None, reason="this torch has no libgomp: no team")


@pytest.fixture(autouse=True)
def _two_threads(monkeypatch):
    monkeypatch.setenv("SEQFAST_NUMBA_THREADS", "2")
    gemm_choice.forget()
    yield
    gemm_choice.forget()


def _inference(cell, x, state0, weights, lens, reverse):
    with torch.no_grad():
        out, final = seqfast.scan(cell, x, state0, weights, lens, reverse, backend="numba")
    return out, final


# (each cell and dtype compiles its own kernels: the pairs are few, and the same in both tests)
@pytest.mark.parametrize("cell_name, dtype", [("lstm", torch.float32), ("gru", torch.float32),
                                             ("rnn_tanh", torch.float32), ("peephole_lstm", torch.float64),
                                             ("lstm", torch.float64)])
@pytest.mark.parametrize("batch, hidden, reverse", [(1, 64, False), (3, 70, True), (2, 150, False)])
def test_units_equal_rows_and_the_reference(monkeypatch, cell_name, dtype, batch, hidden, reverse) -> None:
    """Split units give the row range's result and the reference's: lengths, reverse, initial states, an uneven
    split (70 units: 32 + 38) and one over a chunk of the pointwise loop (150: 80 + 70, CHUNK 128)."""
    cell = seqfast.get_cell(cell_name)
    x, state0, weights, lens = make_inputs(cell, 11, batch, hidden, dtype, seed=hidden, lengths=batch > 1)
    kernels = recorded_launches(monkeypatch)
    with schedule.forced_loop_gemm(True), schedule.forced_units(False):
        rows = _inference(cell, x, state0, weights, lens, reverse)
    with schedule.forced_units(True):
        plan = schedule.plan({torch.float32: "float32", torch.float64: "float64"}[dtype], 11, batch,
                             cell.num_gates * hidden, hidden, cell.num_states)
        assert plan.units_forward and len(plan.unit_array) == 2
        units = _inference(cell, x, state0, weights, lens, reverse)
    assert kernels == ["forward", "forward_units"]
    with torch.no_grad():
        ref = seqfast.scan(cell, x, state0, weights, lens, reverse, backend="torch")
    for got in (units, rows):
        torch.testing.assert_close(got[0], ref[0], **TOL[dtype])
        torch.testing.assert_close(got[1], ref[1], **TOL[dtype])
    exact = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(units[0], rows[0], **exact)
    torch.testing.assert_close(units[1], rows[1], **exact)
    if lens is not None:  # outputs past each sequence's length are exactly zero
        steps = torch.arange(x.shape[0]).unsqueeze(1)
        assert torch.all(units[0][steps >= lens.unsqueeze(0)] == 0)


@pytest.mark.parametrize("cell_name, dtype", [("lstm", torch.float64), ("gru", torch.float32),
                                             ("rnn_tanh", torch.float32), ("peephole_lstm", torch.float64)])
@pytest.mark.parametrize("batch, hidden, reverse", [(1, 64, False), (3, 70, True), (2, 150, True)])
def test_training_with_split_units_equals_rows_and_the_reference(monkeypatch, cell_name, dtype, batch, hidden,
                                                                 reverse) -> None:
    """forward_units saving for the backward, then backward_units: outputs and every gradient (input, initial
    states, W_hh, b_hh, a peephole's per-unit weights) equal the row ranges' and the reference's, with lengths."""
    cell = seqfast.get_cell(cell_name)
    x, state0, weights, lens = make_inputs(cell, 9, batch, hidden, dtype, seed=hidden + 1, lengths=batch > 1)
    kernels = recorded_launches(monkeypatch)
    with schedule.forced_loop_gemm(True), schedule.forced_units(False):
        rows = run_scan(cell, x, state0, weights, lens, reverse, "numba")
    assert kernels == ["forward", "backward"]
    with schedule.forced_units(True):
        units = run_scan(cell, x, state0, weights, lens, reverse, "numba")
    assert kernels[2:] == ["forward_units", "backward_units"]
    ref = run_scan(cell, x, state0, weights, lens, reverse, "torch")
    # backward_units adds a step's d_h product to d_h after summing it: the last bits may differ from the rows'
    close = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for got, want, tol in ((units, ref, TOL[dtype]), (units, rows, close)):
        torch.testing.assert_close(got[0], want[0], **tol)
        torch.testing.assert_close(got[1], want[1], **tol)
        torch.testing.assert_close(got[2], want[2], **tol)


def test_a_smaller_team_runs_every_unit_on_one_thread(monkeypatch) -> None:
    """Inside a nested parallel region the team may get one thread: that thread runs every unit alone (waiting at
    the barrier for a thread that never comes would hang)."""
    team = schedule.team_addresses()
    body_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
    def team_of_one(body, data, threads, flags):  # GOMP_parallel as a nested region runs it: thread 0 only
        body_type(body)(data)

    cell = seqfast.get_cell("gru")
    x, state0, weights, lens = make_inputs(cell, 9, 2, 96, torch.float32, seed=4, lengths=True)
    with schedule.forced_units(False):
        want = _inference(cell, x, state0, weights, lens, True)
    address = ctypes.cast(team_of_one, ctypes.c_void_p).value
    monkeypatch.setattr(schedule, "team_addresses", lambda: team._replace(gomp=address))
    with schedule.forced_units(True):
        got = _inference(cell, x, state0, weights, lens, True)
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    torch.testing.assert_close(got[1], want[1], **TOL[torch.float32])


def test_the_measured_choice_takes_units_where_they_are_faster(monkeypatch) -> None:
    """The scans' GEMM choice times the unit split as a third way; where it is fastest an inference call runs it
    (the module's bound runner too), and so does a training call, forward and backward, all with torch.nn's
    results."""
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    torch.manual_seed(0)
    ours = seqfast.LSTM(8, 64, backend="numba")
    ref = torch.nn.LSTM(8, 64)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(12, 1, 8)
    per_step = {True: 2.0, False: 3.0, gemm_choice.UNITS: 1.0}
    now, timed = [0.0], []
    monkeypatch.setattr(gemm_choice, "_clock", lambda: now[0])
    real_choose = gemm_choice.choose_for_steps

    def charged(key, static, run, steps, more=()):
        def timed_run(way, k) -> None:
            run(way, k)
            timed.append(way)
            now[0] += k * per_step[way]
        return real_choose(key, static, timed_run, steps, more)

    monkeypatch.setattr(gemm_choice, "choose_for_steps", charged)
    kernels = recorded_launches(monkeypatch)
    bound = []
    real_bound_block = schedule.bound_block

    def bound_block(module, kernel, plan, small, args):
        bound.append(kernel)
        return real_bound_block(module, kernel, plan, small, args)

    monkeypatch.setattr(schedule, "bound_block", bound_block)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
        assert set(timed) == {True, False, gemm_choice.UNITS}
        assert kernels[-1] == "forward_units"  # the call itself, after its timing runs
        assert schedule.plan("float32", 12, 1, 256, 64, 2).units_forward
        torch.testing.assert_close(ours(x), ref(x))
        assert bound == ["forward_units"]
    kernels.clear()
    x.requires_grad_()
    out, (h, c) = ours(x)
    out_ref, (h_ref, c_ref) = ref(x)
    torch.testing.assert_close((out, h, c), (out_ref, h_ref, c_ref))
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x), torch.autograd.grad(out_ref.sum(), x))
    assert kernels[0] == "forward_units" and kernels[-1] == "backward_units"  # after the backward's timing runs
    assert schedule.plan("float32", 12, 1, 256, 64, 2).units_backward


@pytest.mark.parametrize("batch, hidden, threads, expected", [
    (1, 64, 2, [(0, 32), (32, 64)]),
    (1, 100, 2, [(0, 48), (48, 100)]),
    (3, 256, 4, [(0, 64), (64, 128), (128, 192), (192, 256)]),
    (1, 96, 4, [(0, 32), (32, 64), (64, 96)]),  # at most 32 units a thread
    (1, 63, 2, []),  # under 32 units a thread
    (1, 640, 8, [(0, 160), (160, 320), (320, 480), (480, 640)]),  # no more threads than cores
    (1, 256, 1, []),  # one thread
    (8, 256, 2, [(0, 128), (128, 256)]),
    (17, 256, 2, []),  # a batch this large splits its rows
])
def test_unit_ranges(monkeypatch, batch, hidden, threads, expected) -> None:
    monkeypatch.setenv("SEQFAST_NUMBA_THREADS", str(threads))
    monkeypatch.setattr(schedule, "usable_cores", lambda: 4)
    got = schedule.unit_ranges(batch, hidden)
    assert got == expected
    assert all(lo % schedule.UNIT_ALIGN == 0 for lo, _ in got)


def test_calibration_waits_for_forward_units_where_the_forward_may_time_it(monkeypatch) -> None:
    """auto's calibration never compiles: a query whose scans may time the unit split asks for their _units
    kernels compiled too; a batch too large for the split or a cell without it does not."""
    from seqfast.backends.numba import codegen

    asked = []
    monkeypatch.setattr(codegen, "is_compiled", lambda cell, dtype, names: asked.append(names) or True)
    monkeypatch.setattr(schedule, "PIPELINE_MIN_STEPS", 10**9)  # the pipelined forward: its own test
    backend = seqfast.get_backend("numba")
    lstm, staged = seqfast.get_cell("lstm"), seqfast.get_cell("gru_reset_before")
    for query in (seqfast.Query(lstm, hidden_size=64, input_size=8, batch_size=1, seq_len=50),
                  seqfast.Query(lstm, hidden_size=64, input_size=8, batch_size=64, seq_len=50),
                  seqfast.Query(lstm, hidden_size=64, input_size=8, batch_size=1, seq_len=50, requires_grad=True),
                  seqfast.Query(staged, hidden_size=64, input_size=8, batch_size=1, seq_len=50)):
        assert not backend.needs_compile(query)
    assert asked == [("forward", "forward_units"), ("forward",),
                     ("forward", "forward_units", "backward", "backward_units"), ("forward",)]
