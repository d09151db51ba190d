"""Filter chains: ordered steps, each recording why it removed an answer, then the LLM-judge steps.

    kept, stats = run_chain(raw, out_dir, steps, judges, target="owl")

An answer goes through the rule steps in order and stops at the first that gives reasons (format ->
correctness -> banned words: a cheap rule saves a judge call); the answers left are judged by each
`filter.judges` entry in turn (`sublab judge`'s machinery, cached in out_dir/judge_<prompt>/ so a rerun
resumes). out_dir gets kept.jsonl, rejected.jsonl (each with metadata.step and metadata.reasons) and
filter_stats.json: the counts of the whole chain and, under "steps", each step's n_in, n_removed and
reason categories.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sublab.errors import SublabError
from sublab.filters import banned_word_reasons, read_filter_input
from sublab.records import atomic_write_json, read_jsonl, write_jsonl


@dataclass(frozen=True)
class Step:
    name: str
    kind: str
    """format | correctness | banned words | judge"""
    check: Callable[[str, dict], list[str]]
    """(answer, the record's metadata) -> reasons ([] = pass)."""


def banned_words_step(words: list[str]) -> Step:
    return Step("banned words", "banned words", lambda a, m: banned_word_reasons(a, words))


def reason_category(reason: str) -> str:
    """A reason's kind: its text before the first ':', '(' or quoted word.

    >>> [reason_category(r) for r in ["wrong answer: 7 (reference 8)", "banned word 'owl'", "no <answer> tag"]]
    ['wrong answer', 'banned word', 'no <answer> tag']
    """
    return re.split(r"[:(]| '", reason, maxsplit=1)[0].strip()


def _question(rec: dict) -> str:
    users = [m["content"] for m in rec["messages"][:-1] if m.get("role") == "user"]
    return users[-1] if users else ""


def _step_stats(name: str, kind: str, n_in: int, removed: list[list[str]]) -> dict:
    cats: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for reasons in removed:
        cats.update({reason_category(r) for r in reasons})
        for r in reasons:
            ex = examples.setdefault(reason_category(r), [])
            if len(ex) < 3 and r not in ex:
                ex.append(r)
    return {
        "step": name,
        "kind": kind,
        "n_in": n_in,
        "n_removed": len(removed),
        "reasons": dict(cats.most_common()),
        "reason_examples": examples,
    }


def judge_step(records: list[dict], judge, out: Path, target: str | None, api, progress) -> list[list[str]]:
    """Reasons per record from one judge step (filter.judges entry); [] = keep. Raises when judge calls
    failed (they are not cached: a rerun asks them again), after every finished judgement is cached."""
    from sublab.judge.stage import judge_file

    out.mkdir(parents=True, exist_ok=True)
    samples = out / "samples.jsonl"
    write_jsonl(
        samples,
        [
            {"question": _question(r), "answer": r["messages"][-1]["content"], "id": i}
            for i, r in enumerate(records)
        ],
    )
    summary = judge_file(
        samples, out, judge.model, judge.judge_config(), api=api, progress=progress, target=target
    )
    if summary.get("errors"):
        raise SublabError(
            f"the filter judge {judge.model} failed on {summary['errors']} of {len(records)} answers (see "
            f"{out / 'judgements.jsonl'}); rerun to ask them again: finished judgements are cached"
        )
    reasons = []
    for j in read_jsonl(out / "judgements.jsonl"):
        s = j.get(judge.prompt)
        if s is None:
            why = j["unscorable"].get(judge.prompt, "no score")
            reasons.append([f"judge {judge.prompt} unscorable: {why}"[:300]])
        elif not judge.keeps(s):
            reasons.append([f"judge {judge.prompt}: score {s:.1f} ({judge.rule})"])
        else:
            reasons.append([])
    return reasons


def run_chain(
    raw: str | Path,
    out_dir: str | Path,
    steps: list[Step],
    judges: list = (),
    target: str | None = None,
    api=None,
    progress: bool = False,
    domain: str | None = None,
) -> dict:
    """The filter chain on files: raw.jsonl -> out_dir/{kept,rejected}.jsonl + filter_stats.json."""
    out = Path(out_dir)
    records = read_filter_input(raw)
    alive = list(range(len(records)))
    rejected: dict[int, dict] = {}
    step_stats = []

    def remove(name: str, kind: str, verdicts: dict[int, list[str]]) -> None:
        nonlocal alive
        gone = {i: r for i, r in verdicts.items() if r}
        step_stats.append(_step_stats(name, kind, len(alive), list(gone.values())))
        for i, reasons in gone.items():
            rec = records[i]
            rejected[i] = {**rec, "metadata": {**rec.get("metadata", {}), "step": name, "reasons": reasons}}
        alive = [i for i in alive if i not in gone]

    for step in steps:
        remove(
            step.name,
            step.kind,
            {
                i: step.check(records[i]["messages"][-1]["content"], records[i].get("metadata", {}))
                for i in alive
            },
        )
    for judge in judges:
        name = f"judge {judge.prompt}"
        folder = out / f"judge_{judge.prompt}"
        verdicts = (
            judge_step([records[i] for i in alive], judge, folder, target, api, progress) if alive else []
        )
        remove(name, "judge", dict(zip(alive, verdicts, strict=True)))

    kept = []
    for i in alive:
        rec = records[i]
        msgs = rec["messages"]
        clean = msgs[-1]["content"].strip()
        kept.append({**rec, "messages": [*msgs[:-1], {**msgs[-1], "content": clean}]})
    totals: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for s in step_stats:
        totals.update(s["reasons"])
        for k, v in s["reason_examples"].items():
            examples.setdefault(k, v)
    stats = {
        "domain": domain,
        "n_in": len(records),
        "n_passed": len(kept),
        "n_rejected": len(rejected),
        "pass_rate": len(kept) / len(records) if records else 0.0,
        "n_kept": len(kept),
        "subsample": False,
        "reasons": dict(totals.most_common()),
        "reason_examples": examples,
        "steps": step_stats,
    }
    kept_path = out / "kept.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    kept_path.unlink(missing_ok=True)
    write_jsonl(out / "rejected.jsonl", [rejected[i] for i in sorted(rejected)])
    if kept:
        write_jsonl(kept_path, kept)
    atomic_write_json(out / "filter_stats.json", stats)
    if not kept:
        by_step = ", ".join(f"{s['step']} {s['n_removed']}" for s in step_stats if s["n_removed"])
        raise SublabError(
            f"the filter kept 0 of {len(records)} answers in {raw} (removed by step: {by_step or 'none'}; "
            f"details in {out / 'rejected.jsonl'}); check the teacher's answers or the filter settings"
        )
    return stats
