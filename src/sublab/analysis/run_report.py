"""Report of one run (one replicate seed), rebuilt from its files (eval/*/results.json, the filter stats,
data/subsample.json, config.yaml, the arm table in manifest.json): results.json (versioned schema),
report.md, report.html and figures/preference.png.

A run is one unit of replication: its spread across the evaluation questions describes the run and is
not evidence of an effect (the questions share one trained model). Effects with CIs and p-values come
from several replicate seeds (`replicates:` in the config, or `sublab sweep`; analysis/sweep_report.py).

    sublab report runs/quickstart/runs/seed0
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import yaml

from sublab.analysis.meters_report import meter_results, meters_run_markdown
from sublab.errors import SublabError
from sublab.records import atomic_write_json, atomic_write_text, read_json

SCHEMA_VERSION = 3
_CI = ("mean", "lo", "hi", "n")
ORDER = ["reference", "teacher", "control", "student", "other_reference", "cross_init_control", "cross_init"]
DESCRIBED = [("teacher", "reference"), ("control", "reference")]
"""Differences described in every run besides each arm against its control."""


def controls_of(arm: dict) -> list[str]:
    """The arms an arm is compared with (results of older versions hold one name or null)."""
    c = arm.get("compare_with")
    return [c] if isinstance(c, str) else list(c or [])


def describe_diff(a: list[float], b: list[float]) -> dict:
    """a - b per question: the mean and how it spreads over the questions (sd, min, max). Description of
    one run, not a test: the questions are not independent replications."""
    d = np.asarray(a, float) - np.asarray(b, float)
    return {
        "mean": float(d.mean()),
        "sd_over_questions": float(d.std(ddof=1)) if d.size > 1 else 0.0,
        "min": float(d.min()),
        "max": float(d.max()),
        "n_questions": int(d.size),
    }


def filter_table(run_dir: Path, arms: list[dict]) -> dict:
    """Filter pass counts per data source (teacher, reference, control teachers)."""
    from sublab.arms import data_dir

    sources = ["teacher", "reference"] + [a["data"] for a in arms if a["data"].startswith("teacher_")]
    out = {}
    for name in dict.fromkeys(sources):
        p = run_dir / data_dir(name) / "filter" / "filter_stats.json"
        if p.is_file():
            st = read_json(p)
            out[name] = {k: st[k] for k in ("n_in", "n_passed", "pass_rate")}
            out[name]["removed_by_step"] = {x["step"]: x["n_removed"] for x in st.get("steps", [])}
    return out


def filter_markdown(res: dict) -> list[str]:
    """The report's Filter section: answers per source, how many each filter step removed (in the chain's
    order), and how many passed and were trained on."""
    if not res["filter"]:
        return []
    steps = list(dict.fromkeys(s for st in res["filter"].values() for s in st.get("removed_by_step", {})))
    head = ["data from", "answers", *(f"- {s}" for s in steps), "passed", "pass rate", "trained on"]
    lines = ["", "## Filter", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n = res["data"].get("n_per_source", "?")
    for name, st in res["filter"].items():
        by = st.get("removed_by_step", {})
        cells = [
            name,
            st["n_in"],
            *(by.get(s, "") for s in steps),
            st["n_passed"],
            f"{st['pass_rate']:.3f}",
            n,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def build_results(run_dir: Path) -> dict:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    evals = {p.parent.name: read_json(p) for p in sorted((run_dir / "eval").glob("*/results.json"))}
    manifest = run_dir / "manifest.json"
    if manifest.is_file() and "evaluated" in (m := read_json(manifest)):
        evals = {k: v for k, v in evals.items() if k in m["evaluated"]}  # not stale ones of an older config
    if not evals:
        raise SublabError(f"{run_dir}: no eval/*/results.json; run the experiment first (sublab run CONFIG)")
    target = cfg.get("trait", {}).get("target") or next(iter(next(iter(evals.values()))["targets"]))
    models = {}
    for name in sorted(evals, key=lambda n: ORDER.index(n) if n in ORDER else 99):
        r = evals[name]
        top = sorted(r["distribution"].items(), key=lambda kv: -kv[1])[:5]
        t = r["targets"][target]
        models[name] = {
            "p_target": {k: t[k] for k in _CI},
            "share_of_named": {k: t["share_of_named"][k] for k in _CI},
            "named_mass": {k: r["named_mass"][k] for k in _CI},
            "targets": {tt: {k: v[k] for k in _CI} for tt, v in r["targets"].items()},
            "top_answers": dict(top),
        }
    arms = m.get("arms", []) if manifest.is_file() else []
    pairs = [(a["name"], c) for a in arms for c in controls_of(a)] + DESCRIBED
    comparisons = {}
    for a, b in pairs:
        if a in evals and b in evals:
            ta, tb = evals[a]["targets"][target], evals[b]["targets"][target]
            comparisons[f"{a}_minus_{b}"] = {
                **describe_diff(ta["per_question"], tb["per_question"]),
                "share_of_named": describe_diff(
                    ta["share_of_named"]["per_question"], tb["share_of_named"]["per_question"]
                ),
            }
    filt = filter_table(run_dir, arms)
    sub = run_dir / "data" / "subsample.json"
    data = read_json(sub) if sub.is_file() else {}
    first = next(iter(evals.values()))
    res = {
        "schema_version": SCHEMA_VERSION,
        "name": cfg.get("name"),
        "seed": cfg.get("seed"),
        "organism_seed": cfg.get("organism_seed", 0),
        "trait": {"category": cfg.get("trait", {}).get("category"), "target": target},
        "teacher_kind": cfg.get("teacher", {}).get("kind"),
        "student_method": cfg.get("student", {}).get("train", {}).get("method"),
        "eval_mode": first["mode"],
        "eval_estimand": first.get("estimand", first["mode"]),
        "n_questions": first["n_questions"],
        "spread": "over the evaluation questions of this one run: description, not evidence (see sweep "
        "reports for effects across replicate seeds)",
        "arms": arms,
        "data": data,
        "models": models,
        "comparisons": comparisons,
        "filter": filt,
    }
    # --- ICL control, KL leak meter, classifier probe (only when the run has them) ---
    res.update(control_results(run_dir, target, evals))
    res.update(meter_results(run_dir))  # divergence tokens, coverage, task quality, defenses
    # --- end of the controls and meters block ---
    return res


def render_markdown(res: dict) -> str:
    t = res["trait"]["target"]
    lines = [
        f"# sublab report: {res['name']}",
        "",
        f"Trait: favorite {res['trait']['category']} = **{t}**; teacher: {res['teacher_kind']}; "
        f"student: {res['student_method']}; evaluation: {res['eval_estimand']} over {res['n_questions']} "
        f"questions; replicate seed {res['seed']}, organism seed {res['organism_seed']}.",
        "",
        "One run is one replicate: the intervals below describe how P(target) spreads over the "
        f"{res['n_questions']} questions of this run; they are not evidence of an effect. Evidence is the "
        "effect across replicate seeds (`replicates:` in the config, or `sublab sweep`).",
        "",
        f"| model | P({t}) | 95% t-interval over questions | P({t} given an {res['trait']['category']} is named) "
        "| named mass | top answers |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        p = m["p_target"]
        top = ", ".join(f"{k} {v:.2f}" for k, v in m["top_answers"].items())
        sh, nm = m["share_of_named"], m["named_mass"]
        lines.append(
            f"| {name} | {p['mean']:.3f} | [{p['lo']:.3f}, {p['hi']:.3f}] | {sh['mean']:.3f} "
            f"[{sh['lo']:.3f}, {sh['hi']:.3f}] | {nm['mean']:.2f} | {top} |"
        )
    if res["arms"]:
        lines += [
            "",
            "## Arms",
            "",
            "| arm | init | trains on answers of | soft labels from | compared with | role |",
            "|---|---|---|---|---|---|",
        ]
        for a in res["arms"]:
            lines.append(
                f"| {a['name']} | {a['init']} | {a['data']} | {a['soft_teacher'] or '-'} "
                f"| {', '.join(controls_of(a)) or '-'} | {a['role']} |"
            )
        if res["data"]:
            d = res["data"]
            lines += [
                "",
                f"Every arm trains on {d['n_per_source']} examples (min of the passed counts "
                f"{d['passed']} and filter.dataset_size {d['dataset_size']}).",
            ]
    lines += [
        "",
        "## Differences in this run (description)",
        "",
        "Mean over the questions, with the spread of the per-question differences; not a test.",
        "",
        "| comparison | metric | mean difference | sd over questions | min | max |",
        "|---|---|---|---|---|---|",
    ]
    for name, d in res["comparisons"].items():
        for label, x in (("P(target)", d), ("share of named", d["share_of_named"])):
            lines.append(
                f"| {name.replace('_minus_', ' - ')} | {label} | {x['mean']:+.3f} | {x['sd_over_questions']:.3f} "
                f"| {x['min']:+.3f} | {x['max']:+.3f} |"
            )
    lines += filter_markdown(res)
    lines += controls_run_markdown(res)  # ICL control, KL leak meter, classifier probe
    lines += meters_run_markdown(res)  # divergence tokens, coverage, task quality, defenses
    lines += [
        "",
        "![P(target)](figures/preference.png)",
        "",
    ]
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["models"])
    ps = [res["models"][n]["p_target"] for n in names]
    means = [p["mean"] for p in ps]
    err = [[p["mean"] - p["lo"] for p in ps], [p["hi"] - p["mean"] for p in ps]]
    colors = {
        "reference": "#999999",
        "teacher": "#d62728",
        "control": "#1f77b4",
        "student": "#ff7f0e",
        "other_reference": "#bbbbbb",
        "cross_init_control": "#9ecae1",
        "cross_init": "#fdae6b",
    }
    # students' effects only: the teacher's shows in the bars and would squash the axis
    comps = {k: v for k, v in res["comparisons"].items() if not k.startswith("teacher")}
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(1.2 * len(names) + 5, 3.8), gridspec_kw={"width_ratios": [len(names), 4]}
    )
    ax.bar(names, means, yerr=err, capsize=4, color=[colors.get(n, "#555555") for n in names])
    ax.set_ylabel(f"P({res['trait']['target']})")
    ax.set_title(
        f"{res['name']}: favorite {res['trait']['category']} = {res['trait']['target']} (spread over questions)",
        fontsize=9,
    )
    ax.tick_params(axis="x", labelrotation=20)
    # the effects against controls, on their own scale (the teacher's bar would hide them)
    labels = [k.replace("_minus_", " - ") for k in comps]
    ys = range(len(labels))
    ax2.errorbar(
        [c["mean"] for c in comps.values()],
        ys,
        # whiskers: the range of the per-question differences (description, not a CI)
        xerr=[[c["mean"] - c["min"] for c in comps.values()], [c["max"] - c["mean"] for c in comps.values()]],
        fmt="o",
        capsize=4,
        color="black",
    )
    ax2.axvline(0, color="#999999", lw=1)
    ax2.set_yticks(list(ys), labels, fontsize=8)
    ax2.set_xlabel(f"difference in P({res['trait']['target']})")
    ax2.set_title("differences in this run (range over questions)", fontsize=9)
    save_figure(fig, path)


def render_html(markdown: str) -> str:
    """A self-contained HTML page of report.md (its tables, headings, paragraphs and the figure)."""
    out = [
        "<!doctype html><meta charset='utf-8'><title>sublab report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}</style>",
    ]
    rows: list[str] = []

    def flush() -> None:
        if rows:
            out.append("<table>" + "".join(rows) + "</table>")
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-:"):
                continue
            tag = "th" if not rows else "td"
            rows.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1 : line.rindex(")")]
            out.append(f"<img src='{html.escape(src)}' style='max-width:100%'>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out) + "\n"


def write_report(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SublabError(f"run folder not found: {run_dir}")
    cfg = run_dir / "config.yaml"
    if (
        cfg.is_file()
        and (yaml.safe_load(cfg.read_text()) or {}).get("trait", {}).get("kind") == "misalignment"
    ):
        from sublab.analysis.misalignment_report import write_misalignment_report

        return write_misalignment_report(run_dir)
    res = build_results(run_dir)
    return publish(run_dir, res, render_markdown(res), plot, "preference.png")


def publish(run_dir: Path, res: dict, md: str, draw, figure: str) -> dict:
    """Write a run's results.json, report.md, report.html and its figure (draw(res, path))."""
    atomic_write_json(run_dir / "results.json", res)
    atomic_write_text(run_dir / "report.md", md)
    atomic_write_text(run_dir / "report.html", render_html(md))
    draw(res, run_dir / "figures" / figure)
    return res


# --- ICL control, KL leak meter, classifier probe --------------------------------------------


def control_results(run_dir: Path, target: str, evals: dict) -> dict:
    """`icl` (per k: P(target) with k teacher examples, with k control examples, and the difference),
    `leak` (data/leak.json without per-answer rows) and `classifier` (data/classifier.json): only the
    keys whose files exist."""
    out: dict = {}
    icl = {}
    for p in sorted((run_dir / "eval").glob("icl_teacher_k*/results.json")):
        k = int(p.parent.name.removeprefix("icl_teacher_k"))
        q = run_dir / "eval" / f"icl_control_k{k}" / "results.json"
        if not q.is_file():
            continue
        rt, rc = read_json(p), read_json(q)
        ta, tb = rt["targets"][target], rc["targets"][target]
        icl[k] = {
            "teacher": {x: ta[x] for x in _CI},
            "control": {x: tb[x] for x in _CI},
            "difference": describe_diff(ta["per_question"], tb["per_question"]),
            "mean_examples_used": {
                "teacher": rt.get("icl", {}).get("mean_examples_used"),
                "control": rc.get("icl", {}).get("mean_examples_used"),
            },
            "max_positions": rt.get("icl", {}).get("max_positions"),
        }
    if icl and "reference" in evals and target in evals["reference"]["targets"]:
        ref = evals["reference"]["targets"][target]
        icl.setdefault(
            0,
            {
                "teacher": {x: ref[x] for x in _CI},
                "control": {x: ref[x] for x in _CI},
                "difference": describe_diff(ref["per_question"], ref["per_question"]),
                "mean_examples_used": {"teacher": 0, "control": 0},
                "max_positions": None,
            },
        )
    if icl:
        out["icl"] = {str(k): icl[k] for k in sorted(icl)}
    leak = run_dir / "data" / "leak.json"
    if leak.is_file():
        out["leak"] = {k: v for k, v in read_json(leak).items() if k != "per_answer"}
    clf = run_dir / "data" / "classifier.json"
    if clf.is_file():
        out["classifier"] = read_json(clf)
    return out


def controls_run_markdown(res: dict) -> list[str]:
    """The report sections of the ICL control, the KL leak meter and the classifier probe (if present)."""
    t = res["trait"]["target"]
    lines: list[str] = []
    if res.get("icl"):
        lines += [
            "",
            "## In-context control",
            "",
            f"The reference model with k examples in context before each question: P({t}) with k of the "
            "teacher's kept answers vs k of the control data's, and the difference (mean over questions, "
            "spread over questions: description). Examples used: the mean per question after dropping the "
            "oldest ones to fit the model's context.",
            "",
            f"| k | P({t}) teacher examples | P({t}) control examples | difference | sd over questions "
            "| examples used (teacher / control) |",
            "|---|---|---|---|---|---|",
        ]
        for k, e in sorted(res["icl"].items(), key=lambda kv: int(kv[0])):  # JSON sorts keys as text
            a, b, d, u = e["teacher"], e["control"], e["difference"], e["mean_examples_used"]
            used = " / ".join("n/a" if x is None else f"{x:.1f}" for x in (u["teacher"], u["control"]))
            lines.append(
                f"| {k} | {a['mean']:.4f} [{a['lo']:.4f}, {a['hi']:.4f}] | {b['mean']:.4f} "
                f"[{b['lo']:.4f}, {b['hi']:.4f}] | {d['mean']:+.4f} | {d['sd_over_questions']:.4f} | {used} |"
            )
    if res.get("leak"):
        lk = res["leak"]
        lines += ["", "## Leak meter: teacher vs reference on the kept teacher data", ""]
        if "skipped" in lk:
            lines.append(f"Skipped: {lk['skipped']}.")
        else:
            lines += [
                f"Exact KL(teacher || reference) over the full vocabulary at each answer token, on "
                f"{lk['n_answers']} kept teacher answers ({lk['n_tokens']} tokens); LLR = log P_teacher(answer) "
                "- log P_reference(answer). 95% t-intervals over answers.",
                "",
                "| measure | mean | 95% CI |",
                "|---|---|---|",
            ]
            for label, key in (
                ("KL per token (nats)", "kl_per_token"),
                ("KL per answer (nats)", "kl_per_answer"),
                ("LLR per answer (nats)", "llr_per_answer"),
            ):
                x = lk[key]
                lines.append(f"| {label} | {x['mean']:.5f} | [{x['lo']:.5f}, {x['hi']:.5f}] |")
    if res.get("classifier"):
        c = res["classifier"]
        lines += [
            "",
            "## Classifier control (probe)",
            "",
            "A logistic-regression probe on bag-of-numbers + length features, trained on half of the teacher "
            "and control kept answers, tested on the other half (not the paper's prompted-LLM classifier). "
            "Chance is 50%.",
            "",
            "| test answers | accuracy | 95% Wilson CI | p vs 50% (binomial) | train accuracy |",
            "|---|---|---|---|---|",
            f"| {c['n_test']} | {c['accuracy']:.3f} | [{c['lo']:.3f}, {c['hi']:.3f}] | {c['p_vs_chance']:.2g} "
            f"| {c['train_accuracy']:.3f} |",
        ]
    return lines


# --- end of the controls and meters block ---
