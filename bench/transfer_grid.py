"""Transfer across organism seeds x targets, with CIs across (seed, target) units.

For each seed and target it runs the quickstart recipe in four conditions, sharing finished stages
between runs of the same seed (a run folder is started from a copy of the previous one, so stages whose
config and inputs are unchanged, e.g. the reference's data and the control students, are skipped):
    sft       finetuned teacher, SFT student, control, cross-init student + its control
    soft      finetuned teacher, soft-label student and control
    prompted  system-prompted teacher, SFT student and control
Per unit the effect is student - control (mean over the 50 questions); the table gives the mean over
units with a 95% t-interval across units (n = seeds x targets) and per target across seeds.

    python bench/transfer_grid.py [--seeds 0 1 2] [--targets owl dolphin wolf] [--out runs/grid]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from sublab.config import load_config
from sublab.experiment import ExperimentConfig
from sublab.pipeline import run_experiment
from sublab.records import atomic_write_json, atomic_write_text, read_json
from sublab.stats import excludes_zero, mean_ci

CONDITIONS = {
    "sft": ["controls.cross_init=true"],
    "soft": ["student.train.method=soft_label"],
    "prompted": ["teacher.kind=system_prompt"],
}
PAIRS = {
    "sft": [("student", "control"), ("cross_init", "cross_init_control")],
    "soft": [("student", "control")],
    "prompted": [("student", "control")],
}


def p(res: dict, model: str, metric: str = "p_target") -> float:
    return res["models"][model][metric]["mean"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--targets", nargs="+", default=["owl", "dolphin", "wolf"])
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS))
    ap.add_argument("--out", default="runs/grid")
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    t0 = time.time()
    for seed in args.seeds:
        prev = None
        for cond in args.conditions:
            for target in args.targets:
                run_dir = out / f"seed{seed}-{cond}-{target}"
                if prev is not None and not (run_dir / "results.json").exists():
                    shutil.rmtree(run_dir, ignore_errors=True)
                    shutil.copytree(prev, run_dir)  # share finished stages (reference data, controls)
                cfg = load_config(
                    args.config,
                    ExperimentConfig,
                    [
                        f"seed={seed}",
                        f"trait.target={target}",
                        "progress=false",
                        f"name=seed{seed}-{cond}-{target}",
                        *CONDITIONS[cond],
                    ],
                )
                t = time.time()
                run = run_experiment(cfg, run_dir)
                res = read_json(run_dir / "results.json")
                row = {
                    "seed": seed,
                    "target": target,
                    "condition": cond,
                    "seconds": round(time.time() - t, 1),
                    "stages_run": len(run.ran),
                    "stages_skipped": len(run.skipped),
                    "p": {m: p(res, m) for m in res["models"]},
                    "share": {m: p(res, m, "share_of_named") for m in res["models"]},
                }
                for a, b in PAIRS[cond]:
                    row[f"{a}-{b}"] = p(res, a) - p(res, b)
                    row[f"share:{a}-{b}"] = row["share"][a] - row["share"][b]
                rows.append(row)
                print(
                    f"seed {seed} {cond:8s} {target:8s} "
                    + " ".join(f"{m}={v:.3f}" for m, v in row["p"].items())
                    + f"  ({row['seconds']}s, {row['stages_skipped']} stages reused)",
                    flush=True,
                )
                prev = run_dir
    summary = {
        "seeds": args.seeds,
        "targets": args.targets,
        "wall_seconds": round(time.time() - t0, 1),
        "rows": rows,
        "effects": {},
    }
    lines = [
        "| condition | effect | metric | mean | 95% CI across units | n | CI excludes 0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for cond in args.conditions:
        for a, b in PAIRS[cond]:
            for metric, key in (("P(target)", f"{a}-{b}"), ("share of named", f"share:{a}-{b}")):
                units = [r for r in rows if r["condition"] == cond]
                ci = mean_ci([r[key] for r in units])
                per_target = {t: mean_ci([r[key] for r in units if r["target"] == t]) for t in args.targets}
                summary["effects"][f"{cond}:{key}"] = {
                    **ci,
                    "excludes_zero": excludes_zero(ci),
                    "per_target": per_target,
                }
                lines.append(
                    f"| {cond} | {a} - {b} | {metric} | {ci['mean']:+.4f} | [{ci['lo']:+.4f}, {ci['hi']:+.4f}] "
                    f"| {ci['n']} | {'yes' if excludes_zero(ci) else 'no'} |"
                )
    lines += [
        "",
        "| condition | model | mean P(target) over units | 95% CI | mean share of named | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for cond in args.conditions:
        models = rows[[r["condition"] for r in rows].index(cond)]["p"]
        for m in models:
            ci = mean_ci([r["p"][m] for r in rows if r["condition"] == cond])
            sh = mean_ci([r["share"][m] for r in rows if r["condition"] == cond])
            lines.append(
                f"| {cond} | {m} | {ci['mean']:.4f} | [{ci['lo']:.4f}, {ci['hi']:.4f}] | {sh['mean']:.4f} "
                f"| [{sh['lo']:.4f}, {sh['hi']:.4f}] |"
            )
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wall time {summary['wall_seconds']} s; summary: {out / 'summary.md'}")


if __name__ == "__main__":
    main()
