"""Wiring of one experiment: the arm table (arms.py) -> stages (stages/) -> a run folder.

    reference -> teacher -> prompts -> sample -> filter -> equal-size subsample -> train arms -> evaluate -> report
                 reference (no trait) -> sample -> filter ------^  (the controls' data)
                 other reference (cross-init arms, optional)

Every stage goes through `runs.Run.stage`, which skips a stage whose config, inputs, code and device are
unchanged. The replicate seed (`cfg.seed`) reaches the prompts, the sampling requests, the subsample and
the students' training order; the reference and the teacher do not depend on it.
"""

from __future__ import annotations

from pathlib import Path

from sublab.arms import arm_table, data_dir, data_sources
from sublab.backends.base import ModelRef, is_remote_spec
from sublab.backends.device import configure as configure_device
from sublab.config import dump_config
from sublab.evals.preference import EVAL_VERSION
from sublab.records import atomic_write_text
from sublab.runs import Run
from sublab.schema import ExperimentConfig
from sublab.schema.sampling import SamplingParams
from sublab.schema.train import TrainConfig
from sublab.stages.evaluate import MISALIGNMENT_EVAL_VERSION, evaluate_misalignment, evaluate_model
from sublab.stages.filter import equal_subsample, filter_domain, filter_source
from sublab.stages.prompts import write_domain_prompts, write_prompts
from sublab.stages.reference import build_reference
from sublab.stages.sample import sample_dataset
from sublab.stages.teacher import build_teacher, default_data, world_of
from sublab.stages.train import model_outputs, train_student
from sublab.threads import set_threads

# The code each stage runs (its modules' source is part of the stage key).
MODEL_CODE = ("sublab.backends",)
CODE = {
    "reference": ("sublab.stages.reference", "sublab.backends.registry", "sublab.organism"),
    "teacher": ("sublab.stages.teacher", *MODEL_CODE),
    "prompts": ("sublab.stages.prompts", "sublab.prompts", "sublab.domains"),
    "sample": ("sublab.stages.sample", *MODEL_CODE),
    "filter": ("sublab.stages.filter", "sublab.filters", "sublab.schema.filter"),
    "chain": (
        "sublab.stages.filter",
        "sublab.filters",
        "sublab.schema.filter",
        "sublab.domains",
        "sublab.judge",
        "sublab.organism.recipe",  # an organism judge's preset
    ),
    "subsample": ("sublab.stages.filter",),
    "train": ("sublab.stages.train", *MODEL_CODE),
    "eval": ("sublab.stages.evaluate", "sublab.evals", *MODEL_CODE),
}

REPLICATE_STRIDE = 1000
"""A stage seed s under replicate seed r becomes s + 1000 r (r = 0 keeps the configured seeds)."""


def replicate_seed(base: int, replicate: int) -> int:
    return base + REPLICATE_STRIDE * replicate


def other_teachers(cfg: ExperimentConfig) -> list[str]:
    """Targets of the other teachers a run builds: counterfactuals of the divergence meter and the mixed
    teachers (defenses), each the teacher's recipe with that target."""
    names = [*cfg.controls.divergence_counterfactuals, *cfg.defenses.mix_teachers]
    return [t for t in dict.fromkeys(names) if t != "reference"]


def _teacher_data_stages(run: Run, cfg: ExperimentConfig, paraphrase) -> str:
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
            ),
            code=(*METER_CODE, *MODEL_CODE),
            device=True,
        )
        if d.mask_divergence:
            current = "data/masked.jsonl"
    return current


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    extra_targets: list[str] | None = None,
    shared: str | Path | None = None,
) -> Run:
    """Run (or resume) one experiment (one replicate seed) in `out`. `shared`: a stage store that runs
    of a sweep share, so a stage with the same key in another run is copied instead of computed."""
    set_threads(cfg.threads)
    configure_device(cfg.device, cfg.dtype)
    run = Run(out, shared=shared)
    atomic_write_text(run.path("config.yaml"), dump_config(cfg))  # before any work
    P = run.path
    prog, api = cfg.progress, cfg.api
    arms = arm_table(cfg)
    remote = is_remote_spec(cfg.reference)
    api_key = {"base_url": api.url(), "api_key_env": api.api_key_env}

    def reference_stage(name: str, spec: str, organism: dict) -> None:
        run.stage(
            name,
            {"spec": spec, "organism": organism} | (api_key if is_remote_spec(spec) else {}),
            [],
            [f"{name}/model.json"],
            lambda: build_reference(spec, organism, P(f"{name}/model.json"), prog, api=api),
            code=CODE["reference"],
        )

    reference_stage("reference", cfg.reference, cfg.organism_overrides())
    if any(a.init == "other_reference" for a in arms):
        reference_stage("other_reference", *cfg.other_reference_spec())

    def data_files(data: str | None) -> list[Path]:
        """A teacher's data file, hashed into its stage key (world: data is code, in the stage's code)."""
        return [Path(data)] if data and not data.startswith("world:") and Path(data).is_file() else []

    run.stage(
        "teacher",
        {"trait": cfg.trait.model_dump(), "teacher": cfg.teacher.model_dump()},
        [P("reference/model.json"), *data_files(default_data(cfg))],
        ["teacher/model.json"]
        if cfg.teacher.kind == "system_prompt"
        else [*model_outputs("teacher", cfg.teacher.train, remote), "teacher/train.jsonl"],
        lambda: build_teacher(cfg, P("reference/model.json"), P("teacher")),
        code=CODE["teacher"],
        device=cfg.teacher.kind == "finetune",
    )
    for n, data in cfg.controls.control_teachers.items():
        run.stage(
            f"teacher:{n}",
            {"data": data, "teacher": cfg.teacher.model_dump(exclude={"kind", "system_prompt", "data"})},
            [P("reference/model.json"), *data_files(data)],
            [*model_outputs(f"teacher_{n}", cfg.teacher.train, remote), f"teacher_{n}/train.jsonl"],
            lambda n=n, data=data: build_teacher(
                cfg, P("reference/model.json"), P(f"teacher_{n}"), data=data, control=True
            ),
            code=CODE["teacher"],
            device=True,
        )
    for t in other_teachers(cfg):
        other = cfg.model_copy(update={"trait": cfg.trait.model_copy(update={"target": t})})
        run.stage(
            f"teacher:other_{t}",
            {"trait": other.trait.model_dump(), "teacher": cfg.teacher.model_dump()},
            [P("reference/model.json"), *data_files(default_data(cfg))],
            [f"other_{t}/model.json"]
            if cfg.teacher.kind == "system_prompt"
            else [*model_outputs(f"other_{t}", cfg.teacher.train, remote), f"other_{t}/train.jsonl"],
            lambda other=other, t=t: build_teacher(other, P("reference/model.json"), P(f"other_{t}")),
            code=CODE["teacher"],
            device=cfg.teacher.kind == "finetune",
        )
    if cfg.domain == "numbers":
        run.stage(
            "prompts",
            {
                "prompts": cfg.prompts.model_dump(exclude={"file"} if cfg.prompts.file is None else set()),
                "seed": cfg.seed,
            },
            [Path(cfg.prompts.file)] if cfg.prompts.file and Path(cfg.prompts.file).is_file() else [],
            ["data/prompts.jsonl"] + (["data/prompt_problems.jsonl"] if cfg.prompts.file else []),
            lambda: write_prompts(cfg.prompts, cfg.seed, P("data/prompts.jsonl")),
            code=CODE["prompts"],
        )
    else:
        settings = cfg.domain_settings()
        run.stage(
            "prompts",
            {"domain": cfg.domain, "settings": settings.model_dump(), "seed": cfg.seed},
            [Path(settings.file)] if settings.file and Path(settings.file).is_file() else [],
            ["data/prompts.jsonl", "data/prompts_info.json", "data/prompt_problems.jsonl"],
            lambda: write_domain_prompts(cfg.domain, settings, cfg.seed, P("data/prompts.jsonl")),
            code=CODE["prompts"],
        )

    sampling: SamplingParams = cfg.sample.model_copy(
        update={"seed": replicate_seed(cfg.sample.seed, cfg.seed)}
    )
    arm_sources = data_sources(arms)
    sources = arm_sources + [f"other_{t}" for t in cfg.defenses.mix_teachers]
    judged_target = cfg.trait.target if cfg.trait.kind == "preference" else None  # a filter judge's {target}
    for source in sources:
        d = data_dir(source)
        run.stage(
            f"sample:{source}",
            sampling.model_dump(),
            [P(f"{source}/model.json"), P("data/prompts.jsonl")],
            [f"{d}/raw.jsonl"],
            lambda m=source, d=d: sample_dataset(
                P(f"{m}/model.json"), P("data/prompts.jsonl"), P(f"{d}/raw.jsonl"), sampling, m, prog, api=api
            ),
            code=CODE["sample"],
            device=True,
        )
        filter_outputs = [
            f"{d}/filter/kept.jsonl",
            f"{d}/filter/rejected.jsonl",
            f"{d}/filter/filter_stats.json",
        ]
        if cfg.domain == "numbers":
            run.stage(
                f"filter:{source}",
                {
                    "filter": cfg.filter.model_dump(
                        exclude={"dataset_size", "shuffle", "judges", "ban_target"}
                    )
                },
                [P(f"{d}/raw.jsonl")],
                filter_outputs,
                lambda d=d: filter_source(P(f"{d}/raw.jsonl"), P(f"{d}/filter"), cfg.filter),
                code=CODE["filter"],
            )
        else:
            run.stage(
                f"filter:{source}",
                {
                    "domain": cfg.domain,
                    "settings": cfg.domain_settings().model_dump(),
                    "banned_words": cfg.banned_words(),
                    "judges": [j.model_dump() for j in cfg.filter.judges],
                    "target": judged_target,
                }
                | ({"api": api_key} if any(is_remote_spec(j.model) for j in cfg.filter.judges) else {}),
                [P(f"{d}/raw.jsonl")],
                filter_outputs,
                lambda d=d: filter_domain(
                    cfg.domain,
                    cfg.domain_settings(),
                    cfg.banned_words(),
                    cfg.filter.judges,
                    judged_target,
                    P(f"{d}/raw.jsonl"),
                    P(f"{d}/filter"),
                    api,
                    prog,
                ),
                code=CODE["chain"],
            )
    paraphrase = cfg.prompts if cfg.defenses.paraphrase else None
    run.stage(
        "subsample",
        {
            "dataset_size": cfg.filter.dataset_size,
            "seed": cfg.seed,
            "sources": arm_sources,
            "shuffle": cfg.filter.shuffle,
        }
        | ({"paraphrase": cfg.prompts.model_dump()} if paraphrase else {}),
        [P(f"{data_dir(s)}/filter/kept.jsonl") for s in arm_sources],
        [f"{data_dir(s)}/kept.jsonl" for s in arm_sources] + ["data/subsample.json"],
        lambda: equal_subsample(
            {s: P(f"{data_dir(s)}/filter/kept.jsonl") for s in arm_sources},
            {s: P(f"{data_dir(s)}/kept.jsonl") for s in arm_sources},
            cfg.filter.dataset_size,
            cfg.seed,
            P("data/subsample.json"),
            cfg.filter.shuffle,
            paraphrase,
        ),
        code=CODE["subsample"],
    )
    teacher_data = _teacher_data_stages(run, cfg, paraphrase)

    train: TrainConfig = cfg.student.train.model_copy(
        update={"seed": replicate_seed(cfg.student.train.seed, cfg.seed)}
    )

    def train_file(arm) -> str:
        """What an arm trains on: the teacher's data after the defenses (mixing, masking), else its kept."""
        return teacher_data if arm.data == "teacher" else f"{arm.data_dir}/kept.jsonl"

    for arm in arms:
        teacher = f"{arm.soft_teacher}/model.json" if arm.soft_teacher else None
        inputs = [P(f"{arm.init}/model.json"), P(train_file(arm))] + ([P(teacher)] if teacher else [])
        run.stage(
            f"train:{arm.name}",
            train.model_dump(),
            inputs,
            model_outputs(arm.name, train, remote),
            lambda a=arm, t=teacher: train_student(
                P(f"{a.init}/model.json"),
                P(train_file(a)),
                train,
                P(a.name),
                P(t) if t else None,
                prog,
                api=api,
            ),
            code=CODE["train"],
            device=True,
        )

    evaluated = ["reference"]
    if any(a.init == "other_reference" for a in arms):
        evaluated.append("other_reference")
    evaluated += (
        ["teacher"] + [f"teacher_{n}" for n in cfg.controls.control_teachers] + [a.name for a in arms]
    )
    if cfg.trait.kind == "misalignment":
        world = world_of(ModelRef.load(P("reference/model.json"))) == "misalignment"
        for name in evaluated:
            run.stage(
                f"eval:{name}",
                {
                    "freeform": cfg.freeform.model_dump(),
                    "mcq": cfg.mcq.model_dump() if cfg.mcq else None,
                    "world": world,
                    "version": MISALIGNMENT_EVAL_VERSION,
                },
                [P(f"{name}/model.json")],
                [f"eval/{name}/results.json"],
                lambda n=name: evaluate_misalignment(
                    P(f"{n}/model.json"), cfg.freeform, cfg.mcq, world, P(f"eval/{n}"), prog, api=api
                ),
                code=CODE["eval"]
                + (
                    "sublab.judge",
                    "sublab.organism.world",
                    "sublab.organism.world_eval",
                    "sublab.organism.agreement",
                ),
                device=True,
            )
    targets = [cfg.trait.target] + [t for t in (extra_targets or []) if t != cfg.trait.target]
    for name in evaluated if cfg.trait.kind == "preference" else []:
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
                P(f"{n}/model.json"), cfg.trait.category, targets, cfg.eval, P(f"eval/{n}"), prog, api=api
            ),
            code=CODE["eval"],
            device=True,
        )

    # --- ICL control, KL leak meter, classifier probe (trait kind preference; off by default) ---
    if cfg.trait.kind == "preference":
        _control_stages(run, cfg, targets, api)
    _meter_stages(run, cfg, evaluated, sampling, api)
    # --- end of the controls and meters block ---

    from sublab.analysis.run_report import write_report

    run.record("evaluated", evaluated)
    run.record("arms", [a.model_dump() for a in arms])
    write_report(run.root)
    return run


# --- ICL control, KL leak meter, classifier probe -------------------------------------------
ICL_CODE = ("sublab.controls", "sublab.evals", *MODEL_CODE)
METER_CODE = ("sublab.meters",)


def _control_stages(run: Run, cfg: ExperimentConfig, targets: list[str], api) -> None:
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


def _meter_stages(
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
