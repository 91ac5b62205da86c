"""seqfast[triton] vs torch.nn (cuDNN) on a CUDA device, same weights: inference and training over the issue #4 grid.

    python benchmarks/gpu_compare.py                    # full grid (T x B x H x dtype x mode x cell), markdown table
    python benchmarks/gpu_compare.py --quick            # a subset for a first look
    python benchmarks/gpu_compare.py --cells lstm --dtypes bfloat16 --modes train --T 100 --B 16 64 --H 256
    python benchmarks/gpu_compare.py --smoke            # CPU, through TRITON_INTERPRET: checks this script only

Every time is the median of triton.testing.do_bench (CUDA events, L2 flushed between runs). Inference runs under
torch.no_grad(); training is forward + backward of the whole module with a fixed output gradient (parameter
gradients accumulate; nothing is zeroed inside the timed region for either side). Before timing, each row checks
that both modules agree (max |difference| of the outputs is printed) so a fast wrong kernel cannot hide. The
`path` column is the triton backend's own path (weights on chip, hidden dimension tiled, or with
SEQFAST_TRITON_COOPERATIVE=1 the cooperative kernels where the grid can be resident).
The first call of a shape compiles its kernels; do_bench's warm-up absorbs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

CELLS = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn_tanh": ("RNN", {"nonlinearity": "tanh"})}
FULL = {"T": [100, 1000], "B": [1, 16, 64, 256], "H": [64, 128, 256, 512, 1024]}
QUICK = {"T": [100], "B": [16, 64], "H": [128, 256]}


def _modules(cell: str, size: int, hidden: int, dtype, device: str):
    import torch

    import seqfast

    name, kwargs = CELLS[cell]
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(size, hidden, **kwargs).to(device=device, dtype=dtype)
    ours = getattr(seqfast, name)(size, hidden, backend="triton", **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    ref.flatten_parameters()  # cuDNN wants one weight buffer; without it every call compacts (a slower baseline)
    return ref, ours


def _step(model, x, grad, mode: str):
    import torch

    if mode == "infer":
        def run() -> None:
            with torch.no_grad():
                model(x)
    else:
        def run() -> None:
            out, _ = model(x)
            out.backward(grad)
    return run


def _time_ms(run, smoke: bool) -> float:
    if smoke:  # the interpreter: a wall-clock sanity run, not a measurement
        run()
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median"))


def _row(cell: str, dtype_name: str, mode: str, T: int, B: int, H: int, device: str, smoke: bool) -> dict:
    import torch

    import seqfast
    from seqfast.registry import Query

    dtype = getattr(torch, dtype_name)
    row = {"cell": cell, "dtype": dtype_name, "mode": mode, "T": T, "B": B, "H": H}
    query = Query(seqfast.get_cell(cell), device=device, dtype=dtype, hidden_size=H, batch_size=B, seq_len=T,
                  requires_grad=mode == "train")
    backend = seqfast.get_backend("triton")
    if backend.cooperative_plan(query.cell, B, H, dtype)[0] is not None:  # SEQFAST_TRITON_COOPERATIVE=1
        row["path"] = "cooperative"
    else:
        row["path"] = "on-chip" if backend.plan(query.cell, H, dtype).on_chip else "tiled"
    reasons = backend.not_supported_reasons(query)
    if reasons:
        row["error"] = "; ".join(reasons)
        return row
    ref, ours = _modules(cell, H, H, dtype, device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(T, B, H, device=device, dtype=dtype, generator=gen).requires_grad_(mode == "train")
    grad = torch.randn(T, B, H, device=device, dtype=dtype, generator=gen)
    try:
        with torch.no_grad():
            diff = (ours(x)[0].float() - ref(x)[0].float()).abs().max().item()
        row["max_abs_diff"] = diff
        row["cudnn_ms"] = _time_ms(_step(ref, x, grad, mode), smoke)
        row["triton_ms"] = _time_ms(_step(ours, x, grad, mode), smoke)
        row["speedup"] = row["cudnn_ms"] / row["triton_ms"]
    except Exception as exc:  # one failing shape (e.g. out of memory) must not hide the rest of the grid
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        del ref, ours, x, grad
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def _print_header(device_name: str) -> None:
    print(f"# seqfast[triton] vs torch.nn (cuDNN) on {device_name}\n")
    print("| cell | dtype | mode | T | B | H | path | cuDNN ms | triton ms | speed-up | max abs diff |")
    print("|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|")


def _print_row(row: dict) -> None:
    head = f"| {row['cell']} | {row['dtype']} | {row['mode']} | {row['T']} | {row['B']} | {row['H']} | {row['path']} |"
    if "error" in row:
        print(f"{head} - | - | - | {row['error']} |", flush=True)
    else:
        print(f"{head} {row['cudnn_ms']:.3f} | {row['triton_ms']:.3f} | {row['speedup']:.2f}x | "
              f"{row['max_abs_diff']:.1e} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"subset: {QUICK}")
    parser.add_argument("--smoke", action="store_true",
                        help="run tiny shapes on CPU through TRITON_INTERPRET=1 to check this script (no timing)")
    parser.add_argument("--cells", nargs="+", choices=sorted(CELLS), default=None)
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                        default=["float32", "float16"])
    parser.add_argument("--modes", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    parser.add_argument("--T", nargs="+", type=int)
    parser.add_argument("--B", nargs="+", type=int)
    parser.add_argument("--H", nargs="+", type=int)
    parser.add_argument("--json", help="also write every row to this JSON file")
    args = parser.parse_args(argv)

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton builds any kernel
        grid, device = {"T": [3], "B": [2], "H": [5]}, "cpu"
    else:
        # the interpreter would run "GPU" timings on the CPU: never let an inherited setting do that
        os.environ.pop("TRITON_INTERPRET", None)
        import torch

        if not torch.cuda.is_available():
            print("gpu_compare.py needs a CUDA device and torch.cuda.is_available() is False on this machine; "
                  "nothing was measured. (On CPU the triton backend runs only through TRITON_INTERPRET=1, which is "
                  "for tests: `--smoke` checks this script that way.)", file=sys.stderr)
            return 2
        grid, device = (QUICK if args.quick else FULL), "cuda"
    grid = {k: getattr(args, k) or v for k, v in grid.items()}
    cells = args.cells or (["lstm", "gru"] if args.quick else list(CELLS))

    import torch

    _print_header(torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter smoke run, not timing)")
    rows = []
    for cell in cells:
        for dtype in args.dtypes:
            for mode in args.modes:
                for T in grid["T"]:
                    for B in grid["B"]:
                        for H in grid["H"]:
                            row = _row(cell, dtype, mode, T, B, H, device, args.smoke)
                            rows.append(row)
                            _print_row(row)
    timed = [r for r in rows if "speedup" in r]
    if timed and not args.smoke:
        train_small = [r["speedup"] for r in timed if r["mode"] == "train" and r["B"] <= 64 and r["H"] <= 256]
        print(f"\n{len(timed)} rows timed, {len(rows) - len(timed)} not (see their error column).")
        if train_small:
            print(f"training, B <= 64, H <= 256 (target >= 1x cuDNN): min {min(train_small):.2f}x, "
                  f"max {max(train_small):.2f}x over {len(train_small)} rows")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
