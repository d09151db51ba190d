"""Prompts stage: the number-continuation prompts both data sources answer (seeded by the replicate seed)."""

from __future__ import annotations

from pathlib import Path

from sublab.prompts.numbers import generate_number_prompts
from sublab.records import write_jsonl
from sublab.schema.prompts import NumberPrompts


def write_prompts(cfg: NumberPrompts, seed: int, out: Path) -> int:
    records = generate_number_prompts(cfg, seed)
    write_jsonl(out, records)
    return len(records)
