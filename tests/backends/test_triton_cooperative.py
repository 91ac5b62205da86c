"""The cooperative kernels of the `triton` backend (coop_kernels.py): hidden units split across programs, a grid
barrier per step. Under TRITON_INTERPRET=1 the interpreter runs programs one after another, so the sequential mode
(one launch per step, or per phase) proves the slicing and the exchange; the in-kernel barrier is run wherever each
barrier group has one program, and with several programs per group on a GPU (TRITON_INTERPRET=0, the same tests).
Every comparison checks outputs, final states and every gradient against the `torch` reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_triton
import torch
from test_triton import BACKEND, DEVICE, _compare, _inputs

import seqfast
from seqfast.backends.triton import backend as triton_backend
from seqfast.backends.triton import cooperative
from seqfast.backends.triton.codegen import load_kernels
from seqfast.registry import Query, registry

pytestmark = pytest.mark.skipif(BACKEND is None or not BACKEND.available(),
                                reason=str(BACKEND and BACKEND.unavailable_reason()))
GPU = DEVICE == "cuda"
# test_triton.py's autouse fixtures, autouse here too: its test cells registered, float32 dots at fp32 accuracy
_test_cells, _fp32_dots = test_triton._test_cells, test_triton._fp32_dots


@pytest.fixture
def launches(monkeypatch):
    """The cooperative kernels on, and a record of every cooperative launch: (kernel name, STEP0, STEPS, mode)."""
    monkeypatch.setattr(BACKEND, "cooperative", True)
    seen = []
    real = cooperative.launch_cooperative

    def spy(kernel, plan, cell, head, tail, sizes, consts, *, whole, per_step, sequential, interpret):
        class Recorder:
            def __getitem__(self, grid):
                assert grid == (plan.programs,)

                def run(*args, **kwargs):
                    mode = {k: kwargs[k] for k in ("GRID_BARRIER", "PHASE") if k in kwargs}
                    seen.append((kernel.fn.__name__, args[-2], args[-1], mode))
                    return kernel[grid](*args, **kwargs)
                return run

        real(Recorder(), plan, cell, head, tail, sizes, consts, whole=whole, per_step=per_step,
             sequential=sequential, interpret=interpret)

    monkeypatch.setattr(triton_backend, "launch_cooperative", spy)
    return seen


def _plan(cell: str, batch: int, hidden: int, dtype=torch.float32):
    return BACKEND.cooperative_plan(seqfast.get_cell(cell), batch, hidden, dtype)


# (cell, steps, batch, hidden, SMs, reverse, lengths) -> (batch groups, slices of the hidden units, units per slice)
CASES = {
    ("lstm", 4, 3, 33, 4, True, True): (1, 4, 16),  # thin slices, the last one mostly masked
    ("gru", 4, 18, 20, 4, False, True): (2, 2, 16),  # batch split: two barrier groups
    ("rnn_tanh", 5, 3, 40, 2, True, False): (1, 2, 32),
    ("rnn_relu", 4, 3, 5, 8, False, True): (1, 1, 16),  # one slice: nothing to split
    ("peephole_lstm", 4, 3, 20, 2, True, True): (1, 2, 16),  # a plugin cell with per-unit parameters
    ("tt_diag", 4, 3, 33, 4, True, True): (1, 4, 16),  # diagonal and no recurrence: slices exchange nothing
    ("tt_none", 4, 18, 17, 8, False, True): (2, 2, 16),
}


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: "-".join(map(str, c[:5])) + ("-rev" if c[5] else ""))
def test_cooperative_matches_reference(case, launches, monkeypatch):
    cell, steps, batch, hidden, sms, reverse, lengths = case
    if cell not in registry.cells:
        pytest.skip(f"the example plugin cell {cell} is not installed")
    monkeypatch.setattr(BACKEND, "sm_count", sms)
    plan, why = _plan(cell, batch, hidden)
    assert why is None and (plan.groups, plan.slices, plan.block_j) == CASES[case]
    x, state, w, lens = _inputs(cell, steps, batch, hidden, lengths=lengths, seed=4)
    _compare(cell, x, state, w, lens, reverse)
    names = {name for name, *_ in launches}
    assert names == {"coop_forward", "coop_backward"}
    dense = seqfast.get_cell(cell).recurrence == "dense"
    if not GPU and dense:  # sequential mode: a launch per step forward, per phase of each step backward
        assert len(launches) == steps * 3
        assert [mode for name, _, n, mode in launches if name == "coop_backward"][:2] == [{"PHASE": 1},
                                                                                         {"PHASE": 2}]
    else:  # one launch each, walking every step (with the grid barrier where the slices exchange h)
        assert [(step0, n) for _, step0, n, _ in launches] == [(0, steps), (0, steps)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cooperative_half_precision_inputs_fp32_state(dtype, launches, monkeypatch):
    monkeypatch.setattr(BACKEND, "sm_count", 2)
    assert _plan("lstm", 3, 20, dtype)[0].slices == 2
    x, state, w, lens = _inputs("lstm", 4, 3, 20, lengths=True, dtype=dtype)
    _compare("lstm", x, state, w, lens, True, dtype=dtype)
    assert launches


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_in_kernel_barrier_and_time_loop(cell, launches, monkeypatch):
    """The GPU mode (every step in one launch, the grid barrier each step) under the interpreter: one program per
    barrier group, so no program waits for one that has not started; two groups, each with its own word."""
    monkeypatch.setattr(BACKEND, "sm_count", 2)
    monkeypatch.setattr(BACKEND, "sequential", False)
    plan, _ = _plan(cell, 18, 5)
    assert (plan.groups, plan.slices) == (2, 1)
    x, state, w, lens = _inputs(cell, 4, 18, 5, lengths=True, seed=5)
    _compare(cell, x, state, w, lens, True)
    assert [(name, mode) for name, _, _, mode in launches] == [("coop_forward", {"GRID_BARRIER": True}),
                                                               ("coop_backward", {"PHASE": 0})]


_sf_grid_barrier = None  # the generated module's barrier, set by _barrier_kernel (jit code calls globals)


def _barrier_kernel():
    import triton
    import triton.language as tl

    global _sf_grid_barrier
    _sf_grid_barrier = load_kernels(seqfast.get_cell("lstm"))._sf_grid_barrier

    @triton.jit
    def rounds(BAR, SLOTS, ERR, ROUNDS, N: tl.constexpr):
        # each round every program publishes the round number, meets the others, then reads every program's
        # slot: all must show this round already (two slot rows, so a round never overwrites what the last reads)
        pid = tl.program_id(0)
        for r in range(ROUNDS):
            tl.store(SLOTS + (r % 2) * N + pid, r + 1)
            _sf_grid_barrier(BAR, N)
            seen = tl.load(SLOTS + (r % 2) * N + tl.arange(0, N), cache_modifier=".cg")
            tl.atomic_add(ERR, tl.sum((seen < r + 1).to(tl.int32)))

    return rounds


def test_grid_barrier_flips_bit_31_once_per_round():
    """The barrier alone: each round moves the word by exactly 2^31 (no reset), and no program passes it before
    every program's store is visible. On a GPU with 8 resident programs; the interpreter runs one."""
    programs = 8 if GPU else 1
    kernel = _barrier_kernel()
    bar = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    err = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    launch = {"launch_cooperative_grid": True} if GPU else {}
    for rounds, word in ((3, -2 ** 31), (1, 0), (1000, 0)):  # bit 31 flips each round; the rest stays 0
        slots = torch.zeros(2, programs, dtype=torch.int32, device=DEVICE)
        kernel[(programs,)](bar, slots, err, rounds, N=programs, **launch)
        assert bar.item() == word and err.item() == 0, (rounds, bar.item(), err.item())


# --- the co-residency guard: the usual path where the grid cannot be resident ---------------------------------
@pytest.mark.parametrize("limit", ["sms", "shared_memory", "staged"])
def test_guard_falls_back_to_the_usual_path(limit, launches, monkeypatch):
    cell, batch = ("gru_reset_before" if limit == "staged" else "lstm"), 3
    if limit == "sms":  # three batch groups of 16 rows cannot share one SM
        monkeypatch.setattr(BACKEND, "sm_count", 1)
        batch, match = 40, "3 batch groups of 16 rows exceed the 1 SMs"
    elif limit == "shared_memory":
        monkeypatch.setattr(BACKEND, "on_chip_bytes", 20 * 1024)  # 4 KiB after the margin
        match = "KiB of shared memory"
    else:
        match = "staged cell"
    plan, why = _plan(cell, batch, 5)
    assert plan is None and match in why
    assert "cooperative kernels declined" in BACKEND.path_for(Query(seqfast.get_cell(cell), device="cuda",
                                                                     hidden_size=5, batch_size=batch))
    x, state, w, lens = _inputs(cell, 3, batch, 5, lengths=True)
    _compare(cell, x, state, w, lens, True)
    assert launches == []


def test_off_by_default_and_the_setting_turns_it_on(monkeypatch):
    lstm = seqfast.get_cell("lstm")
    assert BACKEND.cooperative_plan(lstm, 16, 256, torch.float32) == (None, None)
    assert "cooperative" not in BACKEND.path_for(Query(lstm, device="cuda", hidden_size=256, batch_size=16))
    monkeypatch.setenv("SEQFAST_TRITON_COOPERATIVE", "1")
    monkeypatch.setattr(BACKEND, "sm_count", 132)  # an H100's
    assert BACKEND.path_for(Query(lstm, device="cuda", hidden_size=256, batch_size=64)) == (
        "cooperative: 4 batch group(s) x 16 slice(s) of 16 units = 64 programs (<= 132 SMs), 64 KiB of W_hh on chip "
        "per program, 16 batch rows/program, a grid barrier per step")
    # fp32 LSTM at H = 512: 16 units x 4 gates x 512 of W_hh is 128 KiB per program, with the operand blocks over
    # an H100's 227 KiB less the margin
    assert "KiB available" in BACKEND.cooperative_plan(lstm, 16, 512, torch.float32)[1]
    assert BACKEND.cooperative_plan(lstm, 16, 512, torch.bfloat16)[0].slices == 32
    with pytest.raises(ValueError, match="sm_count must be >= 1, got 0"):
        cooperative.plan_cooperative(lstm, 16, 64, torch.float32, sm_count=0, budget=1 << 20)


def test_seqfast_info_shows_the_cooperative_path(monkeypatch):
    from seqfast.cli import collect_info

    monkeypatch.setenv("SEQFAST_TRITON_COOPERATIVE", "1")
    monkeypatch.setattr(BACKEND, "sm_count", 132)
    paths = collect_info()["cells"]["lstm"]["backends"]["triton"]
    dev = "cuda" if GPU else "cpu"
    # info asks for hidden 128 without a batch size: one batch group, 8 slices of 16 units
    assert paths[dev]["path"].startswith("cooperative: 1 batch group(s) x 8 slice(s) of 16 units = 8 programs")


# --- the real kernels, compiled for sm_90 without a GPU ---------------------------------------------------------
def test_cooperative_kernels_compile_for_sm90():
    """coop_forward / coop_backward in their GPU mode through Triton's whole pipeline: they build, the grid barrier
    is there as a release add and acquire loads, and one program fits an SM (shared memory and registers), which
    the co-residency guard assumes."""
    pytest.importorskip("triton.backends.nvidia")
    configs = ["lstm:256:float32", "gru:128:bfloat16", "rnn_tanh:512:float16"]
    configs += [c for c in ["peephole_lstm:64:float32"] if c.split(":")[0] in registry.cells]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(seqfast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "seqfast.backends.triton.aot", "--cooperative", "16", *configs],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = {r["config"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert report["lstm:256:float32"]["path"].startswith("cooperative: 1 batch group(s) x 16 slice(s) of 16 units")
    for config in configs:
        kernels = report[config]["kernels"]
        assert set(kernels) == {"coop_forward", "coop_backward"}
        for name, usage in kernels.items():
            assert usage["grid_barrier"], (config, name)
            assert usage["shared_bytes"] <= 227 * 1024, (config, name, usage)
            assert usage.get("spill_bytes", 0) == 0, (config, name, usage)
            if "registers" in usage:  # one resident program per SM: 64K 32-bit registers
                assert usage["registers"] * usage["threads"] <= 65536, (config, name, usage)
