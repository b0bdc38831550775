"""Sample metrics: FID, sFID, Inception Score, precision/recall, and their feature networks.

    from gacq.metrics import evaluate, make_stats, frechet_distance, precision_recall
    from gacq.metrics import get_feature_extractor, compute_stats, load_stats
"""

from .evaluate import (
    bundled_stats_path, evaluate, format_result, make_part_stats, make_stats, merge_stats_files, stats_for,
)
from .features import FEATURE_NAMES, FeatureExtractor, compute_stats, get_feature_extractor
from .fid import frechet_distance, inception_score, inception_score_from_sums
from .precision_recall import precision_recall
from .stats import FeatureStats, StatsAccumulator, is_stats_file, load_stats

__all__ = [
    "FEATURE_NAMES", "FeatureExtractor", "FeatureStats", "StatsAccumulator", "bundled_stats_path",
    "compute_stats", "evaluate", "format_result", "frechet_distance", "get_feature_extractor",
    "inception_score", "inception_score_from_sums", "is_stats_file", "load_stats", "make_part_stats", "make_stats",
    "merge_stats_files",
    "precision_recall", "stats_for",
]
