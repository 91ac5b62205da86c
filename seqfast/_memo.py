"""One bounded memo for the per-call fast paths (backend choices, queries, scan plans, constant arrays).

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
