"""The `seqfast` command: `seqfast info` (what can run here, and why not) and `seqfast bench`."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata

import torch

from . import __version__
from .config import config_file_settings, context_choices, resolve_choice
from .functional import select_backend
from .registry import Query, registry


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect_info() -> dict:
    """Everything `seqfast info` shows, as plain data."""
    versions = {"seqfast": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("numpy", "numba", "llvmlite", "scipy", "triton"):
        versions[dist] = _version(dist)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = {}
    for name, backend in registry.backends.items():
        entry = {"description": backend.description, "available": backend.available(),
                 "unavailable_reason": backend.unavailable_reason()}
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
    return {
        "versions": versions,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "backends": backends,
        "cells": table,
        "plugins": {
            "loaded": list(registry.plugins_loaded),
            "failed": [vars(f) for f in registry.plugin_failures],
            "disabled": os.environ.get("SEQFAST_DISABLE_PLUGINS", "").strip() not in ("", "0"),
        },
        "config": {"file": str(path) if path else None, "backend": default, "backends": per_cell,
                   "use_backend": dict(context_choices()), "environment": env},
    }


def _print_info(info: dict) -> None:
    print("seqfast " + info["versions"]["seqfast"])
    print("versions: " + ", ".join(f"{k} {v or '-'}" for k, v in info["versions"].items() if k != "seqfast"))
    print(f"device: {info['device']}   torch threads: {info['torch_threads']}")
    print("\nbackends:")
    for name, b in info["backends"].items():
        state = "available" if b["available"] else f"unavailable: {b['unavailable_reason']}"
        print(f"  {name:<10} {state}  ({b['description']})")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seqfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, which backend can run which cell here, plugins, configuration")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
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
    return bench_module.run(args)


if __name__ == "__main__":
    sys.exit(main())
