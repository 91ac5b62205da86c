"""forward_pipelined: a bound inference call of one row range whose input projection runs on a second thread, a few
steps at a time, while the first thread scans; against the same call without the overlap and against torch.nn."""

from __future__ import annotations

import ctypes

import pytest
import torch

import seqfast

numba = pytest.importorskip("numba")

from numba_cases import TOL, fresh_plans, run_python  # noqa: E402, F401 (autouse)

from seqfast.backends.numba import codegen, gemm_choice, schedule  # noqa: E402

pytestmark = pytest.mark.skipif(schedule.team_addresses() is None, reason="this torch has no libgomp: no team")


@pytest.fixture(autouse=True)
def _two_threads(monkeypatch):
    monkeypatch.setenv("SEQFAST_NUMBA_THREADS", "2")
    monkeypatch.setattr(schedule, "usable_cores", lambda: 2)
    gemm_choice.forget()
    yield
    gemm_choice.forget()


def _pipelined_binds(monkeypatch) -> list[bool]:
    """Whether each layer-direction bound from now on pipelines (schedule.pipelines' answers, in order)."""
    answers = []
    real = schedule.pipelines

    def pipelines(*args):
        answers.append(real(*args))
        return answers[-1]

    monkeypatch.setattr(schedule, "pipelines", pipelines)
    return answers


def _pipelined_runs(monkeypatch, cell_name: str, dtype: torch.dtype) -> list[int]:
    """A list that grows by one each time the cell's forward_pipelined runs from now on (bindings made after this
    take the counting launcher)."""
    module = codegen.kernels(seqfast.get_cell(cell_name), {torch.float32: "float32", torch.float64: "float64"}[dtype])
    runs, real = [], module.forward_pipelined

    def counted(*args):
        runs.append(1)
        return real(*args)

    monkeypatch.setattr(module, "forward_pipelined", counted)
    return runs


def _module_pair(kind: str, inputs: int, hidden: int, layers: int, bidirectional: bool, dtype: torch.dtype):
    torch.manual_seed(inputs + hidden + layers)
    ref = getattr(torch.nn, kind)(inputs, hidden, num_layers=layers, bidirectional=bidirectional, dtype=dtype)
    ours = getattr(seqfast, kind)(inputs, hidden, num_layers=layers, bidirectional=bidirectional, dtype=dtype,
                                  backend="numba")
    ours.load_state_dict(ref.state_dict())
    return ours, ref


# (each cell and dtype compiles its own kernels: the pairs are few)
@pytest.mark.parametrize("kind, dtype", [("LSTM", torch.float32), ("GRU", torch.float64), ("RNN", torch.float32)])
@pytest.mark.parametrize("steps, batch, inputs, hidden, layers, bidirectional", [
    (40, 1, 12, 24, 1, False),
    (21, 3, 7, 13, 2, True),  # the last chunk of steps short, both directions, a layer taking 2H inputs
])
def test_pipelined_calls_equal_the_plain_ones_and_torch_nn(monkeypatch, kind, dtype, steps, batch, inputs, hidden,
                                                             layers, bidirectional) -> None:
    """Every layer-direction pipelines (the minimum projection lowered to take these small shapes), with and
    without initial states, and gives torch.nn's results and those of the same call without the overlap."""
    monkeypatch.setattr(schedule, "PIPELINE_MIN_PRODUCTS", 0)
    ours, ref = _module_pair(kind, inputs, hidden, layers, bidirectional, dtype)
    plain, _ = _module_pair(kind, inputs, hidden, layers, bidirectional, dtype)
    x = torch.randn(steps, batch, inputs, dtype=dtype)
    states = (layers * (2 if bidirectional else 1), batch, hidden)
    hx = torch.randn(*states, dtype=dtype)
    if kind == "LSTM":
        hx = (hx, torch.randn(*states, dtype=dtype))
    answers = _pipelined_binds(monkeypatch)
    runs = _pipelined_runs(monkeypatch, {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn_tanh"}[kind], dtype)
    with torch.no_grad():
        for h0 in (None, hx):
            for _ in range(3):  # the first call measures the GEMM choice; the next bind and run bound
                got = ours(x, h0)
            want = ref(x, h0)
            torch.testing.assert_close(got, want, **TOL[dtype])
    assert answers and all(answers), answers
    assert len(runs) >= 2 * len(answers)  # every layer-direction of at least two bound calls
    monkeypatch.setattr(schedule, "PIPELINE_MIN_STEPS", 10**9)
    answers.clear()
    with torch.no_grad():
        for h0 in (None, hx):
            for _ in range(3):
                without = plain(x, h0)
            torch.testing.assert_close(ours(x, h0), without, **TOL[dtype])
    assert answers and not any(answers)


@pytest.mark.parametrize("cell_name", ["gru_reset_before", "indrnn", "mingru", "peephole_lstm"])
def test_every_kind_of_cell_pipelines(monkeypatch, cell_name) -> None:
    """The pipelined forward runs any cell's scan: staged gates, a diagonal recurrence, none, per-unit weights;
    both directions, with the torch reference's results."""
    monkeypatch.setattr(schedule, "PIPELINE_MIN_PRODUCTS", 0)
    torch.manual_seed(1)
    ours = seqfast.Recurrent(cell_name, 12, 24, bidirectional=True, backend="numba")
    ref = seqfast.Recurrent(cell_name, 12, 24, bidirectional=True, backend="torch")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(30, 2, 12)
    answers = _pipelined_binds(monkeypatch)
    runs = _pipelined_runs(monkeypatch, cell_name, torch.float32)
    with torch.no_grad():
        for _ in range(3):
            got = ours(x)
        torch.testing.assert_close(got, ref(x), **TOL[torch.float32])
    assert answers == [True, True]
    assert len(runs) >= 4  # both directions of the two bound calls


def test_a_team_of_one_projects_first_then_scans(monkeypatch) -> None:
    """Inside a nested parallel region the team may get one thread: it projects every step, then scans (waiting
    for rows that no other thread writes would hang)."""
    monkeypatch.setattr(schedule, "PIPELINE_MIN_PRODUCTS", 0)
    team = schedule.team_addresses()
    body_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    started = []

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
    def team_of_one(body, data, threads, flags):  # GOMP_parallel as a nested region runs it: thread 0 only
        started.append(threads)
        body_type(body)(data)

    ours, ref = _module_pair("LSTM", 10, 20, 1, True, torch.float32)
    x = torch.randn(30, 2, 10)
    address = ctypes.cast(team_of_one, ctypes.c_void_p).value
    monkeypatch.setattr(schedule, "team_addresses", lambda: team._replace(gomp=address))
    answers = _pipelined_binds(monkeypatch)
    with torch.no_grad():
        for _ in range(3):
            got = ours(x)
        torch.testing.assert_close(got, ref(x), **TOL[torch.float32])
    assert answers and all(answers)
    assert 2 in started  # the pipelined launches asked for two threads and got one


def test_keep_alive_holds_an_array_read_through_an_address() -> None:
    """numba frees an array after its last use: one read only through an address, with an allocation in between,
    is unmapped before the read (without keep_alive this snippet segfaults: its 80 MB are mapped on their own).
    The launchers keep what the team reads alive with _team.keep_alive until the region ends."""
    out = run_python("""
        import numpy as np
        from numba import carray, njit
        from seqfast.backends.numba._team import keep_alive, pointer_to

        @njit
        def read(block, n):
            a = carray(pointer_to(block[0], np.float64(0)), (n,))
            return a.sum()

        @njit
        def launch(n, block):
            x = np.ones(n)
            block[0] = x.ctypes.data
            other = np.zeros(3)
            total = read(block, n)
            keep_alive(x)
            return total + other[0]

        print(launch(10_000_000, np.zeros(1, dtype=np.int64)))
    """, {"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert float(out) == 1e7


@pytest.mark.parametrize("ranges, steps, products, inputs, hidden, threads, cores, expected", [
    (1, 100, 1 << 20, 32, 32, 2, 2, True),
    (2, 100, 1 << 20, 32, 32, 2, 2, False),  # both threads scan rows
    (1, 15, 1 << 20, 32, 32, 2, 2, False),  # too few steps to overlap
    (1, 100, 1000, 32, 32, 2, 2, False),  # too little projection to pay for the team
    (1, 100, 1 << 20, 65, 32, 2, 2, False),  # an input this wide would keep the scan waiting
    (1, 100, 1 << 20, 32, 32, 1, 2, False),  # one thread
    (1, 100, 1 << 20, 32, 32, 2, 1, False),  # one core: the scan would spin while the projection cannot run
])
def test_pipelines(monkeypatch, ranges, steps, products, inputs, hidden, threads, cores, expected) -> None:
    monkeypatch.setenv("SEQFAST_NUMBA_THREADS", str(threads))
    monkeypatch.setattr(schedule, "usable_cores", lambda: cores)
    assert schedule.pipelines(ranges, steps, products, inputs, hidden) is expected


def test_calibration_waits_for_the_pipelined_forward_where_a_call_may_take_it(monkeypatch) -> None:
    """auto's calibration never compiles: an inference query whose module call may pipeline asks for the pipelined
    forward compiled too; training, a batch split over both threads, or a short sequence do not."""
    asked = []
    monkeypatch.setattr(codegen, "is_compiled", lambda cell, dtype, names: asked.append(names) or True)
    backend = seqfast.get_backend("numba")
    gru = seqfast.get_cell("gru")
    for query in (seqfast.Query(gru, hidden_size=32, input_size=32, batch_size=1, seq_len=100),
                  seqfast.Query(gru, hidden_size=32, input_size=32, batch_size=1, seq_len=100, requires_grad=True),
                  seqfast.Query(gru, hidden_size=32, input_size=32, batch_size=64, seq_len=100),
                  seqfast.Query(gru, hidden_size=32, input_size=32, batch_size=1, seq_len=8)):
        assert not backend.needs_compile(query)
    assert [names[-1] == "forward_pipe" for names in asked] == [True, False, False, False]
