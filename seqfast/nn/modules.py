"""torch.nn-compatible recurrent modules over any registered cell.

The module owns everything around the recurrence: batch_first, unbatched input, PackedSequence, layers,
directions, inter-layer dropout and the input projection (one GEMM over all time steps per layer-direction).
The recurrence itself is handed to the selected backend's scan, with per-sequence lengths and `reverse`.
Parameter names, shapes, order and initialisation are torch.nn's, so state_dicts load both ways.
Size: the torch.nn-compatible classes (RNN, LSTM, GRU, the *Cell forms, Recurrent) share one base, and each
carries its documentation, as torch.nn's rnn.py does.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .._memo import any_requires_grad as _any_requires_grad
from .._memo import memo
from ..cells.common import RECURRENT_MASK, ZONEOUT_MASKS
from ..config import resolve_choice
from ..functional import InputError, check_lengths, select_backend, selection_stamp
from ..registry import CellSpec, Query, Stack, Weights, get_cell, registry

__all__ = ["Recurrent", "RNN", "LSTM", "GRU", "RecurrentCell", "RNNCell", "LSTMCell", "GRUCell", "Stateful"]


def _check_int(owner: str, name: str, value, low: int, error: type[Exception] = ValueError) -> None:
    """torch.nn's exception types: TypeError for a size that is no int, ValueError (the cells: RuntimeError, from
    creating a negative-sized weight) for one out of range."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise error(f"{owner}: {name} must be an int >= {low}, got {value!r}")


def _check_bool(owner: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__} {value!r}")


def _weight(module: nn.Module, name: str) -> Tensor:
    """A module's weight by name: from _parameters (a dict lookup, the common case), else through getattr, which
    computes a parametrized weight (torch.nn.utils.parametrize, weight_norm): those are absent from _parameters."""
    p = module._parameters.get(name)
    return getattr(module, name) if p is None else p


_autocast_devices: dict[str, bool] = {}  # device type -> whether torch.autocast exists for it
# one call answering "is autocast on for any device" (a private torch function: where absent, assume it may be)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype torch.autocast runs a recurrence on x in, or None outside autocast. As for torch's own ops, only
    floating inputs other than float64 are cast."""
    if not _any_autocast():
        return None
    device = x.device.type
    available = _autocast_devices.get(device)
    if available is None:
        from torch.amp.autocast_mode import is_autocast_available

        available = _autocast_devices[device] = is_autocast_available(device)
    if not available or not torch.is_autocast_enabled(device) or not x.dtype.is_floating_point \
            or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(device)


_composite_dtypes: dict[tuple, tuple[torch.dtype, ...]] = {}


def _torch_nn_autocast_dtypes(cell: CellSpec, device: str, dtype: torch.dtype, autocast: torch.dtype, proj: bool,
                              kind: str) -> tuple[torch.dtype, ...]:
    """The dtypes of the states torch.nn returns under autocast, for inputs and parameters of `dtype`; kind is
    "cell" (torch.nn's *Cell), "padded" (a sequence module on a padded input) or "packed" (lengths= or a
    PackedSequence, which torch.nn runs as a PackedSequence).

    torch.nn's fused kernels run in the autocast dtype: cuDNN's RNNs and the fused cells on CUDA, and on CPU
    oneDNN's LSTM (mkldnn_rnn_layer is on autocast's lower-precision list; torch.nn takes it for an LSTM without
    proj_size on a padded input). Everything else runs torch.nn's composite step: its matrix products in the
    autocast dtype, its pointwise math promoting them with the states, so a state that mixes in its previous
    value (LSTM's c, GRU's h) stays in `dtype`. Those dtypes are found by running the cell's reference step, the
    same composite, on tiny tensors."""
    if device == "cuda" or (device == "cpu" and cell.native_mode == "LSTM" and not proj and kind == "padded"
                            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return (autocast,) * cell.num_states

    def composite() -> tuple[torch.dtype, ...]:
        hidden, g = 2, cell.num_gates
        weights = Weights(weight_hh=None, bias_hh=None)
        if cell.recurrence != "none":
            shape = (g * hidden, 1 if proj else hidden) if cell.recurrence == "dense" else (g * hidden,)
            weights.update(weight_hh=torch.zeros(shape, dtype=dtype), bias_hh=torch.zeros(g * hidden, dtype=dtype))
        for p in cell.extra_params:
            if p.recurrent:
                weights[p.name] = torch.zeros(p.shape(hidden, int(proj)), dtype=dtype)
        if proj:
            weights["weight_hr"] = torch.zeros(1, hidden, dtype=dtype)
        x_t = torch.zeros(1, g * hidden, dtype=autocast)  # the input projection, a matrix product
        state = tuple(torch.zeros(1, 1 if (proj and i == 0) else hidden, dtype=dtype)
                      for i in range(cell.num_states))
        with torch.no_grad(), torch.autocast("cpu", dtype=autocast):
            new = cell.reference_step(x_t, state, weights)
            for _ in range(0 if kind == "cell" else 3):  # a sequence: step on until the dtypes settle
                if all(a.dtype == b.dtype for a, b in zip(new, state, strict=True)):
                    break
                state, new = new, cell.reference_step(x_t, new, weights)
        return tuple(s.dtype for s in new)

    return memo(_composite_dtypes, (cell, dtype, autocast, proj, kind == "cell"), composite)


def _selection(module: nn.Module) -> tuple:
    """(the Choice a call of `module` resolves to now, the selection stamp): what a kept decision was made under and
    must still match. The choice is resolved on every call: the backend= argument, use_backend(), the environment
    and the config file may each change between calls."""
    cell = module.cell
    return resolve_choice(cell.name, cell.env_name, module.backend), selection_stamp()


def _remembered_backend(module: nn.Module, store: str, key: tuple, make_query, *query_args, then=None):
    """select_backend's decision for a module call, kept in module.__dict__[store] by `key` (what the Query is a
    function of) with the choice it was made for and the selection stamp: a call only resolves where the choice
    comes from (the backend= argument, use_backend(), the environment, the config file), any of which may change
    between calls, and compares. make_query(*query_args) builds the Query where no decision applies. With `then`,
    what is kept and returned is then(backend, key) (a runner, made once per decision; a bound method, not a
    closure made on every call)."""
    if torch.compiler.is_compiling():  # no module state changes in a traced graph
        backend = select_backend(make_query(*query_args), module.backend)[0]
        return backend if then is None else then(backend, key)
    choice, stamp = _selection(module)
    plan = module.__dict__.get(store, _NO_QUERIES).get(key)
    if plan is not None and plan[0] is choice and plan[1] == stamp:
        return plan[2]
    backend, choice = select_backend(make_query(*query_args), module.backend)
    kept = backend if then is None else then(backend, key)
    plans = module.__dict__.setdefault(store, {})
    if len(plans) >= 64:  # shapes vary without bound in some programs
        plans.clear()
    plans[key] = (choice, stamp, kept)
    return kept


class _ParamFactory:
    """Creates a layer-direction's parameters in torch.nn's order: w_ih, w_hh, b_ih, b_hh, extras, w_hr."""

    @staticmethod
    def shapes(cell: CellSpec, in_size: int, hidden: int, proj: int, bias: bool) -> list[tuple[str, tuple, object]]:
        g = cell.num_gates
        rec_in = proj or hidden
        out: list[tuple[str, tuple, object]] = [("weight_ih", (g * hidden, in_size), None)]
        if cell.recurrence == "dense":
            out.append(("weight_hh", (g * hidden, rec_in), None))
        elif cell.recurrence == "diagonal":
            out.append(("weight_hh", (g * hidden,), None))
        if bias:
            out.append(("bias_ih", (g * hidden,), None))
            if cell.recurrence != "none":
                out.append(("bias_hh", (g * hidden,), None))
        for p in cell.extra_params:
            if bias or not p.bias:
                out.append((p.name, p.shape(hidden, proj), p.init))
        if proj:
            out.append(("weight_hr", (proj, hidden), None))
        return out


class _PicklesCellByName:
    """Pickles (torch.save, copy.deepcopy, pickle) hold the cell by its registered name, not the CellSpec and
    its functions, so `torch.load(weights_only=True)` needs only the module classes allow-listed. Per-call
    caches and the parameters' init functions are derived from the cell and rebuilt on load."""

    _DERIVED = ("_queries", "_scan_names_cache", "_inits", "_step_plans", "_inference_calls")

    def __getstate__(self):
        state = dict(super().__getstate__())
        for key in self._DERIVED:
            state.pop(key, None)
        cell = state.pop("cell")
        if registry.cells.get(cell.name) is cell:
            state["_cell_name"] = cell.name
            state["_cell_origin"] = registry.cell_origin.get(cell.name, "seqfast")
        else:  # an unregistered CellSpec: only a plain pickle can carry it
            state["cell"] = cell
        return state

    def __setstate__(self, state):
        state = dict(state)
        name = state.pop("_cell_name", None)
        origin = state.pop("_cell_origin", "seqfast")
        if name is not None:
            if name not in registry.cells:
                plugin = "" if origin == "seqfast" else f" It came from the plugin {origin!r} (distribution:entry " \
                    f"point): install that distribution so its entry point registers the cell."
                raise RuntimeError(f"{type(self).__name__}: cannot load a module of cell {name!r}, which is not "
                                   f"registered in this process (registered cells: {sorted(registry.cells)}).{plugin}")
            state["cell"] = registry.cells[name]
        super().__setstate__(state)
        self._inits = _param_inits(self.cell, [name for name, _ in self.named_parameters()])


def _param_inits(cell: CellSpec, names: list[str]) -> dict[str, object]:
    """Each parameter's initialiser: its ParamSpec's for the cell's extra parameters, None (torch.nn's uniform)
    for the rest."""
    inits = {p.name: p.init for p in cell.extra_params}
    out = {}
    for name in names:
        base = re.sub(r"_l\d+(_reverse)?$", "", name)
        out[name] = inits.get(base)
    return out


class Recurrent(_PicklesCellByName, nn.Module):
    """A multi-layer recurrent network of any registered cell, with torch.nn.LSTM's arguments and outputs.

    `Recurrent("lstm", 32, 64, num_layers=2, bidirectional=True)` behaves like torch.nn.LSTM(32, 64, 2, ...);
    a plugin cell runs the same way: `Recurrent("indrnn", 32, 64)`.
    forward(input, hx=None, *, lengths=None, mask=None, return_states=False): `lengths` is an optional [B]
    alternative to PackedSequence for a padded input; outputs past a sequence's length are zero. `mask`, a bool
    tensor laid out as the input's first two dims (True = valid step, padding only at the end), is the same as
    its row sums given as lengths. return_states=True returns (output, h_n, states): every step's full state.
    step(input, hx=None) runs one time step of every layer (streaming; see seqfast.Stateful).

    Beyond torch.nn (keyword arguments; see the README's "Beyond torch.nn"): merge_mode ("concat", "sum", "mean",
    "mul": how a bidirectional layer combines its directions), input_dropout (variational: one mask per sequence
    on every layer's input), recurrent_dropout (variational: one mask per sequence on the h entering the recurrent
    product), weight_dropout (DropConnect on weight_hh, one mask per forward call), zoneout (h and c keep their
    previous value with this probability, per unit and step). The dropouts act in training only; the masks last
    sampled are in `sampled_masks`.
    """

    def __init__(
        self,
        cell: str | CellSpec,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
        merge_mode: str = "concat",
        input_dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        weight_dropout: float = 0.0,
        zoneout: float = 0.0,
    ) -> None:
        super().__init__()
        self.cell = get_cell(cell)
        owner = type(self).__name__
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"{owner}: merge_mode must be one of {list(MERGE_MODES)}, got {merge_mode!r}")
        for name, p in (("input_dropout", input_dropout), ("recurrent_dropout", recurrent_dropout),
                        ("weight_dropout", weight_dropout), ("zoneout", zoneout)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ValueError(f"{owner}: {name} must be a probability in [0, 1), got {p!r}")
        if (recurrent_dropout or weight_dropout) and self.cell.recurrence == "none":
            raise ValueError(f"{owner}: recurrent_dropout and weight_dropout need a recurrent weight; cell "
                             f"{self.cell.name!r} has none")
        self.merge_mode = merge_mode
        self.input_dropout, self.recurrent_dropout = float(input_dropout), float(recurrent_dropout)
        self.weight_dropout, self.zoneout = float(weight_dropout), float(zoneout)
        self.sampled_masks: dict[str, Tensor | tuple[Tensor, ...]] = {}
        for name, value, low in (("input_size", input_size, 1), ("hidden_size", hidden_size, 1),
                                 ("num_layers", num_layers, 1), ("proj_size", proj_size, 0)):
            _check_int(owner, name, value, low)
        if proj_size >= hidden_size:
            raise ValueError(f"{owner}: proj_size has to be smaller than hidden_size, got {proj_size} >= {hidden_size}")
        _check_bool(owner, "bias", bias)
        _check_bool(owner, "batch_first", batch_first)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"{owner}: dropout must be a number in [0, 1] (probability of zeroing), got {dropout!r}")
        if proj_size and not self.cell.supports_proj:
            raise ValueError(f"{owner}: proj_size is only supported by cells that declare it (lstm), "
                             f"not {self.cell.name!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"{owner}: dropout option adds dropout after all but last recurrent layer, so non-zero "
                          f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                          f"num_layers={num_layers}", stacklevel=2)
        self.mode = self.cell.native_mode or self.cell.name
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size, self.backend = bidirectional, proj_size, backend
        factory = {"device": device, "dtype": dtype}
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        self._inits: dict[str, object] = {}
        directions = 2 if bidirectional else 1
        real_hidden = proj_size or hidden_size
        for layer in range(num_layers):
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                in_size = input_size if layer == 0 else real_hidden * (directions if merge_mode == "concat" else 1)
                names = []
                for base, shape, init in _ParamFactory.shapes(self.cell, in_size, hidden_size, proj_size, bias):
                    name = base + suffix
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                    self._inits[name] = init
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    def _apply(self, fn, *args, **kwargs):
        # .to(), .double(), .cuda(), ...: the kept decisions' stack runners may hold views of the old parameters
        self.__dict__.pop("_queries", None)
        self.__dict__.pop("_inference_calls", None)
        return super()._apply(fn, *args, **kwargs)

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every parameter U(-1/sqrt(H), 1/sqrt(H)) unless its ParamSpec says else."""
        stdv = 1.0 / self.hidden_size**0.5 if self.hidden_size > 0 else 0
        for name, p in self.named_parameters():
            init = self._inits.get(name)
            with torch.no_grad():
                if init is None:
                    nn.init.uniform_(p, -stdv, stdv)
                else:
                    init(p, self.hidden_size)

    def flatten_parameters(self) -> None:
        """Accepted for drop-in compatibility with torch.nn (cuDNN weight packing); nothing to do here."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    # torch.nn's repr (LSTM(3, 5, num_layers=2)); the generic module also names its cell
    _repr_cell = True
    # the options beyond torch.nn, as class defaults too: modules pickled before they existed load with them off
    merge_mode = "concat"
    input_dropout = recurrent_dropout = weight_dropout = zoneout = 0.0

    def extra_repr(self) -> str:
        s = (f"{self.cell.name!r}, " if self._repr_cell else "") + f"{self.input_size}, {self.hidden_size}"
        for key, default in (("proj_size", 0), ("num_layers", 1), ("bias", True), ("batch_first", False),
                             ("dropout", 0.0), ("bidirectional", False), ("merge_mode", "concat"),
                             ("input_dropout", 0.0), ("recurrent_dropout", 0.0), ("weight_dropout", 0.0),
                             ("zoneout", 0.0)):
            if getattr(self, key, default) != default:
                s += f", {key}={getattr(self, key)}"
        return s + ("" if self.backend is None else f", backend={self.backend!r}")

    # --- forward --------------------------------------------------------------------------------------------
    def _state_sizes(self) -> list[int]:
        return [self.proj_size or self.hidden_size] + [self.hidden_size] * (self.cell.num_states - 1)

    def _unpack_hx(self, hx, batch: int, batched: bool, ref: Tensor) -> tuple[Tensor, ...] | None:
        """hx as [layers * directions, B, size] tensors; None for hx=None (zero states, made where needed)."""
        if hx is None:
            return None
        layers = self.num_layers * (2 if self.bidirectional else 1)
        sizes = self._state_sizes()
        names = self.cell.state_names
        states = (hx,) if isinstance(hx, Tensor) else tuple(hx)
        if len(states) != len(names) or not all(isinstance(s, Tensor) for s in states):
            want = "a tensor" if len(names) == 1 else f"a tuple of {len(names)} tensors {names}"
            raise InputError(f"hx: expected {want}, got {type(hx).__name__} of length {len(states)}")
        out = []
        for name, size, s in zip(names, sizes, states, strict=True):
            expected = (layers, batch, size) if batched else (layers, size)
            if tuple(s.shape) != expected:
                raise InputError(f"hx: expected {name} of shape {expected}, got {tuple(s.shape)}"
                                 + ("" if batched else " (unbatched input takes unbatched hx)"))
            if s.dtype != ref.dtype or s.device != ref.device:
                raise InputError(f"hx: expected {name} as {ref.dtype} on {ref.device}, got {s.dtype} on {s.device}")
            out.append(s if batched else s.unsqueeze(1))
        return tuple(out)

    def _prepare(self, input, lengths):
        """-> (time-major [T, B, I] input, lengths or None, batched, packed input or None)."""
        owner = type(self).__name__
        packed = input if isinstance(input, PackedSequence) else None
        if packed is not None:
            if lengths is not None:
                raise ValueError(f"{owner}: pass lengths either in the PackedSequence or as lengths=, not both")
            x, lengths = pad_packed_sequence(packed)
            batched = True
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"{owner}: input must be a Tensor or PackedSequence, got {type(input).__name__}")
            dim = input.dim()
            if dim not in (2, 3):
                raise InputError(f"{owner}: expected input to be 2-D (unbatched [T, I]) or 3-D "
                                 f"({'[B, T, I]' if self.batch_first else '[T, B, I]'}), got {dim}-D "
                                 f"of shape {tuple(input.shape)}")
            batched = dim == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
            if not batched and lengths is not None:
                raise ValueError(f"{owner}: lengths= needs a batched input")
        shape = x.shape
        if shape[-1] != self.input_size:
            raise InputError(f"{owner}: input.size(-1) must be equal to input_size. "
                             f"Expected {self.input_size}, got {shape[-1]}")
        weight = self._param(self._flat_weights_names[0])
        if x.dtype != weight.dtype:
            raise InputError(f"{owner}: input must have the type {weight.dtype}, got type {x.dtype}")
        if x.device != weight.device:
            raise InputError(f"{owner}: input is on {x.device} but the parameters are on {weight.device}")
        if shape[0] == 0:
            raise InputError(f"{owner}: input has no time steps (sequence length 0); expected at least one")
        if lengths is not None:
            lengths = check_lengths(lengths, shape[1], shape[0])
            if shape[1] == 0:  # no sequences, nothing for lengths to say (and nothing to pack)
                lengths = None
        return x, lengths, batched, packed

    def forward(self, input, hx=None, *, lengths: Tensor | None = None, mask: Tensor | None = None,
                return_states: bool = False):
        if lengths is None and mask is None and return_states is False and type(input) is Tensor:
            result = self._bound_inference(input, hx)
            if result is not None:
                return result
        if mask is not None:
            if lengths is not None:
                raise ValueError(f"{type(self).__name__}: pass either lengths= or mask=, not both")
            lengths = self._lengths_from_mask(input, mask)
        x, lengths, batched, packed = self._prepare(input, lengths)
        state0 = self._unpack_hx(hx, x.shape[1], batched, x)
        options = self._options(return_states)
        states = None
        if options:
            result = self._run(x, lengths, state0, options)
            output, final, states = result if len(result) == 3 else (*result, None)
        else:
            plain = packed is None and batched and lengths is None
            output, final = self._run(x, lengths, state0,
                                      bind=(input.shape, input.dtype, input.device) if plain else None)
        if states is not None:
            # [layers * directions, T, B, *] as the output is laid out: batch_first [.., B, T, *], unbatched [.., T, *]
            if not batched:
                states = tuple(s.squeeze(2) for s in states)
            elif self.batch_first:
                states = tuple(s.transpose(1, 2) for s in states)
        if packed is not None:
            # the output has exactly the input's packed layout: same batch_sizes and sorting indices
            steps, rows = _packed_index(packed)
            output = PackedSequence(output[steps, rows], packed.batch_sizes, packed.sorted_indices,
                                    packed.unsorted_indices)
        elif not batched:
            output = output.squeeze(1)
            final = tuple(s.squeeze(1) for s in final)
        elif self.batch_first:
            output = output.transpose(0, 1)
        hidden = final[0] if self.cell.num_states == 1 else final
        if states is None:
            return output, hidden
        return output, hidden, (states[0] if self.cell.num_states == 1 else states)

    def step(self, input: Tensor, hx=None):
        """One time step of every layer, for streaming: input [B, I] (or unbatched [I]) and hx as forward takes
        it (None: zeros) -> (output [B, H_out], new state as forward returns h_n). Each layer runs through the
        selected backend's Backend.step. Unidirectional modules only (a reverse direction needs the whole
        sequence); inter-layer dropout applies in training, the per-sequence dropout variants do not (step()
        raises in training when one is set)."""
        owner = type(self).__name__
        if self.bidirectional:
            raise ValueError(f"{owner}: step() needs a unidirectional module (the reverse direction of a "
                             "bidirectional one reads the whole sequence)")
        if self.training and (self.input_dropout or self.recurrent_dropout or self.zoneout or self.weight_dropout):
            raise ValueError(f"{owner}: step() does not apply input_dropout, recurrent_dropout, weight_dropout or "
                             "zoneout (sampled per sequence); call eval() or run forward() on whole sequences")
        if not isinstance(input, Tensor) or input.dim() not in (1, 2):
            got = f"{input.dim()}-D" if isinstance(input, Tensor) else type(input).__name__
            raise InputError(f"{owner}: step() expects input [B, I] or unbatched [I], got {got}")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        weight = self._param(self._flat_weights_names[0])
        if x.shape[1] != self.input_size or x.dtype != weight.dtype or x.device != weight.device:
            RecurrentCell._input_error(self, x, weight)
        state0 = self._unpack_hx(hx, x.shape[0], batched, x)
        if state0 is None:
            state0 = tuple(x.new_zeros(self.num_layers, x.shape[0], size) for size in self._state_sizes())
        requires_grad = torch.is_grad_enabled() and (
            x.requires_grad or _any_requires_grad(state0) or _any_requires_grad(self._parameters.values()))
        run = _remembered_backend(self, "_step_plans", (x.shape[0], x.dtype, x.device, requires_grad),
                                  self._step_query, x, requires_grad, then=self._layer_step_runner)
        finals: list[list[Tensor]] = [[] for _ in self.cell.state_names]
        layer_input = x
        for layer, names in enumerate(self._all_weights):
            new = run(layer_input, tuple(s[layer] for s in state0), [self._param(n) for n in names])
            for store, s in zip(finals, new, strict=True):
                store.append(s)
            layer_input = new[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        final = tuple(torch.stack(store) for store in finals)
        if not batched:
            layer_input, final = layer_input.squeeze(0), tuple(s.squeeze(1) for s in final)
        return layer_input, (final[0] if self.cell.num_states == 1 else final)

    def _layer_step_runner(self, backend, key: tuple):
        # every layer's parameters have the same base names (weight_ih, ...): one runner serves them all
        return backend.step_runner(self.cell, key[1], [n[: -len("_l0")] for n in self._all_weights[0]])

    def _step_query(self, x: Tensor, requires_grad: bool) -> Query:
        return Query(cell=self.cell, device=x.device.type, dtype=x.dtype, hidden_size=self.hidden_size,
                     input_size=self.input_size, batch_size=x.shape[0], seq_len=1, proj_size=self.proj_size,
                     requires_grad=requires_grad, level="step")

    def _options(self, return_states: bool) -> frozenset[str]:
        """The module options (Query.options) this call needs: none in the common case."""
        if not (return_states or self.merge_mode != "concat"
                or (self.training and (self.input_dropout or self.recurrent_dropout or self.zoneout))):
            return _NO_OPTIONS
        if not isinstance(return_states, bool):
            raise TypeError(f"{type(self).__name__}: return_states must be a bool, got {return_states!r}")
        wanted = []
        if return_states:
            wanted.append("return_states")
        if self.merge_mode != "concat" and self.bidirectional:
            wanted.append("merge_mode")
        if self.training:
            for option in ("input_dropout", "recurrent_dropout", "zoneout"):
                if getattr(self, option):
                    wanted.append(option)
        return frozenset(wanted) if wanted else _NO_OPTIONS

    def _lengths_from_mask(self, input, mask) -> Tensor:
        """mask [T, B] ([B, T] with batch_first; True = valid, padding only at the end of each row) -> lengths."""
        owner = type(self).__name__
        if isinstance(input, PackedSequence):
            raise ValueError(f"{owner}: mask= is for a padded tensor input; a PackedSequence carries its lengths")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = f"dtype {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"{owner}: mask must be a bool tensor (True = valid step), got {got}")
        if not isinstance(input, Tensor) or input.dim() != 3:
            got = f"{input.dim()}-D" if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"{owner}: mask= needs a batched (3-D) input, got {got}")
        layout = "[B, T]" if self.batch_first else "[T, B]"
        if tuple(mask.shape) != tuple(input.shape[:2]):
            raise ValueError(f"{owner}: mask: expected shape {tuple(input.shape[:2])} ({layout}, the input's first "
                             f"two dims with batch_first={self.batch_first}), got {tuple(mask.shape)}")
        rows = mask if self.batch_first else mask.t()  # [B, T]
        lengths = rows.sum(1)
        prefix = torch.arange(rows.shape[1], device=rows.device) < lengths.unsqueeze(1)
        bad = (rows != prefix).any(1) | (lengths == 0)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            why = "has no valid step" if int(lengths[row]) == 0 else "has a False before a True"
            raise ValueError(f"{owner}: mask: each sequence must be True for its first steps and False after them "
                             f"(padding only at the end, at least one valid step); sequence {row} {why}")
        return lengths

    def _query(self, x: Tensor, state0: tuple[Tensor, ...] | None, level: str, dtype: torch.dtype | None = None,
               options: frozenset[str] = frozenset()) -> Query:
        """dtype: the one the recurrence runs in where it is not x's (torch.autocast's)."""
        return self._new_query(x, self._requires_grad(x, state0), level, dtype or x.dtype, options)

    def _requires_grad(self, x: Tensor, state0: tuple[Tensor, ...] | None) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad or (state0 is not None and _any_requires_grad(state0))
            or _any_requires_grad(self.parameters() if self._modules else self._parameters.values()))

    def _module_backend(self, x: Tensor, state0: tuple[Tensor, ...] | None, dtype: torch.dtype,
                        options: frozenset[str]):
        """(the backend that runs this forward call, its stack runner or None), kept per (input shape, dtype,
        device, grad, options) (see _remembered_backend); dtype is the one the recurrence runs in (torch.autocast's
        where on)."""
        requires_grad = self._requires_grad(x, state0)
        return _remembered_backend(self, "_queries", (x.shape, dtype, x.device, requires_grad, options),
                                   self._new_query, x, requires_grad, "module", dtype, options,
                                   then=self._with_stack_runner)

    def _with_stack_runner(self, backend, key: tuple):
        _, dtype, _, requires_grad, options = key
        if options or torch.compiler.is_compiling():
            return backend, None
        return backend, backend.stack_runner(self.cell, dtype, self._stack_layout(requires_grad))

    def _stack_layout(self, requires_grad: bool) -> Stack:
        suffix_from = len("weight_ih")  # every layer-direction's first name is weight_ih + its suffix
        names = tuple(tuple(name[: len(name) - len(names[0]) + suffix_from] for name in names)
                      for names in self._all_weights)
        return Stack(self.num_layers, self.bidirectional, requires_grad, names)

    def _new_query(self, x: Tensor, requires_grad: bool, level: str, dtype: torch.dtype,
                   options: frozenset[str] = frozenset()) -> Query:
        return Query(cell=self.cell, device=x.device.type, dtype=dtype, hidden_size=self.hidden_size,
                     input_size=x.shape[-1], batch_size=x.shape[1], seq_len=x.shape[0], proj_size=self.proj_size,
                     requires_grad=requires_grad, level=level, options=options)

    def _stack_params(self) -> list[list[Tensor]]:
        """Each layer-direction's parameters in torch.nn's order, read anew on every call, so a replaced or
        parametrized parameter is the one that runs."""
        params = self._parameters
        try:
            stack = []  # loops: each comprehension is a call of its own, and this runs on every call
            for names in self._all_weights:
                layer = []
                for name in names:
                    layer.append(params[name])
                stack.append(layer)
            return stack
        except KeyError:  # a parametrized weight: a property, absent from _parameters
            return [[self._param(name) for name in names] for names in self._all_weights]

    _param = _weight

    def _bind_inference(self, key: tuple, runner) -> None:
        calls = self.__dict__.setdefault("_inference_calls", {})
        if len(calls) >= 64:  # shapes vary without bound in some programs
            calls.clear()
        calls[key] = (*_selection(self), runner)

    def _bound_inference(self, input: Tensor, hx):
        """forward's result for an inference call (grad mode off) of an input shape, dtype and device whose last
        call the stack runner took (_bind_inference), reached without the general path's checks and lookups, which
        that call passed: the shape and dtype imply them, the runner checks the parameters' layouts itself. The
        backend choice and selection stamp must be the ones it was made under, and nothing the general path would
        do differently may be on (autocast, tracing by torch.compile, dropout in training, a merge mode). None:
        the general path runs. LSTM inference at T1 B1 H4: ~43 -> ~36 us a call."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        found = self.__dict__.get("_inference_calls", _NO_QUERIES).get((input.shape, input.dtype, input.device))
        if found is None:
            return None
        if (_selection(self) != found[:2] or _autocast_dtype(input) is not None or self.merge_mode != "concat"
                or (self.training and self._samples_dropout())):
            return None
        x = input.transpose(0, 1) if self.batch_first else input
        state0 = None if hx is None else self._unpack_hx(hx, x.shape[1], True, x)
        result = found[2](x, state0, self._stack_params())
        if result is None:
            return None
        output, final = result
        return (output.transpose(0, 1) if self.batch_first else output), (final[0] if len(final) == 1 else final)

    def _samples_dropout(self) -> bool:
        """Whether a call in training mode draws dropout masks: inter-layer dropout or a per-sequence variant."""
        return bool((self.dropout and self.num_layers > 1) or self.input_dropout or self.recurrent_dropout
                    or self.zoneout or self.weight_dropout)

    def _run(self, x: Tensor, lengths: Tensor | None, state0: tuple[Tensor, ...] | None,
             options: frozenset[str] = frozenset(), bind: tuple | None = None):
        """bind: (shape, dtype, device) of a batched padded input, under which a call the stack runner took without
        autograd is kept for _bound_inference."""
        autocast = _autocast_dtype(x)
        backend, runner = self._module_backend(x, state0, autocast or x.dtype, options)
        param = self._dropconnect_param() if self.weight_dropout and self.training else None
        if autocast is None:
            if options:
                return self._run_layers(backend, x, lengths, state0, param or self._param, options)
            if (runner is not None and lengths is None and param is None
                    and not (self.dropout and self.training and self.num_layers > 1)):
                result = runner(x, state0, self._stack_params())
                if result is not None:
                    if bind is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
                        self._bind_inference(bind, runner)
                    return result
            return self._run_on(backend, x, lengths, state0, param)
        # as torch.nn does under autocast: the recurrence in the autocast dtype (inputs, states and weights cast;
        # autograd casts their gradients back), the results in the dtypes torch.nn returns
        read = param or self._param
        with torch.autocast(x.device.type, enabled=False):
            result = self._run_layers(backend, x.to(autocast), lengths,
                                      None if state0 is None else tuple(s.to(autocast) for s in state0),
                                      lambda name: read(name).to(autocast), options)
        out, final = result[0], result[1]
        dtypes = _torch_nn_autocast_dtypes(self.cell, x.device.type, x.dtype, autocast, bool(self.proj_size),
                                           "padded" if lengths is None else "packed")
        cast = (out.to(dtypes[0]), tuple(s.to(d) for s, d in zip(final, dtypes, strict=True)))
        return cast if len(result) == 2 else (*cast, result[2])

    def _dropconnect_param(self):
        """param(name) with DropConnect on every weight_hh (AWD-LSTM's WeightDrop): each masked anew per call."""
        masked = {}
        for names in self._all_weights:
            for name in names:
                if name.startswith("weight_hh"):
                    mask = torch.empty_like(self._param(name)).bernoulli_(1 - self.weight_dropout)
                    self.sampled_masks[name] = mask
                    masked[name] = self._param(name) * mask / (1 - self.weight_dropout)
        return lambda name: masked[name] if name in masked else self._param(name)

    def _run_layers(self, backend, x: Tensor, lengths: Tensor | None, state0: tuple[Tensor, ...] | None, param,
                    options: frozenset[str]):
        """The layers one layer-direction at a time, with the module options: -> (output, final states) and,
        with return_states, every step's states ([layers * directions, T, B, *] per state)."""
        if not options:
            return self._run_on(backend, x, lengths, state0, param)
        directions = 2 if self.bidirectional else 1
        steps, batch = x.shape[0], x.shape[1]
        sizes = self._state_sizes()
        record = "return_states" in options
        finals: list[list[Tensor]] = [[] for _ in sizes]
        records: list[list[Tensor]] = [[] for _ in sizes]
        layer_input = x
        for layer in range(self.num_layers):
            if "input_dropout" in options:
                keep = 1 - self.input_dropout
                mask = layer_input.new_empty(batch, layer_input.shape[2]).bernoulli_(keep) / keep
                self.sampled_masks[f"input_l{layer}"] = mask
                layer_input = layer_input * mask
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih, b_ih, recurrent = self._scan_names()[index]
                weights = Weights({base: (param(name) if name else None) for base, name in recurrent})
                if "recurrent_dropout" in options:
                    keep = 1 - self.recurrent_dropout
                    mask = x.new_empty(batch, sizes[0]).bernoulli_(keep) / keep
                    self.sampled_masks["recurrent" + suffix] = mask
                    weights[RECURRENT_MASK] = mask
                if "zoneout" in options:
                    masks = tuple(x.new_empty(steps, batch, size).bernoulli_(self.zoneout).bool() for size in sizes)
                    self.sampled_masks["zoneout" + suffix] = masks
                    weights[ZONEOUT_MASKS] = masks
                init = tuple(x.new_zeros(batch, size) for size in sizes) if state0 is None \
                    else tuple(s[index] for s in state0)
                if record:
                    out, final, states = backend.scan_states(self.cell, F.linear(layer_input, param(w_ih),
                                                             param(b_ih) if b_ih else None), init, weights, lengths,
                                                             direction == 1)
                    for store, s in zip(records, states, strict=True):
                        store.append(s)
                else:
                    out, final = backend.layer(self.cell, layer_input, param(w_ih), param(b_ih) if b_ih else None,
                                               init, weights, lengths, direction == 1)
                outputs.append(out)
                for store, s in zip(finals, final, strict=True):
                    store.append(s)
            layer_input = _merge(outputs, self.merge_mode)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        final = tuple(torch.stack(store) for store in finals)
        if not record:
            return layer_input, final
        return layer_input, final, tuple(torch.stack(store) for store in records)

    def _run_on(self, backend, x: Tensor, lengths: Tensor | None, state0: tuple[Tensor, ...] | None, param=None):
        """The layers on `backend`, their weights read by param(name) (None: as they are)."""
        if backend.has_stack():
            if state0 is None:
                layers = self.num_layers * (2 if self.bidirectional else 1)
                state0 = tuple([x.new_zeros(layers, x.shape[1], size) for size in self._state_sizes()])
            params = self._stack_params() if param is None else [[param(n) for n in names]
                                                                 for names in self._all_weights]
            return backend.run_stack(self.cell, x, lengths, state0, params, num_layers=self.num_layers,
                                     bidirectional=self.bidirectional, dropout=self.dropout,
                                     training=self.training, proj_size=self.proj_size)
        if param is None:
            param = self._param
        directions = 2 if self.bidirectional else 1
        finals: list[list[Tensor]] = [[] for _ in self.cell.state_names]
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                w_ih, b_ih, recurrent = self._scan_names()[index]
                weights = Weights({base: (param(name) if name else None) for base, name in recurrent})
                if state0 is None:  # zero states: made by the backend if it can, else here
                    init = None if backend.accepts_zero_state else tuple(
                        x.new_zeros(x.shape[1], size) for size in self._state_sizes())
                else:
                    init = tuple(s[index] for s in state0)
                out, final = backend.layer(self.cell, layer_input, param(w_ih), param(b_ih) if b_ih else None,
                                           init, weights, lengths,
                                           direction == 1)
                outputs.append(out)
                for store, s in zip(finals, final, strict=True):
                    store.append(s)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        # one layer-direction (the common case): unsqueeze is a view, where stack would copy
        return layer_input, tuple(store[0].unsqueeze(0) if len(store) == 1 else torch.stack(store)
                                  for store in finals)

    def _scan_names(self) -> list[tuple[str, str | None, tuple[tuple[str, str | None], ...]]]:
        """Per layer-direction: (weight_ih name, bias_ih name or None, ((recurrent weight, its name or None),
        ...)), worked out once: the forward pass runs on every call and should not re-parse parameter names."""
        cached = self.__dict__.get("_scan_names_cache")
        if cached is None:
            cached = []
            for names in self._all_weights:
                suffix = names[0][len("weight_ih"):]
                by_base = {n[: -len(suffix)]: n for n in names}
                recurrent = [("weight_hh", by_base.get("weight_hh")), ("bias_hh", by_base.get("bias_hh"))]
                recurrent += [(b, n) for b, n in by_base.items() if b not in ("weight_ih", "bias_ih", "weight_hh",
                                                                              "bias_hh")]
                cached.append((by_base["weight_ih"], by_base.get("bias_ih"), tuple(recurrent)))
            self.__dict__["_scan_names_cache"] = cached
        return cached


_NO_QUERIES: dict = {}
_NO_OPTIONS: frozenset[str] = frozenset()
MERGE_MODES = ("concat", "sum", "mean", "mul")


def _merge(outputs: list[Tensor], mode: str) -> Tensor:
    """A layer's output from its directions' outputs [T, B, H] (Keras's merge modes)."""
    if len(outputs) == 1:
        return outputs[0]
    forward, backward = outputs
    if mode == "concat":
        return torch.cat(outputs, dim=2)
    if mode == "sum":
        return forward + backward
    if mode == "mean":
        return (forward + backward) * 0.5
    return forward * backward


def _packed_index(packed: PackedSequence) -> tuple[Tensor, Tensor]:
    """(time, batch) coordinates, in the padded [T, B] layout, of each row of packed.data."""
    sizes = packed.batch_sizes
    steps = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(int(sizes.sum())) - torch.repeat_interleave(starts, sizes)
    rows = rank if packed.sorted_indices is None else packed.sorted_indices.cpu()[rank]
    device = packed.data.device
    return steps.to(device), rows.to(device)


class RNN(Recurrent):
    """Drop-in torch.nn.RNN: RNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True, ...)."""

    _repr_cell = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, backend: str | None = None, **options) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend=backend, **options)


class LSTM(Recurrent):
    """Drop-in torch.nn.LSTM, proj_size included; **options: Recurrent's options beyond torch.nn (merge_mode, ...)."""

    _repr_cell = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, backend: str | None = None, **options) -> None:
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype, backend=backend, **options)


class GRU(Recurrent):
    """Drop-in torch.nn.GRU."""

    _repr_cell = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, backend: str | None = None, **options) -> None:
        super().__init__("gru", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         0, device, dtype, backend=backend, **options)


class RecurrentCell(_PicklesCellByName, nn.Module):
    """One step of any registered cell, with torch.nn.LSTMCell's arguments, parameter names and outputs.

    forward(input [B, I] or [I], hx=None) returns the new state: a tensor for one-state cells (h), else a tuple.
    It runs through the selected backend's `step` (Backend.step: torch.nn's cell kernels on `native`, fused
    one-step kernels on `numba`), chosen as for the sequence modules but for a single step.
    """

    def __init__(self, cell: str | CellSpec, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: str | None = None) -> None:
        super().__init__()
        self.cell = get_cell(cell)
        _check_int(type(self).__name__, "input_size", input_size, 0, InputError)
        _check_int(type(self).__name__, "hidden_size", hidden_size, 1, InputError)
        self.input_size, self.hidden_size, self.bias, self.backend = input_size, hidden_size, bias, backend
        self._one_state = self.cell.num_states == 1
        self._names = []
        self._inits: dict[str, object] = {}
        for name, shape, init in _ParamFactory.shapes(self.cell, input_size, hidden_size, 0, bias):
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
            self._names.append(name)
            self._inits[name] = init
        self.reset_parameters()

    reset_parameters = Recurrent.reset_parameters

    _repr_cell = True  # as Recurrent's
    _one_state = False  # the cell has one state (set in __init__; a class default for modules pickled before it)

    def extra_repr(self) -> str:
        s = (f"{self.cell.name!r}, " if self._repr_cell else "") + f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        return s + ("" if self.backend is None else f", backend={self.backend!r}")

    def forward(self, input: Tensor, hx=None):
        # the per-call path is kept to a few attribute reads: at small sizes a step's kernel takes microseconds
        dim = input.dim() if isinstance(input, Tensor) else None
        if dim != 2 and dim != 1:
            got = f"{dim}-D" if dim is not None else type(input).__name__
            raise InputError(f"{type(self).__name__}: Expected input to be 1-D or 2-D, got {got}")
        batched = dim == 2
        x = input if batched else input.unsqueeze(0)
        names = self._names
        parameters = self._parameters
        if len(parameters) == len(names) and list(parameters) == names:  # the usual case: torch.nn's order
            params = list(parameters.values())
        else:  # getattr for a parametrized weight (torch.nn.utils.parametrize), which is absent from _parameters
            params = [p if (p := parameters.get(n)) is not None else getattr(self, n) for n in names]
        weight = params[0]
        dtype = x.dtype
        if x.shape[1] != self.input_size or dtype != weight.dtype or not (
                (x.is_cpu and weight.is_cpu) or x.device == weight.device):
            self._input_error(x, weight)
        if hx is None:
            state = tuple(x.new_zeros(x.shape[0], self.hidden_size) for _ in self.cell.state_names)
        elif (self._one_state and type(hx) is Tensor and batched and hx.dtype == dtype
              and hx.shape == (x.shape[0], self.hidden_size) and ((x.is_cpu and hx.is_cpu) or hx.device == x.device)):
            state = (hx,)  # what _checked_state accepts, checked inline
        else:
            state = self._checked_state(hx, x, batched)
        requires_grad = torch.is_grad_enabled() and (
            x.requires_grad or _any_requires_grad(state) or _any_requires_grad(params))
        if _any_autocast() and (autocast := _autocast_dtype(x)) is not None:
            final = self._step_autocast(x, state, params, requires_grad, autocast)
        else:
            key = (x.shape[0], dtype, x.device, requires_grad)
            plan = None if torch.compiler.is_compiling() else self.__dict__.get("_step_plans", _NO_QUERIES).get(key)
            if plan is not None and plan[0] is (selection := _selection(self))[0] and plan[1] == selection[1]:
                run = plan[2]  # _remembered_backend's kept decision, looked up inline
            else:
                run = _remembered_backend(self, "_step_plans", key, self._step_query, x, requires_grad,
                                          then=self._step_runner)
            final = run(x, state, params)
        if not batched:
            final = tuple(s.squeeze(0) for s in final)
        return final[0] if len(final) == 1 else final

    def _step_runner(self, backend, key: tuple):
        return backend.step_runner(self.cell, key[1], self._names)

    def _step_autocast(self, x: Tensor, state: tuple[Tensor, ...], params: list[Tensor], requires_grad: bool,
                       autocast: torch.dtype) -> tuple[Tensor, ...]:
        """As torch.nn's cells under torch.autocast (see Recurrent._run): the step in the autocast dtype, the
        results in the dtypes torch.nn returns."""
        backend, _ = select_backend(self._step_query(x, requires_grad, autocast), self.backend)
        with torch.autocast(x.device.type, enabled=False):
            final = backend.step(self.cell, x.to(autocast), tuple(s.to(autocast) for s in state),
                                 [p.to(autocast) for p in params], self._names)
        dtypes = _torch_nn_autocast_dtypes(self.cell, x.device.type, x.dtype, autocast, False, "cell")
        return tuple(s.to(d) for s, d in zip(final, dtypes, strict=True))

    def _step_query(self, x: Tensor, requires_grad: bool, autocast: torch.dtype | None = None) -> Query:
        return Query(cell=self.cell, device=x.device.type, dtype=autocast or x.dtype, hidden_size=self.hidden_size,
                     input_size=self.input_size, batch_size=x.shape[0], seq_len=1, requires_grad=requires_grad,
                     level="step")

    def _input_error(self, x: Tensor, weight: Tensor) -> None:
        owner = type(self).__name__
        if x.shape[-1] != self.input_size:
            raise InputError(f"{owner}: input.size(-1) must be equal to input_size. "
                             f"Expected {self.input_size}, got {x.shape[-1]}")
        if x.dtype != weight.dtype:
            raise InputError(f"{owner}: input must have the type {weight.dtype}, got type {x.dtype}")
        raise InputError(f"{owner}: input is on {x.device} but the parameters are on {weight.device}")

    def _checked_state(self, hx, x: Tensor, batched: bool) -> tuple[Tensor, ...]:
        states = (hx,) if isinstance(hx, Tensor) else tuple(hx)
        want = (x.shape[0], self.hidden_size) if batched else (self.hidden_size,)
        if len(states) != self.cell.num_states:
            self._state_error(hx, states, want, x)
        dtype, cpu = x.dtype, x.is_cpu
        for s in states:
            if not isinstance(s, Tensor) or s.shape != want or s.dtype != dtype or not (
                    (cpu and s.is_cpu) or s.device == x.device):
                self._state_error(hx, states, want, x)
        return states if batched else tuple(s.unsqueeze(0) for s in states)

    def _state_error(self, hx, states: tuple, want: tuple[int, ...], x: Tensor) -> None:
        owner, cell = type(self).__name__, self.cell
        if len(states) != cell.num_states or not all(isinstance(s, Tensor) for s in states):
            raise InputError(f"{owner}: hx: expected {cell.num_states} state tensor(s) {cell.state_names}, got "
                             f"{type(hx).__name__} of length {len(states)}")
        for name, s in zip(cell.state_names, states, strict=True):
            if s.shape != want:
                raise InputError(f"{owner}: hx: expected {name} of shape {want}, got {tuple(s.shape)}")
            if s.dtype != x.dtype or s.device != x.device:
                raise InputError(f"{owner}: hx: expected {name} as {x.dtype} on {x.device} like the input, "
                                 f"got {s.dtype} on {s.device}")


class RNNCell(RecurrentCell):
    """Drop-in torch.nn.RNNCell."""

    _repr_cell = False

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, *, backend: str | None = None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNNCell: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, bias, device, dtype, backend=backend)


class LSTMCell(RecurrentCell):
    """Drop-in torch.nn.LSTMCell."""

    _repr_cell = False

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        super().__init__("lstm", input_size, hidden_size, bias, device, dtype, backend=backend)


class GRUCell(RecurrentCell):
    """Drop-in torch.nn.GRUCell."""

    _repr_cell = False

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        super().__init__("gru", input_size, hidden_size, bias, device, dtype, backend=backend)


class Stateful(nn.Module):
    """Carries a recurrent module's state across calls, for online (streaming) inference.

    Stateful(module) wraps a sequence module (Recurrent, LSTM, ...) or a cell (RecurrentCell, LSTMCell, ...).
    forward(input, **kwargs) runs the module from the state the last call left (zeros at first, or after
    reset_state()) and keeps its final state; it returns the module's output (a cell: its output h).
    step(x_t) runs one time step of a sequence module (Recurrent.step). reset_state() forgets the state;
    reset_state(rows=...) (a bool [B] mask or row indices) zeroes those rows only, e.g. when one stream of a batch
    starts a new sequence. The kept state is detached from the graph after each call (detach=True, the default):
    gradients stop at call boundaries, as in truncated BPTT, and memory does not grow with the stream;
    detach=False keeps the graph across calls. Under torch.no_grad no graph is built at all.
    """

    def __init__(self, module: nn.Module, *, detach: bool = True) -> None:
        super().__init__()
        if not isinstance(module, (Recurrent, RecurrentCell)):
            raise TypeError(f"Stateful: module must be a seqfast Recurrent or RecurrentCell, got "
                            f"{type(module).__name__}")
        _check_bool("Stateful", "detach", detach)
        self.module, self.detach = module, detach
        self.state: Tensor | tuple[Tensor, ...] | None = None

    def forward(self, input: Tensor, **kwargs):
        if isinstance(self.module, RecurrentCell):
            state = self.module(input, self.state)
            self._keep(state)
            return state if isinstance(state, Tensor) else state[0]
        output, state = self.module(input, self.state, **kwargs)
        self._keep(state)
        return output

    def step(self, input: Tensor) -> Tensor:
        if isinstance(self.module, RecurrentCell):
            return self(input)
        output, state = self.module.step(input, self.state)
        self._keep(state)
        return output

    def _keep(self, state) -> None:
        if self.detach:
            state = state.detach() if isinstance(state, Tensor) else tuple(s.detach() for s in state)
        self.state = state

    def reset_state(self, rows: Tensor | list[int] | None = None) -> None:
        """Forget the state (rows=None), or zero the rows given as a bool [B] mask or indices."""
        if rows is None or self.state is None:
            self.state = None
            return
        states = (self.state,) if isinstance(self.state, Tensor) else self.state
        dim = 0 if isinstance(self.module, RecurrentCell) else 1  # the batch dim of the kept state
        if states[0].dim() < dim + 2:
            raise ValueError("Stateful.reset_state: rows= needs a batched state (the last input was unbatched)")
        batch = states[0].shape[dim]
        rows = torch.as_tensor(rows, device=states[0].device)
        if rows.dtype == torch.bool:
            if rows.shape != (batch,):
                raise ValueError(f"Stateful.reset_state: rows: a bool mask must have shape ({batch},), the batch "
                                 f"of the state; got {tuple(rows.shape)}")
        elif rows.dtype.is_floating_point or rows.dim() > 1 or (rows.numel() and (
                int(rows.min()) < -batch or int(rows.max()) >= batch)):
            raise ValueError(f"Stateful.reset_state: rows: expected a bool mask of shape ({batch},) or integer row "
                             f"indices in [0, {batch}), got {rows.dtype} {rows.tolist()}")
        keep = torch.ones(batch, dtype=torch.bool, device=rows.device)
        keep[rows] = False
        shape = [1] * states[0].dim()
        shape[dim] = batch
        keep = keep.view(shape)
        zero = torch.zeros((), dtype=states[0].dtype, device=states[0].device)
        new = tuple(torch.where(keep, s, zero) for s in states)
        self.state = new[0] if isinstance(self.state, Tensor) else new
