"""The products of a one-row step (batch 1) as numba loops, for the one-step kernels.

MKL's GEMM kernels take a slow path for a single row: on a 2-core Zen 5 EPYC, x W^T for x [1, K] and W [4K, K]
(an LSTM step's pair of products) took 52 us through mkl_blas_avx512_xsgemm at K=256 and 377 us at K=512, against
25 and 101 us as the dot products below, though the same kernel ran the two-row products in 21 and 84 us.
A large step's two forward products, of one row or more, may split over torch's OpenMP threads (pair_nt), where
measured faster.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit

from ._blas import gemm_nt, gemm_nt_cols
from ._team import call_int, gomp_parallel, keep_alive, load_acquire, pointer_to, store_release


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


@njit(nogil=True, fastmath={"contract", "reassoc"}, error_model="numpy")
def rows_nt(a, w, c, zero, lo, hi):
    """row_nt for outputs lo..hi only."""
    k = a.shape[1]
    for n in range(lo, hi):
        s = zero
        for p in range(k):
            s += a[0, p] * w[n, p]
        c[0, n] = s


# A step's two forward products (xg = x W_ih^T, hg = h W_hh^T) split over a team of torch's OpenMP threads: each
# thread takes one part of the output columns of both, so each reads its share of the weights; a part of a batch
# above one row is a GEMM of a block of the weights' rows, on the single-threaded GEMM at PART_GEMM. `team` is the
# address of an int64 array TEAM_FIELDS long (the step's plan keeps it), the parts' argument block BLOCK_FIELDS.
GOMP, TEAM_THREAD_NUM, ENTRY, PART_GEMM, PARTS, THREADS, TEAM_FIELDS = range(7)  # THREADS: the team asked for (in
# tests, fewer than PARTS)
THREAD_NUM, BLOCK_PARTS, DONE, FN, X, W_IH, XG, H, W_HH, HG, ROWS, INPUTS, HIDDEN, WIDTH, BLOCK_FIELDS = range(15)
_ALIGN = 16  # parts start at multiples of this many columns: no two threads write one cache line


@njit(inline="always")
def _bounds(part, parts, width):
    lo = part * width // parts // _ALIGN * _ALIGN
    hi = width if part == parts - 1 else (part + 1) * width // parts // _ALIGN * _ALIGN
    return lo, hi


@njit(nogil=True)
def _part(block, part, one, zero):
    lo, hi = _bounds(part, block[BLOCK_PARTS], block[WIDTH])
    rows, inputs, hidden, width = block[ROWS], block[INPUTS], block[HIDDEN], block[WIDTH]
    x = carray(pointer_to(block[X], zero), (rows, inputs))
    w_ih = carray(pointer_to(block[W_IH], zero), (width, inputs))
    xg = carray(pointer_to(block[XG], zero), (rows, width))
    h = carray(pointer_to(block[H], zero), (rows, hidden))
    w_hh = carray(pointer_to(block[W_HH], zero), (width, hidden))
    hg = carray(pointer_to(block[HG], zero), (rows, width))
    if rows == 1:
        rows_nt(x, w_ih, xg, zero, lo, hi)
        rows_nt(h, w_hh, hg, zero, lo, hi)
    elif hi > lo:
        gemm_nt_cols(block[FN], x, w_ih[lo:hi], xg, lo, one, zero)
        gemm_nt_cols(block[FN], h, w_hh[lo:hi], hg, lo, one, zero)


@njit(nogil=True)
def part_entry(address, one, zero):
    """A team thread's part, from the block at `address`: the body of a kernel module's step_rows_entry (the cfunc
    codegen.entry_address makes)."""
    block = carray(pointer_to(address, np.int64(0)), (BLOCK_FIELDS,))
    part = call_int(block[THREAD_NUM])
    if part < block[BLOCK_PARTS]:
        _part(block, part, one, zero)
        store_release(block[DONE] + 8 * part, 1)


@njit(nogil=True)
def pair_nt(team, fn, x, w_ih, xg, h, w_hh, hg, one, zero):
    """xg = x W_ih^T and hg = h W_hh^T: on this thread (team 0; one row as loops, since MKL's kernels take a slow
    path for one row, more by the GEMM at fn), or in parts on a team; the parts a smaller team leaves undone (a
    nested region runs a team of one) run here afterwards."""
    if team == 0:
        if x.shape[0] == 1:
            row_nt(x, w_ih, xg, zero)
            row_nt(h, w_hh, hg, zero)
        else:
            gemm_nt(fn, x, w_ih, xg, one, zero)
            gemm_nt(fn, h, w_hh, hg, one, zero)
        return
    t = carray(pointer_to(team, np.int64(0)), (TEAM_FIELDS,))
    parts = t[PARTS]
    done = np.zeros(parts, dtype=np.int64)
    block = np.empty(BLOCK_FIELDS, dtype=np.int64)
    block[THREAD_NUM] = t[TEAM_THREAD_NUM]
    block[BLOCK_PARTS] = parts
    block[DONE] = done.ctypes.data
    block[FN] = t[PART_GEMM]
    block[ROWS] = x.shape[0]
    block[X] = x.ctypes.data
    block[W_IH] = w_ih.ctypes.data
    block[XG] = xg.ctypes.data
    block[H] = h.ctypes.data
    block[W_HH] = w_hh.ctypes.data
    block[HG] = hg.ctypes.data
    block[INPUTS] = x.shape[1]
    block[HIDDEN] = h.shape[1]
    block[WIDTH] = w_ih.shape[0]
    gomp_parallel(t[GOMP], t[ENTRY], block.ctypes.data, t[THREADS])
    for part in range(parts):
        if load_acquire(done.ctypes.data + 8 * part) == 0:
            _part(block, part, one, zero)
    keep_alive(block)
    keep_alive(done)
