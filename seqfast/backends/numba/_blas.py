"""GEMM inside numba kernels: MKL (exported by libtorch_cpu.so), else a numba loop.

MKL is its Fortran sgemm_/dgemm_ or, on a non-Intel CPU, MKL's own kernels called directly (direct_kernels), which
the Fortran routines' dispatch skips on such a CPU: for float32 the AVX-512 or AVX2 one, for float64 the AVX-512
one.

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
import threading
from collections.abc import Iterator

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...config import setting


def _blas_addresses() -> tuple[int, int]:
    """(sgemm_, dgemm_) addresses in torch's MKL, or (0, 0) when this torch has none (numba loops are used)."""
    if setting("numba_no_mkl"):
        return 0, 0
    try:
        import torch

        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        sgemm, dgemm = (ctypes.cast(getattr(lib, n), ctypes.c_void_p).value or 0 for n in ("sgemm_", "dgemm_"))
        return sgemm, dgemm
    except (OSError, AttributeError):
        return 0, 0


def cpu_vendor_and_flags() -> tuple[str, set[str]]:
    """(vendor_id, flags) of this CPU from /proc/cpuinfo; ("", set()) where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(1 << 16)
    except OSError:
        return "", set()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("vendor_id", ""), set(fields.get("flags", "").split())


def gemm_agrees(fn, real: type = ctypes.c_float) -> bool:
    """fn, called like Fortran sgemm_ (real: ctypes.c_float) or dgemm_ (ctypes.c_double), gives exact products
    (small integers) for the three kinds the kernels use (T,N with beta 0; N,N with beta 1; N,T with beta 0), with
    leading dimensions past the matrix edges."""
    m, n, k, ld = 5, 7, 9, 11
    i64 = ctypes.c_int64  # 64-bit integers, as the kernels pass them (see _fortran_gemm)
    a = (real * (ld * ld))(*[float((3 * i) % 7 - 3) for i in range(ld * ld)])
    b = (real * (ld * ld))(*[float((5 * i) % 9 - 4) for i in range(ld * ld)])
    for trans_a, trans_b, beta in ((b"T", b"N", 0.0), (b"N", b"N", 1.0), (b"N", b"T", 0.0)):
        c = (real * (ld * n))(*[1.0] * (ld * n))
        # col-major C (m x n) = op(A) (m x k) @ op(B) (k x n); op(X)[r, s] = X[r, s], or X^T[r, s] = X[s, r]
        fn(ctypes.c_char_p(trans_a), ctypes.c_char_p(trans_b), ctypes.byref(i64(m)), ctypes.byref(i64(n)),
           ctypes.byref(i64(k)), ctypes.byref(real(1.0)), a, ctypes.byref(i64(ld)), b, ctypes.byref(i64(ld)),
           ctypes.byref(real(beta)), c, ctypes.byref(i64(ld)))
        ai, ap = (ld, 1) if trans_a == b"T" else (1, ld)  # strides of op(A)'s row and column in a
        bp, bj = (ld, 1) if trans_b == b"T" else (1, ld)
        for j in range(n):
            for i in range(ld):
                want = (beta + sum(a[i * ai + p * ap] * b[p * bp + j * bj] for p in range(k))) if i < m else 1.0
                if c[j * ld + i] != want:
                    return False
    return True


def direct_kernels(dtype_name: str = "float32") -> dict[str, int]:
    """{"avx512": address, "avx2": address}: MKL's own ?gemm kernels of a dtype for those instruction sets that the
    kernels may call directly, where sgemm_ / dgemm_ would take a generic path (empty where none may).

    MKL's Fortran routines send a non-Intel CPU down a generic path, and on an AMD Zen 4 these kernels ran the
    scans' per-step products faster (figures: benchmarks/RESULTS.md, "Measurements behind design choices";
    command: `benchmarks/numba_breakdown.py kernels T,B,I,H`), the AVX-512 one fastest as N,N over a transposed
    W_hh. So the forward runs N,N on an AVX-512 kernel (is_avx512_kernel) and T,N on the others. float64 keeps
    only the AVX-512 one: on a Zen 5 EPYC it ran a 64 x 1024 x 256 product in half dgemm_'s time, the AVX2 one
    within 10 % of it. The kernels are sequential (no threads of their own), safe to call from several threads at
    once, and read their integers as 8 bytes (which _fortran_gemm passes to every routine). They are MKL's
    internal entry points, so one is used only where the CPU has its instructions and it passes an exact product
    check (gemm_agrees); SEQFAST_NUMBA_MKL_KERNELS=0 turns them off. An Intel CPU keeps sgemm_ and dgemm_, whose
    own dispatch already picks them there."""
    float32 = dtype_name == "float32"
    if not _found("SGEMM" if float32 else "DGEMM") or not setting("numba_mkl_kernels"):
        return {}
    vendor, flags = cpu_vendor_and_flags()
    if vendor == "GenuineIntel":
        return {}
    import torch

    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    found = {}
    letter, real = ("s", ctypes.c_float) if float32 else ("d", ctypes.c_double)
    for isa, needs in (("avx512", {"avx512f", "avx512bw", "avx512dq", "avx512vl"}), ("avx2", {"avx2", "fma"})):
        fn = getattr(lib, f"mkl_blas_{isa}_x{letter}gemm", None)
        if fn is not None and needs <= flags and gemm_agrees(fn, real):
            found[isa] = ctypes.cast(fn, ctypes.c_void_p).value
    return found


def is_avx512_kernel(fn: int) -> bool:
    """Whether the GEMM at fn is MKL's AVX-512 kernel, called directly: then the forward forms h @ W_hh^T as an
    N,N product over a transposed W_hh (not T,N over W_hh itself), and both scans leave the loop from two rows up
    (see direct_kernels, loop_gemm)."""
    return fn != 0 and fn in (_found("DIRECT_KERNELS").get("avx512"), _found("DIRECT_KERNELS_64").get("avx512"))


def _mkl_local_threads():
    try:
        import torch

        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = lib.MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
    return fn


# Found on first use, not at import: the search reads /proc/cpuinfo and runs check products. Module attributes
# (SGEMM, ...) through __getattr__ below; this module's own code through _found, which sees a test's monkeypatch.
_FOUND_ON_USE = ("SGEMM", "DGEMM", "DIRECT_KERNELS", "DIRECT_KERNELS_64", "SGEMM_KERNEL", "DGEMM_KERNEL",
                 "MKL_SET_LOCAL_THREADS")
_find_lock = threading.Lock()


def _find_gemms() -> None:
    with _find_lock:
        if "SGEMM" in globals():
            return
        sgemm, dgemm = _blas_addresses()
        globals().update(SGEMM=sgemm, DGEMM=dgemm)  # direct_kernels reads them
        direct, direct_64 = direct_kernels("float32"), direct_kernels("float64")
        globals().update(
            DIRECT_KERNELS=direct,
            DIRECT_KERNELS_64=direct_64,
            SGEMM_KERNEL=direct.get("avx512") or direct.get("avx2") or sgemm,  # what float32 scans call
            DGEMM_KERNEL=direct_64.get("avx512") or dgemm,  # and float64 ones
            MKL_SET_LOCAL_THREADS=_mkl_local_threads() if sgemm else None,
        )


def _found(name: str):
    value = globals().get(name, _FOUND_ON_USE)
    if value is _FOUND_ON_USE:
        _find_gemms()
        value = globals()[name]
    return value


def __getattr__(name: str):
    if name in _FOUND_ON_USE:
        return _found(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """MKL uses one thread on this thread inside the block (a per-thread setting; restored afterwards)."""
    set_local_threads = _found("MKL_SET_LOCAL_THREADS")
    if set_local_threads is None:
        yield
        return
    previous = set_local_threads(1)
    try:
        yield
    finally:
        set_local_threads(previous)


def gemm_address(dtype_name: str) -> int:
    """The GEMM the kernels call for this dtype; 0 where there is no MKL."""
    return _found("SGEMM_KERNEL") if dtype_name == "float32" else _found("DGEMM_KERNEL")


def threaded_gemm_address(dtype_name: str) -> int:
    """MKL's Fortran ?gemm_ for this dtype, which spreads a large product over MKL's threads (the kernels called
    directly run on the calling thread only); 0 where there is no MKL."""
    return _found("SGEMM") if dtype_name == "float32" else _found("DGEMM")


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
            else:  # INTEGER: 8 bytes, read whole by MKL's 64-bit-integer kernels and as its low half by sgemm_ (LP64)
                lty, val = ir.IntType(64), context.cast(builder, val, ty, types.int64)
            slot = cgutils.alloca_once(builder, lty)
            builder.store(val, slot)
            refs.append(builder.bitcast(slot, i8p))
        builder.call(fptr, refs)
        return context.get_dummy_value()

    return sig, codegen


_N, _T = ord("N"), ord("T")

# Against sgemm_ (or dgemm_; see loop_gemm for MKL's own kernels) a per-step GEMM runs as the numba loop below
# where MKL's fixed cost per call dominates: always up to this many multiply-adds ...
SMALL_GEMM = 65536
# ... and at any size while W_hh stays well inside one core's L2 (above it MKL won) ...
LOOP_GEMM_MAX_WEIGHT_BYTES = 256 * 1024
# ... and, in the backward's d_h += d_hg W_hh, whose rows of c and b are short, up to a larger W_hh. These limits
# are the crossovers `benchmarks/numba_breakdown.py gemm` and whole scans measured (benchmarks/RESULTS.md).
LOOP_GEMM_BWD_MAX_WEIGHT_BYTES = 4 * 1024 * 1024


def loop_gemm(kernel: str, fn: int, rows: int, width: int, hidden: int, itemsize: int) -> bool:
    """Whether `kernel`'s ("forward" / "backward") per-step GEMM, over `rows` rows of a width x hidden W_hh, runs
    as the numba loop rather than the MKL routine at `fn` (0: there is none)."""
    if fn == 0:
        return True
    if is_avx512_kernel(fn):
        # MKL's AVX-512 kernel, called directly, beats the loop from two rows up; on one row (a matrix-vector
        # product) its call costs more than the loop saves
        return rows == 1
    # sgemm_ and dgemm_, measured with the forward's product as T,N over W_hh (the AVX2 kernel, unmeasured against
    # the loop, keeps their rules)
    limit = LOOP_GEMM_BWD_MAX_WEIGHT_BYTES if kernel == "backward" else LOOP_GEMM_MAX_WEIGHT_BYTES
    return rows * width * hidden <= SMALL_GEMM or width * hidden * itemsize <= limit


@njit(inline="always")
def gemm_nt(fn, a, b, c, one, zero):
    """MKL: c[M, N] = a[M, K] @ b[N, K]^T. a, b, c C-contiguous 2-D; one/zero: 1 and 0 in the matrix dtype."""
    m, k = a.shape
    n = b.shape[0]
    _fortran_gemm(fn, _T, _N, n, m, k, one, b.ctypes.data, k, a.ctypes.data, k, zero, c.ctypes.data, n)


@njit(inline="always")
def gemm_nn(fn, a, b, c, one, zero):
    """MKL: c[M, N] = a[M, K] @ b[K, N]. a, b, c C-contiguous 2-D; one/zero: 1 and 0 in the matrix dtype."""
    m, k = a.shape
    n = b.shape[1]
    _fortran_gemm(fn, _N, _N, n, m, k, one, b.ctypes.data, n, a.ctypes.data, k, zero, c.ctypes.data, n)


@njit(inline="always")
def gemm_tn_rows(fn, a, x, c, lo, hi, one, zero):
    """MKL: rows lo..hi of c[M, N] = a[K, M]^T @ x[K, N]. a, x, c C-contiguous 2-D; one/zero in the matrix dtype."""
    k, m = a.shape
    n = x.shape[1]
    _fortran_gemm(fn, _N, _T, n, hi - lo, k, one, x.ctypes.data, n, a.ctypes.data + lo * a.itemsize, m, zero,
                  c.ctypes.data + lo * n * c.itemsize, n)


@njit(inline="always")
def gemm_nn_acc(fn, a, b, c, one):
    """MKL: c[M, N] += a[M, K] @ b[K, N]. a, b, c C-contiguous 2-D; one: 1 in the matrix dtype."""
    m, k = a.shape
    n = b.shape[1]
    _fortran_gemm(fn, _N, _N, n, m, k, one, b.ctypes.data, n, a.ctypes.data, k, one, c.ctypes.data, n)


@njit(inline="always")
def gemm_nt_cols(fn, a, b, c, c0, one, zero):
    """MKL: c[:, c0:c0+N] = a[M, K] @ b[N, K]^T, a column block of c. a, b, c C-contiguous 2-D (b may be a block of
    rows); one/zero: 1 and 0 in the matrix dtype."""
    m, k = a.shape
    n = b.shape[0]
    _fortran_gemm(fn, _T, _N, n, m, k, one, b.ctypes.data, k, a.ctypes.data, k, zero,
                  c.ctypes.data + c0 * c.itemsize, c.shape[1])


@njit(inline="always")
def gemm_nn_acc_cols(fn, a, a0, b, c, one):
    """MKL: c[M, N] += a[:, a0:a0+K] @ b[K, N], a column block of a. a, b, c C-contiguous 2-D (b may be a block of
    rows); one: 1 in the matrix dtype."""
    m = a.shape[0]
    k, n = b.shape
    _fortran_gemm(fn, _N, _N, n, m, k, one, b.ctypes.data, n, a.ctypes.data + a0 * a.itemsize, a.shape[1], one,
                  c.ctypes.data, n)


@njit(inline="always")
def _row_block_nn_acc(a, b, c, i, p):
    """c[i:i+4, :] += a[i:i+4, p:p+4] @ b[p:p+4, :]: 16 multiply-adds per loaded vector of b's rows."""
    n = b.shape[1]
    a0, a1, a2, a3 = a[i, p], a[i, p + 1], a[i, p + 2], a[i, p + 3]
    e0, e1, e2, e3 = a[i + 1, p], a[i + 1, p + 1], a[i + 1, p + 2], a[i + 1, p + 3]
    f0, f1, f2, f3 = a[i + 2, p], a[i + 2, p + 1], a[i + 2, p + 2], a[i + 2, p + 3]
    g0, g1, g2, g3 = a[i + 3, p], a[i + 3, p + 1], a[i + 3, p + 2], a[i + 3, p + 3]
    for j in range(n):
        b0, b1, b2, b3 = b[p, j], b[p + 1, j], b[p + 2, j], b[p + 3, j]
        c[i, j] = c[i, j] + a0 * b0 + a1 * b1 + a2 * b2 + a3 * b3
        c[i + 1, j] = c[i + 1, j] + e0 * b0 + e1 * b1 + e2 * b2 + e3 * b3
        c[i + 2, j] = c[i + 2, j] + f0 * b0 + f1 * b1 + f2 * b2 + f3 * b3
        c[i + 3, j] = c[i + 3, j] + g0 * b0 + g1 * b1 + g2 * b2 + g3 * b3


@njit(inline="always")
def _pair_block_nn_acc(a, b, c, i, p):
    """c[i:i+2, :] += a[i:i+2, p:p+4] @ b[p:p+4, :]."""
    n = b.shape[1]
    a0, a1, a2, a3 = a[i, p], a[i, p + 1], a[i, p + 2], a[i, p + 3]
    e0, e1, e2, e3 = a[i + 1, p], a[i + 1, p + 1], a[i + 1, p + 2], a[i + 1, p + 3]
    for j in range(n):
        b0, b1, b2, b3 = b[p, j], b[p + 1, j], b[p + 2, j], b[p + 3, j]
        c[i, j] = c[i, j] + a0 * b0 + a1 * b1 + a2 * b2 + a3 * b3
        c[i + 1, j] = c[i + 1, j] + e0 * b0 + e1 * b1 + e2 * b2 + e3 * b3


@njit(inline="always")
def _k_tail_nn_acc(a, b, c, r0, r1, p0):
    """c[r0:r1, :] += a[r0:r1, p0:] @ b[p0:, :], one k-step at a time (the k-steps a block leaves)."""
    n = b.shape[1]
    for r in range(r0, r1):
        for p in range(p0, a.shape[1]):
            av = a[r, p]
            for j in range(n):
                c[r, j] += av * b[p, j]


@njit(inline="always")
def transpose_into(a, out):
    """out[C, R] = a[R, C]^T, in 8 x 8 tiles (the constant trip counts let the compiler keep a tile in registers
    and store whole rows of it), then the edges."""
    rows, cols = a.shape
    r8 = rows - rows % 8
    c8 = cols - cols % 8
    for i0 in range(0, r8, 8):
        for j0 in range(0, c8, 8):
            for j in range(j0, j0 + 8):
                for i in range(i0, i0 + 8):
                    out[j, i] = a[i, j]
        for j in range(c8, cols):
            for i in range(i0, i0 + 8):
                out[j, i] = a[i, j]
    for i in range(r8, rows):
        for j in range(cols):
            out[j, i] = a[i, j]


@njit(inline="always")
def loop_nn_acc(a, b, c):
    """c[M, N] += a[M, K] @ b[K, N] as a loop LLVM vectorizes over N: for GEMMs where it beats MKL, or without MKL.

    Blocks of four rows (then two) by four k-steps: each vector of b loaded serves 16 (8) multiply-adds, and the
    values of a that a block multiplies by stay in registers (eight k-steps' 32 values do not fit AVX2's 16 vector
    registers, and spill). A last single row takes eight k-steps a pass, its eight values fitting. Every output
    still adds its k terms in order, one after another; where the compiler fuses multiply-adds may differ from a
    plain loop's, so the last bit can."""
    m, k = a.shape
    n = b.shape[1]
    k4 = k - k % 4
    k8 = k - k % 8
    m4 = m - m % 4
    m2 = m - m % 2
    for i in range(0, m4, 4):
        for p in range(0, k4, 4):
            _row_block_nn_acc(a, b, c, i, p)
        _k_tail_nn_acc(a, b, c, i, i + 4, k4)
    if m4 < m2:  # a leftover pair of rows
        for p in range(0, k4, 4):
            _pair_block_nn_acc(a, b, c, m4, p)
        _k_tail_nn_acc(a, b, c, m4, m2, k4)
    if m2 < m:  # a single leftover row, eight k-steps per pass
        i = m - 1
        for p in range(0, k8, 8):
            a0, a1, a2, a3 = a[i, p], a[i, p + 1], a[i, p + 2], a[i, p + 3]
            a4, a5, a6, a7 = a[i, p + 4], a[i, p + 5], a[i, p + 6], a[i, p + 7]
            for j in range(n):
                c[i, j] = (c[i, j] + a0 * b[p, j] + a1 * b[p + 1, j] + a2 * b[p + 2, j] + a3 * b[p + 3, j]
                           + a4 * b[p + 4, j] + a5 * b[p + 5, j] + a6 * b[p + 6, j] + a7 * b[p + 7, j])
        _k_tail_nn_acc(a, b, c, i, m, k8)


__all__ = ["SGEMM", "DGEMM", "SGEMM_KERNEL", "DGEMM_KERNEL", "is_avx512_kernel", "SMALL_GEMM",  # noqa: F822
           "LOOP_GEMM_MAX_WEIGHT_BYTES", "LOOP_GEMM_BWD_MAX_WEIGHT_BYTES", "loop_gemm", "gemm_address",
           "threaded_gemm_address", "gemm_nt", "gemm_nn", "gemm_nn_acc", "gemm_nt_cols", "gemm_nn_acc_cols",
           "gemm_tn_rows", "loop_nn_acc", "transpose_into", "single_threaded_blas"]
