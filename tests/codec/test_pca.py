"""codec/pca.py: the streaming covariance equals the batch one, and the fitted basis is the data's principal axes."""

from __future__ import annotations

import pytest
import torch

from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.pca import CovarianceAccumulator, fit_pca


def _data(n: int = 600, p: int = 8, seed: int = 0) -> torch.Tensor:
    """Features with a large common offset and known variances 9, 4, 1, 0.25, ... along rotated axes."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    sigma = 3.0 * 0.5 ** torch.arange(p, dtype=torch.float64)
    z = torch.randn(n, p, generator=g, dtype=torch.float64) * sigma
    return (z @ q.T + 1000.0).float(), q, sigma


def test_streaming_mean_and_covariance_equal_the_batch_statistics():
    x, _, _ = _data()
    acc = CovarianceAccumulator(x.shape[1])
    for chunk in x.split(77):  # uneven batches
        acc.update(chunk)
    xd = x.double()
    assert acc.n == x.shape[0]
    torch.testing.assert_close(acc.mean, xd.mean(0), rtol=0, atol=1e-9)
    want = torch.cov(xd.T, correction=0)
    torch.testing.assert_close(acc.covariance(), want, rtol=1e-5, atol=1e-6)  # the 1000 offset costs no precision


def test_basis_is_orthonormal_sorted_and_spans_the_principal_axes():
    x, q, sigma = _data(n=20000)
    acc = CovarianceAccumulator(x.shape[1])
    acc.update(x)
    pca = fit_pca(acc)
    b = pca.basis.double()
    torch.testing.assert_close(b.T @ b, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-5)
    assert bool((pca.eigenvalues[:-1] >= pca.eigenvalues[1:]).all())
    torch.testing.assert_close(pca.eigenvalues.double(), sigma ** 2, rtol=0.05, atol=1e-3)
    # each direction is +-one of the generating axes (all variances are distinct)
    cos = (b.T @ q).abs()
    assert bool((cos.amax(1) > 0.99).all())
    # signs are fixed: the largest-magnitude entry of every direction is positive
    idx = pca.basis.abs().argmax(0)
    assert bool((pca.basis[idx, torch.arange(8)] > 0).all())


def test_project_and_reconstruct_are_inverse_at_full_rank_and_truncate_in_order():
    x, _, _ = _data()
    acc = CovarianceAccumulator(x.shape[1])
    acc.update(x)
    pca = fit_pca(acc)
    d = pca.project(x)
    torch.testing.assert_close(pca.reconstruct(d), x, rtol=0, atol=2e-3)
    # dropping the last directions loses exactly their variance (the smallest)
    err = (pca.reconstruct(d[:, :3]) - x).double().pow(2).sum(1).mean()
    assert float(err) == pytest.approx(float(pca.eigenvalues[3:].double().sum()), rel=0.05)
    small = pca.truncated(3)
    assert small.basis.dtype == torch.float16 and small.rank == 3 and small.p == 8


def test_bad_inputs_raise_shape_error():
    acc = CovarianceAccumulator(4)
    with pytest.raises(ShapeError, match=r"expected \[n, 4\]"):
        acc.update(torch.zeros(3, 5))
    acc.update(torch.zeros(1, 4))
    with pytest.raises(ShapeError, match="at least two samples"):
        acc.covariance()
    acc.update(torch.ones(1, 4))
    acc.release()
    with pytest.raises(ShapeError, match="released"):
        acc.covariance()
