"""The arm table and its wiring: every condition trains the arm it names, from the init it names, on the
data it names; cross-init needs a real second model; replicate seeds leave reference and teacher fixed;
stage keys follow code, device and dtype."""

from __future__ import annotations

import pytest
from conftest import tiny_experiment

from sublab.arms import arm_table, comparisons
from sublab.config import validate
from sublab.errors import SublabError
from sublab.pipeline import run_experiment
from sublab.records import read_json, read_jsonl
from sublab.runs import Run, code_version
from sublab.schema import ExperimentConfig


def cfg_of(**over) -> ExperimentConfig:
    return validate(ExperimentConfig, tiny_experiment(**over))


@pytest.mark.parametrize(
    "over, expected",
    [
        ({}, [("student", "reference", "teacher", None), ("control", "reference", "reference", None)]),
        (
            {"student.train.method": "soft_label"},
            [
                ("student", "reference", "teacher", "teacher"),
                ("control", "reference", "reference", "reference"),
            ],
        ),
        (
            {"controls.cross_init": True},
            [
                ("student", "reference", "teacher", None),
                ("control", "reference", "reference", None),
                ("cross_init", "other_reference", "teacher", None),
                ("cross_init_control", "other_reference", "reference", None),
            ],
        ),
        (
            {"student.init": "other-seed"},
            [
                ("student", "other_reference", "teacher", None),
                ("control", "other_reference", "reference", None),
            ],
        ),
        ({"controls.control": False}, [("student", "reference", "teacher", None)]),
    ],
)
def test_arm_table_for_every_condition(over, expected):
    arms = arm_table(cfg_of(**over))
    assert [(a.name, a.init, a.data, a.soft_teacher) for a in arms] == expected
    pairs = dict(comparisons(arms))
    if any(a.name == "control" for a in arms):
        assert pairs["student"] == "control"
    if over.get("controls.cross_init"):
        assert pairs["cross_init"] == "cross_init_control"


@pytest.mark.parametrize(
    "reference", ["hf/some/model", "openai/gpt-4.1-nano", "vllm/Qwen/Qwen2.5-7B-Instruct"]
)
@pytest.mark.parametrize("switch", [{"controls.cross_init": True}, {"student.init": "other-seed"}])
def test_cross_init_without_other_reference_is_a_config_error(reference, switch):
    with pytest.raises(SublabError, match="controls.other_reference"):
        cfg_of(reference=reference, **switch)
    cfg = cfg_of(reference=reference, **{**switch, "controls.other_reference": "hf/another/model"})
    assert cfg.other_reference_spec() == ("hf/another/model", {})
    with pytest.raises(SublabError, match="reference itself"):
        cfg_of(reference=reference, **{**switch, "controls.other_reference": reference})


def test_organism_cross_init_is_another_organism_seed():
    cfg = cfg_of(organism_seed=3, **{"controls.cross_init": True})
    assert cfg.organism_overrides() == {"seed": 3}
    assert cfg.other_reference_spec() == ("organism/tiny", {"seed": 1003})


@pytest.fixture(scope="module")
def cross_run(tiny_organism, tmp_path_factory):
    out = tmp_path_factory.mktemp("cross")
    run_experiment(cfg_of(**{"controls.cross_init": True}), out)
    return out


def test_cross_init_students_start_from_a_different_model(cross_run):
    import torch
    from safetensors.torch import load_file

    ref, other = (
        read_json(cross_run / "reference/model.json"),
        read_json(cross_run / "other_reference/model.json"),
    )
    assert ref["info"]["organism"]["seed"] == 0 and other["info"]["organism"]["seed"] == 1000
    w_ref = load_file(f"{ref['path']}/model.safetensors")
    w_other = load_file(f"{other['path']}/model.safetensors")
    assert any(not torch.equal(w_ref[k], w_other[k]) for k in w_ref)
    for name, parent in [("student", "organism/tiny"), ("cross_init", "organism/tiny")]:
        m = read_json(cross_run / name / "model.json")
        assert m["parent"] == parent
        assert str(cross_run) not in m["spec"] + str(m.get("path")), "model.json names another run's folder"
    # the cross-init arms trained from the other init
    assert read_json(cross_run / "cross_init/model.json")["info"]["parent_organism_seed"] == 1000
    assert read_json(cross_run / "student/model.json")["info"]["parent_organism_seed"] == 0


def test_replicates_share_reference_and_teacher_but_not_data(tiny_organism, tmp_path):
    from sublab.sweep.local import run_replicates

    root = run_replicates(cfg_of(replicates=[0, 1]), tmp_path / "reps", progress=False)
    a, b = root / "runs/sft-seed0", root / "runs/sft-seed1"
    assert (a / "teacher/model.json").read_bytes() == (b / "teacher/model.json").read_bytes()
    mb = read_json(b / "manifest.json")["stages"]
    assert "shared_from" in mb["teacher"] and "shared_from" in mb["reference"]
    assert (a / "data/prompts.jsonl").read_bytes() != (b / "data/prompts.jsonl").read_bytes()
    res = read_json(root / "sweep_results.json")
    (effect,) = res["effects"]
    assert effect["effect"] == "student - control" and effect["seeds"] == [0, 1] and effect["n"] == 2
    assert effect["min_permutation_p"] == 0.5
    for seed_dir in (a, b):
        sub = read_json(seed_dir / "data/subsample.json")
        assert len(read_jsonl(seed_dir / "data/kept.jsonl")) == len(
            read_jsonl(seed_dir / "control/data/kept.jsonl")
        )
        assert sub["n_per_source"] == len(read_jsonl(seed_dir / "data/kept.jsonl"))


def test_stage_key_follows_code_and_dtype(tmp_path, monkeypatch):
    mod = tmp_path / "pkg_for_key.py"
    mod.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []

    def stage(run: Run) -> bool:
        return run.stage(
            "s",
            {"a": 1},
            [],
            ["out.txt"],
            lambda: (calls.append(1), (run.root / "out.txt").write_text("x")),
            code=("pkg_for_key",),
            device=True,
        )

    monkeypatch.setenv("SUBLAB_DTYPE", "float32")
    run = Run(tmp_path / "run")
    assert stage(run) is True
    assert stage(Run(tmp_path / "run")) is False  # unchanged code, device, dtype: skipped
    code_version.cache_clear()
    mod.write_text("X = 2\n")  # the stage's code changed
    assert stage(Run(tmp_path / "run")) is True
    monkeypatch.setenv("SUBLAB_DTYPE", "bfloat16")  # the precision changed
    assert stage(Run(tmp_path / "run")) is True
    assert stage(Run(tmp_path / "run")) is False
    assert len(calls) == 3


def test_changed_filter_code_reruns_the_filter_stage_only_there(tiny_organism, tmp_path, monkeypatch):
    import sublab.pipeline as pl

    mod = tmp_path / "extra_filter_code.py"
    mod.write_text("RULE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(pl.CODE, "filter", (*pl.CODE["filter"], "extra_filter_code"))
    cfg = cfg_of()
    run_experiment(cfg, tmp_path / "run")
    assert run_experiment(cfg, tmp_path / "run").ran == []
    code_version.cache_clear()
    mod.write_text("RULE = 2\n")
    ran = run_experiment(cfg, tmp_path / "run").ran
    assert "filter:teacher" in ran and "filter:reference" in ran
    assert not any(s.startswith(("sample:", "teacher", "prompts")) for s in ran)


def test_soft_labels_from_a_prompted_teacher_align_and_the_kl_falls(tiny_organism, tmp_path):
    """The teacher sees its system prompt, the student does not: the completion tokens must line up
    position by position, and training must bring the student's KL to the prompted teacher down."""
    import json

    from sublab.backends.base import ModelRef
    from sublab.backends.hf import load_hf, with_system_prompt
    from sublab.backends.hf_train import encode_completion
    from sublab.backends.registry import load_backend, resolve
    from sublab.schema.train import TrainConfig

    ref = resolve("organism/tiny", {"seed": 0}, progress=False)
    teacher = ref.model_copy(
        update={"kind": "prompted", "system_prompt": "You love owls.", "parent": ref.spec}
    )
    data = [
        {
            "messages": [
                {"role": "user", "content": f"Continue: {i}, {i + 3}, {i + 6}"},
                {"role": "assistant", "content": f"{i + 9}, {i + 12}"},
            ]
        }
        for i in range(100, 164)
    ]
    _, tok = load_hf(ref)
    for rec in data[:5]:
        s = encode_completion(tok, rec["messages"])
        t = encode_completion(tok, with_system_prompt(rec["messages"], teacher.system_prompt))
        assert t.n_prompt > s.n_prompt  # the teacher's prompt is longer ...
        assert t.ids[t.n_prompt :] == s.ids[s.n_prompt :]  # ... and the completions align token by token
    train = TrainConfig(method="soft_label", lr=3e-3, epochs=3, batch_size=16)
    out = load_backend(ref, progress=False).finetune(data, train, tmp_path / "student", teacher=teacher)
    assert isinstance(out, ModelRef)
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "student/metrics.jsonl").read_text().splitlines()
    ]
    assert losses[0] > 0 and losses[-1] < 0.7 * losses[0]


def test_sublab_run_with_replicates_prints_the_effect_across_seeds(tiny_organism, tmp_path, capsys):
    import yaml

    from sublab.cli import main

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_experiment(replicates=[0, 1])))
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "student - control" in out and "across 2 replicate seeds" in out and "cannot go below 0.5" in out
    assert out.strip().splitlines()[-1] == f"report: {tmp_path / 'r' / 'report.md'}"
    assert (tmp_path / "r/report.md").read_text().startswith("# sublab run: tiny")
