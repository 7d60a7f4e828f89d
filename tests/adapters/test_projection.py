"""Property tests of the doubly-stochastic projections: the certified bound holds on any logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from crma_lightning.adapters.projection import (
    CERTIFY_MARGIN,
    MAX_BIRKHOFF_N,
    _LogSinkhorn,
    birkhoff,
    certify,
    diagnostics,
    identity_logits,
    logits_shape,
    permutation_matrices,
    project,
    project_with_diagnostics,
    sinkhorn,
)


def _assert_bounded(m: torch.Tensor) -> None:
    """The bound on ``m`` as stored, with no tolerance: float64 row/column sums and SVD (exact to
    ~1e-16, far inside the certificate's margin of 2^-22)."""
    assert m.dtype == torch.float32
    assert torch.isfinite(m).all()
    assert (m >= 0).all()
    md = m.double()
    assert (md.sum(-1) <= 1).all(), md.sum(-1).max().item()
    assert (md.sum(-2) <= 1).all(), md.sum(-2).max().item()
    assert (torch.linalg.svdvals(md).amax(-1) <= 1).all(), torch.linalg.svdvals(md).max().item()


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


def test_converged_sinkhorn_moves_only_by_the_margin():
    m = sinkhorn(torch.zeros(4, 4), iters=20)  # J/4 exactly before certify: sums exactly 1
    torch.testing.assert_close(m, torch.full((4, 4), 0.25), atol=0, rtol=CERTIFY_MARGIN)
    _assert_bounded(m)
    d = diagnostics(m)
    assert d.rescale.item() == 1.0  # inside the bound, so no further divisor needed
    assert d.sigma_max.item() == pytest.approx(1.0, abs=1e-6) and d.sigma_max.item() <= 1
    assert d.sigma_2.item() == pytest.approx(0.0, abs=1e-6)  # uniform J/n: fully collapsed
    # A matrix inside the bound with room to spare is returned unchanged.
    inside = torch.full((3, 4, 4), 0.2)
    out, c = certify(inside)
    assert torch.equal(out, inside) and (c == 1).all() and c.dtype == torch.float64


_PATTERNS = ["normal", "peaked", "ties", "extreme", "zeros", "near_identity"]


def _adversarial(
    rng: np.random.Generator, pattern: str, kind: str, shape: tuple[int, ...], scale: float
) -> np.ndarray:
    """Logits that stress the float32 rounding of the sums: huge magnitudes, one dominant entry per
    row, ties, +-1e4 extremes, all zeros (exactly J/n), near-permutations."""
    if pattern == "normal":
        return rng.standard_normal(shape) * scale
    if pattern == "peaked":
        x = rng.standard_normal(shape)
        idx = rng.integers(0, shape[-1], size=shape[:-1])
        np.put_along_axis(x, idx[..., None], scale, axis=-1)
        return x
    if pattern == "ties":
        return rng.integers(-2, 3, size=shape) * scale
    if pattern == "extreme":
        return rng.choice(np.array([-1e4, 1e4, 0.0, -1.0, 1.0]), size=shape)
    if pattern == "zeros":
        return np.zeros(shape)
    x = rng.standard_normal(shape) * 1e-3  # near the identity
    if kind == "sinkhorn":
        return x + np.eye(shape[-1]) * scale
    x[..., 0] += scale  # the identity is the first permutation
    return x


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["sinkhorn", "birkhoff"]),
    n=st.integers(2, 8),
    batch=st.sampled_from([(), (1,), (3,), (30,), (2, 5)]),
    pattern=st.sampled_from(_PATTERNS),
    scale=st.sampled_from([0.1, 1.0, 3.0, 10.0, 50.0, 1e3, 1e4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    iters=st.sampled_from([1, 3, 20]),
    tau=st.sampled_from([0.05, 1.0, 3.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_bound_holds_exactly_for_the_float32_matrix(kind, n, batch, pattern, scale, dtype, iters, tau, seed):
    # No tolerance: the matrix the forward pass uses, as stored in float32, has float64 row/column
    # sums and spectral norm <= 1, for every projection and float32 or bf16 logits.
    if kind == "birkhoff":
        n = min(n, MAX_BIRKHOFF_N)
    shape = (*batch, *logits_shape(kind, n))
    x = torch.from_numpy(_adversarial(np.random.default_rng(seed), pattern, kind, shape, scale)).to(dtype)
    m = project(x, kind, n, iters=iters, tau=tau)
    assert m.shape == (*batch, n, n)
    _assert_bounded(m)
    m2, d = project_with_diagnostics(x, kind, n, iters=iters, tau=tau)
    assert torch.equal(m2, m)
    assert (d.sigma_max <= 1).all() and (d.rescale >= 1).all()


def test_diagnostics_sigma_max_is_at_most_one():
    # Matrices exactly (or up to float32 rounding) doubly stochastic before certify: a float32 SVD
    # reports some of them at 1.0000001; the float64 diagnostics of the certified matrix never exceed 1.
    g = torch.Generator().manual_seed(3)
    for kind, n, logits in [
        ("sinkhorn", 4, torch.zeros(30, 4, 4)),
        ("sinkhorn", 4, torch.randn(200, 4, 4, generator=g)),
        ("sinkhorn", 3, torch.randn(200, 3, 3, generator=g) * 0.1),
        ("birkhoff", 4, torch.randn(200, 24, generator=g)),
        ("birkhoff", 3, torch.randn(200, 6, generator=g) * 3),
        ("birkhoff", 4, identity_logits("birkhoff", 4, 1e4).expand(30, 24)),
    ]:
        m, d = project_with_diagnostics(logits, kind, n)
        assert (d.sigma_max <= 1).all(), (kind, n, d.sigma_max.max().item())
        assert (diagnostics(m).sigma_max <= 1).all()
    assert d.sigma_max.dtype == torch.float64
    torch.testing.assert_close(d.sigma_max, torch.linalg.svdvals(m.double())[..., 0], atol=1e-12, rtol=0)


@settings(max_examples=300, deadline=None)
@given(
    m=arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.integers(1, 9)).map(lambda t: (t[0], t[1], t[1])),
        elements=st.one_of(
            st.floats(0, 2, width=32),
            st.sampled_from([0.0, 1.0, 0.5, 0.25, 1 / 3, 0.1, 1e-30, 1e-45]),
        ),
    )
)
def test_certify_bounds_any_nonnegative_float32_matrix(m):
    # Exact sums (math.fsum) of what certify returns, including matrices whose float64 sums are
    # exactly 1 (permutations, J/n) or within float32 rounding of it.
    out, c = certify(torch.from_numpy(m))
    a = out.numpy().astype(np.float64)
    for b in range(a.shape[0]):
        for i in range(a.shape[1]):
            assert math.fsum(a[b, i, :]) <= 1 and math.fsum(a[b, :, i]) <= 1
    _assert_bounded(out)
    assert c.dtype == torch.float64 and (c >= 1).all()


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
