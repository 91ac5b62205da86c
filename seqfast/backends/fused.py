"""Glue for backends whose kernels run the forward and backward scans themselves (numba, triton).

A `FusedBackend` implements three methods (forward, saved_shapes, backward); this module turns them into two
torch.library custom ops per backend, `seqfast::<name>_scan` and `seqfast::<name>_scan_backward`, with fake
(meta) kernels and autograd registered. Eager training and torch.compile(fullgraph=True) then both see one opaque,
differentiable op per layer-direction instead of a Python time loop.

Op arguments are flat so the schema stays simple: the cell by name (looked up in the registry), the recurrent
weights as a list in `CellSpec.recurrent_param_names` order. An absent weight (bias=False, no recurrent matrix)
travels as a 0-element placeholder, not None: autograd treats a list holding None as a single leaf, so its
gradient could not be returned per element. Results are flat lists: forward -> [outputs, *final_states, *saved];
backward -> [grad_x_proj, *grad_state0, *grad_weights (0-element for placeholders)].

Size: the base class, its two eager autograd Functions (scan and layer), the custom ops and the differentiable
recompute share the same saved-tensor layout, so they stay together (the layout itself is in fused_contract.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..registry import Backend, CellSpec, Weights, get_cell
from .fused_contract import Ownership, ScanInputs, unpack_saved
from .reference import TorchBackend
from .states import states_after_steps


class FusedBackend(Backend):
    """Base class of fused backends. Subclasses implement forward, saved_shapes and backward.

    forward() and backward() take the scan as one ScanInputs (fused_contract.py). What the glue below may hand
    them beyond the plain scan contract is declared by these capability flags, and only here:
    - accepts_zero_state (Backend's): scan() and layer() take state0=None for zero initial states. True for every
      fused backend: where forward() cannot take None, the glue makes the zeros.
    - forward_accepts_zero_state: forward() and backward() take ScanInputs.state0=None (zero initial states;
      the glue then drops whatever state gradients backward() returns).
    - fuses_input_bias: forward() and backward() take ScanInputs.x_bias (the input projection's [G*H] bias, added
      as the kernel reads x_proj, its gradient summed there too), and layer() runs the projection inside one
      autograd node, handing backward() x_proj_mode=. Requires forward_accepts_zero_state (checked at
      registration).
    - backward_reads_x_proj(cell) False: backward() takes ScanInputs.x_proj=None.
    A backend without a capability declines its input: decline_unsupported(inputs) raises a ValueError naming
    it. saved_mode= and x_proj_mode= permit writing over buffers and never oblige, so every backend takes them.
    """

    needs_pointwise = True
    cells = None
    accepts_zero_state = True
    forward_accepts_zero_state = False
    fuses_input_bias = False
    # per-step states come from what forward saves for the backward (saved[saved_states_at]: every state before
    # each step, [S, T, B, H], indexed by loop step k ("loop_step"; a reversed row of length L runs t = L-1-k) or
    # by time ("time")); their gradients the kernels do not take, so only in inference
    inference_only_options = frozenset({"return_states"})
    saved_states_at: int = 0
    saved_states_by: str = "loop_step"
    declined_options = {
        "return_states": "the backward kernels take no gradient of the per-step states (c_t)",
        "recurrent_dropout": "the fused kernels apply no per-sequence mask to the h of the recurrent product",
        "zoneout": "the fused kernels have no per-step mask to keep previous states",
    }

    # --- what a subclass implements ---------------------------------------------------------------------------
    def forward(self, inputs: ScanInputs, need_saved: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """-> (outputs [T, B, H_out], final states, tensors saved for backward ([] unless need_saved)).
        inputs.state0 is None (zero states) only for backends with forward_accepts_zero_state, inputs.x_bias set
        only for those with fuses_input_bias (see the class docstring)."""
        raise NotImplementedError

    def saved_shapes(self, cell: CellSpec, steps: int, batch: int, hidden: int) -> list[tuple[int, ...]]:
        """Shapes of what forward saves when need_saved is True (the fake kernel allocates these)."""
        raise NotImplementedError

    def backward(self, inputs: ScanInputs, outputs: Tensor, saved: list[Tensor], grad_outputs: Tensor | None,
                 grad_final: list[Tensor | None], saved_mode: Ownership = Ownership.KEEP,
                 x_proj_mode: Ownership = Ownership.KEEP) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
        """-> (grad of x_proj, grad of each state0 (ignored where inputs.state0 is None), grad of each weight
        (None where the weight is None), and with inputs.x_bias one more at the end of the weights' list: x_bias's).
        inputs are forward()'s, outputs and saved what it returned. grad_outputs and grad_final entries
        may be None (that output was not used: zero gradient).

        saved_mode: who owns the saved tensors (Ownership): KEEP for the custom op, whose inputs must not change,
        and a graph retained for another backward; CONSUME where they are read for the last time, so the backward
        may use them as scratch. x_proj_mode: CONSUME where x_proj is layer()'s own projection, read for the last
        time (its d_x_proj may then be written over it). CONSUME permits, never obliges: a backend may treat it
        as KEEP."""
        raise NotImplementedError

    def decline_unsupported(self, inputs: ScanInputs, backward: bool = False) -> None:
        """Raise a ValueError for the first input this backend's capability flags decline (see the class
        docstring); a backend lacking a capability calls it on entry to forward() and backward()."""
        if inputs.x_bias is not None and not self.fuses_input_bias:
            raise ValueError(f"{self.name} backend: x_bias must be None (fuses_input_bias is False: x_proj includes "
                             f"its bias), got a tensor of shape {tuple(inputs.x_bias.shape)}")
        if inputs.state0 is None and not self.forward_accepts_zero_state:
            raise ValueError(f"{self.name} backend: state0 must be a list of {inputs.cell.num_states} [B, H] "
                             "tensors (forward_accepts_zero_state is False), got None")
        if backward and inputs.x_proj is None and self.backward_reads_x_proj(inputs.cell):
            raise ValueError(f"{self.name} backend: backward needs x_proj (backward_reads_x_proj is True for cell "
                             f"{inputs.cell.name!r}), got None")

    def backward_reads_x_proj(self, cell: CellSpec) -> bool:
        """False where backward() takes x_proj=None (what forward saved holds all it needs): layer() then lets
        the projection go after the forward instead of keeping it for the backward."""
        return True

    def project(self, x: Tensor, weight_ih: Tensor) -> Tensor:
        """x [N, I] @ weight_ih^T, the input projection without its bias, for layer() (a backend may choose where
        the result lives)."""
        return torch.mm(x, weight_ih.t())

    def project_backward(self, grad: Tensor, x: Tensor, weight_ih: Tensor, need_x: bool, need_weight: bool
                         ) -> tuple[Tensor | None, Tensor | None]:
        """The gradients of project(): grad [N, G*H] @ weight_ih -> d_x [N, I], and grad^T @ x -> d_weight_ih
        (None where not needed)."""
        g_x = grad.mm(weight_ih) if need_x else None
        return g_x, (grad.t().mm(x) if need_weight else None)

    # --- the Backend interface ----------------------------------------------------------------------------------
    def on_register(self) -> None:
        if self.fuses_input_bias and not self.forward_accepts_zero_state:
            raise ValueError(f"fused backend {self.name!r}: fuses_input_bias requires forward_accepts_zero_state "
                             "(layer() hands forward() state0=None for zero states)")
        _ops_for(self)  # defined now: torch.compile cannot trace torch.library's op definition later

    def layer(self, cell: CellSpec, x: Tensor, weight_ih: Tensor, bias_ih: Tensor | None,
              state0: tuple[Tensor, ...] | None, weights: Weights, lengths: Tensor | None, reverse: bool
              ) -> tuple[Tensor, tuple[Tensor, ...]]:
        if not self.fuses_input_bias or torch.compiler.is_compiling():
            return super().layer(cell, x, weight_ih, bias_ih, state0, weights, lengths, reverse)
        names = cell.recurrent_param_names(proj=weights.get("weight_hr") is not None)
        wlist = [weights.get(n) for n in names]
        tensors = [x, weight_ih, bias_ih, *(state0 or ()), *wlist]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            function = _EagerLayer if _transforms_active() else _EagerLayerPlain
            result = function.apply(self, cell, lengths, bool(reverse), len(state0 or ()), x, weight_ih, bias_ih,
                                    *(state0 or ()), *wlist)
            return result[0], tuple(result[1:-1])
        steps, batch, _ = x.shape
        x_proj = self.project(x.flatten(0, 1), weight_ih).unflatten(0, (steps, batch))
        out, final, _ = self.forward(ScanInputs(cell, x_proj, None if state0 is None else list(state0), wlist,
                                                lengths, reverse, bias_ih), False)
        return out, tuple(final)

    def scan(self, cell: CellSpec, x_proj: Tensor, state0: tuple[Tensor, ...] | None, weights: Weights,
             lengths: Tensor | None, reverse: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        names = cell.recurrent_param_names(proj=weights.get("weight_hr") is not None)
        wlist = [weights.get(n) for n in names]
        tensors = [x_proj, *(state0 or ()), *(w for w in wlist if w is not None)]
        need_saved = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        compiling = torch.compiler.is_compiling()
        if state0 is None and (need_saved or compiling or not self.forward_accepts_zero_state):
            hidden = x_proj.shape[2] // cell.num_gates  # no proj_size here: fused backends decline it
            state0 = tuple(x_proj.new_zeros(x_proj.shape[1], hidden) for _ in cell.state_names)
        if not compiling:
            if not need_saved:  # eager inference needs neither autograd nor the custom op's dispatch
                out, final, _ = self.forward(ScanInputs(cell, x_proj, None if state0 is None else list(state0),
                                                        wlist, lengths, reverse), False)
                return out, tuple(final)
            # eager training: the same forward/backward through a plain autograd.Function, which costs a few
            # hundred microseconds less per call than the custom op's Python dispatch and pytree handling
            function = _EagerScan if _transforms_active() else _EagerScanPlain
            result = function.apply(self, cell, lengths, bool(reverse), len(state0), x_proj, *state0, *wlist)
            return result[0], tuple(result[1:-1])
        wlist = [x_proj.new_empty(0) if w is None else w for w in wlist]
        result = _ops_for(self)[0](cell.name, x_proj, list(state0), wlist, lengths, bool(reverse), need_saved)
        return result[0], tuple(result[1 : 1 + cell.num_states])


    def scan_states(self, cell: CellSpec, x_proj: Tensor, state0: tuple[Tensor, ...], weights: Weights,
                    lengths: Tensor | None, reverse: bool) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Backend.scan_states (inference), from the states forward saves for the backward."""
        wlist = [weights.get(n) for n in cell.recurrent_param_names(proj=False)]
        out, final, saved = self.forward(ScanInputs(cell, x_proj, list(state0), wlist, lengths, reverse), True)
        states = states_after_steps(saved[self.saved_states_at], final, lengths, reverse, self.saved_states_by)
        return out, tuple(final), states


class _EagerScan(torch.autograd.Function):
    """Eager-mode autograd around FusedBackend.forward/backward (torch.compile uses the custom ops instead).

    Written in the setup_context form, so that torch.func transforms (grad, vjp, jacrev) can run it; outside
    them scan() applies its ctx-form twin (_with_ctx), which spares apply()'s signature binding. forward's last
    output is the list of tensors the kernels saved (a non-tensor output to autograd, which passes it through).

    A backward that must itself be differentiable (create_graph=True, torch.func) recomputes the layer-direction
    on the torch reference scan and differentiates that; a plain backward runs the fused kernels."""

    @staticmethod
    def forward(backend, cell, lengths, reverse, n_state, x_proj, *tensors):
        scan_inputs = ScanInputs(cell, x_proj, list(tensors[:n_state]), list(tensors[n_state:]), lengths, reverse)
        out, final, saved = backend.forward(scan_inputs, True)
        return (out, *final, saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, cell, lengths, reverse, n_state, x_proj, *tensors = inputs
        ctx.backend, ctx.cell, ctx.reverse, ctx.counts = backend, cell, reverse, (n_state, len(tensors) - n_state)
        ctx.save_for_backward(x_proj, lengths, *tensors, *output[:-1], *output[-1])

    @staticmethod
    def backward(ctx, grad_out, *grad_final):
        grad_final = grad_final[:-1]  # the last is the saved list's (always None)
        n_state, n_weights = ctx.counts
        kept = unpack_saved(ctx.saved_tensors, n_state, n_weights, n_state)
        if _differentiable_backward():
            lengths = kept.lengths
            grads = _grads_by_recomputing(
                lambda x_proj, *t: _reference_scan(ctx.cell, x_proj, t[:n_state], t[n_state:], lengths, ctx.reverse),
                [kept.x_proj, *kept.state0, *kept.weights], ctx.needs_input_grad[5:], [grad_out, *grad_final])
            return None, None, None, None, None, *grads
        # the saved tensors may serve as scratch unless the graph is retained for another backward
        saved_mode = _KEEP if _graph_retained() else _CONSUME
        scan_inputs = ScanInputs(ctx.cell, kept.x_proj, kept.state0, kept.weights, kept.lengths, ctx.reverse)
        gx, gstate, gweights = ctx.backend.backward(scan_inputs, kept.outputs, kept.saved, grad_out.contiguous(),
                                                    list(grad_final), saved_mode=saved_mode)
        return None, None, None, None, None, gx, *gstate, *gweights


class _EagerLayer(torch.autograd.Function):
    """Eager training of one layer-direction, input projection included (FusedBackend.layer, for backends with
    fuses_input_bias): x_proj = x W_ih^T is formed without its bias, which the kernels add as they read it and
    whose gradient they sum, so a step spends no pass over x_proj on the bias either way, and autograd sees one
    node per layer-direction. The backward forms d_W_ih (and d_x, when x needs it) from the kernels' d_x_proj.
    The setup_context form and the twin outside torch.func transforms are as for _EagerScan."""

    @staticmethod
    def forward(backend, cell, lengths, reverse, n_state, x, weight_ih, bias_ih, *tensors):
        steps, batch, _ = x.shape
        x_proj = backend.project(x.flatten(0, 1), weight_ih).unflatten(0, (steps, batch))
        out, final, saved = backend.forward(ScanInputs(cell, x_proj, list(tensors[:n_state]) or None,
                                                       list(tensors[n_state:]), lengths, reverse, bias_ih), True)
        # x_proj travels to setup_context with the saved list; it is None where the backward does not read it
        return (out, *final, [x_proj if backend.backward_reads_x_proj(cell) else None, *saved])

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, cell, lengths, reverse, n_state, x, weight_ih, bias_ih, *tensors = inputs
        ctx.set_materialize_grads(False)  # unused outputs (usually the final states) get no zero tensors
        ctx.backend, ctx.cell, ctx.reverse, ctx.counts = backend, cell, reverse, (n_state, len(tensors) - n_state)
        keep, *saved = output[-1]
        ctx.save_for_backward(x, weight_ih, bias_ih, keep, lengths, *tensors, *output[:-1], *saved)

    @staticmethod
    def backward(ctx, grad_out, *grad_final):
        grad_final = grad_final[:-1]  # the last is the saved list's (always None)
        n_state, n_weights = ctx.counts
        tensors = ctx.saved_tensors  # unpacked anew on each access: read once
        x, weight_ih, bias_ih = tensors[:3]
        kept = unpack_saved(tensors[3:], n_state, n_weights, len(grad_final))
        if _differentiable_backward():
            lengths = kept.lengths

            def layer(x, weight_ih, bias_ih, *t):
                x_proj = torch.nn.functional.linear(x, weight_ih, bias_ih)
                hidden = x_proj.shape[2] // ctx.cell.num_gates
                state0 = t[:n_state] or tuple(x.new_zeros(x.shape[1], hidden) for _ in ctx.cell.state_names)
                return _reference_scan(ctx.cell, x_proj, state0, t[n_state:], lengths, ctx.reverse)

            grads = _grads_by_recomputing(layer, [x, weight_ih, bias_ih, *kept.state0, *kept.weights],
                                          ctx.needs_input_grad[5:], [grad_out, *grad_final])
            return None, None, None, None, None, *grads
        saved_mode = _KEEP if _graph_retained() else _CONSUME
        scan_inputs = ScanInputs(ctx.cell, kept.x_proj, kept.state0 or None, kept.weights, kept.lengths,
                                 ctx.reverse, bias_ih)
        gx_proj, gstate, gweights = ctx.backend.backward(
            scan_inputs, kept.outputs, kept.saved, None if grad_out is None else grad_out.contiguous(),
            list(grad_final), saved_mode=saved_mode, x_proj_mode=saved_mode)  # x_proj is this node's own
        g_bias_ih = gweights.pop() if bias_ih is not None else None
        flat = gx_proj.view(-1, gx_proj.shape[2])  # x_proj itself may not have been kept
        needs = ctx.needs_input_grad
        g_x, g_weight_ih = ctx.backend.project_backward(flat, x.flatten(0, 1), weight_ih, needs[5],
                                                        needs[6])
        if g_x is not None:
            g_x = g_x.view(x.shape)
        return (None, None, None, None, None, g_x, g_weight_ih, g_bias_ih,
                *(gstate if n_state else ()), *gweights)


def _with_ctx(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """The ctx-form twin of a setup_context-form autograd.Function: the same forward, setup and backward, without
    the signature binding that apply() does for the setup_context form (~20 us a call). It cannot run under
    torch.func transforms; callers pick `function` itself there."""

    def forward(ctx, *args):
        output = function.forward(*args)
        function.setup_context(ctx, args, output)
        return output

    return type(function.__name__ + "Plain", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(function.backward),
                 "__doc__": f"{function.__name__} outside torch.func transforms."})


_EagerScanPlain = _with_ctx(_EagerScan)
_EagerLayerPlain = _with_ctx(_EagerLayer)
_transforms_active = torch._C._are_functorch_transforms_active
_KEEP, _CONSUME = Ownership.KEEP, Ownership.CONSUME  # module constants: an Enum attribute costs ~60 ns a read
_REFERENCE = TorchBackend()


def _differentiable_backward() -> bool:
    """Whether a backward must itself be differentiable or run on batched tensors: create_graph=True (grad mode
    on during the backward; torch.func's grad and vjp ask for it too) or a torch.func transform such as jacrev's
    vmap. The fused kernels' backward is neither, so those take the torch reference scan instead."""
    return torch.is_grad_enabled() or _transforms_active()


def _reference_scan(cell: CellSpec, x_proj: Tensor, state0: tuple[Tensor, ...], weights: tuple[Tensor | None, ...],
                    lengths: Tensor | None, reverse: bool) -> list[Tensor]:
    """The `torch` backend's scan of the same inputs (weights in recurrent_param_names order) as a flat list
    [outputs, *final states]."""
    names = cell.recurrent_param_names(proj=len(weights) > len(cell.recurrent_param_names(proj=False)))
    out, final = _REFERENCE.scan(cell, x_proj, tuple(state0), Weights(zip(names, weights, strict=True)), lengths,
                                 reverse)
    return [out, *final]


def _grads_by_recomputing(run, inputs: list, needs, grads: list) -> list:
    """The gradients of `inputs` (None where needs says not needed, or the input is None) given `grads` for the
    outputs of run(*inputs), recomputed on torch operations: a differentiable graph (second derivatives flow
    through it) that also runs on torch.func's batched tensors. Slower than the fused backward, which serves
    every plain backward. torch.func.vjp rather than torch.autograd.grad: it differentiates at its own level, so
    it also holds inside torch.func transforms (jacrev's vmap over this backward)."""
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs, strict=True)) if need and t is not None]
    result: list = [None] * len(inputs)
    if not wanted or all(g is None for g in grads):
        return result

    def run_wanted(*tensors):
        given = list(inputs)
        for i, t in zip(wanted, tensors, strict=True):
            given[i] = t
        return tuple(run(*given))

    with torch.enable_grad():
        outputs, vjp = torch.func.vjp(run_wanted, *(inputs[i] for i in wanted))
        got = vjp(tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads, strict=True)))
    for i, g in zip(wanted, got, strict=True):
        result[i] = g
    return result


def _graph_retained() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True, gradcheck, create_graph); True when this
    torch cannot say, which only costs a copy."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


_OPS: dict[str, tuple] = {}


def _unplaceholder(weights: list[Tensor]) -> list[Tensor | None]:
    return [None if w.numel() == 0 else w for w in weights]


def _ops_for(backend: FusedBackend) -> tuple:
    """The (forward, backward) custom ops of a backend, defined on first use."""
    if backend.name not in _OPS:
        _OPS[backend.name] = _define_ops(backend)
    return _OPS[backend.name]


def _define_ops(backend: FusedBackend) -> tuple:
    prefix = f"seqfast::{backend.name}_scan"

    @torch.library.custom_op(prefix, mutates_args=())
    def scan_op(cell: str, x_proj: Tensor, state0: list[Tensor], weights: list[Tensor],
                lengths: Optional[Tensor], reverse: bool, need_saved: bool) -> list[Tensor]:  # noqa: UP045
        scan_inputs = ScanInputs(get_cell(cell), x_proj, list(state0), _unplaceholder(weights), lengths, reverse)
        out, final, saved = backend.forward(scan_inputs, need_saved)
        # custom ops may not return their inputs: a state untouched by the kernel must be a copy
        inputs = {id(t) for t in (x_proj, *state0)}
        return [t.clone() if id(t) in inputs else t for t in (out, *final, *saved)]

    @scan_op.register_fake
    def _(cell, x_proj, state0, weights, lengths, reverse, need_saved):
        spec = get_cell(cell)
        steps, batch, width = x_proj.shape
        out = x_proj.new_empty(steps, batch, state0[0].shape[1])
        final = [s.new_empty(s.shape) for s in state0]
        saved = []
        if need_saved:
            saved = [x_proj.new_empty(s) for s in backend.saved_shapes(spec, steps, batch, width // spec.num_gates)]
        return [out, *final, *saved]

    @torch.library.custom_op(prefix + "_backward", mutates_args=())
    def scan_backward_op(cell: str, x_proj: Tensor, state0: list[Tensor], weights: list[Tensor],
                         lengths: Optional[Tensor], reverse: bool, outputs: Tensor,  # noqa: UP045
                         saved: list[Tensor], grad_outputs: Tensor, grad_final: list[Tensor]) -> list[Tensor]:
        scan_inputs = ScanInputs(get_cell(cell), x_proj, list(state0), _unplaceholder(weights), lengths, reverse)
        gx, gstate, gweights = backend.backward(scan_inputs, outputs, list(saved), grad_outputs, list(grad_final))
        return [gx, *gstate, *(torch.zeros_like(w) if w.numel() == 0 else g
                               for g, w in zip(gweights, weights, strict=True))]

    @scan_backward_op.register_fake
    def _(cell, x_proj, state0, weights, lengths, reverse, outputs, saved, grad_outputs, grad_final):
        return [torch.empty_like(x_proj), *(torch.empty_like(s) for s in state0),
                *(torch.empty_like(w) for w in weights)]

    def setup_context(ctx, inputs, output):
        cell, x_proj, state0, weights, lengths, reverse, _ = inputs
        ctx.cell, ctx.reverse = cell, reverse
        ctx.counts = (len(state0), len(weights), len(output) - 1 - len(state0))
        ctx.save_for_backward(x_proj, lengths, *state0, *weights, *output)

    def backward(ctx, grads):
        n_state, n_weights, _ = ctx.counts
        kept = unpack_saved(ctx.saved_tensors, n_state, n_weights, n_state)
        # outputs nobody used arrive as None
        grad_out = grads[0] if grads[0] is not None else torch.zeros_like(kept.outputs)
        grad_final = [g if g is not None else torch.zeros_like(f)
                      for g, f in zip(grads[1 : 1 + n_state], kept.final, strict=True)]
        flat = scan_backward_op(ctx.cell, kept.x_proj, kept.state0, kept.weights, kept.lengths, ctx.reverse,
                                kept.outputs, kept.saved, grad_out.contiguous(), grad_final)
        return None, flat[0], list(flat[1 : 1 + n_state]), list(flat[1 + n_state :]), None, None, None

    scan_op.register_autograd(backward, setup_context=setup_context)
    return scan_op, scan_backward_op
