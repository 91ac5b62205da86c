"""seqfast[numba] vs torch.nn on CPU: inference and training over the issue #3 grid, with peak memory.

    python benchmarks/numba_compare.py                 # full grid, writes a markdown table to stdout
    python benchmarks/numba_compare.py --quick         # a few repeats, for a look
    python benchmarks/numba_compare.py --cells lstm --modes train --points 2
    python benchmarks/numba_compare.py --cells lstm --shape 100,4,32,32 --shape 100,1,64,128   # other shapes
    python benchmarks/numba_compare.py --latency       # cold / warm first-call latency in fresh processes

torch.nn is timed twice: interleaved with seqfast in this process, and alone in a fresh subprocess that never
imports seqfast, numba or scipy (so no foreign thread pool can slow it down or speed it up), started just before
the same grid point is timed here; the speed-up counted is the lower of the two. Every time is the median of
--repeats samples after --warmup runs; a sample is the mean of enough back-to-back calls to last 20 ms (one call,
from the middle of the grid up), and the contenders' samples are taken in turn. The `auto` column times seqfast
with backend="auto" (what a user gets by default).

The `2nd core` columns say how much of its second core this VM gave while a point was timed: a fixed GEMM is timed
on one thread and on all of torch's threads among the samples (here, and in the torch.nn-alone child), and the
ratio printed (about 1.9 with two cores, 1.0 when the second gave nothing). On the 2-vCPU benchmark VM it swings
between the two over tens of seconds, which moves every multi-threaded time; see RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

GRID = [(100, 1, 32, 32), (100, 8, 64, 64), (200, 32, 128, 128), (100, 64, 256, 256), (50, 64, 512, 512)]
CELLS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN"}
MODES = ("infer", "train")


def _make(kind: str, cell: str, I: int, H: int, backend: str | None = None):
    import torch

    cls = getattr(torch.nn, CELLS[cell])
    if kind == "torch":
        torch.manual_seed(0)
        return cls(I, H)
    import seqfast

    torch.manual_seed(0)
    ref = cls(I, H)
    model = getattr(seqfast, CELLS[cell])(I, H, backend=backend)
    model.load_state_dict(ref.state_dict())
    return model


def _timer(model, x, mode: str):
    import torch

    if mode == "infer":
        def run() -> None:
            with torch.no_grad():
                model(x)
    else:
        def run() -> None:
            out, _ = model(x)
            out.sum().backward()
    return run


# A sample is the mean over enough back-to-back calls to last this long: single sub-millisecond calls on this VM
# swing by 2x from one to the next, so their median still moved by 20-30% between runs.
MIN_SAMPLE_S = 0.02


def _medians_ms(runs: list, warmup: int, repeats: int) -> list[float]:
    """Median time of each run, their samples taken in turn (run 0, 1, 2, 0, 1, 2, ...), so a slow stretch of this
    VM hits every contender alike instead of whichever happened to be timing then."""
    calls = []
    for run in runs:
        for _ in range(warmup):
            run()
        t0 = time.perf_counter()
        run()
        calls.append(max(1, math.ceil(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-6))))
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, n, store in zip(runs, calls, times, strict=True):
            t0 = time.perf_counter()
            for _ in range(n):
                run()
            store.append((time.perf_counter() - t0) / n)
    return [statistics.median(t) * 1e3 for t in times]


def _core_probe() -> list:
    """Two runs of one fixed GEMM (B8 H64's input projection): on one thread, and on torch's thread count. The ratio
    of their medians is the parallel speed-up the machine gives at that moment."""
    import torch

    a, b = torch.randn(800, 64), torch.randn(64, 256)
    threads = torch.get_num_threads()

    def one_thread() -> None:
        torch.set_num_threads(1)
        try:
            torch.mm(a, b)
        finally:
            torch.set_num_threads(threads)

    return [one_thread, lambda: torch.mm(a, b)]


def _inputs(T: int, B: int, I: int):
    import torch

    return torch.randn(T, B, I, generator=torch.Generator().manual_seed(1))


def _alone(args) -> None:
    """Child process: torch.nn only. Prints {key: ms} as JSON."""
    import torch

    assert "seqfast" not in sys.modules and "numba" not in sys.modules and "scipy" not in sys.modules
    results = {}
    for cell in args.cells:
        for index in args.points:
            T, B, I, H = GRID[index]
            x = _inputs(T, B, I)
            model = _make("torch", cell, I, H)
            for mode in args.modes:
                t, one, many = _medians_ms([_timer(model, x, mode), *_core_probe()], args.warmup, args.repeats)
                results[f"{cell}|{index}|{mode}"] = t
                results[f"{cell}|{index}|{mode}|cores"] = one / many
    torch.set_num_threads(torch.get_num_threads())
    print(json.dumps(results))


def _peak_child(kind: str, cell: str) -> None:
    """Child process: peak RSS growth (MiB) of one training step at the largest grid point."""
    T, B, I, H = GRID[-1]
    model = _make(kind, cell, I, H, backend="numba" if kind == "numba" else None)
    # one step at T = 8 first, for both: what a first call sets up (numba's compiled kernels and thread-team
    # launchers, oneDNN's primitives for the input projection) is not counted, but no buffer of the measured
    # step's size exists yet
    _timer(model, _inputs(8, B, I), "train")()
    x = _inputs(T, B, I)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (the peak RSS) to the current RSS
        f.write("5")
    status = open("/proc/self/status").read()
    base = int(status.split("VmRSS:")[1].split()[0])
    _timer(model, x, "train")()
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0])
    print(json.dumps({"peak_mib": (peak - base) / 1024}))


_LATENCY_PROBE = """
import json, time
t0 = time.perf_counter()
import torch, seqfast
t1 = time.perf_counter()
model = seqfast.{cls}(32, 32, backend="numba")
x = torch.randn(10, 2, 32)
with torch.no_grad():
    model(x)
t2 = time.perf_counter()
out, _ = model(x)
out.sum().backward()
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "first_inference_s": t2 - t1, "first_backward_s": t3 - t2}}))
"""


def _latency(cells: list[str]) -> None:
    """First-call latency in fresh processes: cold (empty kernel cache) then warm (the cache the cold run left)."""
    import tempfile

    for cell in cells:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "SEQFAST_CACHE_DIR": cache}
            for label in ("cold", "warm"):
                out = subprocess.run([sys.executable, "-c", _LATENCY_PROBE.format(cls=CELLS[cell])], env=env,
                                     check=True, capture_output=True, text=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"- first call, {cell}, {label} cache: import seqfast {r['import_s']:.2f} s, first inference "
                      f"{r['first_inference_s']:.2f} s, then first training step {r['first_backward_s']:.2f} s")


def _child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--points", nargs="+", type=int, default=list(range(len(GRID))))
    parser.add_argument("--shape", action="append", default=[], metavar="T,B,I,H",
                        help="time this shape instead of the grid (repeatable; no memory figures)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="--repeats 3 --warmup 1")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--latency", action="store_true", help="only measure cold / warm first-call latency")
    parser.add_argument("--alone", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peak", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 3, 1
    if args.shape:
        try:
            GRID[:] = [tuple(int(v) for v in shape.split(",")) for shape in args.shape]
        except ValueError:
            parser.error(f"--shape: expected T,B,I,H as four integers, got {args.shape}")
        if any(len(shape) != 4 or min(shape) < 1 for shape in GRID):
            parser.error(f"--shape: expected T,B,I,H as four positive integers, got {args.shape}")
        args.points, args.no_memory = list(range(len(GRID))), True
    if args.alone:
        return _alone(args)
    if args.peak:
        return _peak_child(*args.peak)
    if args.latency:
        return _latency(args.cells)

    timing = ["--modes", *args.modes, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]

    import numba
    import torch

    import seqfast

    rows = []
    for cell in args.cells:
        for index in args.points:
            T, B, I, H = GRID[index]
            # torch.nn alone, just before the same point is timed here: this VM has slow stretches lasting
            # minutes, and a baseline taken in another stretch than the contenders would skew the ratio
            alone = _child(["--cells", cell, "--shape", ",".join(map(str, GRID[index])), *timing, "--alone"])
            alone = {key.replace("|0|", f"|{index}|"): ms for key, ms in alone.items()}
            x = _inputs(T, B, I)
            ref = _make("torch", cell, I, H)
            fast = _make("seqfast", cell, I, H, backend="numba")
            auto = _make("seqfast", cell, I, H, backend="auto")
            for mode in args.modes:
                t_torch, t_numba, t_auto, t_one, t_many = _medians_ms(
                    [*(_timer(m, x, mode) for m in (ref, fast, auto)), *_core_probe()], args.warmup, args.repeats)
                t_alone, cores_alone = alone[f"{cell}|{index}|{mode}"], alone[f"{cell}|{index}|{mode}|cores"]
                with torch.set_grad_enabled(mode == "train"):
                    chosen = seqfast.current_backend(cell, seq_len=T, batch_size=B, input_size=I, hidden_size=H,
                                                     requires_grad=mode == "train")
                best_torch = min(t_torch, t_alone)
                rows.append(dict(cell=cell, point=(T, B, I, H), mode=mode, torch_mixed=t_torch, torch_alone=t_alone,
                                 numba=t_numba, auto=t_auto, auto_choice=chosen, speedup=best_torch / t_numba,
                                 auto_vs_torch=best_torch / t_auto, cores=t_one / t_many, cores_alone=cores_alone))
                print(f"{cell:8s} {str((T, B, I, H)):22s} {mode:5s} torch.nn {t_torch:8.2f} / alone {t_alone:8.2f} "
                      f"ms  numba {t_numba:8.2f} ms  x{best_torch / t_numba:5.2f}  auto({chosen}) {t_auto:8.2f} ms  "
                      f"2nd core x{t_one / t_many:.2f} / alone x{cores_alone:.2f}", file=sys.stderr, flush=True)

    print(f"machine: {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numba {numba.__version__}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}\n")
    print("| cell | T, B, I, H | mode | torch.nn interleaved ms | torch.nn alone ms | numba ms | speed-up "
          "| auto (choice) ms | auto vs torch.nn | 2nd core: interleaved / alone |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['cell']} | {', '.join(map(str, r['point']))} | {r['mode']} | {r['torch_mixed']:.2f} | "
              f"{r['torch_alone']:.2f} | {r['numba']:.2f} | **{r['speedup']:.2f}x** | {r['auto']:.2f} "
              f"({r['auto_choice']}) | {r['auto_vs_torch']:.2f}x | {r['cores']:.2f} / {r['cores_alone']:.2f} |")
    print()
    for mode in args.modes:
        sel = [r["speedup"] for r in rows if r["mode"] == mode]
        line = [f"{mode}: geomean {math.exp(statistics.fmean(map(math.log, sel))):.2f}x"]
        for cell in args.cells:
            per = [r["speedup"] for r in rows if r["mode"] == mode and r["cell"] == cell]
            line.append(f"{cell} {math.exp(statistics.fmean(map(math.log, per))):.2f}x")
        if mode == "infer":
            b1 = [f"{r['cell']} {r['speedup']:.2f}x" for r in rows if r["mode"] == mode and r["point"][1] == 1]
            line.append("batch 1: " + ", ".join(b1))
        print("- " + "; ".join(line))
    worst = min(rows, key=lambda r: r["auto_vs_torch"])
    print(f"- auto: worst {worst['auto_vs_torch']:.2f}x of torch.nn ({worst['cell']} {worst['point']} {worst['mode']})")
    # against torch.nn timed in turn with it, in this process: the same stretch of this VM, which matters where
    # auto runs native, i.e. torch.nn's own kernel
    same = min(rows, key=lambda r: r["torch_mixed"] / r["auto"])
    print(f"- auto: worst {same['torch_mixed'] / same['auto']:.2f}x of torch.nn timed in turn with it "
          f"({same['cell']} {same['point']} {same['mode']}, {same['auto_choice']})")
    if not args.no_memory and "train" in args.modes:
        for cell in args.cells:
            t = _child(["--peak", "torch", cell])["peak_mib"]
            n = _child(["--peak", "numba", cell])["peak_mib"]
            print(f"- peak memory, training at {GRID[-1]}: {cell} torch.nn {t:.0f} MiB, numba {n:.0f} MiB "
                  f"({n / t:.2f}x)")


if __name__ == "__main__":
    main()
