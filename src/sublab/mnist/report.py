"""Figures and report.md of an MNIST run, built from its results.json content alone.

    figures = write_figures(results, run_dir / "figures")   # PNGs, matplotlib Agg backend, saved not shown
    text = render_markdown(results, figures, run_dir)

Figures: accuracy per arm with 95% CIs (base setting), histograms of cos(d_T, d_S) same-init vs
cross-init, the first K distillation steps, accuracy against each swept knob, and, when a setting
projects the gradient (distill.project_out), accuracy and held-out aux-matching loss per setting
(projection.png) and the per-step cosine of the applied update with the removed direction
(projection_cosine.png).
"""

from __future__ import annotations

import io
from pathlib import Path

from sublab.records import atomic_write_bytes

LABELS = {
    "reference": "Reference (init)",
    "teacher": "Teacher",
    "student_aux": "Student, aux only",
    "student_all": "Student, all logits",
    "cross_aux": "Cross-init, aux only",
    "cross_all": "Cross-init, all logits",
}
COLORS = {
    "reference": "0.6",
    "teacher": "C5",
    "student_aux": "C0",
    "student_all": "C2",
    "cross_aux": "C1",
    "cross_all": "C3",
}
CHANCE = 0.1


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _ordered(by_arm: dict) -> list[str]:
    """Arms in the canonical order (results.json sorts keys alphabetically)."""
    return [a for a in LABELS if a in by_arm]


def _err(arm: dict) -> float:
    return arm["ci95_half"] or 0.0


def plot_accuracy(setting: dict, path: Path, title: str) -> Path:
    plt = _pyplot()
    arms = _ordered(setting["arms"])
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    means = [setting["arms"][a]["mean"] for a in arms]
    ax.bar(range(len(arms)), means, yerr=[_err(setting["arms"][a]) for a in arms], capsize=4,
           color=[COLORS[a] for a in arms])  # fmt: skip
    for i, (arm, v) in enumerate(zip(arms, means, strict=True)):
        ax.text(i, v + _err(setting["arms"][arm]) + 0.015, f"{v:.1%}", ha="center", fontsize=8)
    ax.axhline(CHANCE, ls=":", c="k", lw=1, label="chance (10%)")
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels([LABELS[a] for a in arms], rotation=30, ha="right")
    ax.set_ylabel("test accuracy (mean, 95% CI)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    ax.yaxis.grid(True, alpha=0.3)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_inner_products(setting: dict, path: Path) -> Path:
    plt = _pyplot()
    fs = setting["theorem"]["first_step"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True, layout="constrained")
    for ax, (same, cross, what) in zip(
        axes,
        [("student_aux", "cross_aux", "aux-only"), ("student_all", "cross_all", "all-logit")],
        strict=True,
    ):
        both = fs[same]["cos_sgd"]["values"] + fs[cross]["cos_sgd"]["values"]
        lo, hi = min(both + [0.0]), max(both + [0.0])
        bins = [lo + (hi - lo) * i / 30 for i in range(31)]  # shared bins: same and cross comparable
        for arm in (same, cross):
            ax.hist(fs[arm]["cos_sgd"]["values"], bins=bins, alpha=0.6, color=COLORS[arm], label=LABELS[arm])
        ax.axvline(0, c="k", lw=1)
        ax.set_xlabel("cos(d_T, d_S), d_S = -grad of first step")
        ax.set_title(f"{what} students", fontsize=10)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("members")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_trajectory(setting: dict, path: Path) -> Path:
    plt = _pyplot()
    tr = setting["theorem"]["trajectory"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for arm in _ordered(tr):
        stats = tr[arm]
        ks = range(1, len(stats["cos"]) + 1)
        axes[0].plot(
            ks, [s["mean"] for s in stats["cos"]], marker="o", ms=3, color=COLORS[arm], label=LABELS[arm]
        )
        axes[1].plot(ks, [s["mean"] for s in stats["dLT"]], marker="o", ms=3, color=COLORS[arm])
    axes[0].set_ylabel("mean cos(d_T, theta_k - theta_0)")
    axes[1].set_ylabel("mean L_T(theta_k) - L_T(theta_0)")
    for ax in axes:
        ax.axhline(0, c="k", lw=1)
        ax.set_xlabel("distillation step k")
    axes[0].legend(fontsize=7)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_knob(results: dict, knob: str, path: Path) -> Path:
    plt = _pyplot()
    settings = results["settings"]
    base = results["config"]
    base_value = _lookup(base, knob)
    values = list(results["sweep"][knob])
    if base_value not in values and results["sweep_mode"] == "one_at_a_time":
        values = [base_value] + values
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    xs = {str(v): i for i, v in enumerate(values)}
    for j, arm in enumerate(results["arms"]):
        pts = []
        for s in settings:
            if results["sweep_mode"] == "one_at_a_time":
                if s["knobs"] and knob not in s["knobs"]:
                    continue
                value = s["knobs"].get(knob, base_value)
            else:
                value = s["knobs"][knob]
            pts.append((xs[str(value)] + (j - 2.5) * 0.04, s["arms"][arm]))
        pts.sort(key=lambda p: p[0])
        ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[_err(p[1]) for p in pts],
                    marker="o", ms=4, capsize=3, color=COLORS[arm], label=LABELS[arm],
                    ls="-" if results["sweep_mode"] == "one_at_a_time" else "none")  # fmt: skip
    ax.axhline(CHANCE, ls=":", c="k", lw=1)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels([str(v) for v in values])
    ax.set_xlabel(knob + (" (all grid settings)" if results["sweep_mode"] == "grid" else ""))
    ax.set_ylabel("test accuracy (mean, 95% CI)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2)
    ax.yaxis.grid(True, alpha=0.3)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _projected(results: dict) -> list[dict]:
    """Settings whose distillation projected the gradient (results of older runs have no projection key)."""
    return [s for s in results["settings"] if s.get("projection", {}).get("kind", "none") != "none"]


def _project_label(s: dict) -> str:
    """The setting's project_out value, with its label when other knobs differ from the base too."""
    kind = s.get("projection", {}).get("kind", "none")
    return kind if set(s["knobs"]) <= {"distill.project_out"} else f"{s['label']} ({kind})"


def plot_projection(results: dict, path: Path) -> Path:
    """Left: digit accuracy per setting (aux-only, cross-init aux-only, all-logit students); right: the
    aux-only student's distillation loss on held-out noise before and after distillation, per setting."""
    plt = _pyplot()
    settings = results["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    xs = range(len(settings))
    for j, arm in enumerate(("student_aux", "cross_aux", "student_all")):
        means = [s["arms"][arm]["mean"] for s in settings]
        axes[0].errorbar([x + (j - 1) * 0.08 for x in xs], means, yerr=[_err(s["arms"][arm]) for s in settings],
                         marker="o", ms=4, capsize=3, ls="none", color=COLORS[arm], label=LABELS[arm])  # fmt: skip
    axes[0].axhline(CHANCE, ls=":", c="k", lw=1, label="chance (10%)")
    axes[0].set_ylabel("test accuracy (mean, 95% CI)")
    axes[0].set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    held = [s.get("heldout_loss", {}).get("arms", {}).get("student_aux") for s in settings]
    pts = [(x, h) for x, h in zip(xs, held, strict=True) if h is not None]
    if pts:
        axes[1].errorbar([x for x, _ in pts], [h["final"]["mean"] for _, h in pts],
                         yerr=[_err(h["final"]) for _, h in pts], marker="o", ms=4, capsize=3, ls="none",
                         color=COLORS["student_aux"], label="after distillation")  # fmt: skip
        axes[1].plot([x for x, _ in pts], [h["init"]["mean"] for _, h in pts], marker="_", ms=14, ls="none",
                     color="0.4", label="at init")  # fmt: skip
        axes[1].set_ylim(bottom=0)
        axes[1].legend(fontsize=7)
    axes[1].set_ylabel(f"aux-only student: held-out {results['config']['distill']['loss']} loss")
    for ax in axes:
        ax.set_xticks(list(xs))
        ax.set_xticklabels([_project_label(s) for s in settings], rotation=15, ha="right", fontsize=8)
        ax.yaxis.grid(True, alpha=0.3)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_projection_cosine(results: dict, path: Path) -> Path:
    """Mean over aux-only students of cos(-g, d) before projection (dashed: the plain gradient step) and
    cos(applied update, d) (solid) at every distillation step, one colour per projecting setting."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, s in enumerate(_projected(results)):
        per = s["projection"]["arms"]["student_aux"]["per_step_mean"]
        ks = range(1, len(per["cos_update"]) + 1)
        label = _project_label(s)
        ax.plot(ks, per["cos_update"], color=f"C{i}", lw=1.2, label=f"{label}: applied update")
        ax.plot(
            ks, per["cos_descent"], color=f"C{i}", lw=1, ls="--", label=f"{label}: -gradient, unprojected"
        )
    ax.axhline(0, c="k", lw=1)
    ax.set_xlabel("distillation step")
    ax.set_ylabel("mean cos(., removed direction)\n(aux-only students)")
    ax.legend(fontsize=7)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _lookup(data: dict, knob: str):
    node = data
    for part in knob.split("."):
        node = node[part]
    return node


def write_figures(results: dict, folder: Path) -> list[Path]:
    folder = Path(folder)
    base = results["settings"][0]
    title = f"{results['data']['name']}, {base['arms']['teacher']['n']} models, setting: {base['label']}"
    paths = [plot_accuracy(base, folder / "accuracy.png", title)]
    if base["theorem"].get("first_step"):
        paths.append(plot_inner_products(base, folder / "inner_products.png"))
    if base["theorem"].get("trajectory"):
        paths.append(plot_trajectory(base, folder / "trajectory.png"))
    for knob in results["sweep"]:
        paths.append(plot_knob(results, knob, folder / f"sweep_{knob.replace('.', '_')}.png"))
    if _projected(results):
        paths.append(plot_projection(results, folder / "projection.png"))
        paths.append(plot_projection_cosine(results, folder / "projection_cosine.png"))
    return paths


# ------------------------------------------------------------------ markdown


def _pct(arm: dict) -> str:
    half = arm["ci95_half"]
    return f"{arm['mean']:.1%} ± {half:.1%}" if half is not None else f"{arm['mean']:.1%}"


def _accuracy_table(setting: dict) -> list[str]:
    lines = ["| arm | test accuracy (mean ± 95% CI) | n |", "|---|---|---|"]
    for arm in _ordered(setting["arms"]):
        a = setting["arms"][arm]
        lines.append(f"| {LABELS[arm]} | {_pct(a)} | {a['n']} |")
    return lines


def _paired_table(setting: dict) -> list[str]:
    """Same-init - cross-init, paired by teacher slot (both students distil the same teacher)."""
    if not setting.get("paired"):
        return []
    lines = [
        "Same-init student - cross-init student, paired by teacher slot (both distil the same teacher; "
        "only the init differs):",
        "",
        "| comparison | mean difference | 95% CI | slots | p (paired t) | p (permutation) |",
        "|---|---|---|---|---|---|",
    ]
    for name, d in setting["paired"].items():
        lines.append(
            f"| {name} | {d['mean']:+.1%} | [{d['lo']:+.1%}, {d['hi']:+.1%}] | {d['n']} "
            f"| {d['p_paired_t']:.2g} | {d['p_permutation']:.2g} |"
        )
    return [*lines, ""]


def _theorem_table(setting: dict) -> list[str]:
    fs = setting["theorem"]["first_step"]
    lines = [
        "| student arm | <d_T,d_S> >= 0 (SGD) | cos median [q05, q95] | <d_T,d_S> >= 0 (Adam) "
        "| dL_T(probe) <= 0 | dL_T(probe) mean | first-order mean | dL_T(Adam step) mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in _ordered(fs):
        st = fs[arm]
        c = st["cos_sgd"]["quantiles"]
        lines.append(
            f"| {LABELS[arm]} | {st['ip_sgd']['share_nonneg']:.0%} | {c['q50']:+.3f} [{c['q05']:+.3f}, {c['q95']:+.3f}] "
            f"| {st['ip_adam']['share_nonneg']:.0%} | {st['dLT_probe']['share_nonpos']:.0%} "
            f"| {st['dLT_probe']['mean']:+.2e} | {st['dLT_probe_first_order']['mean']:+.2e} "
            f"| {st['dLT_adam_step']['mean']:+.2e} |"
        )
    return lines


def _trajectory_table(setting: dict) -> list[str]:
    tr = setting["theorem"]["trajectory"]
    k = len(next(iter(tr.values()))["ip"])
    lines = [
        "| student arm | step | <d_T, theta_k-theta_0> >= 0 | mean cos | L_T(theta_k)-L_T(theta_0) <= 0 | mean dL_T |",
        "|---|---|---|---|---|---|",
    ]
    for arm in _ordered(tr):
        st = tr[arm]
        for step in sorted({1, k}):
            ip, cos, dlt = st["ip"][step - 1], st["cos"][step - 1], st["dLT"][step - 1]
            lines.append(
                f"| {LABELS[arm]} | {step} | {ip['share_nonneg']:.0%} | {cos['mean']:+.3f} "
                f"| {dlt['share_nonpos']:.0%} | {dlt['mean']:+.2e} |"
            )
    return lines


def _loss(a: dict) -> str:
    half = a["ci95_half"]
    return f"{a['mean']:.3g} ± {half:.2g}" if half is not None else f"{a['mean']:.3g}"


def _heldout_table(setting: dict) -> list[str]:
    held = setting.get("heldout_loss")
    if not held:
        return []
    lines = [
        f"Distillation loss ({held['loss']}, each arm on its own matched logits) on {held['n_noise']} held-out "
        "uniform-noise images, mean ± 95% CI over members:",
        "",
        "| student arm | at init | after distillation |",
        "|---|---|---|",
    ]
    for arm in _ordered(held["arms"]):
        h = held["arms"][arm]
        lines.append(f"| {LABELS[arm]} | {_loss(h['init'])} | {_loss(h['final'])} |")
    return [*lines, ""]


def _projection_section(results: dict) -> list[str]:
    """Every setting's digit accuracy and aux-matching cost, then the cosines of the projecting ones."""
    projected = _projected(results)
    if not projected:
        return []
    k = projected[0]["projection"]["first_steps"]
    out = [
        "## Gradient projection (distill.project_out)",
        "",
        "Each step, every student's gradient (all its parameters, per member) loses its component along the "
        "direction before Adam sees it: teacher_displacement = theta_teacher - theta_init of its teacher; "
        "digit_gradient = the gradient of its digit cross-entropy on a labelled batch. Adam's per-coordinate "
        "scaling makes the applied update not orthogonal to the direction (cosines below). The theorem's "
        "tables above are the base setting's.",
        "",
        f"Digit test accuracy, mean ± 95% CI over the {projected[0]['arms']['student_aux']['n']} members of "
        "each arm, and the cost: the distillation loss on held-out noise (each arm on its own matched logits; "
        "init = before distillation).",
        "",
        "| setting | aux-only student | cross-init aux-only | all-logit student | aux-only held-out loss "
        "(init -> final) | all-logit held-out loss (final) |",
        "|---|---|---|---|---|---|",
    ]
    for s in results["settings"]:
        held = s.get("heldout_loss", {}).get("arms", {})
        aux, every = held.get("student_aux"), held.get("student_all")
        aux_txt = f"{aux['init']['mean']:.3g} -> {_loss(aux['final'])}" if aux else ""
        out.append(
            f"| {_project_label(s)} | {_pct(s['arms']['student_aux'])} | {_pct(s['arms']['cross_aux'])} "
            f"| {_pct(s['arms']['student_all'])} | {aux_txt} | {_loss(every['final']) if every else ''} |"
        )
    out += [
        "",
        f"Cosine with the removed direction d, per member averaged over the first {k} steps (and all steps), "
        "mean over members [q05, q95]. -gradient: the plain (unprojected) gradient step, positive = it moves "
        "along d (for teacher_displacement: toward the teacher; for digit_gradient, d is the digit-loss "
        "gradient, so negative = down the digit loss). The last column checks the projection (largest |cos| "
        "of a projected gradient over all steps and members):",
        "",
        f"| setting | student arm | cos(-gradient, d), first {k} | cos(applied update, d), first {k} "
        "| cos(applied update, d), all steps | max abs cos(projected gradient, d) |",
        "|---|---|---|---|---|---|",
    ]
    for s in projected:
        for arm in _ordered(s["projection"]["arms"]):
            st = s["projection"]["arms"][arm]
            out.append(
                f"| {_project_label(s)} | {LABELS[arm]} | {_dist(st['cos_descent_first'])} "
                f"| {_dist(st['cos_update_first'])} | {_dist(st['cos_update_all'])} "
                f"| {st['max_abs_cos_projected_grad']:.1e} |"
            )
    return [*out, ""]


def _dist(d: dict) -> str:
    q = d["quantiles"]
    return f"{d['mean']:+.3f} [{q['q05']:+.3f}, {q['q95']:+.3f}]"


def render_markdown(results: dict, figures: list[Path], run_dir: Path) -> str:
    cfg = results["config"]
    base = results["settings"][0]
    d = results["data"]
    env = results["environment"]
    out = [
        f"# sublab mnist: {results['name']}",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Data: {d['name']}, {d['n_train']} train / {d['n_test']} test images of shape {tuple(d['image_shape'])}. "
        f"MLP {' - '.join(str(s) for s in [int(_prod(d['image_shape']))] + [cfg['model']['hidden']] * cfg['model']['layers'])}"
        f" - (10 + {cfg['model']['n_aux']}); {cfg['n_models']} models per arm; "
        f"device {env['device']}, {env['threads']} thread(s); total {results['seconds_total']:.1f} s.",
        "",
        f"## Accuracy per arm (setting: {base['label']})",
        "",
        f"Teacher: {base['steps']['teacher']} steps; students: {base['steps']['distill']} steps on "
        f"{cfg['distill']['inputs']} with {cfg['distill']['loss']} loss. Chance is 10%. "
        "Cross-init students start from another member's reference init (a derangement: never their teacher's).",
        "",
        *_accuracy_table(base),
        "",
        *_paired_table(base),
        *_heldout_table(base),
    ]
    if base["theorem"].get("first_step"):
        th = cfg["theorem"]
        out += [
            "## Theorem: the student's first step and the teacher's displacement",
            "",
            "d_T = theta_teacher - theta_0 (the student's teacher, after full training); d_S (SGD) = minus the "
            "gradient of the distillation loss at the student's init on the first batch; d_S (Adam) = the actual "
            f"first Adam update. L_T = digit cross-entropy on {th['n_eval']} training images (the teacher's training "
            f"objective), evaluated at the student's parameters; dL_T(probe) = L_T(theta_0 + a d_S/|d_S|) - "
            f"L_T(theta_0) with a = {th['probe_step']}, next to its first-order prediction.",
            "",
            *_theorem_table(base),
            "",
        ]
    if base["theorem"].get("trajectory"):
        out += [f"Along the first {cfg['theorem']['steps']} actual distillation steps (Adam):", "",
                *_trajectory_table(base), ""]  # fmt: skip
    if len(results["settings"]) > 1:
        arms = results["arms"]
        out += [
            f"## Sweep ({results['sweep_mode']})",
            "",
            "| setting | " + " | ".join(LABELS[a] for a in arms) + " | same-init aux <d_T,d_S> >= 0 |",
            "|---|" + "---|" * (len(arms) + 1),
        ]
        for s in results["settings"]:
            share = (
                s["theorem"]
                .get("first_step", {})
                .get("student_aux", {})
                .get("ip_sgd", {})
                .get("share_nonneg")
            )
            out.append(
                f"| {s['label']} | " + " | ".join(_pct(s["arms"][a]) for a in arms)
                + f" | {'' if share is None else f'{share:.0%}'} |"
            )  # fmt: skip
        out.append("")
    out += _projection_section(results)
    out += ["## Figures", ""]
    for p in figures:
        rel = Path(p).relative_to(run_dir)
        out.append(f"![{rel.stem}]({rel.as_posix()})")
    out += ["", "Full numbers (per member) in results.json; the resolved config in config.yaml.", ""]
    return "\n".join(out)


def _prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
