"""The conformance kit run over every registered cell (built-in and plugin) and backend, and proof that it fails
on a wrong cell or a wrong backend."""

from __future__ import annotations

import pytest
import torch

import seqfast
import seqfast.testing
from seqfast.backends.reference import TorchBackend
from seqfast.registry import registry

PLUGIN_CELLS = ("peephole_lstm", "indrnn", "mingru")


def test_example_plugins_are_installed_and_loaded():
    """`make test` installs plugins/*; their cells must have arrived through the entry points."""
    assert set(PLUGIN_CELLS) <= set(registry.cells), registry.plugin_failures
    assert not registry.plugin_failures


CASES = [case for cell in sorted(registry.cells) for case in seqfast.testing.cases(cell, quick=True)]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conformance(case):
    case.run()


@pytest.fixture
def cell_with_wrong_backward():
    good = seqfast.get_cell("gru")

    def wrong_backward(m, xg, hg, state, params, d_new):
        d_xg, d_hg, d_state, d_params = good.pointwise.backward(m, xg, hg, state, params, d_new)
        return d_xg, d_hg, (d_state[0] * 0.5,), d_params  # drops half of the direct path

    spec = seqfast.CellSpec("gru_wrong", 3, ("h",), good.reference_step,
                            pointwise=seqfast.Pointwise(good.pointwise.forward, wrong_backward))
    registry.cells[spec.name] = spec  # past registration, which rejects it: the kit must catch it on its own
    yield spec
    del registry.cells[spec.name]


def test_kit_catches_a_wrong_pointwise_backward(cell_with_wrong_backward):
    case = next(c for c in seqfast.testing.cases("gru_wrong", ["torch"]) if c.check == "pointwise")
    with pytest.raises(AssertionError, match=r"Pointwise.backward d_state\[h\] vs autograd"):
        case.run()


class _OffByOne(TorchBackend):
    """A broken backend: the last step's output is scaled, as an indexing bug would do."""

    name = "off_by_one"

    def scan(self, cell, x_proj, state0, weights, lengths, reverse):
        out, final = super().scan(cell, x_proj, state0, weights, lengths, reverse)
        return torch.cat([out[:-1], out[-1:] * 1.01]), final


def test_kit_catches_a_wrong_backend():
    seqfast.register_backend(_OffByOne())
    try:
        with pytest.raises(AssertionError, match="conformance failure"):
            seqfast.testing.check_cell("lstm", ["off_by_one"], quick=True)
    finally:
        del registry.backends["off_by_one"]


def test_registration_rejects_pointwise_that_disagrees_with_reference():
    good = seqfast.get_cell("lstm")

    def forward(m, xg, hg, state, params):  # gates in the wrong order
        h, c = good.pointwise.forward(m, (xg[1], xg[0], xg[2], xg[3]), (hg[1], hg[0], hg[2], hg[3]), state, params)
        return h, c

    spec = seqfast.CellSpec("lstm_swapped", 4, ("h", "c"), good.reference_step, pointwise=seqfast.Pointwise(forward))
    with pytest.raises(ValueError, match="Pointwise.forward's new 'h' disagrees with reference_step"):
        seqfast.register_cell(spec)


def test_check_cell_reports_every_case():
    report = seqfast.testing.check_cell("indrnn", ["torch"], quick=True)
    assert report["indrnn-any-pointwise"] == "passed"
    assert any(k.startswith("indrnn-torch-gradcheck") and v == "passed" for k, v in report.items())
