"""Whether numba can be used, found without importing it (importing seqfast must stay cheap)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

MIN_NUMBA = (0, 60)
DTYPES = {torch.float32: "float32", torch.float64: "float64"}  # the dtypes the kernels are generated for

_reason: dict[str, str | None] = {}  # memo of numba_missing (a plain dict: torch.compile traces through it)


def numba_missing() -> str | None:
    """Why numba cannot be used, else None; looked up once (recheck() looks again)."""
    if "reason" not in _reason:
        reason = None
        if importlib.util.find_spec("numba") is None:
            reason = "numba not installed (pip install 'seqfast[numba]')"
        else:
            try:
                version = importlib.metadata.version("numba")
            except importlib.metadata.PackageNotFoundError:
                version = None
            parts = tuple(int(p) for p in (version or "").split(".")[:2] if p.isdigit())
            if version and parts < MIN_NUMBA:
                reason = f"numba {version} is too old (needs >= {'.'.join(map(str, MIN_NUMBA))})"
        _reason["reason"] = reason
    return _reason["reason"]


def recheck() -> None:
    """Forget what numba_missing found: the next call looks again (after installing numba, or in tests)."""
    _reason.clear()
