"""Confidence intervals and comparisons against controls. Pure functions over lists of floats.

>>> m = mean_ci([0.1, 0.2, 0.3]); round(m["mean"], 3), m["n"]
(0.2, 3)
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as st


def mean_ci(values: list[float], confidence: float = 0.95) -> dict:
    """Mean and a Student-t confidence interval over independent units (questions, seeds)."""
    x = np.asarray(values, dtype=float)
    n = int(x.size)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": 1}
    sem = float(x.std(ddof=1) / math.sqrt(n))
    half = float(st.t.ppf(0.5 + confidence / 2, n - 1) * sem)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def paired_diff(a: list[float], b: list[float], confidence: float = 0.95) -> dict:
    """a - b paired by unit (e.g. the same questions): mean difference, t CI, two-sided p-value."""
    if len(a) != len(b):
        raise ValueError("paired_diff needs equal-length lists")
    d = np.asarray(a, float) - np.asarray(b, float)
    out = mean_ci(d.tolist(), confidence)
    varies = len(d) > 1 and d.std() > 1e-12 * max(1.0, abs(float(d.mean())))  # not float noise
    out["p_value"] = float(st.ttest_rel(a, b).pvalue) if varies else math.nan
    return out


def welch_diff(a: list[float], b: list[float], confidence: float = 0.95) -> dict:
    """a - b for independent groups (e.g. student seeds vs control seeds): Welch t CI and p-value."""
    xa, xb = np.asarray(a, float), np.asarray(b, float)
    diff = float(xa.mean() - xb.mean())
    va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"mean": diff, "lo": diff, "hi": diff, "n": [len(xa), len(xb)], "p_value": math.nan}
    dof = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    half = float(st.t.ppf(0.5 + confidence / 2, dof) * se)
    p = float(st.ttest_ind(xa, xb, equal_var=False).pvalue)
    return {"mean": diff, "lo": diff - half, "hi": diff + half, "n": [len(xa), len(xb)], "p_value": p}


def excludes_zero(ci: dict) -> bool:
    return bool(ci["lo"] > 0 or ci["hi"] < 0)


def compare_seeds(student: list[float], control: list[float]) -> dict:
    """Student vs control across seeds, paired by seed (one control per seed): mean difference with a
    paired t CI, paired t-test, Welch t-test, exact/Monte-Carlo permutation test (swaps within pairs),
    and Cohen's d_z (mean difference / sd of differences)."""
    a, b = np.asarray(student, float), np.asarray(control, float)
    d = a - b
    out = mean_ci(d.tolist())
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    out["cohens_dz"] = float(d.mean() / sd) if n > 1 and sd > 0 else math.nan
    out["p_paired_t"] = float(st.ttest_rel(a, b).pvalue) if n > 1 and sd > 0 else math.nan
    out["p_welch"] = float(st.ttest_ind(a, b, equal_var=False).pvalue) if n > 1 else math.nan
    if n > 1 and np.any(d != 0):
        res = st.permutation_test(
            (a, b),
            lambda x, y, axis: np.mean(x - y, axis=axis),
            permutation_type="samples",
            n_resamples=9999,
            alternative="two-sided",
            random_state=0,
        )
        out["p_permutation"] = float(res.pvalue)
    else:
        out["p_permutation"] = math.nan
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN), in the input order.

    >>> [round(p, 3) for p in holm([0.01, 0.04, 0.03])]
    [0.03, 0.06, 0.06]
    """
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    adj = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adj[i] = running
    return adj
