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
    """The number prompts: generated, or read from `cfg.file` (unusable lines recorded beside `out` in
    prompt_problems.jsonl)."""
    if cfg.file:
        from sublab.domains.prompt_file import read_prompt_file
        from sublab.prompts.numbers import number_prompt_from_line

        records, problems = read_prompt_file(cfg.file, number_prompt_from_line, cfg.count, seed)
        write_jsonl(out.with_name("prompt_problems.jsonl"), problems)
    else:
        records = generate_number_prompts(cfg, seed)
    write_jsonl(out, records)
    return len(records)
