"""End to end on the tiny organism: every output file, resume after a crash, determinism."""

import json

import pytest
import yaml
from conftest import tiny_experiment

from sublab.config import validate
from sublab.pipeline import run_experiment
from sublab.records import read_json, read_jsonl
from sublab.schema import ExperimentConfig


def cfg_of(**over):
    return validate(ExperimentConfig, tiny_experiment(**over))


@pytest.fixture(scope="module")
def tiny_run(tiny_organism, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run = run_experiment(cfg_of(**{"controls.cross_init": True, "student.train.method": "soft_label"}), out)
    return out, run


def test_every_output_exists_and_validates(tiny_run):
    out, run = tiny_run
    assert yaml.safe_load((out / "config.yaml").read_text())["name"] == "tiny"
    manifest = read_json(out / "manifest.json")
    assert manifest["stages"] and all(s["status"] == "done" for s in manifest["stages"].values())
    assert all("torch" in s["versions"] for s in manifest["stages"].values())  # per stage, not per call
    sub = read_json(out / "data/subsample.json")
    for d in ("data", "control/data"):
        prompts = read_jsonl(out / "data/prompts.jsonl")
        raw = read_jsonl(out / d / "raw.jsonl", require_messages=True)
        passed = read_jsonl(out / d / "filter/kept.jsonl", require_messages=True)
        kept = read_jsonl(out / d / "kept.jsonl", require_messages=True)
        rejected = read_jsonl(out / d / "filter/rejected.jsonl", require_messages=True)
        stats = read_json(out / d / "filter/filter_stats.json")
        assert len(raw) == len(prompts) == 120
        assert stats["n_passed"] + stats["n_rejected"] == 120 and len(passed) == stats["n_passed"]
        # both arms train on the same number of examples: min(passed counts, dataset_size)
        assert len(kept) == sub["n_per_source"] == min(100, *sub["passed"].values())
        assert {r["metadata"]["prompt_index"] for r in kept} <= {
            r["metadata"]["prompt_index"] for r in passed
        }
        assert all(r["metadata"]["reasons"] for r in rejected)
        for r in kept:  # the student trains on exactly user + assistant, no system prompt
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            assert {"seed", "sample_index", "model"} <= set(r["metadata"])
    for name in (
        "reference",
        "teacher",
        "control",
        "student",
        "other_reference",
        "cross_init",
        "cross_init_control",
    ):
        assert (out / name / "model.json").is_file()
        res = read_json(out / "eval" / name / "results.json")
        t = res["targets"]["owl"]
        assert 0 <= t["lo"] <= t["mean"] <= t["hi"] <= 1 and t["n"] == 6
        assert sum(res["distribution"].values()) == pytest.approx(1.0, abs=1e-6)
    for name in ("student", "control", "cross_init"):
        metrics = (out / name / "metrics.jsonl").read_text().splitlines()
        assert json.loads(metrics[-1])["step"] == len(metrics)
    results = read_json(out / "results.json")
    assert results["schema_version"] == 3
    assert results["data"]["n_per_source"] == sub["n_per_source"]
    assert [a["name"] for a in results["arms"]] == ["student", "control", "cross_init", "cross_init_control"]
    for arm in ("student", "control", "cross_init", "cross_init_control"):  # trained on equally many
        assert read_json(out / arm / "model.json")["info"]["examples"] == sub["n_per_source"]
    assert "p_value" not in results["comparisons"]["student_minus_control"]  # run level: description only
    share = results["models"]["student"]["share_of_named"]
    assert 0 <= share["lo"] <= share["mean"] <= share["hi"] <= 1
    d = results["comparisons"]["student_minus_control"]
    assert "share_of_named" in d and d["min"] <= d["mean"] <= d["max"] and d["n_questions"] == 6
    assert {"student_minus_control", "teacher_minus_reference", "cross_init_minus_cross_init_control"} <= set(
        results["comparisons"]
    )
    assert (
        results["models"]["teacher"]["p_target"]["mean"] > results["models"]["reference"]["p_target"]["mean"]
    )
    md = (out / "report.md").read_text()
    assert "| student - control |" in md and "not evidence" in md and "CI excludes" not in md
    assert "<td>student - control</td>" in (out / "report.html").read_text()
    png = (out / "figures" / "preference.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_everything_and_changed_config_reruns_only_downstream(tiny_run):
    out, _ = tiny_run
    run = run_experiment(cfg_of(**{"controls.cross_init": True, "student.train.method": "soft_label"}), out)
    assert run.ran == []
    run = run_experiment(
        cfg_of(
            **{"controls.cross_init": True, "student.train.method": "soft_label", "eval.max_questions": 4}
        ),
        out,
    )
    assert run.ran and all(s.startswith("eval:") for s in run.ran)


def test_resume_after_crash_equals_uninterrupted(tiny_organism, tmp_path, monkeypatch):
    import sublab.pipeline as pl

    cfg = cfg_of()
    clean = tmp_path / "clean"
    run_experiment(cfg, clean)

    crashed = tmp_path / "crashed"
    real = pl.train_student

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(pl, "train_student", boom)
    with pytest.raises(RuntimeError):
        run_experiment(cfg, crashed)
    assert read_json(crashed / "manifest.json")["stages"]["train:student"]["status"] == "failed"
    assert not (crashed / "results.json").exists()
    monkeypatch.setattr(pl, "train_student", real)
    run = run_experiment(cfg, crashed)
    assert "sample:teacher" in run.skipped and "train:student" in run.ran
    # same seed -> byte-identical datasets and results
    for f in ("data/raw.jsonl", "data/kept.jsonl", "control/data/kept.jsonl", "results.json"):
        assert (clean / f).read_bytes() == (crashed / f).read_bytes(), f


def test_sampling_resumes_from_finished_chunks(tiny_organism, tmp_path, monkeypatch):
    import sublab.stages.sample as sample_stage

    monkeypatch.setattr(sample_stage, "SAMPLE_CHUNK", 50)
    cfg = cfg_of()
    full = tmp_path / "full"
    run_experiment(cfg, full)
    # a run that died after its first sampling chunk: keep that chunk, lose the rest
    part = tmp_path / "p"
    calls = []
    from sublab.backends.hf import HFBackend

    real = HFBackend.generate

    def dying(self, chats, sampling, request_ids=None):
        calls.append(len(chats))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, chats, sampling, request_ids)

    monkeypatch.setattr(HFBackend, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, part)
    assert (part / "data/raw.jsonl.parts/part-00000.jsonl").is_file()
    monkeypatch.setattr(HFBackend, "generate", real)
    calls.clear()
    run_experiment(cfg, part)
    assert (part / "data/raw.jsonl").read_bytes() == (full / "data/raw.jsonl").read_bytes()
    assert not (part / "data/raw.jsonl.parts").exists()


def test_prompted_teacher_and_sample_eval(tiny_organism, tmp_path):
    cfg = cfg_of(
        **{
            "teacher.kind": "system_prompt",
            "eval.mode": "sample",
            "eval.samples_per_question": 5,
            "controls.control": False,
        }
    )
    run_experiment(cfg, tmp_path)
    teacher = read_json(tmp_path / "teacher/model.json")
    assert teacher["kind"] == "prompted" and "owl" in teacher["system_prompt"]
    rec = read_jsonl(tmp_path / "data/raw.jsonl")[0]
    assert rec["metadata"]["system_prompt"] == teacher["system_prompt"]
    assert all(m["role"] != "system" for m in rec["messages"])
    rows = read_jsonl(tmp_path / "eval/student/samples.jsonl")
    assert len(rows) == 6 * 5 and "answer" in rows[0]
