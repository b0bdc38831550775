"""Improved precision and recall (Kynkaanniemi et al. 2019), k-nearest-neighbour manifolds.

precision: the fraction of generated samples inside the real manifold, i.e. within the
  k-NN radius of at least one real sample; recall: the same with the roles swapped.
Distances are computed in float64 in row chunks, so memory stays at chunk x N.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import GacqError


def _kth_radius(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    out = []
    for i in range(0, len(feats), chunk):
        d = torch.cdist(feats[i:i + chunk], feats)
        out.append(d.kthvalue(k + 1, dim=1).values)  # k+1: the nearest one is the point itself
    return torch.cat(out)


def _coverage(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    inside = 0
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk], ref)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(query)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1000,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """(precision, recall) of `fake` features against `real` features (both N x D)."""
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    if real_t.ndim != 2 or fake_t.ndim != 2 or real_t.shape[1] != fake_t.shape[1]:
        raise GacqError(f"precision/recall needs N x D features of one width, got {tuple(real_t.shape)} "
                        f"and {tuple(fake_t.shape)}")
    if min(len(real_t), len(fake_t)) <= k:
        raise GacqError(f"precision/recall with k={k} needs more than {k} samples on each side "
                        f"(got {len(real_t)} real, {len(fake_t)} generated)")
    if not (torch.isfinite(real_t).all() and torch.isfinite(fake_t).all()):
        raise GacqError("precision/recall: features contain NaN or inf")
    r_real = _kth_radius(real_t, k, chunk)
    r_fake = _kth_radius(fake_t, k, chunk)
    precision = _coverage(fake_t, real_t, r_real, chunk)
    recall = _coverage(real_t, fake_t, r_fake, chunk)
    return precision, recall
