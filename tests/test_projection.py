"""Property tests of the doubly-stochastic projections: the certified bound holds on any logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from crma_lightning.projection import (
    MAX_BIRKHOFF_N,
    _LogSinkhorn,
    birkhoff,
    certify,
    diagnostics,
    permutation_matrices,
    project,
    project_with_diagnostics,
    sinkhorn,
)

TOL = 1e-6


def _assert_bounded(m: torch.Tensor) -> None:
    assert torch.isfinite(m).all()
    assert (m >= 0).all()
    assert (m.sum(-1) <= 1 + TOL).all(), m.sum(-1).max()
    assert (m.sum(-2) <= 1 + TOL).all(), m.sum(-2).max()
    assert (torch.linalg.matrix_norm(m.double(), ord=2) <= 1 + TOL).all()


def _assert_finite_grad(logits: torch.Tensor, fn) -> None:
    x = logits.clone().requires_grad_(True)
    w = (
        torch.linspace(-1, 1, x.shape[-1] * x.shape[-1]).reshape(x.shape[-1], x.shape[-1])
        if x.dim() == 2
        else 1.0
    )
    (fn(x) * w).sum().backward()
    assert torch.isfinite(x.grad).all()


def _logit_matrices():
    """n in 2..16 and logits spanning +-1e4, all-equal, one dominant entry, and mixtures."""

    @st.composite
    def build(draw):
        n = draw(st.integers(2, 16))
        kind = draw(st.sampled_from(["random", "equal", "dominant", "extreme"]))
        if kind == "equal":
            v = draw(st.floats(-1e4, 1e4, allow_nan=False))
            return np.full((n, n), v, dtype=np.float32)
        if kind == "dominant":
            a = np.zeros((n, n), dtype=np.float32)
            i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
            a[i, j] = draw(st.sampled_from([1e4, -1e4, 50.0, 1e3]))
            return a
        elements = st.floats(-1e4, 1e4, allow_nan=False, width=32)
        if kind == "extreme":
            elements = st.sampled_from([-1e4, 1e4, 0.0, -1.0, 1.0])
        return draw(arrays(np.float32, (n, n), elements=elements))

    return build()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logits=_logit_matrices(), iters=st.integers(1, 30), tau=st.sampled_from([0.05, 0.5, 1.0, 3.0]))
def test_sinkhorn_certified_bound_and_finite_gradient(logits, iters, tau):
    x = torch.from_numpy(logits)
    m = sinkhorn(x, iters=iters, tau=tau)
    _assert_bounded(m)
    _assert_finite_grad(x, lambda t: sinkhorn(t, iters=iters, tau=tau))


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(2, MAX_BIRKHOFF_N),
    data=st.data(),
    tau=st.sampled_from([0.1, 1.0, 5.0]),
)
def test_birkhoff_is_doubly_stochastic(n, data, tau):
    k = math.factorial(n)
    logits = data.draw(arrays(np.float32, (k,), elements=st.floats(-1e4, 1e4, allow_nan=False, width=32)))
    x = torch.from_numpy(logits)
    m = birkhoff(x, n, tau=tau)
    _assert_bounded(m)
    torch.testing.assert_close(m.sum(-1), torch.ones(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.sum(-2), torch.ones(n), atol=1e-5, rtol=0)
    x = x.clone().requires_grad_(True)
    (birkhoff(x, n, tau=tau) * torch.arange(n * n).reshape(n, n)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_certify_fixes_an_unconverged_sinkhorn():
    # Peaked logits: 3 iterations leave ||M||_2 well above 1 (docs/method.md §5 measured 1.52).
    x = torch.randn(64, 8, 8, generator=torch.Generator().manual_seed(0)) * 10
    raw = sinkhorn(x, iters=3, certified=False)
    assert diagnostics(raw).sigma_max.max() > 1.1
    m, c = certify(raw)
    assert (c > 1).any()
    _assert_bounded(m)


def test_converged_sinkhorn_is_untouched_by_certify():
    m = sinkhorn(torch.zeros(4, 4), iters=20)
    torch.testing.assert_close(m, torch.full((4, 4), 0.25))
    d = diagnostics(m)
    assert d.rescale.item() == pytest.approx(1.0)
    assert d.sigma_max.item() == pytest.approx(1.0, abs=1e-6)
    assert d.sigma_2.item() == pytest.approx(0.0, abs=1e-6)  # uniform J/n: fully collapsed


def test_batched_equals_per_matrix():
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 3
    batched = sinkhorn(x)
    one_by_one = torch.stack([torch.stack([sinkhorn(x[i, j]) for j in range(3)]) for i in range(5)])
    torch.testing.assert_close(batched, one_by_one)
    m, d = project_with_diagnostics(x, "sinkhorn", 4)
    assert d.sigma_max.shape == (5, 3) and d.row_err.shape == (5, 3)
    torch.testing.assert_close(m, batched)


def test_float32_under_bf16_autocast():
    x = (torch.randn(6, 4, 4) * 5).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = sinkhorn(x)
        b = birkhoff(torch.randn(24).to(torch.bfloat16), 4)
    assert m.dtype == torch.float32 and b.dtype == torch.float32
    _assert_bounded(m)
    # Same numbers as the float32 computation on the same (bf16-representable) logits.
    torch.testing.assert_close(m, sinkhorn(x.float()), atol=0, rtol=0)


def test_permutations_and_errors():
    p = permutation_matrices(3)
    assert p.shape == (6, 3, 3)
    torch.testing.assert_close(p[0], torch.eye(3))  # identity first
    assert len({tuple(q.flatten().tolist()) for q in p}) == 6
    with pytest.raises(ValueError, match="n <= 5"):
        permutation_matrices(6)
    with pytest.raises(ValueError, match="iters"):
        sinkhorn(torch.zeros(3, 3), iters=0)
    with pytest.raises(ValueError, match="unknown projection"):
        project(torch.zeros(3, 3), "softmax", 3)  # type: ignore[arg-type]


def _sinkhorn_grad(logits, w, **kw):
    x = logits.clone().requires_grad_(True)
    m = sinkhorn(x, **kw)
    (m * w).sum().backward()
    return m.detach(), x.grad


@pytest.mark.parametrize(
    "shape,std,iters,tau",
    [
        ((4, 4), 1.0, 20, 1.0),
        ((30, 4, 4), 1.0, 20, 1.0),
        ((30, 4, 4), 10.0, 20, 1.0),  # peaked: the certifying rescale is active
        ((2, 3, 5, 5), 3.0, 7, 0.3),
        ((8, 16, 16), 10.0, 3, 2.0),  # c > 1 on most matrices
        ((6, 2, 2), 1.0, 1, 1.0),
    ],
)
def test_custom_backward_is_bit_identical_to_autograd(shape, std, iters, tau):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(shape, generator=g) * std
    w = torch.randn(shape, generator=g)
    m, grad = _sinkhorn_grad(logits, w, iters=iters, tau=tau)
    m_ref, grad_ref = _sinkhorn_grad(logits, w, iters=iters, tau=tau, custom_backward=False)
    assert torch.equal(m, m_ref)
    assert torch.equal(grad, grad_ref)  # same kernels in the same order: bit-identical, not just close
    _assert_bounded(m)
    # The log_softmax iterations agree with the earlier x - logsumexp(x) form up to float32 rounding.
    x = logits / tau
    for _ in range(iters):
        x = x - torch.logsumexp(x, -1, keepdim=True)
        x = x - torch.logsumexp(x, -2, keepdim=True)
    torch.testing.assert_close(m, certify(x.exp())[0], atol=2e-6, rtol=0)


def test_custom_backward_gradcheck_float64():
    # sinkhorn() always computes in float32, so gradcheck the Function itself, plus the rescale.
    x = (
        torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    ).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _LogSinkhorn.apply(t, 4), (x,))
    assert torch.autograd.gradcheck(lambda t: certify(_LogSinkhorn.apply(t * 5, 2))[0], (x,))


def test_custom_backward_under_bf16_autocast():
    logits = (torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(2)) * 5).to(torch.bfloat16)
    w = torch.randn(6, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m, grad = _sinkhorn_grad(logits, w)
        m_ref, grad_ref = _sinkhorn_grad(logits, w, custom_backward=False)
    assert m.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert torch.equal(m, m_ref) and torch.equal(grad, grad_ref)
