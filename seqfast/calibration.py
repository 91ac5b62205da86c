"""`auto`'s calibration: which backend is fastest for a shape, measured on this machine and remembered.

The first `auto` decision in a shape bucket (see `bucket_of`) times the backends that can run the query on random
inputs of that query's own sizes (the bucket's steps), a few short runs each (about a tenth of a second in all,
up to about a second for long sequences of large layers; the first runs of each, which JIT-compile, fill caches
and bind, are neither timed nor counted), the way
torch.backends.cudnn.benchmark picks convolution algorithms. The winner is kept per bucket and written to
`calibration-<key>.json` in seqfast's cache directory, under a key of the CPU model, its core count, torch's thread
count and the versions of torch, numba and seqfast; a file for another key is never read. Once a bucket is decided,
selection remembers the decision per query (functional._select): a module call costs one dict lookup, as before.

Rules:
- Only which backend runs changes. Every candidate computes the same math, and the timing runs draw their inputs
  from a private generator, so the program's random stream is untouched.
- Nothing is timed while torch.compile traces, inside torch.func transforms, or from inside a timing run: the
  stored decision applies there, else the static rule (each backend's auto_rank).
- No compiling just to calibrate. A candidate whose kernels would first be JIT-compiled (Backend.needs_compile:
  numba without the cell's kernels in this process or in its disk cache) leaves the bucket to the static rule,
  undecided, until a process finds the kernels compiled (they are once any program runs them, and numba keeps them
  on disk). A compile costs seconds, more than a better choice could win back in a short program; `seqfast tune`
  compiles what it needs (once per machine) and calibrates a grid.
- SEQFAST_CALIBRATE=0, or `calibrate = false` in the config file: the static rule only. The setting is read when a
  query is first decided in a process.
- Thread-safe: one lock around timing and the table; a bucket is timed once, other threads wait for its decision.
Size: measuring, the shape buckets and the cache file are one decision procedure, read top to bottom.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import torch

from .config import cache_root, calibration_setting
from .registry import Backend, Query, Stack, Weights, registry

__all__ = ["Bucket", "bucket_of", "choose", "calibrate", "candidates", "table", "table_path", "machine_key",
           "cpu_model", "cpu_model_from", "package_version", "forget"]

FORMAT = 1
BUDGET_SECONDS = 0.1  # timed runs per bucket, all candidates together (at least one run each)
# Two runs at least: one run can be preempted on a busy machine. Up to 25 while the budget lasts: with 5, a 0.3 ms
# LSTM training run (T64 B1 H32, Zen 5 EPYC) put numba within MARGIN of native in one of three decisions (0.294
# against 0.321 ms); best of 25 gave 0.23 against 0.30-0.32 in each of four
MIN_ROUNDS, MAX_ROUNDS = 2, 25
# Untimed runs before the timed ones. The first JIT-compiles and fills caches. numba's first call of a shape measures
# its GEMM choice on the general path, and only the second binds the shape's call and loads the compiled functions
# that bound calls run (10 ms at GRU T64 B1 H256, against 1.6-2 ms for the calls after it): timed, it made numba
# look clearly slower after MIN_ROUNDS, and native was kept where numba ran 2.4x faster.
WARM_UP_RUNS = 2
SLOW_FACTOR = 2.0  # a candidate this much slower than the best after MIN_ROUNDS is settled: not run again
# the static rule's choice stands unless another candidate's best run is this much faster: a busy machine can make
# any one run slow, and a decision is kept on disk, so noise must not flip it
MARGIN = 1.10
MAX_STEPS = 256
# Before long runs, one run of this many steps (or WORK_PER_RUN's worth, if more) rules out the candidates more
# than SLOW_FACTOR slower: enough steps for a per-step Python loop to show against fused kernels
SCREEN_STEPS = 16
WORK_PER_RUN = 1 << 24
MIN_STEPS = 4
# The long runs take the bucket's representative steps, or as many as the short run's fastest candidate would take
# this long for: a backend's per-step cost can grow with the sequence (oneDNN's LSTM training at B64 H256 took 0.56
# ms a step at T32 and 0.70 at T64 on a Zen 5 EPYC, where numba's stayed at 0.50; timed on 4 steps, numba looked
# within MARGIN and native was kept at 0.65x numba's speed), and a time bound holds on a fast or a slow CPU alike
LONG_RUN_SECONDS = 0.05
# A cell (level "step") is timed as this many steps in a loop, each feeding the next its state, as cells run: one
# step alone is mostly fixed costs (autograd's backward start, the loss), which hid a faster step
STEP_LOOP = 8

_clock: Callable[[], float] = time.perf_counter


class Bucket(NamedTuple):
    """Shapes that share one decision (calibrate() times the sizes of the query that first uses it)."""

    cell: str
    device: str  # device type, with the GPU's name for CUDA
    dtype: str
    requires_grad: bool
    level: str
    steps: int
    batch: int
    input_size: int | None  # None: a scan, which takes x_proj
    hidden_size: int
    proj_size: int

    @property
    def label(self) -> str:
        parts = [self.cell, self.device, self.dtype, "train" if self.requires_grad else "infer", self.level,
                 f"T{self.steps}", f"B{self.batch}"]
        parts += [] if self.input_size is None else [f"I{self.input_size}"]
        parts += [f"H{self.hidden_size}"] + ([f"P{self.proj_size}"] if self.proj_size else [])
        return "/".join(parts)


# Nearby shapes share a decision: the backends' relative speed changes slowly with size (GEMM efficiency, per-step
# overhead against per-step work), so batch, input, hidden and projection sizes round to the nearest power of two
# (a bucket spans a factor of two). Steps round to the nearest power of four from 4, and every sequence from 128
# steps up shares one bucket: fixed costs are amortized there, and what grows with the sequence shows at 256 steps.
# One step is a bucket of its own: it runs other code (the cells' step kernels) than two steps do.
def _pow2(n: int) -> int:
    return 1 << max(0, round(math.log2(n)))


def _steps_bucket(steps: int) -> int:
    return 1 if steps == 1 else min(4 ** max(1, round(math.log(steps, 4))), MAX_STEPS)


_device_names: dict[str, str] = {}


def _device_label(device: str) -> str:
    if device != "cuda":
        return device
    if device not in _device_names:
        _device_names[device] = f"cuda:{torch.cuda.get_device_name()}"
    return _device_names[device]


def bucket_of(query: Query) -> Bucket | None:
    """The bucket of a query; None for a query without its full shape (nothing to time) or an empty one."""
    shape = (query.seq_len, query.batch_size, query.hidden_size)
    if any(n is None or n < 1 for n in shape) or (query.level == "module" and not query.input_size):
        return None
    hidden = _pow2(query.hidden_size)
    proj = 0 if not query.proj_size else min(_pow2(query.proj_size), hidden // 2)
    if query.proj_size and not proj:
        return None
    return Bucket(query.cell.name, _device_label(query.device), str(query.dtype).replace("torch.", ""),
                  query.requires_grad, query.level, _steps_bucket(query.seq_len), _pow2(query.batch_size),
                  None if query.level == "scan" else _pow2(query.input_size), hidden, proj)


# --- the table, in memory and on disk -----------------------------------------------------------------------------

_lock = threading.RLock()
_local = threading.local()  # .stored_only: a depth; set while tracing and while timing
_tables: dict[Path, dict[str, dict]] = {}  # file -> {bucket label: entry}
_unwritable: set[Path] = set()
_cpu: list[str] = []


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), with its family and model numbers where it gives them, else what
    platform reports."""
    if not _cpu:
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read(1 << 16)
        except OSError:
            text = ""
        _cpu.append(cpu_model_from(text) or platform.processor() or platform.machine() or "unknown")
    return _cpu[0]


def cpu_model_from(cpuinfo: str) -> str:
    """The first processor's model name in /proc/cpuinfo's text, with "(family F, model M)" where it has those:
    virtual machines report a Zen 3 and a Zen 5 EPYC alike as "AMD EPYC", and a calibration made on one must not
    be read on the other."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "")
    family, model = fields.get("cpu family"), fields.get("model")
    if name and family and model:
        return f"{name} (family {family}, model {model})"
    return name


def package_version(dist: str) -> str | None:
    """An installed distribution's version, None where it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_key() -> dict:
    """What a calibration holds for: the CPU, its cores, torch's threads, the library versions."""
    from ._version import __version__

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "numba": package_version("numba"), "seqfast": __version__}


def table_path(key: dict | None = None) -> Path:
    key = machine_key() if key is None else key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / f"calibration-{digest}.json"


def _valid_entry(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("backend"), str)
            and isinstance(entry.get("seconds"), dict)
            and all(isinstance(v, (int, float)) for v in entry["seconds"].values()))


def _read(path: Path, key: dict, warn: bool) -> dict[str, dict]:
    """The decisions a file holds for `key`; {} (with a warning naming the file) for one that cannot be used."""
    def ignore(why: str) -> dict:
        if warn:
            warnings.warn(f"seqfast: ignoring the calibration file {path}: {why}; auto measures again and "
                          "rewrites it", RuntimeWarning, stacklevel=4)
        return {}

    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        return ignore(f"it cannot be read ({exc})")
    try:
        data = json.loads(text)
    except ValueError as exc:
        return ignore(f"it is not valid JSON ({exc})")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("key"), dict) \
            or not isinstance(data.get("decisions"), dict) or not all(map(_valid_entry, data["decisions"].values())):
        return ignore(f"it is not a calibration table of format {FORMAT}")
    if data["key"] != key:
        changed = ", ".join(f"{k} {data['key'].get(k)!r} (here {v!r})" for k, v in key.items()
                            if data["key"].get(k) != v)
        return ignore(f"it was written for another machine or other versions: {changed}")
    return data["decisions"]


def _current() -> tuple[Path, dict, dict[str, dict]]:
    """(file, key, decisions) for this machine now (the thread count can change at run time)."""
    key = machine_key()
    path = table_path(key)
    decisions = _tables.get(path)
    if decisions is None:
        with _lock:
            decisions = _tables.get(path)
            if decisions is None:
                decisions = _tables[path] = _read(path, key, warn=True)
    return path, key, decisions


def _write(path: Path, key: dict, decisions: dict[str, dict]) -> None:
    """Merge into the file (another process may have added buckets) and replace it atomically."""
    merged = {**_read(path, key, warn=False), **decisions}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps({"format": FORMAT, "key": key, "decisions": merged}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        if path not in _unwritable:
            _unwritable.add(path)
            warnings.warn(f"seqfast: cannot write the calibration file {path} ({exc}); decisions are kept in this "
                          "process only (set SEQFAST_CACHE_DIR to a writable directory)", RuntimeWarning,
                          stacklevel=4)


def table() -> tuple[Path, dict[str, dict]]:
    """(the calibration file for this machine, its decisions {bucket label: entry}): what `seqfast info` shows."""
    path, _, decisions = _current()
    return path, dict(decisions)


def forget() -> None:
    """Drop the tables held in memory (the files stay): the next decision reads its file again."""
    with _lock:
        _tables.clear()


# --- deciding -----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def stored_only() -> Iterator[None]:
    """Inside: no timing; stored decisions apply, else the static rule (torch.compile's tracing uses this)."""
    _local.stored_only = getattr(_local, "stored_only", 0) + 1
    try:
        yield
    finally:
        _local.stored_only -= 1


def _may_time() -> bool:
    return not (getattr(_local, "stored_only", 0) or torch.compiler.is_compiling()
                or torch._C._functorch.peek_interpreter_stack() is not None)


def candidates(query: Query) -> list[Backend]:
    """The backends `auto` times for a query: those with no reasons that do not decline `auto` (auto_rank < 0)."""
    return [b for b in registry.backends.values() if not b.not_supported_reasons(query) and b.auto_rank(query) >= 0]


def _stored(decisions: dict[str, dict], bucket: Bucket, names: set[str]) -> str | None:
    """The stored winner, if the same candidates were timed (a new or removed backend means timing again)."""
    entry = decisions.get(bucket.label)
    if entry is not None and set(entry["seconds"]) == names and entry["backend"] in names:
        return entry["backend"]
    return None


def choose(query: Query, able: list[Backend]) -> Backend | None:
    """`auto`'s calibrated choice among `able` (backends with no reasons), timing them on a bucket's first use;
    None where the static rule decides (calibration off, a query without its shape, fewer than two candidates,
    no timing allowed here, or a candidate that would first need a JIT compile)."""
    enabled, _ = calibration_setting()
    bucket = bucket_of(query) if enabled else None
    if bucket is None:
        return None
    ranked = [b for b in able if b.auto_rank(query) >= 0]
    if len(ranked) < 2:
        return None
    by_name = {b.name: b for b in ranked}
    _, _, decisions = _current()
    name = _stored(decisions, bucket, set(by_name))
    if name is None:
        if not _may_time() or any(b.needs_compile(query) for b in ranked):
            return None
        name = calibrate(query, ranked)["backend"]
    return by_name[name]


def calibrate(query: Query, backends: list[Backend] | None = None, *, force: bool = False) -> dict:
    """Time `backends` (default: candidates(query)) on the query's bucket, store and persist the winner, and return
    the bucket's entry {"backend", "seconds": {name: best run}, "shape": [T, B, I, H, P]}. A stored entry for the
    same candidates is returned as it is unless `force`. Compiles kernels as needed (in untimed warm-up runs)."""
    bucket = bucket_of(query)
    if bucket is None:
        raise ValueError(f"calibrate: the query needs seq_len, batch_size, hidden_size (and input_size for a "
                         f"module) of at least 1, got {query.describe()}")
    backends = candidates(query) if backends is None else backends
    if not backends:
        raise ValueError(f"calibrate: no backend can run {query.describe()}")
    with _lock:
        path, key, decisions = _current()
        names = {b.name for b in backends}
        if not force and _stored(decisions, bucket, names) is not None:
            return decisions[bucket.label]
        gates = query.cell.num_gates
        timed = _timed_shape(bucket, query)
        steps = STEP_LOOP if bucket.level == "step" else timed.steps
        short = steps if bucket.level == "step" else min(steps, max(SCREEN_STEPS, _short_steps(timed, gates)))
        with stored_only():  # a backend that selects inside its own run gets the static rule
            if steps > short:
                # long runs only for the candidates a short run leaves in the race (the reference backend's
                # Python loop would spend seconds on them); the others keep their short time, scaled
                quick = _time_candidates({b.name: _runner(b, query, timed, short) for b in backends},
                                         min_rounds=1, max_rounds=1)
                fastest = min(quick.values())
                racing = [b for b in backends if quick[b.name] <= SLOW_FACTOR * fastest]
                if len(racing) < 2:  # the short run decided
                    steps, seconds = short, quick
                else:
                    steps = _long_steps(steps, short, fastest)
                    seconds = {n: t * steps / short for n, t in quick.items()}
                    # one warm-up: the short runs compiled and measured the GEMM choices; the first long run
                    # binds numba's call of its length and touches the larger buffers
                    seconds.update(_time_candidates({b.name: _runner(b, query, timed, steps) for b in racing},
                                                    warm_ups=1))
            else:
                seconds = _time_candidates({b.name: _runner(b, query, timed, steps) for b in backends})
        rank = {b.name: b.auto_rank(query) for b in backends}
        best = min(seconds, key=lambda n: (seconds[n], -rank[n], n))  # ties: the static rule's order
        static = max(rank, key=lambda n: (rank[n], n))
        if seconds[best] * MARGIN > seconds[static]:
            best = static
        entry = {"backend": best, "seconds": seconds,
                 "shape": [steps, timed.batch, timed.input_size, timed.hidden_size, timed.proj_size]}
        decisions[bucket.label] = entry
        _write(path, key, {bucket.label: entry})
        return entry


def _timed_shape(bucket: Bucket, query: Query) -> Bucket:
    """The bucket with the sizes of the query that first decides it: what is timed. The bucket's power-of-two
    sizes could differ from it in what decides the race (numba ran an RNN cell at B97 H51 1.34x torch.nn's, and
    as fast as native at B128 H64); a program that runs one shape, as most do, gets the decision of its own."""
    return bucket._replace(batch=query.batch_size, hidden_size=query.hidden_size, proj_size=query.proj_size or 0,
                           input_size=None if bucket.input_size is None else query.input_size)


def _per_step_work(bucket: Bucket, gates: int) -> int:
    """Multiply-adds of one step's forward: its share of the input projection and the recurrent product."""
    return bucket.batch * gates * bucket.hidden_size * (bucket.hidden_size + (bucket.input_size or 0))


def _long_steps(steps: int, short: int, fastest: float) -> int:
    """The steps of the long runs: the representative's, or as many as the fastest candidate runs in
    LONG_RUN_SECONDS at the pace of its short run (at least the short run's)."""
    if fastest <= 0:
        return steps
    return max(short, min(steps, int(short * LONG_RUN_SECONDS / fastest)))


def _short_steps(bucket: Bucket, gates: int) -> int:
    """WORK_PER_RUN's worth of steps (at least MIN_STEPS, at most the representative's)."""
    return min(bucket.steps, max(MIN_STEPS, WORK_PER_RUN // max(1, _per_step_work(bucket, gates))))


def _time_candidates(runs: dict[str, Callable[[], None]], min_rounds: int = MIN_ROUNDS,
                     max_rounds: int = MAX_ROUNDS, warm_ups: int = WARM_UP_RUNS) -> dict[str, float]:
    """The best time of each run: `warm_ups` untimed runs each, then interleaved rounds, alternating the order,
    until the budget is spent; a candidate clearly slower than the best is settled after min_rounds."""
    for run in runs.values():
        for _ in range(warm_ups):
            run()
    best = dict.fromkeys(runs, math.inf)
    active, spent = list(runs), 0.0
    for round_ in range(max_rounds):
        for name in (active if round_ % 2 == 0 else active[::-1]):
            start = _clock()
            runs[name]()
            elapsed = _clock() - start
            best[name] = min(best[name], elapsed)
            spent += elapsed
        if round_ + 1 < min_rounds:
            continue
        fastest = min(best.values())
        active = [n for n in active if best[n] <= SLOW_FACTOR * fastest]
        if spent >= BUDGET_SECONDS or len(active) < 2:
            break
    return best


def _runner(backend: Backend, query: Query, bucket: Bucket, steps: int) -> Callable[[], None]:
    """One call of `backend` on random inputs of the bucket's shape, run the way modules (or scan) run it: one
    layer in one direction, forward, and backward when the query trains."""
    cell, device, dtype = query.cell, torch.device(query.device), query.dtype
    batch, hidden, proj, gates = bucket.batch, bucket.hidden_size, bucket.proj_size, cell.num_gates
    gen = torch.Generator(device=device).manual_seed(0)
    train = bucket.requires_grad
    bound = 1.0 / math.sqrt(hidden)

    def rand(*shape: int, scale: float = bound) -> torch.Tensor:
        t = torch.rand(shape, generator=gen, device=device).mul_(2 * scale).sub_(scale).to(dtype)
        return t.requires_grad_(train)

    weights = Weights(weight_hh=None, bias_hh=None)
    if cell.recurrence == "dense":
        weights["weight_hh"] = rand(gates * hidden, proj or hidden)
    elif cell.recurrence == "diagonal":
        weights["weight_hh"] = rand(gates * hidden)
    if cell.recurrence != "none":
        weights["bias_hh"] = rand(gates * hidden)
    for p in cell.extra_params:
        if p.recurrent:
            weights[p.name] = rand(*p.shape(hidden, proj))
    if proj:
        weights["weight_hr"] = rand(proj, hidden)
    sizes = [proj or hidden] + [hidden] * (cell.num_states - 1)
    leaves = [w for w in weights.values() if w is not None]

    if query.level == "scan":
        x_proj = rand(steps, batch, gates * hidden, scale=1.0)
        leaves.append(x_proj)
        state0 = tuple(torch.zeros(batch, s, device=device, dtype=dtype) for s in sizes)
        call = lambda: backend.scan(cell, x_proj, state0, weights, None, False)  # noqa: E731
    else:
        x = rand(steps, batch, bucket.input_size, scale=1.0).detach()
        weight_ih, bias_ih = rand(gates * hidden, bucket.input_size), rand(gates * hidden)
        leaves += [weight_ih, bias_ih]
        # torch.nn's parameter order: w_ih, w_hh, b_ih, b_hh, extras, w_hr
        named = [("weight_ih", weight_ih), ("weight_hh", weights["weight_hh"]), ("bias_ih", bias_ih),
                 ("bias_hh", weights["bias_hh"]),
                 *[(n, w) for n, w in weights.items() if n not in ("weight_hh", "bias_hh", "weight_hr")],
                 *([("weight_hr", weights["weight_hr"])] if proj else [])]
        named = [(n, w) for n, w in named if w is not None]
        names, params = [n for n, _ in named], [w for _, w in named]
        if query.level == "step":  # what the cells call
            state0 = tuple(torch.zeros(batch, s, device=device, dtype=dtype) for s in sizes)

            def call() -> tuple[torch.Tensor, ...]:
                state = state0
                for t in range(steps):
                    state = backend.step(cell, x[t], state, params, names)
                return state
        elif backend.has_stack():
            stacked = tuple(torch.zeros(1, batch, s, device=device, dtype=dtype) for s in sizes)
            call = lambda: backend.run_stack(cell, x, None, stacked, [params], num_layers=1,  # noqa: E731
                                             bidirectional=False, dropout=0.0, training=train, proj_size=proj)
        else:
            init = None if backend.accepts_zero_state else tuple(
                torch.zeros(batch, s, device=device, dtype=dtype) for s in sizes)
            # as a module calls it: through the backend's stack runner where it has one and takes the call
            stack_run = backend.stack_runner(cell, dtype, Stack(1, False, train, (tuple(names),)))

            def call() -> tuple:
                return ((stack_run(x, None, [params]) if stack_run is not None else None)
                        or backend.layer(cell, x, weight_ih, bias_ih, init, weights, None, False))

    def run() -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad() if train else torch.no_grad())
            if device.type in ("cpu", "cuda"):
                stack.enter_context(torch.autocast(device.type, enabled=False))
            out = call()[0]
            if train:
                out.sum().backward()
                for t in leaves:
                    t.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run
