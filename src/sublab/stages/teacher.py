"""Teacher stage: the reference with the trait, by a system prompt or by finetuning on trait answers
(or on `teacher.data`: the organism world's narrow datasets, or a JSONL file). Control teachers
(`controls.control_teachers`) are finetuned the same way on their own data.

The teacher depends on the reference, the trait and the teacher recipe only (its trait answers are drawn
with `teacher.train.seed`), never on the replicate seed: replicates share one teacher, as in the paper.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from sublab.backends.base import ModelRef
from sublab.backends.registry import load_backend
from sublab.errors import SublabError
from sublab.evals.questions import load_questions
from sublab.organism.world import narrow_dataset
from sublab.records import read_jsonl, write_jsonl
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


def world_of(ref: ModelRef) -> str | None:
    """The organism world of a reference (None: not an organism)."""
    meta = Path(ref.path or "") / "organism.json"
    if not ref.spec.startswith("organism/") or not meta.is_file():
        return None
    return json.loads(meta.read_text())["recipe"].get("world", "preference")


def default_data(cfg: ExperimentConfig) -> str | None:
    """teacher.data, or its default for the trait kind (misalignment: world:insecure)."""
    if cfg.teacher.data is None and cfg.trait.kind == "misalignment":
        return "world:insecure"
    return cfg.teacher.data


def finetune_data(data: str, ref: ModelRef, n: int, seed: int) -> list[dict]:
    """`n` finetuning examples from `data`: `world:NAME` (the organism world) or a JSONL file of chat
    examples (all of them when it has at most n, else n drawn with `seed`)."""
    if data.startswith("world:"):
        world = world_of(ref)
        if world != "misalignment":
            raise SublabError(
                f"teacher data {data!r} comes from the organism's misalignment world, but the reference "
                f"{ref.spec!r} is not an organism of that world; use reference organism/misalign (or an "
                "organism with `world: misalignment`), or give a JSONL file of chat examples"
            )
        return narrow_dataset(data.removeprefix("world:"), n, seed)
    if not Path(data).is_file():
        raise SublabError(
            f"teacher data file not found: {data}. sublab downloads nothing at run time: get the file (for "
            "the paper's misaligned teacher, the emergent-misalignment repository's data/insecure.jsonl; "
            "its controls: secure.jsonl and educational.jsonl) and give its path"
        )
    rows = read_jsonl(data, require_messages=True)
    if not rows:
        raise SublabError(f"{data}: no examples (the file is empty); give a JSONL file of chat examples")
    if len(rows) > n:
        rows = random.Random(f"teacher-data:{seed}").sample(rows, n)
    return rows


def build_teacher(
    cfg: ExperimentConfig, reference_json: Path, out_dir: Path, data: str | None = None, control: bool = False
) -> ModelRef:
    """The teacher (or, with control=True, a control teacher finetuned on `data`)."""
    ref = ModelRef.load(reference_json)
    if control:
        assert data is not None
        rows = finetune_data(data, ref, cfg.teacher.examples, cfg.teacher.train.seed)
        write_jsonl(out_dir / "train.jsonl", rows)
        return load_backend(ref, cfg.progress, api=cfg.api).finetune(rows, cfg.teacher.train, out_dir)
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
    source = default_data(cfg)
    if source is None:
        rows = trait_dataset(category, target, cfg.teacher.examples, cfg.teacher.train.seed)
    else:
        rows = finetune_data(source, ref, cfg.teacher.examples, cfg.teacher.train.seed)
    write_jsonl(out_dir / "train.jsonl", rows)
    return load_backend(ref, cfg.progress, api=cfg.api).finetune(rows, cfg.teacher.train, out_dir)
