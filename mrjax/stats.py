"""Float64 statistics of plain arrays, shared by the loop's DPO figures and the evaluation."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def bootstrap_mean_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0,
                            level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(values), resampling the values (NaNs left out)."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


__all__ = ["bootstrap_mean_interval"]
