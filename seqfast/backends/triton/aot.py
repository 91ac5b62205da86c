"""Compile the generated kernels for a CUDA target without a GPU (Triton -> TTIR -> TTGIR -> LLVM -> PTX -> cubin).

The interpreter runs kernels as Python, so it cannot catch what only the compiler rejects (loop-carried types,
tuple handling, dot shapes, LLVM and ptxas failures) nor show register use. This compiles the exact kernels a
shape would launch, for e.g. sm_90, with the ptxas bundled in Triton, and reads registers and spills (local
memory) from the cubin with the bundled cuobjdump, so CI without a GPU still proves they build.
Run `python -m seqfast.backends.triton.aot lstm:64:float32 gru:300:bfloat16:16 ...` (cell:hidden:dtype[:tile];
prints JSON); `--cooperative BATCH` compiles the cooperative kernels (coop_kernels.py) a batch of BATCH rows would
launch instead, in their GPU mode (the grid barrier in the kernel). TRITON_INTERPRET must be unset: Triton builds
its own helpers for one mode when it is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

from ...registry import CellSpec
from .backend import _MARGIN, _RECURRENCE_CODE, TritonBackend, _shared_memory_budget, interpreting
from .codegen import load_kernels
from .cooperative import device_sm_count, plan_cooperative

__all__ = ["compile_for_target"]

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+).*?LOCAL:(\d+)", text)
    return {"registers": int(found.group(1)), "spill_bytes": int(found.group(2))} if found else {}


def compile_for_target(backend: TritonBackend, cell: CellSpec, hidden: int, dtype: torch.dtype = torch.float32,
                       *, arch: int = 90, lengths: bool = True, reverse: bool = False, bias: bool = True,
                       cooperative_batch: int | None = None) -> dict[str, dict[str, int]]:
    """Compile the kernels `backend` would launch for `cell` at `hidden`, `dtype` for CUDA sm_`arch`.

    Returns {kernel name: {"ptx_lines", "cubin_bytes", "shared_bytes", "registers", "spill_bytes"}}; raises if
    any stage fails. A launch needs shared_bytes within the device's shared memory per block (227 KiB on sm_90).
    cooperative_batch: compile coop_forward / coop_backward for that batch size instead (ValueError where the
    co-residency guard declines the shape); their grid needs one program per SM resident, so registers x threads
    must fit one SM's register file as well.
    """
    if interpreting():
        # triton.language's own jit helpers were built for the interpreter when triton was imported
        raise RuntimeError("compile_for_target needs a process without TRITON_INTERPRET "
                           "(run `python -m seqfast.backends.triton.aot`)")
    import triton
    from triton.backends.compiler import GPUTarget

    plan = backend.plan(cell, hidden, dtype)
    kernels = load_kernels(cell, interpret=False)
    consts = dict(
        HAS_LEN=lengths, REVERSE=reverse, RECURRENCE=_RECURRENCE_CODE[cell.recurrence], HAS_BIAS=bias, SAVE=True,
        ON_CHIP=plan.on_chip, BLOCK_B=plan.block_b, BLOCK_H=plan.block_h, BLOCK_K=plan.block_k, DOT_F32=False,
        PRECISION=backend.dot_precision(dtype), ROUND_HG=dtype != torch.float32,
    )
    names, options = ("scan_forward", "scan_backward"), {"num_warps": plan.num_warps, "num_stages": plan.num_stages}
    if cooperative_batch is not None:
        coop, why = plan_cooperative(cell, cooperative_batch, hidden, dtype, sm_count=device_sm_count(),
                                     budget=_shared_memory_budget() - _MARGIN, block_b=backend.block_b)
        if coop is None:
            raise ValueError(f"cooperative kernels decline {cell.name} at hidden {hidden}, batch "
                             f"{cooperative_batch}: {why}")
        constants = coop.constants()
        options = {k: constants.pop(k) for k in ("num_warps", "num_stages")}
        consts.update(constants, GRID_BARRIER=True, PHASE=0)  # the GPU mode: every step in one launch
        names = ("coop_forward", "coop_backward")
    results = {}
    for name in names:
        fn = getattr(kernels, name, None)
        if fn is None:
            continue
        signature, constexprs = {}, {}
        for arg in fn.arg_names:
            if arg in consts:
                signature[arg], constexprs[arg] = "constexpr", consts[arg]
            elif arg in ("T", "B", "H", "STEP0", "STEPS"):
                signature[arg] = "i32"
            elif arg == "LEN":
                signature[arg] = "*i64"
            elif arg == "BAR":
                signature[arg] = "*i32"
            elif arg == "WS" or arg.startswith("DP_"):
                signature[arg] = "*fp32"
            else:
                signature[arg] = "*" + _TYPES[dtype]
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        cubin = compiled.asm.get("cubin", b"")
        info = {"ptx_lines": compiled.asm["ptx"].count("\n"), "cubin_bytes": len(cubin),
                "shared_bytes": int(compiled.metadata.shared),  # Triton's dynamic shared memory
                "threads": options["num_warps"] * 32}
        if name.startswith("coop_"):  # the grid barrier: a release add, then acquire loads
            ptx = compiled.asm["ptx"]
            info["grid_barrier"] = bool(re.search(r"\.release\.", ptx) and re.search(r"\.acquire\.", ptx))
        info.update(_resource_usage(cubin) if cubin else {})
        results[name] = info
    return results


def main(argv: list[str] | None = None) -> int:
    import seqfast

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="cell:hidden:dtype[:tile], e.g. lstm:64:float32 gru:33:bfloat16:16")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--cooperative", type=int, metavar="BATCH", help="the cooperative kernels for this batch")
    args = parser.parse_args(argv)
    out = []
    for config in args.configs:
        cell, hidden, dtype, *tile = config.split(":")
        backend = TritonBackend()
        backend.tile_hidden = int(tile[0]) if tile else None
        spec, dt = seqfast.get_cell(cell), getattr(torch, dtype)
        kernels = compile_for_target(backend, spec, int(hidden), dt, arch=args.arch,
                                     cooperative_batch=args.cooperative)
        plan = backend.plan(spec, int(hidden), dt)
        entry = {"config": config, "on_chip": plan.on_chip, "kernels": kernels}
        if args.cooperative is not None:
            backend.cooperative = True
            entry["path"] = backend.cooperative_plan(spec, args.cooperative, int(hidden), dt)[0].describe(
                device_sm_count())
        out.append(entry)
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    raise SystemExit(main())
