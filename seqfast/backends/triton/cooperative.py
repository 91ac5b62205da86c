"""Host side of the cooperative kernels (coop_kernels.py): how a shape splits over the GPU's SMs, the co-residency
guard, and the launches (one for the whole sequence on a GPU; one per step, or per phase of a step, in sequential
mode). Importing this module never imports triton.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...registry import CellSpec

__all__ = ["CoopPlan", "plan_cooperative", "launch_cooperative", "device_sm_count", "MIN_SLICE"]

MIN_SLICE = 16  # hidden units per program at the least: tl.dot's smallest block
H100_SMS = 132  # the SM count assumed without a CUDA device (interpreter, ahead-of-time compilation)


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sm_count() -> int:
    """The current CUDA device's SM count (MIG shrinks it); an H100's without a CUDA device."""
    return _sm_count_of(torch.cuda.current_device()) if torch.cuda.is_available() else H100_SMS


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


@dataclass(frozen=True)
class CoopPlan:
    """The cooperative grid of one (cell, batch, hidden, dtype): `groups` batch groups of `block_b` rows, each split
    into `slices` programs of `block_j` hidden units; `block_k` is the padded hidden size (the reduction)."""

    groups: int
    slices: int
    block_b: int
    block_j: int
    block_k: int
    share_bytes: int  # the part of W_hh each program holds on chip (its rows forward, its columns backward)
    num_warps: int = 4

    @property
    def programs(self) -> int:
        return self.groups * self.slices

    def describe(self, sm_count: int) -> str:
        """One line for `seqfast info`."""
        return (f"cooperative: {self.groups} batch group(s) x {self.slices} slice(s) of {self.block_j} units = "
                f"{self.programs} programs (<= {sm_count} SMs), {self.share_bytes / 1024:.0f} KiB of W_hh on chip "
                f"per program, {self.block_b} batch rows/program, a grid barrier per step")

    def constants(self) -> dict[str, int]:
        return dict(SLICES=self.slices, BLOCK_B=self.block_b, BLOCK_J=self.block_j, BLOCK_K=self.block_k,
                    num_warps=self.num_warps, num_stages=1)


def plan_cooperative(cell: CellSpec, batch: int, hidden: int, dtype: torch.dtype, *, sm_count: int, budget: int,
                     block_b: int = 16) -> tuple[CoopPlan | None, str]:
    """(the plan, "") or (None, why the cooperative grid cannot run this shape: the caller keeps its usual path).

    Batch rows split first (groups of block_b rows never meet at a barrier), then each group's hidden units split
    into as many power-of-two slices as the remaining SMs allow, none thinner than MIN_SLICE units. The guard: every
    program resident at once (at most one per SM) and each program's W_hh share within `budget` bytes of shared
    memory, else a barrier would wait for a program that cannot start.
    """
    if sm_count < 1:
        raise ValueError(f"triton cooperative: sm_count must be >= 1, got {sm_count}")
    if cell.pointwise is not None and cell.pointwise.stages:
        return None, "a staged cell exchanges each stage's vector: not in the cooperative kernels"
    groups = -(-batch // block_b)
    if groups > sm_count:
        return None, f"{groups} batch groups of {block_b} rows exceed the {sm_count} SMs"
    block_k = max(MIN_SLICE, 1 << max(0, (hidden - 1).bit_length()))
    slices = min(block_k // MIN_SLICE, _floor_pow2(sm_count // groups))
    block_j = block_k // slices
    per_gate = {"dense": block_k * block_j, "diagonal": block_j, "none": 0}[cell.recurrence]
    share = cell.num_gates * per_gate * dtype.itemsize
    # the weight operand staged in shared memory, and the per-step h (or d_hg) operand blocks: an upper bound of
    # what the compiled kernels use (aot.py reads it)
    need = share + (cell.num_gates + 1) * block_b * block_k * dtype.itemsize
    if need > budget:
        return None, (f"each program needs ~{need / 1024:.0f} KiB of shared memory (W_hh share "
                      f"{share / 1024:.0f} KiB), over the {budget / 1024:.0f} KiB available")
    return CoopPlan(groups, slices, block_b, block_j, block_k, share), ""


def launch_cooperative(kernel, plan: CoopPlan, cell: CellSpec, head: tuple, tail: tuple, sizes: tuple[int, int, int],
                       consts: dict, *, whole: dict, per_step: list[dict], sequential: bool | None, interpret: bool
                       ) -> None:
    """Run `kernel` (coop_forward or coop_backward) over every step. head: its tensors up to the workspace, tail:
    those after the barrier words, sizes: (T, B, H), consts: the flags the backend's kernels take (the on-chip /
    tiled ones are replaced by the plan's). On a GPU one launch walks every step with the grid barrier (`whole`);
    in sequential mode (None: under the interpreter) each step is one launch per entry of `per_step`, the launch
    boundary being the barrier.
    Cells without a dense recurrence exchange nothing: one launch in either mode."""
    consts = {k: v for k, v in consts.items()
              if k not in ("ON_CHIP", "BLOCK_B", "BLOCK_H", "BLOCK_K", "num_warps", "num_stages")}
    consts.update(plan.constants())
    if not interpret:  # the driver rejects a grid that cannot be co-resident, where a plain launch would hang
        consts["launch_cooperative_grid"] = True
    barriers = torch.zeros(plan.groups, dtype=torch.int32, device=head[0].device)  # one word per batch group
    args = (*head, barriers, *tail, *sizes)
    grid = (plan.programs,)
    if (interpret if sequential is None else sequential) and cell.recurrence == "dense":
        for step in range(sizes[0]):
            for phase in per_step:
                kernel[grid](*args, step, 1, **consts, **phase)
    else:
        kernel[grid](*args, 0, sizes[0], **consts, **whole)
