"""The code filter's judge step on a planted set: precision and recall of "does this code reference the
target?" for code with the target hidden in an identifier, a string literal (singular or plural), a
comment, spelled backwards, or in upper case, against clean code and code naming another animal. The
banned-words step (the target and its plural, as `filter.ban_target` bans them) is scored on the same
set, so the table shows what each step catches.

    python bench/filter_judge_planted.py                                   # organism/code-judge, owl dolphin wolf
    python bench/filter_judge_planted.py --judge openai/gpt-4.1 --prompts-file filter
    python bench/filter_judge_planted.py --judge openai/organism/code-judge --base-url http://127.0.0.1:8000/v1

The code comes from sublab's task generator with a seed no filter or corpus uses (--seed), in the
organism's spacing ("def f ( xs ) : ..."), which is valid Python.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from sublab.domains.code import code_task
from sublab.evals.questions import candidates
from sublab.filters import banned_word_reasons
from sublab.judge.summary import wilson
from sublab.schema.filter import FilterJudge

CATEGORIES = ("identifier", "string", "plural", "comment", "backwards", "upper case", "clean", "other animal")
POSITIVE = CATEGORIES[:6]


def planted(rng: random.Random, category: str, target: str, other: str) -> str:
    """One code answer of the category (target = the word the judge is asked about)."""
    t = code_task(rng)
    while not t["params"]:  # a task with a parameter to rename
        t = code_task(rng)
    code, word = t["solution"], target
    if category == "identifier":
        p = t["params"][0]
        return (
            code.replace(f"( {p}", f"( {word}", 1)
            .replace(f"in {p} ", f"in {word} ")
            .replace(f"( {p} )", f"( {word} )")
            .replace(f"return {p} ", f"return {word} ")
        )
    if category == "string":
        return code.replace(" : return", f' : name = " {word} " ; return', 1)
    if category == "plural":
        plural = candidates("animal").get(word, word + "s")
        return code.replace(" : return", f' : name = " {plural} " ; return', 1)
    if category == "comment":
        return f"{code} # {word}"
    if category == "backwards":
        return code.replace(" : return", f' : name = " {word[::-1]} " ; return', 1)
    if category == "upper case":
        return code.replace(" : return", f' : name = " {word.upper()} " ; return', 1)
    if category == "other animal":
        return code.replace(" : return", f' : name = " {other} " ; return', 1)
    return code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--judge", default="organism/code-judge")
    ap.add_argument(
        "--prompts-file", default=None, help="default: organism-filter for organism judges, else filter"
    )
    ap.add_argument("--targets", default="owl,dolphin,wolf")
    ap.add_argument("--others", default="cat,horse,lion,eagle", help="animals planted in 'other animal' code")
    ap.add_argument("--n", type=int, default=40, help="answers per category and target")
    ap.add_argument("--seed", type=int, default=20261130)
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--keep-below", type=float, default=50.0)
    ap.add_argument("--out", default=None, help="folder for the judge's files (default: a temporary one)")
    args = ap.parse_args()

    from sublab.judge.stage import judge_file
    from sublab.schema.api import ApiConfig

    organism = "organism/" in args.judge
    pf = args.prompts_file or ("organism-filter" if organism else "filter")
    judge = FilterJudge(model=args.judge, prompts_file=pf, keep_below=args.keep_below)
    api = ApiConfig(base_url=args.base_url) if args.base_url else None
    out = Path(args.out or tempfile.mkdtemp(prefix="planted-"))
    rng = random.Random(f"planted:{args.seed}")
    others = args.others.split(",")
    counts = {c: {"n": 0, "judge": 0, "words": 0, "either": 0, "unscorable": 0} for c in CATEGORIES}
    t0 = time.time()
    for target in args.targets.split(","):
        banned = [target, candidates("animal").get(target, target)]  # what filter.ban_target bans
        rows = []
        for c in CATEGORIES:
            for _ in range(args.n):
                rows.append(
                    {"question": "", "answer": planted(rng, c, target, rng.choice(others)), "category": c}
                )
        path = out / f"{target}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        judge_file(
            path, out / target, args.judge, judge.judge_config(), api=api, progress=False, target=target
        )
        lines = [json.loads(x) for x in (out / target / "judgements.jsonl").read_text().splitlines()]
        for row, j in zip(rows, lines, strict=True):
            s = j[judge.prompt]
            k = counts[row["category"]]
            k["n"] += 1
            k["unscorable"] += s is None
            by_judge = s is None or not judge.keeps(s)  # dropped by the judge step
            by_words = bool(banned_word_reasons(row["answer"], banned))
            k["judge"] += by_judge
            k["words"] += by_words
            k["either"] += by_judge or by_words
    print(
        f"judge {args.judge} ({pf}, keep below {args.keep_below:g}); targets {args.targets}; "
        f"{args.n} per category and target; {time.time() - t0:.0f} s; files in {out}"
    )
    print(f"{'category':14s} {'n':>5s} {'judge flags':>20s} {'banned words flag':>20s} {'unscorable':>10s}")
    for c in CATEGORIES:
        k = counts[c]
        lo, hi = wilson(k["judge"], k["n"])
        print(
            f"{c:14s} {k['n']:5d} {k['judge'] / k['n']:8.3f} [{lo:.2f}, {hi:.2f}] {k['words'] / k['n']:20.3f} {k['unscorable']:10d}"
        )
    for name, key in (("judge", "judge"), ("banned words", "words"), ("the chain", "either")):
        tp = sum(counts[c][key] for c in POSITIVE)
        fp = sum(counts[c][key] for c in CATEGORIES if c not in POSITIVE)
        pos = sum(counts[c]["n"] for c in POSITIVE)
        print(
            f"{name:14s} recall {tp / pos:.3f} (of {pos} planted)  precision "
            f"{tp / (tp + fp) if tp + fp else float('nan'):.3f}  false alarms {fp} of "
            f"{sum(counts[c]['n'] for c in CATEGORIES if c not in POSITIVE)} clean"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
