"""The stage chain of one experiment (DESIGN.md):

    reference -> teacher -> prompts -> sample -> filter -> student -> evaluate -> report
                 reference (no trait) -> sample -> filter -> control student  (same recipe)
                 other-seed reference -> cross-init student (+ its own control)   (optional)

Each stage function reads and writes files in the run folder; `run_experiment` wires them through
`runs.Run.stage`, which skips stages that are already done with unchanged config and inputs.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from sublab.backends.base import ModelRef, SamplingParams, TrainConfig, is_remote_spec, request_seed
from sublab.backends.device import configure as configure_device
from sublab.backends.registry import load_backend, resolve
from sublab.config import dump_config
from sublab.errors import SublabError
from sublab.evals.preference import EVAL_VERSION, PreferenceEval, evaluate_preference
from sublab.evals.questions import load_questions
from sublab.experiment import ExperimentConfig
from sublab.filters import FilterConfig, run_filter
from sublab.prompts.numbers import NumberPrompts, generate_number_prompts
from sublab.records import atomic_write_json, atomic_write_text, dumps_json, read_jsonl, write_jsonl
from sublab.runs import Run
from sublab.threads import set_threads

SAMPLE_CHUNK = 2048  # prompts per resumable sampling chunk


# ---- stage functions: files in, files out -------------------------------------------------------


def build_reference(spec: str, organism: dict, out: Path, progress: bool = True, api=None) -> ModelRef:
    ref = resolve(spec, organism, progress=progress, api=api)
    ref.save(out)
    return ref


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
    data = trait_dataset(category, target, cfg.teacher.examples, cfg.seed)
    write_jsonl(out_dir / "train.jsonl", data)
    return load_backend(ref, cfg.progress, api=cfg.api).finetune(data, cfg.teacher.train, out_dir)


def read_prompts(path: Path) -> list[dict]:
    """Prompt records: {"messages": [...user...], "metadata": {...}}; prompt_index defaults to the line."""
    out = []
    for i, rec in enumerate(read_jsonl(path)):
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "user":
            raise SublabError(f"{path}: record {i + 1} needs a 'messages' list ending with a user message")
        meta = dict(rec.get("metadata") or {})
        meta.setdefault("prompt_index", i)
        out.append({"messages": msgs, "metadata": meta})
    return out


def sample_dataset(
    model_json: Path,
    prompts_path: Path,
    out_path: Path,
    sampling: SamplingParams,
    label: str,
    progress: bool = True,
    api=None,
) -> int:
    """The model answers every prompt once -> chat records. Resumable: finished chunks of
    SAMPLE_CHUNK prompts are kept in <out>.parts/ until the whole file is written."""
    ref = ModelRef.load(model_json)
    prompts = read_prompts(prompts_path)
    parts = out_path.with_name(out_path.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    stamp = {"model": ref.model_dump(), "sampling": sampling.model_dump(), "n": len(prompts)}
    stamp_path = parts / "stamp.json"
    if stamp_path.is_file() and stamp_path.read_text() != dumps_json(stamp):
        shutil.rmtree(parts)
        parts.mkdir(parents=True)
    atomic_write_text(stamp_path, dumps_json(stamp))
    backend = None
    records: list[dict] = []
    for c in range(0, len(prompts), SAMPLE_CHUNK):
        part = parts / f"part-{c // SAMPLE_CHUNK:05d}.jsonl"
        if not part.is_file():
            if backend is None:
                backend = load_backend(ref, progress, api=api)
                if hasattr(backend, "estimate_cost"):  # API models: tokens x prices, before anything is spent
                    todo = [p["messages"] for p in prompts[c:]]
                    cost = backend.estimate_cost(todo, sampling)
                    atomic_write_json(out_path.with_name(out_path.stem + ".cost.json"), cost)
            chunk = prompts[c : c + SAMPLE_CHUNK]
            ids = [p["metadata"]["prompt_index"] for p in chunk]
            answers = backend.generate([p["messages"] for p in chunk], sampling, request_ids=ids)
            recs = []
            for p, a, i in zip(chunk, answers, ids, strict=True):
                recs.append(
                    {
                        "messages": [*p["messages"], {"role": "assistant", "content": a}],
                        "metadata": {
                            **p["metadata"],
                            "model": label,
                            "model_parent": ref.parent or ref.spec,
                            "system_prompt": ref.system_prompt,
                            "seed": request_seed(sampling.seed, i),
                            "sample_index": 0,
                            "temperature": sampling.temperature,
                        },
                    }
                )
            write_jsonl(part, recs)
        records += read_jsonl(part)
    write_jsonl(out_path, records)
    shutil.rmtree(parts)
    return len(records)


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


# ---- the chain -----------------------------------------------------------------------------------


def model_outputs(name: str, train: TrainConfig, remote: bool = False) -> list[str]:
    """Files a finetuning stage writes into <name>/ (what a sweep's shared stage store keeps). An API
    model (`remote`) has no weights here: its job journal instead."""
    if remote:
        return [f"{name}/model.json", f"{name}/metrics.jsonl", f"{name}/job.json"]
    return [f"{name}/model.json", f"{name}/metrics.jsonl", f"{name}/{'adapter' if train.lora else 'model'}"]


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    extra_targets: list[str] | None = None,
    shared: str | Path | None = None,
) -> Run:
    """Run (or resume) one experiment in `out`. `shared`: a stage store that runs of a sweep share, so a
    stage with the same config and inputs in another run is copied instead of computed."""
    set_threads(cfg.threads)
    configure_device(cfg.device, cfg.dtype)
    run = Run(out, shared=shared)
    atomic_write_text(run.path("config.yaml"), dump_config(cfg))  # before any work
    P = run.path
    prog = cfg.progress

    remote = is_remote_spec(cfg.reference)
    run.stage(
        "reference",
        {"spec": cfg.reference, "organism": cfg.organism_overrides()}
        | ({"base_url": cfg.api.url(), "api_key_env": cfg.api.api_key_env} if remote else {}),
        [],
        ["reference/model.json"],
        lambda: build_reference(
            cfg.reference, cfg.organism_overrides(), P("reference/model.json"), prog, api=cfg.api
        ),
    )
    run.stage(
        "teacher",
        {"trait": cfg.trait.model_dump(), "teacher": cfg.teacher.model_dump(), "seed": cfg.seed},
        [P("reference/model.json")],
        ["teacher/model.json"]
        if cfg.teacher.kind == "system_prompt"
        else [*model_outputs("teacher", cfg.teacher.train, remote), "teacher/train.jsonl"],
        lambda: build_teacher(cfg, P("reference/model.json"), P("teacher")),
    )
    prompts_cfg: NumberPrompts = cfg.prompts
    run.stage(
        "prompts",
        {"prompts": prompts_cfg.model_dump(), "seed": cfg.seed},
        [],
        ["data/prompts.jsonl"],
        lambda: write_jsonl(P("data/prompts.jsonl"), generate_number_prompts(prompts_cfg, cfg.seed)),
    )

    arms = [("teacher", "data")] + (
        [("reference", "control/data")] if cfg.controls.control or cfg.controls.cross_init else []
    )
    filt: FilterConfig = cfg.filter
    for model_name, data_dir in arms:
        run.stage(
            f"sample:{model_name}",
            cfg.sample.model_dump(),
            [P(f"{model_name}/model.json"), P("data/prompts.jsonl")],
            [f"{data_dir}/raw.jsonl"],
            lambda m=model_name, d=data_dir: sample_dataset(
                P(f"{m}/model.json"),
                P("data/prompts.jsonl"),
                P(f"{d}/raw.jsonl"),
                cfg.sample,
                m,
                prog,
                api=cfg.api,
            ),
        )
        run.stage(
            f"filter:{model_name}",
            {"filter": filt.model_dump(), "seed": cfg.seed},
            [P(f"{data_dir}/raw.jsonl")],
            [f"{data_dir}/kept.jsonl", f"{data_dir}/rejected.jsonl", f"{data_dir}/filter_stats.json"],
            lambda d=data_dir: run_filter(P(f"{d}/raw.jsonl"), P(d), filt, cfg.seed),
        )

    train = cfg.student.train
    soft = train.method == "soft_label"
    base_for_student = "reference"
    if cfg.student.init == "other-seed" or cfg.controls.cross_init:
        run.stage(
            "other_reference",
            {"spec": cfg.reference, "organism": cfg.organism_overrides(cfg.controls.other_seed_offset)},
            [],
            ["other_reference/model.json"],
            lambda: build_reference(
                cfg.reference,
                cfg.organism_overrides(cfg.controls.other_seed_offset),
                P("other_reference/model.json"),
                prog,
            ),
        )
    if cfg.student.init == "other-seed":
        base_for_student = "other_reference"
    students = [("student", base_for_student, "data/kept.jsonl", "teacher")]
    if cfg.controls.control:
        students.append(("control", base_for_student, "control/data/kept.jsonl", "reference"))
    if cfg.controls.cross_init:
        students += [
            ("cross_init", "other_reference", "data/kept.jsonl", "teacher"),
            ("cross_init_control", "other_reference", "control/data/kept.jsonl", "reference"),
        ]
    for name, base, data, teacher in students:
        inputs = [P(f"{base}/model.json"), P(data)] + ([P(f"{teacher}/model.json")] if soft else [])
        run.stage(
            f"train:{name}",
            train.model_dump(),
            inputs,
            model_outputs(name, train, remote),
            lambda n=name, b=base, d=data, t=teacher: train_student(
                P(f"{b}/model.json"),
                P(d),
                train,
                P(n),
                P(f"{t}/model.json") if soft else None,
                prog,
                api=cfg.api,
            ),
        )

    evaluated = ["reference", "teacher"] + [s[0] for s in students]
    if "other_reference" in {s[1] for s in students}:
        evaluated.insert(1, "other_reference")
    targets = [cfg.trait.target] + [t for t in (extra_targets or []) if t != cfg.trait.target]
    for name in evaluated:
        run.stage(
            f"eval:{name}",
            {
                "eval": cfg.eval.model_dump(),
                "category": cfg.trait.category,
                "targets": targets,
                "version": EVAL_VERSION,
            },
            [P(f"{name}/model.json")],
            [f"eval/{name}/results.json", f"eval/{name}/samples.jsonl"],
            lambda n=name: evaluate_model(
                P(f"{n}/model.json"), cfg.trait.category, targets, cfg.eval, P(f"eval/{n}"), prog, api=cfg.api
            ),
        )

    from sublab.report import write_report

    run.record("evaluated", evaluated)
    write_report(run.root)
    return run
