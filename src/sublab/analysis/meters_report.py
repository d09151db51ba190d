"""Reports of the leak meters and the defenses: per run (results.json keys `divergence`, `coverage`,
`quality`, `defenses` and their report sections) and per sweep ("Leak meters against transfer": each
meter's Spearman correlation with the observed student - control effect across a sweep's teachers, and
its AUROC). The sweep's defenses table and figures are in defenses_report.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sublab.records import read_json

# ---- one run ------------------------------------------------------------------------------------------


def meter_results(run_dir: Path) -> dict:
    """`divergence` (data/divergence.json), `coverage` (data/coverage.json), `quality` (per model:
    eval/NAME/quality.json) and `defenses` (what was done to the student's data): only what exists."""
    out: dict = {}
    for key in ("divergence", "coverage"):
        p = run_dir / "data" / f"{key}.json"
        if p.is_file():
            out[key] = read_json(p)
    pc = run_dir / "data" / "prompted_classifier.json"
    if pc.is_file():
        out["prompted_classifier"] = {k: v for k, v in read_json(pc).items() if k != "per_trial"}
    quality = {p.parent.name: read_json(p) for p in sorted((run_dir / "eval").glob("*/quality.json"))}
    if quality:
        out["quality"] = quality
    defenses: dict = {}
    if (run_dir / "data" / "mixed.json").is_file():
        defenses["mix_teachers"] = read_json(run_dir / "data" / "mixed.json")["composition"]
    if out.get("divergence", {}).get("masked"):
        defenses["masked_tokens"] = out["divergence"].get("masked_tokens")
    sub = run_dir / "data" / "subsample.json"
    if sub.is_file() and read_json(sub).get("paraphrase"):
        defenses["paraphrase"] = True
    if defenses:
        out["defenses"] = defenses
    return out


def _f(x, nd: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def meters_run_markdown(res: dict) -> list[str]:
    """The report sections of the divergence meter, the coverage screen, the task-quality cost and the
    defenses applied (if present)."""
    lines: list[str] = []
    d = res.get("defenses")
    if d:
        lines += ["", "## Defenses applied to the student's data", ""]
        if "mix_teachers" in d:
            parts = ", ".join(f"{k.removeprefix('other_')} {v}" for k, v in d["mix_teachers"].items())
            lines.append(f"- Teacher mixing: the student's examples come from {parts}.")
        if "masked_tokens" in d:
            lines.append(f"- Divergence-token mask: {d['masked_tokens']} answer tokens left out of the loss.")
        if d.get("paraphrase"):
            lines.append(
                "- Paraphrased prompts: every source's kept answers are paired with reworded prompts."
            )
    pc = res.get("prompted_classifier")
    if pc:
        lines += [
            "",
            "## Classifier control (prompted model)",
            "",
            f"{pc['model']} ({pc['mode']}) was shown {pc['settings']['examples_per_set']} teacher answers and as "
            "many control answers per trial and asked which set the model that loves the target wrote. "
            "Chance is 50%; a model that always names the same side scores 50% too (see answered).",
            "",
            "| trials scored | accuracy | 95% Wilson CI | p vs 50% | mean P(correct) | unparseable | answered |",
            "|---|---|---|---|---|---|---|",
            f"| {pc['scored']} | {_f(pc['accuracy'], 3)} | [{_f(pc['lo'], 3)}, {_f(pc['hi'], 3)}] "
            f"| {'n/a' if pc.get('p_vs_chance') is None else format(pc['p_vs_chance'], '.2g')} | {_f(pc.get('mean_p_correct'), 3)} | {pc['unparseable']} "
            f"| {pc.get('answered')} |",
        ]
    dv = res.get("divergence")
    if dv:
        cf = ", ".join(f"{k} ({v})" for k, v in dv["counterfactuals"].items())
        r = dv["rate_per_answer"]
        lines += [
            "",
            "## Divergence tokens",
            "",
            f"Positions of the {dv['n_answers']} answers the students train on ({dv['n_tokens']} tokens) where "
            f"the teacher's most likely token differs from a counterfactual's: {cf}"
            + (
                " (rule sampled: only where the sampled token is the teacher's most likely one)."
                if dv.get("rule") == "sampled"
                else "."
            ),
            "",
            "| measure | value |",
            "|---|---|",
            f"| divergence tokens, pooled share | {_f(dv['rate_pooled'])} |",
            f"| per answer, mean [95% CI] | {_f(r['mean'])} [{_f(r['lo'])}, {_f(r['hi'])}] |",
            f"| answers with at least one | {_f(dv['answers_with_any'])} |",
            *[f"| against {k} | {_f(v)} |" for k, v in dv["per_counterfactual"].items()],
            f"| sampled token = teacher's most likely | {_f(dv['sampled_is_teacher_argmax'])} |",
        ]
    cv = res.get("coverage")
    if cv:
        lines += ["", "## First-step coverage screen", ""]
        if "skipped" in cv:
            lines.append(f"Skipped: {cv['skipped']}.")
        else:
            lines += [
                "Cosine of the student's first update at the reference (SGD: -gradient; Adam: -sign of it) with "
                f"the teacher's displacement from the reference (norm {cv['displacement_norm']:.4g}); the control "
                "data is the baseline. Chunks: the same on disjoint parts, mean [95% CI].",
                "",
                "| data | answers | cos SGD | cos Adam | cos Adam, chunks |",
                "|---|---|---|---|---|",
            ]
            for label in ("teacher_data", "control_data"):
                c = cv[label]
                ch = c["cos_adam_chunks"]
                lines.append(
                    f"| {label.replace('_', ' ')} | {c['n']} | {_f(c['cos_sgd'])} | {_f(c['cos_adam'])} "
                    f"| {_f(ch['mean'])} [{_f(ch['lo'])}, {_f(ch['hi'])}] |"
                )
            diff = cv["difference"]
            lines.append(f"| teacher - control | | {diff['cos_sgd']:+.4f} | {diff['cos_adam']:+.4f} | |")
    q = res.get("quality")
    if q:
        lines += [
            "",
            "## Task quality (what a defense costs)",
            "",
            "Each model's filter pass rate on held-out number prompts, and its loss per token on the "
            "reference's kept answers to them (lower = closer to the number task without a trait).",
            "",
            "| model | prompts | pass rate | task loss (nats/token) |",
            "|---|---|---|---|",
        ]
        for name, x in q.items():
            lines.append(
                f"| {name} | {x['n_prompts']} | {_f(x['pass_rate'], 3)} | {_f(x.get('task_loss'))} |"
            )
    return lines


# ---- a sweep ------------------------------------------------------------------------------------------

METERS = {
    "KL per token": lambda r: (r.get("leak") or {}).get("kl_per_token"),
    "KL per answer": lambda r: (r.get("leak") or {}).get("kl_per_answer"),
    "LLR per answer": lambda r: (r.get("leak") or {}).get("llr_per_answer"),
    "divergence-token rate": lambda r: (r.get("meters") or {}).get("divergence_rate"),
    "coverage, Adam (teacher - control)": lambda r: (r.get("meters") or {}).get("coverage_adam"),
    "coverage, SGD (teacher - control)": lambda r: (r.get("meters") or {}).get("coverage_sgd"),
}
"""Leak meters as read from a sweep row (collect + meter_row)."""


def meter_row(row: dict, res: dict) -> None:
    """Copy a run's divergence rate, coverage differences and per-model task quality into its sweep row."""
    m: dict = {}
    dv = res.get("divergence")
    if dv and dv.get("rate_pooled") is not None:
        m["divergence_rate"] = dv["rate_pooled"]
    cv = res.get("coverage")
    if cv and "difference" in cv:
        m["coverage_adam"], m["coverage_sgd"] = cv["difference"]["cos_adam"], cv["difference"]["cos_sgd"]
    if m:
        row["meters"] = m
    pc = res.get("prompted_classifier")
    if pc and pc.get("accuracy") is not None:
        # compared with chance across units, as the probe is (sweep_report.control_effects)
        row.setdefault("controls_p", {}).update(
            {"prompted_classifier_accuracy": pc["accuracy"], "chance": 0.5}
        )
        row.setdefault("controls_pairs", []).append(["prompted_classifier_accuracy", "chance"])
    if res.get("quality"):
        row["quality"] = {
            name: {"pass_rate": q["pass_rate"], "task_loss": q.get("task_loss")}
            for name, q in res["quality"].items()
        }


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Probability that a positive's score exceeds a negative's (ties count half); nan without both.

    >>> auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    0.75
    """
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def meter_predictions(rows: list[dict]) -> list[dict]:
    """Per meter, across the runs (teachers) that have it: Spearman's rho (and p) with the run's own
    student - control P(target), and the AUROC of the meter for runs whose effect is above the median
    effect of those runs (high against low transfer; with most teachers transferring something, effect
    > 0 would leave no negatives). Over all runs (group "all"), and, when the sweep has several
    conditions or settings, within each (a setting such as the teacher's strength can drive both the
    meter and the effect; within it, the meter must rank what remains)."""
    groups: dict[str, list[dict]] = {"all": rows}
    labels = {" / ".join(x for x in (r["condition"], r.get("setting", "")) if x) for r in rows}
    if len(labels) > 1:
        for label in sorted(labels):
            groups[label] = [
                r for r in rows if " / ".join(x for x in (r["condition"], r.get("setting", "")) if x) == label
            ]
    return [p for group, rs in groups.items() for p in _predictions(rs, group)]


def _predictions(rows: list[dict], group: str) -> list[dict]:
    from scipy.stats import spearmanr

    out = []
    for name, get in METERS.items():
        pts = [
            (get(r), r["p"]["student"] - r["p"]["control"])
            for r in rows
            if get(r) is not None and r["p"].get("student") is not None and r["p"].get("control") is not None
        ]
        if len(pts) < 5:
            continue
        x, y = [a for a, _ in pts], [b for _, b in pts]
        rho, p = spearmanr(x, y) if len(set(x)) > 1 and len(set(y)) > 1 else (math.nan, math.nan)
        median = float(np.median(y))
        high = [b > median for b in y]
        out.append(
            {
                "group": group,
                "meter": name,
                "n": len(pts),
                "spearman": float(rho),
                "p": float(p),
                "auroc": auroc(x, high),
                "median_effect": median,
                "above_median": sum(high),
                "positive_effects": sum(b > 0 for b in y),
            }
        )
    return out


def meters_sweep_markdown(preds: list[dict]) -> list[str]:
    if not preds:
        return []
    lines = [
        "",
        "## Leak meters against transfer",
        "",
        "Across the sweep's runs (each a teacher at one replicate seed): Spearman's rho between each meter "
        "and that run's student - control P(target), with its p-value, and the meter's AUROC for telling "
        "runs with an effect above the median (high transfer) from the rest. One seed per teacher makes "
        "each run's effect noisy: a weak correlation may be the effect's noise, not the meter's. Rows per "
        "condition or setting rank within it: a setting that moves both the meter and the effect (a "
        "teacher's strength) makes the pooled correlation easy.",
        "",
        "| runs | meter | n | Spearman rho | p | AUROC (above-median effect) | median effect | runs with effect > 0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in preds:
        lines.append(
            f"| {m['group']} | {m['meter']} | {m['n']} | {m['spearman']:+.3f} | {m['p']:.2g} | {_f(m['auroc'], 3)} "
            f"| {m['median_effect']:+.4f} | {m['positive_effects']} |"
        )
    return lines
