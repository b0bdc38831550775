"""`gacq eval` / `gacq stats`: sample metrics between a set of samples and a reference set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import load_images
from ..distributed import on_rank0
from ..errors import GacqError
from .features import FeatureExtractor, cifar10_network_hash, compute_stats, get_feature_extractor
from .fid import frechet_distance
from .precision_recall import precision_recall
from .stats import FeatureStats, is_stats_file, load_stats

FID_UNBIASED_MIN = 10000


def bundled_stats_path(split: str = "train") -> Path:
    from .cifar10_net import bundled_features_path

    return bundled_features_path() / f"stats_{split}.npz"


def stats_for(src, extractor: FeatureExtractor, batch_size: int = 500, pr_max: int = 10000,
              is_splits: int = 10, seed: int = 0, progress: bool = True, role: str = "samples") -> FeatureStats | None:
    """FeatureStats of `src`: a FeatureStats, a statistics .npz, a uint8 image array, or an image
    path (samples.npz from `gacq sample`, image folder, zip, mosaic zip). Images are split over
    a process group's ranks (`compute_stats`), whose ranks other than 0 get None."""
    if isinstance(src, FeatureStats):
        stats = src
    elif isinstance(src, np.ndarray):
        return compute_stats(src, extractor, batch_size, pr_max, is_splits, seed, f"{role} array", progress)
    elif is_stats_file(src):
        stats = load_stats(src)
    else:
        ds = load_images(src)
        return compute_stats(ds.images, extractor, batch_size, pr_max, is_splits, seed, str(src), progress)
    if stats.feature_name != extractor.name or stats.feature_hash != extractor.hash:
        where = stats.meta.get("source", "the statistics file")
        raise GacqError(
            f"{role}: statistics of {where} were made with feature network {stats.feature_name} "
            f"(hash {stats.feature_hash}), but this evaluation uses {extractor.name} (hash {extractor.hash}); "
            "recompute them with `gacq stats` and the same --features"
        )
    return stats


def make_stats(data, out: str | Path, features: str = "cifar10", inception_weights=None, device=None,
               batch_size: int = 500, pr_max: int = 10000, is_splits: int = 10, seed: int = 0,
               progress: bool = True) -> FeatureStats | None:
    """Compute and save the statistics of a dataset (what `gacq stats` runs; under a process
    group rank 0 saves them and the other ranks get None)."""
    ext = get_feature_extractor(features, device, inception_weights)
    stats = stats_for(data, ext, batch_size, pr_max, is_splits, seed, progress, role="data")
    if stats is not None:  # None: not rank 0 of a process group
        stats.save(out)
    return stats


def make_part_stats(data, out: str | Path, first: int, total: int, features: str = "cifar10", inception_weights=None,
                    device=None, batch_size: int = 500, pr_max: int = 10000, is_splits: int = 10, seed: int = 0,
                    progress: bool = True) -> FeatureStats | None:
    """The statistics of images first .. first + n - 1 of a run of `total` images (`data`: those n images, e.g. a
    `gacq sample --first FIRST` folder), saved for `merge_stats_files` (`gacq stats --part-of FIRST:TOTAL`):
    every image's features are reduced, of the pooled features those of the run's precision/recall subset kept
    (`stats.pr_rows(total, pr_max, seed)`)."""
    from .stats import part_stats

    ext = get_feature_extractor(features, device, inception_weights)
    images = data if isinstance(data, np.ndarray) else load_images(data).images
    source = "images" if isinstance(data, np.ndarray) else str(data)
    stats = compute_stats(images, ext, batch_size, max(len(images), 2), is_splits, seed, source, progress)
    if stats is None:  # not rank 0 of a process group
        return None
    part = part_stats(stats, first, total, pr_max=pr_max, seed=seed)
    part.save(out)
    return part


def merge_stats_files(paths, out: str | Path) -> FeatureStats:
    """One run's statistics file from the files of its parts (`make_part_stats`; `gacq stats --merge`)."""
    from .stats import load_stats, merge_stats

    paths = [Path(p) for p in paths]
    merged = merge_stats([load_stats(p) for p in paths], source=f"{len(paths)} parts: {', '.join(p.name for p in paths)}")
    merged.save(out)
    return merged


def reference_for(ref, features, ext: FeatureExtractor):
    """`ref`, or where it is None the bundled CIFAR-10 training-set statistics, which serve the bundled cifar10
    network only."""
    if ref is not None:
        return ref
    if ext.name != "cifar10":
        raise GacqError("--ref is needed with the inception features (no reference statistics ship for them)")
    # the shipped statistics are the bundled network's (a folder holding the same weights may use them)
    if features != "cifar10" and ext.hash != cifar10_network_hash():
        raise GacqError(f"--ref is needed with the feature network in {features} (hash {ext.hash}): the bundled "
                        "reference statistics are the bundled network's; make reference statistics for it with "
                        f"`gacq stats --data TRAIN_IMAGES --features {features} --out STATS.npz`")
    ref = bundled_stats_path("train")
    if not ref.is_file():
        raise GacqError(f"the bundled reference statistics {ref} are missing; pass --ref")
    return ref


def check_eval_setup(features: str = "cifar10", ref=None, inception_weights=None) -> None:
    """Refuse now what `evaluate` would refuse about its feature network and reference after the samples were made
    (`gacq experiment run` checks its [eval] settings so before a cell calibrates or samples): the network loads
    (on the CPU), the reference exists, and a statistics file given as the reference comes from that network."""
    ext = get_feature_extractor(features, "cpu", inception_weights)
    ref = reference_for(ref, features, ext)
    if not Path(ref).exists():
        raise GacqError(f"the reference {ref} does not exist")
    if is_stats_file(ref):
        stats_for(ref, ext, role="reference")  # the feature network's name and hash must match


def evaluate(samples, ref=None, features: str = "cifar10", inception_weights=None, device=None,
             batch_size: int = 500, pr_k: int = 3, pr_max: int = 10000, is_splits: int = 10, seed: int = 0,
             progress: bool = True) -> dict:
    """FID, sFID, Inception Score and precision/recall of `samples` against `ref`.

    `samples` and `ref` are anything `stats_for` accepts; `ref=None` with the cifar10 features
    uses the bundled CIFAR-10 training-set statistics. Returns a JSON-ready dict that names the
    feature network (name, hash, note) next to every figure. Under a process group every rank
    calls this; the feature extraction is split over the ranks and every rank gets the metrics.
    """
    ext = get_feature_extractor(features, device, inception_weights)
    ref = reference_for(ref, features, ext)
    s = stats_for(samples, ext, batch_size, pr_max, is_splits, seed, progress, role="samples")
    r = stats_for(ref, ext, batch_size, pr_max, is_splits, seed, progress, role="reference")
    # under a process group the statistics are on rank 0, which computes the metrics for all
    return on_rank0(lambda: _metrics(s, r, ext, samples, ref, pr_k, seed), "computing the metrics")


def _metrics(s: FeatureStats, r: FeatureStats, ext: FeatureExtractor, samples, ref, pr_k: int, seed: int) -> dict:
    warnings = []
    if min(s.n, r.n) < FID_UNBIASED_MIN:
        warnings.append(f"FID/sFID from {min(s.n, r.n)} < {FID_UNBIASED_MIN} images: biased upwards, compare "
                        "only at equal sample counts")
    is_mean, is_std = s.inception_score()
    precision, recall = precision_recall(r.pr_features, s.pr_features, k=pr_k, device=ext.device)
    return {
        "feature_network": {"name": ext.name, "hash": ext.hash, "note": ext.note},
        "samples": {"source": s.meta.get("source", str(samples)), "n": s.n},
        "reference": {"source": r.meta.get("source", str(ref)), "n": r.n},
        "fid": frechet_distance(s.mu, s.sigma, r.mu, r.sigma),
        "sfid": frechet_distance(s.mu_spatial, s.sigma_spatial, r.mu_spatial, r.sigma_spatial),
        "fid_biased": min(s.n, r.n) < FID_UNBIASED_MIN,
        "is_mean": is_mean, "is_std": is_std, "is_splits": int(len(s.is_count)),
        "precision": precision, "recall": recall, "pr_k": pr_k,
        "pr_n": {"samples": int(len(s.pr_features)), "reference": int(len(r.pr_features))},
        "seed": seed, "warnings": warnings,
    }


def format_result(res: dict) -> str:
    fn = res["feature_network"]
    lines = [
        f"feature network: {fn['name']} (hash {fn['hash']}) -- {fn['note']}",
        f"samples: {res['samples']['n']} from {res['samples']['source']}",
        f"reference: {res['reference']['n']} from {res['reference']['source']}",
        f"  FID        {res['fid']:10.4f}" + ("  (biased: < 10k images)" if res["fid_biased"] else ""),
        f"  sFID       {res['sfid']:10.4f}",
        f"  IS         {res['is_mean']:10.4f} +- {res['is_std']:.4f} ({res['is_splits']} splits)",
        f"  precision  {res['precision']:10.4f}  (k={res['pr_k']}, {res['pr_n']['samples']} vs "
        f"{res['pr_n']['reference']})",
        f"  recall     {res['recall']:10.4f}",
    ]
    return "\n".join(lines + [f"warning: {w}" for w in res["warnings"]])
