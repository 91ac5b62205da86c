"""The products of a one-row step (batch 1) as numba loops, for the one-step kernels.

MKL's GEMM kernels take a slow path for a single row: on a 2-core Zen 5 EPYC, x W^T for x [1, K] and W [4K, K]
(an LSTM step's pair of products) took 52 us through mkl_blas_avx512_xsgemm at K=256 and 377 us at K=512, against
25 and 101 us as the dot products below, though the same kernel ran the two-row products in 21 and 84 us.
"""

from __future__ import annotations

from numba import njit


# reassociation lets LLVM vectorize each dot product's sum (the kernels compile with FMA contraction only); it
# assumes nothing about NaN or inf, which propagate as in any order of the sum
@njit(nogil=True, fastmath={"contract", "reassoc"}, error_model="numpy")
def row_nt(a, w, c, zero):
    """c[0, N] = a[0, K] @ w[N, K]^T, one dot product per output over a row of w, which is contiguous."""
    k = a.shape[1]
    for n in range(w.shape[0]):
        s = zero
        for p in range(k):
            s += a[0, p] * w[n, p]
        c[0, n] = s


@njit(inline="always")
def row_nn_acc(a, w, c):
    """c[0, N] += a[0, K] @ w[K, N]: rows of w scaled and added, a loop LLVM vectorizes over N."""
    n = c.shape[1]
    for p in range(a.shape[1]):
        v = a[0, p]
        for q in range(n):
            c[0, q] += v * w[p, q]


@njit(inline="always")
def row_nn(a, w, c, zero):
    """c[0, N] = a[0, K] @ w[K, N]."""
    for q in range(c.shape[1]):
        c[0, q] = zero
    row_nn_acc(a, w, c)


@njit(inline="always")
def outer(a, b, c):
    """c[M, N] = a[0, M]^T @ b[0, N], the weight gradient of a one-row step."""
    for i in range(c.shape[0]):
        for q in range(c.shape[1]):
            c[i, q] = a[0, i] * b[0, q]
