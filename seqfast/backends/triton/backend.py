"""The `triton` backend: persistent fused scan kernels, forward and backward, generated per cell (see kernels.py).

Host side only: picks the kernel path for a shape, allocates outputs, saved tensors and workspaces, launches the
generated kernels and forms the recurrent-weight gradient as one GEMM after the backward loop. The FusedBackend
base class wraps forward/backward into a torch.library custom op with autograd (eager training, torch.compile).
Importing this module never imports triton; kernels are generated and compiled on first use.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor

from ...config import reader, setting
from ...registry import CellSpec, Query
from ..fused import FusedBackend
from ..fused_contract import Ownership, ScanInputs
from .codegen import CodegenError, generate_source, load_kernels, param_layout
from .cooperative import CoopPlan, device_sm_count, launch_cooperative, plan_cooperative

__all__ = ["TritonBackend", "KernelPlan", "interpreting"]

_RECURRENCE_CODE = {"dense": 0, "diagonal": 1, "none": 2}


# interpreting() -> bool: TRITON_INTERPRET is set, kernels run on CPU tensors through Triton's interpreter (tests
# only; slow). Read on every selection (TritonBackend.selection_token).
interpreting = reader("triton_interpret")


_SM90_SHARED = 227 * 1024  # H100 (sm_90) shared memory per block with opt-in; the default without a GPU
_MARGIN = 16 * 1024  # layout-conversion scratch next to the weights (measured 4-8 KiB by aot.py)


@functools.cache
def _device_shared_memory(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_multiprocessor - 1024


def _shared_memory_budget() -> int:
    """Shared memory per block a kernel may use: the current CUDA device's opt-in maximum; an H100's when there
    is no CUDA device (interpreter, ahead-of-time compilation)."""
    if torch.cuda.is_available():
        return _device_shared_memory(torch.cuda.current_device())
    return _SM90_SHARED


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # looked up once: it runs on every backend selection


@functools.cache
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _num_stages(cell: CellSpec) -> int:
    return len(cell.pointwise.stages) if cell.pointwise is not None else 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class KernelPlan:
    """How one (cell, hidden size, dtype) runs: weights on chip, or the hidden dimension tiled."""

    on_chip: bool
    block_b: int
    block_h: int
    block_k: int
    num_warps: int
    weight_bytes: int
    num_stages: int = 3  # Triton's software pipelining: >1 prefetches the next step's loads into shared memory

    def describe(self, cell: CellSpec, hidden: int) -> str:
        """One line for `seqfast info`: the path, where W_hh lives, batch rows per program."""
        kib = f"{self.weight_bytes / 1024:.0f} KiB"
        rows = f"{self.block_b} batch rows/program"
        if not self.on_chip:
            tiles = -(-hidden // self.block_h)
            return f"persistent, hidden tiled: {tiles} x {self.block_h} units/step, W_hh ({kib}) from L2, {rows}"
        if cell.recurrence == "dense":
            return f"persistent, W_hh on chip ({kib} in shared memory), {rows}"
        what = "diagonal w_hh in registers" if cell.recurrence == "diagonal" else "no recurrent matrix"
        return f"persistent, {what}, {rows}"


class TritonBackend(FusedBackend):
    name = "triton"
    description = "persistent fused Triton kernels (CUDA; CPU via TRITON_INTERPRET=1), any cell with pointwise math"
    dtypes = frozenset({torch.float32, torch.float16, torch.bfloat16})
    supports_proj = False
    saved_states_at, saved_states_by = 1, "time"  # see saved_shapes and the kernels' SAVE stores
    priority = 5  # below native: on an H200 cuDNN beat these kernels in most shapes (benchmarks/RESULTS.md)

    # shared memory per block the kernels may use (decides on-chip vs tiled and the pipelining depth);
    # None: the device's opt-in maximum
    on_chip_bytes: int | None = None
    block_b: int = 16  # tl.dot needs M >= 16
    # force the tiled path with this tile size (tests, experiments); also SEQFAST_TRITON_TILE
    tile_hidden: int | None = None
    # the cooperative kernels (coop_kernels.py): None follows SEQFAST_TRITON_COOPERATIVE (off by default)
    cooperative: bool | None = None
    sm_count: int | None = None  # programs a cooperative grid may use; None: the device's SM count
    sequential: bool | None = None  # cooperative steps as separate launches; None: under the interpreter

    def __init__(self) -> None:
        self._codegen_reasons: dict[CellSpec, str | None] = {}  # frozen dataclass: hashed by value

    # --- availability and support ---------------------------------------------------------------------------
    @property
    def devices(self) -> frozenset[str]:  # type: ignore[override]
        # decided per query: the interpreter can be switched on after seqfast is imported
        return frozenset({"cuda", "cpu"}) if interpreting() else frozenset({"cuda"})

    def selection_token(self) -> object:
        return interpreting()  # devices and availability follow TRITON_INTERPRET

    def unavailable_reason(self) -> str | None:
        if not _triton_installed():
            return "triton not installed"
        if not interpreting() and not _cuda_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run on CPU)"
        return None

    def extra_reasons(self, query: Query) -> list[str]:
        return self.pointwise_reasons(query.cell)

    def pointwise_reasons(self, cell: CellSpec) -> list[str]:
        if cell.pointwise is None:
            return []  # the base class already says so
        if cell not in self._codegen_reasons:
            try:
                generate_source(cell)
                self._codegen_reasons[cell] = None
            except CodegenError as exc:
                self._codegen_reasons[cell] = f"pointwise code cannot be compiled to Triton: {exc}"
        why = self._codegen_reasons[cell]
        return [why] if why else []

    def auto_rank(self, query: Query) -> float:
        # the interpreter exists for tests: auto never prefers it on CPU
        return float(self.priority) if query.device == "cuda" else -100.0

    def needs_compile(self, query: Query) -> bool:
        # kernels compile per cell, dtype and block sizes on first launch, and whether triton's own cache holds
        # them cannot be told cheaply: assume so, so that only `seqfast tune` times this backend
        return not interpreting()

    # --- path selection ---------------------------------------------------------------------------------------
    def _tile(self) -> int | None:
        tile = self.tile_hidden
        if tile is None:
            tile = setting("triton_tile")
        if tile is not None and (tile < 16 or tile & (tile - 1)):
            raise ValueError(f"triton tile size must be a power of two >= 16, got {tile}")
        return tile

    def plan(self, cell: CellSpec, hidden: int, dtype: torch.dtype) -> KernelPlan:
        """The kernel configuration for `cell` at `hidden`, `dtype`. Shared memory decides it: Triton stages the
        dot's weight operand there (hoisted out of the time loop), and software pipelining (num_stages > 1)
        adds buffers for the next step's loads. Estimates are upper bounds, checked against compiled kernels by
        aot.py (tests/backends/test_triton.py::test_kernels_compile_for_sm90)."""
        padded = max(16, _next_pow2(hidden))
        itemsize = dtype.itemsize
        g, s, bb = cell.num_gates, cell.num_states, self.block_b
        weight_bytes = {"dense": g * hidden * hidden, "diagonal": g * hidden, "none": 0}[cell.recurrence] * itemsize
        padded_bytes = g * padded * padded * itemsize if cell.recurrence == "dense" else 0
        tile = self._tile()
        budget = (self.on_chip_bytes if self.on_chip_bytes is not None else _shared_memory_budget()) - _MARGIN

        def stages(per_stage: int, base: int) -> int:
            return max(n for n in (3, 2, 1) if n == 1 or base + (n - 1) * per_stage <= budget)

        # on chip: the padded weights fit and the per-step blocks (G gates x padded H) stay modest
        if tile is None and padded_bytes <= budget and g * padded <= 1024:
            per_stage = (2 * g + s + 1) * bb * padded * 4  # the backward's per-step loads, fp32 upper bound
            return KernelPlan(True, bb, padded, padded, 4 if padded <= 32 else 8, weight_bytes,
                              stages(per_stage, padded_bytes))
        tile = tile or 64
        per_stage = (g * tile * tile + g * bb * tile) * 4  # weight tiles and the backward's d_hg tiles
        return KernelPlan(False, bb, tile, tile, 4, weight_bytes, stages(per_stage, 0))

    def cooperative_plan(self, cell: CellSpec, batch: int, hidden: int, dtype: torch.dtype
                         ) -> tuple[CoopPlan | None, str | None]:
        """(the cooperative grid for this shape, None) when the cooperative kernels are on and the grid can be
        resident; (None, why not) when they are on but cannot run it; (None, None) when they are off."""
        enabled = self.cooperative if self.cooperative is not None else setting("triton_cooperative")
        if not enabled:
            return None, None
        budget = (self.on_chip_bytes if self.on_chip_bytes is not None else _shared_memory_budget()) - _MARGIN
        coop, why = plan_cooperative(cell, batch, hidden, dtype, sm_count=self._sm_count(), budget=budget,
                                     block_b=self.block_b)
        return coop, (why or None)

    def _sm_count(self) -> int:
        return self.sm_count if self.sm_count is not None else device_sm_count()

    def dot_precision(self, dtype: torch.dtype) -> str:
        """tl.dot's input precision. float32 follows torch.backends.cudnn.allow_tf32, the switch torch.nn's cuDNN
        RNNs obey: TF32 when allowed (the default), else 3xTF32 (float32 accuracy on tensor cores; plain "ieee"
        FMA dots are slower and trip an LLVM SLP-vectorizer assertion in Triton 3.9 for sm_90)."""
        if dtype != torch.float32:
            return "ieee"  # half inputs: tensor cores with fp32 accumulation regardless
        return "tf32" if torch.backends.cudnn.allow_tf32 else "tf32x3"

    def path_for(self, query: Query) -> str:
        """Which kernel path `query` takes (printed by `seqfast info`)."""
        coop, why = self.cooperative_plan(query.cell, query.batch_size or 1, query.hidden_size, query.dtype)
        if coop is not None:
            text = coop.describe(self._sm_count())
        else:
            text = self.plan(query.cell, query.hidden_size, query.dtype).describe(query.cell, query.hidden_size)
            if why:
                text += f" (cooperative kernels declined: {why})"
        if query.device != "cuda":
            text += " (CPU interpreter)"
        return text

    # --- FusedBackend -----------------------------------------------------------------------------------------
    def saved_shapes(self, cell: CellSpec, steps: int, batch: int, hidden: int) -> list[tuple[int, ...]]:
        # recurrent pre-activations of every step, and every state before every step (state 0 also feeds dW_hh)
        shapes = [(steps, batch, cell.num_gates * hidden), (cell.num_states, steps, batch, hidden)]
        if _num_stages(cell):  # each stage's vector: the operand of its gate group's share of dW_hh
            shapes.append((_num_stages(cell), steps, batch, hidden))
        return shapes

    def _common(self, cell: CellSpec, x_proj: Tensor, weights: list[Tensor | None], lengths: Tensor | None):
        steps, batch, width = x_proj.shape
        hidden = width // cell.num_gates
        names = cell.recurrent_param_names(False)
        if len(weights) != len(names):
            raise ValueError(f"triton backend: expected weights {names}, got {len(weights)} tensors")
        by_name = dict(zip(names, weights, strict=True))
        layout = param_layout(cell)
        pnames = list(dict.fromkeys(name for name, _ in layout))
        params = [by_name[n].contiguous() for n in pnames]
        if lengths is not None:
            lengths = lengths.to(device=x_proj.device).contiguous()
        dtype = x_proj.dtype
        plan = self.plan(cell, hidden, dtype)
        consts = dict(
            HAS_LEN=lengths is not None,
            RECURRENCE=_RECURRENCE_CODE[cell.recurrence],
            ON_CHIP=plan.on_chip,
            BLOCK_B=plan.block_b,
            BLOCK_H=plan.block_h,
            BLOCK_K=plan.block_k,
            # Triton's interpreter computes half-precision dots wrongly (numpy has no bf16): upcast the rounded
            # operands there instead, which is the same math (products of halves are exact in fp32)
            DOT_F32=interpreting() and dtype != torch.float32,
            PRECISION=self.dot_precision(dtype),
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        )
        grid = (-(-batch // plan.block_b),)
        return steps, batch, hidden, by_name, layout, params, lengths, plan, consts, grid

    def forward(self, inputs: ScanInputs, need_saved: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        self.decline_unsupported(inputs)  # x_bias and zero states (state0=None)
        cell, x_proj, state0, reverse = inputs.cell, inputs.x_proj, inputs.state0, inputs.reverse
        kernels = load_kernels(cell)
        steps, batch, hidden, by_name, _, params, lengths, plan, consts, grid = self._common(
            cell, x_proj, inputs.weights, inputs.lengths)
        x = x_proj.contiguous()
        dummy = x
        if batch == 0:  # no program to launch
            saved = [x.new_empty(sh) for sh in self.saved_shapes(cell, steps, 0, hidden)] if need_saved else []
            return x.new_empty(steps, 0, hidden), [s.clone() for s in state0], saved
        w_hh, b_hh = by_name["weight_hh"], by_name["bias_hh"]
        states = [s.contiguous() for s in state0]
        out = torch.empty(steps, batch, hidden, dtype=x.dtype, device=x.device)
        finals = [torch.empty_like(s) for s in states]
        saved: list[Tensor] = []
        stages = _num_stages(cell)
        hg_save, sv, vs = dummy, [dummy] * cell.num_states, [dummy] * stages
        if need_saved:
            shapes = self.saved_shapes(cell, steps, batch, hidden)
            saved = [torch.empty(shape, dtype=x.dtype, device=x.device) for shape in shapes]
            hg_save, sv = saved[0], list(saved[1].unbind(0))
            if stages:
                vs = list(saved[2].unbind(0))
        coop, _ = self.cooperative_plan(cell, batch, hidden, x.dtype)
        ws = state_ws = dummy
        if not plan.on_chip or coop is not None:
            # the states [2, S, B, H] (ping-pong by step parity); a staged cell's stage vectors [stages, B, H]
            # and one step's hg [G, B, H] after them (see kernels.py)
            size = 2 * cell.num_states * batch * hidden
            extra = (stages * batch * hidden + batch * x.shape[2]) if stages else 0
            ws = torch.empty(size + extra, dtype=torch.float32, device=x.device)
            state_ws = ws[:size].view(2, cell.num_states, batch, hidden)
            state_ws[0].copy_(torch.stack(states))
        head = (x, dummy if w_hh is None else w_hh.contiguous(), dummy if b_hh is None else b_hh.contiguous(),
                dummy if lengths is None else lengths, out, hg_save, ws)
        flags = dict(REVERSE=bool(reverse), HAS_BIAS=b_hh is not None, SAVE=need_saved,
                     ROUND_HG=x.dtype != torch.float32)
        if coop is None:
            kernels.scan_forward[grid](*head, *params, *states, *finals, *sv, *vs, steps, batch, hidden, **flags,
                                       **consts)
        else:
            launch_cooperative(kernels.coop_forward, coop, cell, head, (*params, *sv), (steps, batch, hidden),
                               {**flags, **consts}, whole={"GRID_BARRIER": True}, per_step=[{"GRID_BARRIER": False}],
                               sequential=self.sequential, interpret=interpreting())
        if not plan.on_chip or coop is not None:
            for final, value in zip(finals, state_ws[steps % 2].unbind(0), strict=True):
                final.copy_(value)
        return out, finals, saved

    def backward(self, inputs: ScanInputs, outputs: Tensor, saved: list[Tensor], grad_outputs: Tensor | None,
                 grad_final: list[Tensor | None], saved_mode: Ownership = Ownership.KEEP,
                 x_proj_mode: Ownership = Ownership.KEEP) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
        # saved_mode and x_proj_mode permit writing over buffers; these kernels never do
        self.decline_unsupported(inputs, backward=True)  # x_bias, zero states and x_proj=None
        cell, x_proj, state0, weights, reverse = (inputs.cell, inputs.x_proj, inputs.state0, inputs.weights,
                                                  inputs.reverse)
        kernels = load_kernels(cell)
        if not hasattr(kernels, "scan_backward"):
            raise RuntimeError(f"cell {cell.name!r} has no pointwise backward; the triton backend cannot train it")
        steps, batch, hidden, by_name, layout, params, lengths, plan, consts, grid = self._common(
            cell, x_proj, weights, inputs.lengths)
        x = x_proj.contiguous()
        if batch == 0:
            return torch.zeros_like(x), [torch.zeros_like(s) for s in state0], [
                None if w is None else torch.zeros_like(w) for w in weights]
        hg_save, sv_all, *stage_vectors = saved
        w_hh = by_name["weight_hh"]
        go = outputs.new_zeros(outputs.shape) if grad_outputs is None else grad_outputs.contiguous()
        gf = [torch.zeros_like(s) if g is None else g.contiguous() for g, s in zip(grad_final, state0, strict=True)]
        dx = torch.empty_like(x)
        dhg = torch.empty_like(x)
        ds0 = [torch.empty_like(s) for s in state0]
        # per-unit parameter gradients, summed over time in the kernel, per batch row (summed here)
        dp = [torch.zeros(batch, hidden, dtype=torch.float32, device=x.device) for _ in layout]
        coop, _ = self.cooperative_plan(cell, batch, hidden, x.dtype)
        ws = x
        if not plan.on_chip or coop is not None:
            ws = torch.stack(gf).float().contiguous()
        w_arg = x if w_hh is None else w_hh.contiguous()
        if cell.recurrence == "dense":  # each gate's block transposed (see kernels.py)
            w_arg = w_hh.view(cell.num_gates, hidden, hidden).transpose(1, 2).contiguous()
        head = (x, w_arg, x if lengths is None else lengths, hg_save, go, dx, dhg, ws)
        if coop is None:
            kernels.scan_backward[grid](*head, *params, *sv_all.unbind(0), *gf, *ds0, *dp, steps, batch, hidden,
                                        REVERSE=bool(reverse), **consts)
        else:  # phase 1: the pointwise backward of each slice; phase 2: the recurrent product (coop_kernels.py)
            launch_cooperative(kernels.coop_backward, coop, cell, head, (*params, *sv_all.unbind(0), *dp),
                               (steps, batch, hidden), {"REVERSE": bool(reverse), **consts}, whole={"PHASE": 0},
                               per_step=[{"PHASE": 1}, {"PHASE": 2}], sequential=self.sequential,
                               interpret=interpreting())
        if not plan.on_chip or coop is not None:
            for d, value in zip(ds0, ws.unbind(0), strict=True):
                d.copy_(value)
        grads: dict[str, Tensor | None] = {}
        h_prev = sv_all[0]
        if cell.recurrence == "dense":
            # the recurrent-weight gradient as one GEMM over every step and row: dW = dHG^T @ H_prev; a staged
            # cell's gate groups each take their own operand (h_prev, then each stage's vector)
            operands = [h_prev, *(v for vs in stage_vectors for v in vs.unbind(0))]
            groups = cell.pointwise.gate_groups(cell.num_gates) if stage_vectors else ((0, cell.num_gates),)
            flat = dhg.reshape(-1, dhg.shape[-1])
            parts = [flat[:, first * hidden:end * hidden].t().mm(v.reshape(-1, hidden))
                     for (first, end), v in zip(groups, operands, strict=True)]
            grads["weight_hh"] = parts[0] if len(parts) == 1 else torch.cat(parts)
        elif cell.recurrence == "diagonal":
            prod = dhg.view(steps, batch, cell.num_gates, hidden).float() * h_prev.unsqueeze(2).float()
            grads["weight_hh"] = prod.sum((0, 1)).reshape(-1).to(x.dtype)
        if by_name.get("bias_hh") is not None:
            grads["bias_hh"] = dhg.float().sum((0, 1)).to(x.dtype)
        for name in dict.fromkeys(n for n, _ in layout):
            rows = [dp[i].sum(0) for i, (n, _) in enumerate(layout) if n == name]
            grads[name] = torch.cat(rows).to(by_name[name].dtype)
        names = cell.recurrent_param_names(False)
        gweights: list[Tensor | None] = []
        for name, w in zip(names, weights, strict=True):
            if w is None:
                gweights.append(None)
            else:
                g = grads.get(name)
                gweights.append(torch.zeros_like(w) if g is None else g.reshape(w.shape))
        return dx, ds0, gweights
