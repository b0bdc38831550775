"""Feature statistics: streamed accumulation and the `.npz` files `gacq stats` writes.

A statistics file holds, for one feature network (name + weights hash):
- mean and covariance of the pooled features (FID) and of the spatial features (sFID);
- a uniform random subset (reservoir sample, seeded) of the pooled features for precision/recall;
- per-split sums for the Inception Score (sample i goes to split i % splits).
Files are plain `.npz` read with `allow_pickle=False`.

Statistics of one run made in parts (a cell of 50,000 samples over several 10-minute GPU calls, each part's
statistics a few MB where its images are 15): `part_stats` marks each part's statistics with its place in the run
and keeps the precision/recall features of the run's own uniform subset (`pr_rows`); `merge_stats` pools them into
the statistics of the whole run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import GacqError
from ..utils import atomic_path, npz_problem
from .fid import inception_score_from_sums, is_split_sums

STATS_VERSION = 1


class _Moments:
    """Running mean and covariance in float64, accumulated around a shift (the first batch's
    mean) so that sums of squares do not cancel catastrophically."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1: np.ndarray | None = None
        self.s2: np.ndarray | None = None

    def add(self, f: np.ndarray) -> None:
        f = np.asarray(f, np.float64)
        if self.shift is None:
            self.shift = f.mean(0)
            self.s1 = np.zeros(f.shape[1])
            self.s2 = np.zeros((f.shape[1], f.shape[1]))
        g = f - self.shift
        self.n += len(g)
        self.s1 += g.sum(0)
        self.s2 += g.T @ g

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.s1 / self.n
        cov = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
        return m + self.shift, cov


@dataclass
class FeatureStats:
    """Statistics of one image set under one feature network."""

    feature_name: str
    feature_hash: str
    n: int
    mu: np.ndarray
    sigma: np.ndarray
    mu_spatial: np.ndarray
    sigma_spatial: np.ndarray
    pr_features: np.ndarray
    is_p_sum: np.ndarray
    is_plogp_sum: np.ndarray
    is_count: np.ndarray
    meta: dict = field(default_factory=dict)

    def inception_score(self) -> tuple[float, float]:
        return inception_score_from_sums(self.is_p_sum, self.is_plogp_sum, self.is_count)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix != ".npz":
            raise GacqError(f"statistics files end in .npz, not {path.name}")
        arrays = {
            "mu": self.mu, "sigma": self.sigma.astype(np.float32),
            "mu_spatial": self.mu_spatial, "sigma_spatial": self.sigma_spatial.astype(np.float32),
            "pr_features": self.pr_features.astype(np.float16),
            "is_p_sum": self.is_p_sum, "is_plogp_sum": self.is_plogp_sum, "is_count": self.is_count,
            "header": np.array(json.dumps({
                "gacq_stats_version": STATS_VERSION, "feature_name": self.feature_name,
                "feature_hash": self.feature_hash, "n": self.n, "meta": self.meta})),
        }
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)


def is_stats_file(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return "header" in z.files and "mu" in z.files
    except (OSError, ValueError):
        return False


def load_stats(path: str | Path) -> FeatureStats:
    path = Path(path)
    try:
        if (problem := npz_problem(path)) is not None:
            raise GacqError(f"cannot read statistics file {path}: {problem}")
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise GacqError(f"cannot read statistics file {path}: {e}") from e
    with z:
        missing = [k for k in ("header", "mu", "sigma", "mu_spatial", "sigma_spatial", "pr_features",
                               "is_p_sum", "is_plogp_sum", "is_count") if k not in z.files]
        if missing:
            raise GacqError(f"{path} is not a gacq statistics file (missing {', '.join(missing)}); "
                            "make one with `gacq stats`")
        header = json.loads(str(z["header"]))
        if header.get("gacq_stats_version") != STATS_VERSION:
            raise GacqError(f"{path}: statistics version {header.get('gacq_stats_version')} is not "
                            f"{STATS_VERSION}; recompute it with `gacq stats`")
        return FeatureStats(
            feature_name=header["feature_name"], feature_hash=header["feature_hash"], n=int(header["n"]),
            mu=z["mu"].astype(np.float64), sigma=z["sigma"].astype(np.float64),
            mu_spatial=z["mu_spatial"].astype(np.float64), sigma_spatial=z["sigma_spatial"].astype(np.float64),
            pr_features=z["pr_features"].astype(np.float32), is_p_sum=z["is_p_sum"],
            is_plogp_sum=z["is_plogp_sum"], is_count=z["is_count"], meta=header.get("meta", {}))


class StatsAccumulator:
    """Feed batches of feature taps (pool, spatial, logits) in order; `result()` gives FeatureStats."""

    def __init__(self, feature_name: str, feature_hash: str, pr_max: int = 10000, is_splits: int = 10,
                 seed: int = 0):
        self.feature_name, self.feature_hash = feature_name, feature_hash
        self.pr_max, self.is_splits = pr_max, is_splits
        self.rng = np.random.default_rng(seed)
        self.pool, self.spatial = _Moments(), _Moments()
        self.reservoir: np.ndarray | None = None
        self.n = 0
        self.p_sum = self.plogp = self.count = None

    def add(self, taps: dict[str, np.ndarray]) -> None:
        pool, spatial, logits = (np.asarray(taps[k], np.float64) for k in ("pool", "spatial", "logits"))
        for k, v in (("pool", pool), ("spatial", spatial), ("logits", logits)):
            if not np.isfinite(v).all():
                raise GacqError(f"the feature network produced NaN or inf '{k}' features for images "
                                f"{self.n}..{self.n + len(v) - 1}; check the images (NaN pixels?) and the weights")
        self.pool.add(pool)
        self.spatial.add(spatial)
        self._reservoir_add(pool)
        p, pl, c = is_split_sums(logits, self.n, self.is_splits)
        if self.p_sum is None:
            self.p_sum, self.plogp, self.count = p, pl, c
        else:
            self.p_sum += p
            self.plogp += pl
            self.count += c
        self.n += len(pool)

    def _reservoir_add(self, f: np.ndarray) -> None:
        # Algorithm R: after n items, every item is in the reservoir with probability k/n.
        if self.reservoir is None:
            self.reservoir = np.empty((self.pr_max, f.shape[1]), np.float32)
        for i, row in enumerate(f):
            idx = self.n + i
            if idx < self.pr_max:
                self.reservoir[idx] = row
            else:
                j = int(self.rng.integers(0, idx + 1))
                if j < self.pr_max:
                    self.reservoir[j] = row

    def result(self, meta: dict | None = None) -> FeatureStats:
        if self.n < 2:
            raise GacqError(f"{self.n} image(s) are too few for a covariance; statistics need at least 2 "
                            "(and FID is only unbiased-ish at 10,000 or more)")
        mu, sigma = self.pool.result()
        mu_s, sigma_s = self.spatial.result()
        return FeatureStats(self.feature_name, self.feature_hash, self.n, mu, sigma, mu_s, sigma_s,
                            self.reservoir[:min(self.n, self.pr_max)].copy(), self.p_sum, self.plogp, self.count, dict(meta or {}))


def pr_rows(n_total: int, pr_max: int, seed: int) -> np.ndarray:
    """The indices (sorted) of the images whose pooled features precision/recall use when the statistics of a run of
    n_total images are made in parts: a uniform random subset of pr_max of them (`np.random.default_rng(seed)`,
    without replacement), or all of them where n_total <= pr_max (the features one pass keeps too)."""
    if n_total <= pr_max:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, pr_max, replace=False))


def part_stats(stats: FeatureStats, first: int, n_total: int, pr_max: int = 10000, seed: int = 0) -> FeatureStats:
    """The statistics of images first .. first + stats.n - 1 of a run of n_total, for `merge_stats`. `stats` must hold
    every one of its images' pooled features in order (made with pr_max at least its image count), and `first` must be
    a multiple of the Inception Score's split count (image i of a part goes to split i % splits counted from the
    part's first image, so that the run's images keep their splits). Keeps the pooled features of the run's
    `pr_rows` that fall in this part."""
    splits = len(stats.is_count)
    if len(stats.pr_features) != stats.n:
        raise GacqError(f"part statistics need every image's features: {len(stats.pr_features)} kept of {stats.n}; "
                        f"make them with pr_max >= {stats.n}")
    if first < 0 or first % splits:
        raise GacqError(f"a part must start at a multiple of the {splits} Inception Score splits, not at image {first}")
    if first + stats.n > n_total:
        raise GacqError(f"images {first}..{first + stats.n - 1} do not lie in a run of {n_total}")
    rows = pr_rows(n_total, pr_max, seed)
    keep = rows[(rows >= first) & (rows < first + stats.n)] - first
    meta = {**stats.meta, "part": {"first": first, "n": stats.n, "n_total": n_total, "pr_max": pr_max,
                                   "pr_seed": seed}}
    return dataclasses.replace(stats, pr_features=stats.pr_features[keep], meta=meta)


def merge_stats(parts: list[FeatureStats], source: str | None = None) -> FeatureStats:
    """The statistics of one run from those of its parts (`part_stats`), which must cover images 0 .. n_total - 1 of
    it once each: the pooled and spatial features' mean and covariance from the parts' (exact up to float rounding:
    the within-part scatter (n_k - 1) S_k plus the between-part n_k (m_k - m)(m_k - m)^T, over n - 1), the Inception
    Score's per-split sums added, and the precision/recall features of the run's `pr_rows`, in image order."""
    if not parts:
        raise GacqError("no part statistics to merge")
    info = [p.meta.get("part") for p in parts]
    if any(i is None for i in info):
        raise GacqError("statistics to merge must be parts of one run (made by part_stats)")
    parts = [p for _, p in sorted(zip((i["first"] for i in info), parts), key=lambda t: t[0])]
    info = [p.meta["part"] for p in parts]
    run = {(i["n_total"], i["pr_max"], i["pr_seed"]) for i in info}
    nets = {(p.feature_name, p.feature_hash, len(p.is_count)) for p in parts}
    if len(run) > 1 or len(nets) > 1:
        raise GacqError(f"the parts come from different runs or feature networks: {sorted(run)}, {sorted(nets)}")
    n_total = info[0]["n_total"]
    at = 0
    for i in info:
        if i["first"] != at:
            raise GacqError(f"the parts do not tile the run of {n_total} images: a part starts at image {i['first']} "
                            f"where {at} was expected (a part missing or repeated)")
        at += i["n"]
    if at != n_total:
        raise GacqError(f"the parts cover images 0..{at - 1} of a run of {n_total}: parts are missing")

    def pooled(means, covs):
        ns = np.array([p.n for p in parts], np.float64)
        m = (ns[:, None] * np.stack(means)).sum(0) / n_total
        scatter = sum((n - 1) * c + n * np.outer(mk - m, mk - m) for n, mk, c in zip(ns, means, covs))
        return m, scatter / (n_total - 1)

    mu, sigma = pooled([p.mu for p in parts], [p.sigma for p in parts])
    mu_s, sigma_s = pooled([p.mu_spatial for p in parts], [p.sigma_spatial for p in parts])
    first = parts[0]
    meta = {k: v for k, v in first.meta.items() if k not in ("part", "source")}
    meta.update(source=source or f"{len(parts)} parts of a run of {n_total} images", parts=len(parts),
                pr_max=info[0]["pr_max"], seed=info[0]["pr_seed"])
    return FeatureStats(first.feature_name, first.feature_hash, n_total, mu, sigma, mu_s, sigma_s,
                        np.concatenate([p.pr_features for p in parts]),
                        sum(p.is_p_sum for p in parts), sum(p.is_plogp_sum for p in parts),
                        sum(p.is_count for p in parts), meta)
