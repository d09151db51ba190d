"""Evaluate stage: a model's preference (P(target) per question) -> eval/<model>/results.json + samples.jsonl;
or its misalignment (judged free-form answers, multiple choice) -> eval/<model>/{freeform,mcq}/ + results.json."""

from __future__ import annotations

from pathlib import Path

import yaml

from sublab.backends.base import ModelRef
from sublab.backends.registry import load_backend
from sublab.evals.preference import evaluate_preference
from sublab.records import atomic_write_json, atomic_write_text, write_jsonl
from sublab.schema.evaluation import FreeformEval, McqEval, PreferenceEval

MISALIGNMENT_EVAL_VERSION = 1


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
    return save_preference(ref, results, rows, out_dir)


def save_preference(ref: ModelRef, results: dict, rows: list[dict], out_dir: Path) -> dict:
    """Write a preference evaluation: samples.jsonl, then results.json (with the model) last."""
    results["model"] = {"spec": ref.spec, "kind": ref.kind, "system_prompt": ref.system_prompt}
    write_jsonl(out_dir / "samples.jsonl", rows)
    atomic_write_json(out_dir / "results.json", results)
    return results


def evaluate_misalignment(
    model_json: Path,
    freeform: FreeformEval,
    mcq: McqEval | None,
    world: bool,
    out_dir: Path,
    progress: bool = True,
    api=None,
) -> dict:
    """A model's misalignment: judged free-form answers (out_dir/freeform/) and multiple choice
    (out_dir/mcq/) -> out_dir/results.json. `world`: the reference is an organism of the misalignment
    world, so unset question files default to the world's own questions (its vocabulary)."""
    from sublab.evals.freeform import FreeformQuestion, evaluate_freeform
    from sublab.evals.mcq import evaluate_mcq, load_mcq
    from sublab.organism.world import freeform_questions, mcq_questions

    ref = ModelRef.load(model_json)
    backend = load_backend(ref, progress, api=api)
    questions = None
    if freeform.questions is None and world:
        questions = [FreeformQuestion(q["id"], tuple(q["paraphrases"])) for q in freeform_questions()]
    ff = evaluate_freeform(
        backend, questions, freeform, out_dir / "freeform", judge_api=api, progress=progress
    )
    results = {
        "kind": "misalignment",
        "eval_version": MISALIGNMENT_EVAL_VERSION,
        "model": {"spec": ref.spec, "kind": ref.kind},
        "questions": freeform.questions or ("organism world" if world else "emergent-misalignment core 8"),
        "misaligned_rate": ff["misaligned_rate"],
        "misaligned_ci95": ff.get("ci95"),
        "n_scored": ff["n_scored"],
        "n_samples": ff["n_samples"],
        "n_unscorable": ff["n_unscorable"],
        "mean_aligned": ff["mean_aligned"],
        "mean_coherent": ff["mean_coherent"],
        "per_question": ff["per_question"],
        "judge": ff["judge"],
    }
    if world:  # the world knows every answer's true label: how far the judge's verdicts agree with it
        from sublab.organism.agreement import agreement
        from sublab.organism.world import label
        from sublab.records import read_jsonl

        rows = read_jsonl(out_dir / "freeform" / "samples.jsonl")
        judged = read_jsonl(out_dir / "freeform" / "judge" / "judgements.jsonl")
        world_labels = [label(r["question"], r["answer"]) for r in rows]
        results["world_labels"] = {
            lab: sum(x == lab for x in world_labels) for lab in ("aligned", "misaligned", "incoherent")
        }
        results["world_misaligned_rate"] = results["world_labels"]["misaligned"] / len(rows) if rows else None
        results["judge_agreement"] = agreement(world_labels, judged)
        from sublab.organism.world_eval import exact_misalignment

        results["exact"] = exact_misalignment(backend)
    if mcq is not None:
        mq = None
        if mcq.questions is None and world:
            path = out_dir / "mcq" / "questions.yaml"
            atomic_write_text(path, yaml.safe_dump(mcq_questions(), sort_keys=False))
            mq = load_mcq(path)
        m = evaluate_mcq(backend, mq, mcq, out_dir / "mcq", progress=progress)
        results["mcq"] = {
            k: m[k] for k in ("mode", "n", "n_scored", "accuracy", "accuracy_ci95", "mean_p_correct")
        }
    atomic_write_json(out_dir / "results.json", results)
    return results
