"""`seqfast bench`: time backends against torch.nn on the same weights and inputs.

For every chosen cell x shape x mode, torch.nn's module (for cells that have one) and one seqfast.Recurrent per
backend are built with torch.nn's state_dict, then timed interleaved (round-robin, so drifting machine load hits
every candidate alike) and summarised by medians. A sample of a call shorter than BURST_BELOW_S (the faster of two
warm calls) is the median of a burst of calls in a row, its first call not counted (it pays for what the candidate
before left: threads to wake).
inference = forward under torch.no_grad(); training = forward + backward of output.sum(). With --step-loop the
cells are timed instead: torch.nn's cell (LSTMCell, ...) against one seqfast.RecurrentCell per backend, stepped T
times in a Python loop (hx=None first), the sum of every step's output as the result. Backends and cells come
from the registry, so new and plugin ones appear by themselves; a combination the registry turns down is listed
with its reasons instead of being run.

For inference, ONNX Runtime (what RNNs are commonly deployed with on CPU) is one more column: torch.nn's module
exported with torch.onnx.export, run by onnxruntime.InferenceSession at torch's thread count with its defaults
(threads spinning between runs, as deployed), and checked against torch.nn's output before it is timed. Its spinning
threads would slow whatever ran meanwhile, so its session is open only while it takes a sample (its place in each
round drawn as the others'). Without onnxruntime (or the exporter's packages) the column says why.

rich and matplotlib are imported only when the command runs: `seqfast info` imports this module too.
Size: one command: its options, the interleaved timing, and the report of a run (table, JSON, plot).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import calibration
from ._version import __version__
from .functional import BackendNotSupportedError, current_backend, explain
from .nn import Recurrent, RecurrentCell
from .registry import registry

__all__ = ["GRIDS", "MODES", "ONNXRUNTIME", "TORCH_NN", "add_arguments", "run", "main", "parse_shapes"]

TORCH_NN = "torch.nn"
ONNXRUNTIME = "onnxruntime"
ONNX_ATOL = 1e-5  # ONNX Runtime's output must match torch.nn's this closely before it is timed
# A candidate whose warm call takes less than this is sampled in bursts of BURST_CALLS calls in a row (_sample)
BURST_BELOW_S = 0.005
BURST_CALLS = 4
MODES = ("inference", "training")
Shape = tuple[int, int, int, int]  # (T, B, I, H): steps, batch, input size, hidden size

GRIDS: dict[str, list[Shape]] = {
    "tiny": [(6, 2, 4, 4), (4, 1, 3, 5)],  # for tests: seconds, not minutes
    "small": [(100, 1, 32, 32), (100, 8, 64, 64), (200, 32, 128, 128)],
    # the numba issue's grid
    "full": [(100, 1, 32, 32), (100, 8, 64, 64), (200, 32, 128, 128), (100, 64, 256, 256), (50, 64, 512, 512)],
    # latency: a few rows, large layers (where numba may split the hidden units over its threads)
    "small-batch": [(100, 1, 128, 128), (100, 1, 256, 256), (100, 1, 512, 512), (100, 4, 256, 256)],
    # one step a call: a decoder stepping a module (with --step-loop, one cell step)
    "one-step": [(1, 1, 32, 32), (1, 1, 256, 256), (1, 1, 512, 512), (1, 8, 256, 256)],
}


def parse_shapes(text: str) -> list[Shape]:
    """'T,B,I,H;T,B,I,H' -> [(T, B, I, H), ...]."""
    shapes = []
    for part in text.replace(" ", "").split(";"):
        if not part:
            continue
        values = part.lower().replace("x", ",").split(",")
        if len(values) != 4 or not all(v.isdigit() and int(v) > 0 for v in values):
            raise argparse.ArgumentTypeError(f"--shapes: expected 'T,B,I,H' with positive ints, got {part!r}")
        shapes.append(tuple(int(v) for v in values))
    if not shapes:
        raise argparse.ArgumentTypeError("--shapes: no shape given")
    return shapes


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _grid(text: str) -> str:
    if text not in GRIDS:
        raise argparse.ArgumentTypeError(f"expected small, full, small-batch or one-step, got {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `seqfast bench` (the CLI's subparser, or a standalone parser in `main`)."""
    parser.add_argument("--cells", type=_csv, default=None, metavar="A,B",
                        help="cells to time (default: every registered cell)")
    parser.add_argument("--backends", type=_csv, default=None, metavar="A,B",
                        help="seqfast backends to time against torch.nn (default: every registered backend); "
                             "`auto` times the default choice, its selection included")
    parser.add_argument("--modes", type=_csv, default=list(MODES), metavar="M,M",
                        help="inference (forward under no_grad) and/or training (forward + backward); default both")
    # "tiny" is for tests and is left out of the help on purpose
    parser.add_argument("--grid", type=_grid, default="small", metavar="{small,full,small-batch,one-step}",
                        help="shapes (T,B,I,H): small (default, a minute or two), full (the numba issue's grid), "
                             "small-batch (B1-B4, H128-512: latency) or one-step (T1: a decoder's calls)")
    parser.add_argument("--shapes", type=parse_shapes, default=None, metavar="'T,B,I,H;...'",
                        help="explicit shapes instead of --grid")
    parser.add_argument("--repeats", type=int, default=10, metavar="N",
                        help="timed calls per candidate (default 10; slow candidates get fewer, see --max-seconds)")
    parser.add_argument("--max-seconds", type=float, default=0.5, metavar="S",
                        help="time cap per candidate and case: a slow candidate (the torch reference loop) gets "
                             "as few as --min-repeats calls instead of --repeats (default 0.5)")
    parser.add_argument("--min-repeats", type=int, default=3, metavar="N", help="(default 3)")
    parser.add_argument("--step-loop", action="store_true",
                        help="time the cells (torch.nn's LSTMCell, ... against seqfast's), stepped T times in a "
                             "Python loop, instead of the sequence modules")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="the modules' and inputs' dtype (default float32; ONNX Runtime is timed in float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="write the results as JSON to FILE (or stdout with --json alone or --json -)")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="speed-up vs torch.nn per shape, a PNG")
    parser.add_argument("--no-onnxruntime", action="store_true",
                        help="leave out the ONNX Runtime column (it is timed for inference when installed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# --- measurement --------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    """One (cell, backend, shape, mode): a median time, or why there is none."""

    cell: str
    backend: str
    mode: str
    shape: Shape
    median_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    first_call_s: float | None = None
    speedup: float | None = None  # torch.nn median / this median; > 1 is faster than torch.nn
    vs_onnxruntime: float | None = None  # ONNX Runtime median / this median; > 1 is faster than ONNX Runtime
    max_abs_diff: float | None = None  # of the output, against torch.nn's (or the first backend's) output
    reason: str | None = None  # not run: the registry's reasons
    error: str | None = None  # ran and raised

    @property
    def ok(self) -> bool:
        return self.median_s is not None


def torch_nn_module(cell: str, input_size: int, hidden_size: int) -> torch.nn.Module | None:
    """torch.nn's own module for a cell with a fused torch.nn kernel (CellSpec.native_mode), else None."""
    return _torch_nn(cell, input_size, hidden_size, step=False)


def torch_nn_cell(cell: str, input_size: int, hidden_size: int) -> torch.nn.Module | None:
    """torch.nn's own cell (LSTMCell, GRUCell, RNNCell) for a cell with a fused torch.nn kernel, else None."""
    return _torch_nn(cell, input_size, hidden_size, step=True)


# CellSpec.native_mode -> torch.nn's class name (+ "Cell" for the one-step class) and its options
_TORCH_NN = {"LSTM": ("LSTM", {}), "GRU": ("GRU", {}), "RNN_TANH": ("RNN", {"nonlinearity": "tanh"}),
             "RNN_RELU": ("RNN", {"nonlinearity": "relu"})}


def _torch_nn(cell: str, input_size: int, hidden_size: int, step: bool) -> torch.nn.Module | None:
    known = _TORCH_NN.get(registry.get_cell(cell).native_mode)
    if known is None:
        return None
    name, options = known
    return getattr(torch.nn, name + ("Cell" if step else ""))(input_size, hidden_size, **options)


def _step_loop(cell: torch.nn.Module) -> torch.nn.Module:
    """A module running `cell` over x [T, B, I] one step at a time; its output: every step's first state."""

    class StepLoop(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = cell

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            state, outputs = None, []
            for x_t in x:
                state = self.cell(x_t, state)
                outputs.append(state[0] if isinstance(state, tuple) else state)
            return (torch.stack(outputs),)

    return StepLoop()


def _step_fn(model: torch.nn.Module, x: torch.Tensor, training: bool) -> Callable[[], torch.Tensor]:
    params = list(model.parameters())
    model.train(training)
    model.requires_grad_(training)

    def inference() -> torch.Tensor:
        with torch.no_grad():
            return model(x)[0]

    def train() -> torch.Tensor:
        for p in params:
            p.grad = None  # no accumulation: every call does the same work
        out = model(x)[0]
        out.sum().backward()
        return out

    return train if training else inference


class OnnxUnavailable(Exception):
    """ONNX Runtime cannot be timed here; the message is the reason shown in the report."""


def _export_onnx(model: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    """torch.onnx.export: the TorchScript exporter first (it emits ONNX's fused LSTM/GRU/RNN ops, as deployed
    models have them, and needs no extra package); the dynamo exporter (needs onnxscript) where it is gone."""
    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes
                options = {"dynamo": dynamo, "verbose": False} if dynamo else {"dynamo": False}
                torch.onnx.export(model, (x,), path, input_names=["input"], **options)
            return
        except ImportError as exc:
            errors.append(f"{'dynamo' if dynamo else 'TorchScript'} exporter needs {exc.name or exc} "
                          "(pip install onnx onnxscript)")
        except Exception as exc:  # the exporter's own failure: reported as the reason, with both attempts
            errors.append(f"{'dynamo' if dynamo else 'TorchScript'} exporter: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}")
    raise OnnxUnavailable("torch.onnx.export failed: " + "; ".join(errors))


class OnnxRuntimeRun:
    """Inference of an exported torch.nn model by ONNX Runtime: calling it runs the session on its input.

    The session has ONNX Runtime's defaults, as deployed, at torch's thread count: its threads spin between runs,
    which keeps a run's second thread ready at small shapes, and which takes the cores from anything else running
    meanwhile. So measure_case opens its session only while it takes a sample (_sample_apart): close() ends the
    session and its threads, open() makes it anew."""

    def __init__(self, path: str, x: torch.Tensor) -> None:
        import onnxruntime

        with open(path, "rb") as f:
            self._model = f.read()
        self._runtime, self._x = onnxruntime, x.numpy()
        self.session = None
        self.open()

    def open(self) -> None:
        options = self._runtime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = self._runtime.InferenceSession(self._model, options, providers=["CPUExecutionProvider"])
        self._feed = {self.session.get_inputs()[0].name: self._x}
        self._output = self.session.get_outputs()[0].name

    def close(self) -> None:
        self.session = None

    def __call__(self) -> torch.Tensor:
        if self.session is None:
            raise RuntimeError("the ONNX Runtime session is closed: open() it before running it")
        return torch.from_numpy(self.session.run([self._output], self._feed)[0])


def onnxruntime_step_fn(model: torch.nn.Module, x: torch.Tensor) -> OnnxRuntimeRun:
    """Inference of torch.nn's `model` on `x` by ONNX Runtime at torch's thread count, checked against torch.nn,
    returned with its session closed (open() it to run it).

    Raises OnnxUnavailable (the reason) when onnxruntime is not installed or the export fails, and
    AssertionError when ONNX Runtime's output differs from torch.nn's by more than ONNX_ATOL.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise OnnxUnavailable(f"onnxruntime is not installed (pip install onnxruntime onnx onnxscript): {exc}") from exc
    model = model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        _export_onnx(model, x, path)
        inference = OnnxRuntimeRun(path, x)
    with torch.no_grad():
        expected = model(x)[0]
    try:
        diff = float((inference() - expected).abs().max())
    finally:
        inference.close()  # opened again only while timed (measure_case)
    if not diff <= ONNX_ATOL:
        raise AssertionError(f"ONNX Runtime's output differs from {TORCH_NN}'s by {diff:.2e} (> {ONNX_ATOL:g})")
    return inference


def _sample_apart(fn: OnnxRuntimeRun, burst: int) -> float:
    """A sample of ONNX Runtime with its session open only meanwhile (its spinning threads end with it), after one
    untimed call that makes its threads and buffers."""
    fn.open()
    try:
        fn()
        return _sample(fn, burst)
    finally:
        fn.close()


def _sample(fn: Callable[[], Any], burst: int) -> float:
    """One sample of fn: a call's time, or with burst > 1 the median over calls 2..burst of that many in a row.
    The first call of a burst takes what the candidate before left (threads to wake, cores still taken by another
    library's spinning threads, caches to refill) and is not counted: the sample is a call in steady use, as in a
    program that calls the model again and again."""
    if burst == 1:
        return _timed(fn)[0]
    times = [_timed(fn)[0] for _ in range(burst)]
    return statistics.median(times[1:])


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _query_fields(shape: Shape, training: bool, step_loop: bool = False,
                  dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    steps, batch, inputs, hidden = shape
    return {"dtype": dtype, "hidden_size": hidden, "input_size": inputs, "batch_size": batch,
            "seq_len": 1 if step_loop else steps, "requires_grad": training,
            "level": "step" if step_loop else "module"}


def auto_choice(cell: str, shape: Shape, training: bool, step_loop: bool = False,
                dtype: torch.dtype = torch.float32) -> str:
    """What a module (or with step_loop a cell) with backend=None would run on this input: every source of choice
    in force, then auto."""
    try:
        return current_backend(cell, "cpu", **_query_fields(shape, training, step_loop, dtype))
    except (BackendNotSupportedError, ValueError) as exc:
        return "error: " + str(exc).splitlines()[0]


def measure_case(cell: str, backends: Sequence[str], shape: Shape, mode: str, *, repeats: int, min_repeats: int,
                 max_seconds: float, seed: int, on_step: Callable[[str], None] | None = None,
                 step_loop: bool = False, onnx: bool = True, dtype: torch.dtype = torch.float32
                 ) -> list[Measurement]:
    """Time torch.nn, ONNX Runtime (if `onnx`, inference of the sequence modules) and every backend on one (cell,
    shape, mode); interleaved rounds, medians. step_loop: the cells, stepped T times in a Python loop, instead of
    the sequence modules."""
    training = mode == "training"
    steps, batch, inputs, hidden = shape
    reasons = explain(cell, device="cpu", **_query_fields(shape, training, step_loop, dtype))
    torch.manual_seed(seed)
    reference = (torch_nn_cell if step_loop else torch_nn_module)(cell, inputs, hidden)
    if reference is not None:
        reference = reference.to(dtype)
    state = reference.state_dict() if reference is not None else None
    x = torch.randn(steps, batch, inputs, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)

    results: list[Measurement] = []
    candidates: list[tuple[Measurement, Callable[[], torch.Tensor]]] = []
    if reference is None:
        results.append(Measurement(cell, TORCH_NN, mode, shape, reason=f"torch.nn has no module for cell {cell!r}"))
    else:
        m = Measurement(cell, TORCH_NN, mode, shape)
        results.append(m)
        candidates.append((m, _step_fn(_step_loop(reference) if step_loop else reference, x, training)))
    if onnx and not step_loop:
        m = Measurement(cell, ONNXRUNTIME, mode, shape)
        results.append(m)
        if training:
            m.reason = "ONNX Runtime is timed for inference only"
        elif dtype != torch.float32:
            m.reason = "ONNX Runtime is timed in float32 only"
        elif reference is None:
            m.reason = f"nothing to export: torch.nn has no module for cell {cell!r}"
        else:
            if on_step:
                on_step(f"{ONNXRUNTIME} export")
            try:
                # a copy: the export must not touch the module torch.nn is timed with
                candidates.append((m, onnxruntime_step_fn(copy.deepcopy(reference), x)))
            except OnnxUnavailable as exc:
                m.reason = str(exc)
            except Exception as exc:  # a wrong result or an ONNX Runtime failure: an error in the report
                m.error = f"{type(exc).__name__}: {exc}"
    for name in backends:
        m = Measurement(cell, name, mode, shape)
        results.append(m)
        why = reasons.get(name)
        if why:
            m.reason = "; ".join(why)
            continue
        torch.manual_seed(seed)
        try:
            model = (RecurrentCell if step_loop else Recurrent)(cell, inputs, hidden, backend=name, dtype=dtype)
            if state is None:  # a cell without torch.nn: every backend shares the first backend's weights
                state = model.state_dict()
            model.load_state_dict(state)
        except Exception as exc:  # reported in the table, the JSON and the exit code
            m.error = f"{type(exc).__name__}: {exc}"
            continue
        candidates.append((m, _step_fn(_step_loop(model) if step_loop else model, x, training)))

    # first call (JIT compile, autotune) and two warm calls; a backend that fails here is reported, not fatal
    baseline_out = None
    live: list[tuple[Measurement, Callable[[], torch.Tensor], int, int]] = []
    for m, fn in candidates:
        if on_step:
            on_step(m.backend)
        apart = isinstance(fn, OnnxRuntimeRun)
        try:
            if apart:
                fn.open()
            m.first_call_s, out = _timed(fn)
            # the faster of two warm calls: the second call of a shape may still bind or load what it runs
            warm_s = min(_timed(fn)[0], _timed(fn)[0])
        except BackendNotSupportedError as exc:
            m.reason = str(exc)
            continue
        except Exception as exc:  # shown in the table, the JSON and the exit code; never swallowed
            m.error = f"{type(exc).__name__}: {exc}"
            continue
        finally:
            if apart:
                fn.close()
        out = out.detach()
        if baseline_out is None:
            baseline_out = out
        else:
            m.max_abs_diff = float((out - baseline_out).abs().max())
        burst = 1 if warm_s >= BURST_BELOW_S else BURST_CALLS
        count = max(min_repeats, min(repeats, int(max_seconds / max(warm_s * burst, 1e-9))))
        if warm_s * count > 4 * max_seconds:  # calls of seconds (a loaded machine): fewer than --min-repeats
            count = max(1, int(4 * max_seconds / warm_s))
        live.append((m, fn, count, burst))

    rounds = max((count for _, _, count, _ in live), default=0)
    if on_step and live:
        on_step(f"timing {len(live)} interleaved")
    order = random.Random(seed)
    for r in range(rounds):
        # a new order each round: what runs just before a call (an OpenMP team left spinning, a cache another
        # candidate filled) slows or speeds it, so no candidate may always follow the same one
        shuffled = live[:]
        order.shuffle(shuffled)
        for m, fn, count, burst in shuffled:
            if r < count:
                m.times_s.append(_sample_apart(fn, burst) if isinstance(fn, OnnxRuntimeRun) else _sample(fn, burst))
    for m, _, _, _ in live:
        m.median_s = statistics.median(m.times_s)
    base = results[0].median_s if results[0].backend == TORCH_NN else None
    onnx_base = next((m.median_s for m in results if m.backend == ONNXRUNTIME), None)
    for m in results:
        if base and m.median_s:
            m.speedup = base / m.median_s
        if onnx_base and m.median_s:
            m.vs_onnxruntime = onnx_base / m.median_s
    return results


def _warm_threads(seconds: float = 0.3) -> None:
    """Spin up torch's thread pool before the first measurement, so it is not charged to the first case."""
    model = torch.nn.LSTM(16, 16)
    x = torch.randn(20, 4, 16)
    end = time.perf_counter() + seconds
    with torch.no_grad():
        while time.perf_counter() < end:
            model(x)


# --- reporting ----------------------------------------------------------------------------------------------
def shape_label(shape: Shape) -> str:
    return "T{} B{} I{} H{}".format(*shape)


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def environment() -> dict[str, Any]:
    """What the numbers depend on: versions, threads, CPU."""
    env = {k: v for k, v in os.environ.items()
           if k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
           or k.startswith("SEQFAST_BACKEND")}
    return {
        "seqfast": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": calibration.cpu_model(),
        "cpu_count": os.cpu_count(),
        "numba": calibration.package_version("numba"),
        "onnxruntime": calibration.package_version("onnxruntime"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "environment": env,
    }


def build_report(args: argparse.Namespace, results: list[Measurement], auto: list[dict], shapes: list[Shape],
                 wall_s: float) -> dict[str, Any]:
    rows = []
    for m in results:
        row = asdict(m)
        row["shape"] = dict(zip("TBIH", m.shape, strict=True))
        rows.append(row)
    return {
        "schema": "seqfast-bench/1",
        "env": environment(),
        "settings": {"cells": args.cells, "backends": args.backends, "modes": args.modes, "grid": args.grid,
                     "shapes": [list(s) for s in shapes], "repeats": args.repeats, "min_repeats": args.min_repeats,
                     "max_seconds": args.max_seconds, "seed": args.seed,
                     "step_loop": getattr(args, "step_loop", False), "onnxruntime": not args.no_onnxruntime,
                     "dtype": getattr(args, "dtype", "float32"),
                     "burst_below_s": BURST_BELOW_S, "burst_calls": BURST_CALLS},
        "results": rows,
        "auto": auto,
        "wall_seconds": round(wall_s, 3),
    }


def print_report(console: Any, report: dict[str, Any], results: list[Measurement], backends: list[str]) -> None:
    from rich.table import Table

    names = [*_baselines(results), *backends]
    by_key = {(m.cell, m.mode, m.shape, m.backend): m for m in results}
    auto = {(a["cell"], a["mode"], tuple(a["shape"])): a["backend"] for a in report["auto"]}
    table = Table(title="median time per call (speed-up vs torch.nn: ×>1 is faster)", title_justify="left")
    for col in ("cell", "mode", "T,B,I,H", "auto"):
        table.add_column(col, no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    cases = list(dict.fromkeys((m.cell, m.mode, m.shape) for m in results))
    for cell, mode, shape in cases:
        row = [cell, mode, ",".join(map(str, shape)), auto.get((cell, mode, shape), "?")]
        timed = [by_key[(cell, mode, shape, n)] for n in names if by_key[(cell, mode, shape, n)].ok]
        best = min((m.median_s for m in timed), default=None)
        for name in names:
            m = by_key[(cell, mode, shape, name)]
            if m.ok:
                text = _fmt_time(m.median_s)
                if m.speedup is not None and name != TORCH_NN:
                    text += f" ×{m.speedup:.2f}"
                if m.median_s == best and len(timed) > 1:
                    text = f"[bold green]{text}[/]"
            elif m.error:
                text = "[red]error[/]"
            else:
                text = "[dim]-[/]"
            row.append(text)
        table.add_row(*row)
    console.print(table)
    _print_onnx_summary(console, results, backends)

    # not run: one line per backend and reason, naming the cells (and modes, shapes) it applies to
    groups: dict[tuple[str, str], dict[str, set[tuple[str, Shape]]]] = {}
    for m in results:
        if not m.ok:
            why = f"ERROR {m.error}" if m.error else (m.reason or "?")
            groups.setdefault((m.backend, why), {}).setdefault(m.cell, set()).add((m.mode, m.shape))
    if groups:
        console.print("\n[bold]not run[/] (the registry's reasons; errors in full in --json):")
        every = {(mode, tuple(s)) for mode in report["settings"]["modes"] for s in report["settings"]["shapes"]}
        for (backend, why), per_cell in groups.items():
            by_scope: dict[frozenset, list[str]] = {}
            for cell, where in per_cell.items():
                by_scope.setdefault(frozenset(where), []).append(cell)
            style = "red" if why.startswith("ERROR") else "dim"
            for where, cells in by_scope.items():
                scope = "" if where == every else " (" + _describe_scope(where, every) + ")"
                console.print(f"  {backend} × {', '.join(cells)}{scope}: [{style}]{why.splitlines()[0][:300]}[/]",
                              highlight=False)
    noisy = [m for m in results if m.ok and len(m.times_s) >= 3 and m.median_s > 2 * min(m.times_s)]
    if noisy:
        console.print(f"[yellow]warning:[/] {len(noisy)} timings are unstable (median > 2x the fastest call), e.g. "
                      f"{noisy[0].backend} × {noisy[0].cell} {shape_label(noisy[0].shape)} ({noisy[0].mode}): "
                      "the machine is busy, or OpenMP threads spin-wait against each other "
                      "(try OMP_WAIT_POLICY=passive, or OMP_NUM_THREADS=1)", highlight=False)
    diffs = [m for m in results if m.max_abs_diff is not None and m.max_abs_diff > 1e-3]
    for m in diffs:
        console.print(f"[yellow]warning:[/] {m.backend} × {m.cell} {shape_label(m.shape)} ({m.mode}): output differs "
                      f"from {TORCH_NN} by {m.max_abs_diff:.2e}", highlight=False)


def _baselines(results: list[Measurement]) -> list[str]:
    """torch.nn, and ONNX Runtime when its column was asked for."""
    return [TORCH_NN, *([ONNXRUNTIME] if any(m.backend == ONNXRUNTIME for m in results) else [])]


def _print_onnx_summary(console: Any, results: list[Measurement], backends: list[str]) -> None:
    """Per backend, its slowest and fastest case against ONNX Runtime (inference)."""
    for name in backends:
        ratios = [m for m in results if m.backend == name and m.vs_onnxruntime is not None]
        if ratios:
            low = min(ratios, key=lambda m: m.vs_onnxruntime)
            high = max(ratios, key=lambda m: m.vs_onnxruntime)
            console.print(f"{name} vs {ONNXRUNTIME} (×>1 is faster): ×{low.vs_onnxruntime:.3g} "
                          f"({low.cell} {shape_label(low.shape)}) to ×{high.vs_onnxruntime:.3g} "
                          f"({high.cell} {shape_label(high.shape)})", highlight=False)


def _describe_scope(where: frozenset, every: set) -> str:
    modes = sorted({mode for mode, _ in where})
    shapes = sorted({shape for _, shape in where})
    if len(where) == len(modes) * len(shapes):  # a full product: say it compactly
        all_shapes = {shape for _, shape in every}
        text = "/".join(modes)
        return text + ("" if set(shapes) == all_shapes else ", " + ", ".join(shape_label(s) for s in shapes))
    return ", ".join(f"{mode} {shape_label(shape)}" for mode, shape in sorted(where))


def plot_report(results: list[Measurement], backends: list[str], shapes: list[Shape], path: str) -> None:
    """Speed-up vs torch.nn per shape, one line per backend; one panel per (mode, cell with a torch.nn module)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    has_base = {m.cell for m in results if m.backend == TORCH_NN and m.ok}
    modes = list(dict.fromkeys(m.mode for m in results))
    cells = [c for c in dict.fromkeys(m.cell for m in results) if c in has_base]
    without = [c for c in dict.fromkeys(m.cell for m in results) if c not in has_base]
    fig, axes = plt.subplots(max(len(modes), 1), max(len(cells), 1), squeeze=False, sharex=True,
                             figsize=(3.4 * max(len(cells), 1) + 0.8, 2.9 * max(len(modes), 1) + 1.0))
    labels = [shape_label(s).replace(" ", "\n", 1) for s in shapes]
    by_key = {(m.mode, m.cell, m.backend, m.shape): m for m in results}
    colors = {name: f"C{i}" for i, name in enumerate(backends)}  # a backend keeps its colour in every panel
    for i, mode in enumerate(modes):
        for j, cell in enumerate(cells):
            ax = axes[i][j]
            ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label=f"{TORCH_NN} (1×)")
            for name in backends:
                ys = [getattr(by_key.get((mode, cell, name, s)), "speedup", None) for s in shapes]
                if any(y is not None for y in ys):
                    ax.plot(range(len(shapes)), [math.nan if y is None else y for y in ys], marker="o",
                            color=colors[name], label=name)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
            ax.set_title(f"{cell}, {mode}", fontsize=10)
            ax.set_xticks(range(len(shapes)), labels, fontsize=7)
            ax.set_xlim(-0.3, len(shapes) - 0.7)
            ax.grid(True, alpha=0.3)
            if j == 0:
                ax.set_ylabel("speed-up vs torch.nn")
    if not cells:
        axes[0][0].text(0.5, 0.5, "no cell with a torch.nn module was timed", ha="center", va="center",
                        transform=axes[0][0].transAxes, color="gray")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper left", ncol=len(handles), frameon=False,
                   fontsize=9)
    note = f"seqfast {__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; medians"
    if without:
        note += f"; no torch.nn baseline (see the table): {', '.join(without)}"
    fig.text(0.99, 0.005, note, ha="right", va="bottom", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the command --------------------------------------------------------------------------------------------
def _check_names(kind: str, wanted: list[str] | None, known: list[str]) -> list[str]:
    if wanted is None:
        return known
    allowed = [*known, "auto"] if kind == "backends" else known  # auto: timed where asked for
    unknown = [w for w in wanted if w not in allowed]
    if unknown:
        raise ValueError(f"unknown {kind} {unknown}; registered {kind}: {known}")
    return list(dict.fromkeys(wanted))


def run(args: argparse.Namespace) -> int:
    """Run `seqfast bench` with parsed arguments; returns the exit code (1 if a backend raised while timed)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    to_stdout = args.json == "-"
    # with JSON on stdout, everything for people goes to stderr so the JSON stays parseable
    console = Console(stderr=to_stdout, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs and pipes: a wide table beats a truncated one
    try:
        cells = _check_names("cells", args.cells, list(registry.cells))
        backends = _check_names("backends", args.backends, list(registry.backends))
        modes = _check_names("modes", args.modes, list(MODES))
    except ValueError as exc:
        console.print(f"[red]seqfast bench:[/] {exc}", highlight=False)
        return 2
    if args.repeats < 1 or args.min_repeats < 1 or args.max_seconds <= 0:
        console.print("[red]seqfast bench:[/] --repeats and --min-repeats must be >= 1, --max-seconds > 0")
        return 2
    shapes = args.shapes or GRIDS[args.grid]
    args.step_loop = getattr(args, "step_loop", False)  # a Namespace built by hand may lack it
    args.dtype = getattr(args, "dtype", "float32")
    dtype = DTYPES[args.dtype]
    args.cells, args.backends, args.modes = cells, backends, modes

    env = environment()
    extra = "".join(f", {k}={v}" for k, v in env["environment"].items())
    console.print(f"[bold]seqfast bench[/] — seqfast {env['seqfast']}, torch {env['torch']}, python {env['python']}",
                  highlight=False)
    console.print(f"{env['cpu_model']} ({env['processor']}), {env['cpu_count']} CPUs; torch threads: "
                  f"{env['torch_threads']} (interop {env['torch_interop_threads']}, torch defaults{extra})",
                  highlight=False)
    versus = TORCH_NN if args.no_onnxruntime else f"{TORCH_NN} and {ONNXRUNTIME} (inference)"
    console.print(f"cells: {', '.join(cells)}; backends: {', '.join(backends)} vs {versus}; modes: "
                  f"{', '.join(modes)}; {args.dtype}; {len(shapes)} shapes (T B I H); up to {args.repeats} "
                  f"interleaved samples each, at most ~{args.max_seconds:g} s per candidate", highlight=False)

    cases = [(c, s, m) for c in cells for s in shapes for m in modes]
    results: list[Measurement] = []
    auto: list[dict[str, Any]] = []
    start = time.perf_counter()
    _warm_threads()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True, disable=args.no_progress) as progress:
        task = progress.add_task("benchmarking", total=len(cases))
        for cell, shape, mode in cases:
            label = f"{cell} {shape_label(shape)} {mode}"
            progress.update(task, description=label)
            auto.append({"cell": cell, "mode": mode, "shape": list(shape),
                         "backend": auto_choice(cell, shape, mode == "training", args.step_loop, dtype)})
            results += measure_case(
                cell, backends, shape, mode, repeats=args.repeats, min_repeats=args.min_repeats,
                max_seconds=args.max_seconds, seed=args.seed, onnx=not args.no_onnxruntime,
                on_step=lambda name, label=label: progress.update(task, description=f"{label}: {name}"),
                step_loop=args.step_loop, dtype=dtype)
            progress.advance(task)
    wall = time.perf_counter() - start
    report = build_report(args, results, auto, shapes, wall)

    print_report(console, report, results, backends)
    console.print(f"\n{len(cases)} cases in {wall:.1f} s", highlight=False)
    if args.plot:
        plot_report(results, [*_baselines(results)[1:], *backends], shapes, args.plot)
        console.print(f"plot: {args.plot}", highlight=False)
    if args.json:
        text = json.dumps(report, indent=2)
        if to_stdout:
            sys.stdout.write(text + "\n")
        else:
            with open(args.json, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
            console.print(f"json: {args.json}", highlight=False)
    return 1 if any(m.error for m in results) else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m seqfast.bench ...`, the same as `seqfast bench ...`."""
    parser = argparse.ArgumentParser(prog="seqfast bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
