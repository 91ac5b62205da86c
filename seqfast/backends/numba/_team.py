"""Running a scan's row ranges on torch's OpenMP threads without Python in the loop.

A scan with several row ranges (see schedule.py) runs them on torch's `GOMP_parallel`
team, and no team thread may need Python to start its kernel: a thread that did would wait for the GIL while
another started (a ctypes callback per thread cost 60-130 us per scan, benchmarks/RESULTS.md). So the generated
module's `<kernel>_launch` (njit, GIL released) writes the kernel's arguments into an int64
block (addresses and shapes, `<kernel>_block`) and calls `GOMP_parallel` with `<kernel>_entry` (`<kernel>_run`),
the kernel itself compiled as a numba cfunc: each team thread rebuilds the arrays from the block and runs the scan
over its row range. No thread touches Python. The launcher reaches the entry only through its address: numba
re-generates machine code for every function a compiled function calls directly, and the kernel is large (seconds
of cold compile each time).

Addresses (GOMP_parallel, omp_get_thread_num, omp_get_num_threads, MKL's per-thread thread count) are passed in as
integers, never baked into the compiled code, so the kernels stay cacheable across processes.

A scan whose threads split the hidden units (forward_units, backward_units) meets at `barrier` every step: a
counter every thread adds one to, read with acquire ordering until all have arrived, so each sees what the others
wrote (h in the forward, d_hg in the backward).
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# the spin-wait hint exists on x86 only; elsewhere the wait loop spins without it
_PAUSE = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


@intrinsic
def address_of(typingctx, ptr):
    """A void pointer (a cfunc's argument) as an int64."""
    if not isinstance(ptr, types.RawPointer):
        return None

    def codegen(context, builder, sig, args):
        return builder.ptrtoint(args[0], ir.IntType(64))

    return types.int64(ptr), codegen


@intrinsic
def pointer_to(typingctx, addr, like):
    """addr as a pointer to `like`'s type (for numba.carray)."""
    sig = types.CPointer(like)(types.int64, like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return sig, codegen


_I32 = ir.IntType(32)
_I8P = ir.IntType(8).as_pointer()
_BODY = ir.FunctionType(ir.VoidType(), [_I8P])  # void body(void *data): an OpenMP region's body, a kernel entry


def _call_at(builder, address, result: ir.Type, params: list[ir.Type], args: list) -> ir.Value:
    """Call the C function at an integer address with the given LLVM signature."""
    fn = builder.inttoptr(address, ir.FunctionType(result, params).as_pointer())
    return builder.call(fn, args)


@intrinsic
def call_int(typingctx, fn):
    """int fn(void), called through its address (omp_get_thread_num)."""
    def codegen(context, builder, sig, args):
        return builder.sext(_call_at(builder, args[0], _I32, [], []), ir.IntType(64))

    return types.int64(fn), codegen


@intrinsic
def call_int_int(typingctx, fn, value):
    """int fn(int), called through its address (MKL_Set_Num_Threads_Local)."""
    def codegen(context, builder, sig, args):
        result = _call_at(builder, args[0], _I32, [_I32], [builder.trunc(args[1], _I32)])
        return builder.sext(result, ir.IntType(64))

    return types.int64(fn, value), codegen


@intrinsic
def call_void(typingctx, fn, data):
    """void fn(void *data), called through its address (the kernel's entry, for one range)."""
    def codegen(context, builder, sig, args):
        _call_at(builder, args[0], ir.VoidType(), [_I8P], [builder.inttoptr(args[1], _I8P)])
        return context.get_dummy_value()

    return types.void(fn, data), codegen


@intrinsic
def gomp_parallel(typingctx, gomp, body, data, threads):
    """GOMP_parallel(body, data, threads, 0) through its address: body(data) on each thread of a new team."""
    def codegen(context, builder, sig, args):
        _call_at(builder, args[0], ir.VoidType(), [_BODY.as_pointer(), _I8P, _I32, _I32],
                 [builder.inttoptr(args[1], _BODY.as_pointer()), builder.inttoptr(args[2], _I8P),
                  builder.trunc(args[3], _I32), ir.Constant(_I32, 0)])
        return context.get_dummy_value()

    return types.void(gomp, body, data, threads), codegen


_I64P = ir.IntType(64).as_pointer()


@intrinsic
def fetch_add(typingctx, addr, value):
    """Atomically add value to the int64 at addr (sequentially consistent: earlier writes are visible to whoever
    reads the sum); returns the old value."""
    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", builder.inttoptr(args[0], _I64P), args[1], "seq_cst")

    return types.int64(types.int64, types.int64), codegen


@intrinsic
def load_acquire(typingctx, addr):
    """The int64 at addr, read atomically with acquire ordering (later reads see what the writer wrote before)."""
    def codegen(context, builder, sig, args):
        return builder.load_atomic(builder.inttoptr(args[0], _I64P), "acquire", 8)

    return types.int64(types.int64), codegen


@intrinsic
def store_release(typingctx, addr, value):
    """Write value to the int64 at addr atomically with release ordering (whoever reads it with acquire ordering
    sees what this thread wrote before)."""
    def codegen(context, builder, sig, args):
        builder.store_atomic(args[1], builder.inttoptr(args[0], _I64P), "release", 8)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@intrinsic
def keep_alive(typingctx, array):
    """Nothing at run time, but a use of `array`: numba frees an array after its last use, and an array the team's
    threads reach only through an address in the argument block must live until the region ends."""
    def codegen(context, builder, sig, args):
        return context.get_dummy_value()

    return types.void(array), codegen


@intrinsic
def spin_pause(typingctx):
    """The CPU's spin-wait hint (x86 `pause`), which lets the core's other work run while a thread waits."""
    def codegen(context, builder, sig, args):
        if _PAUSE:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@njit(inline="always")
def barrier(counter, parts, phase):
    """Wait for `parts` threads at their `phase`-th meeting (1, 2, ...) on the int64 at address `counter` (zero at
    the start): each adds one, then waits until every thread has added `phase`."""
    if parts > 1:
        fetch_add(counter, 1)
        target = parts * phase
        while load_acquire(counter) < target:
            spin_pause()


__all__ = ["address_of", "pointer_to", "call_int", "call_int_int", "call_void", "gomp_parallel", "fetch_add",
           "load_acquire", "store_release", "keep_alive", "spin_pause", "barrier"]
