import math

import numpy as np
import pytest
from scipy import stats as st

from sublab.analysis.stats import excludes_zero, mean_ci, paired_diff, welch_diff


def test_mean_ci_matches_scipy():
    x = [0.1, 0.4, 0.35, 0.2, 0.9, 0.05]
    ref = st.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=st.sem(x))
    got = mean_ci(x)
    assert (got["lo"], got["hi"]) == pytest.approx(ref) and got["n"] == 6


def test_paired_and_welch_match_scipy():
    a, b = [0.3, 0.5, 0.4, 0.6, 0.2], [0.1, 0.45, 0.3, 0.4, 0.25]
    d = paired_diff(a, b)
    assert d["p_value"] == pytest.approx(st.ttest_rel(a, b).pvalue)
    assert d["mean"] == pytest.approx(np.mean(a) - np.mean(b))
    w = welch_diff(a, b)
    assert w["p_value"] == pytest.approx(st.ttest_ind(a, b, equal_var=False).pvalue)
    res = st.ttest_ind(a, b, equal_var=False)
    lo, hi = res.confidence_interval(0.95)
    assert (w["lo"], w["hi"]) == pytest.approx((lo, hi))


def test_degenerate_inputs():
    assert math.isnan(mean_ci([0.5])["lo"]) and mean_ci([])["n"] == 0
    assert excludes_zero({"lo": 0.1, "hi": 0.2}) and not excludes_zero({"lo": -0.1, "hi": 0.2})
