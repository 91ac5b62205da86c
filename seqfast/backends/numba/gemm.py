"""The torch-side GEMMs around a numba scan: the input projection, its gradients and the recurrent-weight gradient.

The per-step GEMMs inside the kernels are _blas.py's; these run once per layer-direction, before or after the
time loop.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..._memo import memo
from . import buffers, schedule
from .codegen import projection_kernels, weight_grad_kernels
from .views import host

# Below this many multiply-adds a torch GEMM (the input projection, its gradients, d_W_hh) runs on one MKL thread
# (MKL_Set_Num_Threads_Local, on the calling thread only), so it never waits for torch's OpenMP worker to get a
# core: on a busy 2-core machine that wait cost more than the second thread saves at these sizes, while with both
# cores free one thread costs a few microseconds a GEMM (figures in benchmarks/RESULTS.md). On the grid, the B1 H32
# point only.
SMALL_TORCH_GEMM = 1 << 19  # read on each call

# From this many outputs the input projection runs on oneDNN's linear (T100 B16 H256 up); below it MKL was as fast
# or faster (T100 B8 H64 171 vs 190 us, B1 H32 12 vs 30 us).
ONEDNN_MIN_OUTPUTS = 1 << 20


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


def _small_kernel(float32: bool, rows: int, width: int, inputs: int) -> int | None:
    """The address of MKL's own kernel (_blas.SGEMM_KERNEL) where an input projection of [rows, inputs] by
    [width, inputs]^T takes it: a float32 product under SMALL_TORCH_GEMM multiply-adds while that kernel is in
    use; else None. Called from compiled code (templates/project.py.tmpl), it wakes no OpenMP team and changes no
    MKL thread setting, which at these sizes cost more than the product."""
    if not float32 or not rows or rows * width * inputs >= SMALL_TORCH_GEMM:
        return None
    blas = _blas_module or _blas_module_load()  # not at import: _blas imports numba
    return None if blas.SGEMM_KERNEL == blas.SGEMM else blas.SGEMM_KERNEL


def _small_projection(x: Tensor, weight_ih: Tensor) -> Tensor | None:
    """x @ weight_ih^T by _small_kernel's kernel, or None where it does not apply or the operands are not
    contiguous."""
    fn = _small_kernel(x.dtype == torch.float32, x.shape[0], weight_ih.shape[0], x.shape[1])
    if fn is None or not (x.is_contiguous() and weight_ih.is_contiguous()):
        return None
    out = np.empty((x.shape[0], weight_ih.shape[0]), dtype=np.float32)
    kernel = _project_kernel or _project_kernel_load()
    kernel(fn, (x.detach() if x.requires_grad else x).numpy(), host(weight_ih), out)
    return torch.from_numpy(out)


_blas_module = None


def _blas_module_load():
    global _blas_module
    from . import _blas

    _blas_module = _blas
    return _blas


_project_kernel = None


def _project_kernel_load():
    global _project_kernel
    _project_kernel = projection_kernels("float32").project
    return _project_kernel


def input_projection(x: Tensor, weight_ih: Tensor) -> Tensor:
    """x [N, I] @ weight_ih^T without its bias: oneDNN's linear for large float32 ones, MKL's own kernel for small
    ones (_small_projection), else mm, into a pooled buffer from buffers.MIN_BYTES (a fresh one this large would
    be page-faulted in on every call)."""
    shape = (x.shape[0], weight_ih.shape[0])
    if x.dtype == torch.float32:
        small = _small_projection(x, weight_ih)
        if small is not None:
            return small
        linear = onednn_linear()
        if linear is not None and shape[0] * shape[1] >= ONEDNN_MIN_OUTPUTS:
            return linear(x, weight_ih, None, "none", [], "")
    if shape[0] * shape[1] * x.dtype.itemsize < buffers.MIN_BYTES:
        return mm(x, weight_ih.t())
    return mm(x, weight_ih.t(), out=buffers.empty(shape, x.dtype))


def host_projector(rows: int, weight_ih: Tensor, weight_host: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """input_projection of a contiguous numpy x [rows, ...] (its last dimension the input size), as a function
    returning a numpy [rows, G*H]: the choice of GEMM made once for the shape. weight_host: weight_ih's numpy
    view, which the function keeps."""
    inputs, width = weight_host.shape[1], weight_host.shape[0]
    fn = _small_kernel(weight_host.dtype == np.float32, rows, width, inputs)
    if fn is not None:
        kernel = _project_kernel or _project_kernel_load()

        def small(x: np.ndarray) -> np.ndarray:
            out = np.empty((rows, width), dtype=np.float32)
            kernel(fn, x.reshape(rows, inputs), weight_host, out)
            return out

        return small
    return lambda x: input_projection(torch.from_numpy(x.reshape(rows, inputs)), weight_ih).numpy()


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

    With MKL's own kernel (_blas.SGEMM_KERNEL, float32) the rows of the result are split over the scans' thread
    team, each thread calling the kernel on its rows; torch's mm would take sgemm_'s generic path on this CPU.
    Otherwise, and for small products or one thread, mm."""
    from ._blas import SGEMM, SGEMM_KERNEL  # here, not at import: _blas imports numba

    rows, threads = a.shape[1], schedule.num_threads()
    if (a.dtype != torch.float32 or SGEMM_KERNEL == SGEMM or threads < 2 or rows < 32
            or a.shape[0] * rows * x.shape[1] < SMALL_TORCH_GEMM or not (a.is_contiguous() and x.is_contiguous())):
        return mm(a.t(), x)
    ranges, range_array = weight_grad_ranges(rows, threads)
    out = torch.empty(rows, x.shape[1], dtype=a.dtype)
    schedule.launch_ranges(weight_grad_kernels("float32"), "weight_grad", SGEMM_KERNEL, ranges, range_array, False,
                           (a.detach().numpy(), x.detach().numpy(), out.numpy()))
    return out
