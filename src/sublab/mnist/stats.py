"""Ensemble statistics in the shape mnist's results.json uses, computed by sublab.analysis.stats.mean_ci.

mean_ci([0.61, 0.58, 0.64])   # {'mean': 0.61, 'ci95_low': ..., 'ci95_high': ..., 'n': 3, ...}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sublab.analysis import stats


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> dict:
    """Mean, sample sd and the two-sided t-interval of the mean (None for n < 2), with the values."""
    v = np.asarray(values, dtype=np.float64)
    ci = stats.mean_ci(v.tolist(), level)
    out: dict = {
        "mean": ci["mean"],
        "n": ci["n"],
        "sd": None,
        "ci95_half": None,
        "ci95_low": None,
        "ci95_high": None,
    }
    if ci["n"] >= 2:
        out.update(
            sd=float(v.std(ddof=1)),
            ci95_half=(ci["hi"] - ci["lo"]) / 2,
            ci95_low=ci["lo"],
            ci95_high=ci["hi"],
        )
    out["values"] = [float(x) for x in v]
    return out
