"""The math namespace `m` that pointwise code is compiled against, as numba scalar functions.

float32: tanh is Eigen's rational approximation (odd degree-13 numerator over even degree-6 denominator, input
clamped to [-7.905, 7.905], identity below |x| < 4e-4); sigmoid(x) = 0.5 + 0.5 * tanh(x / 2). Both are branch-free
selects and polynomials, so LLVM vectorizes them (AVX-512) where np.tanh / np.exp would be ~10 ns scalar libm calls
(llvmlite from PyPI has no SVML). Worst-case absolute error over every float32 input (checked by
tests/backends/test_numba.py over the whole range): tanh <= TANH_F32_MAX_ABS_ERROR (4.1e-7, ~3.5 ulp of 1),
sigmoid <= SIGMOID_F32_MAX_ABS_ERROR (2.3e-7).
Large inputs saturate without NaN (|tanh| <= 1, 0 <= sigmoid <= 1, +-inf included); NaN propagates (the clamps
are written so that a NaN falls through them).
float64: libm (exact to an ulp); the f64 kernels serve gradcheck and double-precision users, not speed.
Every function propagates NaN like torch: relu(NaN) = NaN, maximum/minimum(NaN, x) = NaN.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# measured maximum of |approx - exact| over every float32 input (see test_fast_tanh_whole_float32_range)
TANH_F32_MAX_ABS_ERROR = 4.2e-7  # 4.10e-7 at x = 5.8279
SIGMOID_F32_MAX_ABS_ERROR = 2.3e-7  # 2.27e-7 at x = 11.549

_f = np.float32
_CLAMP = _f(7.90531110763549805)
_TINY = _f(0.0004)
_A1, _A3, _A5 = _f(4.89352455891786e-03), _f(6.37261928875436e-04), _f(1.48572235717979e-05)
_A7, _A9 = _f(5.12229709037114e-08), _f(-8.60467152213735e-11)
_A11, _A13 = _f(2.00018790482477e-13), _f(-2.76076847742355e-16)
_B0, _B2 = _f(4.89352518554385e-03), _f(2.26843463243900e-03)
_B4, _B6 = _f(1.18534705686654e-04), _f(1.19825839466702e-06)
_HALF = _f(0.5)
_ZERO32 = _f(0.0)


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
    p = x2 * p + _A1
    p = x * p
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    r = p / q
    return a if abs(a) < _TINY else r


@njit(inline="always")
def sigmoid_f32(a):
    return _HALF + _HALF * tanh_f32(_HALF * a)


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
