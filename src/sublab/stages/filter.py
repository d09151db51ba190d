"""Filter stage and the equal-size subsample.

Each data source (the teacher's answers; the reference model's answers to the same prompts, for the
controls) is filtered on its own: <dir>/filter/ holds kept.jsonl (every answer that passed), rejected.jsonl
(with reasons) and filter_stats.json. Then one subsample stage draws the SAME number of examples from
every source, n = min(passed counts, filter.dataset_size), into <dir>/kept.jsonl, so a student and its
control always train on equally many examples. n and the counts are in data/subsample.json.
"""

from __future__ import annotations

import random
from pathlib import Path

from sublab.errors import SublabError
from sublab.filters import run_filter
from sublab.records import atomic_write_json, read_jsonl, write_jsonl
from sublab.schema.filter import FilterConfig


def filter_source(raw: Path, out_dir: Path, cfg: FilterConfig) -> dict:
    """raw.jsonl -> out_dir/{kept,rejected}.jsonl + filter_stats.json, no subsample."""
    return run_filter(raw, out_dir, cfg, subsample=False)


def equal_subsample(
    passed: dict[str, Path], outs: dict[str, Path], dataset_size: int, seed: int, info: Path
) -> dict:
    """Draw n = min(passed counts, dataset_size) records from each source's passed file (seeded by the
    replicate seed and the source name) into outs[source], sorted by prompt index; record n in `info`."""
    data = {name: read_jsonl(p, require_messages=True) for name, p in passed.items()}
    counts = {name: len(recs) for name, recs in data.items()}
    n = min([dataset_size, *counts.values()])
    if n < 1:
        raise SublabError(f"no examples to train on: passed counts {counts}; check the filter stats")
    for name, recs in data.items():
        rng = random.Random(f"equal-subsample:{seed}:{name}")
        chosen = rng.sample(recs, n) if len(recs) > n else list(recs)
        chosen.sort(key=lambda r: r.get("metadata", {}).get("prompt_index", 0))
        write_jsonl(outs[name], chosen)
    summary = {
        "n_per_source": n,
        "dataset_size": dataset_size,
        "passed": counts,
        "limited_by": "dataset_size" if n == dataset_size else min(counts, key=counts.get),
        "seed": seed,
    }
    atomic_write_json(info, summary)
    return summary
