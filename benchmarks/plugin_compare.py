"""Example plugin cells on the fused backends vs the same cell on the `torch` loop and vs the closest torch.nn cell.

    python benchmarks/plugin_compare.py [--shape 200,32,128,128] [--repeats 7] [--backends numba]
    python benchmarks/plugin_compare.py --device cuda --backends triton      # on a GPU machine

Training = forward + backward of output.sum(); inference = forward under no_grad. Medians of --repeats runs, all
in one process, interleaved so machine noise hits every contender alike. Threads: torch's defaults.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# the torch.nn cell each plugin cell is closest to, for a sense of scale (different math, similar work)
CLOSEST = {"peephole_lstm": ("LSTM", {}), "indrnn": ("RNN", {"nonlinearity": "relu"}), "mingru": ("GRU", {})}


def _time(fn, repeats: int, device: str) -> float:
    def sync() -> None:  # CUDA work is asynchronous: a sample ends when the device is done
        if device == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up (JIT, allocator)
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _runner(module, x, mode):
    if mode == "inference":
        def run():
            with torch.no_grad():
                module(x)
    else:
        def run():
            module.zero_grad(set_to_none=True)
            module(x)[0].sum().backward()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="200,32,128,128", help="T,B,I,H")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backends", default="numba")
    parser.add_argument("--torch-repeats", type=int, default=3, help="repeats for the slow torch loop")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    import seqfast  # here, not at the top: asv imports every module of benchmarks/, at commits without seqfast too

    steps, batch, in_size, hidden = (int(v) for v in args.shape.split(","))
    device = args.device
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, torch threads {torch.get_num_threads()}"
    print(f"shape T={steps} B={batch} I={in_size} H={hidden}; {where}; "
          f"medians of {args.repeats} (torch loop: {args.torch_repeats})")
    print(f"{'cell':<15}{'mode':<11}{'backend':<9}{'ms':>9}{'torch loop ms':>15}{'x loop':>8}"
          f"{'torch.nn':>18}{'ms':>9}{'x nn':>7}")
    x = torch.randn(steps, batch, in_size, device=device)
    for cell, (nn_name, nn_kwargs) in CLOSEST.items():
        if cell not in seqfast.registry.cells:
            print(f"{cell:<15}not installed (pip install -e plugins/...)")
            continue
        reference = seqfast.Recurrent(cell, in_size, hidden, backend="torch").to(device)
        closest = getattr(torch.nn, nn_name)(in_size, hidden, **nn_kwargs).to(device)
        for mode in ("training", "inference"):
            loop_ms = _time(_runner(reference, x, mode), args.torch_repeats, device) * 1e3
            nn_ms = _time(_runner(closest, x, mode), args.repeats, device) * 1e3
            for backend in args.backends.split(","):
                fused = seqfast.Recurrent(cell, in_size, hidden, backend=backend).to(device)
                fused.load_state_dict(reference.state_dict())
                why = seqfast.get_backend(backend).not_supported_reasons(
                    seqfast.Query(seqfast.get_cell(cell), device=device, hidden_size=hidden,
                                  requires_grad=mode == "training"))
                if why:
                    print(f"{cell:<15}{mode:<11}{backend:<9} cannot run: {'; '.join(why)}")
                    continue
                ms = _time(_runner(fused, x, mode), args.repeats, device) * 1e3
                print(f"{cell:<15}{mode:<11}{backend:<9}{ms:>9.2f}{loop_ms:>15.2f}{loop_ms / ms:>7.1f}x"
                      f"{nn_name + str(nn_kwargs.get('nonlinearity', '')):>18}{nn_ms:>9.2f}{nn_ms / ms:>6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
