"""The `torch` backend: a plain per-step loop over the cell's reference step; autograd does the backward.

It runs every cell on every device and dtype, and is the executable specification the other backends are tested
against. Variable lengths: a step past a sequence's length keeps its state and writes zeros. reverse=True reverses
each sequence within its own length, runs forward, and reverses the outputs back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cells.common import RECURRENT_MASK, RECURRENT_MASK_APPLIED, ZONEOUT_MASKS
from ..registry import Backend, CellSpec, Weights


def reverse_within_lengths(x: Tensor, lengths: Tensor | None) -> Tensor:
    """x [T, B, ...] with each column b's first lengths[b] steps reversed; padding steps stay where they are."""
    if lengths is None:
        return x.flip(0)
    steps = x.shape[0]
    t = torch.arange(steps, device=x.device).unsqueeze(1)
    lens = lengths.to(x.device).unsqueeze(0)
    index = torch.where(t < lens, lens - 1 - t, t)  # [T, B], an involution
    index = index.reshape(steps, -1, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(0, index)


class TorchBackend(Backend):
    name = "torch"
    description = "reference per-step PyTorch loop (every cell, device and dtype; autograd backward)"
    devices = None
    dtypes = None
    priority = 0
    options = frozenset({"return_states", "recurrent_dropout", "zoneout"})

    def scan(self, cell: CellSpec, x_proj: Tensor, state0: tuple[Tensor, ...], weights: Weights,
             lengths: Tensor | None, reverse: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        out, final, _ = self._loop(cell, x_proj, state0, weights, lengths, reverse, False)
        return out, final

    def scan_states(self, cell: CellSpec, x_proj: Tensor, state0: tuple[Tensor, ...], weights: Weights,
                    lengths: Tensor | None, reverse: bool) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        return self._loop(cell, x_proj, state0, weights, lengths, reverse, True)

    def _loop(self, cell: CellSpec, x_proj: Tensor, state0: tuple[Tensor, ...], weights: Weights,
              lengths: Tensor | None, reverse: bool, record: bool):
        """The scan; record: also every step's state. The module options travel in `weights` (the module puts
        them there only for this backend): RECURRENT_MASK, an [B, H] mask (scaled) on the h that enters the
        recurrent product, read by cells.recurrent_term; ZONEOUT_MASKS, per state a [T, B, *] bool mask by time
        step, True where the unit keeps its previous value."""
        zoneout = weights.get(ZONEOUT_MASKS)
        if zoneout is not None:
            weights = Weights({k: v for k, v in weights.items() if k != ZONEOUT_MASKS})
            if reverse:
                zoneout = tuple(reverse_within_lengths(m, lengths) for m in zoneout)
        masked = weights.get(RECURRENT_MASK) is not None
        x = reverse_within_lengths(x_proj, lengths) if reverse else x_proj
        active = None
        if lengths is not None:
            steps = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
            active = (steps < lengths.to(x.device).unsqueeze(0)).unsqueeze(-1)  # [T, B, 1]
        state = state0
        outputs, records = [], []
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        for t in range(x.shape[0]):
            new = cell.reference_step(x[t], state, weights)
            if masked and t == 0 and not weights.get(RECURRENT_MASK_APPLIED):
                raise ValueError(f"recurrent_dropout: cell {cell.name!r} does not form its recurrent product with "
                                 "seqfast.cells.recurrent_term, so the mask on h cannot be applied")
            if zoneout is not None:
                new = tuple(torch.where(m[t], s, n) for m, n, s in zip(zoneout, new, state, strict=True))
            if active is not None:
                new = tuple(torch.where(active[t], n, s) for n, s in zip(new, state, strict=True))
                outputs.append(torch.where(active[t], new[0], zero))
                if record:
                    records.append(tuple(torch.where(active[t], n, zero) for n in new))
            else:
                outputs.append(new[0])
                if record:
                    records.append(new)
            state = new
        out = torch.stack(outputs)
        if reverse:
            out = reverse_within_lengths(out, lengths)
        states: tuple[Tensor, ...] = ()
        if record:
            states = tuple(torch.stack(per_state) for per_state in zip(*records, strict=True))
            if reverse:
                states = tuple(reverse_within_lengths(s, lengths) for s in states)
        return out, tuple(state), states

    def step(self, cell: CellSpec, x: Tensor, state: tuple[Tensor, ...], params, names) -> tuple[Tensor, ...]:
        by_name = dict(zip(names, params, strict=True))
        weights = Weights(weight_hh=None, bias_hh=None)
        weights.update(by_name)
        return tuple(cell.reference_step(F.linear(x, by_name["weight_ih"], by_name.get("bias_ih")), state, weights))
