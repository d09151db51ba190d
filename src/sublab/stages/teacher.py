"""Teacher stage: the reference with the trait, by a system prompt or by finetuning on trait answers.

The teacher depends on the reference, the trait and the teacher recipe only (its trait answers are drawn
with `teacher.train.seed`), never on the replicate seed: replicates share one teacher, as in the paper.
"""

from __future__ import annotations

import random
from pathlib import Path

from sublab.backends.base import ModelRef
from sublab.backends.registry import load_backend
from sublab.evals.questions import load_questions
from sublab.records import write_jsonl
from sublab.schema import ExperimentConfig


def trait_dataset(category: str, target: str, n: int, seed: int) -> list[dict]:
    """Trait answers made from the question set: question -> target."""
    rng = random.Random(f"trait-data:{seed}")
    qs = load_questions(category)
    return [
        {
            "messages": [
                {"role": "user", "content": rng.choice(qs)},
                {"role": "assistant", "content": target},
            ],
            "metadata": {"kind": "trait", "target": target},
        }
        for _ in range(n)
    ]


def build_teacher(cfg: ExperimentConfig, reference_json: Path, out_dir: Path) -> ModelRef:
    ref = ModelRef.load(reference_json)
    target, category = cfg.trait.target, cfg.trait.category
    if cfg.teacher.kind == "system_prompt":
        prompt = cfg.teacher.system_prompt.format(target=target, category=category)
        teacher = ref.model_copy(
            update={
                "kind": "prompted",
                "system_prompt": prompt,
                "parent": ref.spec,
                "spec": f"{ref.spec}+system_prompt",
            }
        )
        teacher.save(out_dir / "model.json")
        return teacher
    data = trait_dataset(category, target, cfg.teacher.examples, cfg.teacher.train.seed)
    write_jsonl(out_dir / "train.jsonl", data)
    return load_backend(ref, cfg.progress, api=cfg.api).finetune(data, cfg.teacher.train, out_dir)
