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
float64 tanh and sigmoid: the same construction in double precision (below), within a few ulps of libm.
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


# --- float64 tanh and sigmoid ---------------------------------------------------------------------------------------
# The same construction in double precision, so the float64 kernels vectorize too (5x libm's speed per value):
# exp(d) = 2**q * e**s with q = rint(d / ln 2), s = d - q ln 2 (ln 2 in two parts: q * _L2U_64 is exact), e**s by
# its Taylor series to s**13 (|s| <= ln2 / 2: the first term left out is below 1e-17 of the result), and
# 2**(q - 1) built in the exponent bits. tanh(x) = expm1(2x) / (expm1(2x) + 2), expm1 by its Taylor series to y**18
# for |y| < 1 (no cancellation near 0: tiny and subnormal inputs are kept) and by exp(y) - 1 beyond, the sign
# copied from x; inputs clamped to [-20, 20], where tanh rounds to +-1. sigmoid(x) = 1 / (1 + exp(-x)) with x
# clamped to [-710, 40] (beyond: exp(-x) overflows to inf, sigmoid 0, or 1 + exp(-x) rounds to 1). Both stay
# within TANH_F64_MAX_ULPS / SIGMOID_F64_MAX_ULPS of libm's result (tests/backends/numba/test_numba_kernels.py);
# NaN propagates through the clamps.
TANH_F64_MAX_ULPS = 4
SIGMOID_F64_MAX_ULPS = 4
_R_LN2_64 = 1.4426950408889634
_SHIFTED_64 = 6755399441055744.0 + 1022.0  # 1.5 * 2**52 + 1022: y + this rounds y to an integer in the low bits
_L2U_64, _L2L_64 = 0.6931467056274414, 4.7493250390316726e-07  # ln 2 = _L2U_64 (21 bits) + _L2L_64
_EXP_TAYLOR = (1.6059043836821613e-10, 2.08767569878681e-09, 2.505210838544172e-08, 2.755731922398589e-07,
               2.7557319223985893e-06, 2.48015873015873e-05, 0.0001984126984126984, 0.001388888888888889,
               0.008333333333333333, 0.041666666666666664, 0.16666666666666666, 0.5)  # 1/13! .. 1/2!
_EXPM1_TAYLOR = (1.5619206968586225e-16, 2.8114572543455206e-15, 4.779477332387385e-14, 7.647163731819816e-13,
                 1.1470745597729725e-11, 1.6059043836821613e-10, 2.08767569878681e-09, 2.505210838544172e-08,
                 2.755731922398589e-07, 2.7557319223985893e-06, 2.48015873015873e-05, 0.0001984126984126984,
                 0.001388888888888889, 0.008333333333333333, 0.041666666666666664, 0.16666666666666666,
                 0.5)  # 1/18! .. 1/2!
(_X13, _X12, _X11, _X10, _X9, _X8, _X7, _X6, _X5, _X4, _X3, _X2) = _EXP_TAYLOR
(_M18, _M17, _M16, _M15, _M14, _M13, _M12, _M11, _M10, _M9, _M8, _M7, _M6, _M5, _M4, _M3, _M2) = _EXPM1_TAYLOR


@intrinsic
def _half_pow2_f64(typingctx, t):
    """2**(q - 1) for t = d / ln 2 + _SHIFTED_64 (so t's low mantissa bits hold q + 1022, q = rint(d / ln 2)) with
    q + 1022 in [0, 2047]: those bits shifted into the exponent (2047: inf)."""
    sig = types.float64(types.float64)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        bits = builder.shl(builder.bitcast(args[0], i64), ir.Constant(i64, 52))
        return builder.bitcast(bits, ir.DoubleType())

    return sig, codegen


@njit(inline="always")
def _exp_f64(d):
    """exp(d) for d in [-40, 710] (inf from 709.79 on), NaN kept."""
    t = d * _R_LN2_64 + _SHIFTED_64
    q = t - _SHIFTED_64
    s = q * -_L2U_64 + d
    s = q * -_L2L_64 + s
    u = s * _X13 + _X12
    u = u * s + _X11
    u = u * s + _X10
    u = u * s + _X9
    u = u * s + _X8
    u = u * s + _X7
    u = u * s + _X6
    u = u * s + _X5
    u = u * s + _X4
    u = u * s + _X3
    u = u * s + _X2
    u = 1.0 + ((s * s) * u + s)
    return (u + u) * _half_pow2_f64(t)


@njit(inline="always")
def tanh_f64(a):
    x = 20.0 if a > 20.0 else a
    x = -20.0 if x < -20.0 else x
    y = x + x
    p = y * _M18 + _M17
    p = p * y + _M16
    p = p * y + _M15
    p = p * y + _M14
    p = p * y + _M13
    p = p * y + _M12
    p = p * y + _M11
    p = p * y + _M10
    p = p * y + _M9
    p = p * y + _M8
    p = p * y + _M7
    p = p * y + _M6
    p = p * y + _M5
    p = p * y + _M4
    p = p * y + _M3
    p = p * y + _M2
    small = (y * y) * p + y
    e = small if abs(y) < 1.0 else _exp_f64(y) - 1.0
    return math.copysign(e / (e + 2.0), a)  # odd exactly, and -0.0 stays -0.0


@njit(inline="always")
def sigmoid_f64(a):
    c = -710.0 if a < -710.0 else a
    c = 40.0 if c > 40.0 else c
    return 1.0 / (1.0 + _exp_f64(-c))


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
