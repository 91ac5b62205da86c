"""The products of a one-row step (batch 1) as numba loops, for the one-step kernels.

MKL's GEMM kernels take a slow path for a single row: on a 2-core Zen 5 EPYC, x W^T for x [1, K] and W [4K, K]
(an LSTM step's pair of products) took 52 us through mkl_blas_avx512_xsgemm at K=256 and 377 us at K=512, against
25 and 101 us as the dot products below, though the same kernel ran the two-row products in 21 and 84 us.
A large step's two forward products, of one row or more, may split over torch's OpenMP threads (pair_nt), and
its backward's with them (pair_nn), where measured faster.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit

from ._blas import _N as N
from ._blas import _fortran_gemm as fortran_gemm
from ._blas import gemm_nn, gemm_nn_acc, gemm_nt, gemm_nt_cols, gemm_tn_rows
from ._team import call_int, gomp_parallel, keep_alive, load_acquire, pointer_to, store_release


# reassociation lets LLVM vectorize each dot product's sum (the kernels compile with FMA contraction only); it
# assumes nothing about NaN or inf, which propagate as in any order of the sum
@njit(nogil=True, fastmath={"contract", "reassoc"}, error_model="numpy")
def rows_nt(a, w, c, zero, lo, hi):
    """c[0, lo:hi] = a[0, K] @ w[lo:hi, K]^T, one dot product per output over a row of w, which is contiguous."""
    k = a.shape[1]
    for n in range(lo, hi):
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




# A step's two forward products (xg = x W_ih^T, hg = h W_hh^T) split over a team of torch's OpenMP threads: each
# thread takes one part of the output columns of both, so each reads its share of the weights; a part of a batch
# above one row is a GEMM of a block of the weights' rows, on the single-threaded GEMM at PART_GEMM. `team` is the
# address of an int64 array TEAM_FIELDS long (the step's plan keeps it), the parts' argument block BLOCK_FIELDS.
# The backward's products (pair_nn) split too: for a batch, d_h's and d_x's columns and the weight gradients' rows;
# for one row, the weights' rows, each part's terms of d_h and d_x summed afterwards (splitting their columns
# instead, each thread reading every row of the weights in part, ran a training loop slower).
GOMP, TEAM_THREAD_NUM, ENTRY, BACKWARD_ENTRY, PART_GEMM, PARTS, THREADS, TEAM_FIELDS = range(8)  # THREADS: the team
# asked for (in tests, fewer than PARTS)
THREAD_NUM, BLOCK_PARTS, DONE, FN, X, W_IH, XG, H, W_HH, HG, ROWS, INPUTS, HIDDEN, WIDTH, D_X, D_H, D_W_IH, D_W_HH, \
    NEED_DX, NEED_DW, PARTIAL_H, PARTIAL_X, BLOCK_FIELDS = range(23)
_ALIGN = 16  # parts start at multiples of this many columns: no two threads write one cache line


@njit(inline="always")
def _bounds(part, parts, width):
    lo = part * width // parts // _ALIGN * _ALIGN
    hi = width if part == parts - 1 else (part + 1) * width // parts // _ALIGN * _ALIGN
    return lo, hi


@njit(inline="always")
def _operands(block, zero):
    """x, W_ih, xg, h, W_hh, hg of a parts' block, as arrays."""
    rows, inputs, hidden, width = block[ROWS], block[INPUTS], block[HIDDEN], block[WIDTH]
    return (carray(pointer_to(block[X], zero), (rows, inputs)), carray(pointer_to(block[W_IH], zero), (width, inputs)),
            carray(pointer_to(block[XG], zero), (rows, width)), carray(pointer_to(block[H], zero), (rows, hidden)),
            carray(pointer_to(block[W_HH], zero), (width, hidden)), carray(pointer_to(block[HG], zero), (rows, width)))


@njit(nogil=True)
def _part(block, part, one, zero):
    lo, hi = _bounds(part, block[BLOCK_PARTS], block[WIDTH])
    x, w_ih, xg, h, w_hh, hg = _operands(block, zero)
    if block[ROWS] == 1:
        rows_nt(x, w_ih, xg, zero, lo, hi)
        rows_nt(h, w_hh, hg, zero, lo, hi)
    elif hi > lo:
        gemm_nt_cols(block[FN], x, w_ih[lo:hi], xg, lo, one, zero)
        gemm_nt_cols(block[FN], h, w_hh[lo:hi], hg, lo, one, zero)


@njit(nogil=True)
def _backward_part(block, part, one, zero):
    parts, fn = block[BLOCK_PARTS], block[FN]
    rows, inputs, hidden, width = block[ROWS], block[INPUTS], block[HIDDEN], block[WIDTH]
    x, w_ih, xg, h, w_hh, hg = _operands(block, zero)
    if rows == 1:
        _one_row_backward_part(block, part, x, w_ih, xg, h, w_hh, hg, zero)
        return
    size = w_hh.itemsize
    lo, hi = _bounds(part, parts, hidden)
    if hi > lo:  # d_h[:, lo:hi] += d_hg W_hh[:, lo:hi]
        fortran_gemm(fn, N, N, hi - lo, rows, width, one, w_hh.ctypes.data + lo * size, hidden, hg.ctypes.data,
                     width, one, block[D_H] + lo * size, hidden)
    lo, hi = _bounds(part, parts, inputs)
    if block[NEED_DX] and hi > lo:  # d_x[:, lo:hi] = d_xg W_ih[:, lo:hi]
        fortran_gemm(fn, N, N, hi - lo, rows, width, one, w_ih.ctypes.data + lo * size, inputs, xg.ctypes.data,
                     width, zero, block[D_X] + lo * size, inputs)
    lo, hi = _bounds(part, parts, width)
    if block[NEED_DW] and hi > lo:  # the weight gradients' rows lo..hi
        gemm_tn_rows(fn, xg, x, carray(pointer_to(block[D_W_IH], zero), (width, inputs)), lo, hi, one, zero)
        gemm_tn_rows(fn, hg, h, carray(pointer_to(block[D_W_HH], zero), (width, hidden)), lo, hi, one, zero)


@njit(inline="always")
def _partial_nn(a, w, lo, hi, partial, part):
    """partial[part] = a[0, lo:hi] @ w[lo:hi]: rows lo..hi's terms of a one-row product."""
    acc = np.zeros((1, w.shape[1]), dtype=w.dtype)  # its own: the loop vectorizes without aliasing checks
    row_nn_acc(a[:, lo:hi], w[lo:hi], acc)
    for q in range(w.shape[1]):
        partial[part, q] = acc[0, q]


@njit(nogil=True)
def _one_row_backward_part(block, part, x, w_ih, xg, h, w_hh, hg, zero):
    """A one-row backward's part: rows lo..hi of W_hh and W_ih, so each thread streams its share of both (as the
    forward's parts do), their terms of d_h and d_x into this part's row of the partial sums pair_nn adds up, and
    those rows of the weight gradients."""
    parts, inputs, hidden, width = block[BLOCK_PARTS], block[INPUTS], block[HIDDEN], block[WIDTH]
    lo, hi = _bounds(part, parts, width)
    _partial_nn(hg, w_hh, lo, hi, carray(pointer_to(block[PARTIAL_H], zero), (parts, hidden)), part)
    if block[NEED_DX]:
        _partial_nn(xg, w_ih, lo, hi, carray(pointer_to(block[PARTIAL_X], zero), (parts, inputs)), part)
    if block[NEED_DW]:
        outer(xg[:, lo:hi], x, carray(pointer_to(block[D_W_IH], zero), (width, inputs))[lo:hi])
        outer(hg[:, lo:hi], h, carray(pointer_to(block[D_W_HH], zero), (width, hidden))[lo:hi])


@njit(nogil=True)
def part_entry(address, backward, one, zero):
    """A team thread's part, from the block at `address`, of pair_nt's products or (backward) pair_nn's: the body of
    a kernel module's step_rows_entry and step_rows_backward_entry (the cfuncs codegen.entry_address makes)."""
    block = carray(pointer_to(address, np.int64(0)), (BLOCK_FIELDS,))
    part = call_int(block[THREAD_NUM])
    if part < block[BLOCK_PARTS]:
        if backward:
            _backward_part(block, part, one, zero)
        else:
            _part(block, part, one, zero)
        store_release(block[DONE] + 8 * part, 1)


@njit(inline="always")
def _run_parts(t, entry, block, done, backward, one, zero):
    """Start the team on the parts, then run those it left undone here."""
    gomp_parallel(t[GOMP], entry, block.ctypes.data, t[THREADS])
    for part in range(t[PARTS]):
        if load_acquire(done.ctypes.data + 8 * part) == 0:
            if backward:
                _backward_part(block, part, one, zero)
            else:
                _part(block, part, one, zero)
    keep_alive(block)
    keep_alive(done)


@njit(nogil=True)
def pair_nn(team, fn, x, w_ih, xg, h, w_hh, hg, d_x, d_h, d_w_ih, d_w_hh, need_dx, need_dw, one, zero):
    """A step's backward products from d_xg and d_hg (xg and hg here): d_h += d_hg W_hh; with need_dx,
    d_x = d_xg W_ih; with need_dw, d_W_ih = d_xg^T x and d_W_hh = d_hg^T h. On this thread (team 0; one row as
    loops, more by the GEMM at fn), or in parts on a team, as pair_nt."""
    rows = x.shape[0]
    if rows == 1 and team == 0:
        row_nn_acc(hg, w_hh, d_h)
        if need_dx:
            row_nn(xg, w_ih, d_x, zero)
        if need_dw:
            outer(xg, x, d_w_ih)
            outer(hg, h, d_w_hh)
        return
    if team == 0:
        gemm_nn_acc(fn, hg, w_hh, d_h, one)
        if need_dx:
            gemm_nn(fn, xg, w_ih, d_x, one, zero)
        if need_dw:
            gemm_tn_rows(fn, xg, x, d_w_ih, 0, d_w_ih.shape[0], one, zero)
            gemm_tn_rows(fn, hg, h, d_w_hh, 0, d_w_hh.shape[0], one, zero)
        return
    t = carray(pointer_to(team, np.int64(0)), (TEAM_FIELDS,))
    done = np.zeros(t[PARTS], dtype=np.int64)
    block = _block(t, done, x, w_ih, xg, h, w_hh, hg)
    block[D_X] = d_x.ctypes.data
    block[D_H] = d_h.ctypes.data
    block[D_W_IH] = d_w_ih.ctypes.data
    block[D_W_HH] = d_w_hh.ctypes.data
    block[NEED_DX] = need_dx
    block[NEED_DW] = need_dw
    partial_h = np.empty((t[PARTS], d_h.shape[1]), dtype=d_h.dtype)  # a one-row backward's partial sums
    partial_x = np.empty((t[PARTS], d_x.shape[1] if need_dx else 0), dtype=d_h.dtype)
    block[PARTIAL_H] = partial_h.ctypes.data
    block[PARTIAL_X] = partial_x.ctypes.data
    _run_parts(t, t[BACKWARD_ENTRY], block, done, True, one, zero)
    if rows == 1:
        for part in range(t[PARTS]):
            for q in range(d_h.shape[1]):
                d_h[0, q] += partial_h[part, q]
        if need_dx:
            for q in range(d_x.shape[1]):
                d_x[0, q] = partial_x[0, q]
            for part in range(1, t[PARTS]):
                for q in range(d_x.shape[1]):
                    d_x[0, q] += partial_x[part, q]


@njit(inline="always")
def _block(t, done, x, w_ih, xg, h, w_hh, hg):
    block = np.zeros(BLOCK_FIELDS, dtype=np.int64)
    block[THREAD_NUM] = t[TEAM_THREAD_NUM]
    block[BLOCK_PARTS] = t[PARTS]
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
    return block


@njit(nogil=True)
def pair_nt(team, fn, x, w_ih, xg, h, w_hh, hg, one, zero):
    """xg = x W_ih^T and hg = h W_hh^T: on this thread (team 0; one row as loops, since MKL's kernels take a slow
    path for one row, more by the GEMM at fn), or in parts on a team; the parts a smaller team leaves undone (a
    nested region runs a team of one) run here afterwards."""
    if team == 0:
        if x.shape[0] == 1:
            rows_nt(x, w_ih, xg, zero, 0, w_ih.shape[0])
            rows_nt(h, w_hh, hg, zero, 0, w_hh.shape[0])
        else:
            gemm_nt(fn, x, w_ih, xg, one, zero)
            gemm_nt(fn, h, w_hh, hg, one, zero)
        return
    t = carray(pointer_to(team, np.int64(0)), (TEAM_FIELDS,))
    done = np.zeros(t[PARTS], dtype=np.int64)
    block = _block(t, done, x, w_ih, xg, h, w_hh, hg)
    _run_parts(t, t[ENTRY], block, done, False, one, zero)
