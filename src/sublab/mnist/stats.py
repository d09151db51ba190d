"""Ensemble statistics: mean and 95% t-interval over independent members.

mean_ci([0.61, 0.58, 0.64])   # {'mean': 0.61, 'ci95_low': ..., 'ci95_high': ..., 'n': 3, ...}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> dict:
    """Mean, sample sd and the two-sided t-interval of the mean (None for n < 2), with the values."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    mean = float(v.mean()) if n else float("nan")
    out: dict = {"mean": mean, "n": n, "sd": None, "ci95_half": None, "ci95_low": None, "ci95_high": None}
    if n >= 2:
        sd = float(v.std(ddof=1))
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n))
        out.update(sd=sd, ci95_half=half, ci95_low=mean - half, ci95_high=mean + half)
    out["values"] = [float(x) for x in v]
    return out
