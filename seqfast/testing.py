"""Conformance kit: check a cell, built-in or plugin, on every backend that says it can run it.

One call:            seqfast.testing.check_cell("peephole_lstm")            # raises AssertionError on failure
One parametrisation:
    @pytest.mark.parametrize("case", seqfast.testing.cases("peephole_lstm"), ids=str)
    def test_conformance(case):
        case.run()

Every case compares against the cell's torch reference step, run sequence by sequence with autograd (an
independent loop, so the `torch` backend is checked too). Checks:
  pointwise  the Pointwise forward equals the reference step; the Pointwise backward equals autograd of forward
  scan       outputs, final state and the gradient of x_proj, every state and every weight; random odd sizes,
             with and without lengths, forward and reverse
  module     Recurrent(cell, 2 layers, bidirectional, batch_first, lengths) against the same module on `torch`
  gradcheck  float64 torch.autograd.gradcheck of the scan (where the backend runs float64)
  nan        a NaN inside one sequence spreads exactly as it does in the reference; other sequences stay finite
  bad_input  malformed scan arguments raise a ValueError naming the argument
A backend that declares it cannot run a case is skipped with its reasons (unittest.SkipTest, which pytest shows),
except that a fused backend (numba, triton) that cannot compile the cell's pointwise code fails the case: the code
is outside the contract every fused backend compiles (README, "Writing a cell"), or the backend has a bug.
check_cell reports every failing case, whatever it raised.
Cases run on CPU where the backend runs there, else on its device: on a GPU machine with TRITON_INTERPRET unset,
`triton` cases run the compiled kernels on CUDA (float32 dots at float32 accuracy, not TF32).
"""

from __future__ import annotations

import random
import unittest
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cells import TORCH_MATH
from .functional import scan
from .nn import Recurrent
from .registry import CellSpec, Query, Weights, get_cell, registry

__all__ = ["Case", "cases", "check_cell", "random_weights"]


def random_weights(cell: CellSpec, hidden: int, dtype: torch.dtype, gen: torch.Generator) -> Weights:
    """Recurrent weights for one layer-direction of `cell`, scaled so that every gate is exercised."""
    g = cell.num_gates
    w = Weights(weight_hh=None, bias_hh=None)
    scale = 1.0 / max(hidden, 1) ** 0.5
    if cell.recurrence == "dense":
        w["weight_hh"] = torch.randn(g * hidden, hidden, generator=gen, dtype=dtype) * scale
    elif cell.recurrence == "diagonal":
        w["weight_hh"] = torch.rand(g * hidden, generator=gen, dtype=dtype)
    if cell.recurrence != "none":
        w["bias_hh"] = torch.randn(g * hidden, generator=gen, dtype=dtype) * 0.5
    for p in cell.extra_params:
        if p.recurrent:
            w[p.name] = torch.randn(p.shape(hidden, 0), generator=gen, dtype=dtype) * 0.5
    return w


def _reference_scan(cell: CellSpec, x: Tensor, state0: tuple[Tensor, ...], w: Weights, lengths: Tensor | None,
                    reverse: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Each sequence alone, cut to its length, stepped in the requested direction: the plainest spec there is."""
    steps, batch = x.shape[:2]
    columns, finals = [], []
    for b in range(batch):
        n = int(lengths[b]) if lengths is not None else steps
        state = tuple(s[b : b + 1] for s in state0)
        outs: dict[int, Tensor] = {}
        for t in (range(n - 1, -1, -1) if reverse else range(n)):
            state = cell.reference_step(x[t, b : b + 1], state, w)
            outs[t] = state[0][0]
        zero = torch.zeros_like(state[0][0])
        columns.append(torch.stack([outs.get(t, zero) for t in range(steps)]))
        finals.append(state)
    final = tuple(torch.cat([f[i] for f in finals]) for i in range(cell.num_states))
    return torch.stack(columns, 1), final


def _tolerance(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-7, "atol": 1e-8} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}


def _close(actual, expected, what: str, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual, expected, **_tolerance(dtype), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


@dataclass(frozen=True)
class Case:
    """One conformance check of one cell on one backend; `run()` raises AssertionError or unittest.SkipTest."""

    cell: str
    backend: str
    check: str
    steps: int = 4
    batch: int = 3
    hidden: int = 5
    reverse: bool = False
    with_lengths: bool = False
    dtype: torch.dtype = torch.float32
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __str__(self) -> str:
        parts = [self.cell, self.backend, self.check]
        if self.check not in ("pointwise", "bad_input"):
            parts += [f"T{self.steps}", f"B{self.batch}", f"H{self.hidden}", str(self.dtype).replace("torch.", "")]
            parts += ["rev"] if self.reverse else []
            parts += ["len"] if self.with_lengths else []
        return "-".join(parts)

    # --- helpers ----------------------------------------------------------------------------------------------
    def _spec(self) -> CellSpec:
        return get_cell(self.cell)

    @property
    def device(self) -> str:
        """CPU where the backend runs there; else its device (triton on a GPU machine runs its real kernels)."""
        backend = registry.backends.get(self.backend)
        devices = None if backend is None else backend.devices
        return "cpu" if devices is None or "cpu" in devices else sorted(devices)[0]

    def _skip_unless_supported(self, level: str, requires_grad: bool = True) -> None:
        if self.backend not in registry.backends:
            raise unittest.SkipTest(f"backend {self.backend!r} is not registered")
        backend, spec = registry.backends[self.backend], self._spec()
        if backend.available():
            uncompiled = backend.pointwise_reasons(spec)  # a failure of the cell (or the backend), not a skip
            if uncompiled:
                raise AssertionError(f"{self}: backend {self.backend!r} compiles pointwise code but cannot compile "
                                     f"cell {spec.name!r}'s: {'; '.join(uncompiled)}")
        query = Query(self._spec(), device=self.device, dtype=self.dtype, hidden_size=self.hidden,
                      batch_size=self.batch, seq_len=self.steps, requires_grad=requires_grad, level=level)
        reasons = registry.backends[self.backend].not_supported_reasons(query)
        if reasons:
            raise unittest.SkipTest(f"{self.backend} cannot run {self}: {'; '.join(reasons)}")

    def _inputs(self):
        spec, gen = self._spec(), torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.steps, self.batch, spec.num_gates * self.hidden, generator=gen, dtype=self.dtype)
        state = tuple(torch.randn(self.batch, self.hidden, generator=gen, dtype=self.dtype) * 0.5
                      for _ in spec.state_names)
        w = random_weights(spec, self.hidden, self.dtype, gen)
        lengths = None
        if self.with_lengths:
            rng = random.Random(self.seed)
            lengths = torch.tensor([self.steps] + [rng.randint(1, self.steps) for _ in range(self.batch - 1)])
            lengths = lengths[torch.randperm(self.batch, generator=gen)]
        device = self.device
        w = Weights({k: (v.to(device) if v is not None else None) for k, v in w.items()})
        return x.to(device), tuple(s.to(device) for s in state), w, lengths

    def run(self) -> None:
        # on a GPU, float32 dots follow cudnn.allow_tf32 (TF32 by default): check at float32 accuracy instead
        allow_tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32 and self.device == "cpu"
        try:
            getattr(self, "_check_" + self.check)()
        finally:
            torch.backends.cudnn.allow_tf32 = allow_tf32

    # --- checks -----------------------------------------------------------------------------------------------
    def _check_pointwise(self) -> None:
        spec = self._spec()
        if spec.pointwise is None:
            raise unittest.SkipTest(f"cell {spec.name!r} has no pointwise math (fused backends decline it)")
        x, state, w, _ = self._inputs()
        x, state = x[0].double() * 2, tuple(s.double() for s in state)
        w = Weights({k: (v.double() if v is not None else None) for k, v in w.items()})
        expected = spec.reference_step(x, state, w)
        g, hidden = spec.num_gates, self.hidden
        from .cells.common import pointwise_recurrent_term

        params = []
        for name in spec.pointwise.params:
            vec = w[name]
            params += [vec[r * hidden : (r + 1) * hidden] for r in range(vec.numel() // hidden)]
        hg = (pointwise_recurrent_term(spec, x, state, w, tuple(params), TORCH_MATH)
              if spec.recurrence != "none" else None)
        xg = tuple(t.clone().requires_grad_() for t in x.chunk(g, 1))
        hgs = tuple(t.clone().requires_grad_() for t in (hg.chunk(g, 1) if hg is not None
                                                           else [torch.zeros_like(state[0])] * g))
        st = tuple(s.clone().requires_grad_() for s in state)
        ps = tuple(p.clone().expand_as(state[0]).clone().requires_grad_() for p in params)
        got = spec.pointwise.forward(TORCH_MATH, xg, hgs, st, ps)
        _close(tuple(got), tuple(expected), f"{spec.name}: Pointwise.forward vs reference_step", torch.float64)
        if spec.pointwise.backward is None:
            return
        gen = torch.Generator().manual_seed(self.seed + 1)
        for s, stage in enumerate(spec.pointwise.stages):  # each stage's backward against autograd of its forward
            n = stage.gates
            v = stage.forward(TORCH_MATH, xg[:n], hgs[:n], st, ps)
            d_v = torch.randn(v.shape, generator=gen, dtype=torch.float64)
            leaves = [*xg[:n], *hgs[:n], *st, *ps]
            auto = torch.autograd.grad(v, leaves, d_v, allow_unused=True)
            d_xg, d_hg, d_state, d_params = stage.backward(TORCH_MATH, xg[:n], hgs[:n], st, ps, d_v)
            names = ([f"d_xg[{i}]" for i in range(n)] + [f"d_hg[{i}]" for i in range(n)]
                     + [f"d_state[{m}]" for m in spec.state_names] + [f"d_params[{i}]" for i in range(len(ps))])
            for name, mine, ref, leaf in zip(names, [*d_xg, *d_hg, *d_state, *d_params], auto, leaves, strict=True):
                ref = torch.zeros_like(leaf) if ref is None else ref
                mine = mine if isinstance(mine, Tensor) else torch.full_like(leaf, float(mine))
                _close(mine.detach(), ref, f"{spec.name}: Stage {s} backward {name} vs autograd of its forward",
                       torch.float64)
        d_new = tuple(torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in got)
        leaves = [*xg, *hgs, *st, *ps]
        auto = torch.autograd.grad(got, leaves, d_new, allow_unused=True)
        d_xg, d_hg, d_state, d_params = spec.pointwise.backward(TORCH_MATH, xg, hgs, st, ps, d_new)
        names = ([f"d_xg[{i}]" for i in range(g)] + [f"d_hg[{i}]" for i in range(g)]
                 + [f"d_state[{n}]" for n in spec.state_names] + [f"d_params[{i}]" for i in range(len(ps))])
        for name, mine, ref, leaf in zip(names, [*d_xg, *d_hg, *d_state, *d_params], auto, leaves, strict=True):
            ref = torch.zeros_like(leaf) if ref is None else ref
            mine = mine if isinstance(mine, Tensor) else torch.full_like(leaf, float(mine))
            if name.startswith("d_hg") and spec.recurrence == "none":
                continue  # no recurrent term exists, its gradient is never used
            _close(mine.detach(), ref, f"{spec.name}: Pointwise.backward {name} vs autograd of forward",
                   torch.float64)

    def _check_scan(self) -> None:
        self._skip_unless_supported("scan")
        spec = self._spec()
        x, state, w, lengths = self._inputs()
        results = []
        for runner in ("reference", self.backend):
            xs = x.clone().requires_grad_()
            ss = tuple(s.clone().requires_grad_() for s in state)
            ws = Weights({k: (v.clone().requires_grad_() if v is not None else None) for k, v in w.items()})
            if runner == "reference":
                out, final = _reference_scan(spec, xs, ss, ws, lengths, self.reverse)
            else:
                out, final = scan(spec, xs, ss, ws, lengths, self.reverse, backend=self.backend)
            gen = torch.Generator().manual_seed(self.seed + 7)
            loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)).sum()
            loss = loss + sum((f * torch.randn(f.shape, generator=gen, dtype=f.dtype).to(f.device)).sum()
                              for f in final)
            leaves = [xs, *ss, *(v for v in ws.values() if v is not None)]
            results.append((out, final, torch.autograd.grad(loss, leaves, allow_unused=True)))
        names = ["x_proj", *(f"state0[{n}]" for n in spec.state_names), *(k for k, v in w.items() if v is not None)]
        (out_r, fin_r, grad_r), (out_b, fin_b, grad_b) = results
        _close(out_b, out_r, f"{self}: outputs", self.dtype)
        _close(fin_b, fin_r, f"{self}: final state", self.dtype)
        if lengths is not None:
            for b, n in enumerate(lengths.tolist()):
                assert torch.all(out_b[n:, b] == 0), f"{self}: outputs past length {n} of sequence {b} are not zero"
        for name, gb, gr in zip(names, grad_b, grad_r, strict=True):
            _close(gb, gr, f"{self}: gradient of {name}", self.dtype)

    def _check_module(self) -> None:
        self._skip_unless_supported("module")
        spec = self._spec()
        torch.manual_seed(self.seed)
        size = self.extra.get("input_size", 3)
        kwargs = dict(num_layers=2, bidirectional=True, batch_first=True, dtype=self.dtype)
        ref = Recurrent(spec, size, self.hidden, backend="torch", **kwargs)
        ours = Recurrent(spec, size, self.hidden, backend=self.backend, **kwargs)
        ours.load_state_dict(ref.state_dict())
        ref.to(self.device)
        ours.to(self.device)
        _, _, _, lengths = self._inputs()
        gen = torch.Generator().manual_seed(self.seed + 3)
        x = torch.randn(self.batch, self.steps, size, generator=gen, dtype=self.dtype).to(self.device)
        grads = []
        for module in (ref, ours):
            xs = x.clone().requires_grad_()
            out, state = module(xs, lengths=lengths)
            states = state if isinstance(state, tuple) else (state,)
            loss = (out * out.detach().sign()).sum() + sum(s.sum() for s in states)
            grads.append((out, states, torch.autograd.grad(loss, [xs, *module.parameters()])))
        (o_r, s_r, g_r), (o_b, s_b, g_b) = grads
        _close(o_b, o_r, f"{self}: module output", self.dtype)
        _close(s_b, s_r, f"{self}: module final state", self.dtype)
        names = ["input", *(n for n, _ in ours.named_parameters())]
        for name, a, b in zip(names, g_b, g_r, strict=True):
            _close(a, b, f"{self}: module gradient of {name}", self.dtype)

    def _check_gradcheck(self) -> None:
        self._skip_unless_supported("scan")
        spec = self._spec()
        x, state, w, lengths = self._inputs()
        names = [k for k, v in w.items() if v is not None]
        leaves = [t.clone().requires_grad_() for t in (x, *state, *(w[k] for k in names))]

        def run(*tensors):
            xs, ss = tensors[0], tuple(tensors[1 : 1 + spec.num_states])
            ws = Weights(weight_hh=None, bias_hh=None)
            ws.update(zip(names, tensors[1 + spec.num_states :], strict=True))
            out, final = scan(spec, xs, ss, ws, lengths, self.reverse, backend=self.backend)
            return (out, *final)

        assert torch.autograd.gradcheck(run, tuple(leaves), eps=1e-6, atol=1e-5, rtol=1e-4), f"{self}: gradcheck"

    def _check_nan(self) -> None:
        self._skip_unless_supported("scan", requires_grad=False)
        spec = self._spec()
        x, state, w, lengths = self._inputs()
        t = min(1, self.steps - 1)
        x[t, 0, 0] = float("nan")
        with torch.no_grad():
            out_r, fin_r = _reference_scan(spec, x, state, w, lengths, self.reverse)
            out_b, fin_b = scan(spec, x, state, w, lengths, self.reverse, backend=self.backend)
        assert torch.equal(torch.isnan(out_b), torch.isnan(out_r)), (
            f"{self}: NaN positions differ from the reference: backend {torch.isnan(out_b).nonzero().tolist()}, "
            f"reference {torch.isnan(out_r).nonzero().tolist()}")
        for a, b in zip(fin_b, fin_r, strict=True):
            assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{self}: NaN in the final state differs"

    def _check_bad_input(self) -> None:
        self._skip_unless_supported("scan", requires_grad=False)
        spec = self._spec()
        x, state, w, _ = self._inputs()
        bad = [
            ("x_proj", lambda: scan(spec, x[0], state, w, backend=self.backend)),
            ("x_proj", lambda: scan(spec, x[:0], state, w, backend=self.backend)),
            ("state0", lambda: scan(spec, x, tuple(s[:, :-1] for s in state), w, backend=self.backend)),
            ("lengths", lambda: scan(spec, x, state, w, torch.zeros(x.shape[1], dtype=torch.long),
                                     backend=self.backend)),
        ]
        for argument, call in bad:
            try:
                call()
            except ValueError as exc:
                assert argument in str(exc), f"{self}: the error for a bad {argument} does not name it: {exc}"
            else:
                raise AssertionError(f"{self}: a malformed {argument} was accepted")


def _backend_dtypes(name: str) -> list[torch.dtype]:
    dtypes = registry.backends[name].dtypes
    return [d for d in (torch.float32, torch.float64) if dtypes is None or d in dtypes]


def cases(cell: str | CellSpec, backends: list[str] | None = None, *, seed: int = 0, quick: bool = False
          ) -> list[Case]:
    """Every conformance case for `cell` on `backends` (default: all registered). Cheap to build; run lazily."""
    name = get_cell(cell).name
    backends = list(registry.backends) if backends is None else backends
    rng = random.Random(seed)
    out = [Case(name, "any", "pointwise", seed=seed)]
    shapes = [(1, 1, 1), (4, 3, 5)] if quick else [(1, 1, 1), (4, 3, 5), (rng.randint(2, 6), 2, rng.choice([3, 7]))]
    for backend in backends:
        dtype = _backend_dtypes(backend)[0]
        out.append(Case(name, backend, "module", 4, 3, 4, False, True, dtype, seed))
        if not registry.backends[backend].has_scan():
            continue  # module-level backends (native) have no scan to check
        for steps, batch, hidden in shapes:
            for reverse in (False, True):
                out.append(Case(name, backend, "scan", steps, batch, hidden, reverse, batch > 1, dtype, seed))
        out.append(Case(name, backend, "nan", 4, 2, 3, True, True, dtype, seed))
        out.append(Case(name, backend, "bad_input", 3, 2, 3, dtype=dtype, seed=seed))
        if torch.float64 in _backend_dtypes(backend):
            out.append(Case(name, backend, "gradcheck", 3, 2, 3, True, True, torch.float64, seed))
    return out


def check_cell(cell: str | CellSpec, backends: list[str] | None = None, *, seed: int = 0, quick: bool = False
               ) -> dict[str, str]:
    """Run every case; return {case: 'passed' | 'skipped: why'}; raise AssertionError listing every failure."""
    report, failures = {}, []
    for case in cases(cell, backends, seed=seed, quick=quick):
        try:
            case.run()
        except unittest.SkipTest as exc:
            report[str(case)] = f"skipped: {exc}"
        except AssertionError as exc:
            report[str(case)] = "failed"
            failures.append(f"{case}: {exc}")
        except Exception as exc:  # reported with the rest: one broken case must not hide the others
            report[str(case)] = "failed"
            failures.append(f"{case}: {type(exc).__name__}: {exc}")
        else:
            report[str(case)] = "passed"
    if failures:
        raise AssertionError(f"{len(failures)} conformance failure(s) for {cell!r}:\n" + "\n".join(failures))
    return report
