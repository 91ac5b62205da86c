"""Large kernel buffers, recycled across calls.

A training step allocates tens of MB (the outputs, what the forward saves, the backward's d_x_proj). glibc hands
allocations this large back to the kernel when they are freed (mmap, or a trimmed heap), so the next step
page-faults all of it in again, at a cost of up to milliseconds of system time a step, depending on what the
process had allocated before. Buffers of a few hundred KiB suffer it too, so the pool starts at 64 KiB (the
figures: benchmarks/RESULTS.md, "Measurements behind design choices").

The pool keeps a few buffers of at least MIN_BYTES and hands out tensors viewing them. A buffer is free again
once nothing refers to it: every tensor made from it holds a numpy view whose base is the buffer, so its Python
reference count says whether any such tensor is alive. Smaller requests go to torch.empty. The pool holds at most
MAX_KEPT buffers and MAX_KEPT_BYTES, like a caching allocator keeps its blocks after use; clear() lets go.

MIN_BYTES, MAX_KEPT and MAX_KEPT_BYTES are read on every request, so a benchmark or test may set them.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np
import torch
from torch import Tensor

MIN_BYTES = 1 << 16
# buffers the pool holds on to; beyond that, ones no longer in use are dropped. A two-layer bidirectional LSTM
# (T100 B8 H64) holds 13 at once: with 8 kept it still page-faulted 670-1,000 times a step, with 32 180-210.
MAX_KEPT = 32
MAX_KEPT_BYTES = 1 << 31  # and at most this much memory: a larger request gets a buffer of its own

_kept: list[np.ndarray] = []
_lock = threading.Lock()


def _free(index: int) -> bool:
    # references to a kept buffer: its slot in _kept and getrefcount's argument, plus one per live view (every
    # tensor handed out holds one). Read through the list so no local name adds a reference.
    return sys.getrefcount(_kept[index]) == 2


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """torch.empty(shape, dtype=dtype) on the CPU; large ones reuse a pooled buffer (64-byte aligned)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    with _lock:
        # the smallest free buffer that fits, at most twice the size asked for (a small request must not pin a
        # large buffer)
        fits = [i for i in range(len(_kept)) if nbytes <= _kept[i].nbytes <= 2 * nbytes and _free(i)]
        if fits:
            index = min(fits, key=lambda i: _kept[i].nbytes)
        else:
            # make room: forget free buffers, oldest first, while over either limit
            while _kept and (len(_kept) >= MAX_KEPT or sum(b.nbytes for b in _kept) + nbytes > MAX_KEPT_BYTES):
                free = [i for i in range(len(_kept)) if _free(i)]
                if not free:
                    break
                del _kept[free[0]]
            if len(_kept) >= MAX_KEPT or sum(b.nbytes for b in _kept) + nbytes > MAX_KEPT_BYTES:
                return torch.empty(shape, dtype=dtype)  # everything kept is in use: not pooled
            # torch's allocator aligns to 64 bytes; the numpy array over it is what every view points back to
            _kept.append(torch.empty(nbytes, dtype=torch.uint8).numpy())
            index = len(_kept) - 1
        view = _kept[index][:nbytes]  # the tensor holds this numpy view, and so the buffer's count
    return torch.from_numpy(view).view(dtype).view(shape)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def stand_in(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, int]:
    """(one element of dtype expanded to shape, the bytes of a buffer of that shape): what like() takes, made once
    where many buffers of one shape follow (a bound call's outputs)."""
    return torch.empty((), dtype=dtype).expand(shape), math.prod(shape) * dtype.itemsize


def like(stand: tuple[Tensor, int]) -> Tensor:
    """A new C-contiguous buffer of a stand_in()'s shape and dtype: from the pool from MIN_BYTES, else empty_like of
    the stand-in, from torch's allocator (64-byte aligned) at a third of torch.empty(shape)'s cost and below numpy's
    empty with torch.from_numpy."""
    tensor, nbytes = stand
    if nbytes < MIN_BYTES:
        return torch.empty_like(tensor)
    return empty(tensor.shape, tensor.dtype)


def new(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> tuple[Tensor, np.ndarray]:
    """A new kernel buffer as (tensor, numpy array over the same memory). shared: several threads write its rows,
    so it comes from torch (64-byte aligned: a cache line straddling two threads' rows would bounce between the
    cores every step) or the pool; otherwise small ones come from numpy, which costs ~1.5 us less per buffer (2.4
    vs 0.8 with .numpy() and torch.from_numpy counted; a batch-1 LSTM training step makes seven)."""
    if shared or math.prod(shape) * dtype.itemsize >= MIN_BYTES:
        t = empty(shape, dtype)
        return t, t.numpy()
    a = np.empty(shape, dtype=_NUMPY_DTYPES[dtype])
    return torch.from_numpy(a), a


def kept_addresses() -> list[int]:
    """The data addresses of the buffers the pool holds, oldest first."""
    with _lock:
        return [b.ctypes.data for b in _kept]


def clear() -> None:
    """Drop every kept buffer (those still in use are freed by their last tensor)."""
    with _lock:
        _kept.clear()
