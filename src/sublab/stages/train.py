"""Train stage: finetune a student (or control) on a kept dataset, SFT or soft labels from a teacher."""

from __future__ import annotations

from pathlib import Path

from sublab.backends.base import ModelRef
from sublab.backends.registry import load_backend
from sublab.records import read_jsonl
from sublab.schema.train import TrainConfig


def train_student(
    base_json: Path,
    data_path: Path,
    train: TrainConfig,
    out_dir: Path,
    teacher_json: Path | None,
    progress: bool = True,
    api=None,
) -> ModelRef:
    base = ModelRef.load(base_json)
    data = read_jsonl(data_path, require_messages=True)
    teacher = ModelRef.load(teacher_json) if teacher_json else None
    return load_backend(base, progress, api=api).finetune(data, train, out_dir, teacher=teacher)


def model_outputs(name: str, train: TrainConfig, remote: bool = False) -> list[str]:
    """Files a finetuning stage writes into <name>/ (what a sweep's shared stage store keeps). An API
    model (`remote`) has no weights here: its job journal instead."""
    if remote:
        return [f"{name}/model.json", f"{name}/metrics.jsonl", f"{name}/job.json"]
    return [f"{name}/model.json", f"{name}/metrics.jsonl", f"{name}/{'adapter' if train.lora else 'model'}"]
