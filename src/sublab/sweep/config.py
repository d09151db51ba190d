"""The sweep config and its expansion into runs: many experiments (targets x replicate seeds x organism
seeds x conditions x any config axis) from one YAML file.

    sublab sweep configs/sweep-replicates.yaml [--out runs/sweep-replicates]

    name: sweep-replicates
    base: quickstart.yaml              # experiment config, relative to this file
    targets: [owl, dolphin, wolf]      # shorthand for the axis trait.target
    seeds: [0, 1, 2]                   # replicate seeds: shorthand for the axis seed
    organism_seeds: [0, 1, 2]          # organism seeds (other reference models): the axis organism_seed
    conditions: [sft, cross-init]      # named conditions (CONDITIONS) or your own in condition_defs
    axes: {student.train.lr: [1.0e-4, 3.0e-4]}   # any config path with a list of values
    models: [organism/proto, organism/proto-deep]  # cross-model grid: teacher model x student model
"""

from __future__ import annotations

import difflib
import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, model_validator

from sublab.config import Strict, apply_overrides, validate
from sublab.errors import SublabError
from sublab.records import read_json
from sublab.schema import ExperimentConfig

CONDITIONS: dict[str, dict[str, Any]] = {
    "sft": {},
    "soft": {"student.train.method": "soft_label"},
    "prompted": {"teacher.kind": "system_prompt"},
    "cross-init": {"controls.cross_init": True},
}


class RayResources(Strict):
    """What one run of the sweep reserves on a Ray cluster (a run is one Ray task; its stages run in order
    inside it, and stages that runs share are still computed once through the shared stage store)."""

    cpus: float | None = None
    """CPUs per run (None = the experiment's `threads`)."""
    gpus: float = 0
    """GPUs per run (e.g. 1 for hf/ models on a GPU node; fractions share a GPU)."""
    memory_gb: float | None = None
    """Memory per run in GiB, for Ray's scheduler (None = no reservation)."""


class SweepConfig(Strict):
    """A sweep: a base experiment and the axes to vary."""

    name: str = "sweep"
    """Sweep name; the folder defaults to runs/<name>."""
    base: str
    """The experiment YAML every run starts from (relative paths are relative to the sweep file)."""
    set: dict[str, Any] = {}
    """Overrides applied to every run (config path -> value)."""
    mode: Literal["grid", "list"] = "grid"
    """grid: every combination of the axes; list: the runs in `runs`, as given."""
    targets: list[str] | None = None
    """Shorthand for the axis trait.target."""
    seeds: list[int] | None = None
    """Replicate seeds (the axis `seed`): prompts, sampling, subsample and training order vary, the
    reference and the teacher stay fixed. None = the base config's `replicates`, if it has them."""
    organism_seeds: list[int] | None = None
    """Organism seeds (the axis `organism_seed`): each a different reference model."""
    conditions: list[str] = ["sft"]
    """Named conditions, each a set of overrides: built in sft, soft, prompted, cross-init."""
    condition_defs: dict[str, dict[str, Any]] = {}
    """Your own named conditions: name -> {config path: value}."""
    axes: dict[str, list] = {}
    """Any config path -> list of values."""
    runs: list[dict[str, Any]] = []
    """list mode: one {config path: value} mapping per run."""
    models: list[str] | None = None
    """Cross-model grid (teacher model x student model): each listed model in turn is the reference (the
    teacher's init and the same-init student's), and each run also trains a cross-init student (and its
    control) from one other listed model, so there is one run per (teacher model, other model) and the
    same-init students form the diagonal. Sets `reference`, `controls.cross_init` and
    `controls.other_reference` per run."""
    other_seed: bool = False
    """With `models`: also a run per model whose cross-init student is the same model pretrained with
    another seed (organism specs: organism_seed + controls.other_seed_offset)."""
    retries: int = 0
    """How often a failed run is retried before the sweep records it as failed."""
    resources: RayResources = RayResources()
    """Ray executor: what each run asks the cluster for."""

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if self.mode == "list" and not self.runs:
            raise ValueError("mode: list needs a non-empty `runs` list")
        if self.models is not None:
            if len(set(self.models)) != len(self.models):
                raise ValueError("`models` lists a model twice")
            if len(self.models) < 2 and not self.other_seed:
                raise ValueError("`models` needs at least two models (or other_seed: true)")
            if self.mode == "list":
                raise ValueError("`models` expands a grid; it cannot be combined with mode: list")
        return self

    def all_conditions(self) -> dict[str, dict[str, Any]]:
        return {**CONDITIONS, **self.condition_defs}


def check_path(path: str) -> None:
    """Raise SublabError unless `path` names a key of the experiment config (e.g. student.train.lr)."""
    cls: Any = ExperimentConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = cls.model_fields
        if part not in fields:
            hint = difflib.get_close_matches(part, list(fields), n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"keys here: {', '.join(fields)}"
            where = ".".join(parts[: i + 1])
            raise SublabError(f"sweep axis '{path}' is not a config key ('{where}' does not exist; {fix})")
        ann = fields[part].annotation
        if ann is dict or getattr(ann, "__origin__", None) is dict:
            return  # free-form mapping (e.g. organism recipe overrides)
        nested = [
            a
            for a in (ann, *getattr(ann, "__args__", ()))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if i < len(parts) - 1:
            if not nested:
                raise SublabError(
                    f"sweep axis '{path}': '{'.'.join(parts[: i + 1])}' is a value, not a section"
                )
            cls = nested[0]


OTHER_SEED = "other seed"
"""The `controls.other_reference` label of a cross-model run whose other init is the same model with
another seed."""


def _label(path: str, value: Any) -> str:
    if path in ("reference", "controls.other_reference"):  # specs hold '/': keep the last part
        return ("x-" if path != "reference" else "") + str(value).split("/")[-1].replace(" ", "-")
    short = {"trait.target": "", "seed": "seed", "organism_seed": "org"}.get(path, path.split(".")[-1] + "=")
    return f"{short}{value}"


def model_pairs(cfg: SweepConfig) -> list[tuple[dict, dict]]:
    """(overrides, labels) of each (teacher model, other model) of a cross-model grid; [({}, {})] without
    `models`."""
    if cfg.models is None:
        return [({}, {})]
    out = []
    for t in cfg.models:
        others: list[str | None] = [s for s in cfg.models if s != t] + ([None] if cfg.other_seed else [])
        for s in others:
            over = {"reference": t, "controls.cross_init": True, "controls.other_reference": s}
            out.append((over, {"reference": t, "controls.other_reference": s or OTHER_SEED}))
    return out


def expand(cfg: SweepConfig, base_replicates: list[int] | None = None) -> list[dict]:
    """-> [{"name", "overrides": {path: value}, "labels": {axis: value}}], in a stable order.
    `base_replicates`: the base experiment's `replicates`, the seeds axis when `seeds` is not given."""
    conds = cfg.all_conditions()
    unknown = [c for c in cfg.conditions if c not in conds]
    if unknown:
        raise SublabError(
            f"unknown condition(s) {unknown}; known: {', '.join(conds)} (or define them in condition_defs)"
        )
    if cfg.mode == "list":
        out = []
        for i, r in enumerate(cfg.runs):
            for p in r:
                check_path(p)
            out.append({"name": f"run{i:03d}", "overrides": dict(r), "labels": {k: r[k] for k in r}})
        return out
    axes: dict[str, list] = {}
    if cfg.targets is not None:
        axes["trait.target"] = cfg.targets
    if cfg.organism_seeds is not None:
        axes["organism_seed"] = cfg.organism_seeds
    seeds = cfg.seeds if cfg.seeds is not None else base_replicates
    if seeds is not None:
        axes["seed"] = seeds
    axes.update(cfg.axes)
    for path, values in axes.items():
        check_path(path)
        if not values:
            raise SublabError(f"sweep axis '{path}' is empty; give it at least one value")
    if not cfg.conditions:
        raise SublabError("sweep `conditions` is empty; give at least one (e.g. [sft])")
    runs = []
    for cond in cfg.conditions:
        for pair_over, pair_labels in model_pairs(cfg):
            for combo in itertools.product(*axes.values()):
                labels = {**pair_labels, **dict(zip(axes, combo, strict=True))}
                name = "-".join([cond, *(_label(p, v) for p, v in labels.items())])
                runs.append(
                    {
                        "name": name,
                        "overrides": {**conds[cond], **pair_over, **dict(zip(axes, combo, strict=True))},
                        "labels": {"condition": cond, **labels},
                    }
                )
    return runs


def base_path(cfg: SweepConfig, sweep_file: Path) -> Path:
    base = Path(cfg.base)
    return base if base.is_absolute() else sweep_file.parent / base


def run_config(
    base_data: dict, source: str, sweep_set: dict[str, Any], overrides: dict[str, Any]
) -> ExperimentConfig:
    """One run's experiment config: the base experiment + the sweep's `set` + the run's overrides. A run
    is one replicate: the base's `replicates` list became the sweep's seeds axis."""
    items = [f"{k}={_yaml_value(v)}" for k, v in {**sweep_set, **overrides, "replicates": None}.items()]
    return validate(ExperimentConfig, apply_overrides(base_data, items), f"{source} + sweep overrides")


def _yaml_value(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip()


def load_sweep(root: Path) -> dict:
    p = root / "sweep.json"
    if not p.is_file():
        raise SublabError(
            f"{root} is not a sweep folder (no sweep.json); run `sublab sweep SWEEP.yaml` first"
        )
    return read_json(p)
