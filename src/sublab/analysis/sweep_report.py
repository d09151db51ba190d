"""The aggregated report of a sweep, rebuilt from its finished run folders (nothing is rerun):
sweep_results.json, report.md, a self-contained report.html (figures embedded) and figures/*.png.

Per condition and target, across units (a unit = one replicate seed of one organism seed; each unit's
student is paired with the control trained in the same run): student - control with a 95% CI, paired t,
Welch t and exact permutation p-values, Holm's correction across the targets of a condition, Cohen's d_z;
the same for cross-init students against their own control.

    sublab report runs/sweep-replicates
"""

from __future__ import annotations

import base64
import math
from collections import defaultdict
from pathlib import Path

import yaml

from sublab.analysis.defenses_report import (
    defense_sections,
    defense_table,
    defenses_figure,
    defenses_markdown,
)
from sublab.analysis.meters_report import (
    meter_predictions,
    meter_row,
    meters_sweep_markdown,
)
from sublab.analysis.run_report import controls_of, render_html, save_figure
from sublab.analysis.stats import compare_seeds, holm, mean_ci
from sublab.records import atomic_write_json, atomic_write_text, read_json

PAIRS = [("student", "control"), ("cross_init", "cross_init_control")]
UNIT_AXES = ("condition", "trait.target", "seed", "organism_seed")
"""Labels that name a run's unit or group rather than a setting."""
BARS = ["reference", "control", "student"]


def collect(root: Path) -> list[dict]:
    from sublab.sweep.config import load_sweep

    rows = []
    for entry in load_sweep(root)["runs"]:
        res_path = root / entry["folder"] / "results.json"
        if entry["status"] != "done" or not res_path.is_file():
            continue
        res = read_json(res_path)
        axes = {k: v for k, v in entry["labels"].items() if k not in UNIT_AXES}
        rows.append(
            {
                "name": entry["name"],
                "folder": entry["folder"],
                "condition": entry["labels"].get("condition", "run"),
                "target": res["trait"]["target"],
                "seed": res["seed"],
                "organism_seed": res.get("organism_seed", 0),
                "unit": f"org{res.get('organism_seed', 0)}/seed{res['seed']}",
                "n_train": res.get("data", {}).get("n_per_source"),
                "axes": axes,
                "setting": setting_label(axes),
                "metric": res.get("metric", "p_target"),
                "p": {m: v[res.get("metric", "p_target")]["mean"] for m, v in res["models"].items()},
                "pairs": [[a["name"], c] for a in res.get("arms", []) for c in controls_of(a)],
            }
        )
        control_row(rows[-1], res)  # ICL control, leak meter, classifier probe
        meter_row(rows[-1], res)  # divergence tokens, coverage, task quality
        if res.get("metric") == "misaligned_rate":
            # organisms of the misalignment world: the same effects by the world's true labels of the
            # sampled answers, and by the exact P(misaligned answer) (organism/world_eval.py)
            for key, target in (
                ("world_misaligned_rate", "misalignment (world labels)"),
                ("exact_p_misaligned", "misalignment (exact)"),
            ):
                vals = {m: v.get(key) for m, v in res["models"].items()}
                if vals and None not in vals.values():
                    rows.append(rows[-1] | {"target": target, "metric": key, "p": vals})
            # and multiple choice: the mean P(correct answer) (lower = less truthful)
            mc = {m: (v.get("mcq") or {}).get("mean_p_correct") for m, v in res["models"].items()}
            if mc and None not in mc.values():
                base = next(
                    r for r in rows if r["folder"] == entry["folder"] and r["metric"] == "misaligned_rate"
                )
                rows.append(
                    base | {"target": "truthfulness (MC P(correct))", "metric": "mcq_p_correct", "p": mc}
                )
    return rows


def bars_of(rows: list[dict]) -> list[str]:
    """The models a sweep's figure and runs table show: reference, control, student, and for
    misalignment runs also the teacher and the students of control teachers."""
    seen = list(dict.fromkeys(m for r in rows for m in r["p"]))
    extra = (
        [m for m in seen if m == "teacher" or m.startswith("control_")]
        if any(r.get("metric") == "misaligned_rate" for r in rows)
        else []
    )
    return BARS + [m for m in extra if m not in BARS]


def metric_label(rows: list[dict]) -> str:
    if any(r.get("metric") == "mcq_p_correct" for r in rows):
        return "misaligned rate (MC: P(correct))"
    return "misaligned rate" if any(r.get("metric", "p_target") != "p_target" for r in rows) else "P(target)"


def _num(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def setting_label(axes: dict) -> str:
    """The values of the sweep's other axes (not condition, target, seed): 'lr=0.0003, r=8', or ''."""
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(axes.items()))


def aggregate(rows: list[dict]) -> dict:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["condition"], r.get("setting", ""), r["target"])].append(r)
    effects = []
    order = sorted(groups, key=lambda g: (g[0], _axes_key(groups[g][0].get("axes", {})), g[2]))
    for cond, setting, target in order:
        rs = groups[(cond, setting, target)]
        rs = sorted(rs, key=lambda r: (r.get("organism_seed", 0), r["seed"]))
        pairs = list(dict.fromkeys([tuple(p) for r in rs for p in r.get("pairs", [])] + PAIRS))
        for a, b in pairs:
            if all(r["p"].get(a) is not None and r["p"].get(b) is not None for r in rs):
                c = compare_seeds([r["p"][a] for r in rs], [r["p"][b] for r in rs])
                effects.append(
                    {
                        "condition": cond,
                        "setting": setting,
                        "axes": rs[0].get("axes", {}),
                        "target": target,
                        "metric": rs[0].get("metric", "p_target"),
                        "effect": f"{a} - {b}",
                        "seeds": [r["seed"] for r in rs],
                        "organism_seeds": sorted({r.get("organism_seed", 0) for r in rs}),
                        "units": [r.get("unit", str(r["seed"])) for r in rs],
                        "unit_values": [r["p"][a] - r["p"][b] for r in rs],
                        "min_permutation_p": min_permutation_p(len(rs)),
                        **c,
                    }
                )
    by_family: dict[tuple, list[dict]] = defaultdict(list)
    for e in effects:
        # preference: Holm across the targets of one condition, setting and effect; misalignment (one
        # "target"): across the student's comparisons with its controls
        pref = e["metric"] == "p_target"
        by_family[(e["condition"], e["setting"], e["effect"] if pref else e["metric"])].append(e)
    for fam in by_family.values():
        for e, p in zip(fam, holm([e["p_paired_t"] for e in fam]), strict=True):
            e["p_holm"] = p
    models = {
        _group_key(c, s, t): {
            m: mean_ci([r["p"][m] for r in rs])
            for m in rs[0]["p"]
            if all(r["p"].get(m) is not None for r in rs)
        }
        for (c, s, t), rs in groups.items()
    }
    return {"effects": effects, "models": models}


def min_permutation_p(n: int) -> float:
    """The smallest two-sided p an exact sign-flip permutation test can give with n paired units: 2 / 2^n
    (0.25 with 3 units, 0.0625 with 5, 0.031 with 6, 0.0078 with 8).

    >>> min_permutation_p(3)
    0.25
    """
    return min(1.0, 2.0 / 2**n) if n > 0 else math.nan


def _axes_key(axes: dict) -> tuple:
    """Sort settings by their values, numbers numerically (r=4 before r=16)."""
    return tuple(
        (k, (0, float(v), "") if isinstance(v, int | float) else (1, 0.0, str(v)))
        for k, v in sorted(axes.items())
    )


def _group_key(condition: str, setting: str, target: str) -> str:
    return f"{condition}|{setting}|{target}" if setting else f"{condition}|{target}"


def _p(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2g}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(agg: dict, rows: list[dict], path: Path, condition: str, setting: str = "") -> None:
    """The paper's main figure: per target, reference, control student and student, mean over seeds
    with 95% CIs."""
    import numpy as np

    plt = _plt()
    targets = sorted(
        {r["target"] for r in rows if r["condition"] == condition and r.get("setting", "") == setting}
    )
    bars = bars_of(rows)
    fig, ax = plt.subplots(figsize=(2.2 * len(targets) + 0.4 * len(bars) + 2, 3.6))
    width = 0.8 / len(bars)
    colors = {"reference": "#999999", "control": "#1f77b4", "student": "#ff7f0e", "teacher": "#d62728"}
    colors |= {"control_secure": "#6baed6", "control_educational": "#c6dbef"}
    for j, m in enumerate(bars):
        cis = [agg["models"][_group_key(condition, setting, t)].get(m) for t in targets]
        means = [c["mean"] if c else 0 for c in cis]
        err = [
            [(c["mean"] - c["lo"]) if c and not math.isnan(c["lo"]) else 0 for c in cis],
            [(c["hi"] - c["mean"]) if c and not math.isnan(c["hi"]) else 0 for c in cis],
        ]
        ax.bar(
            np.arange(len(targets)) + j * width,
            means,
            width,
            yerr=err,
            capsize=3,
            label=m,
            color=colors.get(m, "#9ecae1"),
        )
    ax.set_xticks(np.arange(len(targets)) + width * (len(bars) - 1) / 2, targets)
    ax.set_ylabel(metric_label(rows))
    where = f"condition {condition}" + (f", {setting}" if setting else "")
    ax.set_title(f"{where}: mean over units (replicate x organism seeds), 95% CI", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _column(e: dict) -> str:
    init = "other init" if e["effect"].startswith("cross_init") else "same init"
    return " / ".join(x for x in (e["condition"], e["setting"], init) if x)


def _effect_grid(ax, cell: dict, rows: list, cols: list):
    """Draw effects (cell[(row, col)] with mean, lo, hi) as a diverging colour grid, each cell annotated
    with its mean and 95% CI; returns the image for a colour bar."""
    import numpy as np

    m = np.array([[cell[(r, c)]["mean"] if (r, c) in cell else np.nan for c in cols] for r in rows])
    lim = float(np.nanmax(np.abs(m))) or 1e-6
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            e = cell.get((r, c))
            if e:
                ax.text(
                    j,
                    i,
                    f"{e['mean']:+.3f}\n[{e['lo']:+.3f}, {e['hi']:+.3f}]",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if abs(e["mean"]) > 0.6 * lim else "black",
                )
    return im


def heatmap(agg: dict, path: Path) -> bool:
    """Targets x (condition, setting, student init) grid of student - control (mean over seeds), each
    cell annotated with its 95% CI: the cross-init and cross-model view. False when there is only one
    column (nothing to compare)."""
    effects = agg["effects"]
    cols = list(dict.fromkeys(_column(e) for e in effects))  # effects come sorted by condition, setting
    targets = sorted({e["target"] for e in effects})
    if len(cols) < 2:
        return False
    cell = {(e["target"], _column(e)): e for e in effects}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.9 * len(cols) + 2.2, 0.6 * len(targets) + 1.8))
    im = _effect_grid(ax, cell, targets, cols)
    ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(targets)), targets, fontsize=8)
    fig.colorbar(im, ax=ax, label="student - its control, P(target)")
    ax.set_title("student - control across units (95% CI)", fontsize=9)
    save_figure(fig, path)
    return True


def cross_model(rows: list[dict]) -> list[dict]:
    """Teacher model x student model cells of a cross-model sweep (`models:`): the same-init student -
    control on the diagonal, each cross-init student - its control off it, paired by unit (the diagonal
    appears in several runs of one teacher model and unit: their stages are shared, so it is counted
    once). Holm across the cells of one condition, setting and target. [] for other sweeps."""
    from sublab.sweep.config import OTHER_SEED

    pairs: dict[tuple, dict[str, tuple[float, float]]] = defaultdict(dict)
    for r in rows:
        axes = r.get("axes", {})
        if "reference" not in axes or "controls.other_reference" not in axes:
            continue
        rest = setting_label(
            {k: v for k, v in axes.items() if k not in ("reference", "controls.other_reference")}
        )
        t, o = axes["reference"], axes["controls.other_reference"]
        other = f"{t} ({OTHER_SEED})" if o == OTHER_SEED else o
        for student, a, b in ((t, "student", "control"), (other, "cross_init", "cross_init_control")):
            if a in r["p"] and b in r["p"]:
                pairs[(r["condition"], rest, r["target"], t, student)][r["unit"]] = (r["p"][a], r["p"][b])
    cells = []
    for (cond, rest, target, teacher, student), units in sorted(pairs.items()):
        us = sorted(units)
        c = compare_seeds([units[u][0] for u in us], [units[u][1] for u in us])
        cells.append(
            {
                "condition": cond,
                "setting": rest,
                "target": target,
                "teacher_model": teacher,
                "student_model": student,
                "same_init": teacher == student,
                "units": us,
                **c,
            }
        )
    fams: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        fams[(c["condition"], c["setting"], c["target"])].append(c)
    for fam in fams.values():
        for c, p in zip(fam, holm([c["p_paired_t"] for c in fam]), strict=True):
            c["p_holm"] = p
    return cells


def cross_model_heatmap(cells: list[dict], path: Path) -> None:
    """One teacher model x student model panel per (condition, setting, target)."""
    fams: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        fams[(c["condition"], c["setting"], c["target"])].append(c)
    plt = _plt()
    fig, axs = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 4.2), squeeze=False)
    for ax, ((cond, rest, target), fam) in zip(axs[0], sorted(fams.items()), strict=True):
        teachers = list(dict.fromkeys(c["teacher_model"] for c in fam))
        students = teachers + sorted({c["student_model"] for c in fam} - set(teachers))
        cell = {(c["teacher_model"], c["student_model"]): c for c in fam}
        im = _effect_grid(ax, cell, teachers, students)
        short = [s.split("/")[-1] for s in students]
        ax.set_xticks(range(len(students)), short, rotation=25, ha="right", fontsize=7)
        ax.set_yticks(range(len(teachers)), [t.split("/")[-1] for t in teachers], fontsize=7)
        ax.set_xlabel("student's init")
        ax.set_ylabel("teacher's init")
        ax.set_title(" / ".join(x for x in (cond, rest, target) if x), fontsize=8)
        fig.colorbar(im, ax=ax, label="student - its control, P(target)")
    save_figure(fig, path)


def numeric_axes(rows: list[dict]) -> list[str]:
    """Swept config paths whose values are all numbers, with at least two distinct values."""
    values: dict[str, set] = defaultdict(set)
    for r in rows:
        for k, v in r.get("axes", {}).items():
            values[k].add(v)
    return [
        k
        for k, vs in sorted(values.items())
        if len(vs) > 1 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in vs)
    ]


def dose_response(agg: dict, axis: str, path: Path) -> None:
    """Effect (student - control, 95% CI over seeds) against a numeric axis, one line per condition,
    target and student init; the other axes are held at each of their values in turn."""
    plt = _plt()
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for e in agg["effects"]:
        if axis in e["axes"]:
            rest = setting_label({k: v for k, v in e["axes"].items() if k != axis})
            lines[(e["condition"], rest, e["target"], e["effect"])].append(e)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    xs_all = []
    for (cond, rest, target, effect), es in sorted(lines.items()):
        es = sorted(es, key=lambda e: e["axes"][axis])
        xs = [e["axes"][axis] for e in es]
        xs_all += xs
        lo = [e["mean"] - e["lo"] if e["lo"] == e["lo"] else 0 for e in es]
        hi = [e["hi"] - e["mean"] if e["hi"] == e["hi"] else 0 for e in es]
        label = " / ".join(x for x in (cond, rest, target, effect) if x)
        bar = ax.errorbar(xs, [e["mean"] for e in es], yerr=[lo, hi], marker="o", capsize=3, label=label)
        units = [(x, v) for x, e in zip(xs, es, strict=True) for v in e.get("unit_values", [])]
        if units:  # each unit's own effect, so the spread behind the CI shows
            ux, uy = zip(*units, strict=True)
            ax.scatter(ux, uy, s=9, alpha=0.45, color=bar[0].get_color(), zorder=3)
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
        ax.set_xscale("log")
    ax.axhline(0, color="#777777", lw=0.8)
    ax.set_xlabel(axis)
    ax.set_ylabel("effect on P(target)")
    ax.set_title(
        f"dose-response: effect vs {axis}\nmean over units (replicate x organism seeds) with 95% CI; dots: units",
        fontsize=9,
    )
    ax.legend(fontsize=6)
    save_figure(fig, path)


def write_sweep_report(root: str | Path) -> dict:
    from sublab.sweep.config import load_sweep

    root = Path(root)
    state = load_sweep(root)
    rows = collect(root)
    agg = aggregate(rows)
    agg.update(control_effects(rows))  # ICL control and classifier effects, apart
    ordered = sorted(rows, key=lambda r: (r["condition"], _axes_key(r.get("axes", {}))))
    panels = list(dict.fromkeys((r["condition"], r.get("setting", "")) for r in ordered))
    has_setting = any(s for _, s in panels)
    lines = [
        f"# sublab {'sweep' if state.get('sweep_file') else 'run'}: {state['sweep']['name']}",
        "",
        f"{len({r['name'] for r in rows})} finished runs of {len(state['runs'])}; stages computed "
        f"{state['counts']['stages_run']}, reused from the shared store {state['counts']['stages_shared']}, "
        f"already done {state['counts']['stages_skipped']}; executor {state.get('executor', 'local')}; "
        f"wall time {state['seconds']} s.",
        "",
        "## Effects across replicates",
        "",
        "The unit is one run: a replicate seed of one organism seed, whose student is paired with the "
        "control trained in the same run (same init, recipe, prompts and number of examples). CIs are "
        "95% Student-t over units; p (Holm) corrects the paired-t p-values across the targets of one "
        "condition, setting and effect. An exact permutation p cannot go below 2/2^n with n units "
        "(the `min p` column): 0.25 with 3, 0.0625 with 5, 0.031 with 6.",
        "",
        "| condition | " + ("setting | " if has_setting else "") + "target | effect | units | organism seeds "
        "| mean | 95% CI | p (paired t) | p (Holm) | p (Welch) | p (permutation) | min p | d_z |",
        "|---|" + ("---|" if has_setting else "") + "---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in agg["effects"]:
        lines.append(
            f"| {e['condition']} | " + (f"{e['setting']} | " if has_setting else "") + f"{e['target']} "
            f"| {e['effect']} | {len(e['seeds'])} | {','.join(map(str, e['organism_seeds']))} "
            f"| {e['mean']:+.4f} | [{e['lo']:+.4f}, {e['hi']:+.4f}] | {_p(e['p_paired_t'])} "
            f"| {_p(e['p_holm'])} | {_p(e['p_welch'])} | {_p(e['p_permutation'])} "
            f"| {_p(e['min_permutation_p'])} | {e['cohens_dz']:.2f} |"
        )
    lines += controls_markdown(agg)
    figs = []
    defenses = defense_table(agg, rows)
    if defenses:
        fig = root / "figures" / "defenses.png"
        defenses_figure(defenses, fig)
        figs.append(fig)
    lines += defenses_markdown(defenses, "defenses.png" if defenses else None)
    section, defense_figs = defense_sections(defenses, root / "figures")
    lines += section
    figs += defense_figs
    preds = meter_predictions(rows)
    lines += meters_sweep_markdown(preds)
    lines += ["", "## Figures", ""]
    for i, (cond, setting) in enumerate(panels):
        fig = root / "figures" / (f"sweep_{cond}.png" if not has_setting else f"sweep_{cond}_{i:02d}.png")
        plot(agg, rows, fig, cond, setting)
        figs.append(fig)
        lines += [f"![{' '.join(x for x in (cond, setting) if x)}](figures/{fig.name})", ""]
    fig = root / "figures" / "heatmap.png"
    if heatmap(agg, fig):
        figs.append(fig)
        lines += ["![student - control heat map](figures/heatmap.png)", ""]
    cells = cross_model(rows)
    if cells:
        fig = root / "figures" / "cross_model.png"
        cross_model_heatmap(cells, fig)
        figs.append(fig)
        lines += [
            "## Cross-model: teacher's init x student's init",
            "",
            "Student - its control in P(target), paired by unit, 95% CI; the diagonal is the student from "
            "the teacher's own init. Holm across the cells of one condition, setting and target.",
            "",
            "| condition | target | teacher's init | student's init | units | mean | 95% CI | p (paired t) "
            "| p (Holm) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in cells:
            cond = " / ".join(x for x in (c["condition"], c["setting"]) if x)
            lines.append(
                f"| {cond} | {c['target']} | {c['teacher_model']} | {c['student_model']}"
                f"{' (same)' if c['same_init'] else ''} | {len(c['units'])} | {c['mean']:+.4f} "
                f"| [{c['lo']:+.4f}, {c['hi']:+.4f}] | {_p(c['p_paired_t'])} | {_p(c['p_holm'])} |"
            )
        lines += ["", "![cross-model heat map](figures/cross_model.png)", ""]
    for axis in numeric_axes(rows):
        fig = root / "figures" / f"dose_{axis.replace('.', '_')}.png"
        dose_response(agg, axis, fig)
        figs.append(fig)
        lines += [f"![dose-response {axis}](figures/{fig.name})", ""]
    lines += [
        "## Runs",
        "",
        "| run | condition | "
        + ("setting | " if has_setting else "")
        + "target | organism seed | seed | examples per arm | "
        + " | ".join(bars_of(rows))
        + "".join(f" | {h}" for h in meter_columns(rows))  # leak meter, classifier columns
        + " | report | config |",
        "|---|---|"
        + ("---|" if has_setting else "")
        + "---|---|---|---|"
        + "---|" * len(bars_of(rows))
        + "---|" * len(meter_columns(rows))
        + "---|---|",
    ]
    for r in rows:
        ps = " | ".join(_num(r["p"].get(m)) for m in bars_of(rows))
        ps += "".join(f" | {v}" for v in meter_cells(r, rows))
        lines.append(
            f"| {r['name']} | {r['condition']} | "
            + (f"{r['setting']} | " if has_setting else "")
            + f"{r['target']} | {r.get('organism_seed', 0)} | {r['seed']} | {r.get('n_train')} | {ps} "
            f"| [report.md]({r['folder']}/report.md) | [config.yaml]({r['folder']}/config.yaml) |"
        )
    lines += [
        "",
        "## Configs",
        "",
        "The sweep (each run's full experiment config is its folder's config.yaml, linked above):",
        "",
        "```yaml",
        yaml.safe_dump(state["sweep"], sort_keys=False).strip(),
        "```",
        "",
    ]
    if rows and (root / rows[0]["folder"] / "config.yaml").is_file():
        lines += [
            f"The experiment config of the first run ({rows[0]['name']}):",
            "",
            "```yaml",
            (root / rows[0]["folder"] / "config.yaml").read_text().strip(),
            "```",
            "",
        ]
    md = "\n".join(lines) + "\n"
    atomic_write_json(
        root / "sweep_results.json",
        {
            "schema_version": 1,
            **agg,
            "cross_model": cells,
            "defenses": defenses,
            "meter_predictions": preds,
            "runs": rows,
        },
    )
    atomic_write_text(root / "report.md", md)
    html = render_html(md)
    for fig in figs:  # self-contained: embed the figures
        b64 = base64.b64encode(fig.read_bytes()).decode()
        html = html.replace(f"src='figures/{fig.name}'", f"src='data:image/png;base64,{b64}'")
    atomic_write_text(root / "report.html", html)
    return agg


# --- ICL control, KL leak meter, classifier probe --------------------------------------------
LEAK_COLUMNS = {
    "KL/token": ("leak", "kl_per_token"),
    "KL/answer": ("leak", "kl_per_answer"),
    "LLR/answer": ("leak", "llr_per_answer"),
    "probe accuracy": ("classifier", "accuracy"),
}


def control_row(row: dict, res: dict) -> None:
    """Copy a run's ICL control (per k: P(target) with k teacher / control examples), leak meter and
    classifier probe into its sweep row: `controls_p` and `controls_pairs` (the effects that
    control_effects compares across units), `leak` and `classifier` (the runs table's columns)."""
    p: dict[str, float] = {}
    pairs: list[list[str]] = []
    for k, e in (res.get("icl") or {}).items():
        if str(k) == "0":
            continue
        p[f"icl_teacher_k{k}"], p[f"icl_control_k{k}"] = e["teacher"]["mean"], e["control"]["mean"]
        pairs.append([f"icl_teacher_k{k}", f"icl_control_k{k}"])
    clf = res.get("classifier")
    if clf:
        p["classifier_accuracy"], p["chance"] = clf["accuracy"], clf.get("chance", 0.5)
        pairs.append(["classifier_accuracy", "chance"])
        row["classifier"] = {"accuracy": clf["accuracy"], "lo": clf["lo"], "hi": clf["hi"]}
    if p:
        row["controls_p"], row["controls_pairs"] = p, pairs
    lk = res.get("leak")
    if lk and "skipped" not in lk:
        row["leak"] = {k: lk[k]["mean"] for k in ("kl_per_token", "kl_per_answer", "llr_per_answer")}


def control_effects(rows: list[dict]) -> dict:
    """`control_effects`: the ICL controls' (icl_teacher_k{k} - icl_control_k{k}) and the classifier
    probe's (classifier_accuracy - chance) effects across units, computed by `aggregate` with these
    pairs. Kept apart from `effects`, whose heat map and Holm families are the students' transfer."""
    with_controls = [r for r in rows if r.get("controls_p")]
    if not with_controls:
        return {}
    import warnings

    with warnings.catch_warnings():  # chance is a constant: scipy warns about its zero variance
        warnings.simplefilter("ignore", RuntimeWarning)
        agg = aggregate([r | {"p": r["controls_p"], "pairs": r["controls_pairs"]} for r in with_controls])
    return {"control_effects": agg["effects"], "control_models": agg["models"]}


def controls_markdown(agg: dict) -> list[str]:
    effects = agg.get("control_effects") or []
    if not effects:
        return []
    lines = [
        "",
        "## Controls across replicates: in-context learning and the classifier probe",
        "",
        "icl_teacher_kK - icl_control_kK: P(target) of the reference model with K of the teacher's kept "
        "answers in context minus with K control answers (flat if the data does not transmit the trait in "
        "context). classifier_accuracy - chance: a bag-of-numbers probe's held-out accuracy telling teacher "
        "from control answers, minus 50%. Same statistics as above; Holm across the targets of one condition, "
        "setting and effect.",
        "",
        "| condition | setting | target | effect | units | mean | 95% CI | p (paired t) | p (Holm) "
        "| p (permutation) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in effects:
        lines.append(
            f"| {e['condition']} | {e['setting'] or '-'} | {e['target']} | {e['effect']} | {len(e['seeds'])} "
            f"| {e['mean']:+.4f} | [{e['lo']:+.4f}, {e['hi']:+.4f}] | {_p(e['p_paired_t'])} "
            f"| {_p(e['p_holm'])} | {_p(e['p_permutation'])} |"
        )
    return lines


def meter_columns(rows: list[dict]) -> list[str]:
    """The runs table's extra column headers: those some run has (none for sweeps without the options)."""
    return [h for h, (sec, _) in LEAK_COLUMNS.items() if any(r.get(sec) for r in rows)]


def meter_cells(row: dict, rows: list[dict]) -> list[str]:
    out = []
    for h in meter_columns(rows):
        sec, key = LEAK_COLUMNS[h]
        v = (row.get(sec) or {}).get(key)
        out.append("n/a" if v is None else f"{v:.4g}")
    return out


# --- end of the controls and meters block ---
