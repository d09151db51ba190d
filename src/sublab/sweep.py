"""Sweeps: many experiments (targets x seeds x conditions x any config axis) from one YAML file, run by
the local executor in one process, with every stage that two runs share computed once (a content-
addressed stage store under <sweep>/stages/), and one aggregated report.

    sublab sweep configs/sweep-quickstart.yaml [--out runs/sweep-quickstart]

    name: sweep-quickstart
    base: quickstart.yaml              # experiment config, relative to this file
    targets: [owl, dolphin, wolf]      # shorthand for the axis trait.target
    seeds: [0, 1, 2]                   # shorthand for the axis seed
    conditions: [sft, cross-init]      # named conditions (CONDITIONS) or your own in condition_defs
    axes: {student.train.lr: [1.0e-4, 3.0e-4]}   # any config path with a list of values
"""

from __future__ import annotations

import difflib
import itertools
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, model_validator
from tqdm import tqdm

from sublab.config import Strict, apply_overrides, read_yaml, validate
from sublab.errors import SublabError
from sublab.experiment import ExperimentConfig
from sublab.records import atomic_write_json, read_json

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
    """Shorthand for the axis seed."""
    conditions: list[str] = ["sft"]
    """Named conditions, each a set of overrides: built in sft, soft, prompted, cross-init."""
    condition_defs: dict[str, dict[str, Any]] = {}
    """Your own named conditions: name -> {config path: value}."""
    axes: dict[str, list] = {}
    """Any config path -> list of values."""
    runs: list[dict[str, Any]] = []
    """list mode: one {config path: value} mapping per run."""
    retries: int = 0
    """How often a failed run is retried before the sweep records it as failed."""
    resources: RayResources = RayResources()
    """Ray executor: what each run asks the cluster for."""

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if self.mode == "list" and not self.runs:
            raise ValueError("mode: list needs a non-empty `runs` list")
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


def _label(path: str, value: Any) -> str:
    short = {"trait.target": "", "seed": "seed"}.get(path, path.split(".")[-1] + "=")
    return f"{short}{value}"


def expand(cfg: SweepConfig) -> list[dict]:
    """-> [{"name", "overrides": {path: value}, "labels": {axis: value}}], in a stable order."""
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
    if cfg.seeds is not None:
        axes["seed"] = cfg.seeds
    axes.update(cfg.axes)
    for path, values in axes.items():
        check_path(path)
        if not values:
            raise SublabError(f"sweep axis '{path}' is empty; give it at least one value")
    if not cfg.conditions:
        raise SublabError("sweep `conditions` is empty; give at least one (e.g. [sft])")
    runs = []
    for cond in cfg.conditions:
        for combo in itertools.product(*axes.values()):
            labels = dict(zip(axes, combo, strict=True))
            name = "-".join([cond, *(_label(p, v) for p, v in labels.items())])
            runs.append(
                {
                    "name": name,
                    "overrides": {**conds[cond], **labels},
                    "labels": {"condition": cond, **labels},
                }
            )
    return runs


def run_config(cfg: SweepConfig, sweep_file: Path, overrides: dict[str, Any]) -> ExperimentConfig:
    base = Path(cfg.base)
    if not base.is_absolute():
        base = sweep_file.parent / base
    data = read_yaml(base)
    items = [f"{k}={_yaml_value(v)}" for k, v in {**cfg.set, **overrides}.items()]
    return validate(ExperimentConfig, apply_overrides(data, items), f"{base} + sweep overrides")


def _yaml_value(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip()


def _run_one(cfg_json: dict, run_dir: str, shared: str, retries: int) -> dict:
    """One experiment of a sweep (also the process-pool worker): retries crashes, returns its record."""
    from sublab.backends.registry import quiet_transformers
    from sublab.pipeline import run_experiment

    quiet_transformers()  # pool workers do not go through the CLI's main()
    ecfg = ExperimentConfig.model_validate(cfg_json)
    rec: dict = {"status": "failed", "attempts": 0}
    for attempt in range(retries + 1):
        rec["attempts"] = attempt + 1
        try:
            run = run_experiment(ecfg, run_dir, shared=shared)
        except SublabError as e:  # a user error: retrying will not help
            rec["error"] = str(e)[:500]
            break
        except Exception as e:  # a crashed run: retry, then record and go on
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
            continue
        rec.update(
            status="done",
            stages_run=len(run.ran),
            stages_skipped=len(run.skipped),
            stages_shared=len(run.reused),
        )
        rec.pop("error", None)
        break
    return rec


def run_sweep(
    sweep_file: str | Path,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    workers: int = 1,
    executor: Literal["local", "ray"] = "local",
    address: str | None = None,
) -> Path:
    """Expand and run every experiment of the sweep (resumable), then write the aggregated report.
    local, workers > 1: a process pool; each worker uses the experiment's `threads`, and workers x
    threads may not exceed the machine's cores. ray: one Ray task per run (see sweep_ray.py); `address`
    joins a running cluster ("auto" or host:port), else a local Ray instance is started and shut down.
    Either way shared stages are computed once (a lock per stage in the shared store)."""
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from sublab.sweep_report import write_sweep_report
    from sublab.threads import resolve_threads

    sweep_file = Path(sweep_file)
    cfg = validate(SweepConfig, apply_overrides(read_yaml(sweep_file), overrides or []), str(sweep_file))
    runs = expand(cfg)
    configs = {r["name"]: run_config(cfg, sweep_file, r["overrides"]) for r in runs}  # validate all first
    threads = max(resolve_threads(c.threads) for c in configs.values())
    cores = os.cpu_count() or 1
    if executor == "local" and (workers < 1 or workers * threads > cores):
        raise SublabError(
            f"--workers {workers} x {threads} thread(s) per run would oversubscribe this machine's {cores} "
            f"cores; use --workers {max(1, cores // threads)} or fewer"
        )
    root = Path(out or f"runs/{cfg.name}").resolve()  # absolute: Ray workers may start elsewhere
    root.mkdir(parents=True, exist_ok=True)
    state = {
        "sweep": cfg.model_dump(mode="json"),
        "sweep_file": str(sweep_file),
        "runs": [],
        "executor": executor,
        "workers": workers,
    }
    if executor == "ray":  # connect first: a bad address fails before anything starts
        from sublab.sweep_ray import connect

        state["ray"] = connect(address, num_cpus=min(cores, max(1, workers) * threads))
        parallel = max(1, int(state["ray"]["cluster_cpus"] // (cfg.resources.cpus or threads)))
    else:
        parallel = workers
    bar = tqdm(total=len(runs), desc=f"sweep {cfg.name}", disable=not progress)
    counts = {"done": 0, "failed": 0, "stages_run": 0, "stages_skipped": 0, "stages_shared": 0}
    t0 = time.time()
    tasks = {
        r["name"]: (
            configs[r["name"]]
            .model_copy(update={"progress": False, "name": r["name"]})
            .model_dump(mode="json"),
            str(root / "runs" / r["name"]),
            str(root / "stages"),
            cfg.retries,
        )
        for r in runs
    }
    records: dict[str, dict] = {}

    def finished(name: str, rec: dict) -> None:
        records[name] = rec
        counts[rec["status"]] += 1
        for k in ("stages_run", "stages_skipped", "stages_shared"):
            counts[k] += rec.get(k, 0)
        done = [
            {**r, "folder": f"runs/{r['name']}", **records[r["name"]]} for r in runs if r["name"] in records
        ]
        state.update(runs=done, counts=counts, seconds=round(time.time() - t0, 1))
        atomic_write_json(root / "sweep.json", state)  # progress on disk after every run
        bar.update(1)
        left = len(runs) - len(records)
        bar.set_postfix(
            done=counts["done"],
            failed=counts["failed"],
            running=min(parallel, left),
            queued=max(0, left - parallel),
        )

    if executor == "ray":
        from sublab.sweep_ray import run_on_ray

        state["ray"]["seconds"] = run_on_ray(tasks, cfg.resources, threads, finished, cfg.retries)
    elif workers == 1:
        for r in runs:
            finished(r["name"], _run_one(*tasks[r["name"]]))
    else:
        # spawn, not fork: a forked child of a process that already ran torch can deadlock
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, *tasks[r["name"]]): r["name"] for r in runs}
            for fut in as_completed(futures):
                finished(futures[fut], fut.result())
    bar.close()
    write_sweep_report(root)
    if counts["failed"]:
        errs = "; ".join(f"{e['name']}: {e.get('error')}" for e in state["runs"] if e["status"] == "failed")
        raise SublabError(f"{counts['failed']} run(s) failed ({errs}); rerun the sweep to retry them")
    return root


def load_sweep(root: Path) -> dict:
    p = root / "sweep.json"
    if not p.is_file():
        raise SublabError(
            f"{root} is not a sweep folder (no sweep.json); run `sublab sweep SWEEP.yaml` first"
        )
    return read_json(p)
