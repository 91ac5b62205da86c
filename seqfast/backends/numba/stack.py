"""NumbaBackend.stack_runner: a module's inference calls of one shape with little Python around the kernels.

The general path (the module, FusedBackend.layer, scan.forward) checks and converts every argument anew and makes
a dozen tensors a call, each torch call costing about a microsecond: at T1 B1 H4 that came to ~80 us around ~5 us
of kernels. A runner keeps, per layer-direction, what scan.forward works out from the weights (the kernel module,
prepare()'s arrays, weight_ih's numpy view), and per call projects, allocates and launches on numpy arrays, making
tensors of the results only. Each call compares the parameters' layouts (data pointer, shape, strides, dtype) and
the plan (thread count, GEMM choice) with the bound ones and binds again on any change; in-place updates show
through the views. A call the general path must see first (its GEMM choice not yet measured) is declined, and so
is one with a non-contiguous parameter (its array would be a copy, blind to in-place updates) or a parameter of
another dtype or device (the general path's checks report it).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ...registry import CellSpec, Stack
from ..fused import _transforms_active
from . import buffers, schedule
from .availability import DTYPES
from .gemm import host_projector
from .scan import forward_args, prepare
from .views import NO_PRODUCTS, NO_SAVED, host, layout


def stack_runner(cell: CellSpec, dtype: torch.dtype, stack: Stack):
    """Backend.stack_runner on the numba kernels, for calls without autograd (training keeps the general path)."""
    if stack.requires_grad or dtype not in DTYPES or any("weight_hr" in names for names in stack.names):
        return None
    dtype_name = DTYPES[dtype]
    gates, num_states = cell.num_gates, cell.num_states
    stages = len(cell.pointwise.stages)
    measured = cell.recurrence == "dense" and not stages  # scan.forward measures its GEMM choice for these
    no_products, no_saved = NO_PRODUCTS[dtype_name], NO_SAVED[dtype_name]
    recurrent = cell.recurrent_param_names(proj=False)
    # per layer-direction: where weight_ih, bias_ih and each weight the scan takes sit among its parameters
    positions = [(names.index("weight_ih"), _position(names, "bias_ih"), [_position(names, n) for n in recurrent])
                 for names in stack.names]
    directions = 2 if stack.bidirectional else 1
    layers = [[(layer * directions + d, d == 1) for d in range(directions)] for layer in range(stack.num_layers)]
    first_ih = positions[0][0]
    bound: list[tuple | None] = [None] * len(positions)

    def bind(index: int, params: list[Tensor], plan: schedule.Plan, steps: int, batch: int) -> tuple:
        # views of a non-contiguous parameter would be copies, blind to in-place updates; another dtype or device is
        # the general path's to report
        if not all(t.dtype == dtype and t.is_cpu and t.is_contiguous() for t in params):
            bound[index] = found = (tuple(map(layout, params)), plan, None, None, None, None)
            return found
        ih, bias_ih, weights = positions[index]
        like = torch.empty((steps, batch, plan.hidden * gates), dtype=dtype)  # prepare() reads its shape
        module, _, _, arrays, lens = prepare(cell, None, [None if i is None else params[i] for i in weights], None,
                                             None if bias_ih is None else params[bias_ih], like=like)
        launch = schedule.launcher(module, "forward", plan, plan.loop_forward)
        project = host_projector(steps * batch, params[ih], host(params[ih]))
        bound[index] = found = (tuple(map(layout, params)), plan, launch, arrays, lens, project)
        return found

    def run(x: Tensor, state0: tuple[Tensor, ...] | None, params: list[list[Tensor]]):
        steps, batch = x.shape[0], x.shape[1]
        width = params[0][first_ih].shape[0]
        hidden = width // gates
        plan = schedule.plan(dtype_name, steps, batch, width, hidden, num_states)
        if not batch or (measured and plan.measure_forward is not None) or _transforms_active():
            return None
        shared = len(plan.ranges) > 1
        finals = [buffers.new((len(params), batch, hidden), dtype, shared) for _ in range(num_states)]
        inits = None if state0 is None else [s.detach().contiguous().numpy() for s in state0]
        if x.requires_grad or not x.is_contiguous():  # batch_first input comes as a transposed view
            x = x.detach().contiguous()
        layer_input = x.numpy()
        for layer in layers:
            outputs = []
            for index, reverse in layer:
                p = params[index]
                found = bound[index]
                if found is None or found[1] is not plan or found[0] != tuple(map(layout, p)):
                    found = bind(index, p, plan, steps, batch)
                launch, arrays, lens, project = found[2:]
                if launch is None:
                    return None
                out = buffers.new((steps, batch, hidden), dtype, shared)
                vectors = buffers.new((stages, 1, batch, hidden), dtype, shared)[1] if stages else None
                launch(*forward_args(cell, plan, project(layer_input).reshape(steps, batch, width), arrays,
                                     plan.zero_states if inits is None else [s[index] for s in inits],
                                     [f[1][index] for f in finals], lens, reverse, out[1], no_products, no_saved,
                                     False, vectors))
                outputs.append(out)
            layer_input = outputs[0][1] if directions == 1 else np.concatenate([o[1] for o in outputs], axis=2)
        output = outputs[0][0] if directions == 1 else torch.from_numpy(layer_input)
        return output, tuple(f[0] for f in finals)

    return run


def _position(names: tuple[str, ...], name: str) -> int | None:
    return names.index(name) if name in names else None
