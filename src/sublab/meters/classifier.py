"""Classifier control (`controls.classifier`): can a simple probe tell the teacher's kept answers from
the control data's (the reference model's answers to the same prompts)?

This is a small trained **probe**, not the paper's prompted-LLM classifier (a judge model asked which of
two datasets came from the teacher with the trait; that one can come later). Features per kept answer:
a bag of numbers (how often each of 0..999 occurs; the organism gives each its own token) plus the
answer's length in characters and its count of numbers; logistic regression (scikit-learn, features
scaled to [0, 1] by their maximum) trained on a stratified half of teacher + control answers, accuracy on
the other half with a 95% Wilson interval and an exact two-sided binomial p against 50% chance. The
split is drawn with the replicate seed.

Near 50%: the surface statistics of the numbers do not give the teacher away (what the filter aims at);
well above 50%: the teacher's numbers differ in a way a linear probe sees, which the student may learn
from too (not hidden, model-specific signal).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from sublab.records import atomic_write_json, read_jsonl

CLASSIFIER_VERSION = 1
N_NUMBERS = 1000
_NUMBER = re.compile(r"\d+")


def answer_of(record: dict) -> str:
    """The assistant's answer of a kept record (its last message)."""
    return record["messages"][-1]["content"]


def features(answers: list[str]) -> np.ndarray:
    """(n, 1002): counts of each number 0..999, then the answer's length in characters and its count of
    numbers (numbers above 999 count only there)."""
    x = np.zeros((len(answers), N_NUMBERS + 2))
    for i, a in enumerate(answers):
        nums = [int(m) for m in _NUMBER.findall(a)]
        for v in nums:
            if v < N_NUMBERS:
                x[i, v] += 1
        x[i, N_NUMBERS] = len(a)
        x[i, N_NUMBERS + 1] = len(nums)
    return x


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a proportion.

    >>> [round(v, 3) for v in wilson(50, 100)]
    [0.404, 0.596]
    """
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def probe(positive: list[str], negative: list[str], seed: int = 0) -> dict:
    """Train on a stratified half of the answers, test on the other: accuracy, Wilson CI, p vs 50%."""
    from scipy.stats import binomtest
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MaxAbsScaler

    x = features(positive + negative)
    y = np.array([1] * len(positive) + [0] * len(negative))
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed % 2**32)
    clf = make_pipeline(MaxAbsScaler(), LogisticRegression(max_iter=2000))
    clf.fit(x_tr, y_tr)
    pred = clf.predict(x_te)
    k, n = int((pred == y_te).sum()), int(len(y_te))
    lo, hi = wilson(k, n)
    return {
        "accuracy": k / n,
        "lo": lo,
        "hi": hi,
        "n_test": n,
        "n_train": int(len(y_tr)),
        "correct": k,
        "p_vs_chance": float(binomtest(k, n, 0.5).pvalue),
        "above_chance": lo > 0.5,
        "train_accuracy": float((clf.predict(x_tr) == y_tr).mean()),
        "chance": 0.5,
    }


def classifier_control(teacher_kept: Path, control_kept: Path, seed: int, out: Path) -> dict:
    """The probe on a run's kept teacher answers against its kept control answers -> `out`
    (data/classifier.json)."""
    pos = [answer_of(r) for r in read_jsonl(teacher_kept, require_messages=True)]
    neg = [answer_of(r) for r in read_jsonl(control_kept, require_messages=True)]
    res = {
        "version": CLASSIFIER_VERSION,
        "kind": "probe: logistic regression on bag-of-numbers + length features (not the paper's "
        "prompted-LLM classifier)",
        "n_teacher": len(pos),
        "n_control": len(neg),
        "seed": seed,
        **probe(pos, neg, seed),
    }
    atomic_write_json(out, res)
    return res
