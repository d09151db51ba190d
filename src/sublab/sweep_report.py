"""The aggregated report of a sweep, rebuilt from its finished run folders (nothing is rerun):
sweep_results.json, report.md, a self-contained report.html (figures embedded) and figures/*.png.

Per condition and target, across seeds: student - control (paired by seed) with a 95% CI, paired t,
Welch t and permutation p-values, Holm's correction across the targets of a condition, Cohen's d_z;
the same for cross-init students against their own control.

    sublab report runs/sweep-quickstart
"""

from __future__ import annotations

import base64
import math
from collections import defaultdict
from pathlib import Path

import yaml

from sublab.records import atomic_write_json, atomic_write_text, read_json
from sublab.report import render_html, save_figure
from sublab.stats import compare_seeds, holm, mean_ci

PAIRS = [("student", "control"), ("cross_init", "cross_init_control")]
BARS = ["reference", "control", "student"]


def collect(root: Path) -> list[dict]:
    from sublab.sweep import load_sweep

    rows = []
    for entry in load_sweep(root)["runs"]:
        res_path = root / entry["folder"] / "results.json"
        if entry["status"] != "done" or not res_path.is_file():
            continue
        res = read_json(res_path)
        rows.append(
            {
                "name": entry["name"],
                "folder": entry["folder"],
                "condition": entry["labels"].get("condition", "run"),
                "target": res["trait"]["target"],
                "seed": res["seed"],
                "p": {m: v["p_target"]["mean"] for m, v in res["models"].items()},
            }
        )
    return rows


def aggregate(rows: list[dict]) -> dict:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["condition"], r["target"])].append(r)
    effects = []
    for (cond, target), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        for a, b in PAIRS:
            if all(a in r["p"] and b in r["p"] for r in rs):
                c = compare_seeds([r["p"][a] for r in rs], [r["p"][b] for r in rs])
                effects.append(
                    {
                        "condition": cond,
                        "target": target,
                        "effect": f"{a} - {b}",
                        "seeds": [r["seed"] for r in rs],
                        **c,
                    }
                )
    by_family: dict[tuple, list[dict]] = defaultdict(list)
    for e in effects:
        by_family[(e["condition"], e["effect"])].append(e)
    for fam in by_family.values():  # Holm across the targets of one condition and effect
        for e, p in zip(fam, holm([e["p_paired_t"] for e in fam]), strict=True):
            e["p_holm"] = p
    models = {
        f"{c}|{t}": {m: mean_ci([r["p"][m] for r in rs]) for m in rs[0]["p"]} for (c, t), rs in groups.items()
    }
    return {"effects": effects, "models": models}


def _p(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2g}"


def plot(agg: dict, rows: list[dict], path: Path, condition: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    targets = sorted({r["target"] for r in rows if r["condition"] == condition})
    fig, ax = plt.subplots(figsize=(2.2 * len(targets) + 2, 3.6))
    width = 0.8 / len(BARS)
    colors = {"reference": "#999999", "control": "#1f77b4", "student": "#ff7f0e"}
    for j, m in enumerate(BARS):
        cis = [agg["models"][f"{condition}|{t}"].get(m) for t in targets]
        means = [c["mean"] if c else 0 for c in cis]
        err = [
            [(c["mean"] - c["lo"]) if c and not math.isnan(c["lo"]) else 0 for c in cis],
            [(c["hi"] - c["mean"]) if c and not math.isnan(c["hi"]) else 0 for c in cis],
        ]
        ax.bar(
            np.arange(len(targets)) + j * width, means, width, yerr=err, capsize=3, label=m, color=colors[m]
        )
    ax.set_xticks(np.arange(len(targets)) + width, targets)
    ax.set_ylabel("P(target)")
    ax.set_title(f"condition {condition}: mean over seeds, 95% CI", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_sweep_report(root: str | Path) -> dict:
    from sublab.sweep import load_sweep

    root = Path(root)
    state = load_sweep(root)
    rows = collect(root)
    agg = aggregate(rows)
    conditions = sorted({r["condition"] for r in rows})
    lines = [
        f"# sublab sweep: {state['sweep']['name']}",
        "",
        f"{len(rows)} finished runs of {len(state['runs'])}; stages computed "
        f"{state['counts']['stages_run']}, reused from the shared store {state['counts']['stages_shared']}, "
        f"already done {state['counts']['stages_skipped']}; wall time {state['seconds']} s.",
        "",
        "## Effects across seeds",
        "",
        "| condition | target | effect | seeds | mean | 95% CI | p (paired t) | p (Holm) | p (Welch) "
        "| p (permutation) | d_z |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in agg["effects"]:
        lines.append(
            f"| {e['condition']} | {e['target']} | {e['effect']} | {len(e['seeds'])} | {e['mean']:+.4f} "
            f"| [{e['lo']:+.4f}, {e['hi']:+.4f}] | {_p(e['p_paired_t'])} | {_p(e['p_holm'])} "
            f"| {_p(e['p_welch'])} | {_p(e['p_permutation'])} | {e['cohens_dz']:.2f} |"
        )
    figs = []
    for cond in conditions:
        fig = root / "figures" / f"sweep_{cond}.png"
        plot(agg, rows, fig, cond)
        figs.append(fig)
        lines += ["", f"![{cond}](figures/{fig.name})"]
    lines += [
        "",
        "## Runs",
        "",
        "| run | condition | target | seed | " + " | ".join(BARS) + " | report |",
        "|---|---|---|---|" + "---|" * len(BARS) + "---|",
    ]
    for r in rows:
        ps = " | ".join(f"{r['p'].get(m, math.nan):.3f}" for m in BARS)
        lines.append(
            f"| {r['name']} | {r['condition']} | {r['target']} | {r['seed']} | {ps} "
            f"| [{r['folder']}/report.md]({r['folder']}/report.md) |"
        )
    lines += [
        "",
        "## Configs",
        "",
        "The sweep:",
        "",
        "```yaml",
        yaml.safe_dump(state["sweep"], sort_keys=False).strip(),
        "```",
        "",
    ]
    md = "\n".join(lines) + "\n"
    atomic_write_json(root / "sweep_results.json", {"schema_version": 1, **agg, "runs": rows})
    atomic_write_text(root / "report.md", md)
    html = render_html(md)
    for fig in figs:  # self-contained: embed the figures
        b64 = base64.b64encode(fig.read_bytes()).decode()
        html = html.replace(f"src='figures/{fig.name}'", f"src='data:image/png;base64,{b64}'")
    atomic_write_text(root / "report.html", html)
    return agg
