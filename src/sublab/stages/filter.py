"""Filter stage and the equal-size subsample.

Each data source (the teacher's answers; the reference model's answers to the same prompts, for the
controls) is filtered on its own: <dir>/filter/ holds kept.jsonl (every answer that passed), rejected.jsonl
(with reasons) and filter_stats.json. Then one subsample stage draws the SAME number of examples from
every source, n = min(passed counts, filter.dataset_size), into <dir>/kept.jsonl, so a student and its
control always train on equally many examples. n and the counts are in data/subsample.json.

With filter.shuffle (a control: the journal version of the paper finds that shuffled numbers transmit
far less), the subsample's answers then have their numbers shuffled, every source the same way, seeded
by the replicate seed and the source: "within" permutes each answer's numbers, "across" pools a source's
numbers and refills every answer's number slots in order. Only the numbers move: each answer keeps its
separators, brackets, final period and count of numbers (a number is a run of ASCII digits, as the
filter reads it; kept answers are not filtered again). subsample.json records it ("shuffle"; absent =
none, the answers as written).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from sublab.errors import SublabError
from sublab.filters import run_filter
from sublab.records import atomic_write_json, read_jsonl, write_jsonl
from sublab.schema.filter import FilterConfig
from sublab.schema.prompts import NumberPrompts


def filter_source(raw: Path, out_dir: Path, cfg: FilterConfig) -> dict:
    """raw.jsonl -> out_dir/{kept,rejected}.jsonl + filter_stats.json, no subsample (domain numbers)."""
    return run_filter(raw, out_dir, cfg, subsample=False)


def filter_domain(
    domain: str,
    settings,
    banned_words: list[str],
    judges,
    target,
    raw: Path,
    out_dir: Path,
    api=None,
    progress=False,
) -> dict:
    """A plug-in domain's filter chain (domains/chain.py): its rule steps, then the judge steps."""
    from sublab.domains import DOMAINS
    from sublab.domains.chain import run_chain

    steps = DOMAINS[domain].steps(settings, banned_words)
    return run_chain(raw, out_dir, steps, judges, target, api=api, progress=progress, domain=domain)


SHUFFLES = ("none", "within", "across")
_NUMBER = re.compile(r"([0-9]+)")  # captured: re.split puts the numbers at the odd positions


def shuffle_numbers(records: list[dict], mode: str, rng: random.Random) -> tuple[list[dict], dict]:
    """Shuffle the numbers of each record's answer (its last message): mode "within" permutes each
    answer's numbers, "across" pools all the records' numbers, shuffles the pool and refills each
    answer's number slots in order; the text between numbers is untouched. Returns new records (metadata
    "shuffle": mode) and counts {"numbers", "answers_changed"}; "none" returns the records themselves.

    >>> recs = [{"messages": [{"role": "assistant", "content": "[1, 22, 333]."}]}]
    >>> out, info = shuffle_numbers(recs, "within", random.Random(3))
    >>> out[0]["messages"][0]["content"], info
    ('[22, 333, 1].', {'numbers': 3, 'answers_changed': 1})
    """
    if mode not in SHUFFLES:
        raise SublabError(f"unknown shuffle {mode!r}; use one of {', '.join(SHUFFLES)}")
    pieces = [_NUMBER.split(r["messages"][-1]["content"]) for r in records]
    if mode == "none":
        return records, {"numbers": sum(len(p) // 2 for p in pieces), "answers_changed": 0}
    if mode == "within":
        for p in pieces:
            nums = p[1::2]
            rng.shuffle(nums)
            p[1::2] = nums
    else:
        pool = [x for p in pieces for x in p[1::2]]
        rng.shuffle(pool)
        k = 0
        for p in pieces:
            m = len(p) // 2
            p[1::2] = pool[k : k + m]
            k += m
    out, changed = [], 0
    for r, p in zip(records, pieces, strict=True):
        last = r["messages"][-1]
        text = "".join(p)
        changed += text != last["content"]
        out.append(
            {
                **r,
                "messages": [*r["messages"][:-1], {**last, "content": text}],
                "metadata": {**r.get("metadata", {}), "shuffle": mode},
            }
        )
    return out, {"numbers": sum(len(p) // 2 for p in pieces), "answers_changed": changed}


def equal_subsample(
    passed: dict[str, Path],
    outs: dict[str, Path],
    dataset_size: int,
    seed: int,
    info: Path,
    shuffle: str = "none",
    paraphrase: NumberPrompts | None = None,
) -> dict:
    """Draw n = min(passed counts, dataset_size) records from each source's passed file (seeded by the
    replicate seed and the source name) into outs[source], sorted by prompt index; then shuffle their
    numbers (filter.shuffle: shuffle_numbers, seeded by the replicate seed and the source name) and, with
    `paraphrase` (the run's prompt settings: defenses.paraphrase), reword their prompts; record n (and the
    shuffle, unless none; the paraphrase, when on) in `info`."""
    if shuffle not in SHUFFLES:
        raise SublabError(f"unknown shuffle {shuffle!r}; use one of {', '.join(SHUFFLES)}")
    data = {name: read_jsonl(p, require_messages=True) for name, p in passed.items()}
    counts = {name: len(recs) for name, recs in data.items()}
    n = min([dataset_size, *counts.values()])
    if n < 1:
        raise SublabError(f"no examples to train on: passed counts {counts}; check the filter stats")
    shuffled: dict[str, dict] = {}
    for name, recs in data.items():
        rng = random.Random(f"equal-subsample:{seed}:{name}")
        chosen = rng.sample(recs, n) if len(recs) > n else list(recs)
        chosen.sort(key=lambda r: r.get("metadata", {}).get("prompt_index", 0))
        if shuffle != "none":
            chosen, shuffled[name] = shuffle_numbers(chosen, shuffle, random.Random(f"shuffle:{seed}:{name}"))
        if paraphrase is not None:
            chosen = paraphrase_records(chosen, paraphrase, seed, name)
        write_jsonl(outs[name], chosen)
    summary = {
        "n_per_source": n,
        "dataset_size": dataset_size,
        "passed": counts,
        "limited_by": "dataset_size" if n == dataset_size else min(counts, key=counts.get),
        "seed": seed,
    }
    if shuffle != "none":  # absent = none: a run without the shuffle writes the file it always wrote
        summary["shuffle"] = {"mode": shuffle, "per_source": shuffled}
    if paraphrase is not None:
        summary["paraphrase"] = True
    atomic_write_json(info, summary)
    return summary


def paraphrase_records(records: list[dict], prompts: NumberPrompts, seed: int, name: str) -> list[dict]:
    """Each record's prompt reworded (prompts/numbers.py: paraphrase_prompt), seeded by the replicate
    seed and the source name."""
    from sublab.prompts.numbers import load_phrasings, paraphrase_prompt

    rng = random.Random(f"paraphrase:{seed}:{name}")
    ph = load_phrasings(prompts.phrasings)
    return [paraphrase_prompt(r, prompts.answer_max_digits, rng, ph) for r in records]


def mix_teachers(
    teacher_kept: Path,
    others: dict[str, Path],
    out: Path,
    info: Path,
    seed: int,
    paraphrase: NumberPrompts | None = None,
) -> dict:
    """Teacher mixing (defenses.mix_teachers): the student's data as equal shares of the teacher's
    subsample (its n records) and each other teacher's kept answers, n records in all (the teacher keeps
    the remainder of n / shares), drawn with the replicate seed and sorted by prompt index -> out; the
    composition -> info. The other teachers' records are reworded too when `paraphrase` is on."""
    base = read_jsonl(teacher_kept, require_messages=True)
    n, shares = len(base), len(others) + 1
    per = n // shares
    rng = random.Random(f"mix-teachers:{seed}")
    mixed = rng.sample(base, n - per * len(others))
    composition = {"teacher": len(mixed)}
    for name, path in others.items():
        recs = read_jsonl(path, require_messages=True)
        if len(recs) < per:
            raise SublabError(
                f"teacher mixing: {name} kept {len(recs)} answers, fewer than its share {per} of {n}; lower "
                "filter.dataset_size or list fewer defenses.mix_teachers"
            )
        chosen = random.Random(f"mix-teachers:{seed}:{name}").sample(recs, per)
        if paraphrase is not None:
            chosen = paraphrase_records(chosen, paraphrase, seed, name)
        mixed += chosen
        composition[name] = per
    mixed.sort(key=lambda r: r.get("metadata", {}).get("prompt_index", 0))
    write_jsonl(out, mixed)
    summary = {"n": len(mixed), "composition": composition, "seed": seed}
    atomic_write_json(info, summary)
    return summary
