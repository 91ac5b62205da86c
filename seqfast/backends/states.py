"""Every step's state from what a fused forward saves for its backward (Backend.scan_states on numba, triton).

The kernels save the state before each step, [S, T, B, H], indexed either by loop step k ("loop_step": a reversed
row of length L runs time t = L-1-k; zeros at padding steps) or by time ("time"). scan_states returns the state
after each time step, by time, zeros past each sequence's length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import reverse_within_lengths


def states_after_steps(before: Tensor, final: list[Tensor], lengths: Tensor | None, reverse: bool,
                       indexed_by: str) -> tuple[Tensor, ...]:
    """before [S, T, B, H] (the saved states), final (the final states) -> per state [T, B, H], by time."""
    steps, batch = before.shape[1], before.shape[2]
    k = torch.arange(steps, device=before.device).view(steps, 1, 1)
    lens = (torch.full((batch,), steps, device=before.device) if lengths is None
            else lengths.to(before.device)).view(1, -1, 1)
    zero = torch.zeros((), dtype=before.dtype, device=before.device)
    by_time_reversed = reverse and indexed_by == "time"
    states = []
    for i, f in enumerate(final):
        if by_time_reversed:  # after time t comes the state before t - 1; t = 0 is the walk's last step
            after = torch.cat([f.unsqueeze(0), before[i, :-1]])
        else:  # after step k comes the state before k + 1; a sequence's last step: its final state
            after = torch.cat([before[i, 1:], torch.zeros_like(before[i, :1])])
            after = torch.where(k == lens - 1, f.unsqueeze(0), after)
        after = torch.where(k < lens, after, zero)
        states.append(reverse_within_lengths(after, lengths) if reverse and not by_time_reversed else after)
    return tuple(states)
