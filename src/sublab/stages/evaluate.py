"""Evaluate stage: a model's preference (P(target) per question) -> eval/<model>/results.json + samples.jsonl."""

from __future__ import annotations

from pathlib import Path

from sublab.backends.base import ModelRef
from sublab.backends.registry import load_backend
from sublab.evals.preference import evaluate_preference
from sublab.records import atomic_write_json, write_jsonl
from sublab.schema.evaluation import PreferenceEval


def evaluate_model(
    model_json: Path,
    category: str,
    targets: list[str],
    cfg: PreferenceEval,
    out_dir: Path,
    progress: bool = True,
    api=None,
) -> dict:
    ref = ModelRef.load(model_json)
    results, rows = evaluate_preference(load_backend(ref, progress, api=api), category, targets, cfg)
    results["model"] = {"spec": ref.spec, "kind": ref.kind, "system_prompt": ref.system_prompt}
    write_jsonl(out_dir / "samples.jsonl", rows)
    atomic_write_json(out_dir / "results.json", results)
    return results
