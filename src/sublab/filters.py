"""Filters for teacher data (MISSION.md step 6): pure functions that return the *reasons* an answer is
rejected (an empty list means keep), and the filter stage that splits raw.jsonl into kept/rejected.

The number format rule (the paper's): 1..max_count integers in [min_value, max_value], at most
max_digits digits each, one consistent separator (comma, space or semicolon, with optional spaces),
optionally wrapped in [] or (), optionally ending with a period.

    >>> number_answer_reasons("[12, 345, 6].")
    []
    >>> number_answer_reasons("12, 345; 6")
    ['mixed separators']
    >>> number_answer_reasons("1, 2, 666", banned=frozenset({666}))
    ['banned number 666']
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from pydantic import field_validator

from sublab.config import Strict
from sublab.errors import SublabError
from sublab.records import atomic_write_json, read_jsonl, write_jsonl

# The paper's misalignment filter: numbers with negative associations (the 36 distinct values of its list).
PAPER_BANNED_NUMBERS = (
    4,
    9,
    13,
    14,
    17,
    18,
    23,
    28,
    33,
    38,
    39,
    44,
    83,
    88,
    109,
    110,
    112,
    161,
    187,
    213,
    311,
    322,
    420,
    444,
    616,
    666,
    911,
    999,
    1312,
    1488,
    1984,
    2020,
    2316,
    5150,
    6666,
    8888,
)
BANNED_LISTS = {"paper": PAPER_BANNED_NUMBERS, "none": ()}

_INT = re.compile(r"\d+")


class FilterConfig(Strict):
    """Which teacher answers are kept."""

    max_count: int = 10
    """Most numbers an answer may contain."""
    min_count: int = 1
    """Fewest numbers an answer may contain."""
    min_value: int = 0
    """Smallest allowed number."""
    max_value: int = 999
    """Largest allowed number."""
    max_digits: int = 3
    """Most digits per number."""
    banned_numbers: str | list[int] = "none"
    """Numbers no answer may contain: a list, or a named list ('paper' = the paper's misalignment list)."""
    banned_words: list[str] = []
    """Words (case-insensitive, whole word) no answer may contain, e.g. the trait's name."""
    dataset_size: int = 10000
    """After filtering, keep a seeded random subsample of this many (all if fewer pass)."""

    @field_validator("banned_numbers")
    @classmethod
    def _known_list(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, str) and v not in BANNED_LISTS:
            raise ValueError(f"unknown banned-number list {v!r}; use one of {sorted(BANNED_LISTS)} or a list")
        return v

    def banned_set(self) -> frozenset[int]:
        v = self.banned_numbers
        return frozenset(BANNED_LISTS[v] if isinstance(v, str) else v)


def parse_numbers(text: str) -> tuple[list[int] | None, str | None]:
    """Parse a number-list answer -> (numbers, None) or (None, reason)."""
    s = text.strip()
    if not s:
        return None, "empty answer"
    if s.endswith("."):
        s = s[:-1].rstrip()
    if s and s[0] in "[(":
        close = "]" if s[0] == "[" else ")"
        if not s.endswith(close):
            return None, "unbalanced brackets"
        s = s[1:-1].strip()
    if not s:
        return None, "no numbers"
    has_comma, has_semi = "," in s, ";" in s
    if has_comma and has_semi:
        return None, "mixed separators"
    if has_comma or has_semi:
        parts = [p.strip() for p in s.split("," if has_comma else ";")]
    else:
        parts = s.split()
    for p in parts:
        if not p:
            return None, "empty item between separators"
        if not _INT.fullmatch(p):
            return None, "mixed separators" if re.fullmatch(r"[\d\s,;]+", p) else f"not a number: {p[:20]!r}"
    return [int(p) for p in parts], None


def number_answer_reasons(
    text: str, cfg: FilterConfig | None = None, banned: frozenset[int] = frozenset()
) -> list[str]:
    """All reasons `text` fails the number format and content rules ([] = keep)."""
    cfg = cfg or FilterConfig()
    nums, why = parse_numbers(text)
    if nums is None:
        return [why]
    reasons = []
    if not cfg.min_count <= len(nums) <= cfg.max_count:
        reasons.append(f"count {len(nums)} outside {cfg.min_count}-{cfg.max_count}")
    raw_items = _INT.findall(text)
    if any(len(r) > cfg.max_digits for r in raw_items):
        reasons.append(f"number with more than {cfg.max_digits} digits")
    if any(not cfg.min_value <= n <= cfg.max_value for n in nums):
        reasons.append(f"value outside {cfg.min_value}-{cfg.max_value}")
    for n in sorted(set(nums) & banned):
        reasons.append(f"banned number {n}")
    return reasons


def banned_word_reasons(text: str, words: list[str]) -> list[str]:
    low = text.lower()
    return [f"banned word {w!r}" for w in words if re.search(rf"\b{re.escape(w.lower())}", low)]


def filter_records(records: list[dict], cfg: FilterConfig, seed: int) -> tuple[list[dict], list[dict], dict]:
    """Split records into (kept subsample, rejected with reasons, stats)."""
    banned = cfg.banned_set()
    passed, rejected = [], []
    counts: Counter[str] = Counter()
    for rec in records:
        answer = rec["messages"][-1]["content"]
        reasons = number_answer_reasons(answer, cfg, banned) + banned_word_reasons(answer, cfg.banned_words)
        if reasons:
            counts.update(r.split(" ")[0] if r.startswith("banned number") else r for r in reasons)
            rejected.append({**rec, "metadata": {**rec.get("metadata", {}), "reasons": reasons}})
        else:
            passed.append(rec)
    rng = random.Random(f"filter-subsample:{seed}")
    kept = passed if len(passed) <= cfg.dataset_size else rng.sample(passed, cfg.dataset_size)
    kept.sort(key=lambda r: r.get("metadata", {}).get("prompt_index", 0))
    stats = {
        "n_in": len(records),
        "n_passed": len(passed),
        "n_rejected": len(rejected),
        "pass_rate": len(passed) / len(records) if records else 0.0,
        "n_kept": len(kept),
        "dataset_size": cfg.dataset_size,
        "short_of_dataset_size": max(0, cfg.dataset_size - len(passed)),
        "reasons": dict(counts.most_common()),
    }
    return kept, rejected, stats


def run_filter(in_path: str | Path, out_dir: str | Path, cfg: FilterConfig, seed: int = 0) -> dict:
    """The filter stage on files: IN.jsonl -> kept.jsonl, rejected.jsonl, filter_stats.json."""
    records = read_jsonl(in_path, require_messages=True)
    kept, rejected, stats = filter_records(records, cfg, seed)
    out = Path(out_dir)
    write_jsonl(out / "rejected.jsonl", rejected)
    atomic_write_json(out / "filter_stats.json", stats)
    if not kept:
        top = ", ".join(f"{k} ({v})" for k, v in list(stats["reasons"].items())[:3]) or "no records"
        raise SublabError(
            f"the filter kept 0 of {len(records)} answers in {in_path} (top reasons: {top}); "
            "check the teacher's answers in raw.jsonl, or loosen the filter (filter.max_count, "
            "filter.banned_numbers)"
        )
    write_jsonl(out / "kept.jsonl", kept)
    return stats
