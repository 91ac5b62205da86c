"""Where a numba training step's time goes, and the checks behind RESULTS.md's notes on it.

    python benchmarks/numba_breakdown.py parts 100,64,256,256      # a training step, piece by piece
    python benchmarks/numba_breakdown.py native 100,8,64,64        # seqfast on `native` vs torch.nn, in turn
                                                                   # (inference and training)
    python benchmarks/numba_breakdown.py threads 200,8,64,64       # a forward scan on one thread vs two
    python benchmarks/numba_breakdown.py gemm 100,64,256,256       # per-step GEMM: numba loop vs MKL
    python benchmarks/numba_breakdown.py projection 100,64,512,512 # the input projection by each way, and the
                                                                   # way measured for it (gemm.projection_way)
    python benchmarks/numba_breakdown.py kernels 100,64,256,256    # per-step GEMMs, one thread: sgemm_ vs MKL's
                                                                   # AVX2 / AVX-512 kernels called directly
    python benchmarks/numba_breakdown.py faults 100,8,64,64        # training steps' page faults (getrusage)
    python benchmarks/numba_breakdown.py faults 100,8,64,64 --pool-from 1048576   # pooled only from 1 MiB
    python benchmarks/numba_breakdown.py busy 100,1,32,32          # one core kept busy by another process
    python benchmarks/numba_breakdown.py pipeline 100,3,33,47      # inference of one row range: the input projection
                                                                   # beside the scan (forward_pipelined) vs before it

Shapes are T,B,I,H; the cell is LSTM unless --cell says otherwise. Each figure is the median of --repeats samples,
a sample being the mean of enough calls to last 20 ms; contenders take their samples in turn.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import time


def _medians_ms(runs: dict, repeats: int) -> dict[str, float]:
    calls = {}
    for name, run in runs.items():
        run()
        t0 = time.perf_counter()
        run()
        calls[name] = max(1, math.ceil(0.02 / max(time.perf_counter() - t0, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                run()
            samples[name].append((time.perf_counter() - t0) / calls[name])
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


def _kernel_gflops(T: int, B: int, G: int, H: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of the scans' per-step products for one row range: h W_hh^T as N,N over a transposed W_hh (what
    the forward kernel calls) and as T,N over W_hh (what it called before 2026-11-26), and d_hg W_hh (N,N), through
    each MKL entry point this torch exports: sgemm_ and the AVX2 / AVX-512 kernels _blas may call directly."""
    import ctypes

    import numpy as np
    import torch

    from seqfast.backends.numba import schedule

    rows = max(hi - lo for lo, hi in schedule.plan("float32", T, B, G * H, H).ranges)  # with torch's threads
    torch.set_num_threads(1)
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    rng = np.random.default_rng(0)
    h, w = rng.standard_normal((rows, H), np.float32), rng.standard_normal((G * H, H), np.float32)
    wt = np.ascontiguousarray(w.T)
    d_hg = rng.standard_normal((rows, G * H), np.float32)

    def i64(v):  # integers as 8 bytes, as the kernels pass them (see _blas._fortran_gemm)
        return ctypes.byref(ctypes.c_int64(v))

    def f32(v):
        return ctypes.byref(ctypes.c_float(v))

    def ptr(a):
        return a.ctypes.data_as(ctypes.c_void_p)

    runs, flops = {}, 2 * rows * G * H * H
    for name in ("sgemm_", "mkl_blas_avx2_xsgemm", "mkl_blas_avx512_xsgemm"):
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        hg, d_h = np.empty((rows, G * H), np.float32), np.zeros((rows, H), np.float32)
        forward = (b"T", b"N", i64(G * H), i64(rows), i64(H), f32(1.0), ptr(w), i64(H), ptr(h), i64(H), f32(0.0),
                   ptr(hg), i64(G * H))
        backward = (b"N", b"N", i64(H), i64(rows), i64(G * H), f32(1.0), ptr(w), i64(H), ptr(d_hg), i64(G * H),
                    f32(1.0), ptr(d_h), i64(H))
        forward_nn = (b"N", b"N", i64(G * H), i64(rows), i64(H), f32(1.0), ptr(wt), i64(G * H), ptr(h), i64(H),
                      f32(0.0), ptr(hg), i64(G * H))
        runs[f"forward  h W_hh^T as N,N ({rows}x{H} by {H}x{G * H}), {name}"] = lambda fn=fn, a=forward_nn: fn(*a)
        runs[f"forward  h W_hh^T as T,N ({rows}x{H} by {G * H}x{H}^T), {name}"] = lambda fn=fn, a=forward: fn(*a)
        runs[f"backward d_hg W_hh ({rows}x{G * H} by {G * H}x{H}), {name}"] = lambda fn=fn, a=backward: fn(*a)
    return {name: flops / ms / 1e6 for name, ms in _medians_ms(runs, repeats).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["parts", "native", "threads", "gemm", "projection", "kernels", "faults",
                                         "busy", "pipeline"])
    parser.add_argument("shape", help="T,B,I,H")
    parser.add_argument("--cell", default="lstm", choices=["lstm", "gru", "rnn_tanh"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--pool-from", type=int, default=None, metavar="BYTES",
                        help="faults: pool buffers from this size instead of the library's (1048576: as before)")
    args = parser.parse_args()
    T, B, I, H = (int(v) for v in args.shape.split(","))

    import torch
    import torch.nn.functional as F

    import seqfast
    from seqfast.backends.fused_contract import Ownership, ScanInputs
    from seqfast.backends.numba import buffers, gemm, schedule

    cell = seqfast.get_cell(args.cell)
    G, S = cell.num_gates, cell.num_states
    backend = seqfast.get_backend("numba")
    torch.manual_seed(0)
    x = torch.randn(T, B, I)
    w_ih, b_ih = torch.randn(G * H, I) / H**0.5, torch.randn(G * H) / H**0.5
    w_hh, b_hh = torch.randn(G * H, H) / H**0.5, torch.randn(G * H) / H**0.5
    x_proj = F.linear(x, w_ih, b_ih)
    zeros = [torch.zeros(B, H) for _ in range(S)]
    inputs = ScanInputs(cell, x_proj, zeros, [w_hh, b_hh], None, False)
    grad_out = torch.ones(T, B, H)

    def scan_forward(need_saved: bool):
        return backend.forward(inputs, need_saved)

    def scan_backward() -> None:
        out, _, saved = scan_forward(True)
        backend.backward(inputs, out, saved, grad_out, [None] * S, saved_mode=Ownership.CONSUME)

    if args.what == "parts":
        d_gates = torch.randn(T * B, G * H)
        times = _medians_ms({
            "input projection (F.linear)": lambda: F.linear(x, w_ih, b_ih),
            "forward scan, saving for backward": lambda: scan_forward(True),
            "forward + backward scan (with d_W_hh)": scan_backward,
            "d_W_ih GEMM": lambda: d_gates.t().mm(x.view(T * B, I)),
        }, args.repeats)
    elif args.what == "native":
        ref = getattr(torch.nn, {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN"}[args.cell])(I, H)
        ours = seqfast.Recurrent(args.cell, I, H, backend="native")
        ours.load_state_dict(ref.state_dict())

        def infer(module) -> None:
            with torch.no_grad():
                module(x)

        def train(module) -> None:
            module(x)[0].sum().backward()

        runs = {}
        for mode, run in (("inference", infer), ("training", train)):
            runs[f"torch.nn {mode}"] = lambda run=run: run(ref)
            runs[f"seqfast on native {mode}"] = lambda run=run: run(ours)
        times = _medians_ms(runs, args.repeats)
    elif args.what == "threads":
        runs = {}
        for threads in ("1", "2"):
            def run(threads=threads) -> None:
                os.environ["SEQFAST_NUMBA_THREADS"] = threads
                scan_forward(False)
            runs[f"forward scan, {threads} thread(s)"] = run
        schedule.MIN_WORK_PER_THREAD = 0  # let two threads split even a small batch
        schedule.clear_plans()
        times = _medians_ms(runs, args.repeats)
    elif args.what == "faults":
        # whether glibc hands freed buffers back (and the next step faults them in again) depends on everything the
        # process allocated before: run it a few times
        if args.pool_from is not None:
            buffers.MIN_BYTES = args.pool_from
        cls = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN"}[args.cell]
        model = getattr(seqfast, cls)(I, H, backend="numba")

        def step() -> None:
            out, _ = model(x)
            out.sum().backward()

        times = {}
        for _ in range(20):
            step()
        before, t0, n = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
        while time.perf_counter() - t0 < 2.0:
            step()
            n += 1
        after = resource.getrusage(resource.RUSAGE_SELF)
        times[f"training step, pool from {buffers.MIN_BYTES} bytes"] = (time.perf_counter() - t0) / n * 1e3
        print(f"minor page faults per step: {(after.ru_minflt - before.ru_minflt) / n:.1f}, system time per step: "
              f"{(after.ru_stime - before.ru_stime) / n * 1e6:.0f} us ({n} steps)")
    elif args.what == "busy":
        # another process spins on one core; small torch GEMMs on two threads then wait for it (gemm.mm)
        cls = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN"}[args.cell]
        torch.manual_seed(0)
        ref = getattr(torch.nn, cls)(I, H)
        model = getattr(seqfast, cls)(I, H, backend="numba")
        model.load_state_dict(ref.state_dict())
        small = gemm.SMALL_TORCH_GEMM
        runs = {}
        for label, threshold in (("numba, small GEMMs on two threads", 0), ("numba (small GEMMs on one)", small)):
            def train(threshold=threshold) -> None:
                gemm.SMALL_TORCH_GEMM = threshold
                out, _ = model(x)
                out.sum().backward()

            def infer(threshold=threshold) -> None:
                gemm.SMALL_TORCH_GEMM = threshold
                with torch.no_grad():
                    model(x)
            runs[f"training, {label}"], runs[f"inference, {label}"] = train, infer
        runs["training, torch.nn"] = lambda: ref(x)[0].sum().backward()
        runs["inference, torch.nn"] = lambda: torch.no_grad()(ref)(x)
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            times = _medians_ms(runs, args.repeats)
        finally:
            spinner.kill()
            gemm.SMALL_TORCH_GEMM = small
    elif args.what == "pipeline":
        # two modules of the same weights, each bound (its third call) with or without the overlap
        cls = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN"}[args.cell]
        torch.manual_seed(0)
        first = getattr(seqfast, cls)(I, H, backend="numba")
        runs, default = {}, schedule.PIPELINE_MIN_STEPS
        for label, min_steps in (("input projection, then the scan", 10**9),
                                 ("input projection beside the scan", default)):
            model = getattr(seqfast, cls)(I, H, backend="numba")
            model.load_state_dict(first.state_dict())
            schedule.PIPELINE_MIN_STEPS = min_steps
            with torch.no_grad():
                for _ in range(3):
                    model(x)
            schedule.PIPELINE_MIN_STEPS = default

            def infer(model=model) -> None:
                with torch.no_grad():
                    model(x)
            runs[f"inference, {label}"] = infer
        ranges = len(schedule.plan("float32", T, B, G * H, H, S).ranges)
        print(f"this shape pipelines: {schedule.pipelines(ranges, T, T * B * I * G * H, I, H)}")
        times = _medians_ms(runs, args.repeats)
    elif args.what == "projection":
        rows = x.reshape(T * B, I)
        ways = ["mm", *(["onednn"] if gemm.onednn_linear() is not None else []),
                *(["kernel"] if gemm._direct_kernel() is not None else [])]
        runs = {f"input projection by {way}": (lambda way=way: gemm._project(way, rows, w_ih)) for way in ways}
        times = _medians_ms(runs, args.repeats)
        os.environ["SEQFAST_CALIBRATE"] = "1"  # what a first call with calibration on measures
        print(f"{args.cell} T{T} B{B} I{I} H{H}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
        for name, ms in times.items():
            print(f"  {name:40s} {ms:9.3f} ms")
        print(f"  measured way: {gemm.projection_way(rows, w_ih)}")
        return
    elif args.what == "kernels":
        times = _kernel_gflops(T, B, G, H, args.repeats)
        print(f"per-step GEMMs of {args.cell} B{B} H{H} on one thread, one row range of the scan's, GFLOP/s "
              f"(median of {args.repeats})")
        for name, gflops in times.items():
            print(f"  {name:72s} {gflops:7.1f}")
        return
    else:
        def with_gemm(loop: bool, run) -> None:
            with schedule.forced_loop_gemm(loop):
                run()

        runs = {}
        for label, loop in (("MKL", False), ("numba loop", True)):
            runs[f"forward scan, GEMM by {label}"] = lambda loop=loop: with_gemm(loop, lambda: scan_forward(True))
            runs[f"forward + backward scan, GEMM by {label}"] = lambda loop=loop: with_gemm(loop, scan_backward)
        times = _medians_ms(runs, args.repeats)
    print(f"{args.cell} T{T} B{B} I{I} H{H}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    for name, ms in times.items():
        print(f"  {name:40s} {ms:9.3f} ms")


if __name__ == "__main__":
    main()
