"""auto's calibration (seqfast/calibration.py): buckets, the table on disk, the rules on when it times, `seqfast tune`.

Timing is never asserted: a fake clock advances only while a deliberately slow fake backend runs.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

import seqfast
from seqfast import calibration, functional
from seqfast.backends.reference import TorchBackend
from seqfast.cli import main
from seqfast.registry import CellSpec, Query, registry

CELL = "calib_tanh"  # no pointwise math: the only real candidate is `torch`, so nothing JIT-compiles


@pytest.fixture(autouse=True, scope="module")
def _calibration_cell():
    """The test cell, registered for this module only: other test modules enumerate the registry's cells."""
    seqfast.register_cell(CellSpec(name=CELL, num_gates=1, state_names=("h",),
                                   reference_step=lambda x, s, w: (torch.tanh(x + s[0] @ w.weight_hh.t()
                                                                              + w.bias_hh),)), replace=True)
    yield
    del registry.cells[CELL]
    registry.cell_origin.pop(CELL, None)
    registry.generation += 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Slow(TorchBackend):
    """The reference scan, made slow on the fake clock; ranked first by the static rule."""

    name = "slowpoke"
    priority = 50
    cells = frozenset({CELL})
    clock: FakeClock | None = None
    compiled = True

    def scan(self, *args, **kwargs):
        if self.clock is not None:
            self.clock.now += 1.0
        return super().scan(*args, **kwargs)

    def needs_compile(self, query: Query) -> bool:
        return not self.compiled


@pytest.fixture
def calibrated(monkeypatch, tmp_path):
    """Calibration on, its files in a temporary cache directory, a fake clock and a fake slow backend."""
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    monkeypatch.setattr(calibration, "cache_root", lambda: tmp_path / "cache")
    clock = FakeClock()
    monkeypatch.setattr(calibration, "_clock", clock)
    slow = Slow()
    slow.clock = clock
    seqfast.register_backend(slow)
    calibration.forget()
    functional._decisions.clear()
    yield slow
    del registry.backends["slowpoke"]
    registry.generation += 1
    calibration.forget()
    functional._decisions.clear()


def query(batch: int = 3, hidden: int = 5, steps: int = 4, requires_grad: bool = False, **kw) -> Query:
    return Query(seqfast.get_cell(kw.pop("cell", CELL)), hidden_size=hidden, input_size=kw.pop("input_size", 2),
                 batch_size=batch, seq_len=steps, requires_grad=requires_grad, **kw)


def pick(q: Query) -> str:
    functional._decisions.clear()
    return seqfast.select_backend(q)[0].name


def count_timings(monkeypatch) -> list:
    calls = []
    real = calibration._time_candidates

    def counted(runs):
        calls.append(sorted(runs))
        return real(runs)

    monkeypatch.setattr(calibration, "_time_candidates", counted)
    return calls


def test_nearby_shapes_share_a_bucket() -> None:
    label = lambda **kw: calibration.bucket_of(query(**kw)).label  # noqa: E731
    assert label(batch=4) == label(batch=5) != label(batch=6) == label(batch=8)
    assert label(hidden=80) == label(hidden=64) != label(hidden=100)
    assert label(steps=40) == label(steps=64) != label(steps=20)
    assert label(steps=200) == label(steps=5000) == label(steps=256) != label(steps=64)
    assert label(steps=1) != label(steps=2) == label(steps=3) == label(steps=4)  # one step runs the step kernels
    assert label(requires_grad=True) != label()
    assert calibration.bucket_of(Query(seqfast.get_cell("lstm"), hidden_size=8)) is None  # no shape: static
    assert calibration.bucket_of(query(batch=0)) is None


def test_calibration_picks_the_faster_backend(calibrated, monkeypatch) -> None:
    calls = count_timings(monkeypatch)
    assert pick(query()) == "torch"  # slowpoke, the static rule's pick, lost on the clock
    assert calls == [["slowpoke", "torch"]]
    path, decisions = calibration.table()
    entry = decisions[calibration.bucket_of(query()).label]
    assert entry["backend"] == "torch" and entry["seconds"]["slowpoke"] >= 1.0
    assert pick(query(batch=4)) == "torch" and len(calls) == 1  # same bucket: decided, not timed again


@pytest.mark.parametrize(("torch_seconds", "winner"), [(0.95, "slowpoke"), (0.8, "torch")])
def test_the_static_choice_stands_unless_clearly_beaten(calibrated, monkeypatch, torch_seconds, winner) -> None:
    """A candidate must beat the static rule's choice by calibration.MARGIN: noise must not flip a kept decision."""
    monkeypatch.setattr(calibration, "_time_candidates", lambda runs: {"slowpoke": 1.0, "torch": torch_seconds})
    assert pick(query()) == winner


def test_calibration_off_gives_the_static_rule(calibrated, monkeypatch, tmp_path) -> None:
    calls = count_timings(monkeypatch)
    monkeypatch.setenv("SEQFAST_CALIBRATE", "0")
    assert pick(query()) == "slowpoke"
    monkeypatch.delenv("SEQFAST_CALIBRATE")
    (tmp_path / "seqfast.toml").write_text("calibrate = false\n")
    assert pick(query()) == "slowpoke"
    (tmp_path / "seqfast.toml").write_text("calibrate = true\n")
    assert pick(query()) == "torch"
    monkeypatch.setenv("SEQFAST_CALIBRATE", "0")
    assert pick(query()) == "slowpoke"  # the stored decision is not used either
    assert len(calls) == 1
    monkeypatch.setenv("SEQFAST_CALIBRATE", "maybe")
    with pytest.raises(ValueError, match="SEQFAST_CALIBRATE: expected one of .* got 'maybe'"):
        pick(query())
    monkeypatch.delenv("SEQFAST_CALIBRATE")
    (tmp_path / "seqfast.toml").write_text('calibrate = "no"\n')
    with pytest.raises(ValueError, match="'calibrate' must be true or false, got 'no'"):
        pick(query())


def test_table_round_trips_through_its_file(calibrated, monkeypatch) -> None:
    assert pick(query()) == "torch"
    assert pick(query(requires_grad=True)) == "torch"
    path, before = calibration.table()
    assert path.name.startswith("calibration-") and path.suffix == ".json"
    on_disk = json.loads(path.read_text())
    assert on_disk["key"] == calibration.machine_key() and on_disk["decisions"] == before
    calibration.forget()  # a new process: nothing in memory
    calls = count_timings(monkeypatch)
    assert calibration.table() == (path, before)
    assert pick(query()) == "torch" and pick(query(requires_grad=True)) == "torch"
    assert calls == []  # read back, not timed again


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "key": {}, "decisions": []})])
def test_corrupt_file_is_ignored_with_a_warning(calibrated, content) -> None:
    path = calibration.table_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match=f"ignoring the calibration file {path}"):
        assert pick(query()) == "torch"
    assert json.loads(path.read_text())["decisions"][calibration.bucket_of(query()).label]["backend"] == "torch"


def test_stale_key_is_ignored_with_a_warning(calibrated, monkeypatch) -> None:
    path = calibration.table_path()
    path.parent.mkdir(parents=True)
    label = calibration.bucket_of(query()).label
    stale = {**calibration.machine_key(), "cpu": "Another CPU", "torch": "0.0"}
    path.write_text(json.dumps({"format": 1, "key": stale, "decisions": {
        label: {"backend": "slowpoke", "seconds": {"slowpoke": 0.0, "torch": 1.0}}}}))
    with pytest.warns(RuntimeWarning, match=rf"ignoring the calibration file {path}: .*other versions: "
                                            r"cpu 'Another CPU' \(here .*torch '0.0'"):
        assert pick(query()) == "torch"  # the stale decision for slowpoke was not taken
    assert json.loads(path.read_text())["key"] == calibration.machine_key()


def test_the_cpu_in_the_key_tells_models_of_one_name_apart() -> None:
    """Virtual machines name a Zen 3 and a Zen 5 EPYC alike: the key's CPU carries family and model, so their
    calibrations go to different files."""
    zen = "processor\t: {p}\nvendor_id\t: AuthenticAMD\ncpu family\t: {f}\nmodel\t\t: {m}\nmodel name\t: AMD EPYC\n"
    zen3 = "\n".join(zen.format(p=p, f=25, m=1) for p in range(2))
    zen5 = zen.format(p=0, f=26, m=2)
    assert calibration.cpu_model_from(zen3) == "AMD EPYC (family 25, model 1)"
    assert calibration.cpu_model_from(zen5) == "AMD EPYC (family 26, model 2)"
    key = calibration.machine_key()
    paths = {calibration.table_path({**key, "cpu": calibration.cpu_model_from(text)}) for text in (zen3, zen5)}
    assert len(paths) == 2
    assert calibration.cpu_model_from("processor\t: 0\nmodel name\t: Some CPU\n") == "Some CPU"  # no numbers
    assert calibration.cpu_model_from("") == ""


def test_a_new_candidate_is_timed_again(calibrated, monkeypatch) -> None:
    calls = count_timings(monkeypatch)
    assert pick(query()) == "torch"

    class Other(TorchBackend):
        name = "other"

    seqfast.register_backend(Other())
    try:
        pick(query())
    finally:
        del registry.backends["other"]
        registry.generation += 1
    assert calls == [["slowpoke", "torch"], ["other", "slowpoke", "torch"]]


def test_no_timing_while_compiling_or_when_a_candidate_would_compile(calibrated, monkeypatch) -> None:
    calls = count_timings(monkeypatch)
    calibrated.compiled = False
    assert pick(query()) == "slowpoke"  # the static rule; nothing compiled, timed or stored just to calibrate
    assert calibration.table()[1] == {}
    calibrated.compiled = True
    with calibration.stored_only():  # what select_backend uses while torch.compile traces
        assert pick(query()) == "slowpoke"
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert pick(query()) == "slowpoke"
    assert calls == []
    assert pick(query()) == "torch"
    with calibration.stored_only():
        assert pick(query()) == "torch"  # a stored decision applies


def test_compiled_module_uses_the_stored_decision(calibrated, monkeypatch) -> None:
    module = seqfast.Recurrent(CELL, 2, 5)
    x = torch.randn(4, 3, 2)
    eager = module(x)[0]
    label = calibration.bucket_of(query(steps=4, batch=3, hidden=5, requires_grad=True)).label
    decided = calibration.table()[1][label]["backend"]
    calls = count_timings(monkeypatch)
    functional._decisions.clear()
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x)[0], eager)
    assert decided == "torch" and calls == []


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_results_under_calibrated_auto_equal_the_chosen_backend(calibrated, monkeypatch) -> None:
    monkeypatch.setattr(calibration, "_clock", calibration.time.perf_counter)  # real timing: native or torch wins
    torch.manual_seed(0)
    module = seqfast.LSTM(3, 6, proj_size=2)  # numba declines proj_size: native and torch, nothing to compile
    x = torch.randn(5, 2, 3)
    rng = torch.get_rng_state()
    out, (h, c) = module(x)
    assert torch.equal(torch.get_rng_state(), rng)  # timing drew from its own generator
    q = Query(seqfast.get_cell("lstm"), hidden_size=6, input_size=3, batch_size=2, seq_len=5, proj_size=2,
              requires_grad=True)
    entry = calibration.table()[1][calibration.bucket_of(q).label]
    assert set(entry["seconds"]) == {"native", "torch"}
    (out.sum() + c.sum()).backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    forced = seqfast.LSTM(3, 6, proj_size=2, backend=entry["backend"])
    forced.load_state_dict(module.state_dict())
    out2, (h2, c2) = forced(x)
    (out2.sum() + c2.sum()).backward()
    assert torch.equal(out, out2) and torch.equal(h, h2) and torch.equal(c, c2)
    for a, p in zip(grads, forced.parameters(), strict=True):
        assert torch.equal(a, p.grad)


def test_threads_time_a_bucket_once(calibrated, monkeypatch) -> None:
    calls = count_timings(monkeypatch)
    chosen, errors = [], []
    start = threading.Barrier(4)

    def work() -> None:
        try:
            start.wait()
            chosen.append(seqfast.select_backend(query(batch=16))[0].name)
        except Exception as exc:  # reported below: an exception in a thread would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and chosen == ["torch"] * 4 and len(calls) == 1


def test_tune_fills_the_table_and_info_shows_it(calibrated, capsys) -> None:
    assert main(["tune", "--cells", CELL, "--steps", "4", "--batch", "1", "3", "--hidden", "4", "--mode", "infer",
                 "train"]) == 0
    out = capsys.readouterr().out
    path, decisions = calibration.table()
    assert str(path) in out and len(decisions) == 4
    for label, entry in decisions.items():
        assert entry["backend"] == "torch" and label in out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "auto's calibration: on (environment variable SEQFAST_CALIBRATE)" in out
    assert all(label in out for label in decisions)


def test_a_cell_is_timed_as_a_loop_of_steps(calibrated, monkeypatch) -> None:
    """A step-level query times calibration.STEP_LOOP chained steps per run: each step takes the state the step
    before it returned."""
    calls = count_timings(monkeypatch)
    seen = []
    real_step = TorchBackend.step

    def step(self, cell, x, state, params, names):
        seen.append(state[0])
        out = real_step(self, cell, x, state, params, names)
        seen.append(out[0])
        return out

    monkeypatch.setattr(TorchBackend, "step", step)
    entry = calibration.calibrate(query(steps=1, level="step", requires_grad=True))
    assert calls and entry["shape"][0] == calibration.STEP_LOOP
    assert len(seen) % (2 * calibration.STEP_LOOP) == 0 and len(seen) >= 4 * calibration.STEP_LOOP
    for run in range(len(seen) // (2 * calibration.STEP_LOOP)):
        chain = seen[run * 2 * calibration.STEP_LOOP:(run + 1) * 2 * calibration.STEP_LOOP]
        assert all(chain[2 * t + 1] is chain[2 * t + 2] for t in range(calibration.STEP_LOOP - 1))


def test_the_first_query_of_a_bucket_is_timed_at_its_own_sizes(calibrated, monkeypatch) -> None:
    """The bucket rounds sizes to powers of two for sharing the decision, but what is timed is the deciding
    query's own shape (a backend can win at B97 H51 and tie at B128 H64); a later query of the bucket reuses it."""
    timed = []
    real_runner = calibration._runner

    def runner(backend, q, shape, steps):
        timed.append((shape.batch, shape.input_size, shape.hidden_size))
        return real_runner(backend, q, shape, steps)

    monkeypatch.setattr(calibration, "_runner", runner)
    first = query(batch=97, hidden=51, input_size=51, level="step", steps=1)
    entry = calibration.calibrate(first)
    assert set(timed) == {(97, 51, 51)}
    assert entry["shape"][1:] == [97, 51, 51, 0]
    bucket = calibration.bucket_of(first)
    assert (bucket.batch, bucket.input_size, bucket.hidden_size) == (128, 64, 64)
    later = query(batch=120, hidden=60, input_size=60, level="step", steps=1)
    assert calibration.bucket_of(later) == bucket
    timed.clear()
    assert calibration.calibrate(later) == entry and timed == []


def test_a_candidate_slow_on_its_first_two_calls_is_timed_warm(monkeypatch) -> None:
    """numba's first call of a shape measures its GEMM choice and its second binds the call and loads what bound
    calls run: neither is timed, so a candidate whose first two calls are slow still wins when it is faster, even
    in the one-round screening that rules out the clearly slower candidates before long runs."""
    now = [0.0]
    monkeypatch.setattr(calibration, "_clock", lambda: now[0])
    calls = {"late": 0}

    def late() -> None:  # 20 s, then 10 s, then 1 s a call
        calls["late"] += 1
        now[0] += {1: 20.0, 2: 10.0}.get(calls["late"], 1.0)

    def steady() -> None:
        now[0] += 2.0

    best = calibration._time_candidates({"late": late, "steady": steady}, min_rounds=1, max_rounds=1)
    assert best == {"late": 1.0, "steady": 2.0}


def test_long_runs_take_the_representative_steps_as_time_allows(monkeypatch) -> None:
    """Long runs take the bucket's steps in full (a per-step cost that grows with the sequence then shows), or
    as many as the short run's fastest candidate would run in LONG_RUN_SECONDS, and never fewer than its own."""
    monkeypatch.setattr(calibration, "LONG_RUN_SECONDS", 1.0)
    assert calibration._long_steps(64, 16, 0.125) == 64  # 128 steps would fit
    assert calibration._long_steps(256, 16, 0.125) == 128
    assert calibration._long_steps(256, 16, 4.0) == 16
    assert calibration._long_steps(256, 16, 0.0) == 256  # nothing measured (a fake clock): in full


def test_long_runs_only_for_candidates_a_short_run_leaves_in_the_race(calibrated, monkeypatch) -> None:
    """Before long runs, a short run rules out the clearly slower candidates; they keep their short time, scaled,
    so the stored entry still names every candidate. One candidate left in the race is the decision."""
    steps_run = {}
    real_runner = calibration._runner

    def runner(backend, q, bucket, steps):
        run = real_runner(backend, q, bucket, steps)

        def counted():
            steps_run.setdefault(backend.name, set()).add(steps)
            run()
        return counted

    monkeypatch.setattr(calibration, "_runner", runner)
    q = query(steps=200, batch=2, hidden=4)
    bucket = calibration.bucket_of(q)
    monkeypatch.setattr(calibration, "WORK_PER_RUN", bucket.batch * 4 * (4 + 2) * 4)  # short runs of 4 steps
    monkeypatch.setattr(calibration, "SCREEN_STEPS", 8)  # screened on 8
    assert calibration._short_steps(bucket, 1) == 4
    entry = calibration.calibrate(q)
    # 1.0 s a scan on the fake clock: slowpoke is ruled out by the short run, which leaves torch alone in the
    # race, so nothing runs long
    assert steps_run == {"torch": {8}, "slowpoke": {8}}
    assert set(entry["seconds"]) == {"torch", "slowpoke"} and entry["backend"] == "torch"
    assert entry["shape"][0] == 8 and entry["seconds"]["slowpoke"] >= 1.0

    steps_run.clear()
    calibrated.clock = None  # slowpoke as fast as torch: both stay in the race
    entry = calibration.calibrate(q, force=True)
    assert steps_run == {"torch": {8, 256}, "slowpoke": {8, 256}}  # short, then long runs
    assert entry["shape"][0] == 256 and entry["backend"] == "slowpoke"  # a tie: the static rule's order


def test_a_module_query_is_timed_through_the_backends_stack_runner(calibrated, monkeypatch) -> None:
    """What a module runs, calibration times: a backend's stack runner (bound to a one-layer stack in torch.nn's
    parameter order), and layer() where the runner declines the call."""
    bound, ran, declined = [], [], [False]

    def stack_runner(self, cell, dtype, stack):
        bound.append(stack)

        def run(x, state0, params):
            if declined[0]:
                return None
            ran.append([tuple(p.shape) for p in params[0]])
            zeros = (torch.zeros(x.shape[1], params[0][1].shape[1], dtype=x.dtype),)
            return self.layer(cell, x, params[0][0], params[0][2], zeros, seqfast.Weights(
                weight_hh=params[0][1], bias_hh=params[0][3]), None, False)

        return run

    monkeypatch.setattr(Slow, "stack_runner", stack_runner, raising=False)
    calibration.calibrate(query(batch=3, hidden=5, input_size=2))
    assert bound and bound[0].names == (("weight_ih", "weight_hh", "bias_ih", "bias_hh"),)
    assert bound[0].num_layers == 1 and not bound[0].bidirectional and not bound[0].requires_grad
    hidden, inputs = 5, 2  # the query's own sizes
    assert ran and ran[0] == [(hidden, inputs), (hidden, hidden), (hidden,), (hidden,)]
    layers = []
    real_layer = TorchBackend.layer
    monkeypatch.setattr(Slow, "layer", lambda self, *a: layers.append(1) or real_layer(self, *a), raising=False)
    declined[0] = True
    ran.clear()
    calibration.calibrate(query(batch=40, hidden=24, input_size=2))  # another bucket: timed anew
    assert layers and not ran  # declined: the general path ran
