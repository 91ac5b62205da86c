"""The numbers the generated kernels and their callers share: scratch rows, kernel arguments, argument-block slots.

Scratch: each kernel keeps one chunk of CHUNK units of one batch row in `buf[rows, CHUNK]`, at constant row
offsets of a constant stride, so LLVM can prove the pointwise loop's iterations independent and vectorizes it
without runtime alias checks (with the kernels' many array arguments it otherwise gives up: "too many memory checks
needed"). ForwardRows / BackwardRows name the rows; the generated module defines each field as a constant.

Arguments: forward_params / backward_params / WEIGHT_GRAD_PARAMS list a scan kernel's arguments and their kinds;
one list drives the kernel's signature, its team launcher and its entry (see _team.py). The launcher writes them
into an int64 block after the BLOCK header's slots, at the slots block_slots() gives (named constants in the
generated module too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

CHUNK = 128  # units per chunk: the scratch rows' stride, a compile-time constant; a multiple of 16, since the
# pointwise loops run on whole vectors of up to 16 lanes


@dataclass(frozen=True)
class Layout:
    """What a cell's kernels are unrolled over: G gates, S states, per-unit params of [k*H] each, the
    recurrence, and a staged cell's gate groups."""

    G: int
    S: int
    widths: tuple[int, ...]  # per-unit params: k of each
    recurrence: str
    groups: tuple[tuple[int, int], ...] = ()  # (first, end) gate of each recurrent product of a staged cell

    @property
    def staged(self) -> bool:
        return len(self.groups) > 1

    @property
    def P(self) -> int:
        """Per-unit scalars: the pointwise `params` tuple's length."""
        return sum(self.widths)

    def param_values(self) -> list[tuple[int, int]]:
        """(param index, r) of every per-unit scalar, in the `params` tuple's order (value r of unit j of param i
        is p<i>[r*H + j])."""
        return [(i, r) for i, k in enumerate(self.widths) for r in range(k)]


class ForwardRows(NamedTuple):
    """A forward pass's scratch rows: input gates, recurrent gates, states, per-unit params, new states."""

    XG: int
    HG: int
    ST: int
    PR: int
    NS: int
    ROWS: int  # the row count

    @classmethod
    def of(cls, lay: Layout) -> ForwardRows:
        G, S = lay.G, lay.S
        return cls(0, G, 2 * G, 2 * G + S, 2 * G + S + lay.P, 2 * G + 2 * S + lay.P)


class BackwardRows(NamedTuple):
    """A backward pass's scratch rows: input gates, recurrent gates, states, the new states' gradients,
    per-unit params, then the results (d_xg, d_hg, d_state, d_params)."""

    XG: int
    HG: int
    ST: int
    DN: int
    PR: int
    DX: int
    DH: int
    DS: int
    DP: int
    ROWS: int

    @classmethod
    def of(cls, lay: Layout) -> BackwardRows:
        G, S, P = lay.G, lay.S, lay.P
        PR = 2 * G + 2 * S
        DX = PR + P
        DS = DX + 2 * G
        return cls(0, G, 2 * G, 2 * G + S, PR, DX, DX + G, DS, DS + S, DS + S + P)


class BLOCK(NamedTuple):
    """The argument block's header slots; the kernel's arguments follow from FIRST_ARGUMENT."""

    THREAD_NUM: int = 0  # omp_get_thread_num's address
    TEAM_SIZE: int = 1  # omp_get_num_threads' address
    MKL_LOCAL: int = 2  # MKL_Set_Num_Threads_Local's address, or 0
    COUNT: int = 3  # the number of row ranges (unit ranges, for the _units kernels)
    RANGES: int = 4  # address of the ranges [COUNT, 2]
    DONE: int = 5  # address of the done flags [COUNT]
    RANGE: int = 6  # the range to run (-1: the OpenMP thread's own)
    SYNC: int = 7  # the _units kernels: address of their barrier's counter
    SHARED: int = 8  # forward_units: address of the h its threads share [2, B, H]
    PIPE: int = 9  # forward_pipelined: address of its projection's arguments (PIPE)
    FIRST_ARGUMENT: int = 10


PIPE_STEPS = 8  # steps forward_pipelined's projecting thread projects between two counts


class PIPE(NamedTuple):
    """forward_pipelined's arguments to the thread that projects the input (an int64 array at the block's PIPE
    slot)."""

    ENTRY: int = 0  # the scan's own entry (forward_entry's address), which the first thread runs
    FN: int = 1  # the GEMM's address
    X: int = 2  # x [rows, inputs], W_ih [G*H, inputs], x_proj [rows, G*H]: addresses
    W: int = 3
    X_PROJ: int = 4
    ROWS: int = 5
    INPUTS: int = 6
    BATCH: int = 7
    REVERSE: int = 8  # the scan runs from the last step: the projection does too
    READY: int = 9  # steps projected so far, in the scan's order (written with release ordering)
    SIZE: int = 10


# Kernel arguments and their kinds: "i" int, "b" bool, "lo"/"hi" the row range, "F<n>" an n-d array of the
# kernel's dtype, "I1" int64 lengths, "D1r"/"F1r" one float64 / kernel-dtype accumulator row per range (the
# launcher takes them as [ranges, n]).
def _common_params(lay: Layout) -> list[tuple[str, str]]:
    w = "F2" if lay.recurrence == "dense" else "F1"
    return ([("gemm_fn", "i"), ("small", "b"), ("b_lo", "lo"), ("b_hi", "hi"), ("x", "F3"), ("xbias", "F1"),
             ("w", w), ("bias", "F1")] + [(f"p{i}", "F1") for i in range(len(lay.widths))])


def forward_params(lay: Layout) -> list[tuple[str, str]]:
    return (_common_params(lay) + [(f"init{i}", "F2") for i in range(lay.S)] + [(f"s{i}", "F2") for i in range(lay.S)]
            + [("lengths", "I1"), ("reverse", "b"), ("out", "F3"), ("hg", "F3"), ("saved_st", "F4"),
               ("need_saved", "b"), ("save_preact", "b"), ("gemm_nn", "b"), ("ready", "i")]
            + ([("vs", "F4")] if lay.staged else []))


def backward_params(lay: Layout) -> list[tuple[str, str]]:
    return (_common_params(lay) + [("saved_st", "F4"), ("lengths", "I1"), ("reverse", "b"), ("grad_out", "F3")]
            + [(f"dfinal{i}", "F2") for i in range(lay.S)] + [(f"d{i}", "F2") for i in range(lay.S)]
            + [("dx", "F3"), ("write_dx", "b"), ("hgd", "F3"), ("preact", "b"), ("dbias", "D1r"), ("dxbias", "D1r")]
            + [(f"dp{i}", "F1r") for i in range(len(lay.widths))])


WEIGHT_GRAD_PARAMS = [("gemm_fn", "i"), ("small", "b"), ("b_lo", "lo"), ("b_hi", "hi"), ("a", "F2"), ("x", "F2"),
                      ("c", "F2")]


def slots_used(kind: str) -> int:
    """Block entries an argument of this kind takes: a scalar its value; an array its address then its shape;
    an accumulator its address and row length."""
    if kind in ("i", "b"):
        return 1
    return 2 if kind.endswith("r") else 1 + int(kind[1])


def block_slots(params: list[tuple[str, str]]) -> tuple[dict[str, int], int]:
    """({argument: its first slot} for every argument the block carries (not the row range), the block's size)."""
    slots, at = {}, BLOCK().FIRST_ARGUMENT
    for name, kind in params:
        if kind not in ("lo", "hi"):
            slots[name] = at
            at += slots_used(kind)
    return slots, at


def step_buffers(lay: Layout, backward: bool) -> list[tuple[str, str]]:
    """(name, shape) of every buffer a one-step kernel takes by address, in argument order."""
    G, S = lay.G, lay.S
    weights = [("x", "(B, I)"), ("w_ih", f"({G} * H, I)"), ("xbias", f"({G} * H,)"), ("w", f"({G} * H, H)"),
               ("bias", f"({G} * H,)")] + [(f"p{i}", f"({k} * H,)") for i, k in enumerate(lay.widths)]
    states = [(f"s{i}", "(B, H)") for i in range(S)]
    work = [("work", f"(2, B, {G} * H)")]
    if not backward:
        return weights + states + [(f"n{i}", "(B, H)") for i in range(S)] + work
    return (weights + states + work + [(f"dn{i}", "(B, H)") for i in range(S)] + [(f"d{i}", "(B, H)") for i in range(S)]
            + [("dx", "(B if need_dx else 0, I)"), ("dw_ih", f"({G} * H if need_dw else 0, I)"),
               ("dw", f"({G} * H if need_dw else 0, H)"), ("dxbias", f"({G} * H if need_dw else 0,)"),
               ("dbias", f"({G} * H if need_dw else 0,)")]
            + [(f"dp{i}", f"({k} * H if need_dw else 0,)") for i, k in enumerate(lay.widths)])


__all__ = ["CHUNK", "Layout", "ForwardRows", "BackwardRows", "BLOCK", "PIPE", "PIPE_STEPS", "forward_params",
           "backward_params", "WEIGHT_GRAD_PARAMS", "slots_used", "block_slots", "step_buffers"]
