"""GEMM choices measured on this machine (gemm_choice): the scans' per-step GEMM, numba loop or MKL, and the
input projection's way."""

from __future__ import annotations

import pytest
import torch

import seqfast

numba = pytest.importorskip("numba")

from numba_cases import fresh_plans, recorded_launches  # noqa: E402, F401 (autouse fixture)

from seqfast.backends.numba import _blas, gemm, gemm_choice, schedule  # noqa: E402


@pytest.fixture(autouse=True)
def _no_choices():
    gemm_choice.forget()
    yield
    gemm_choice.forget()
    schedule.clear_plans()


def _timed(costs: dict[bool, float], monkeypatch):
    """run(loop) for choose(), advancing a fake clock by costs[loop]; records the ways run."""
    now, ran = [0.0], []
    monkeypatch.setattr(gemm_choice, "_clock", lambda: now[0])

    def run(loop: bool) -> None:
        ran.append(loop)
        now[0] += costs[loop]

    return run, ran


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("other_faster_by, switches", [(1.05, False), (1.25, True)])
def test_the_static_choice_stands_unless_the_other_is_clearly_faster(monkeypatch, static, other_faster_by,
                                                                     switches) -> None:
    run, ran = _timed({static: other_faster_by, not static: 1.0}, monkeypatch)
    key = ("test", static, other_faster_by)
    choice = gemm_choice.choose(key, (static, not static), run)
    assert choice == ((not static) if switches else static)
    assert gemm_choice.decided(key) == choice
    assert ran.count(True) == ran.count(False) == 1 + gemm_choice.ROUNDS  # one untimed run each, then rounds
    assert gemm_choice.choose(key, (static, not static), run) == choice and len(ran) == 2 * (1 + gemm_choice.ROUNDS)


@pytest.mark.parametrize("costs, expected", [
    ({"a": 1.0, "b": 0.7, "c": 0.5}, "c"),  # the fastest of three, clearly ahead of the static one
    ({"a": 1.0, "b": 0.97, "c": 0.95}, "a"),  # none clearly ahead: the static one stands
    ({"a": 1.0, "b": 0.85, "c": 0.99}, "b"),
])
def test_the_fastest_of_several_ways_is_kept(monkeypatch, costs, expected) -> None:
    run, ran = _timed(costs, monkeypatch)
    key = ("test", tuple(costs.values()))
    assert gemm_choice.choose(key, ("a", "b", "c"), run) == expected
    assert gemm_choice.decided(key) == expected
    assert all(ran.count(way) == 1 + gemm_choice.ROUNDS for way in costs)


def _timed_steps(per_call: dict[bool, float], per_step: dict[bool, float], monkeypatch):
    """run(loop, k) for choose_for_steps(), advancing a fake clock by per_call[loop] + k * per_step[loop]; records
    the runs."""
    now, ran = [0.0], []
    monkeypatch.setattr(gemm_choice, "_clock", lambda: now[0])

    def run(loop: bool, k: int) -> None:
        ran.append((loop, k))
        now[0] += per_call[loop] + k * per_step[loop]

    return run, ran


def test_a_scan_choice_follows_the_call_length(monkeypatch) -> None:
    """The loop's cost per call (its W_hh transposition) and per step are fitted apart: it loses short calls and
    wins long ones, where a single short timing run would have charged the transposition to every step."""
    per_call, per_step = {True: 1000.0, False: 10.0}, {True: 50.0, False: 170.0}
    run, ran = _timed_steps(per_call, per_step, monkeypatch)
    costs = gemm_choice.choose_for_steps(("test", "length"), False, run, 8)
    assert costs.per_call == pytest.approx(per_call) and costs.per_step == pytest.approx(per_step)
    assert sorted(set(ran)) == [(False, 2), (False, 8), (True, 2), (True, 8)]
    assert len(ran) == 2 * (1 + 2 * gemm_choice.ROUNDS)  # one untimed run each, then both counts per round
    crossover = (per_call[True] - per_call[False]) / (per_step[False] - per_step[True])  # 8.25 steps
    assert not costs.choice(1) and not costs.choice(8)
    assert costs.choice(20) and costs.choice(200)
    assert costs.choice(round(crossover * gemm_choice.MARGIN) + 2)
    assert gemm_choice.decided(("test", "length")) is costs
    assert gemm_choice.choose_for_steps(("test", "length"), False, run, 8) is costs and len(ran) == 14


def test_a_disturbed_timing_gives_no_slope_but_still_a_choice(monkeypatch) -> None:
    """A way whose longer run was not the slower one (the machine was busy during its shorter runs) has no slope
    to fit: its longer run's time is spread over its steps, so it cannot come out free per step."""
    run, _ = _timed_steps({True: 0.0, False: 0.0}, {True: 10.0, False: 30.0}, monkeypatch)
    def disturbed(loop: bool, k: int) -> None:
        run(loop, 8 if (loop and k == 2) else k)  # the loop's short runs take as long as its long ones

    costs = gemm_choice.choose_for_steps(("test", "disturbed"), False, disturbed, 8)
    assert costs.per_call[True] == 0.0 and costs.per_step[True] == pytest.approx(10.0)
    assert costs.per_step[False] == pytest.approx(30.0) and costs.per_call[False] == pytest.approx(0.0)
    assert costs.choice(1) and costs.choice(100)


@pytest.mark.parametrize("static", [True, False])
def test_a_scan_choice_keeps_the_static_way_unless_the_other_is_clearly_faster(monkeypatch, static) -> None:
    run, _ = _timed_steps({True: 0.0, False: 0.0}, {static: 1.05, not static: 1.0}, monkeypatch)
    costs = gemm_choice.choose_for_steps(("test", "margin", static), static, run, 4)
    assert costs.choice(1) is static and costs.choice(1000) is static
    run, _ = _timed_steps({True: 0.0, False: 0.0}, {static: 1.25, not static: 1.0}, monkeypatch)
    costs = gemm_choice.choose_for_steps(("test", "clear", static), static, run, 4)
    assert costs.choice(1) is (not static) and costs.choice(1000) is (not static)


def _lstm_call(batch: int, hidden: int, steps: int = 12):
    torch.manual_seed(0)
    ours = seqfast.LSTM(hidden, hidden, backend="numba")
    ref = torch.nn.LSTM(hidden, hidden)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(steps, batch, hidden)
    return ours, ref, x


def _plan_of(batch: int, hidden: int, steps: int = 12) -> schedule.Plan:
    return schedule.plan("float32", steps, batch, 4 * hidden, hidden, 2)


@pytest.mark.parametrize("faster", [True, False], ids=["loop-faster", "mkl-faster"])
def test_a_measured_choice_runs_and_the_result_does_not_change(monkeypatch, faster: bool) -> None:
    if not _blas.gemm_address("float32"):
        pytest.skip("no MKL in this torch: the loop is the only GEMM")
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    ours, ref, x = _lstm_call(batch=6, hidden=24)
    plan = _plan_of(6, 24)
    assert plan.measure_forward is not None
    launched = []
    real_launch = schedule.launch

    def launch(module, kernel, plan, small, args, sums=()):
        launched.append((kernel, small, args[0].shape[0]))
        return real_launch(module, kernel, plan, small, args, sums)

    monkeypatch.setattr(schedule, "launch", launch)
    real_bound_block = schedule.bound_block

    def bound_block(module, kernel, plan, small, args):  # a module's inference runner (stack.py) binds its call
        launched.append((kernel, small, args[0].shape[0]))
        return real_bound_block(module, kernel, plan, small, args)

    monkeypatch.setattr(schedule, "bound_block", bound_block)
    costs = {faster: 1.0, not faster: 2.0}  # per step
    now = [0.0]
    monkeypatch.setattr(gemm_choice, "_clock", lambda: now[0])
    monkeypatch.setattr(gemm_choice, "choose_for_steps", _charging_steps(gemm_choice.choose_for_steps, costs, now))
    with torch.no_grad():
        out, (h, c) = ours(x)
        want, (h_ref, c_ref) = ref(x)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close((h, c), (h_ref, c_ref))
    assert gemm_choice.decided(plan.measure_forward).choice(x.shape[0]) is faster
    *timing, call = launched
    assert len(timing) == 2 * (1 + 2 * gemm_choice.ROUNDS)  # timing runs of the call's first steps, both ways
    assert sorted(small for _, small, _ in timing) == [False] * (len(timing) // 2) + [True] * (len(timing) // 2)
    steps = gemm_choice.timing_steps(x.shape[0], 6, 4 * 24, 24)
    assert {entry[2] for entry in timing} == {steps, steps // 4}
    assert call == ("forward", faster, x.shape[0])  # then the call itself, the measured way
    again = _plan_of(6, 24)
    assert again.measure_forward is None and again.loop_forward is faster
    launched.clear()
    with torch.no_grad():
        ours(x)
    assert launched == [("forward", faster, x.shape[0])]  # measured once per shape
    with torch.no_grad():
        ours(x)
    assert len(launched) == 1  # the shape's block, written once, is used again


def _charging_steps(choose_for_steps, costs, now):
    """choose_for_steps() whose runs advance the fake clock by k * costs[loop] after running for real."""
    def charged(key, static, run, steps, more=()):
        def timed_run(way, k) -> None:
            run(way, k)
            now[0] += k * costs[way]
        return choose_for_steps(key, static, timed_run, steps, more)
    return charged


def _charging(choose, costs, now):
    """choose() whose runs advance the fake clock by costs[loop] after running for real."""
    def charged(key, ways, run):
        def timed_run(way) -> None:
            run(way)
            now[0] += costs[way]
        return choose(key, ways, timed_run)
    return charged


def test_nothing_is_measured_with_calibration_off_or_a_forced_gemm(monkeypatch) -> None:
    monkeypatch.setenv("SEQFAST_CALIBRATE", "0")
    ours, _, x = _lstm_call(batch=5, hidden=20)
    assert _plan_of(5, 20).measure_forward is None
    with torch.no_grad():
        ours(x)
    assert gemm_choice._decided == {}
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    with schedule.forced_loop_gemm(False):
        assert _plan_of(5, 20).measure_forward is None
        with torch.no_grad():
            ours(x)
    assert gemm_choice._decided == {}


def test_timing_on_the_first_steps_leaves_lengths_and_both_directions_right(monkeypatch) -> None:
    """Timing runs take fewer steps than the call (lengths clipped to them); the call's results are torch.nn's."""
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    steps, batch, hidden = 40, 64, 64
    assert gemm_choice.timing_steps(steps, batch, 4 * hidden, hidden) < steps
    torch.manual_seed(1)
    ours = seqfast.LSTM(hidden, hidden, bidirectional=True, backend="numba")
    ref = torch.nn.LSTM(hidden, hidden, bidirectional=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(steps, batch, hidden)
    lengths = torch.randint(1, steps + 1, (batch,))
    with torch.no_grad():
        out, (h, c) = ours(x, lengths=lengths)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        want, (h_ref, c_ref) = ref(packed)
        want, _ = torch.nn.utils.rnn.pad_packed_sequence(want, total_length=steps)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close((h, c), (h_ref, c_ref), rtol=1e-4, atol=2e-5)
    assert gemm_choice._decided or not _blas.gemm_address("float32")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_backward_is_measured_on_copies_and_its_gradients_are_torch_nns(monkeypatch, cell: str) -> None:
    """Training: the forward and the backward each measure their GEMM once per shape, on the call's first steps;
    what the backward's kernel overwrites is copied for its timing runs, so every gradient is torch.nn's."""
    if not _blas.gemm_address("float32"):
        pytest.skip("no MKL in this torch: the loop is the only GEMM")
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    steps, batch, hidden = 30, 64, 48
    torch.manual_seed(2)
    kind = {"lstm": "LSTM", "gru": "GRU"}[cell]
    ours = getattr(seqfast, kind)(hidden, hidden, backend="numba")
    ref = getattr(torch.nn, kind)(hidden, hidden)
    ref.load_state_dict(ours.state_dict())
    gates = seqfast.get_cell(cell).num_gates
    assert gemm_choice.timing_steps(steps, batch, gates * hidden, hidden) < steps
    launched = recorded_launches(monkeypatch)
    x = torch.randn(steps, batch, hidden)
    lengths = torch.randint(1, steps + 1, (batch,))
    grads = []
    for module in (ours, ref):
        xx = x.clone().requires_grad_()
        if module is ours:
            out, _ = module(xx, lengths=lengths)
        else:
            packed = torch.nn.utils.rnn.pack_padded_sequence(xx, lengths, enforce_sorted=False)
            out, _ = torch.nn.utils.rnn.pad_packed_sequence(module(packed)[0], total_length=steps)
        (out * torch.linspace(-1, 1, hidden)).sum().backward()
        grads.append([xx.grad, *(p.grad for p in module.parameters())])
    # the weight gradients sum 1920 float32 products: torch.nn's own differ from float64 by up to ~7e-5 here
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)
    runs = 2 * (1 + 2 * gemm_choice.ROUNDS) + 1
    assert launched == ["forward"] * runs + ["backward"] * runs
    keys = [key for key in gemm_choice._decided if key[0] == "backward"]
    assert len(keys) == 1


def _projection_operands(rows: int, inputs: int = 64, width: int = 256, dtype=torch.float32):
    gen = torch.Generator().manual_seed(rows)
    return (torch.randn(rows, inputs, generator=gen, dtype=dtype),
            torch.randn(width, inputs, generator=gen, dtype=dtype))


def _recorded_projections(monkeypatch) -> list[tuple[str, int]]:
    """(way, rows) of every product gemm._project runs."""
    ran = []
    real = gemm._project
    monkeypatch.setattr(gemm, "_project", lambda way, x, w: (ran.append((way, x.shape[0])), real(way, x, w))[1])
    return ran


@pytest.mark.parametrize("fastest", ["mm", "onednn", "kernel"])
def test_a_projection_takes_the_way_measured_fastest_for_its_shape(monkeypatch, fastest: str) -> None:
    """A large float32 projection times every way on at most PROJECTION_TIMING_ROWS of its rows, keeps the fastest
    for its bucket of rows (measured once), and equals x W_ih^T whichever way runs."""
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # MKL's own kernel is a candidate on one thread
    x, weight = _projection_operands(3000)
    ways = ("mm", *(("onednn",) if gemm.onednn_linear() is not None else ()),
            *(("kernel",) if gemm._direct_kernel() is not None else ()))
    if fastest not in ways:
        pytest.skip(f"{fastest} is not available here")
    costs = {way: (1.0 if way == fastest else 2.0) for way in ways}
    now = [0.0]
    monkeypatch.setattr(gemm_choice, "_clock", lambda: now[0])
    monkeypatch.setattr(gemm_choice, "choose", _charging(gemm_choice.choose, costs, now))
    ran = _recorded_projections(monkeypatch)
    want = x.double().mm(weight.double().t()).float()
    torch.testing.assert_close(gemm.input_projection(x, weight), want, rtol=1e-5, atol=1e-5)
    *timing, call = ran
    assert sorted(timing) == sorted((way, gemm.PROJECTION_TIMING_ROWS) for way in ways
                                    for _ in range(1 + gemm_choice.ROUNDS))
    assert call == (fastest, 3000)
    ran.clear()
    other_rows, _ = _projection_operands(2500)  # the same bucket: no timing again
    torch.testing.assert_close(gemm.input_projection(other_rows, weight), other_rows.mm(weight.t()),
                               rtol=1e-5, atol=1e-5)
    assert ran == [(fastest, 2500)]


def test_a_projection_keeps_the_static_rule_where_nothing_is_measured(monkeypatch) -> None:
    """Calibration off, float64, or a product under SMALL_TORCH_GEMM: the static rule, and nothing is timed."""
    ran = _recorded_projections(monkeypatch)
    monkeypatch.setenv("SEQFAST_CALIBRATE", "0")
    x, weight = _projection_operands(5000, width=256)  # 1.28M outputs: oneDNN's by the static rule
    static = "onednn" if gemm.onednn_linear() is not None else "mm"
    torch.testing.assert_close(gemm.input_projection(x, weight), x.mm(weight.t()), rtol=1e-5, atol=1e-5)
    assert ran == [(static, 5000)]
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    ran.clear()
    x64, w64 = _projection_operands(3000, dtype=torch.float64)
    torch.testing.assert_close(gemm.input_projection(x64, w64), x64.mm(w64.t()))
    small, w_small = _projection_operands(20)  # 0.33M multiply-adds
    gemm.input_projection(small, w_small)
    assert ran == [("mm", 3000), ("kernel" if gemm._direct_kernel() is not None else "mm", 20)]
    assert gemm_choice._decided == {}


def test_a_module_call_measures_its_projection_once(monkeypatch) -> None:
    """Through the module (general path in training, the stack runner in inference) the projection is measured on
    the first call of its shape and the results are torch.nn's."""
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    ran = _recorded_projections(monkeypatch)
    torch.manual_seed(4)
    ours = seqfast.GRU(64, 96, backend="numba")
    ref = torch.nn.GRU(64, 96)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(40, 50, 64)  # 2000 rows by 288 by 64: 36.9M multiply-adds
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=2e-5)
    assert [key for key in gemm_choice._decided if key[0] == "projection"] == [("projection", 2048, 288, 64,
                                                                                 torch.get_num_threads())]
    timing_runs = len(ran) - 2
    assert timing_runs >= 2 * (1 + gemm_choice.ROUNDS) and {rows for _, rows in ran} == {2000}


def test_a_one_step_call_is_not_timed_and_a_longer_call_then_decides_both(monkeypatch) -> None:
    """A fit needs two step counts: a call of one step keeps the static rule (and its inference call is bound as
    usual); the first longer call of the shape measures, and the one-step call then follows the fit."""
    if not _blas.gemm_address("float32"):
        pytest.skip("no MKL in this torch: the loop is the only GEMM")
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    ours, ref, x = _lstm_call(batch=6, hidden=24, steps=12)
    one = x[:1]
    with torch.no_grad():
        torch.testing.assert_close(ours(one)[0], ref(one)[0])
        assert [key for key in gemm_choice._decided if key[0] == "forward"] == []
        assert len(ours._inference_calls) == 1  # bound with the static rule's plan
        per_call, per_step = {True: 1000.0, False: 0.0}, {True: 1.0, False: 200.0}
        now = [0.0]
        monkeypatch.setattr(gemm_choice, "_clock", lambda: now[0])

        def charged(key, static, run, steps, more=()):
            def timed_run(way, k) -> None:
                run(way, k)
                now[0] += per_call[way] + k * per_step[way]
            return real(key, static, timed_run, steps, more)

        real = gemm_choice.choose_for_steps
        monkeypatch.setattr(gemm_choice, "choose_for_steps", charged)
        torch.testing.assert_close(ours(x)[0], ref(x)[0])
        (costs,) = [v for k, v in gemm_choice._decided.items() if k[0] == "forward"]
        assert costs.choice(12) is True and costs.choice(1) is False
        assert _plan_of(6, 24, steps=12).loop_forward is True and _plan_of(6, 24, steps=1).loop_forward is False
        torch.testing.assert_close(ours(one)[0], ref(one)[0])
