"""Scheduled sampling (Bengio et al., 2015): the teacher-forcing probability as a function of the training step.

Each schedule is a small callable: `schedule(step) -> float` in [0, 1], to pass as `teacher_forcing=`.
    LinearSchedule(k, c, minimum):   max(minimum, k - c * step)
    ExponentialSchedule(k):          k ** step                     (0 < k < 1)
    InverseSigmoidSchedule(k):       k / (k + exp(step / k))       (k >= 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    return step


@dataclass(frozen=True)
class LinearSchedule:
    k: float = 1.0
    c: float = 1e-3
    minimum: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.minimum <= self.k <= 1.0 or self.c < 0:
            raise ValueError(f"LinearSchedule: expected 0 <= minimum <= k <= 1 and c >= 0, got k={self.k}, "
                             f"c={self.c}, minimum={self.minimum}")

    def __call__(self, step: int) -> float:
        return max(self.minimum, self.k - self.c * _check_step(step))


@dataclass(frozen=True)
class ExponentialSchedule:
    k: float = 0.999

    def __post_init__(self) -> None:
        if not 0.0 < self.k < 1.0:
            raise ValueError(f"ExponentialSchedule: expected 0 < k < 1, got k={self.k}")

    def __call__(self, step: int) -> float:
        return self.k ** _check_step(step)


@dataclass(frozen=True)
class InverseSigmoidSchedule:
    k: float = 100.0

    def __post_init__(self) -> None:
        if not self.k >= 1.0:
            raise ValueError(f"InverseSigmoidSchedule: expected k >= 1, got k={self.k}")

    def __call__(self, step: int) -> float:
        exponent = _check_step(step) / self.k
        return 0.0 if exponent > 700 else self.k / (self.k + math.exp(exponent))  # exp overflows past ~709
