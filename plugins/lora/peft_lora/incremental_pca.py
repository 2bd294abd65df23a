"""Incremental PCA over batches of layer inputs, the statistic EVA is built on.

The classic incremental algorithm (Ross et al. 2008, as in scikit-learn's ``IncrementalPCA``):
keep the top components scaled by their singular values, and for each new batch take the SVD of
those rows stacked on the centred batch and one row that corrects for the shift of the mean. The
SVD is the randomised ``torch.svd_lowrank`` (``q = 2 * n_components``, 4 subspace iterations)
under a fixed seed, which is what the reference library's EVA uses, so both compute the same
components from the same data. The caller's random state is left untouched.
"""

from __future__ import annotations

import torch

__all__ = ["IncrementalPCA"]


class IncrementalPCA:
    """Principal components of the rows of every batch passed to :meth:`partial_fit` so far.

    After the first call: ``components_`` (n_components, n_features), ``singular_values_``,
    ``explained_variance_ratio_``, ``mean_``, ``var_``, ``n_samples_seen_``.
    """

    def __init__(self, n_components: int, *, niter: int = 4, seed: int | None = 42) -> None:
        self.n_components = n_components
        self.q = 2 * n_components
        self.niter = niter
        self.seed = seed
        self.n_samples_seen_ = 0

    @property
    def fitted(self) -> bool:
        return self.n_samples_seen_ > 0

    def _svd(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        devices = [matrix.device] if matrix.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.seed is not None):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            U, S, V = torch.svd_lowrank(matrix, q=self.q, niter=self.niter)
        return U, S, V.mH

    @staticmethod
    def _sign_fix(U: torch.Tensor, Vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Make the largest entry of each right-singular vector positive (a deterministic sign)."""
        largest = Vt.abs().argmax(dim=1)
        signs = torch.sign(Vt[torch.arange(Vt.shape[0]), largest])
        return U * signs[: U.shape[1]].view(1, -1), Vt * signs.view(-1, 1)

    def _update_moments(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean and (biased) variance of all rows seen, with this batch, accumulated in float64."""
        n_new = X.shape[0]
        n_old = self.n_samples_seen_
        n_total = n_old + n_new
        new_sum = X.sum(dim=0, dtype=torch.float64)
        centred = X - new_sum / n_new
        new_scatter = centred.square().sum(dim=0, dtype=torch.float64)
        new_scatter -= centred.sum(dim=0, dtype=torch.float64).square() / n_new
        if n_old == 0:
            return new_sum / n_total, new_scatter / n_total, n_total
        old_sum = self.mean_ * n_old
        ratio = n_old / n_new
        scatter = self.var_ * n_old + new_scatter + ratio / n_total * (old_sum / ratio - new_sum).square()
        return (old_sum + new_sum) / n_total, scatter / n_total, n_total

    @torch.no_grad()
    def partial_fit(self, X: torch.Tensor) -> IncrementalPCA:
        """Add the rows of ``X`` (n_samples, n_features)."""
        n_samples, n_features = X.shape
        if self.n_components > n_features:
            raise ValueError(
                f"Cannot keep {self.n_components} components of {n_features}-dimensional inputs; lower r (or rho)."
            )
        if self.n_components > n_samples:
            raise ValueError(f"A batch needs at least {self.n_components} rows, got {n_samples}.")
        if self.fitted and n_features != self.components_.shape[1]:
            raise ValueError(f"Expected {self.components_.shape[1]} features, got {n_features}.")
        X = X.to(torch.float32) if X.dtype not in (torch.float32, torch.float64) else X.clone()
        mean, var, n_total = self._update_moments(X)
        if not self.fitted:
            X.sub_(mean)
        else:
            batch_mean = X.mean(dim=0)
            X.sub_(batch_mean)
            shift = ((self.n_samples_seen_ / n_total) * n_samples) ** 0.5 * (self.mean_ - batch_mean)
            X = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, X, shift))
        U, S, Vt = self._svd(X)
        _, Vt = self._sign_fix(U, Vt)
        k = self.n_components
        self.components_ = Vt[:k]
        self.singular_values_ = S[:k]
        self.explained_variance_ratio_ = (S.square() / torch.sum(var * n_total))[:k]
        self.mean_, self.var_, self.n_samples_seen_ = mean, var, n_total
        return self
