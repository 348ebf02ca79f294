"""The few statistics the tables report, kept apart so tests can check them by hand."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def binomial_se(accuracy: float, count: int) -> float:
    """Standard error of an accuracy measured on ``count`` test images: the test-set noise."""
    return math.sqrt(accuracy * (1 - accuracy) / count) if count else math.nan


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); the std is NaN below two values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_difference(row: Mapping[int, float], baseline: Mapping[int, float]) -> tuple[float, float, int]:
    """Mean of per-seed differences ``row − baseline`` over the seeds both have, its standard
    error (std of the differences / √n) and n. Both rows are scored on the same test images and
    seeds, so pairing cancels what they share and tells a real gap from seed-to-seed spread."""
    seeds = sorted(set(row) & set(baseline))
    mean, std = mean_std(row[s] - baseline[s] for s in seeds)
    return mean, std / math.sqrt(len(seeds)) if seeds else math.nan, len(seeds)
