"""Sweeps: expansion, axis validation, shared stages computed once, resume, aggregated report."""

import json

import pytest

from sublab.analysis.stats import compare_seeds, holm
from sublab.cli import main
from sublab.errors import SublabError
from sublab.records import read_json
from sublab.sweep.config import SweepConfig, check_path, expand
from sublab.sweep.local import run_sweep


def test_grid_expansion_and_names():
    cfg = SweepConfig(base="x.yaml", targets=["owl", "wolf"], seeds=[0, 1], conditions=["sft", "soft"])
    runs = expand(cfg)
    assert len(runs) == 8
    assert runs[0]["name"] == "sft-owl-seed0"
    assert runs[-1]["overrides"] == {"student.train.method": "soft_label", "trait.target": "wolf", "seed": 1}
    listed = expand(SweepConfig(base="x.yaml", mode="list", runs=[{"seed": 3}, {"trait.target": "fox"}]))
    assert [r["overrides"] for r in listed] == [{"seed": 3}, {"trait.target": "fox"}]


@pytest.mark.parametrize(
    "axes,message",
    [
        ({"student.trian.lr": [1]}, "did you mean 'train'"),
        ({"seed.x": [1]}, "is a value, not a section"),
        ({"student.train.lr": []}, "is empty"),
    ],
)
def test_bad_axes_are_clear_errors(axes, message):
    with pytest.raises(SublabError, match=message):
        expand(SweepConfig(base="x.yaml", axes=axes))


def test_paths_into_free_form_sections_are_allowed():
    check_path("organism.steps")
    check_path("student.train.lora")
    with pytest.raises(SublabError, match="unknown condition"):
        expand(SweepConfig(base="x.yaml", conditions=["bogus"]))


def test_stats_against_scipy():
    from scipy import stats as st

    s, c = [0.10, 0.14, 0.12, 0.20], [0.07, 0.09, 0.08, 0.10]
    r = compare_seeds(s, c)
    assert r["p_paired_t"] == pytest.approx(st.ttest_rel(s, c).pvalue)
    assert r["p_welch"] == pytest.approx(st.ttest_ind(s, c, equal_var=False).pvalue)
    assert r["p_permutation"] == pytest.approx(2 / 16)  # exact: all 16 sign patterns, 2 as extreme
    assert holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])


def test_shared_stages_run_once_and_resume(tiny_organism, sweep_file, tmp_path, monkeypatch):
    import sublab.pipeline as pl

    calls = {"sample": [], "train": []}
    real_sample, real_train = pl.sample_dataset, pl.train_student

    def sample(model_json, *a, **k):
        calls["sample"].append(model_json.parent.name)
        return real_sample(model_json, *a, **k)

    def train(base, data, train_cfg, out, *a, **k):
        calls["train"].append(out.name)
        return real_train(base, data, train_cfg, out, *a, **k)

    monkeypatch.setattr(pl, "sample_dataset", sample)
    monkeypatch.setattr(pl, "train_student", train)
    out = tmp_path / "sweep-out"
    run_sweep(sweep_file, out=out, progress=False)
    # two targets share one seed: the reference's data and the control student are computed once
    assert sorted(calls["sample"]) == ["reference", "teacher", "teacher"]
    assert sorted(calls["train"]) == ["control", "student", "student"]
    state = read_json(out / "sweep.json")
    assert [r["status"] for r in state["runs"]] == ["done", "done"]
    assert state["counts"]["stages_shared"] >= 5
    results = read_json(out / "sweep_results.json")
    assert {e["target"] for e in results["effects"]} == {"owl", "wolf"}
    report = (out / "report.md").read_text()
    assert "| sft | owl | student - control | 1 |" in report
    assert "data:image/png;base64," in (out / "report.html").read_text()
    # rerun: nothing is recomputed; results identical
    calls["sample"].clear()
    calls["train"].clear()
    before = (out / "sweep_results.json").read_bytes()
    run_sweep(sweep_file, out=out, progress=False)
    assert calls == {"sample": [], "train": []}
    assert (out / "sweep_results.json").read_bytes() == before
    # `sublab report` rebuilds it from the folders
    assert main(["report", str(out)]) == 0
    assert json.loads((out / "sweep_results.json").read_text())["effects"]


def test_sweep_cli_bad_axis(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("base: quickstart.yaml\naxes: {student.train.lrr: [1]}\n")
    assert main(["sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_process_pool_computes_shared_stages_once_and_matches_sequential(tiny_organism, sweep_file, tmp_path):
    seq = run_sweep(sweep_file, out=tmp_path / "seq", progress=False)
    par = run_sweep(sweep_file, out=tmp_path / "par", progress=False, workers=2)
    a, b = read_json(seq / "sweep_results.json"), read_json(par / "sweep_results.json")
    assert a["effects"] == b["effects"] and a["runs"] == b["runs"]
    computed: dict[str, int] = {}
    for run in ("sft-owl-seed0", "sft-wolf-seed0"):
        for name, st in read_json(par / "runs" / run / "manifest.json")["stages"].items():
            if "shared_from" not in st:
                computed[name] = computed.get(name, 0) + 1
    # the stages both runs share ran in one worker only; the other waited and copied them
    assert computed["sample:reference"] == 1 and computed["train:control"] == 1 and computed["prompts"] == 1
    assert computed["sample:teacher"] == 2
    from filelock import FileLock

    for lock in (par / "stages").glob("*.lock"):  # filelock keeps the files; none may still be held
        FileLock(str(lock), timeout=0).acquire()


def test_workers_may_not_oversubscribe(sweep_file, tmp_path):
    with pytest.raises(SublabError, match="oversubscribe"):
        run_sweep(sweep_file, out=tmp_path / "o", progress=False, workers=64)


def _fixture_sweep(root, runs):
    """A finished sweep folder made by hand: sweep.json plus one results.json per run."""
    from sublab.records import atomic_write_json

    entries = []
    for name, labels, p in runs:
        atomic_write_json(
            root / "runs" / name / "results.json",
            {
                "trait": {"target": labels["trait.target"]},
                "seed": labels["seed"],
                "models": {m: {"p_target": {"mean": v}} for m, v in p.items()},
            },
        )
        entries.append({"name": name, "folder": f"runs/{name}", "status": "done", "labels": labels})
    counts = {"done": len(runs), "failed": 0, "stages_run": 1, "stages_skipped": 0, "stages_shared": 0}
    atomic_write_json(
        root / "sweep.json", {"sweep": {"name": "fx"}, "runs": entries, "counts": counts, "seconds": 1.0}
    )


def test_report_from_fixture_folders_heatmap_and_dose_response(tmp_path):
    from sublab.analysis.sweep_report import numeric_axes, write_sweep_report

    runs = []
    for rank in (4, 8, 16):
        for seed in (0, 1, 2):
            for target in ("owl", "wolf"):
                student = 0.10 + 0.01 * rank / 4 + 0.001 * seed
                p = {"reference": 0.06, "control": 0.07 + 0.001 * seed, "student": student}
                p |= {"cross_init": 0.071 + 0.001 * seed, "cross_init_control": 0.07 + 0.001 * seed}
                labels = {"condition": "cross-init", "trait.target": target, "seed": seed}
                runs.append((f"{target}-r{rank}-s{seed}", {**labels, "student.train.lora.r": rank}, p))
    _fixture_sweep(tmp_path, runs)
    agg = write_sweep_report(tmp_path)
    # 3 ranks x 2 targets x {student, cross-init} effects, each over 3 seeds
    assert len(agg["effects"]) == 12
    e = next(
        e
        for e in agg["effects"]
        if e["setting"] == "r=8" and e["target"] == "owl" and e["effect"] == "student - control"
    )
    assert e["mean"] == pytest.approx(0.12 - 0.07) and e["seeds"] == [0, 1, 2]
    assert e["unit_values"] == pytest.approx([0.12 - 0.07] * 3)  # each seed's own student - control
    x = next(e for e in agg["effects"] if e["effect"].startswith("cross_init") and e["setting"] == "r=4")
    assert x["mean"] == pytest.approx(0.001)
    assert numeric_axes(read_json(tmp_path / "sweep_results.json")["runs"]) == ["student.train.lora.r"]
    figs = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"heatmap.png", "dose_student_train_lora_r.png"} <= figs
    assert len([f for f in figs if f.startswith("sweep_cross-init")]) == 3  # one main panel per rank
    md = (tmp_path / "report.md").read_text()
    assert "| cross-init | r=16 | owl | student - control | 3 |" in md
    assert "[config.yaml](runs/owl-r4-s0/config.yaml)" in md
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figs)


def test_models_expand_to_teacher_x_other_model_runs():
    cfg = SweepConfig(
        base="x.yaml", targets=["owl"], seeds=[0, 1], models=["organism/a", "organism/b"], other_seed=True
    )
    runs = expand(cfg)
    # 2 teacher models x (1 other model + the other seed) x 2 seeds
    assert len(runs) == 8
    first = runs[0]
    assert first["name"] == "sft-a-x-b-owl-seed0"
    assert first["overrides"]["reference"] == "organism/a"
    assert first["overrides"]["controls.other_reference"] == "organism/b"
    assert first["overrides"]["controls.cross_init"] is True
    seeded = [r for r in runs if r["labels"]["controls.other_reference"] == "other seed"]
    assert len(seeded) == 4 and all(r["overrides"]["controls.other_reference"] is None for r in seeded)
    assert len({r["name"] for r in runs}) == 8  # folder names are unique and hold no '/'
    assert not any("/" in r["name"] for r in runs)
    with pytest.raises(ValueError, match="at least two"):
        SweepConfig(base="x.yaml", models=["organism/a"])
    with pytest.raises(ValueError, match="twice"):
        SweepConfig(base="x.yaml", models=["organism/a", "organism/a"])


def test_cross_model_report_diagonal_once_per_unit(tmp_path):
    from sublab.analysis.sweep_report import write_sweep_report

    models = ["organism/a", "organism/b", "organism/c"]
    runs = []
    for t in models:
        for o in [m for m in models if m != t] + ["other seed"]:
            for seed in (0, 1, 2):
                same = 0.20 + 0.01 * seed  # the same-init student, identical in both runs of teacher t
                cross = 0.071 + 0.002 * seed if o != "organism/c" else 0.15 + 0.01 * seed
                p = {"reference": 0.06, "control": 0.07, "student": same}
                p |= {"cross_init": cross, "cross_init_control": 0.07 + 0.001 * seed}
                labels = {"condition": "sft", "trait.target": "owl", "seed": seed}
                labels |= {"reference": t, "controls.other_reference": o}
                runs.append((f"{t[-1]}-{o[-1]}-{seed}", labels, p))
    _fixture_sweep(tmp_path, runs)
    write_sweep_report(tmp_path)
    cells = read_json(tmp_path / "sweep_results.json")["cross_model"]
    # 3 teachers x (itself, 2 other models, its other seed)
    assert len(cells) == 12
    diag = [c for c in cells if c["same_init"]]
    assert len(diag) == 3 and all(len(c["units"]) == 3 for c in diag)  # counted once per unit
    assert diag[0]["mean"] == pytest.approx(0.21 - 0.07)
    off = {(c["teacher_model"], c["student_model"]): c for c in cells if not c["same_init"]}
    assert off[("organism/a", "organism/b")]["mean"] == pytest.approx(0.001 + 0.001)
    assert off[("organism/a", "organism/c")]["mean"] > 0.07  # a leak into c would show
    assert ("organism/b", "organism/b (other seed)") in off
    md = (tmp_path / "report.md").read_text()
    assert "## Cross-model" in md and "| sft | owl | organism/a | organism/a (same) | 3 |" in md
    assert (tmp_path / "figures" / "cross_model.png").is_file()


def test_a_second_sweep_into_a_busy_folder_is_a_clear_error(sweep_file, tmp_path):
    from sublab.sweep.local import hold_sweep_lock

    out = tmp_path / "busy"
    out.mkdir()
    lock = hold_sweep_lock(out)  # as a running sweep holds it
    try:
        with pytest.raises(SublabError, match="another sweep is running"):
            run_sweep(sweep_file, out=out, progress=False)
    finally:
        lock.release()


_ORPHAN_PARENT = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from sublab.sweep.local import exit_with_parent

def work(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        pool.submit(work, sys.argv[1]).result()
"""


def test_a_killed_sweep_takes_its_pool_workers_with_it(tmp_path):
    # killing `sublab sweep` (even with SIGKILL) must not leave workers training into the sweep folder
    import os
    import signal
    import subprocess
    import sys
    import time

    script, pidfile = tmp_path / "parent.py", tmp_path / "worker.pid"
    script.write_text(_ORPHAN_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(pidfile)])
    try:
        deadline = time.time() + 60
        while not (pidfile.is_file() and pidfile.read_text()) and time.time() < deadline:
            time.sleep(0.1)
        worker = int(pidfile.read_text())
        os.kill(worker, 0)  # alive while the sweep is
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(worker, signal.SIGKILL)
            raise AssertionError("the pool worker outlived its killed sweep")
    finally:
        parent.kill()
