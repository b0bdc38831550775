"""Frechet distance and Inception Score: the numeric core, written against numpy only.

Why by hand: torch-fidelity (which has both) imports torchvision when imported, and
torchvision's wheel does not load against the CPU torch this project is tested on;
torchmetrics' FID keeps its own state and cannot read our statistics files. The formulas
are a few lines each and are checked in the tests against scipy.linalg.sqrtm and naive loops.
"""

from __future__ import annotations

import numpy as np

from ..errors import GacqError


def _check_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise GacqError(f"{which}: mean of shape {mu.shape} and covariance of shape {sigma.shape} do not agree")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise GacqError(f"{which}: statistics contain NaN or inf (were the features finite?)")
    return mu, sigma


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    The trace term is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix sigma1^(1/2) sigma2 sigma1^(1/2) (which has the same spectrum as
    sigma1 sigma2), in float64: no complex parts to discard, no sqrtm iteration to fail.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise GacqError(f"feature dimensions differ: {mu1.size} vs {mu2.size} (different feature networks?)")
    s1h = _sqrt_psd(sigma1)
    m = s1h @ sigma2 @ s1h
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score_from_sums(p_sum: np.ndarray, plogp_sum: np.ndarray, count: np.ndarray) -> tuple[float, float]:
    """Inception Score (mean, std over splits) from per-split sums, so it can be streamed.

    For split s with n_s samples: IS_s = exp(mean_x sum_y p log p - sum_y q log q), q = mean_x p(y|x),
    which equals exp(E_x KL(p(y|x) || q)).
    """
    p_sum, plogp_sum, count = np.asarray(p_sum, np.float64), np.asarray(plogp_sum, np.float64), np.asarray(count)
    if (count < 1).any():
        raise GacqError(f"Inception Score needs at least one sample per split; got split sizes {count.tolist()}")
    q = p_sum / count[:, None]
    qlogq = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(1)
    scores = np.exp(plogp_sum / count - qlogq)
    return float(scores.mean()), float(scores.std())


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score of logits (N x C); sample i goes to split i % splits."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise GacqError(f"logits must be N x C, got shape {logits.shape}")
    if len(logits) < splits:
        raise GacqError(f"{len(logits)} samples are fewer than the {splits} Inception Score splits")
    p_sum, plogp, count = is_split_sums(logits, 0, splits)
    return inception_score_from_sums(p_sum, plogp, count)


def is_split_sums(logits: np.ndarray, start: int, splits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-split sums (p, p log p, count) of a batch of logits whose first row has global index `start`."""
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    p = np.exp(logp)
    which = (start + np.arange(len(logits))) % splits
    p_sum = np.zeros((splits, logits.shape[1]))
    np.add.at(p_sum, which, p)
    plogp = np.bincount(which, weights=(p * logp).sum(1), minlength=splits)
    count = np.bincount(which, minlength=splits)
    return p_sum, plogp, count
