"""numpy views of the tensors a kernel reads, and the placeholders it reads in place of absent ones.

The kernels take numpy arrays. A weight's view is cached by id(tensor): the same memory, so in-place updates
(optimizer steps, .data writes) show through; a weight whose layout changed (moved, or a .data assignment giving
the same memory another shape, strides or dtype, e.g. a transpose of a square weight) misses, and one that dies
takes its entry with it (the view would otherwise keep its memory alive). A view costs ~1 us to make, a hit 0.2.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import Tensor

NO_X = {name: np.zeros((1, 1, 1), dtype=name) for name in ("float32", "float64")}  # x_proj not read
NO_SAVED = {name: np.empty((0, 0, 0, 0), dtype=name) for name in ("float32", "float64")}  # inference's saved_st
NO_PRODUCTS = {name: np.empty((0, 0, 0), dtype=name) for name in ("float32", "float64")}  # the kernel's own hg

_views: dict[int, tuple] = {}


def _forget(key: int):
    return lambda _ref: _views.pop(key, None)


def layout(t: Tensor) -> tuple:
    """What decides how a view reads t's memory: data_ptr (storage and offset), shape, strides and dtype."""
    return t.data_ptr(), t.shape, t.stride(), t.dtype


def host(t: Tensor) -> np.ndarray:
    """A numpy array of t's data (a view when t is contiguous, cached while t lives)."""
    hit = _views.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == layout(t):
        return hit[2]
    array = t.detach().contiguous().numpy()
    if t.is_contiguous() and not t.is_inference():  # a copy would go stale; inference tensors allow no weakref
        if len(_views) > 1024:
            _views.clear()
        _views[id(t)] = (weakref.ref(t, _forget(id(t))), layout(t), array)
    return array


def is_cached(t: Tensor | int) -> bool:
    """Whether host() holds a view of t (or of the tensor whose id() this is)."""
    return (t if isinstance(t, int) else id(t)) in _views


def state_array(s: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A state (or state gradient) as a numpy array of the scan's dtype (read only by the kernels)."""
    s = s.detach()
    if s.dtype != dtype:
        s = s.to(dtype)
    return s.contiguous().numpy()
