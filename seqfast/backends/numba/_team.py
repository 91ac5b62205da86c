"""Running a scan's row ranges on torch's OpenMP threads without Python in the loop.

A scan with several row ranges (see seqfast/backends/numba/__init__.py) used to enter torch's `GOMP_parallel`
through a ctypes callback, so every team thread ran Python to start its kernel. That needs the GIL: the second
thread went to sleep on it while the first started, and waking it cost 60-130 us per scan on this 2-vCPU VM.
Now the generated module's `<kernel>_launch` (njit, GIL released) writes the kernel's arguments into an int64
block (addresses and shapes) and calls `GOMP_parallel` with `<kernel>_entry`, the kernel itself compiled as a
numba cfunc: each team thread rebuilds the arrays from the block and runs the scan over its row range. No thread
touches Python. The launcher reaches the entry only through its address: numba re-generates machine code for
every function a compiled function calls directly, and the kernel is large (seconds of cold compile each time).

Addresses (GOMP_parallel, omp_get_thread_num, MKL's per-thread thread count) are passed in as integers, never
baked into the compiled code, so the kernels stay cacheable across processes.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


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


@intrinsic
def call_int(typingctx, fn):
    """int fn(void), called through its address (omp_get_thread_num)."""
    sig = types.int64(fn)

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        result = builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [])
        return builder.sext(result, ir.IntType(64))

    return sig, codegen


@intrinsic
def call_int_int(typingctx, fn, value):
    """int fn(int), called through its address (MKL_Set_Num_Threads_Local)."""
    sig = types.int64(fn, value)

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32)])
        result = builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [builder.trunc(args[1], ir.IntType(32))])
        return builder.sext(result, ir.IntType(64))

    return sig, codegen


@intrinsic
def call_void(typingctx, fn, data):
    """void fn(void *data), called through its address (the kernel's entry, for one range)."""
    sig = types.void(fn, data)

    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p])
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [builder.inttoptr(args[1], i8p)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def gomp_parallel(typingctx, gomp, body, data, threads):
    """GOMP_parallel(body, data, threads, 0) through its address: body(data) on each thread of a new team."""
    sig = types.void(gomp, body, data, threads)

    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        bodyty = ir.FunctionType(ir.VoidType(), [i8p])
        fnty = ir.FunctionType(ir.VoidType(), [bodyty.as_pointer(), i8p, ir.IntType(32), ir.IntType(32)])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        builder.call(fn, [builder.inttoptr(args[1], bodyty.as_pointer()), builder.inttoptr(args[2], i8p),
                          builder.trunc(args[3], ir.IntType(32)), ir.Constant(ir.IntType(32), 0)])
        return context.get_dummy_value()

    return sig, codegen


__all__ = ["address_of", "pointer_to", "call_int", "call_int_int", "call_void", "gomp_parallel"]
