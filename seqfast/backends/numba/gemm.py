"""The torch-side GEMMs around a numba scan: the input projection, its gradients and the recurrent-weight gradient.

The per-step GEMMs inside the kernels are _blas.py's; these run once per layer-direction, before or after the
time loop.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..._memo import memo
from . import buffers, gemm_choice, schedule
from .availability import DTYPES
from .codegen import projection_kernels, weight_grad_kernels
from .views import host

# Below this many multiply-adds a torch GEMM (the input projection, its gradients, d_W_hh) runs on one MKL thread
# (MKL_Set_Num_Threads_Local, on the calling thread only), so it never waits for torch's OpenMP worker to get a
# core: on a busy 2-core machine that wait cost more than the second thread saves at these sizes, while with both
# cores free one thread costs a few microseconds a GEMM (figures in benchmarks/RESULTS.md). On the grid, the B1 H32
# point only.
SMALL_TORCH_GEMM = 1 << 19  # read on each call

# The static rule for an input projection: from this many outputs oneDNN's linear (T100 B16 H256 up), below it MKL
# (fitted on an AVX-512 AMD CPU; where calibration is on, the way is measured per shape, see projection_way)
ONEDNN_MIN_OUTPUTS = 1 << 20
# A projection's timing runs take at most this many of the call's rows: the fastest way changes with the rows (on
# one CPU oneDNN led at 128 rows of a 512-by-2048 product, MKL from 512 rows on), and timing every row of a large
# call would cost it several times over
PROJECTION_TIMING_ROWS = 2048


def mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """torch.mm(a, b), on one MKL thread when it is small (SMALL_TORCH_GEMM)."""
    if a.shape[0] * a.shape[1] * b.shape[1] >= SMALL_TORCH_GEMM:
        return torch.mm(a, b, out=out)
    from ._blas import single_threaded_blas  # here, not at import: _blas imports numba

    with single_threaded_blas():
        return torch.mm(a, b, out=out)


_linear_op: list = []


def onednn_linear():
    """torch's oneDNN fp32 linear (the op inductor's CPU fusions call), or None where this torch lacks it. oneDNN
    has AVX-512 kernels where MKL's sgemm_ takes a generic path on this AMD CPU: an input projection of B64 H256 or
    H512 ran at 191-223 GFLOP/s against MKL's 177-183, a training step 3-4% faster (2026-11-26)."""
    if not _linear_op:
        op = None
        if torch.backends.mkldnn.is_available():
            try:
                op = torch.ops.mkldnn._linear_pointwise
            except (AttributeError, RuntimeError):
                op = None
        _linear_op.append(op)
    return _linear_op[0]


def _small_kernel(dtype: torch.dtype, rows: int, width: int, inputs: int) -> int | None:
    """The address of MKL's own kernel for dtype (_blas.SGEMM_KERNEL / DGEMM_KERNEL) where an input projection of
    [rows, inputs] by [width, inputs]^T takes it without measuring: a product under SMALL_TORCH_GEMM multiply-adds
    while that kernel is in use; else None. Run from a small compiled function (templates/project.py.tmpl), it
    wakes no OpenMP team and changes no MKL thread setting, which at these sizes cost more than the product."""
    if not rows or rows * width * inputs >= SMALL_TORCH_GEMM:
        return None
    return _direct_kernel(dtype)


def _direct_kernel(dtype: torch.dtype = torch.float32) -> int | None:
    """MKL's own ?gemm kernel's address for dtype where the kernels use one (a non-Intel CPU), else None."""
    blas = _blas_module or _blas_module_load()  # not at import: _blas imports numba
    if dtype == torch.float32:
        return None if blas.SGEMM_KERNEL == blas.SGEMM else blas.SGEMM_KERNEL
    if dtype == torch.float64:
        return None if blas.DGEMM_KERNEL == blas.DGEMM else blas.DGEMM_KERNEL
    return None


def gemm_name(dtype_name: str) -> str:
    """The GEMM numba's per-step products call for a dtype (_blas.gemm_address), in words (`seqfast info`)."""
    blas = _blas_module or _blas_module_load()
    fn = blas.gemm_address(dtype_name)
    if not fn:
        return "numba's loop (this torch has no MKL)"
    letter, direct = ("s", blas.DIRECT_KERNELS) if dtype_name == "float32" else ("d", blas.DIRECT_KERNELS_64)
    isa = next((isa for isa, address in direct.items() if address == fn), None)
    return f"MKL's own mkl_blas_{isa}_x{letter}gemm" if isa else f"{letter}gemm_"


def _kernel_projection(x: Tensor, weight_ih: Tensor) -> Tensor | None:
    """x @ weight_ih^T by MKL's own kernel on the calling thread, or None where there is none for x's dtype or the
    operands are not contiguous."""
    fn = _direct_kernel(x.dtype) if x.dtype == weight_ih.dtype else None
    if fn is None or not (x.is_contiguous() and weight_ih.is_contiguous()):
        return None
    out = np.empty((x.shape[0], weight_ih.shape[0]), dtype=DTYPES[x.dtype])
    kernel = _project_kernels.get(x.dtype) or _project_kernel_load(x.dtype)
    kernel(fn, (x.detach() if x.requires_grad else x).numpy(), host(weight_ih), out)
    return torch.from_numpy(out)


_blas_module = None


def _blas_module_load():
    global _blas_module
    from . import _blas

    _blas_module = _blas
    return _blas


_project_kernels: dict[torch.dtype, object] = {}


def _project_kernel_load(dtype: torch.dtype):
    kernel = _project_kernels[dtype] = projection_kernels(DTYPES[dtype]).project
    return kernel


def input_projection(x: Tensor, weight_ih: Tensor) -> Tensor:
    """x [N, I] @ weight_ih^T without its bias, the way projection_way picks; mm's result in a pooled buffer from
    buffers.MIN_BYTES (a fresh one this large would be page-faulted in on every call)."""
    return _project(projection_way(x, weight_ih), x, weight_ih)


def _project(way: str, x: Tensor, weight_ih: Tensor) -> Tensor:
    if way == "kernel":
        out = _kernel_projection(x, weight_ih)
        if out is not None:
            return out
    elif way == "onednn":
        return onednn_linear()(x, weight_ih, None, "none", [], "")
    shape = (x.shape[0], weight_ih.shape[0])
    if shape[0] * shape[1] * x.dtype.itemsize < buffers.MIN_BYTES:
        return mm(x, weight_ih.t())
    return mm(x, weight_ih.t(), out=buffers.empty(shape, x.dtype))


def projection_way(x: Tensor, weight_ih: Tensor) -> str:
    """How x [N, I] @ weight_ih^T runs: "kernel" (MKL's own kernel on the calling thread), "mm" (torch's mm: MKL's
    sgemm_ on torch's threads) or "onednn" (oneDNN's linear). A float32 product of SMALL_TORCH_GEMM multiply-adds
    or more takes the way measured fastest for its shape bucket (gemm_choice), measured on this call where none
    is yet; otherwise, and where calibration is off, the static rule: MKL's own kernel below SMALL_TORCH_GEMM, then
    mm, and oneDNN from ONEDNN_MIN_OUTPUTS outputs."""
    rows, width, inputs = x.shape[0], weight_ih.shape[0], x.shape[1]
    float32 = x.dtype == torch.float32
    if _small_kernel(x.dtype, rows, width, inputs) is not None:
        return "kernel"
    linear = onednn_linear() if float32 else None
    static = "onednn" if linear is not None and rows * width >= ONEDNN_MIN_OUTPUTS else "mm"
    if not float32 or rows * width * inputs < SMALL_TORCH_GEMM:
        return static
    threads = torch.get_num_threads()
    # MKL's own kernel runs on the calling thread only: a candidate where torch's GEMMs have one thread too
    others = ("mm", *(("onednn",) if linear is not None else ()),
              *(("kernel",) if threads == 1 and _direct_kernel() is not None else ()))
    ways = (static, *(w for w in others if w != static))
    if len(ways) == 1:
        return static
    bucket = min(1 << (rows - 1).bit_length(), PROJECTION_TIMING_ROWS)
    key = ("projection", bucket, width, inputs, threads)
    found = gemm_choice.decided(key)
    if found is not None:
        return found
    if not gemm_choice.may_measure():
        return static
    sample = x[:PROJECTION_TIMING_ROWS]
    return gemm_choice.choose(key, ways, lambda way: _project(way, sample, weight_ih))


_output_ranges: dict[tuple, tuple] = {}


def weight_grad_ranges(rows: int, threads: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """How weight_gradient splits `rows` rows of its result over `threads` threads: ranges of at least 16 rows,
    starting on 64-byte boundaries, as a list and as int64 [ranges, 2]."""
    def make() -> tuple:
        parts = min(threads, rows // 16)
        bounds = [round(i * rows / parts / 16) * 16 for i in range(parts)] + [rows]
        ranges = [(bounds[i], bounds[i + 1]) for i in range(parts)]
        return ranges, np.array(ranges, dtype=np.int64).reshape(-1, 2)

    return memo(_output_ranges, (rows, threads), make)


def weight_gradient(a: Tensor, x: Tensor) -> Tensor:
    """a^T @ x for a [K, M], x [K, N]: a weight gradient over all steps.

    With MKL's own kernel (_blas.SGEMM_KERNEL / DGEMM_KERNEL) the rows of the result are split over the scans'
    thread team, each thread calling the kernel on its rows; torch's mm would take sgemm_'s / dgemm_'s generic path
    on this CPU. Otherwise, and for small products or one thread, mm."""
    from . import _blas  # here, not at import: _blas imports numba

    name = DTYPES.get(a.dtype)
    kernel = name and _blas.gemm_address(name)
    rows, threads = a.shape[1], schedule.num_threads()
    if (not kernel or kernel == _blas.threaded_gemm_address(name) or threads < 2 or rows < 32
            or a.shape[0] * rows * x.shape[1] < SMALL_TORCH_GEMM or not (a.is_contiguous() and x.is_contiguous())):
        return mm(a.t(), x)
    ranges, range_array = weight_grad_ranges(rows, threads)
    out = torch.empty(rows, x.shape[1], dtype=a.dtype)
    schedule.launch_ranges(weight_grad_kernels(name), "weight_grad", kernel, ranges, range_array, False,
                           (a.detach().numpy(), x.detach().numpy(), out.numpy()))
    return out
