"""PCA of calibration features: streaming covariance, eigendecomposition, projection.

Features are mean-centred, not whitened: d = (x - mu) @ basis, x_hat = d_hat @ basis.T + mu.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtc_sglang.codec.errors import ShapeError


class CovarianceAccumulator:
    """Running mean and covariance of feature vectors, accumulated in float64.

    Batches are centred on the first batch's mean before the float32 Gram product so the float32
    accumulation does not lose the small directions to a large common offset.
    """

    def __init__(self, p: int, device: torch.device | str = "cpu"):
        self.p = p
        self.n = 0
        self.device = torch.device(device)
        self._ref: torch.Tensor | None = None  # [p] float32 centring reference
        self._sum = torch.zeros(p, dtype=torch.float64, device=self.device)
        self._gram = torch.zeros(p, p, dtype=torch.float64, device=self.device)

    def update(self, x: torch.Tensor) -> None:
        """x: [n, p] float tensor (any device; accumulated on the accumulator's device).

        On CPU the Gram product runs in float32 (centred data keep it accurate) and is added in
        float64; on CUDA it runs in float64 (cheap there, and p can reach 32768).
        """
        if x.dim() != 2 or x.shape[1] != self.p:
            raise ShapeError(f"expected [n, {self.p}] features, got {tuple(x.shape)}")
        x = x.detach().to(self.device, torch.float32)
        if self._ref is None:
            self._ref = x.mean(0)
        xc = x - self._ref
        self._sum += xc.sum(0, dtype=torch.float64)
        if self.device.type == "cuda":
            xd = xc.double()
            self._gram += xd.T @ xd
        else:
            self._gram += (xc.T @ xc).double()
        self.n += x.shape[0]

    def variances(self) -> torch.Tensor:
        """[p] float64 per-feature variance (the covariance's diagonal, 1/n normalisation)."""
        if self.n < 2 or self._gram is None:
            raise ShapeError("need an unreleased accumulator with at least two samples")
        m = self._sum / self.n
        return self._gram.diagonal() / self.n - m * m

    def rescale(self, c: torch.Tensor) -> None:
        """Turn the statistics of x into those of c ⊙ x (c: [p] positive scales), as if every batch had been scaled."""
        if c.shape != (self.p,):
            raise ShapeError(f"expected [{self.p}] scales, got {tuple(c.shape)}")
        cd = c.to(self.device, torch.float64)
        if self._ref is not None:
            self._ref = (self._ref.double() * cd).float()
        self._sum *= cd
        if self._gram is not None:
            self._gram *= torch.outer(cd, cd)

    def release(self) -> None:
        """Free the Gram matrix (after fit_pca); the accumulator can no longer give a covariance."""
        self._gram = None

    @property
    def mean(self) -> torch.Tensor:
        """[p] float64."""
        return self._ref.double() + self._sum / self.n

    def covariance(self) -> torch.Tensor:
        """[p, p] float64 covariance (1/n normalisation)."""
        if self.n < 2:
            raise ShapeError("need at least two samples for a covariance")
        if self._gram is None:
            raise ShapeError("the covariance was released")
        m = self._sum / self.n
        return self._gram / self.n - torch.outer(m, m)


@dataclass(frozen=True)
class PCABasis:
    """mean [p] float32, basis [p, r] (orthonormal columns, descending variance), eigenvalues [r]."""

    mean: torch.Tensor
    basis: torch.Tensor
    eigenvalues: torch.Tensor

    @property
    def p(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def truncated(self, r: int, dtype: torch.dtype = torch.float16) -> "PCABasis":
        """Keep the first r directions, stored in `dtype` (16-bit in artifacts)."""
        return PCABasis(self.mean.float(), self.basis[:, :r].to(dtype).contiguous(), self.eigenvalues[:r].float())

    def project(self, x: torch.Tensor, r: int | None = None) -> torch.Tensor:
        """x: [n, p] -> coefficients [n, r] float32."""
        b = self.basis if r is None else self.basis[:, :r]
        return (x.float() - self.mean.to(x.device).float()) @ b.to(x.device).float()

    def reconstruct(self, d: torch.Tensor) -> torch.Tensor:
        """d: [n, r'] (r' <= rank) -> features [n, p] float32."""
        b = self.basis[:, : d.shape[1]].to(d.device).float()
        return d.float() @ b.T + self.mean.to(d.device).float()


def fit_pca(acc: CovarianceAccumulator) -> PCABasis:
    """Full eigendecomposition of the accumulated covariance on the accumulator's device (float64 on
    CPU; float32 on CUDA, where a float64 eigendecomposition of p = 32768 takes minutes and the
    directions are stored in 16 bits anyway), directions by descending variance. Returns CPU tensors."""
    cov = acc.covariance()
    if cov.device.type == "cuda":
        cov = cov.float()
    evals, evecs = torch.linalg.eigh(cov)
    del cov
    evals, evecs = evals.cpu(), evecs.cpu()
    order = torch.argsort(evals, descending=True)
    evals = evals[order].clamp_min(0.0)
    evecs = evecs[:, order]
    # Fix each direction's sign (largest-magnitude entry positive) so bases are reproducible.
    idx = evecs.abs().argmax(0)
    signs = torch.sign(evecs[idx, torch.arange(evecs.shape[1])])
    signs[signs == 0] = 1
    evecs = evecs * signs
    return PCABasis(acc.mean.float().cpu(), evecs.float(), evals.float())
