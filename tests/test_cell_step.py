"""The cells' single step (Backend.step) on every backend, against torch.nn's cells: values and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import CountingBackend, all_backends, backend_param, walk_the_sources_of_a_gru_choice

import seqfast
from seqfast.registry import Backend, CellSpec, get_backend, registry

BACKENDS = [backend_param(name) for name in all_backends()]
KINDS = {"lstm": ("LSTMCell", {}), "gru": ("GRUCell", {}), "rnn_tanh": ("RNNCell", {}),
         "rnn_relu": ("RNNCell", {"nonlinearity": "relu"})}
DTYPES = {"f32": torch.float32, "f64": torch.float64}
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-9, "atol": 1e-10}}


def _pair(cell: str, input_size: int, hidden: int, dtype: torch.dtype, backend: str | None, bias: bool = True):
    kind, kwargs = KINDS[cell]
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(input_size, hidden, bias=bias, dtype=dtype, **kwargs)
    ours = getattr(seqfast, kind)(input_size, hidden, bias=bias, dtype=dtype, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _run(module, x, hx):
    """The outputs and the gradients of x, every hx tensor and every parameter, of a weighted sum of the outputs."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    hx = None if hx is None else tuple(h.detach().requires_grad_() for h in hx)
    given = None if hx is None else (hx if len(hx) > 1 else hx[0])
    outs = _outputs(module(x, given))
    loss = sum((i + 1.5) * o.sin().sum() for i, o in enumerate(outs))
    loss.backward()
    grads = [x.grad, *(() if hx is None else (h.grad for h in hx)), *(p.grad for p in module.parameters())]
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("hx_given", [False, True], ids=["hx-none", "hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("cell", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_matches_torch_nn_values_and_gradients(backend, cell, dtype, batched, hx_given):
    if backend == "triton" and (dtype == torch.float64 or not batched):
        pytest.skip("the interpreter is slow: one dtype, batched")
    ref, ours = _pair(cell, 3, 5, dtype, backend)
    gen = torch.Generator().manual_seed(1)
    lead = (2,) if batched else ()
    x = torch.randn(*lead, 3, generator=gen, dtype=dtype)
    n_states = 2 if cell == "lstm" else 1
    hx = tuple(torch.randn(*lead, 5, generator=gen, dtype=dtype) for _ in range(n_states)) if hx_given else None
    want_out, want_grads = _run(ref, x, hx)
    got_out, got_grads = _run(ours, x, hx)
    for w, g in zip(want_out, got_out, strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype])
    for i, (w, g) in enumerate(zip(want_grads, got_grads, strict=True)):
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m, i=i: f"gradient {i}: {m}")


@pytest.mark.parametrize("cell", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_of_strided_inputs_and_states_matches_torch_nn(backend, cell):
    # every other column of wider tensors: a backend reading copies must keep each alive through its kernel call
    ref, ours = _pair(cell, 3, 5, torch.float32, backend)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, generator=gen)[:, ::2]
    hx = tuple(torch.randn(2, 10, generator=gen)[:, ::2] for _ in range(2 if cell == "lstm" else 1))
    assert not x.is_contiguous() and not any(h.is_contiguous() for h in hx)
    given = hx if len(hx) > 1 else hx[0]
    with torch.no_grad():
        torch.testing.assert_close(ours(x, given), ref(x, given), **TOL[torch.float32])
    want_out, want_grads = _run(ref, x, hx)
    got_out, got_grads = _run(ours, x, hx)
    torch.testing.assert_close(got_out, want_out, **TOL[torch.float32])
    for i, (w, g) in enumerate(zip(want_grads, got_grads, strict=True)):
        torch.testing.assert_close(g, w, **TOL[torch.float32], msg=lambda m, i=i: f"gradient {i}: {m}")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("backend", [backend_param("numba"), backend_param("native")])
def test_step_without_bias_matches_torch_nn(backend, cell):
    ref, ours = _pair(cell, 4, 3, torch.float64, backend, bias=False)
    x = torch.randn(2, 4, dtype=torch.float64)
    want, want_grads = _run(ref, x, None)
    got, got_grads = _run(ours, x, None)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)


@pytest.mark.parametrize("batch", [1, 2])  # one row: the kernels' own loops (_rows.py); two: MKL's GEMM
@pytest.mark.parametrize("cell", list(KINDS))
@pytest.mark.parametrize("backend", [backend_param("numba")])
def test_numba_step_passes_gradcheck(backend, cell, batch):
    _, ours = _pair(cell, 3, 4, torch.float64, backend)
    names = [n for n, _ in ours.named_parameters()]
    n_states = 2 if cell == "lstm" else 1
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(batch, 3, generator=gen, dtype=torch.float64, requires_grad=True),
              *(torch.randn(batch, 4, generator=gen, dtype=torch.float64, requires_grad=True)
                for _ in range(n_states)),
              *(p.detach().clone().requires_grad_() for p in ours.parameters())]

    def step(x, *rest):
        states, params = rest[:n_states], rest[n_states:]
        return _outputs(torch.func.functional_call(ours, dict(zip(names, params, strict=True)),
                                                   (x, states if n_states > 1 else states[0])))

    assert torch.autograd.gradcheck(step, inputs)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("cell", list(KINDS))
@pytest.mark.parametrize("backend", [backend_param("numba")])
def test_a_one_row_step_matches_torch_nn_past_a_vector_width(backend, cell, dtype):
    # batch 1 runs the kernels' own loops (_rows.py): sizes that fill whole AVX-512 vectors and leave a remainder
    ref, ours = _pair(cell, 37, 70, dtype, backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 37, generator=gen, dtype=dtype)
    hx = tuple(torch.randn(1, 70, generator=gen, dtype=dtype) for _ in range(2 if cell == "lstm" else 1))
    want_out, want_grads = _run(ref, x, hx)
    got_out, got_grads = _run(ours, x, hx)
    torch.testing.assert_close(got_out, want_out, **TOL[dtype])
    for i, (w, g) in enumerate(zip(want_grads, got_grads, strict=True)):
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m, i=i: f"gradient {i}: {m}")


@pytest.mark.parametrize("threads", [None, 1], ids=["team", "team-of-one"])
@pytest.mark.parametrize("batch", [1, 3])  # one row: the loops' parts; three: the GEMM's
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("cell", list(KINDS))
@pytest.mark.parametrize("backend", [backend_param("numba")])
def test_a_step_split_over_a_team_matches_torch_nn(backend, cell, dtype, batch, threads, monkeypatch):
    # a step's forward products large enough for a team (step_plan.MIN_TEAM_PRODUCTS) run in parts split at
    # multiples of 16 columns (RNN's width 200: 0-96 and 96-200); a team of one (a nested region) leaves parts to
    # the caller
    from seqfast.backends.numba import gemm_choice, schedule, step_plan

    if schedule.team_addresses() is None or min(schedule.num_threads(), schedule.usable_cores()) < 2:
        pytest.skip("no OpenMP team of two here")
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    gemm_choice.forget()
    teams = []

    def choose(key, ways, run):  # the team, having run both ways; another choice (the GEMM's) as measured
        if key[0] != "step team":
            return real(key, ways, run)
        for way in ways:
            run(way)
        teams.append(ways[1])
        return ways[1] if threads is None else step_plan.team_array(layout, 3, threads).ctypes.data

    real = gemm_choice.choose

    monkeypatch.setattr(gemm_choice, "choose", choose)
    ref, ours = _pair(cell, 130, 200, dtype, backend)
    layout = step_plan.step_layout(ours.cell, dtype, tuple(ours._names))
    layout.shapes.clear()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 130, generator=gen, dtype=dtype)
    hx = tuple(torch.randn(batch, 200, generator=gen, dtype=dtype) for _ in range(2 if cell == "lstm" else 1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, hx if len(hx) > 1 else hx[0]), ref(x, hx if len(hx) > 1 else hx[0]),
                                   **TOL[dtype])
    assert len(teams) == 1 and layout.shapes[(batch, 130, 200)].team not in (0, None)
    want_out, want_grads = _run(ref, x, hx)
    got_out, got_grads = _run(ours, x, hx)
    torch.testing.assert_close(got_out, want_out, **TOL[dtype])
    for i, (w, g) in enumerate(zip(want_grads, got_grads, strict=True)):
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m, i=i: f"gradient {i}: {m}")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend", [backend_param("numba")])
def test_weight_gradients_from_the_buffer_pool_train_as_torch_nn(backend, cell, monkeypatch):
    # every weight gradient from the pool (large ones are, step.POOLED_GRADIENT_BYTES): autograd takes the first of
    # a backward as .grad and adds the others into it, and the pool must never hand out a buffer .grad still holds
    from seqfast.backends.numba import step

    monkeypatch.setattr(step, "POOLED_GRADIENT_BYTES", 0)
    ref, ours = _pair(cell, 5, 6, torch.float64, backend)
    gen = torch.Generator().manual_seed(7)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ours)]
    for _ in range(3):
        xs = torch.randn(4, 2, 5, generator=gen, dtype=torch.float64)
        for module in (ref, ours):
            state = None
            for x in xs:
                state = module(x, state)
            (state[0] if isinstance(state, tuple) else state).sin().sum().backward()
        for p_ref, p_ours in zip(ref.parameters(), ours.parameters(), strict=True):
            torch.testing.assert_close(p_ours.grad, p_ref.grad)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for p_ref, p_ours in zip(ref.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(p_ours, p_ref)


@pytest.mark.parametrize("backend", [backend_param("numba")])
def test_steps_on_a_team_from_several_python_threads_at_once(backend):
    # each thread's call starts a team of its own (libgomp gives a second caller new threads): every result is the
    # one a lone call gives
    import threading

    from seqfast.backends.numba import schedule, step_plan

    if schedule.team_addresses() is None or min(schedule.num_threads(), schedule.usable_cores()) < 2:
        pytest.skip("no OpenMP team of two here")
    ref, ours = _pair("lstm", 130, 200, torch.float32, backend)
    gen = torch.Generator().manual_seed(6)
    inputs = [(torch.randn(batch, 130, generator=gen), torch.randn(batch, 200, generator=gen),
               torch.randn(batch, 200, generator=gen)) for batch in (1, 3, 1, 3)]
    layout = step_plan.step_layout(ours.cell, torch.float32, tuple(ours._names))
    with torch.no_grad():
        for x, h, c in inputs[:2]:  # plans for batch 1 and 3, then their team forced
            ours(x, (h, c))
        team = step_plan.team_array(layout, 2, 2).ctypes.data
        for key in ((1, 130, 200), (3, 130, 200)):
            layout.shapes[key] = layout.shapes[key]._replace(team=team, threads=schedule.num_threads())
        want = [ref(x, (h, c)) for x, h, c in inputs]
    got, errors = [None] * len(inputs), []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    got[i] = ours(inputs[i][0], inputs[i][1:])
        except Exception as exc:  # reported below, with the thread's index
            errors.append((i, exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float32])
    assert all(layout.shapes[key].team == team for key in ((1, 130, 200), (3, 130, 200)))


@pytest.mark.parametrize("backend", [backend_param("numba"), backend_param("native"), backend_param("torch")])
def test_a_state_the_loss_does_not_reach_gets_no_gradient_from_it(backend):
    # the loss reads h' only: autograd hands the backward zeros for c'
    ref, ours = _pair("lstm", 3, 4, torch.float64, backend)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    hx = tuple(torch.randn(2, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    grads = []
    for module in (ref, ours):
        inputs = [x.clone().requires_grad_(), *(h.clone().requires_grad_() for h in hx)]
        h_new, _ = module(inputs[0], tuple(inputs[1:]))
        grads.append(torch.autograd.grad((h_new * h_new).sum(), [*inputs, *module.parameters()]))
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("backend", [backend_param("numba"), backend_param("native"), backend_param("torch")])
def test_step_reads_weights_changed_in_place_or_reassigned(backend):
    # weight_hh of an RNNCell is [H, H]: its transpose has the same memory, shape and dtype, only the strides differ
    ref, ours = _pair("rnn_tanh", 4, 4, torch.float32, backend)
    x = torch.randn(3, 4)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(ours(x), ref(x))  # the weights' views are made (and kept) here
            for module in (ref, ours):
                module.weight_hh.data = module.weight_hh.data.t()
            torch.testing.assert_close(ours(x), ref(x), msg="after weight_hh.data = weight_hh.data.t()")
            with torch.no_grad():
                for module in (ref, ours):
                    module.weight_ih.mul_(-0.5)
                    module.bias_hh.add_(0.25)
            torch.testing.assert_close(ours(x), ref(x), msg="after in-place updates")
    ref.double()
    ours.double()
    torch.testing.assert_close(ours(x.double()), ref(x.double()), msg="after .double()")


def test_a_backend_without_its_own_step_runs_its_scan_with_one_step():
    class ScanOnly(Backend):
        name = "scan_only"
        calls = 0

        def scan(self, cell: CellSpec, x_proj, state0, weights, lengths, reverse):
            ScanOnly.calls += 1
            assert x_proj.shape[0] == 1
            return get_backend("torch").scan(cell, x_proj, state0, weights, lengths, reverse)

    seqfast.register_backend(ScanOnly())
    try:
        ref, ours = _pair("gru", 3, 4, torch.float64, "scan_only")
        x = torch.randn(2, 3, dtype=torch.float64)
        want, want_grads = _run(ref, x, None)
        got, got_grads = _run(ours, x, None)
    finally:
        registry.backends.pop("scan_only")
        registry.generation += 1
    assert ScanOnly.calls == 1
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)


@pytest.mark.parametrize("backend", [backend_param("numba"), backend_param("torch")])
def test_recurrent_cell_of_a_staged_cell_matches_its_sequence_module(backend):
    # a cell without one-step kernels (stages) takes the backend's default step: one scan step
    torch.manual_seed(0)
    cell = seqfast.RecurrentCell("gru_reset_before", 3, 4, dtype=torch.float64, backend=backend)
    seq = seqfast.Recurrent("gru_reset_before", 3, 4, dtype=torch.float64, backend="torch")
    seq.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
    x = torch.randn(2, 3, dtype=torch.float64)
    h = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(cell(x, h), seq(x.unsqueeze(0), h.unsqueeze(0))[1][0])


@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "training"])
def test_auto_steps_built_in_cells_on_torch_nns_cell_kernels(requires_grad):
    # the sequence modules' auto takes numba for GRU at every shape; a single step goes to _VF.gru_cell
    for cell in ("gru", "lstm", "rnn_tanh"):
        chosen = seqfast.current_backend(cell, batch_size=1, hidden_size=32, input_size=32, seq_len=1,
                                         requires_grad=requires_grad, level="step")
        assert chosen == "native", cell


def test_cells_call_backend_step_not_the_scan():
    class Stepper(Backend):
        name = "stepper"
        steps = 0

        def scan(self, cell, x_proj, state0, weights, lengths, reverse):
            raise AssertionError("a cell's step ran the scan")

        def step(self, cell, x, state, params, names):
            Stepper.steps += 1
            return get_backend("torch").step(cell, x, state, params, names)

    seqfast.register_backend(Stepper())
    try:
        ref, ours = _pair("lstm", 3, 4, torch.float64, "stepper")
        x = torch.randn(2, 3, dtype=torch.float64)
        torch.testing.assert_close(ours(x), ref(x))
    finally:
        registry.backends.pop("stepper")
        registry.generation += 1
    assert Stepper.steps == 1


@pytest.mark.parametrize("backend", [backend_param("numba")])
def test_numba_trains_a_step_as_one_autograd_node(backend):
    _, ours = _pair("lstm", 3, 4, torch.float32, backend)
    h, c = ours(torch.randn(2, 3))
    assert h.grad_fn is c.grad_fn and type(h.grad_fn).__name__ == "_StepBackward"


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_sequence_modules_match_torch_nn(backend, kind):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(3, 4)
    ours = getattr(seqfast, kind)(3, 4, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 2, 3, requires_grad=True)
    (want, _), (got, _) = ref(x), ours(x)
    torch.testing.assert_close(got, want)
    want_grad = torch.autograd.grad(want.sum(), x)[0]
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], want_grad)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("backend", [backend_param("numba")])
def test_a_one_step_module_call_trains_on_the_step_kernels(backend, kind, layers, monkeypatch):
    # with autograd, each layer-direction of a T=1 call is one step node (step.one_step_inputs for the step
    # runner), not a scan: the outputs and every gradient equal torch.nn's, with and without hx, and h_n is not the
    # output's memory
    from seqfast.backends.numba import step

    ran = []
    real = step.one_step_inputs

    def one_step_inputs(*args):
        found = real(*args)
        ran.append(found is not None)
        return found

    monkeypatch.setattr(step, "one_step_inputs", one_step_inputs)
    torch.manual_seed(0)
    bidirectional = layers > 1
    ref = getattr(torch.nn, kind)(3, 4, num_layers=layers, bidirectional=bidirectional, dtype=torch.float64)
    ours = getattr(seqfast, kind)(3, 4, num_layers=layers, bidirectional=bidirectional, dtype=torch.float64,
                                  backend=backend)
    ours.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 3, generator=gen, dtype=torch.float64)
    count = layers * (2 if bidirectional else 1)
    states = [torch.randn(count, 2, 4, generator=gen, dtype=torch.float64) for _ in range(2 if kind == "LSTM" else 1)]
    for given in (False, True):
        grads = []
        for module in (ref, ours):
            inputs = [x.clone().requires_grad_(), *(s.clone().requires_grad_() for s in states)]
            hx = (tuple(inputs[1:]) if kind == "LSTM" else inputs[1]) if given else None
            out, h_n = module(inputs[0], hx)
            h = h_n[0] if kind == "LSTM" else h_n
            assert h.untyped_storage().data_ptr() != out.untyped_storage().data_ptr()
            loss = (out * out).sum() + (1.5 * h).sin().sum()
            grads.append((out, torch.autograd.grad(loss, [*inputs[:len(inputs) if given else 1],
                                                          *module.parameters()])))
        torch.testing.assert_close(grads[1], grads[0])
    assert ran == [True] * (2 * count)


def test_bench_step_loop_times_the_cells_against_torch_nns():
    from seqfast.bench import TORCH_NN, measure_case

    results = measure_case("gru", ["native", "torch"], (3, 2, 4, 5), "training", repeats=2, min_repeats=1,
                           max_seconds=0.1, seed=0, step_loop=True)
    by_backend = {m.backend: m for m in results}
    assert by_backend[TORCH_NN].ok and by_backend["native"].ok and by_backend["torch"].ok
    assert by_backend["native"].max_abs_diff < 1e-5 and by_backend["torch"].max_abs_diff < 1e-5


def test_a_cells_kept_decision_follows_every_source_of_the_choice(counting, monkeypatch, tmp_path):
    # the backend a cell call runs on is kept per input kind; the choice's sources may change between calls
    ref, ours = _pair("gru", 3, 4, torch.float64, None)
    x = torch.randn(2, 3, dtype=torch.float64)
    walk_the_sources_of_a_gru_choice(ours, lambda: torch.testing.assert_close(ours(x), ref(x)), monkeypatch, tmp_path)


def test_a_cells_kept_decision_follows_a_backend_registered_in_its_place(counting):
    ref, ours = _pair("lstm", 3, 4, torch.float64, "counting")
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))

    class Replacement(CountingBackend):
        calls = 0

    seqfast.register_backend(Replacement("counting"), replace=True)
    torch.testing.assert_close(ours(x), ref(x))
    assert (CountingBackend.calls, Replacement.calls) == (1, 1)


@pytest.mark.parametrize("cell", list(KINDS))
@pytest.mark.parametrize("backend", [backend_param("numba"), backend_param("native"), backend_param("torch"),
                                     pytest.param(None, id="auto")])
def test_a_cell_called_with_changing_batch_dtype_and_grad_matches_torch_nn(backend, cell):
    # each call kind (batch, dtype, device, grad) keeps its own decision; the parameters are read on every call
    ref, ours = _pair(cell, 3, 5, torch.float32, backend)
    gen = torch.Generator().manual_seed(3)
    n_states = 2 if cell == "lstm" else 1
    for dtype, batch in ((torch.float32, 2), (torch.float32, 7), (torch.float32, 2), (torch.float64, 7),
                         (torch.float64, 1), (torch.float32, 2)):
        for module in (ref, ours):
            module.to(dtype)
        x = torch.randn(batch, 3, generator=gen, dtype=dtype)
        hx = tuple(torch.randn(batch, 5, generator=gen, dtype=dtype) for _ in range(n_states))
        with torch.no_grad():
            for w, g in zip(_outputs(ref(x, hx if n_states > 1 else hx[0])),
                            _outputs(ours(x, hx if n_states > 1 else hx[0])), strict=True):
                torch.testing.assert_close(g, w, **TOL[dtype])
        want_out, want_grads = _run(ref, x, hx)
        got_out, got_grads = _run(ours, x, hx)
        torch.testing.assert_close(got_out, want_out, **TOL[dtype])
        torch.testing.assert_close(got_grads, want_grads, **TOL[dtype])
        with torch.no_grad():
            for module in (ref, ours):
                module.weight_hh.mul_(0.9)  # in place, between calls of the same kind


@pytest.mark.parametrize("backend", [backend_param("numba")])
def test_numba_inference_steps_return_states_of_their_own(backend):
    # an inference step reuses its scratch buffer: the states it returns must not alias it or each other
    _, ours = _pair("lstm", 3, 4, torch.float32, backend)
    x = torch.randn(2, 3)
    with torch.no_grad():
        h1, c1 = ours(x)
        kept = h1.clone(), c1.clone()
        h2, c2 = ours(x * 2)
    torch.testing.assert_close((h1, c1), kept)
    pointers = {t.untyped_storage().data_ptr() for t in (h1, c1, h2, c2)}
    assert len(pointers) == 4


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("backend", [backend_param("numba")])
def test_numba_measures_a_large_steps_gemm_once_and_keeps_torch_nns_results(backend, dtype, monkeypatch):
    """Where MKL's own kernel is not its threaded ?gemm_ (a non-Intel CPU), a step from SMALL_TORCH_GEMM
    multiply-adds runs both on its shape's first call and keeps the faster with the shape's plan; the values and
    gradients of every call, the measuring one included, are torch.nn's. Without timing, the threaded one runs."""
    from seqfast.backends.numba import gemm, gemm_choice, step_plan

    layout = step_plan.step_layout(seqfast.get_cell("lstm"), dtype, ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    if layout is None or layout.fn == layout.threaded_fn:
        pytest.skip("MKL's own kernel is its ?gemm_ here (an Intel CPU, or no MKL)")
    monkeypatch.setattr(gemm, "SMALL_TORCH_GEMM", 64)  # a small shape counts as large: a quick test
    monkeypatch.setenv("SEQFAST_CALIBRATE", "1")
    gemm_choice.forget()
    layout.shapes.clear()
    chosen = []
    real_choose = gemm_choice.choose
    monkeypatch.setattr(gemm_choice, "choose",
                        lambda key, ways, run: chosen.append(ways) or real_choose(key, ways, run))
    ref, ours = _pair("lstm", 5, 6, dtype, backend)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        x, hx = torch.randn(3, 5, generator=gen, dtype=dtype), tuple(torch.randn(3, 6, generator=gen, dtype=dtype)
                                                                     for _ in range(2))
        for got, want in zip(_run(ours, x, hx), _run(ref, x, hx), strict=True):
            torch.testing.assert_close(got, want, **TOL[dtype])
    assert chosen == [(layout.threaded_fn, layout.fn)]
    assert layout.shapes[(3, 5, 6)].gemm_fn in chosen[0]
    monkeypatch.setenv("SEQFAST_CALIBRATE", "0")
    gemm_choice.forget()
    layout.shapes.clear()
    _run(ours, x, hx)
    assert len(chosen) == 1 and layout.shapes[(3, 5, 6)].gemm_fn == layout.threaded_fn
