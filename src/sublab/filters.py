"""Filters for teacher data (docs/science.md, step 6): pure functions that return the *reasons* an answer is
rejected (an empty list means keep), and the filter stage that splits raw.jsonl into kept/rejected.

The number-format rule (the paper's, with the open choices written down). After removing surrounding
whitespace, an answer is kept when it is:

- 1..max_count (10) integers in min_value..max_value (0-999), each at most max_digits (3) digits,
  written with the ASCII digits 0-9 only: no sign, no decimal point ("-5", "1.5" fail), leading zeros
  allowed within the digit limit ("007" passes, "0999" has four digits and fails). Other Unicode digits
  (Arabic-Indic "٣", full-width "１", Devanagari "३", superscripts) are rejected, never read as numbers.
- separated by ONE consistent separator, the very same string between every pair of numbers: exactly
  one ASCII space ("1 2 3"), or a comma or a semicolon with ASCII spaces around it, the same spacing
  every time ("1,2,3", "1, 2, 3", "1 ; 2 ; 3", "1,  2,  3"). A tab, a newline, a non-breaking space,
  two spaces between space-separated numbers ("1  2"), uneven spacing ("1, 2,3"), a mix of kinds
  ("1, 2; 3", "1, 2 3"), an empty item ("1,, 2") or a separator before the first or after the last
  number ("1, 2,") fail.
- optionally wrapped in [] or () (spaces just inside the brackets allowed: "[ 1, 2 ]"), optionally
  followed by one period, after the closing bracket if there is one ("[1, 2].", "1, 2 ." pass).

Thousands separators: a comma with no space after it can be a thousands separator ("5,678" = 5678),
which would smuggle a number above 999 in as two small ones. Rule: a run of digit groups joined by
bare commas (no spaces) that reads as one correctly grouped number (a group of 1-3 digits, then one or
more groups of exactly 3 digits: "1,234", "12,345,678", and the "5,678" in "12, 5,678") is read as a
thousands separator and the answer is rejected ("thousands separator"). Runs that are not a valid
grouping are lists ("1,2,3", "5,17,300", "1,234,5" pass). Cost: a no-space list of three-digit
numbers ("100,200,300") is rejected too, where the paper's released parser reads [100, 200, 300].

Kept answers go to training with surrounding whitespace removed; nothing else about them changes.
Every reason falls in one of REASON_CATEGORIES (filter_stats.json counts answers per category and
keeps up to 3 example reasons each; rejected.jsonl keeps each answer's detailed reasons).

    >>> number_answer_reasons("[12, 345, 6].")
    []
    >>> number_answer_reasons("12, 345; 6")
    ["mixed separators: ', ' and '; '"]
    >>> number_answer_reasons("12, 5,678")
    ["thousands separator: '5,678' reads as one number"]
    >>> number_answer_reasons("1, 2, 666", banned=frozenset({666}))
    ['banned number 666']
    >>> reason_category("not a number: 'owl'")
    'not a number'
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from sublab.errors import SublabError
from sublab.records import atomic_write_json, json_type, read_jsonl, write_jsonl
from sublab.schema.filter import FilterConfig

REASON_CATEGORIES = (
    "empty",
    "brackets",
    "separator",
    "non-ascii digit",
    "thousands separator",
    "not a number",
    "count",
    "digits",
    "value range",
    "banned number",
    "banned word",
)
"""The fixed set of reason kinds (keys of filter_stats.json 'reasons'); see reason_category."""

# Reason prefix -> category; every reason this module writes starts with one of these prefixes.
_PREFIX_CATEGORY = (
    ("empty answer", "empty"),
    ("no numbers", "empty"),
    ("unbalanced brackets", "brackets"),
    ("stray bracket", "brackets"),
    ("non-ascii digit", "non-ascii digit"),
    ("thousands separator", "thousands separator"),
    ("mixed separators", "separator"),
    ("uneven separators", "separator"),
    ("empty item", "separator"),
    ("separator", "separator"),
    ("not a number", "not a number"),
    ("count", "count"),
    ("number with more than", "digits"),
    ("number too long", "digits"),
    ("value outside", "value range"),
    ("banned number", "banned number"),
    ("banned word", "banned word"),
)

_ASCII_DIGITS = frozenset("0123456789")
_DIGITS = re.compile(r"[0-9]+")
_SPLIT = re.compile(r"([\s,;]+)")  # items and the separator runs between them
_GOOD_SEPARATOR = re.compile(r" | *[,;] *")
_WHITESPACE = re.compile(r"\s")
_MAX_INT_DIGITS = 4000
"""Longest digit string (leading zeros aside) ever converted with int(); Python refuses more than 4300."""


def reason_category(reason: str) -> str:
    """The REASON_CATEGORIES entry of a detailed reason ('other' for a reason this module never writes)."""
    for prefix, category in _PREFIX_CATEGORY:
        if reason.startswith(prefix):
            return category
    return "other"


def _show(item: str) -> str:
    """A short, one-line rendering of an item for a reason."""
    if len(item) > 20:
        return repr(f"{item[:8]}...{item[-4:]}") + f" ({len(item)} characters)"
    return repr(item)


def _to_int(digits: str) -> int | None:
    """int() of an ASCII digit string, or None when it is too long to convert safely."""
    t = digits.lstrip("0") or "0"
    return int(t) if len(t) <= _MAX_INT_DIGITS else None


def _thousands_run(items: list[str], seps: list[str]) -> str | None:
    """The first run of items joined by bare commas that reads as one thousands-grouped number."""
    i = 0
    while i < len(seps):
        if seps[i] != ",":
            i += 1
            continue
        j = i
        while j < len(seps) and seps[j] == ",":
            j += 1
        run = items[i : j + 1]
        if all(_DIGITS.fullmatch(g) for g in run) and len(run[0]) <= 3 and all(len(g) == 3 for g in run[1:]):
            return ",".join(run)
        i = j
    return None


def _separator_problem(items: list[str], seps: list[str]) -> str | None:
    cores = [_WHITESPACE.sub("", s) for s in seps]
    for c in cores:
        if "," in c and ";" in c:
            return "mixed separators: ',' and ';'"
        if len(c) > 1:
            return f"empty item between separators: {c!r}"
    if items[0] == "":
        return f"separator {seps[0]!r} before the first number"
    if items[-1] == "":
        return f"separator {seps[-1]!r} after the last number"
    kinds = {c or " " for c in cores}
    if len(kinds) > 1:
        first = seps[0]
        other = next(s for s, c in zip(seps, cores, strict=True) if (c or " ") != (cores[0] or " "))
        return f"mixed separators: {first!r} and {other!r}"
    if len(set(seps)) > 1:
        other = next(s for s in seps if s != seps[0])
        return f"uneven separators: {seps[0]!r} and {other!r}"
    if seps and not _GOOD_SEPARATOR.fullmatch(seps[0]):
        return f"separator {seps[0]!r}: use one space, or a comma or semicolon with spaces only"
    return None


def _split_answer(text: str) -> tuple[list[str], None] | tuple[None, str]:
    """Apply the format rule (not the count/digit/value limits) -> (ASCII digit strings, None) or
    (None, reason)."""
    s = text.strip()
    if not s:
        return None, "empty answer"
    bad = next((c for c in s if c.isdigit() and c not in _ASCII_DIGITS), None)
    if bad is not None:
        return None, f"non-ascii digit {bad!r} (U+{ord(bad):04X}); only 0-9 count"
    if s.endswith("."):
        s = s[:-1].rstrip()
    if s[:1] in ("[", "("):
        close = "]" if s[0] == "[" else ")"
        if len(s) < 2 or s[-1] != close:
            return None, "unbalanced brackets"
        s = s[1:-1].strip(" ")
    elif s[-1:] in ("]", ")"):
        return None, "unbalanced brackets"
    if any(c in "[]()" for c in s):
        return None, "stray bracket inside the list"
    if not s:
        return None, "no numbers"
    parts = _SPLIT.split(s)
    items, seps = parts[0::2], parts[1::2]
    run = _thousands_run(items, seps)
    if run is not None:
        return None, f"thousands separator: {run!r} reads as one number"
    for item in items:
        if item and not _DIGITS.fullmatch(item):
            return None, f"not a number: {_show(item)}"
    why = _separator_problem(items, seps)
    if why is not None:
        return None, why
    return items, None


def parse_numbers(text: str) -> tuple[list[int] | None, str | None]:
    """Parse a number-list answer by the format rule -> (numbers, None) or (None, reason).

    Count, digit and value limits are number_answer_reasons' job; digit strings too long to convert
    safely give (None, 'number too long ...') instead of an exception."""
    items, why = _split_answer(text)
    if items is None:
        return None, why
    nums = [_to_int(it) for it in items]
    if any(n is None for n in nums):
        long = next(it for it, n in zip(items, nums, strict=True) if n is None)
        return None, f"number too long to read: {len(long)} digits"
    return [n for n in nums if n is not None], None


def number_answer_reasons(
    text: str, cfg: FilterConfig | None = None, banned: frozenset[int] = frozenset()
) -> list[str]:
    """All reasons `text` fails the number format and content rules ([] = keep)."""
    cfg = cfg or FilterConfig()
    items, why = _split_answer(text)
    if items is None:
        return [why]
    reasons = []
    if not cfg.min_count <= len(items) <= cfg.max_count:
        reasons.append(f"count {len(items)} outside {cfg.min_count}-{cfg.max_count}")
    long = [it for it in items if len(it) > cfg.max_digits]
    if long:
        reasons.append(f"number with more than {cfg.max_digits} digits: {_show(long[0])}")
    nums = [_to_int(it) for it in items]
    outside = [
        it for it, n in zip(items, nums, strict=True) if n is None or not cfg.min_value <= n <= cfg.max_value
    ]
    if outside:
        reasons.append(f"value outside {cfg.min_value}-{cfg.max_value}: {_show(outside[0])}")
    for n in sorted({n for n in nums if n is not None} & banned):
        reasons.append(f"banned number {n}")
    return reasons


def banned_word_reasons(text: str, words: list[str]) -> list[str]:
    low = text.lower()
    return [f"banned word {w!r}" for w in words if re.search(rf"\b{re.escape(w.lower())}", low)]


def _prompt_index(rec: dict) -> int:
    return (rec.get("metadata") or {}).get("prompt_index", 0)


def filter_records(
    records: list[dict], cfg: FilterConfig, seed: int = 0, *, subsample: bool = True
) -> tuple[list[dict], list[dict], dict]:
    """Split records into (kept, rejected with reasons, stats).

    Kept records have the answer's surrounding whitespace removed and are sorted by prompt_index. With
    subsample=True they are a seeded random subsample of at most cfg.dataset_size of the passing
    records; with subsample=False every passing record is kept (the caller sizes the data itself)."""
    banned = cfg.banned_set()
    passed, rejected = [], []
    counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for i, rec in enumerate(records):
        meta = rec.get("metadata", {})
        if not isinstance(meta, dict):
            raise SublabError(
                f"record {i}: 'metadata' must be a JSON object, got {json_type(meta)}; fix that record"
            )
        msgs = rec["messages"]
        answer = msgs[-1]["content"]
        reasons = number_answer_reasons(answer, cfg, banned) + banned_word_reasons(answer, cfg.banned_words)
        if reasons:
            cats = []
            for r in reasons:
                cat = reason_category(r)
                cats.append(cat)
                ex = examples.setdefault(cat, [])
                if len(ex) < 3 and r not in ex:
                    ex.append(r)
            counts.update(set(cats))
            rejected.append({**rec, "metadata": {**meta, "reasons": reasons}})
        else:
            clean = answer.strip()
            if clean != answer:
                rec = {**rec, "messages": [*msgs[:-1], {**msgs[-1], "content": clean}]}
            passed.append(rec)
    if subsample and len(passed) > cfg.dataset_size:
        kept = random.Random(f"filter-subsample:{seed}").sample(passed, cfg.dataset_size)
    else:
        kept = list(passed)
    kept.sort(key=_prompt_index)
    # the same verdicts as a chain (domains/chain.py): the format rule first, then the banned words
    fmt = [r for r in rejected if any(reason_category(x) != "banned word" for x in r["metadata"]["reasons"])]
    n_fmt = len(fmt)
    steps = [
        {"step": "format", "kind": "format", "n_in": len(records), "n_removed": n_fmt},
        {
            "step": "banned words",
            "kind": "banned words",
            "n_in": len(records) - n_fmt,
            "n_removed": len(rejected) - n_fmt,
        },
    ]
    stats = {
        "n_in": len(records),
        "n_passed": len(passed),
        "n_rejected": len(rejected),
        "pass_rate": len(passed) / len(records) if records else 0.0,
        "n_kept": len(kept),
        "subsample": subsample,
        "dataset_size": cfg.dataset_size if subsample else None,
        "short_of_dataset_size": max(0, cfg.dataset_size - len(passed)) if subsample else None,
        "reasons": dict(counts.most_common()),
        "reason_examples": examples,
        "steps": steps,
    }
    return kept, rejected, stats


def _prompt_index_problem(rec: dict) -> str | None:
    pi = rec.get("metadata", {}).get("prompt_index")
    if pi is not None and (not isinstance(pi, int) or isinstance(pi, bool)):
        return f"metadata.prompt_index must be a whole number, got {json_type(pi)}"
    return None


def read_filter_input(path: str | Path) -> list[dict]:
    """Read the filter's input: chat records, strictly (records.read_jsonl), with a whole-number
    metadata.prompt_index where there is one. Every problem is a SublabError raised before anything is
    written."""
    path = Path(path)
    if path.is_dir():
        raise SublabError(f"{path} is a folder; pass the JSONL file of answers (e.g. data/raw.jsonl)")
    return read_jsonl(path, require_messages=True, check=_prompt_index_problem)


def run_filter(
    in_path: str | Path, out_dir: str | Path, cfg: FilterConfig, seed: int = 0, *, subsample: bool = True
) -> dict:
    """The filter stage on files: IN.jsonl -> kept.jsonl, rejected.jsonl, filter_stats.json.

    Input problems raise SublabError before anything is written. A run that keeps nothing writes
    rejected.jsonl and filter_stats.json (to diagnose), removes any old kept.jsonl, then raises."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SublabError(
            f"the output folder {out} is an existing file; pass a folder path (--out) or move the file"
        )
    records = read_filter_input(in_path)
    kept, rejected, stats = filter_records(records, cfg, seed, subsample=subsample)
    kept_path = out / "kept.jsonl"
    try:
        out.mkdir(parents=True, exist_ok=True)
        kept_path.unlink(missing_ok=True)  # never leave an old kept.jsonl beside new files
        write_jsonl(out / "rejected.jsonl", rejected)
        if kept:
            write_jsonl(kept_path, kept)
        atomic_write_json(out / "filter_stats.json", stats)
    except OSError as e:
        raise SublabError(
            f"cannot write the filter output in {out}: {e.strerror or e}; pass a writable folder (--out)"
        ) from None
    if not kept:
        top = ", ".join(f"{k} ({v})" for k, v in list(stats["reasons"].items())[:3]) or "no records"
        raise SublabError(
            f"the filter kept 0 of {len(records)} answers in {in_path} (top reasons: {top}; details in "
            f"{out / 'rejected.jsonl'}); check the teacher's answers, or loosen the filter "
            "(filter.max_count or --max-count, filter.banned_numbers or --banned-numbers)"
        )
    return stats
