"""Helpers of the per-call fast paths: one bounded memo (backend choices, queries, scan plans, constant arrays)
and the requires-grad test every call makes.

Every module call looks these up; building them again each time cost a microsecond or more apiece. Keys can vary
without bound in some programs (every sequence length a new shape), so a full table is simply emptied.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

V = TypeVar("V")


def memo(table: dict, key: Hashable, make: Callable[[], V], limit: int = 256) -> V:
    """table[key], made by make() on a miss; the table is emptied first when it holds `limit` entries."""
    value = table.get(key)
    if value is None:
        if len(table) >= limit:
            table.clear()
        value = table[key] = make()
    return value


def any_requires_grad(tensors) -> bool:
    """Whether any of the tensors requires grad. A loop, not any() over a generator: it runs on every call (and
    torch.compile traces it)."""
    for t in tensors:
        if t.requires_grad:
            return True
    return False
