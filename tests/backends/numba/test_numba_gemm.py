"""The torch-side GEMMs around a numba scan: input projection, its gradients, the weight-gradient split."""

from __future__ import annotations

import pytest
import torch

import seqfast

numba = pytest.importorskip("numba")


from seqfast.backends.fused import FusedBackend  # noqa: E402
from seqfast.backends.numba import _blas, codegen, gemm, schedule  # noqa: E402


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "mm"])
def test_input_projection_matches_mm(monkeypatch, onednn: bool) -> None:
    """The projection of a large layer (oneDNN's linear where torch has it, else a pooled mm) is x W_ih^T."""
    backend = seqfast.registry.get_backend("numba")
    linear = gemm.onednn_linear()
    if onednn and linear is None:
        pytest.skip("this torch has no oneDNN linear")
    calls = []
    spy = (lambda *args: calls.append(1) or linear(*args)) if onednn else None
    monkeypatch.setattr(gemm, "onednn_linear", lambda: spy)
    x, weight = torch.randn(2048, 24), torch.randn(520, 24)  # over a million outputs
    torch.testing.assert_close(backend.project(x, weight), x.double().mm(weight.double().t()).float(),
                               rtol=1e-5, atol=1e-5)
    assert len(calls) == (1 if onednn else 0)  # the path named is the one taken



def test_weight_gradient_on_the_team_matches_mm(monkeypatch) -> None:
    """a^T @ x split by rows of the result over the thread team (MKL's own kernel, one weight_grad module per
    dtype) matches torch's mm, with row counts that are not a multiple of the split's 16, and the module's weight
    gradients (d_W_ih through project_backward, d_W_hh through the backward) match torch.nn's where it is taken."""
    if _blas.SGEMM_KERNEL == _blas.SGEMM or schedule.num_threads() < 2:
        pytest.skip("needs MKL's own kernel and two threads")
    taken = []
    real = schedule.launch_ranges
    monkeypatch.setattr(schedule, "launch_ranges",
                        lambda m, kernel, *a: (taken.append(kernel), real(m, kernel, *a))[1])
    gen = torch.Generator().manual_seed(5)
    for k, m, n in [(700, 520, 64), (96, 33, 300), (4096, 256, 40)]:
        a, x = torch.randn(k, m, generator=gen), torch.randn(k, n, generator=gen)
        got = gemm.weight_gradient(a, x)
        torch.testing.assert_close(got, a.double().t().mm(x.double()).float(), rtol=1e-4, atol=1e-4)
    assert taken == ["weight_grad"] * 3
    monkeypatch.setattr(schedule, "num_threads", lambda: 4)  # 40 rows: two ranges of 16+, never an empty one
    for k, m, n in [(9000, 40, 64), (700, 520, 64)]:
        a, x = torch.randn(k, m, generator=gen), torch.randn(k, n, generator=gen)
        got = gemm.weight_gradient(a, x)
        torch.testing.assert_close(got, a.double().t().mm(x.double()).float(), rtol=1e-4, atol=1e-4)
    assert gemm.weight_grad_ranges(40, 4)[0] == [(0, 16), (16, 40)]
    monkeypatch.undo()
    monkeypatch.setattr(schedule, "launch_ranges",
                        lambda m, kernel, *a: (taken.append(kernel), real(m, kernel, *a))[1])
    taken.clear()
    ref = torch.nn.LSTM(48, 64)
    ours = seqfast.LSTM(48, 64, backend="numba")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(16, 8, 48, generator=gen)
    for model in (ref, ours):
        out, _ = model(x)
        (out * torch.linspace(-1, 1, 64)).sum().backward()
    assert taken.count("weight_grad") == 2  # d_W_hh and d_W_ih
    # one weight_grad module per dtype, not a copy in every cell's module
    assert not hasattr(codegen.kernels(seqfast.get_cell("lstm"), "float32"), "weight_grad")
    for (name, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    small = torch.randn(10, 8), torch.randn(10, 4)  # below SMALL_TORCH_GEMM: torch's mm, on one MKL thread
    torch.testing.assert_close(gemm.weight_gradient(*small), small[0].t().mm(small[1]))
    assert taken.count("weight_grad") == 2



def test_float64_runs_on_mkls_own_avx512_kernel_where_found(monkeypatch) -> None:
    """Where direct_kernels admits MKL's AVX-512 dgemm kernel (dgemm_ takes a generic path on a non-Intel CPU),
    float64 scans, steps and weight gradients call it: the forward takes W_hh transposed (N,N), the weight gradient
    is split over the team, and a float64 LSTM's outputs and gradients, and an LSTMCell step's, are torch.nn's."""
    if _blas.DGEMM_KERNEL == _blas.DGEMM:
        pytest.skip("needs MKL's own AVX-512 dgemm kernel (a non-Intel CPU with AVX-512)")
    assert _blas.gemm_address("float64") == _blas.DGEMM_KERNEL and _blas.is_avx512_kernel(_blas.DGEMM_KERNEL)
    assert schedule.plan("float64", 16, 8, 256, 64).forward_nn
    taken = []
    real = schedule.launch_ranges
    monkeypatch.setattr(schedule, "launch_ranges",
                        lambda m, kernel, *a: (taken.append(kernel), real(m, kernel, *a))[1])
    gen = torch.Generator().manual_seed(6)
    a, x = torch.randn(700, 520, generator=gen, dtype=torch.float64), torch.randn(700, 64, generator=gen,
                                                                                   dtype=torch.float64)
    torch.testing.assert_close(gemm.weight_gradient(a, x), a.t().mm(x))
    if schedule.num_threads() >= 2:
        assert taken == ["weight_grad"]
    ref = torch.nn.LSTM(40, 64, bidirectional=True).double()
    ours = seqfast.LSTM(40, 64, bidirectional=True, backend="numba").double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(20, 9, 40, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, 21, (9,), generator=gen)
    outs = []
    for model in (ref, ours):
        xx = x.clone().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(xx, lengths, enforce_sorted=False)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(model(packed)[0], total_length=20)
        (out * torch.linspace(-1, 1, 128, dtype=torch.float64)).sum().backward()
        outs.append([out, xx.grad, *(p.grad for p in model.parameters())])
    torch.testing.assert_close(outs[1], outs[0])
    cell_ref = torch.nn.LSTMCell(40, 64).double()
    cell = seqfast.LSTMCell(40, 64, backend="numba").double()
    cell.load_state_dict(cell_ref.state_dict())
    state = (torch.randn(9, 64, generator=gen, dtype=torch.float64),) * 2
    results = []
    for model in (cell_ref, cell):
        xx = x[0].clone().requires_grad_()
        h, c = model(xx, state)
        (h.sum() + 2 * c.sum()).backward()
        results.append([h, c, xx.grad, *(p.grad for p in model.parameters())])
    torch.testing.assert_close(results[1], results[0])


def test_small_torch_gemms_run_on_one_mkl_thread(monkeypatch) -> None:
    """_mm holds MKL to one thread (on this thread only, then restores it) below SMALL_TORCH_GEMM, and its results
    are torch.mm's; project_backward gives the default FusedBackend gradients."""
    calls = []

    def set_local(n: int) -> int:
        calls.append(n)
        return 7  # the setting before

    monkeypatch.setattr(_blas, "MKL_SET_LOCAL_THREADS", set_local)
    a, b = torch.randn(100, 32), torch.randn(32, 128)  # 0.41M multiply-adds: small
    assert torch.equal(gemm.mm(a, b), torch.mm(a, b)) and calls == [1, 7]
    calls.clear()
    big = torch.randn(32, 256)  # 0.82M: left to torch's threads
    assert torch.equal(gemm.mm(a, big), torch.mm(a, big)) and calls == []
    out = torch.empty(100, 128)
    assert gemm.mm(a, b, out=out) is out and torch.equal(out, torch.mm(a, b))
    backend = seqfast.get_backend("numba")
    grad, x, w = torch.randn(50, 64), torch.randn(50, 16), torch.randn(64, 16)
    for need_x, need_w in ((True, True), (False, True), (True, False)):
        got = backend.project_backward(grad, x, w, need_x, need_w)
        want = FusedBackend.project_backward(backend, grad, x, w, need_x, need_w)
        for g, e in zip(got, want, strict=True):
            assert (g is None) == (e is None) and (g is None or torch.allclose(g, e, atol=1e-5))



def test_small_projection_runs_on_mkls_own_kernel(monkeypatch) -> None:
    """Below SMALL_TORCH_GEMM a projection runs on MKL's own sequential kernel, where the scans use one for its
    dtype, and equals x W_ih^T; a non-contiguous operand or a larger product takes torch's mm, and so does float64
    where dgemm_ is the scans' GEMM; an in-place update of the weight shows in the next projection."""
    if _blas.SGEMM_KERNEL == _blas.SGEMM:
        pytest.skip("needs MKL's own kernel (a non-Intel CPU with AVX2 or AVX-512)")
    mm_calls = []
    real_mm = gemm.mm
    monkeypatch.setattr(gemm, "mm", lambda *a, **k: mm_calls.append(1) or real_mm(*a, **k))
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(100, 32, generator=gen), torch.randn(128, 32, generator=gen)  # 0.41M: small
    want = x.double().mm(weight.double().t()).float()
    torch.testing.assert_close(gemm.input_projection(x, weight), want, rtol=1e-5, atol=1e-5)
    assert mm_calls == []
    with torch.no_grad():
        weight.mul_(2)
    torch.testing.assert_close(gemm.input_projection(x, weight), 2 * want, rtol=1e-5, atol=1e-5)
    assert mm_calls == []
    wide = torch.randn(32, 256, generator=gen).t()  # not contiguous
    torch.testing.assert_close(gemm.input_projection(x, wide), x.mm(wide.t()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gemm.input_projection(x.double(), weight.double()), x.double().mm(weight.double().t()))
    float64_on_mm = _blas.DGEMM_KERNEL == _blas.DGEMM
    assert len(mm_calls) == 1 + float64_on_mm
    big = torch.randn(256, 32, generator=gen)  # 0.82M: torch's mm
    torch.testing.assert_close(gemm.input_projection(x, big), x.mm(big.t()), rtol=1e-5, atol=1e-5)
    assert len(mm_calls) == 2 + float64_on_mm
    assert gemm.input_projection(x[:0], weight).shape == (0, 128)
