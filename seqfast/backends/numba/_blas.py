"""GEMM inside numba kernels: MKL's Fortran sgemm_/dgemm_ (exported by libtorch_cpu.so), else a numba loop.

All matrices are row-major numba arrays; a row-major [R, C] matrix is a column-major C x R one, so
    C[M, N] = A[M, K] @ B[N, K]^T   is Fortran   C^T(N x M) = op_T(B (K x N)) @ A^T (K x M)
    C[M, N] += A[M, K] @ B[K, N]    is Fortran   C^T(N x M) = B^T (N x K) @ A^T (K x M)
The BLAS routine is called through its address, passed to the kernel as an int64 argument (not baked into the
compiled code), so kernels stay cacheable across processes. Small GEMMs (and every GEMM when this torch has no
MKL, address 0) run as a numba loop instead. MKL runs on torch's OpenMP pool (torch's thread count),
the same threads torch's own GEMMs use, so nothing is oversubscribed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


def _blas_addresses() -> tuple[int, int]:
    """(sgemm_, dgemm_) addresses in torch's MKL, or (0, 0) when this torch has none (numba loops are used)."""
    if os.environ.get("SEQFAST_NUMBA_NO_MKL", "").strip() not in ("", "0"):
        return 0, 0
    try:
        import torch

        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        sgemm, dgemm = (ctypes.cast(getattr(lib, n), ctypes.c_void_p).value or 0 for n in ("sgemm_", "dgemm_"))
        return sgemm, dgemm
    except (OSError, AttributeError):
        return 0, 0


SGEMM, DGEMM = _blas_addresses()


def _mkl_local_threads():
    try:
        import torch

        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = lib.MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
    return fn


_set_local_threads = _mkl_local_threads() if SGEMM else None


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """MKL uses one thread on this thread inside the block (a per-thread setting; restored afterwards)."""
    if _set_local_threads is None:
        yield
        return
    previous = _set_local_threads(1)
    try:
        yield
    finally:
        _set_local_threads(previous)


def gemm_address(dtype_name: str) -> int:
    return SGEMM if dtype_name == "float32" else DGEMM


@intrinsic
def _fortran_gemm(typingctx, fn, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Call the Fortran ?gemm_ at address `fn`; a, b, c are data addresses; scalars are passed by reference."""
    sig = types.void(fn, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p] * 13)
        fptr = builder.inttoptr(args[0], fnty.as_pointer())
        refs = []
        for idx, (val, ty) in enumerate(zip(args[1:], sig.args[1:], strict=True)):
            if idx in (6, 8, 11):  # a, b, c: addresses
                refs.append(builder.inttoptr(val, i8p))
                continue
            if idx in (0, 1):  # 'N' / 'T'
                lty, val = ir.IntType(8), builder.trunc(val, ir.IntType(8))
            elif idx in (5, 10):  # alpha, beta in the matrix dtype
                lty = context.get_value_type(ty)
            else:  # Fortran INTEGER (LP64)
                lty, val = ir.IntType(32), builder.trunc(val, ir.IntType(32))
            slot = cgutils.alloca_once(builder, lty)
            builder.store(val, slot)
            refs.append(builder.bitcast(slot, i8p))
        builder.call(fptr, refs)
        return context.get_dummy_value()

    return sig, codegen


_N, _T = ord("N"), ord("T")

# Up to this many multiply-adds a per-step GEMM runs as the numba loop below: measured in the forward kernel on
# 2026-11-25, the loop won at 4K (0.27 vs 0.38 us per step) and 64K (3.2 vs 3.4 us), MKL at 128K (5.5 vs 6.3 us)
SMALL_GEMM = 65536


@njit(inline="always")
def gemm_nt(fn, a, b, c, one, zero):
    """MKL: c[M, N] = a[M, K] @ b[N, K]^T. a, b, c C-contiguous 2-D; one/zero: 1 and 0 in the matrix dtype."""
    m, k = a.shape
    n = b.shape[0]
    _fortran_gemm(fn, _T, _N, n, m, k, one, b.ctypes.data, k, a.ctypes.data, k, zero, c.ctypes.data, n)


@njit(inline="always")
def gemm_nn_acc(fn, a, b, c, one):
    """MKL: c[M, N] += a[M, K] @ b[K, N]. a, b, c C-contiguous 2-D; one: 1 in the matrix dtype."""
    m, k = a.shape
    n = b.shape[1]
    _fortran_gemm(fn, _N, _N, n, m, k, one, b.ctypes.data, n, a.ctypes.data, k, one, c.ctypes.data, n)


@njit(inline="always")
def loop_nn_acc(a, b, c):
    """c[M, N] += a[M, K] @ b[K, N] as a loop LLVM vectorizes over N: for small GEMMs, or without MKL.

    Eight k-steps per pass over a row of c, so c is loaded and stored once per eight multiply-adds instead of once
    per one (1.3-3x faster at the sizes used here). The sums keep the order of the plain k loop, so results are
    bitwise the same as adding one k-step at a time."""
    m, k = a.shape
    n = b.shape[1]
    k8 = k - k % 8
    for i in range(m):
        for p in range(0, k8, 8):
            a0, a1, a2, a3 = a[i, p], a[i, p + 1], a[i, p + 2], a[i, p + 3]
            a4, a5, a6, a7 = a[i, p + 4], a[i, p + 5], a[i, p + 6], a[i, p + 7]
            for j in range(n):
                c[i, j] = (c[i, j] + a0 * b[p, j] + a1 * b[p + 1, j] + a2 * b[p + 2, j] + a3 * b[p + 3, j]
                           + a4 * b[p + 4, j] + a5 * b[p + 5, j] + a6 * b[p + 6, j] + a7 * b[p + 7, j])
        for p in range(k8, k):
            av = a[i, p]
            for j in range(n):
                c[i, j] += av * b[p, j]


__all__ = ["SGEMM", "DGEMM", "SMALL_GEMM", "gemm_address", "gemm_nt", "gemm_nn_acc", "loop_nn_acc",
           "single_threaded_blas"]
