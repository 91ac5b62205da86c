"""The types that pass between the fused-backend glue (fused.py) and a backend's forward() and backward(): what one
scan runs on, who owns a buffer handed to backward(), and what an autograd node saved for it. They are built on
every training call, so they stay cheap: a slots dataclass (~0.4 us to build, where a frozen one takes ~2 us), a
str Enum member and a NamedTuple.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

if TYPE_CHECKING:
    from ..spec import CellSpec


@dataclass(slots=True, eq=False)
class ScanInputs:
    """One layer-direction's scan as FusedBackend.forward and backward receive it. Read-only by convention (the
    glue builds one per call; dataclasses.replace makes a changed copy); not frozen, since a frozen dataclass's
    __init__ costs five times as much. Tensors compare by identity (eq=False): == on tensors is elementwise."""

    cell: CellSpec
    x_proj: Tensor | None  # [T, B, G*H]; None only in backward(), where backward_reads_x_proj(cell) is False
    state0: list[Tensor] | None  # [B, H] each; None: zero states (see FusedBackend's capability flags)
    weights: list[Tensor | None]  # in cell.recurrent_param_names() order, None where absent
    lengths: Tensor | None  # [B] or None (every sequence runs all T steps)
    reverse: bool
    x_bias: Tensor | None = None  # [G*H], not yet in x_proj: only for backends with fuses_input_bias


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


__all__ = ["ScanInputs", "Ownership", "SavedScan", "unpack_saved"]
