"""Wiring of the controls, the leak meters and the defenses on the teacher's data (pipeline.py calls
these): each is a stage beside the arms, off unless its config key is set (docs/science.md, "Defenses
and controls you can switch on").
"""

from __future__ import annotations

from sublab.arms import data_dir
from sublab.backends.registry import model_identity
from sublab.evals.preference import EVAL_VERSION
from sublab.runs import Run
from sublab.schema import ExperimentConfig
from sublab.schema.sampling import SamplingParams
from sublab.stage_code import CODE, ICL_CODE, METER_CODE, MODEL_CODE
from sublab.stages.filter import filter_source
from sublab.stages.prompts import write_prompts
from sublab.stages.sample import sample_dataset


def other_teachers(cfg: ExperimentConfig) -> list[str]:
    """Targets of the other teachers a run builds: counterfactuals of the divergence meter and the mixed
    teachers (defenses), each the teacher's recipe with that target."""
    names = [*cfg.controls.divergence_counterfactuals, *cfg.defenses.mix_teachers]
    return [t for t in dict.fromkeys(names) if t != "reference"]


def teacher_data_stages(run: Run, cfg: ExperimentConfig, paraphrase) -> str:
    """Defenses on the teacher's data after the subsample: teacher mixing (stage mix -> data/mixed.jsonl),
    then the divergence meter and mask (stage divergence -> data/divergence.json, data/masked.jsonl).
    Returns the file the students of the teacher's data train on."""
    P, d = run.path, cfg.defenses
    current = "data/kept.jsonl"
    if d.mix_teachers:
        from sublab.stages.filter import mix_teachers

        others = {f"other_{t}": P(f"{data_dir(f'other_{t}')}/filter/kept.jsonl") for t in d.mix_teachers}
        run.stage(
            "mix",
            {"mix_teachers": d.mix_teachers, "seed": cfg.seed}
            | ({"paraphrase": cfg.prompts.model_dump()} if paraphrase else {}),
            [P(current), *others.values()],
            ["data/mixed.jsonl", "data/mixed.json"],
            lambda: mix_teachers(
                P(current), others, P("data/mixed.jsonl"), P("data/mixed.json"), cfg.seed, paraphrase
            ),
            code=CODE["subsample"],
        )
        current = "data/mixed.jsonl"
    cfs = cfg.controls.divergence_counterfactuals
    if cfs:
        from sublab.meters.divergence import divergence_stage

        models = {c: P("reference/model.json" if c == "reference" else f"other_{c}/model.json") for c in cfs}
        src = current
        run.stage(
            "divergence",
            {"counterfactuals": cfs, "mask": d.mask_divergence}
            | ({"rule": cfg.controls.divergence_rule} if cfg.controls.divergence_rule != "argmax" else {})
            | ({} if d.mask_divergence else {"n": cfg.controls.divergence_examples, "seed": cfg.seed}),
            [P("teacher/model.json"), *models.values(), P(src)],
            ["data/divergence.json"] + (["data/masked.jsonl"] if d.mask_divergence else []),
            lambda: divergence_stage(
                P("teacher/model.json"),
                models,
                P(src),
                P("data/divergence.json"),
                P("data/masked.jsonl") if d.mask_divergence else None,
                cfg.controls.divergence_examples,
                cfg.seed,
                cfg.controls.divergence_rule,
            ),
            code=(*METER_CODE, *MODEL_CODE),
            device=True,
        )
        if d.mask_divergence:
            current = "data/masked.jsonl"
    return current


# --- ICL control, KL leak meter, classifier probe -------------------------------------------


def control_stages(run: Run, cfg: ExperimentConfig, targets: list[str], api) -> None:
    """Stages eval:icl_{teacher,control}_k{k} (controls.icl_examples), leak (controls.leak_meter_examples)
    and classifier (controls.classifier); none of them exists when its option is off."""
    P, prog, c = run.path, cfg.progress, cfg.controls
    from sublab.controls.icl import ICL_VERSION, evaluate_icl

    for k in c.icl_examples:
        if k < 1:
            continue  # k = 0 is the reference's own evaluation (eval:reference)
        for source, d in (("teacher", data_dir("teacher")), ("control", data_dir("reference"))):
            name = f"icl_{source}_k{k}"
            run.stage(
                f"eval:{name}",
                {
                    "eval": cfg.eval.model_dump(),
                    "category": cfg.trait.category,
                    "targets": targets,
                    "k": k,
                    "seed": cfg.seed,
                    "version": EVAL_VERSION,
                    "icl_version": ICL_VERSION,
                },
                [P("reference/model.json"), P(f"{d}/kept.jsonl")],
                [f"eval/{name}/results.json", f"eval/{name}/samples.jsonl"],
                lambda n=name, d=d, k=k, s=source: evaluate_icl(
                    P("reference/model.json"),
                    P(f"{d}/kept.jsonl"),
                    k,
                    cfg.seed,
                    s,
                    cfg.trait.category,
                    targets,
                    cfg.eval,
                    P(f"eval/{n}"),
                    prog,
                    api=api,
                ),
                code=ICL_CODE,
                device=True,
            )
    if c.leak_meter_examples > 0:
        from sublab.meters.kl import leak_meter

        run.stage(
            "leak",
            {"n": c.leak_meter_examples, "seed": cfg.seed},
            [P("teacher/model.json"), P("reference/model.json"), P("data/kept.jsonl")],
            ["data/leak.json"],
            lambda: leak_meter(
                P("teacher/model.json"),
                P("reference/model.json"),
                P("data/kept.jsonl"),
                c.leak_meter_examples,
                cfg.seed,
                P("data/leak.json"),
            ),
            code=(*METER_CODE, *MODEL_CODE),
            device=True,
        )
    if c.prompted_classifier is not None:
        _prompted_classifier_stage(run, cfg, api)
    if c.classifier:
        from sublab.meters.classifier import classifier_control

        run.stage(
            "classifier",
            {"seed": cfg.seed},
            [P("data/kept.jsonl"), P(f"{data_dir('reference')}/kept.jsonl")],
            ["data/classifier.json"],
            lambda: classifier_control(
                P("data/kept.jsonl"),
                P(f"{data_dir('reference')}/kept.jsonl"),
                cfg.seed,
                P("data/classifier.json"),
            ),
            code=METER_CODE,
        )


def _prompted_classifier_stage(run: Run, cfg: ExperimentConfig, api) -> None:
    """Stage prompted_classifier (controls.prompted_classifier): its per-trial cache stays beside the
    output, so a rerun after a failed call asks only the trials not yet answered."""
    from sublab.meters.prompted_classifier import PROMPTED_CLASSIFIER_VERSION, prompted_classifier

    s, P = cfg.controls.prompted_classifier, run.path
    control = f"{data_dir('reference')}/kept.jsonl"
    run.stage(
        "prompted_classifier",
        {
            "settings": s.model_dump(),
            "classifier_model": model_identity(s.model),
            "seed": cfg.seed,
            "target": cfg.trait.target,
            "version": PROMPTED_CLASSIFIER_VERSION,
        }
        | (
            {"api": {"base_url": cfg.api.url(), "api_key_env": cfg.api.api_key_env}}
            if s.model.startswith("openai/")
            else {}
        ),
        [P("data/kept.jsonl"), P(control)],
        ["data/prompted_classifier.json"],
        lambda: prompted_classifier(
            s,
            P("data/kept.jsonl"),
            P(control),
            cfg.trait.target,
            cfg.trait.category,
            cfg.seed,
            P("data/prompted_classifier.json"),
            api=cfg.api,
            progress=cfg.progress,
        ),
        code=METER_CODE + ("sublab.judge", *MODEL_CODE),
        device=not s.model.startswith("openai/"),
    )


def meter_stages(
    run: Run, cfg: ExperimentConfig, evaluated: list[str], sampling: SamplingParams, api
) -> None:
    """Stages coverage (controls.coverage_examples) and quality_data, quality:NAME (controls.task_quality)."""
    P, c = run.path, cfg.controls
    if c.coverage_examples > 0:
        from sublab.meters.coverage import coverage_stage

        run.stage(
            "coverage",
            {"n": c.coverage_examples, "seed": cfg.seed},
            [
                P("teacher/model.json"),
                P("reference/model.json"),
                P("data/kept.jsonl"),
                P(f"{data_dir('reference')}/kept.jsonl"),
            ],
            ["data/coverage.json"],
            lambda: coverage_stage(
                P("teacher/model.json"),
                P("reference/model.json"),
                P("data/kept.jsonl"),
                P(f"{data_dir('reference')}/kept.jsonl"),
                c.coverage_examples,
                cfg.seed,
                P("data/coverage.json"),
            ),
            code=(*METER_CODE, *MODEL_CODE),
            device=True,
        )
    if c.task_quality > 0:
        from sublab.meters.quality import HELDOUT_SEED, task_quality

        heldout = cfg.prompts.model_copy(update={"count": c.task_quality})
        q = "data/quality"
        run.stage(
            "quality_data",
            {
                "prompts": heldout.model_dump(),
                "seed": cfg.seed,
                "sampling": sampling.model_dump(),
                "filter": cfg.filter.model_dump(exclude={"dataset_size", "shuffle", "judges", "ban_target"}),
            },
            [P("reference/model.json")],
            [f"{q}/prompts.jsonl", f"{q}/reference.jsonl"]
            + [f"{q}/filter/{f}" for f in ("kept.jsonl", "rejected.jsonl", "filter_stats.json")],
            lambda: (
                write_prompts(heldout, cfg.seed + HELDOUT_SEED, P(f"{q}/prompts.jsonl")),
                sample_dataset(
                    P("reference/model.json"),
                    P(f"{q}/prompts.jsonl"),
                    P(f"{q}/reference.jsonl"),
                    sampling,
                    "reference",
                    cfg.progress,
                    api=api,
                ),
                filter_source(P(f"{q}/reference.jsonl"), P(f"{q}/filter"), cfg.filter),
            ),
            code=(*METER_CODE, *CODE["prompts"], *CODE["sample"], *CODE["filter"]),
            device=True,
        )
        for name in evaluated:
            run.stage(
                f"quality:{name}",
                {
                    "sampling": sampling.model_dump(),
                    "filter": cfg.filter.model_dump(
                        exclude={"dataset_size", "shuffle", "judges", "ban_target"}
                    ),
                },
                [P(f"{name}/model.json"), P(f"{q}/prompts.jsonl"), P(f"{q}/filter/kept.jsonl")],
                [f"eval/{name}/quality.json"],
                lambda n=name: task_quality(
                    P(f"{n}/model.json"),
                    P(f"{q}/prompts.jsonl"),
                    P(f"{q}/filter/kept.jsonl"),
                    sampling,
                    cfg.filter,
                    P(f"eval/{n}/quality.json"),
                    cfg.progress,
                    api=api,
                ),
                code=(*METER_CODE, *MODEL_CODE),
                device=True,
            )


# --- end of the controls and meters block ---
