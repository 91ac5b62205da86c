"""The math namespace `m` that pointwise code is compiled against, as numba scalar functions.

float32 tanh and sigmoid are branch-free selects and polynomials, so LLVM vectorizes them (AVX-512) where np.tanh /
np.exp would be ~10 ns scalar libm calls (llvmlite from PyPI has no SVML). They return what torch's CPU float32
kernels return at the extremes, so saturated gates pass exactly zero gradient, as in torch:
- tanh is Eigen's rational approximation (odd degree-13 numerator over even degree-6 denominator, coefficients
  scaled so both start at exactly x and 1, which keeps tiny inputs, subnormals included, unchanged) on inputs
  clamped to [-7.905, 7.905], and exactly +-1 from |x| >= TANH_F32_SATURATION (9.0108404), the smallest float32
  whose tanh rounds to 1, where torch's tanh becomes +-1. Elsewhere within TANH_F32_MAX_ULPS of torch.
- sigmoid is 1 / (1 + exp(-x)), torch's own formula, with exp as SLEEF's expf (Cody-Waite reduction by ln 2, a
  degree-7 polynomial, the power of two built from exponent bits), the routine torch's vectorized sigmoid calls:
  exactly 1 from x >= 16.635532 (1 + exp(-x) rounds to 1), exactly 0 from x <= -88.722839 (exp(-x) overflows), and
  the tiny values in between, subnormals included. Over every float32 input checked it equals torch bit for bit.
Worst-case absolute error against float64 libm (checked over the whole range by
tests/backends/numba/test_numba_kernels.py): tanh <= TANH_F32_MAX_ABS_ERROR, sigmoid <= SIGMOID_F32_MAX_ABS_ERROR.
+-inf give +-1 (tanh) and 1 / 0 (sigmoid); NaN propagates.
float64: libm (exact to an ulp); the f64 kernels serve gradcheck and double-precision users, not speed.
Every function propagates NaN like torch: relu(NaN) = NaN, maximum/minimum(NaN, x) = NaN.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# measured maximum of |approx - exact| over every float32 input (see test_fast_math_whole_float32_range)
TANH_F32_MAX_ABS_ERROR = 4.2e-7
SIGMOID_F32_MAX_ABS_ERROR = 1.2e-7
# the largest distance from torch's float32 result where it is not the same, in units in the last place
TANH_F32_MAX_ULPS = 5
SIGMOID_F32_MAX_ULPS = 1

_f = np.float32
_ONE = _f(1.0)
_HALF = _f(0.5)
_ZERO32 = _f(0.0)

# --- tanh -----------------------------------------------------------------------------------------------------------
TANH_F32_SATURATION = _f(9.01084041595459)
_CLAMP = _f(7.90531110763549805)
_B0 = 4.89352518554385e-03  # Eigen's coefficients, divided by its denominator's constant term
_A3, _A5, _A7 = _f(6.37261928875436e-04 / _B0), _f(1.48572235717979e-05 / _B0), _f(5.12229709037114e-08 / _B0)
_A9, _A11, _A13 = _f(-8.60467152213735e-11 / _B0), _f(2.00018790482477e-13 / _B0), _f(-2.76076847742355e-16 / _B0)
_B2, _B4, _B6 = _f(2.26843463243900e-03 / _B0), _f(1.18534705686654e-04 / _B0), _f(1.19825839466702e-06 / _B0)


@njit(inline="always")
def tanh_f32(a):
    # `c if a > c else a`: a NaN fails the comparison and falls through unchanged
    x = _CLAMP if a > _CLAMP else a
    x = -_CLAMP if x < -_CLAMP else x
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _ONE
    p = x * p
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _ONE
    r = p / q
    return math.copysign(_ONE, a) if abs(a) >= TANH_F32_SATURATION else r


# --- sigmoid --------------------------------------------------------------------------------------------------------
# exp(d) = 2**q * e**s, q = rint(d / ln 2), s = d - q ln 2 (ln 2 in two parts, so s is exact); SLEEF's xexpf
_R_LN2 = 1.442695040888963407359924681001892137426645954152985934135449406931
_SHIFTED = 12582912.0 + 126.0  # 1.5 * 2**23 + 126: y + this rounds y to an integer held in the low mantissa bits
_L2U, _L2L = _f(0.693145751953125), _f(1.428606765330187045e-06)
_E5, _E4 = _f(0.000198527617612853646278381), _f(0.00139304355252534151077271)
_E3, _E2, _E1 = _f(0.00833336077630519866943359), _f(0.0416664853692054748535156), _f(0.166666671633720397949219)
_SHIFTED32 = _f(_SHIFTED)
_SIG_LO, _SIG_HI = _f(-88.8), _f(17.0)  # beyond: exp(-x) overflows (sigmoid 0) / 1 + exp(-x) rounds to 1


@intrinsic
def _round_shifted(typingctx, d):
    """rint(d / ln 2) + 126 + 1.5 * 2**23 as float32: a multiply and an add that are never fused (as in SLEEF)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        y = builder.fmul(args[0], ir.Constant(f32, float(_f(_R_LN2))))
        return builder.fadd(y, ir.Constant(f32, _SHIFTED))

    return sig, codegen


@intrinsic
def _half_pow2(typingctx, t):
    """2**(q - 1) for t = _round_shifted(d) with q + 126 in [1, 254]: q + 126 shifted into the exponent bits."""
    sig = types.float32(types.float32)

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.bitcast(args[0], i32), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())

    return sig, codegen


@njit(inline="always")
def sigmoid_f32(a):
    # the clamps let a NaN through (it stays NaN to the end); rint(d / ln 2) is then in [-25, 128], and
    # (2u) * 2**(q - 1) overflows to inf exactly where exp(d) does
    c = _SIG_LO if a < _SIG_LO else a
    c = _SIG_HI if c > _SIG_HI else c
    d = -c
    t = _round_shifted(d)
    q = t - _SHIFTED32
    s = q * -_L2U + d
    s = q * -_L2L + s
    u = s * _E5 + _E4
    u = u * s + _E3
    u = u * s + _E2
    u = u * s + _E1
    u = u * s + _HALF
    u = _ONE + ((s * s) * u + s)
    return _ONE / ((u + u) * _half_pow2(t) + _ONE)


@njit(inline="always")
def tanh_f64(a):
    return math.tanh(a)


@njit(inline="always")
def sigmoid_f64(a):
    return 1.0 / (1.0 + math.exp(-a))


@njit(inline="always")
def exp(a):
    return np.exp(a)


@njit(inline="always")
def log(a):
    return np.log(a)


@njit(inline="always")
def sqrt(a):
    return np.sqrt(a)


@njit(inline="always")
def fabs(a):
    return abs(a)


# `0 if a < 0 else a` keeps NaN (torch.relu(nan) is nan); the zero has the input's dtype
@njit(inline="always")
def relu_f32(a):
    return _ZERO32 if a < 0 else a


@njit(inline="always")
def relu_f64(a):
    return 0.0 if a < 0 else a


@njit(inline="always")
def maximum(a, b):
    return a if (a > b or a != a) else b


@njit(inline="always")
def minimum(a, b):
    return a if (a < b or a != a) else b


@njit(inline="always")
def where(cond, a, b):
    return a if cond else b


# --- the rest of the namespace: generic over float32 / float64 (the argument's type is kept) -------------------
@njit(inline="always")
def log1p(a):
    return np.log1p(a)


@njit(inline="always")
def expm1(a):
    return np.expm1(a)


@njit(inline="always")
def sin(a):
    return np.sin(a)


@njit(inline="always")
def cos(a):
    return np.cos(a)


# torch.nn.functional.softplus with its defaults (beta=1, threshold=20): linear above the threshold; NaN falls
# through the comparison into log1p(exp(NaN)) = NaN
@njit(inline="always")
def softplus(a):
    return a if a > 20 else np.log1p(np.exp(a))


@njit(inline="always")
def power(a, b):
    return a ** b


# as torch.clamp: NaN propagates (through maximum / minimum), and low > high gives high
@njit(inline="always")
def clamp(a, low, high):
    return minimum(maximum(a, low), high)
