"""Input checks shared by the sequence-to-sequence modules: every error names the argument it is about."""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import InputError, check_lengths
from ..registry import CellSpec, registry


def check_tokens(name: str, tokens, vocab_size: int, batch: int | None = None) -> Tensor:
    """A [B, S] integer tensor of ids in [0, vocab_size)."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name}: expected a [B, S] tensor of token ids, got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise InputError(f"{name}: expected a 2-D [B, S] tensor of token ids, got {tokens.dim()}-D of shape "
                         f"{tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise InputError(f"{name}: expected integer token ids, got dtype {tokens.dtype}")
    if batch is not None and tokens.shape[0] != batch:
        raise InputError(f"{name}: expected a batch of {batch} rows like the source, got {tokens.shape[0]}")
    if tokens.shape[1] == 0:
        raise InputError(f"{name}: expected at least one position, got shape {tuple(tokens.shape)}")
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise InputError(f"{name}: token ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")
    return tokens


def resolve_lengths(lengths, mask, batch: int, steps: int, device: torch.device,
                    names: tuple[str, str] = ("lengths", "mask")) -> Tensor:
    """[B] int64 lengths on `device` from `lengths` or a boolean `mask` [B, S] (True = valid, padding at the
    end of each row); all steps valid when both are None."""
    length_name, mask_name = names
    if lengths is not None and mask is not None:
        raise ValueError(f"pass either {length_name}= or {mask_name}=, not both")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise InputError(f"{mask_name}: expected a boolean tensor (True = valid position), got {got}")
        if tuple(mask.shape) != (batch, steps):
            raise InputError(f"{mask_name}: expected shape {(batch, steps)}, got {tuple(mask.shape)}")
        lengths = mask.sum(1)
        prefix = torch.arange(steps, device=mask.device)[None, :] < lengths[:, None]
        if not torch.equal(prefix, mask):
            raise InputError(f"{mask_name}: valid positions must come first in each row, padding after them "
                             f"(rows {torch.nonzero((prefix != mask).any(1)).flatten().tolist()} do not)")
    if lengths is None:
        return torch.full((batch,), steps, dtype=torch.int64, device=device)
    return check_lengths(lengths, batch, steps, what=length_name).to(device)


def padding_mask(lengths: Tensor, steps: int) -> Tensor:
    """[B, S] boolean, True at valid positions."""
    return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {sorted(choices)}, got {value!r}")


def check_cell(cell) -> CellSpec:
    """A registered cell name (or a CellSpec) -> its CellSpec."""
    if isinstance(cell, CellSpec):
        return cell
    if cell not in registry.cells:
        raise ValueError(f"cell: unknown cell {cell!r}; registered cells: {sorted(registry.cells)}")
    return registry.cells[cell]


def check_backend(backend) -> None:
    """None, "auto" or a registered backend's name."""
    if backend is not None and backend != "auto" and backend not in registry.backends:
        raise ValueError(f"backend: unknown backend {backend!r}; known backends: "
                         f"{['auto', *sorted(registry.backends)]}")
