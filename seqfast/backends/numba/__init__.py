"""The `numba` backend: fused CPU scans, forward and BPTT backward, for every cell with pointwise math.

Per step, one kernel call does the recurrent product (MKL ?gemm_ from libtorch, called from inside the numba loop;
no Python round trip) and the cell's pointwise math fused over every (row, unit). The input projection stays one
big GEMM over all steps (in FusedBackend.layer, without its bias, which the kernels add); the backward forms
dW_hh as one GEMM over all steps after the loop (_weight_gradient). Kernels are generated per cell from one template
(codegen.py) and cached on disk across processes.

Threads (one pool for everything): the numba kernels are single-threaded (no parallel=True, so numba's threading
layer never starts). A scan splits its batch into row ranges, one per torch intra-op thread (torch.get_num_threads(),
or SEQFAST_NUMBA_THREADS), and runs them inside an OpenMP parallel region of torch's own libgomp, i.e. on the very
threads torch uses for its GEMMs, entered from compiled code so that no team thread runs Python (_team.py); MKL is
held to one thread inside each range. numpy's OpenBLAS is never called, so its threads never spin against torch's.
On the 2-core benchmark machine torch keeps its default of 2 threads.

numba is imported only when a kernel is first needed, never by `import seqfast`.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import math
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..._memo import memo
from ...config import setting
from ...registry import CellSpec, Query
from ..fused import FusedBackend, _transforms_active
from . import _buffers
from .codegen import (
    CodegenError,
    check_cell,
    dx_is_dhg,
    entry_address,
    kernels,
    per_unit_width,
    preactivation_only,
    weight_grad_kernels,
)

MIN_NUMBA = (0, 60)


_availability: dict[str, str | None] = {}  # memo of _numba_missing (a plain dict: torch.compile traces through it)


def _numba_missing() -> str | None:
    """Why numba cannot be used, found without importing it (importing seqfast must stay cheap), else None."""
    if "reason" not in _availability:
        reason = None
        if importlib.util.find_spec("numba") is None:
            reason = "numba not installed (pip install 'seqfast[numba]')"
        else:
            try:
                version = importlib.metadata.version("numba")
            except importlib.metadata.PackageNotFoundError:
                version = None
            parts = tuple(int(p) for p in (version or "").split(".")[:2] if p.isdigit())
            if version and parts < MIN_NUMBA:
                reason = f"numba {version} is too old (needs >= {'.'.join(map(str, MIN_NUMBA))})"
        _availability["reason"] = reason
    return _availability["reason"]


_DTYPES = {torch.float32: "float32", torch.float64: "float64"}

# Rows of a batch never interact, so a scan splits its batch into contiguous row ranges, one per thread, each
# running the whole time loop with no synchronisation. Below this much work per thread (multiply-adds of the
# recurrent GEMM over all steps) the second thread costs more than it saves.
MIN_WORK_PER_THREAD = 2_000_000
MIN_ROWS_PER_THREAD = 2


_in_forked_child = False


def _after_fork_in_child() -> None:
    global _in_forked_child, _pool
    _in_forked_child = True
    _pool, _pool_size[0] = None, 0  # the parent's pool threads do not exist here


os.register_at_fork(after_in_child=_after_fork_in_child)


def num_threads() -> int:
    """Threads a scan may use: SEQFAST_NUMBA_THREADS, else torch's intra-op thread count; one in a forked child
    (a DataLoader worker), whatever is set: libgomp is not fork-safe, and a team started in a child whose parent
    had started one hangs."""
    if _in_forked_child:
        return 1
    threads = setting("numba_threads")
    return threads if threads is not None else max(1, torch.get_num_threads())


def _row_ranges(batch: int, work_per_row: int) -> list[tuple[int, int]]:
    threads = min(num_threads(), batch // MIN_ROWS_PER_THREAD, batch * work_per_row // max(1, MIN_WORK_PER_THREAD))
    threads = max(1, threads)
    bounds = [round(i * batch / threads) for i in range(threads + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(threads)]


def _use_loop_gemm(kernel: str, fn: int, ranges: list[tuple[int, int]], width: int, hidden: int,
                   itemsize: int) -> bool:
    """Run a scan's per-step GEMMs as the blocked numba loop (the kernels' `small` flag): see _blas.loop_gemm."""
    from ._blas import loop_gemm

    return loop_gemm(kernel, fn, max(hi - lo for lo, hi in ranges), width, hidden, itemsize)


class _Plan(NamedTuple):
    """Everything about a scan that follows from its shape, worked out once: a small scan's whole kernel takes
    tens of microseconds, and redoing this on each call was a measurable part of it."""

    fn: int  # the BLAS GEMM's address (0: none)
    ranges: list[tuple[int, int]]  # batch rows per thread
    loop_forward: bool  # the per-step GEMM as the numba loop, in the forward scan
    loop_backward: bool  # and in the backward scan
    forward_nn: bool  # the forward's MKL call takes W_hh transposed (N,N), see _blas.is_avx512_kernel
    hidden: int
    dtype_name: str
    full_lengths: np.ndarray  # lengths of a batch without them (read-only)
    zero_states: tuple[np.ndarray, ...]  # [B, H] zeros, per state (read-only)
    zero_bias: np.ndarray  # [G*H] zeros: an absent bias (read-only)
    range_array: np.ndarray  # ranges as int64 [threads, 2], for the kernels' team launchers


_plans: dict[tuple, _Plan] = {}


def _plan(dtype_name: str, steps: int, batch: int, width: int, hidden: int, num_states: int = 1) -> _Plan:
    def make() -> _Plan:
        from ._blas import gemm_address, is_avx512_kernel

        fn = gemm_address(dtype_name)
        ranges = _row_ranges(batch, steps * width * hidden)
        itemsize = 4 if dtype_name == "float32" else 8
        zero = np.zeros((batch, hidden), dtype=dtype_name)
        return _Plan(fn, ranges, _use_loop_gemm("forward", fn, ranges, width, hidden, itemsize),
                     _use_loop_gemm("backward", fn, ranges, width, hidden, itemsize), is_avx512_kernel(fn), hidden,
                     dtype_name, np.full(batch, steps, dtype=np.int64), (zero,) * num_states,
                     np.zeros(width, dtype=dtype_name), np.array(ranges, dtype=np.int64).reshape(-1, 2))

    return memo(_plans, (dtype_name, steps, batch, width, hidden, num_states, num_threads()), make)


_team_found: list = []  # [the addresses, or None], once looked up


def _team_addresses() -> tuple[int, int, int] | None:
    """(GOMP_parallel, omp_get_thread_num, MKL_Set_Num_Threads_Local or 0): what the kernels' team launchers need
    to run a scan's row ranges on torch's own OpenMP threads (seqfast/backends/numba/_team.py). None when this
    torch has no libgomp in torch/lib; _run_rows then runs the ranges on a thread pool.

    torch's own runtime, not a pool of our own: right after a torch op (the input projection) torch's OpenMP worker
    keeps spinning for a while, and a separate thread lost most of the second core to it (LSTM inference at T200
    B32 H128: 20 ms instead of 13). Inside a region of torch's runtime the spinning worker simply takes the work,
    and MKL (same runtime) stays single-threaded: numba, MKL and torch share one pool of threads."""
    if not _team_found:
        found = None
        path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
        try:
            if os.path.exists(path):
                from ._blas import _set_local_threads

                lib = ctypes.CDLL(path)
                found = (ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value,
                         ctypes.cast(lib.omp_get_thread_num, ctypes.c_void_p).value,
                         0 if _set_local_threads is None else ctypes.cast(_set_local_threads, ctypes.c_void_p).value)
        except (OSError, AttributeError):
            found = None
        _team_found.append(found)
    return _team_found[0]


_pool: ThreadPoolExecutor | None = None
_pool_size = [0]
_pool_lock = threading.Lock()


def _run_rows(call, ranges: list[tuple[int, int]], blas: bool = True) -> None:
    """call(lo, hi) for every row range: one range here, several concurrently on a thread pool (kernels release the
    GIL; used only where _team_addresses() finds no libgomp). MKL is held to one thread inside each call, so k
    ranges use exactly k cores. blas=False: the kernels call no BLAS (loop GEMMs), so MKL's setting is left
    alone."""
    global _pool
    from ._blas import single_threaded_blas

    def task(lo: int, hi: int) -> None:
        with single_threaded_blas():
            call(lo, hi)

    if len(ranges) == 1:
        if blas:
            task(*ranges[0])
        else:
            call(*ranges[0])
        return
    with _pool_lock:
        if _pool is None or _pool_size[0] < len(ranges) - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool_size[0] = len(ranges) - 1
            _pool = ThreadPoolExecutor(max_workers=_pool_size[0], thread_name_prefix="seqfast-numba")
        pool = _pool
    futures = [pool.submit(task, lo, hi) for lo, hi in ranges[1:]]
    try:
        task(*ranges[0])
    finally:
        for f in futures:
            f.result()


def _launch(module, kernel: str, plan: _Plan, small: bool, args: tuple, sums: tuple = ()) -> None:
    """Run `kernel` ("forward" or "backward") over the plan's row ranges: on torch's OpenMP team through the
    kernel's launcher (Python-free, see _team.py), else on the thread pool. sums: per-range accumulators
    [ranges, n], each range writing its own row."""
    _launch_ranges(module, kernel, plan.fn, plan.ranges, plan.range_array, small, args, sums)


def _launch_ranges(module, kernel: str, fn: int, ranges: list[tuple[int, int]], range_array: np.ndarray,
                   small: bool, args: tuple, sums: tuple = ()) -> None:
    team = _team_addresses()
    if team is not None:
        gomp, thread_num, mkl_local = team
        getattr(module, kernel + "_launch")(gomp, entry_address(module, kernel), thread_num, mkl_local,
                                            range_array, fn, small, *args, *sums)
        return
    body, rows = getattr(module, kernel), {r: i for i, r in enumerate(ranges)}
    _run_rows(lambda lo, hi: body(fn, small, lo, hi, *args, *(part[rows[(lo, hi)]] for part in sums)),
              ranges, blas=not small)


_output_ranges: dict[tuple, tuple] = {}


def _weight_gradient(a: Tensor, x: Tensor) -> Tensor:
    """a^T @ x for a [K, M], x [K, N]: a weight gradient over all steps.

    With MKL's own kernel (_blas.SGEMM_KERNEL, float32) the rows of the result are split over the scans' thread
    team, each thread calling the kernel on its rows; torch's mm would take sgemm_'s generic path on this CPU.
    Otherwise, and for small products or one thread, _mm."""
    from ._blas import SGEMM, SGEMM_KERNEL

    rows, threads = a.shape[1], num_threads()
    if (a.dtype != torch.float32 or SGEMM_KERNEL == SGEMM or threads < 2 or rows < 32
            or a.shape[0] * rows * x.shape[1] < SMALL_TORCH_GEMM or not (a.is_contiguous() and x.is_contiguous())):
        return _mm(a.t(), x)

    def make() -> tuple:
        parts = min(threads, rows // 16)  # ranges of at least 16 rows, starting on 64-byte boundaries
        bounds = [round(i * rows / parts / 16) * 16 for i in range(parts)] + [rows]
        ranges = [(bounds[i], bounds[i + 1]) for i in range(parts)]
        return ranges, np.array(ranges, dtype=np.int64).reshape(-1, 2)

    ranges, range_array = memo(_output_ranges, (rows, threads), make)
    out = torch.empty(rows, x.shape[1], dtype=a.dtype)
    _launch_ranges(weight_grad_kernels("float32"), "weight_grad", SGEMM_KERNEL, ranges, range_array, False,
                   (a.detach().numpy(), x.detach().numpy(), out.numpy()))
    return out


# Below this many multiply-adds a torch GEMM (the input projection, its gradients, d_W_hh) runs on one MKL thread
# (MKL_Set_Num_Threads_Local, on the calling thread only), so it never waits for torch's OpenMP worker to get a
# core. With another process keeping one of the two cores busy, a T100 B1 H32 LSTM training step (three 0.41M-MAC
# GEMMs) took 782 us with them on two threads and 486 us on one, inference 195 and 99 us (2026-11-26; torch.nn
# 1136 and 541). With both cores free one thread costs ~2 us a GEMM at that size (11.1 against 9.2 us alone) and
# 7 us at 0.82M (20.5 against 13.3), hence the low threshold: on the grid, the B1 H32 point only.
SMALL_TORCH_GEMM = 1 << 19


def _mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """torch.mm(a, b), on one MKL thread when it is small (SMALL_TORCH_GEMM)."""
    if a.shape[0] * a.shape[1] * b.shape[1] >= SMALL_TORCH_GEMM:
        return torch.mm(a, b, out=out)
    from ._blas import single_threaded_blas  # here, not at import: _blas imports numba

    with single_threaded_blas():
        return torch.mm(a, b, out=out)


_linear_op: list = []


def _onednn_linear():
    """torch's oneDNN fp32 linear (the op inductor's CPU fusions call), or None where this torch lacks it. oneDNN
    has AVX-512 kernels where MKL's sgemm_ takes a generic path on this AMD CPU: an input projection of B64 H256 or H512
    ran at 191-223 GFLOP/s against MKL's 177-183, a training step 3-4% faster (2026-11-26)."""
    if not _linear_op:
        op = None
        if torch.backends.mkldnn.is_available():
            try:
                op = torch.ops.mkldnn._linear_pointwise
            except (AttributeError, RuntimeError):
                op = None
        _linear_op.append(op)
    return _linear_op[0]


_NO_X = {name: np.zeros((1, 1, 1), dtype=name) for name in ("float32", "float64")}  # x_proj not read
_NO_SAVED = {name: np.empty((0, 0, 0, 0), dtype=name) for name in ("float32", "float64")}  # inference's saved_st
_NO_PRODUCTS = {name: np.empty((0, 0, 0), dtype=name) for name in ("float32", "float64")}  # the kernel's own hg

# numpy views of weight tensors, by id(tensor): the same memory, so in-place updates (optimizer steps, .data
# writes) show through; a weight whose layout changed (moved, or a .data assignment giving the same memory another
# shape, strides or dtype, e.g. a transpose of a square weight) misses, and one that dies takes its entry with it
# (the view would otherwise keep its memory alive). A view costs ~1 us to make, a hit 0.2.
_views: dict[int, tuple] = {}


def _forget(key: int):
    return lambda _ref: _views.pop(key, None)


def _layout(t: Tensor) -> tuple:
    """What decides how a view reads t's memory: data_ptr (storage and offset), shape, strides and dtype."""
    return t.data_ptr(), t.shape, t.stride(), t.dtype


def _host(t: Tensor) -> np.ndarray:
    """A numpy array of t's data (a view when t is contiguous)."""
    hit = _views.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == _layout(t):
        return hit[2]
    array = t.detach().contiguous().numpy()
    if t.is_contiguous() and not t.is_inference():  # a copy would go stale; inference tensors allow no weakref
        if len(_views) > 1024:
            _views.clear()
        _views[id(t)] = (weakref.ref(t, _forget(id(t))), _layout(t), array)
    return array


def _new(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> tuple[Tensor, np.ndarray]:
    """A new buffer as (tensor, numpy array over the same memory). shared: several threads write its rows, so it
    comes from torch (64-byte aligned: a cache line straddling two threads' rows would bounce between the cores
    every step) or the pool; otherwise small ones come from numpy, which costs ~1.5 us less per buffer (2.4 vs
    0.8 with .numpy() and torch.from_numpy counted; a batch-1 LSTM training step makes seven)."""
    if shared or math.prod(shape) * dtype.itemsize >= _buffers.MIN_BYTES:
        t = _buffers.empty(shape, dtype)
        return t, t.numpy()
    a = np.empty(shape, dtype=_DTYPES[dtype])
    return torch.from_numpy(a), a


def _state_array(s: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A state (or state gradient) as a numpy array of the scan's dtype (read only by the kernels)."""
    s = s.detach()
    if s.dtype != dtype:
        s = s.to(dtype)
    return s.contiguous().numpy()


_MISSING = object()
_step_layouts: dict[tuple, object] = {}  # NumbaBackend.step's per-call lookup of step.step_layout


class NumbaBackend(FusedBackend):
    name = "numba"
    description = "fused CPU scans compiled with numba (MKL GEMM per step, vectorized float32 gate math)"
    devices = frozenset({"cpu"})
    dtypes = frozenset(_DTYPES)
    supports_proj = False  # LSTM proj_size: h would need a second GEMM per step; declined, use torch or native
    priority = 5
    forward_accepts_zero_state = True
    fuses_input_bias = True

    def __init__(self) -> None:
        super().__init__()
        self._kernels: dict[tuple[CellSpec, torch.dtype], object] = {}  # the per-call fast path of _module

    # --- support ---------------------------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        return _numba_missing()

    def extra_reasons(self, query: Query) -> list[str]:
        return self.pointwise_reasons(query.cell)

    def pointwise_reasons(self, cell: CellSpec) -> list[str]:
        if cell.pointwise is None:
            return []  # already reported by needs_pointwise
        try:
            check_cell(cell)
        except CodegenError as exc:
            return [f"cannot compile the cell's pointwise code: {exc}"]
        return []

    def auto_rank(self, query: Query) -> float:
        if query.level == "step":
            from .tuning import step_rank

            return step_rank(query, native_priority=10.0, own_priority=float(self.priority))
        from .tuning import auto_rank

        return auto_rank(query, native_priority=10.0, own_priority=float(self.priority))

    def needs_compile(self, query: Query) -> bool:
        from .codegen import is_compiled

        kernel_names = ("forward", "backward") if query.requires_grad else ("forward",)
        return not is_compiled(query.cell, _DTYPES[query.dtype], kernel_names)

    # --- one step (the cells) ----------------------------------------------------------------------------------
    def step(self, cell: CellSpec, x: Tensor, state: tuple[Tensor, ...], params, names) -> tuple[Tensor, ...]:
        # one kernel call each way (step.py); the scan with T=1 where those kernels do not apply
        key = (cell, x.dtype, tuple(names))
        layout = _step_layouts.get(key, _MISSING)
        if layout is _MISSING:
            from .step import step_layout

            layout = step_layout(cell, x.dtype, names)
            if len(_step_layouts) > 256:
                _step_layouts.clear()
            _step_layouts[key] = layout
        if (layout is None or not x.shape[0] or not x.shape[1] or _transforms_active()
                or torch.compiler.is_compiling()):
            return super().step(cell, x, state, params, names)
        from .step import run_step

        return run_step(layout, cell, x, state, params, names)

    # --- the fused scan --------------------------------------------------------------------------------------
    def saved_shapes(self, cell: CellSpec, steps: int, batch: int, hidden: int) -> list[tuple[int, ...]]:
        # every state before each step and, for a dense recurrence, h W_hh^T of each step, both by loop step. The
        # backward overwrites the saved products with their gradients in place, so its peak memory is no higher
        # than recomputing them would need, and the recurrent GEMM runs once instead of twice.
        shapes = [(cell.num_states, steps, batch, hidden)]
        if cell.recurrence == "dense":
            shapes.append((steps, batch, cell.num_gates * hidden))
        if cell.pointwise is not None and cell.pointwise.stages:  # each stage's vector: its group's weight gradient
            shapes.append((len(cell.pointwise.stages), steps, batch, hidden))
        return shapes

    def backward_reads_x_proj(self, cell: CellSpec) -> bool:
        return not preactivation_only(cell)

    def project(self, x: Tensor, weight_ih: Tensor) -> Tensor:
        # oneDNN from about a million outputs (T100 B16 H256 up); below it MKL was as fast or faster (T100 B8 H64
        # 171 vs 190 us, B1 H32 12 vs 30 us)
        linear = _onednn_linear() if x.dtype == torch.float32 else None
        if linear is not None and x.shape[0] * weight_ih.shape[0] >= 1 << 20:
            return linear(x, weight_ih, None, "none", [], "")
        shape = (x.shape[0], weight_ih.shape[0])
        if shape[0] * shape[1] * x.dtype.itemsize < _buffers.MIN_BYTES:
            return _mm(x, weight_ih.t())
        # into a pooled buffer: a fresh one this large would be page-faulted in on every call
        return _mm(x, weight_ih.t(), out=_buffers.empty(shape, x.dtype))

    def project_backward(self, grad: Tensor, x: Tensor, weight_ih: Tensor, need_x: bool, need_weight: bool
                         ) -> tuple[Tensor | None, Tensor | None]:
        return (_mm(grad, weight_ih) if need_x else None), (_weight_gradient(grad, x) if need_weight else None)

    def _module(self, cell: CellSpec, dtype: torch.dtype):
        module = self._kernels.get((cell, dtype))
        if module is not None:
            return module
        if dtype not in _DTYPES:
            raise TypeError(f"numba backend: dtype {dtype} not supported (float32, float64)")
        why = self.unavailable_reason()
        if why:
            raise RuntimeError(f"numba backend: {why}")
        module = self._kernels[(cell, dtype)] = kernels(cell, _DTYPES[dtype])
        return module

    def _call(self, cell: CellSpec, x_proj: Tensor | None, weights: list[Tensor | None], lengths: Tensor | None,
              x_bias: Tensor | None, like: Tensor | None = None):
        """What both scans start from: (kernel module, plan, x_proj as numpy, [x_bias, W_hh, b_hh, *extras] as
        numpy, lengths as numpy). x_proj None (a backward that does not read it): shapes come from `like`."""
        src = like if x_proj is None else x_proj
        module = self._kernels.get((cell, src.dtype)) or self._module(cell, src.dtype)
        if not src.is_cpu:
            raise ValueError(f"numba backend: tensors must be on the CPU, got {src.device}")
        steps, batch, width = src.shape
        plan = _plan(_DTYPES[src.dtype], steps, batch, width, width // cell.num_gates, cell.num_states)
        if len(weights) > 2 + len(cell.pointwise.params):
            raise ValueError("numba backend: proj_size (weight_hr) is not supported")
        w = weights[0] if weights else None
        if w is None:
            shape = (width, plan.hidden) if cell.recurrence == "dense" else (width,)
            w_np = np.zeros(shape, dtype=plan.dtype_name)
        else:
            w_np = _host(w)
        bias = weights[1] if len(weights) > 1 else None
        arrays = [plan.zero_bias if x_bias is None else _host(x_bias), w_np,
                  plan.zero_bias if bias is None else _host(bias)]
        # the kernel takes the per-unit extras in Pointwise.params order; an absent one (a bias-like extra under
        # bias=False) reads as zeros
        if cell.pointwise.params:
            given = dict(zip(cell.recurrent_param_names()[2:], weights[2:], strict=False))
            arrays += [np.zeros(per_unit_width(cell, name) * plan.hidden, dtype=plan.dtype_name)
                       if given.get(name) is None else _host(given[name]) for name in cell.pointwise.params]
        if lengths is None:
            lens = plan.full_lengths
        else:
            lens = lengths.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()
        x_np = _NO_X[plan.dtype_name] if x_proj is None else x_proj.detach().contiguous().numpy()
        return module, plan, x_np, arrays, lens

    def forward(self, cell: CellSpec, x_proj: Tensor, state0: list[Tensor] | None, weights: list[Tensor | None],
                lengths: Tensor | None, reverse: bool, need_saved: bool, x_bias: Tensor | None = None
                ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        # kept lean: at small shapes (T100 B1 H32) the kernel runs ~30 us, and every torch call here costs ~1 us.
        # Buffers come from _new: 64-byte aligned where several threads write them, pooled from 64 KiB
        module, plan, x_np, arrays, lens = self._call(cell, x_proj, weights, lengths, x_bias)
        steps, batch, width = x_np.shape
        dtype = x_proj.dtype
        init = plan.zero_states if state0 is None else [_state_array(s, dtype) for s in state0]
        shared = len(plan.ranges) > 1
        # the finals (the kernel copies init in); separate tensors: a custom op's outputs may not share storage
        states = [_new((batch, plan.hidden), dtype, shared) for _ in init]
        out = _new((steps, batch, plan.hidden), dtype, shared)
        saved = [_new(s, dtype, shared) for s in self.saved_shapes(cell, steps, batch, plan.hidden)] \
            if need_saved else []
        if batch > 0:
            # the per-step products: saved for the backward (dense), else a reused [1, B, G*H] scratch buffer
            # that the kernel allocates per thread
            hg = saved[1][1] if len(saved) > 1 else _NO_PRODUCTS[plan.dtype_name]
            args = (x_np, *arrays, *init, *(s[1] for s in states), lens, bool(reverse), out[1], hg,
                    saved[0][1] if saved else _NO_SAVED[plan.dtype_name], bool(need_saved),
                    bool(need_saved) and preactivation_only(cell), plan.forward_nn)
            stages = len(cell.pointwise.stages)
            if stages:  # the stages' vectors: saved, or one reused step (like hg)
                args += (saved[2][1] if saved else _new((stages, 1, batch, plan.hidden), dtype, shared)[1],)
            _launch(module, "forward", plan, plan.loop_forward, args)
        return out[0], [s[0] for s in states], [s[0] for s in saved]

    def backward(self, cell: CellSpec, x_proj: Tensor, state0: list[Tensor] | None, weights: list[Tensor | None],
                 lengths: Tensor | None, reverse: bool, outputs: Tensor, final: list[Tensor], saved: list[Tensor],
                 grad_outputs: Tensor | None, grad_final: list[Tensor | None], saved_mode: str = "keep",
                 x_bias: Tensor | None = None, x_proj_mode: str = "keep"
                 ) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
        """FusedBackend.backward; x_proj_mode "consume" (layer()'s own projection, read for the last time): d_x_proj
        may be written over x_proj."""
        if cell.pointwise is None or cell.pointwise.backward is None:
            raise RuntimeError(f"numba backend: cell {cell.name!r} has no pointwise backward")
        preact = preactivation_only(cell)  # the forward saved whole pre-activations: x_proj is not read
        module, plan, x_np, (x_bias_np, w, bias, *extras), lens = self._call(
            cell, None if preact else x_proj, weights, lengths, x_bias, like=saved[1] if preact else None)
        dtype, hidden, dtype_name = saved[0].dtype, plan.hidden, plan.dtype_name
        steps, batch, width = saved[1].shape if preact else x_np.shape
        saved_st = saved[0].detach().contiguous()
        # hgd: the recurrent products of every step, without bias, or with preact the whole pre-activations (the
        # kernel overwrites them with d_hg). Dense: the forward's own, copied when they must stay unchanged;
        # elementwise otherwise
        if cell.recurrence == "dense":
            hgd = saved[1] if saved_mode == "consume" else _buffers.empty(saved[1].shape, dtype).copy_(saved[1])
        elif cell.recurrence == "diagonal":
            h_prev = saved_st[0].view(steps * batch, hidden)
            hgd = (h_prev.repeat(1, cell.num_gates) * torch.from_numpy(w)).view(steps, batch, width)
        else:
            hgd = torch.zeros((steps, batch, width), dtype=dtype)
        grad_out = (np.zeros((steps, batch, hidden), dtype=dtype_name) if grad_outputs is None
                    else grad_outputs.detach().contiguous().numpy())
        d_final = [plan.zero_states[0] if g is None else _state_array(g, dtype) for g in grad_final]
        count = len(plan.ranges)
        d_states = [_new((batch, hidden), dtype, count > 1) for _ in d_final]  # the kernel copies d_final in
        # where d_x equals d_hg and both are in time order, the kernel writes d_hg only and d_x is that buffer
        write_dx = reverse or not dx_is_dhg(cell)
        hgd_np = hgd.numpy()
        if not write_dx:
            dx = (hgd, hgd_np)
        elif x_proj_mode == "consume" and x_proj is not None and x_np.ctypes.data == x_proj.data_ptr():
            # over x_proj itself: a row's chunk of d_x is written after that chunk of x is read, and never read
            # again (GRU at T50 B64 H512: 20 MB less at the training peak)
            dx = (x_proj, x_np)
        else:
            dx = _new((steps, batch, width), dtype, count > 1)
        # sums over rows and steps (the bias gradients, of b_hh and of x_bias, and the per-unit parameter ones):
        # one accumulator per thread, added afterwards; the bias ones in float64, since they sum T*B terms
        sums = [np.zeros((count, width)), np.zeros((count, width)),
                *(np.zeros((count, e.shape[0]), dtype=dtype_name) for e in extras)]
        if batch > 0:
            args = (x_np, x_bias_np, w, bias, *extras, saved_st.numpy(), lens, bool(reverse), grad_out, *d_final,
                    *(d[1] for d in d_states), dx[1], write_dx, hgd_np, preact)
            _launch(module, "backward", plan, plan.loop_backward, args, tuple(sums))
        d_bias, d_x_bias, *d_extras = (part[0] if count == 1 else part.sum(0) for part in sums)
        grads: list[Tensor | None] = [None] * len(weights)
        if weights and weights[0] is not None:
            # the recurrent-weight gradient: one GEMM over every step (padding rows of d_hg are zero)
            flat_dhg = hgd.view(steps * batch, width)  # now d_hg
            h_prev = saved_st.select(0, 0).view(steps * batch, hidden)
            if cell.pointwise.stages:  # each group of rows: its d_hg columns times what its product took
                inputs = [h_prev, *saved[2].detach().view(-1, steps * batch, hidden)]
                grads[0] = torch.cat([_mm(flat_dhg[:, first * hidden:end * hidden].t(), v) for (first, end), v
                                      in zip(cell.pointwise.gate_groups(cell.num_gates), inputs, strict=True)])
            elif cell.recurrence == "dense":
                grads[0] = _weight_gradient(flat_dhg, h_prev)
            else:  # diagonal: d w[g*H + j] = sum over steps of d_hg[., g*H + j] * h_prev[., j]
                grads[0] = (flat_dhg.view(-1, cell.num_gates, hidden) * h_prev.unsqueeze(1)).sum(0).view(width)
        if len(weights) > 1 and weights[1] is not None:
            grads[1] = torch.from_numpy(d_bias.astype(dtype_name))
        if extras:
            d_by_name = dict(zip(cell.pointwise.params, d_extras, strict=True))
            for i, name in enumerate(cell.recurrent_param_names()[2:len(weights)]):
                p = weights[i + 2]
                grads[i + 2] = None if p is None else torch.from_numpy(d_by_name[name]).view(p.shape)
        if x_bias is not None:  # its gradient comes last (see FusedBackend.backward)
            grads.append(torch.from_numpy((d_x_bias if write_dx else d_bias).astype(dtype_name)))
        return dx[0], [d[0] for d in d_states], grads


__all__ = ["NumbaBackend"]
