"""Plans made in a test may follow from settings it patched (threads, MIN_WORK_PER_THREAD, the BLAS kernel): each
test starts and ends with none."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _fresh_plans():
    from seqfast.backends.numba import schedule

    schedule.clear_plans()
    yield
    schedule.clear_plans()
