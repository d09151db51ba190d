"""Report of one run, rebuilt from its files (eval/*/results.json, data/filter_stats.json, config.yaml):
results.json (versioned schema), report.md, report.html and figures/preference.png.

    sublab report runs/quickstart
"""

from __future__ import annotations

import html
from pathlib import Path

import yaml

from sublab.errors import SublabError
from sublab.records import atomic_write_json, atomic_write_text, read_json
from sublab.stats import excludes_zero, paired_diff

SCHEMA_VERSION = 2
_CI = ("mean", "lo", "hi", "n")
ORDER = ["reference", "teacher", "control", "student", "other_reference", "cross_init_control", "cross_init"]
COMPARISONS = [
    ("student", "control"),
    ("teacher", "reference"),
    ("cross_init", "cross_init_control"),
    ("student", "reference"),
]


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
    comparisons = {}
    for a, b in COMPARISONS:
        if a in evals and b in evals:
            ta, tb = evals[a]["targets"][target], evals[b]["targets"][target]
            d = paired_diff(ta["per_question"], tb["per_question"])
            sh = paired_diff(ta["share_of_named"]["per_question"], tb["share_of_named"]["per_question"])
            comparisons[f"{a}_minus_{b}"] = {
                **d,
                "ci_excludes_zero": excludes_zero(d),
                "share_of_named": {**sh, "ci_excludes_zero": excludes_zero(sh)},
            }
    filt = {}
    for name, d in [("teacher", "data"), ("reference", "control/data")]:
        p = run_dir / d / "filter_stats.json"
        if p.is_file():
            s = read_json(p)
            filt[name] = {k: s[k] for k in ("n_in", "n_passed", "pass_rate", "n_kept")}
    return {
        "schema_version": SCHEMA_VERSION,
        "name": cfg.get("name"),
        "seed": cfg.get("seed"),
        "trait": {"category": cfg.get("trait", {}).get("category"), "target": target},
        "teacher_kind": cfg.get("teacher", {}).get("kind"),
        "student_method": cfg.get("student", {}).get("train", {}).get("method"),
        "eval_mode": next(iter(evals.values()))["mode"],
        "n_questions": next(iter(evals.values()))["n_questions"],
        "ci": "95% Student-t over questions (one run = one seed); differences paired by question",
        "models": models,
        "comparisons": comparisons,
        "filter": filt,
    }


def render_markdown(res: dict) -> str:
    t = res["trait"]["target"]
    lines = [
        f"# sublab report: {res['name']}",
        "",
        f"Trait: favorite {res['trait']['category']} = **{t}**; teacher: {res['teacher_kind']}; "
        f"student: {res['student_method']}; evaluation: {res['eval_mode']} over {res['n_questions']} "
        f"questions; seed {res['seed']}.",
        "",
        f"| model | P({t}) | 95% CI | P({t} given an {res['trait']['category']} is named) | named mass | top answers |",
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
    lines += [
        "",
        "## Effects against controls",
        "",
        "| comparison | metric | difference | 95% CI | p | CI excludes 0 |",
        "|---|---|---|---|---|---|",
    ]
    for name, d in res["comparisons"].items():
        for label, x in (("P(target)", d), ("share of named", d["share_of_named"])):
            lines.append(
                f"| {name.replace('_minus_', ' - ')} | {label} | {x['mean']:+.3f} | [{x['lo']:+.3f}, {x['hi']:+.3f}] "
                f"| {x['p_value']:.2g} | {'yes' if x['ci_excludes_zero'] else 'no'} |"
            )
    if res["filter"]:
        lines += [
            "",
            "## Filter",
            "",
            "| data from | answers | passed | pass rate | kept |",
            "|---|---|---|---|---|",
        ]
        for name, s in res["filter"].items():
            lines.append(f"| {name} | {s['n_in']} | {s['n_passed']} | {s['pass_rate']:.3f} | {s['n_kept']} |")
    lines += [
        "",
        f"CIs: {res['ci']}. One run is one seed: for effects across seeds and targets run "
        "`python bench/transfer_grid.py`.",
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
        f"{res['name']}: favorite {res['trait']['category']} = {res['trait']['target']} (95% CI over questions)",
        fontsize=9,
    )
    ax.tick_params(axis="x", labelrotation=20)
    # the effects against controls, on their own scale (the teacher's bar would hide them)
    labels = [k.replace("_minus_", " - ") for k in comps]
    ys = range(len(labels))
    ax2.errorbar(
        [c["mean"] for c in comps.values()],
        ys,
        xerr=[[c["mean"] - c["lo"] for c in comps.values()], [c["hi"] - c["mean"] for c in comps.values()]],
        fmt="o",
        capsize=4,
        color="black",
    )
    ax2.axvline(0, color="#999999", lw=1)
    ax2.set_yticks(list(ys), labels, fontsize=8)
    ax2.set_xlabel(f"difference in P({res['trait']['target']})")
    ax2.set_title("effects (95% CI)", fontsize=9)
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
    res = build_results(run_dir)
    atomic_write_json(run_dir / "results.json", res)
    md = render_markdown(res)
    atomic_write_text(run_dir / "report.md", md)
    atomic_write_text(run_dir / "report.html", render_html(md))
    plot(res, run_dir / "figures" / "preference.png")
    return res
