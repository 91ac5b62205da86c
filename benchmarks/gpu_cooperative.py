"""The cooperative triton kernels on a CUDA device: the checks and measurements of their first GPU run, into $OUT.

    OUT=/some/dir python benchmarks/gpu_cooperative.py                  # every part (a few minutes on an H100)
    OUT=/some/dir python benchmarks/gpu_cooperative.py --parts barrier  # one part
    python benchmarks/gpu_cooperative.py --smoke --out /tmp/x           # CPU, through TRITON_INTERPRET: the script only

tests    the cooperative and the usual triton tests with the real kernels (TRITON_INTERPRET=0): the GPU mode, the
         in-kernel barrier with 8 programs meeting each round, cooperative launches  -> coop-tests.txt
barrier  the grid barrier alone: P programs (up to the SM count) meeting R times in one launch, microseconds per
         barrier net of an R = 0 launch  -> coop-barrier.md
quick    benchmarks/gpu_compare.py --quick with the cooperative kernels off, then on  -> coop-quick-{off,on}.md/.json
Timings are medians (triton.testing.do_bench). Nothing here is a result until it has run on a GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_sf_grid_barrier = None  # the generated module's barrier (jit code calls module globals), set by _rounds_kernel


def _rounds_kernel():
    import triton
    import triton.language as tl

    import seqfast
    from seqfast.backends.triton.codegen import load_kernels

    global _sf_grid_barrier
    _sf_grid_barrier = load_kernels(seqfast.get_cell("lstm"))._sf_grid_barrier

    @triton.jit
    def rounds(BAR, ROUNDS, N: tl.constexpr):
        for _ in range(ROUNDS):
            _sf_grid_barrier(BAR, N)

    return rounds


def _tests(out: Path, smoke: bool) -> int:
    env = dict(os.environ, TRITON_INTERPRET="1" if smoke else "0", PYTHONPATH=str(ROOT))
    select = ["-k", "in_kernel"] if smoke else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           "tests/backends/test_triton_cooperative.py", *([] if smoke else ["tests/backends/test_triton.py"]), *select]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / "coop-tests.txt").write_text(proc.stdout + proc.stderr)
    print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:], flush=True)
    return proc.returncode


def _barrier(out: Path, smoke: bool) -> int:
    import torch

    device = "cpu" if smoke else "cuda"
    kernel = _rounds_kernel()
    if smoke:
        counts, rounds = [1], 3
    else:
        from triton.testing import do_bench

        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        counts, rounds = sorted({1, 2, 8, 16, 32, 64, 128, sms} & set(range(1, sms + 1))), 10_000
    lines = [f"# grid barrier alone on {torch.cuda.get_device_name() if not smoke else 'CPU (smoke, not timing)'}",
             "", f"{rounds} barriers per launch; us/barrier = (launch - empty launch) / barriers", "",
             "| programs | launch ms | empty launch ms | us/barrier |", "|---:|---:|---:|---:|"]
    for programs in counts:
        bar = torch.zeros(1, dtype=torch.int32, device=device)
        launch = {} if smoke else {"launch_cooperative_grid": True}

        def run(n, programs=programs, bar=bar, launch=launch):
            kernel[(programs,)](bar, n, N=programs, **launch)

        if smoke:
            run(rounds)
            lines.append(f"| {programs} | - | - | - |")
            continue
        full, empty = do_bench(lambda: run(rounds)), do_bench(lambda: run(0))
        lines.append(f"| {programs} | {full:.3f} | {empty:.3f} | {(full - empty) * 1000 / rounds:.3f} |")
        print(lines[-1], flush=True)
    (out / "coop-barrier.md").write_text("\n".join(lines) + "\n")
    return 0


def _quick(out: Path, smoke: bool) -> int:
    rc = 0
    for setting in ("off", "on"):
        env = dict(os.environ, SEQFAST_TRITON_COOPERATIVE="1" if setting == "on" else "0", PYTHONPATH=str(ROOT))
        cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_compare.py"), "--smoke" if smoke else "--quick",
               "--json", str(out / f"coop-quick-{setting}.json")]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        (out / f"coop-quick-{setting}.md").write_text(proc.stdout + proc.stderr)
        print(f"quick ({setting}): exit {proc.returncode}", flush=True)
        rc = rc or proc.returncode
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["tests", "barrier", "quick"],
                        default=["tests", "barrier", "quick"])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="where results go (default: $OUT)")
    parser.add_argument("--smoke", action="store_true", help="CPU through TRITON_INTERPRET=1: checks this script")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out (or $OUT) is required: the folder the results are written to")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton builds any kernel
    else:
        os.environ.pop("TRITON_INTERPRET", None)
        import torch

        if not torch.cuda.is_available():
            print("gpu_cooperative.py needs a CUDA device; nothing was run (`--smoke` checks the script on CPU)",
                  file=sys.stderr)
            return 2
    rc = 0
    for part in args.parts:
        print(f"== {part}", flush=True)
        rc = {"tests": _tests, "barrier": _barrier, "quick": _quick}[part](out, args.smoke) or rc
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
