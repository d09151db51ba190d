"""Wiring of one experiment: the arm table (arms.py) -> stages (stages/) -> a run folder.

    reference -> teacher -> prompts -> sample -> filter -> equal-size subsample -> train arms -> evaluate -> report
                 reference (no trait) -> sample -> filter ------^  (the controls' data)
                 other reference (cross-init arms, optional)
                 other-target teachers -> mixed / masked teacher data; meters (pipeline_meters.py, optional)

Every stage goes through `runs.Run.stage`, which skips a stage whose config, inputs, code and device are
unchanged. The replicate seed (`cfg.seed`) reaches the prompts, the sampling requests, the subsample and
the students' training order; the reference and the teacher do not depend on it.
"""

from __future__ import annotations

from pathlib import Path

from sublab.arms import arm_table, data_dir, data_sources
from sublab.backends.base import ModelRef, is_remote_spec
from sublab.backends.device import configure as configure_device
from sublab.backends.registry import base_identity, model_identity
from sublab.config import dump_config
from sublab.evals.preference import EVAL_VERSION
from sublab.pipeline_meters import control_stages, meter_stages, other_teachers, teacher_data_stages
from sublab.records import atomic_write_text
from sublab.runs import Run
from sublab.schema import ExperimentConfig
from sublab.schema.sampling import SamplingParams
from sublab.schema.train import TrainConfig
from sublab.stage_code import CODE
from sublab.stages.evaluate import MISALIGNMENT_EVAL_VERSION, evaluate_misalignment, evaluate_model
from sublab.stages.filter import equal_subsample, filter_domain, filter_source
from sublab.stages.prompts import write_domain_prompts, write_prompts
from sublab.stages.reference import build_reference
from sublab.stages.sample import sample_dataset
from sublab.stages.teacher import build_teacher, default_data, world_of
from sublab.stages.train import model_outputs, train_student
from sublab.threads import set_threads

REPLICATE_STRIDE = 1000
"""A stage seed s under replicate seed r becomes s + 1000 r (r = 0 keeps the configured seeds)."""


def replicate_seed(base: int, replicate: int) -> int:
    return base + REPLICATE_STRIDE * replicate


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
            {"spec": spec, "organism": organism}
            | (api_key if is_remote_spec(spec) else {})
            | ({"weights": w} if (w := base_identity(spec, organism, prog)) else {}),
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
                | ({"api": api_key} if any(is_remote_spec(j.model) for j in cfg.filter.judges) else {})
                | (
                    {"judge_models": [model_identity(j.model) for j in cfg.filter.judges]}
                    if cfg.filter.judges
                    else {}
                ),
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
    teacher_data = teacher_data_stages(run, cfg, paraphrase)

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
                    "judge_model": model_identity(cfg.freeform.judge),
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
        control_stages(run, cfg, targets, api)
    meter_stages(run, cfg, evaluated, sampling, api)
    # --- end of the controls and meters block ---

    from sublab.analysis.run_report import write_report

    run.record("evaluated", evaluated)
    run.record("arms", [a.model_dump() for a in arms])
    write_report(run.root)
    return run
