"""Recurrent layers: every cell x backend x shape, with torch.nn itself as one more value of `backend`.

Parameters come from the registry at discovery time (plus the built-in names, so the parameter lists stay stable
while backends land and old commits are still benchmarked). A combination that cannot run at the commit being
measured (backend not registered yet, or the registry gives reasons) raises NotImplementedError in setup, which
asv records as skipped; the reason is the registry's own.

SEQFAST_ASV_GRID=small (default) | full | small-batch | one-step | tiny picks the shapes; SEQFAST_ASV_CELLS /
SEQFAST_ASV_BACKENDS (comma-separated) narrow the cells and backends.
"""

from __future__ import annotations

import os
import time

import torch

try:
    import seqfast
    _IMPORT_ERROR = None
except Exception as exc:  # an old or broken commit must not stop discovery; every setup reports it instead
    seqfast = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

TORCH_NN = "torch.nn"
BUILTIN_CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
KNOWN_BACKENDS = ("native", "torch", "numba", "triton")

# (T, B, I, H). "full" is the numba issue's grid; "tiny" is for CI's smoke run.
GRIDS = {
    "tiny": [(8, 2, 4, 4)],
    "small": [(100, 1, 32, 32), (100, 8, 64, 64)],
    "full": [(100, 1, 32, 32), (100, 8, 64, 64), (200, 32, 128, 128), (100, 64, 256, 256), (50, 64, 512, 512)],
    "small-batch": [(100, 1, 128, 128), (100, 1, 256, 256), (100, 1, 512, 512), (100, 4, 256, 256)],
    "one-step": [(1, 1, 32, 32), (1, 1, 256, 256), (1, 1, 512, 512), (1, 8, 256, 256)],
}


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name, "").strip()
    return [v.strip() for v in value.split(",") if v.strip()] or None


def _registered(kind: str) -> list[str]:
    table = getattr(getattr(seqfast, "registry", None), kind, None)
    return list(table) if isinstance(table, dict) else []


def cell_names() -> list[str]:
    chosen = _env_list("SEQFAST_ASV_CELLS")
    if chosen:
        return chosen
    return list(BUILTIN_CELLS) + sorted(set(_registered("cells")) - set(BUILTIN_CELLS))


def backend_names() -> list[str]:
    chosen = _env_list("SEQFAST_ASV_BACKENDS")
    if chosen:
        return chosen
    return [TORCH_NN, *KNOWN_BACKENDS] + sorted(set(_registered("backends")) - set(KNOWN_BACKENDS))


def shape_label(shape: tuple[int, int, int, int]) -> str:
    return "T{}-B{}-I{}-H{}".format(*shape)


def parse_shape(label: str) -> tuple[int, int, int, int]:
    t, b, i, h = (int(part[1:]) for part in label.split("-"))
    return t, b, i, h


def grid_labels() -> list[str]:
    grid = os.environ.get("SEQFAST_ASV_GRID", "small").strip() or "small"
    if grid not in GRIDS:
        raise ValueError(f"SEQFAST_ASV_GRID={grid!r}: expected one of {sorted(GRIDS)}")
    return [shape_label(s) for s in GRIDS[grid]]


def torch_nn_module(cell: str, input_size: int, hidden_size: int) -> torch.nn.Module | None:
    """torch.nn's own module for a built-in cell (`seqfast bench`'s definition), else None."""
    try:
        from seqfast.bench import torch_nn_module as make
    except ImportError:  # a commit from before `seqfast bench`: no torch.nn column there
        return None
    return make(cell, input_size, hidden_size)


def torch_nn_cell(cell: str, input_size: int, hidden_size: int) -> torch.nn.Module | None:
    """torch.nn's own cell (LSTMCell, ...) for a built-in cell (`seqfast bench --step-loop`'s), else None."""
    try:
        from seqfast.bench import torch_nn_cell as make
    except ImportError:  # a commit from before the step loop in `seqfast bench`
        return None
    return make(cell, input_size, hidden_size)


def skip_reason(cell: str, backend: str, shape: tuple[int, int, int, int], requires_grad: bool,
                step_loop: bool = False) -> str | None:
    """Why this combination cannot run at the installed commit, in the registry's words; None if it can."""
    if seqfast is None:
        return f"seqfast does not import: {_IMPORT_ERROR}"
    cells = _registered("cells")
    if cell not in cells:
        return f"cell {cell!r} is not registered in this seqfast (cells: {cells})"
    if backend == TORCH_NN:
        if (torch_nn_cell if step_loop else torch_nn_module)(cell, 1, 1) is None:
            return f"torch.nn has no {'cell' if step_loop else 'module'} for cell {cell!r}"
        return None
    backends = _registered("backends")
    if backend not in backends:
        return f"backend {backend!r} is not registered in this seqfast (backends: {backends})"
    steps, batch, inputs, hidden = shape
    level = {"level": "step", "seq_len": 1} if step_loop else {"seq_len": steps}
    reasons = seqfast.explain(cell, device="cpu", dtype=torch.float32, hidden_size=hidden, input_size=inputs,
                              batch_size=batch, requires_grad=requires_grad, **level)[backend]
    return "; ".join(reasons) or None


class Workload:
    """One model and input; `step()` runs inference (no_grad) or forward + backward of output.sum()."""

    def __init__(self, cell: str, backend: str, shape: tuple[int, int, int, int], training: bool,
                 step_loop: bool = False) -> None:
        reason = skip_reason(cell, backend, shape, training, step_loop)
        if reason:
            raise NotImplementedError(reason)
        steps, batch, inputs, hidden = shape
        torch.manual_seed(0)
        if step_loop:  # the cell stepped T times in a Python loop (seqfast bench --step-loop's model)
            from seqfast.bench import _step_loop

            cell_module = torch_nn_cell(cell, inputs, hidden) if backend == TORCH_NN else \
                seqfast.RecurrentCell(cell, inputs, hidden, backend=backend)
            self.model = _step_loop(cell_module)
        elif backend == TORCH_NN:
            self.model = torch_nn_module(cell, inputs, hidden)
        else:
            self.model = seqfast.Recurrent(cell, inputs, hidden, backend=backend)
        self.model.train(training)
        self.model.requires_grad_(training)
        self.x = torch.randn(steps, batch, inputs)
        self.training = training
        self.params = list(self.model.parameters())

    def step(self) -> None:
        if not self.training:
            with torch.no_grad():
                self.model(self.x)
            return
        for p in self.params:
            p.grad = None  # no accumulation: every call does the same work
        out = self.model(self.x)[0]
        out.sum().backward()

    def warm(self, min_calls: int = 3, min_seconds: float = 0.2) -> None:
        """Call until warm: JIT compilation, autotuning and allocator caches settle over the first calls."""
        start = time.perf_counter()
        calls = 0
        while calls < min_calls or (time.perf_counter() - start < min_seconds and calls < 1000):
            self.step()
            calls += 1

    def first_step(self) -> None:
        """The first call; a backend that cannot run after all says so here (turned into a skip)."""
        error = getattr(seqfast, "BackendNotSupportedError", None) if seqfast is not None else None
        try:
            self.step()
        except Exception as exc:
            if error is not None and isinstance(exc, error):
                raise NotImplementedError(str(exc)) from exc
            raise


class _Timed:
    params = (cell_names(), backend_names(), grid_labels())
    param_names = ["cell", "backend", "shape"]
    training = False
    # one round, few samples: the default grid x every backend must stay a few minutes per commit
    rounds = 1
    repeat = (3, 10, 4.0)
    warmup_time = 0.05
    timeout = 300

    def setup(self, cell: str, backend: str, shape: str) -> None:
        self.work = Workload(cell, backend, parse_shape(shape), self.training)
        self.work.first_step()  # a backend that turns the input down at run time is skipped, not failed
        self.work.warm()


class Forward(_Timed):
    """Inference: forward under torch.no_grad()."""

    def time_forward(self, cell: str, backend: str, shape: str) -> None:
        self.work.step()


class ForwardBackward(_Timed):
    """Training: forward + backward of output.sum() (parameter gradients)."""

    training = True

    def time_forward_backward(self, cell: str, backend: str, shape: str) -> None:
        self.work.step()

    def peakmem_forward_backward(self, cell: str, backend: str, shape: str) -> None:
        self.work.step()


class CellStepLoop:
    """The cells (torch.nn's LSTMCell, ... as torch.nn) stepped T times in a Python loop, hx=None first: inference
    under torch.no_grad(), or training (forward + backward of the summed outputs)."""

    params = (cell_names(), backend_names(), grid_labels(), ["inference", "training"])
    param_names = ["cell", "backend", "shape", "mode"]
    rounds = 1
    repeat = (3, 10, 4.0)
    warmup_time = 0.05
    timeout = 300

    def setup(self, cell: str, backend: str, shape: str, mode: str) -> None:
        self.work = Workload(cell, backend, parse_shape(shape), mode == "training", step_loop=True)
        self.work.first_step()
        self.work.warm()

    def time_step_loop(self, cell: str, backend: str, shape: str, mode: str) -> None:
        self.work.step()


class FirstCall:
    """Seconds of the first call in a fresh process (asv forks one per benchmark): JIT compile, autotune, caches."""

    params = (cell_names(), backend_names(), grid_labels(), ["inference", "training"])
    param_names = ["cell", "backend", "shape", "mode"]
    rounds = 1
    repeat = 1
    timeout = 300

    def setup(self, cell: str, backend: str, shape: str, mode: str) -> None:
        work = Workload(cell, backend, parse_shape(shape), mode == "training")
        start = time.perf_counter()
        work.first_step()
        self.seconds = time.perf_counter() - start

    def track_first_call_seconds(self, cell: str, backend: str, shape: str, mode: str) -> float:
        return self.seconds

    track_first_call_seconds.unit = "seconds"
