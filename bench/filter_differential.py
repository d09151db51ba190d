"""Differential check of the number filter: the old filter (commit d2e56e6), the new one, and the
paper's rule as written in src/sublab/filters.py's docstring, one representative answer per class of
disagreement (plus ordinary answers), as a markdown table; then the banned-list diff.

    .venv/bin/python bench/filter_differential.py [--old-commit d2e56e6]

The old module is read with `git show COMMIT:src/sublab/filters.py` into a temp file and imported from
there, so this needs the git history (no network, no GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from sublab import filters as new
from sublab.schema.filter import BANNED_LISTS, FilterConfig

ROOT = Path(__file__).resolve().parent.parent

# (class of disagreement, answer, banned list used, the paper's rule: None = keep, else reason category)
ROWS: list[tuple[str, str, str, str | None]] = [
    ("ordinary", "[12, 345, 6].", "none", None),
    ("ordinary", "1;2;3", "none", None),
    ("ordinary", "1 2 3", "none", None),
    ("ordinary", "(1, 2)", "none", None),
    ("ordinary", "1,2,3", "none", None),
    ("ordinary", "[ 1, 2 ]", "none", None),
    ("mixed separators", "12, 345; 6", "none", "separator"),
    ("ordinary", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", "none", "count"),
    ("ordinary", "1000", "none", "digits"),
    ("ordinary", "0999", "none", "digits"),
    ("ordinary", "-5, 3", "none", "not a number"),
    ("ordinary", "1.5, 2", "none", "not a number"),
    ("ordinary", "", "none", "empty"),
    ("non-ASCII digits", "٣, ١٢", "none", "non-ascii digit"),
    ("non-ASCII digits", "１２, ３４", "none", "non-ascii digit"),
    ("non-ASCII digits", "१२ ३", "none", "non-ascii digit"),
    ("thousands separator", "12, 5,678", "none", "thousands separator"),
    ("thousands separator", "1,234", "none", "thousands separator"),
    ("thousands separator", "100,200,300", "none", "thousands separator"),
    ("not a grouping: a list", "5,17,300", "none", None),
    ("uneven separators", "1 2  3", "none", "separator"),
    ("uneven separators", "1\t2 3", "none", "separator"),
    ("uneven separators", "1, 2,3", "none", "separator"),
    ("bad separator", "1  2  3", "none", "separator"),
    ("bad separator", "1\n2\n3", "none", "separator"),
    ("stray bracket", "1, 2]", "none", "brackets"),
    ("surrounding whitespace", "  5, 6 \n", "none", None),
    ("huge number", "7" * 4301, "none", "digits"),
    ("paper banned list: added", "42, 7", "paper", "banned number"),
    ("paper banned list: added", "7, 555", "paper", "banned number"),
    ("paper banned list: wrongly banned", "9, 17", "paper", None),
    ("paper banned list: wrongly banned", "28, 7", "paper", None),
]


NOTES = [
    "`1,234`, `100,200,300`: that parser reads lists [1, 234], [100, 200, 300]; we reject them as possible "
    "thousands separators (`12, 5,678` both reject: uneven separators there)",
    "`1  2  3`, `1\\n2\\n3`: that parser accepts any consistent whitespace; the rule allows one space only",
    "`0999`: that parser checks values only (999); the rule also limits digits to 3",
    "`[ 1, 2 ]` and surrounding whitespace: that parser rejects them; we keep them (stripped for training)",
]


def load_old(commit: str) -> ModuleType:
    src = subprocess.run(
        ["git", "show", f"{commit}:src/sublab/filters.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tmp = Path(tempfile.mkdtemp(prefix="old_filters_")) / "old_filters.py"
    tmp.write_text(src, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("old_filters", tmp)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_filters"] = mod  # pydantic resolves the module's annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def verdict(mod: ModuleType, answer: str, banned: str) -> str:
    cfg = mod.FilterConfig(banned_numbers=banned)
    try:
        reasons = mod.number_answer_reasons(answer, cfg, cfg.banned_set())
    except Exception as e:  # the old parser can crash (int() on 4,301+ digits)
        return f"crash ({type(e).__name__})"
    if not reasons:
        return "keep"
    first = reasons[0]
    return "reject: " + (new.reason_category(first) if mod is new else first[:40])


def show(answer: str) -> str:
    s = answer if len(answer) <= 24 else f"{answer[:6]}...({len(answer)} chars)"
    return "`" + repr(s)[1:-1].replace("|", "\\|") + "`"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-commit", default="d2e56e6")
    args = ap.parse_args()
    old = load_old(args.old_commit)

    print(f"Number filter: old ({args.old_commit}) vs new vs the paper's rule\n")
    print("| class | answer | banned | old | new | paper's rule | new = rule |")
    print("|---|---|---|---|---|---|---|")
    agree = 0
    for cls, answer, banned, rule in ROWS:
        o, n = verdict(old, answer, banned), verdict(new, answer, banned)
        want = "keep" if rule is None else f"reject: {rule}"
        ok = n == want
        agree += ok
        if n == "keep":
            kept, _, _ = new.filter_records([_rec(answer)], FilterConfig(banned_numbers=banned), 0)
            if kept[0]["messages"][-1]["content"] != answer:
                n += f" as {show(kept[0]['messages'][-1]['content'])}"
        print(f"| {cls} | {show(answer)} | {banned} | {o} | {n} | {want} | {'yes' if ok else 'NO'} |")
    print(f"\nnew filter agrees with the rule on {agree}/{len(ROWS)} rows")

    print("\nWhere the written rule knowingly differs from the paper's released parser (as we read it):")
    for note in NOTES:
        print(f"- {note}")

    o, n = set(old.BANNED_LISTS["paper"]), set(BANNED_LISTS["paper"])
    print("\nBanned list 'paper': old vs new\n")
    print(f"- old: {len(o)} values; new: {len(n)} values; in both: {len(o & n)}")
    print(f"- missing from the old list ({len(n - o)}): {sorted(n - o)}")
    print(f"- extra in the old list, wrongly banned ({len(o - n)}): {sorted(o - n)}")
    return 0 if agree == len(ROWS) else 1


def _rec(answer: str) -> dict:
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}


if __name__ == "__main__":
    sys.exit(main())
