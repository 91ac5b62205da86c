"""The `seqfast` command: `seqfast info` (what can run here, and why not), `seqfast tune` (calibrate `auto` for a
grid of shapes), `seqfast bench` and `seqfast demo` (applications trained on real data)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

from . import calibration
from ._version import __version__
from .config import calibration_setting, config_file_settings, context_choices, resolve_choice, setting
from .functional import select_backend
from .registry import Query, registry


def collect_info() -> dict:
    """Everything `seqfast info` shows, as plain data."""
    versions = {"seqfast": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("numpy", "numba", "llvmlite", "triton"):
        versions[dist] = calibration.package_version(dist)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = {}
    for name, backend in registry.backends.items():
        available = backend.available()
        entry = {"description": backend.description, "available": available,
                 "unavailable_reason": backend.unavailable_reason(), "details": backend.details() if available else []}
        backends[name] = entry
    table = {}
    for cell_name, cell in registry.cells.items():
        row = {}
        for name, backend in registry.backends.items():
            for dev in sorted({"cpu", device}):
                query = Query(cell, device=dev, hidden_size=128, requires_grad=True)
                reasons = backend.not_supported_reasons(query)
                path = getattr(backend, "path_for", None)
                row.setdefault(name, {})[dev] = {
                    "ok": not reasons,
                    "reasons": reasons,
                    **({"path": path(query)} if path and not reasons else {}),
                }
        choice = resolve_choice(cell_name, cell.env_name)
        try:
            effective = select_backend(Query(cell, device=device, hidden_size=128, requires_grad=True))[0].name
        except (RuntimeError, ValueError) as exc:
            effective = f"error: {exc}".splitlines()[0]
        table[cell_name] = {"origin": registry.cell_origin.get(cell_name, "seqfast"), "backends": row,
                            "requested": choice.name, "source": choice.source, "effective": effective}
    path, default, per_cell = config_file_settings()
    env = {k: v for k, v in os.environ.items()
           if k.startswith("SEQFAST_") or k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                 "TRITON_INTERPRET")}
    enabled, source = calibration_setting()
    calibration_file, decisions = calibration.table()
    return {
        "calibration": {"enabled": enabled, "source": source, "file": str(calibration_file),
                        "key": calibration.machine_key(), "decisions": decisions},
        "versions": versions,
        "device": device,
        "cpu": calibration.cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "backends": backends,
        "cells": table,
        "plugins": {
            "loaded": list(registry.plugins_loaded),
            "failed": [vars(f) for f in registry.plugin_failures],
            "disabled": setting("disable_plugins"),
        },
        "config": {"file": str(path) if path else None, "backend": default, "backends": dict(per_cell),
                   "use_backend": dict(context_choices()), "environment": env},
    }


def _print_info(info: dict) -> None:
    print("seqfast " + info["versions"]["seqfast"])
    print("versions: " + ", ".join(f"{k} {v or '-'}" for k, v in info["versions"].items() if k != "seqfast"))
    print(f"device: {info['device']}   cpu: {info['cpu']}   torch threads: {info['torch_threads']}")
    print("\nbackends:")
    for name, b in info["backends"].items():
        state = "available" if b["available"] else f"unavailable: {b['unavailable_reason']}"
        print(f"  {name:<10} {state}  ({b['description']})")
        for line in b["details"]:
            print(f"  {'':<10} {line}")
    print(f"\ncells x backends on {info['device']} (training, hidden_size=128): ✓ runs, ✗ n = reason n below")
    names = list(info["backends"])
    width = max(len(c) for c in info["cells"]) + 2
    print(" " * (width + 2) + "".join(f"{n:<12}" for n in names) + "auto picks  (requested, by)")
    footnotes: list[str] = []
    for cell_name, cell in info["cells"].items():
        row = f"  {cell_name:<{width}}"
        for name in names:
            verdict = cell["backends"][name][info["device"]]
            if verdict["ok"]:
                mark = "✓" + (f" {verdict['path']}" if "path" in verdict else "")
            else:
                why = "; ".join(verdict["reasons"])
                if why not in footnotes:
                    footnotes.append(why)
                mark = f"✗ {footnotes.index(why) + 1}"
            row += f"{mark:<12}"
        print(row + f"{cell['effective']:<11} ({cell['requested']}, {cell['source']})")
    for i, why in enumerate(footnotes, 1):
        print(f"    {i}. {why}")
    origins = {c: v["origin"] for c, v in info["cells"].items() if v["origin"] != "seqfast"}
    if origins:
        print("  cells from plugins: " + ", ".join(f"{c} ({o})" for c, o in origins.items()))
    plugins = info["plugins"]
    print("\nplugins:" + (" discovery disabled by SEQFAST_DISABLE_PLUGINS" if plugins["disabled"] else ""))
    for label in plugins["loaded"]:
        print(f"  loaded  {label}")
    for failure in plugins["failed"]:
        print(f"  FAILED  {failure['distribution']}:{failure['entry_point']}: {failure['error']}")
    if not plugins["loaded"] and not plugins["failed"]:
        print("  (none)")
    cfg = info["config"]
    print("\nconfiguration (argument > use_backend > SEQFAST_BACKEND_<CELL> > SEQFAST_BACKEND > file > auto):")
    print(f"  config file: {cfg['file'] or '(none)'}" + (f"  backend={cfg['backend']!r}" if cfg["backend"] else "")
          + (f"  backends={cfg['backends']}" if cfg["backends"] else ""))
    for key, value in cfg["environment"].items():
        print(f"  {key}={value}")
    cal = info["calibration"]
    state = "on" if cal["enabled"] else "off: the static rule decides"
    print(f"\nauto's calibration: {state} ({cal['source']})\n  file: {cal['file']}")
    _print_decisions(cal["decisions"], "  ")


def _print_decisions(decisions: dict, indent: str = "") -> None:
    """The calibration table: per bucket, the winner and every candidate's best time."""
    if not decisions:
        print(indent + "(no shapes calibrated yet: `seqfast tune` fills a grid, `auto` adds shapes as they run)")
        return
    width = max(len(label) for label in decisions) + 2
    print(indent + f"{'bucket':<{width}}{'winner':<9}time of one run per backend (timed at T, B, I, H, P)")
    for label in sorted(decisions):
        entry = decisions[label]
        times = "  ".join(f"{name} {seconds * 1e3:.3g} ms" for name, seconds in
                          sorted(entry["seconds"].items(), key=lambda item: item[1]))
        shape = entry.get("shape")
        print(indent + f"{label:<{width}}{entry['backend']:<9}{times}" + (f"  (at {shape})" if shape else ""))


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn_tanh", "rnn_relu"], metavar="CELL")
    parser.add_argument("--steps", nargs="+", type=int, default=[64], metavar="T")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16, 64], metavar="B")
    parser.add_argument("--hidden", nargs="+", type=int, default=[32, 64, 128, 256, 512], metavar="H")
    parser.add_argument("--input", nargs="+", type=int, default=None, metavar="I",
                        help="input sizes (default: each hidden size)")
    parser.add_argument("--mode", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--force", action="store_true", help="time again buckets that are already stored")


def tune(args: argparse.Namespace) -> int:
    """Calibrate every bucket of the grid (compiling kernels as needed), then print the table."""
    dtype, device = getattr(torch, args.dtype), torch.device(args.device).type
    queries: dict[str, Query] = {}
    for cell in args.cells:
        spec = registry.get_cell(cell)
        for mode in args.mode:
            for steps in args.steps:
                for batch in args.batch:
                    for hidden in args.hidden:
                        for size in args.input or [hidden]:
                            query = Query(spec, device, dtype, hidden, size, batch, steps,
                                          requires_grad=mode == "train")
                            bucket = calibration.bucket_of(query)
                            if bucket is None:
                                raise SystemExit(f"seqfast tune: sizes must be at least 1, got {query.describe()}")
                            queries.setdefault(bucket.label, query)
    skipped: list[str] = []
    results: dict[str, dict] = {}

    def step(label: str, query: Query) -> None:
        backends = calibration.candidates(query)
        if len(backends) < 2:
            skipped.append(f"{label} ({', '.join(b.name for b in backends) or 'no backend'} only)")
        else:
            results[label] = calibration.calibrate(query, backends, force=args.force)

    try:
        from rich.progress import Progress
    except ImportError:  # rich comes with the bench extra
        for i, (label, query) in enumerate(queries.items(), 1):
            print(f"[{i}/{len(queries)}] {label}", file=sys.stderr)
            step(label, query)
    else:
        with Progress(transient=False) as progress:
            task = progress.add_task("calibrating", total=len(queries))
            for label, query in queries.items():
                progress.update(task, description=label)
                step(label, query)
                progress.advance(task)
    enabled, source = calibration_setting()
    print(f"calibration file: {calibration.table_path()}" + ("" if enabled else
          f"  (auto's calibration is off, {source}: auto uses the static rule until it is on)"))
    _print_decisions(results)
    for line in skipped:
        print(f"  not calibrated, one candidate: {line}")
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="the demo to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the demos and exit")
    parser.add_argument("--backend", default="auto", help="seqfast backend for the recurrent layers (default: auto)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run on a small part of the data")
    parser.add_argument("--out", default=".", help="folder for the plot and other files (default: .)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def demo(args: argparse.Namespace) -> int:
    """`seqfast demo NAME`: train, evaluate against the baselines, print the figures, write the plot."""
    from . import demos

    if args.list or args.name is None:
        width = max(map(len, demos.DEMOS)) + 2
        for spec in demos.DEMOS.values():
            missing = spec.missing()
            print(f"{spec.name:<{width}}{spec.summary}"
                  + (f"  [needs: pip install 'seqfast[{spec.extra}]']" if missing else ""))
        return 0 if args.list else 2
    options = demos.DemoOptions(backend=args.backend, quick=args.quick, out=args.out, seed=args.seed,
                                progress=not args.no_progress, threads=args.threads)
    try:
        demos.prepare(args.name, options)
    except (demos.MissingDependencyError, ValueError) as exc:
        print(f"seqfast demo: {exc}", file=sys.stderr)
        return 2
    demos.run_demo(args.name, options)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seqfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, which backend can run which cell here, plugins, configuration")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    tune_parser = sub.add_parser("tune", help="calibrate auto: time the candidate backends for a grid of shapes")
    add_tune_arguments(tune_parser)
    demo_parser = sub.add_parser("demo", help="train a model on real data and compare it with baselines (--list)")
    add_demo_arguments(demo_parser)
    bench = sub.add_parser("bench", help="time every available backend against torch.nn")
    from . import bench as bench_module

    bench_module.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "info":
        data = collect_info()
        if args.json:
            json.dump(data, sys.stdout, indent=2, default=str)
            print()
        else:
            _print_info(data)
        return 0
    if args.command == "tune":
        return tune(args)
    if args.command == "demo":
        return demo(args)
    return bench_module.run(args)


if __name__ == "__main__":
    sys.exit(main())
