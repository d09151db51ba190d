"""The sweep report's defenses: each defense's student - control effect beside no defense (`none`), what
it removes (the paired difference across the units both share, with its CI), and what it costs the
number task (the student's and the control's filter pass rate on held-out prompts and task loss). One
table and figure for all defenses, then one table and figure per defense."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from sublab.analysis.meters_report import _f
from sublab.analysis.stats import paired_diff


def _label(c: dict) -> str:
    return " / ".join(x for x in (c["condition"], c["setting"]) if x)


def removed(base: dict, e: dict) -> dict | None:
    """baseline effect - defense effect, paired by unit (the same replicate seed and organism) over the
    units both have: how much of the transfer the defense removes, with a t CI and a paired p."""
    mine = dict(zip(e["units"], e["unit_values"], strict=True))
    theirs = dict(zip(base["units"], base["unit_values"], strict=True))
    common = [u for u in base["units"] if u in mine]
    if len(common) < 2:
        return None
    d = paired_diff([theirs[u] for u in common], [mine[u] for u in common])
    return {**d, "units": len(common)}


def defense_table(agg: dict, rows: list[dict], baseline: str = "none") -> list[dict]:
    """Per condition (a defense, or `baseline`) and target: the student - control effect (from the
    sweep's effects) beside the cost, the means over units of the student's and the control's pass rate
    and task loss, and the effect's share of the baseline's (same target, same setting)."""
    effects = {
        (e["condition"], e["setting"], e["target"]): e
        for e in agg["effects"]
        if e["effect"] == "student - control"
    }
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("quality"):
            groups[(r["condition"], r.get("setting", ""), r["target"])].append(r)
    out = []
    for key, e in effects.items():
        rs = groups.get(key, [])
        cell = {"condition": key[0], "setting": key[1], "target": key[2], "effect": e}

        def avg(model: str, field: str, rs=rs):
            vals = [
                r["quality"][model][field] for r in rs if r["quality"].get(model, {}).get(field) is not None
            ]
            return float(np.mean(vals)) if vals else None

        for model in ("student", "control"):
            cell[f"{model}_pass_rate"] = avg(model, "pass_rate")
            cell[f"{model}_task_loss"] = avg(model, "task_loss")
        base = effects.get((baseline, key[1], key[2]))
        cell["share_of_baseline"] = e["mean"] / base["mean"] if base and base["mean"] > 0 else None
        cell["removed"] = removed(base, e) if base and key[0] != baseline else None
        out.append(cell)
    if not any(c["student_pass_rate"] is not None for c in out):
        return []
    order = list(dict.fromkeys([baseline] + [c["condition"] for c in out]))
    return sorted(out, key=lambda c: (order.index(c["condition"]), c["setting"], c["target"]))


def defenses_markdown(cells: list[dict], figure: str | None) -> list[str]:
    if not cells:
        return []
    lines = [
        "",
        "## Defenses: effect and cost",
        "",
        "Each condition's student - control P(target) across units (95% CI, Holm as in the effects table), "
        "its share of the same target's effect without a defense (`none`), what it removes (none's effect "
        "minus this one's, paired by unit, 95% CI), and what the defense costs the "
        "number task: the student's and the control's filter pass rate on held-out prompts and loss per "
        "token on the reference's held-out answers (means over units).",
        "",
        "| condition | target | units | student - control [95% CI] | p (Holm) | share of none "
        "| removed: none - this [95% CI] | pass rate student / control | task loss student / control |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        e = c["effect"]
        cond = _label(c)
        share = "n/a" if c["share_of_baseline"] is None else f"{c['share_of_baseline']:.2f}"
        lines.append(
            f"| {cond} | {c['target']} | {len(e['seeds'])} | {e['mean']:+.4f} [{e['lo']:+.4f}, {e['hi']:+.4f}] "
            f"| {e['p_holm']:.2g} | {share} | {'-' if c['removed'] is None else _ci(c['removed'])} "
            f"| {_f(c['student_pass_rate'], 3)} / {_f(c['control_pass_rate'], 3)} "
            f"| {_f(c['student_task_loss'], 3)} / {_f(c['control_task_loss'], 3)} |"
        )
    if figure:
        lines += ["", f"![defenses: effect and cost](figures/{figure})", ""]
    return lines


def defenses_figure(cells: list[dict], path: Path) -> None:
    """Left: student - control per condition and target with 95% CIs; right: the student's pass rate
    minus the control's (the cost), mean over units."""
    from sublab.analysis.run_report import save_figure
    from sublab.analysis.sweep_report import _plt

    plt = _plt()
    conds = list(dict.fromkeys(_label(c) for c in cells))
    targets = list(dict.fromkeys(c["target"] for c in cells))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(conds) + 4), 4))
    width = 0.8 / max(1, len(targets))
    for j, t in enumerate(targets):
        xs, ys, err, cost = [], [], [], []
        for i, cond in enumerate(conds):
            c = next(
                (c for c in cells if c["target"] == t and _label(c) == cond),
                None,
            )
            if c is None:
                continue
            e = c["effect"]
            xs.append(i + (j - (len(targets) - 1) / 2) * width)
            ys.append(e["mean"])
            err.append([e["mean"] - e["lo"], e["hi"] - e["mean"]] if not math.isnan(e["lo"]) else [0, 0])
            sp, cp = c["student_pass_rate"], c["control_pass_rate"]
            cost.append(sp - cp if sp is not None and cp is not None else 0.0)
        ax.bar(xs, ys, width, yerr=np.array(err).T if err else None, capsize=2, label=t)
        bx.bar(xs, cost, width, label=t)
    for a, title in ((ax, "student - control P(target), 95% CI"), (bx, "pass rate: student - control")):
        a.axhline(0, color="black", lw=0.6)
        a.set_xticks(range(len(conds)))
        a.set_xticklabels(conds, rotation=30, ha="right", fontsize=8)
        a.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _by_defense(cells: list[dict], baseline: str = "none") -> dict[str, list[tuple[dict | None, dict]]]:
    """{defense label: [(the baseline's cell or None, the defense's cell) per target]}."""
    base = {(c["setting"], c["target"]): c for c in cells if c["condition"] == baseline}
    out: dict[str, list] = defaultdict(list)
    for c in cells:
        if c["condition"] != baseline:
            out[_label(c)].append((base.get((c["setting"], c["target"])), c))
    return dict(out)


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)


def defense_sections(cells: list[dict], figdir: Path | None) -> tuple[list[str], list[Path]]:
    """One table (and, with `figdir`, one figure defense_<name>.png) per defense: per target, the effect
    without and with it, what it removes (paired across units) and its cost -> (markdown, figures)."""
    lines: list[str] = []
    figs: list[Path] = []
    for label, pairs in _by_defense(cells).items():
        lines += [
            "",
            f"### Defense: {label}",
            "",
            "| target | units | without (none) [95% CI] | with [95% CI] | removed: without - with [95% CI] "
            "| p (paired) | share kept | student pass rate without / with | control pass rate without / with "
            "| student task loss without / with |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for base, c in pairs:
            e, r = c["effect"], c["removed"]
            share = "n/a" if c["share_of_baseline"] is None else f"{c['share_of_baseline']:.2f}"
            without = "n/a" if base is None else _ci(base["effect"])
            gone = "n/a | n/a" if r is None else f"{_ci(r)} | {_f(r['p_value'], 3)}"
            lines.append(
                f"| {c['target']} | {len(e['seeds'])} | {without} | {_ci(e)} | {gone} | {share} "
                f"| {_f(base and base['student_pass_rate'], 3)} / {_f(c['student_pass_rate'], 3)} "
                f"| {_f(base and base['control_pass_rate'], 3)} / {_f(c['control_pass_rate'], 3)} "
                f"| {_f(base and base['student_task_loss'], 3)} / {_f(c['student_task_loss'], 3)} |"
            )
        if figdir is not None:
            name = f"defense_{_slug(label)}.png"
            defense_figure(label, pairs, figdir / name)
            figs.append(figdir / name)
            lines += ["", f"![{label}: with and without](figures/{name})", ""]
    return lines, figs


def _ci(e: dict) -> str:
    return f"{e['mean']:+.4f} [{e['lo']:+.4f}, {e['hi']:+.4f}]"


def defense_figure(label: str, pairs: list[tuple[dict | None, dict]], path: Path) -> None:
    """Left: student - control per target without and with the defense (95% CIs); right: the student's
    filter pass rate without and with it, the control's as black ticks."""
    from sublab.analysis.run_report import save_figure
    from sublab.analysis.sweep_report import _plt

    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(max(7, 2.2 * len(pairs) + 3), 3.6))
    xs = np.arange(len(pairs))
    for k, (name, color) in enumerate((("none", "0.6"), (label, "tab:blue"))):
        cs = [base if k == 0 else c for base, c in pairs]
        off = (k - 0.5) * 0.38
        ys, err, sp, cp = [], [], [], []
        for c in cs:
            e = c["effect"] if c else None
            ys.append(e["mean"] if e else math.nan)
            ok = e is not None and not math.isnan(e["lo"])
            err.append([e["mean"] - e["lo"], e["hi"] - e["mean"]] if ok else [0, 0])
            sp.append(c["student_pass_rate"] if c and c["student_pass_rate"] is not None else math.nan)
            cp.append(c["control_pass_rate"] if c and c["control_pass_rate"] is not None else math.nan)
        ax.bar(xs + off, ys, 0.38, yerr=np.array(err).T, capsize=3, color=color, label=name)
        bx.bar(xs + off, sp, 0.38, color=color, label=f"student, {name}")
        bx.scatter(xs + off, cp, marker="_", s=300, color="black", zorder=3, label="control" if k else None)
    targets = [c["target"] for _, c in pairs]
    for a, title in ((ax, "student - control P(target), 95% CI"), (bx, "filter pass rate (cost)")):
        a.set_xticks(xs)
        a.set_xticklabels(targets, fontsize=8)
        a.set_title(title, fontsize=9)
    ax.axhline(0, color="black", lw=0.6)
    rates = [
        x["student_pass_rate"] for pair in pairs for x in pair if x and x["student_pass_rate"] is not None
    ]
    bx.set_ylim(max(0.0, min(rates, default=1.0) - 0.1), 1.0)
    ax.legend(fontsize=7)
    bx.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    fig.suptitle(f"defense: {label}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
