"""The types that pass between the fused-backend glue (fused.py) and a backend's forward() and backward(): who owns a
buffer handed to backward(), and what an autograd node saved for it. Both are built on every training call, so
they stay cheap: a str Enum member and a NamedTuple.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from torch import Tensor


class Ownership(str, Enum):
    """Who owns a buffer handed to FusedBackend.backward (its saved tensors, layer()'s x_proj). A str, so that
    Ownership.KEEP == "keep"."""

    KEEP = "keep"  # the caller's: leave it unchanged (the custom op's inputs, a graph retained for another backward)
    CONSUME = "consume"  # read for the last time: the backward may write over it (as scratch, or its gradient)


class SavedScan(NamedTuple):
    """What a scan's autograd node keeps for its backward, as saved: x_proj, lengths, *state0, *weights, outputs,
    *final, *saved (the backend's own tensors); unpack_saved() reads it back from ctx.saved_tensors."""

    x_proj: Tensor | None  # None where the backward does not read it (layer(), backward_reads_x_proj False)
    lengths: Tensor | None
    state0: list[Tensor]
    weights: list[Tensor | None]
    outputs: Tensor
    final: list[Tensor]
    saved: list[Tensor]


def unpack_saved(tensors: tuple, n_state: int, n_weights: int, n_final: int) -> SavedScan:
    """ctx.saved_tensors (from x_proj on) as a SavedScan: n_state initial states, n_weights weights and n_final
    final states (n_state may be 0 where layer() ran from zero states)."""
    first_weight = 2 + n_state
    out = first_weight + n_weights
    return SavedScan(tensors[0], tensors[1], list(tensors[2:first_weight]), list(tensors[first_weight:out]),
                     tensors[out], list(tensors[out + 1 : out + 1 + n_final]), list(tensors[out + 1 + n_final :]))


__all__ = ["Ownership", "SavedScan", "unpack_saved"]
