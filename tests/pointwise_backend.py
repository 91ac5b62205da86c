"""A fused backend written in plain torch, for tests: it runs each cell's Pointwise forward and backward math
(vectorised over units) through the FusedBackend custom-op glue. Comparing it with the `torch` reference checks
the pointwise derivatives that the numba and triton kernels compile, and the glue itself, with no JIT involved.
"""

from __future__ import annotations

import torch

from seqfast.backends.fused import FusedBackend
from seqfast.backends.reference import reverse_within_lengths
from seqfast.cells import TORCH_MATH


def _as_tensor(value, like):
    return value if isinstance(value, torch.Tensor) else torch.full_like(like, value)


class PointwiseTorchBackend(FusedBackend):
    name = "pointwise_torch"
    description = "test double: Pointwise math in torch through the fused glue"
    recurrences = frozenset({"dense"})
    supports_proj = False
    priority = -100

    def extra_reasons(self, query):
        if query.cell.pointwise is not None and query.cell.pointwise.stages:
            return ["staged cells (Pointwise.stages) are not modelled by this test double"]
        return []

    def _mask(self, lengths, steps, device):
        if lengths is None:
            return None
        return (torch.arange(steps, device=device).unsqueeze(1) < lengths.to(device).unsqueeze(0)).unsqueeze(-1)

    def forward(self, inputs, need_saved):
        self.decline_unsupported(inputs)
        cell, x_proj, lengths, reverse = inputs.cell, inputs.x_proj, inputs.lengths, inputs.reverse
        w_hh, b_hh = inputs.weights[0], inputs.weights[1]
        x = reverse_within_lengths(x_proj, lengths) if reverse else x_proj
        active = self._mask(lengths, x.shape[0], x.device)
        state, outs, before, hgs = tuple(inputs.state0), [], [], []
        for t in range(x.shape[0]):
            hg = torch.nn.functional.linear(state[0], w_hh, b_hh)
            new = cell.pointwise.forward(TORCH_MATH, x[t].chunk(cell.num_gates, 1), hg.chunk(cell.num_gates, 1),
                                         state, ())
            before.append(state)
            hgs.append(hg)
            if active is not None:
                new = tuple(torch.where(active[t], n, s) for n, s in zip(new, state, strict=True))
                outs.append(torch.where(active[t], new[0], torch.zeros_like(new[0])))
            else:
                outs.append(new[0])
            state = new
        out = torch.stack(outs)
        if reverse:
            out = reverse_within_lengths(out, lengths)
        saved = []
        if need_saved:
            saved = [torch.stack(hgs)] + [torch.stack([b[i] for b in before]) for i in range(cell.num_states)]
        return out, list(state), saved

    def saved_shapes(self, cell, steps, batch, hidden):
        return [(steps, batch, cell.num_gates * hidden)] + [(steps, batch, hidden)] * cell.num_states

    def backward(self, inputs, outputs, saved, grad_outputs, grad_final, saved_mode="keep", x_proj_mode="keep"):
        self.decline_unsupported(inputs, backward=True)
        cell, x_proj, lengths, reverse = inputs.cell, inputs.x_proj, inputs.lengths, inputs.reverse
        w_hh, b_hh = inputs.weights[0], inputs.weights[1]
        hgs, befores = saved[0], saved[1:]
        x = reverse_within_lengths(x_proj, lengths) if reverse else x_proj
        g_out = reverse_within_lengths(grad_outputs, lengths) if reverse else grad_outputs
        active = self._mask(lengths, x.shape[0], x.device)
        d_state = list(grad_final)
        dx, dhg = torch.zeros_like(x), torch.zeros_like(hgs)
        for t in reversed(range(x.shape[0])):
            d_new = [d_state[0] + g_out[t], *d_state[1:]]
            state = tuple(b[t] for b in befores)
            gxs, ghs, gss, _ = cell.pointwise.backward(TORCH_MATH, x[t].chunk(cell.num_gates, 1),
                                                       hgs[t].chunk(cell.num_gates, 1), state, (), tuple(d_new))
            gx = torch.cat([_as_tensor(g, state[0]) for g in gxs], 1)
            gh = torch.cat([_as_tensor(g, state[0]) for g in ghs], 1)
            prev = [_as_tensor(g, state[0]) for g in gss]
            prev[0] = prev[0] + gh @ w_hh
            if active is not None:
                gx, gh = gx * active[t], gh * active[t]
                prev = [torch.where(active[t], p, d) for p, d in zip(prev, d_state, strict=True)]
            dx[t], dhg[t], d_state = gx, gh, prev
        h_before = befores[0].reshape(-1, befores[0].shape[-1])
        d_whh = dhg.reshape(-1, dhg.shape[-1]).t() @ h_before  # one GEMM over all steps
        d_bhh = None if b_hh is None else dhg.sum((0, 1))
        if reverse:
            dx = reverse_within_lengths(dx, lengths)
        return dx, d_state, [d_whh, d_bhh]
