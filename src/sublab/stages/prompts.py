"""Prompts stage: the prompts every data source answers (seeded by the replicate seed): number
continuations (domain numbers), or a plug-in domain's prompts (sublab/domains/: code, cot)."""

from __future__ import annotations

from pathlib import Path

from sublab.domains import write_domain_prompts
from sublab.prompts.numbers import generate_number_prompts
from sublab.records import write_jsonl
from sublab.schema.prompts import NumberPrompts

__all__ = ["write_domain_prompts", "write_prompts"]


def write_prompts(cfg: NumberPrompts, seed: int, out: Path) -> int:
    records = generate_number_prompts(cfg, seed)
    write_jsonl(out, records)
    return len(records)
