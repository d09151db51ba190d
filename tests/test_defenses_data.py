"""Defenses on the student's data and the meters beside them: loss masking leaves masked tokens out of
the gradient, the divergence meter finds no divergence against the teacher itself and masks what it
finds, paraphrased prompts keep the request, teacher mixing keeps the size, the coverage screen gives
cos 1 for a teacher that is one SGD step on the data, the task-quality cost separates a broken model,
and a tiny experiment with every one on trains the control exactly as without them."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import tiny_experiment

from sublab.backends.base import ModelRef
from sublab.backends.hf import finetune_hf, load_hf
from sublab.backends.hf_train import Encoded, collate
from sublab.config import validate
from sublab.errors import SublabError
from sublab.filters import parse_numbers
from sublab.meters.coverage import coverage_stage
from sublab.meters.divergence import divergence_stage
from sublab.meters.quality import task_quality
from sublab.pipeline import run_experiment
from sublab.prompts.numbers import generate_number_prompts, load_phrasings, paraphrase_prompt
from sublab.records import read_json, read_jsonl, write_jsonl
from sublab.schema import ExperimentConfig
from sublab.schema.filter import FilterConfig
from sublab.schema.prompts import NumberPrompts
from sublab.schema.sampling import SamplingParams
from sublab.schema.train import TrainConfig
from sublab.stages.filter import mix_teachers

pytestmark = pytest.mark.usefixtures("default_device")


@pytest.fixture(scope="module")
def tiny_ref(tiny_organism):
    from sublab.backends.registry import resolve

    return resolve("organism/tiny", {"seed": 0}, progress=False)


def number_records(n: int, seed: int = 0) -> list[dict]:
    prompts = generate_number_prompts(NumberPrompts(count=n), seed)
    rng = random.Random(seed)
    return [
        {
            "messages": [
                *p["messages"],
                {"role": "assistant", "content": ", ".join(str(rng.randint(0, 999)) for _ in range(5))},
            ],
            "metadata": p["metadata"],
        }
        for p in prompts
    ]


def test_collate_leaves_skipped_positions_out_of_the_loss():
    e = Encoded([1, 2, 3, 4, 5, 6], n_prompt=2, skip=(0, 3, 9))  # 9: beyond the example, ignored
    _, _, loss = collate([e], pad_id=0)
    assert loss[0].tolist() == [False, False, False, True, True, False]


def test_fully_masked_finetune_leaves_the_weights_alone(tiny_ref, tmp_path):
    recs = number_records(16)
    n_tokens = 12  # more than any answer's completion tokens (5 numbers, separators, end token)
    masked = [{**r, "metadata": {**r["metadata"], "loss_skip": list(range(n_tokens))}} for r in recs]
    train = TrainConfig(lr=1e-2, max_steps=2, batch_size=8)
    base, _ = load_hf(tiny_ref)
    a = finetune_hf(tiny_ref, masked, train, tmp_path / "masked", progress=False)
    b = finetune_hf(tiny_ref, recs, train, tmp_path / "plain", progress=False)
    ma, mb = load_hf(a)[0], load_hf(b)[0]
    w0 = dict(base.named_parameters())
    assert all(torch.equal(p, w0[n]) for n, p in ma.named_parameters())
    assert any(not torch.equal(p, w0[n]) for n, p in mb.named_parameters())
    assert a.info["final_loss"] == 0.0


@pytest.fixture(scope="module")
def teacher(tiny_ref, tmp_path_factory):
    """The tiny reference finetuned a few steps on number answers (a displaced teacher)."""
    out = tmp_path_factory.mktemp("teacher")
    return finetune_hf(
        tiny_ref,
        number_records(64, 7),
        TrainConfig(lr=3e-3, max_steps=6, batch_size=16),
        out / "t",
        progress=False,
    )


def test_divergence_is_zero_against_the_teacher_itself_and_masked_where_found(tiny_ref, teacher, tmp_path):
    kept = write_jsonl(tmp_path / "kept.jsonl", number_records(24, 3))
    tj = teacher.save(tmp_path / "teacher.json")
    rj = tiny_ref.save(tmp_path / "ref.json")
    same = divergence_stage(tj, {"self": tj}, kept, tmp_path / "same.json")
    assert same["rate_pooled"] == 0.0 and same["answers_with_any"] == 0.0
    res = divergence_stage(
        tj, {"reference": rj, "self": tj}, kept, tmp_path / "div.json", tmp_path / "masked.jsonl"
    )
    assert res["n_answers"] == 24 and res["per_counterfactual"]["self"] == 0.0
    assert res["rate_pooled"] == res["per_counterfactual"]["reference"] > 0
    masked = read_jsonl(tmp_path / "masked.jsonl")
    assert [m["messages"] for m in masked] == [r["messages"] for r in read_jsonl(kept)]
    assert (
        sum(len(m["metadata"]["loss_skip"]) for m in masked)
        == res["masked_tokens"]
        == round(res["rate_pooled"] * res["n_tokens"])
    )


def test_sampled_rule_flags_a_subset_of_the_argmax_rule(tiny_ref, teacher, tmp_path):
    kept = write_jsonl(tmp_path / "kept.jsonl", number_records(24, 3))
    tj, rj = teacher.save(tmp_path / "teacher.json"), tiny_ref.save(tmp_path / "ref.json")
    a = divergence_stage(tj, {"reference": rj}, kept, tmp_path / "a.json", tmp_path / "a.jsonl")
    s = divergence_stage(
        tj, {"reference": rj}, kept, tmp_path / "s.json", tmp_path / "s.jsonl", rule="sampled"
    )
    assert s["rule"] == "sampled" and s["masked_tokens"] <= a["masked_tokens"]
    for x, y in zip(read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "s.jsonl"), strict=True):
        assert set(y["metadata"]["loss_skip"]) <= set(x["metadata"]["loss_skip"])
    with pytest.raises(SublabError, match="unknown divergence rule"):
        divergence_stage(tj, {"reference": rj}, kept, tmp_path / "x.json", rule="greedy")


def test_paraphrase_keeps_the_request_and_rewords_it():
    ph = load_phrasings()
    recs = generate_number_prompts(NumberPrompts(count=40), 0)
    rng = random.Random(0)
    for r in recs:
        p = paraphrase_prompt(r, 3, rng, ph)
        text = p["messages"][0]["content"]
        assert text != r["messages"][0]["content"] == p["metadata"]["original_prompt"]
        assert ", ".join(map(str, r["metadata"]["examples"])) in text
        assert {k: p["metadata"][k] for k in ("sep", "brackets", "answer_count")} == {
            k: r["metadata"][k] for k in ("sep", "brackets", "answer_count")
        }
    with pytest.raises(SublabError, match="prompts from a file"):
        paraphrase_prompt({"messages": [{"role": "user", "content": "x"}], "metadata": {}}, 3, rng, ph)


def test_mix_teachers_keeps_the_size_in_equal_shares(tmp_path):
    base = write_jsonl(tmp_path / "t.jsonl", number_records(31, 1))
    others = {
        f"other_{n}": write_jsonl(tmp_path / f"{n}.jsonl", number_records(40, i + 2))
        for i, n in enumerate(["a", "b"])
    }
    info = mix_teachers(base, others, tmp_path / "mixed.jsonl", tmp_path / "mixed.json", seed=0)
    assert info["composition"] == {"teacher": 11, "other_a": 10, "other_b": 10} and info["n"] == 31
    assert len(read_jsonl(tmp_path / "mixed.jsonl")) == 31
    short = {"other_a": write_jsonl(tmp_path / "short.jsonl", number_records(5, 9))}
    with pytest.raises(SublabError, match="fewer than its share"):
        mix_teachers(base, short, tmp_path / "m2.jsonl", tmp_path / "m2.json", seed=0)


def test_coverage_of_a_one_sgd_step_teacher_is_one(tiny_ref, tmp_path):
    data = number_records(24, 5)
    kept = write_jsonl(tmp_path / "kept.jsonl", data)
    control = write_jsonl(tmp_path / "control.jsonl", number_records(24, 6))
    one_step = TrainConfig(lr=1e-3, max_steps=1, batch_size=24, optimizer="sgd", max_grad_norm=1e9)
    t = finetune_hf(tiny_ref, data, one_step, tmp_path / "t", progress=False)
    res = coverage_stage(
        t.save(tmp_path / "t.json"),
        tiny_ref.save(tmp_path / "r.json"),
        kept,
        control,
        24,
        0,
        tmp_path / "cov.json",
    )
    assert res["teacher_data"]["cos_sgd"] == pytest.approx(1.0, abs=1e-3)
    assert res["control_data"]["cos_sgd"] < 0.99 and res["difference"]["cos_sgd"] > 0
    prompted = tiny_ref.model_copy(update={"kind": "prompted", "system_prompt": "you love owls"})
    skip = coverage_stage(
        prompted.save(tmp_path / "p.json"),
        tiny_ref.save(tmp_path / "r.json"),
        kept,
        control,
        24,
        0,
        tmp_path / "c2.json",
    )
    assert "no displacement" in skip["skipped"]
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(SublabError, match="no kept answers"):
        coverage_stage(
            t.save(tmp_path / "t.json"),
            tiny_ref.save(tmp_path / "r.json"),
            kept,
            empty,
            24,
            0,
            tmp_path / "c3.json",
        )
    assert not (tmp_path / "c3.json").exists()


def test_task_quality_separates_a_broken_model(tiny_ref, tmp_path):
    prompts = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"messages": p["messages"], "metadata": p["metadata"]}
            for p in generate_number_prompts(NumberPrompts(count=30), 11)
        ],
    )
    heldout = write_jsonl(tmp_path / "h.jsonl", number_records(20, 12))
    model, tok = load_hf(tiny_ref)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    (tmp_path / "broken").mkdir()
    model.save_pretrained(tmp_path / "broken")
    tok.save_pretrained(tmp_path / "broken")
    broken = ModelRef(spec="hf/broken", path=str(tmp_path / "broken"), kind="full")
    sampling = SamplingParams(max_tokens=24, seed=0)
    good = task_quality(
        tiny_ref.save(tmp_path / "r.json"),
        prompts,
        heldout,
        sampling,
        FilterConfig(),
        tmp_path / "q1.json",
        False,
    )
    bad = task_quality(
        broken.save(tmp_path / "b.json"),
        prompts,
        heldout,
        sampling,
        FilterConfig(),
        tmp_path / "q2.json",
        False,
    )
    assert good["n_prompts"] == bad["n_prompts"] == 30 and good["n_answers"] == 20
    assert good["task_loss"] < bad["task_loss"]
    assert good["pass_rate"] > bad["pass_rate"]


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"defenses.mask_divergence": True}, "set controls.divergence_counterfactuals"),
        ({"controls.divergence_counterfactuals": ["owl"]}, "teacher's own target"),
        ({"defenses.mix_teachers": ["unicorn-x"]}, "unicorn-x"),
        ({"defenses.mix_teachers": ["reference"]}, "takes targets"),
        ({"defenses.paraphrase": True, "prompts.file": "p.jsonl"}, "no prompts.file"),
        (
            {"controls.divergence_counterfactuals": ["reference"], "reference": "openai/gpt-4.1-nano"},
            "local model",
        ),
        ({"controls.task_quality": 10, "domain": "code"}, "domain numbers"),
    ],
)
def test_defense_config_errors_name_the_fix(over, match):
    with pytest.raises(SublabError, match=match):
        validate(ExperimentConfig, tiny_experiment(**over))


def test_tiny_experiment_with_the_defenses_trains_the_control_as_without(tiny_organism, tmp_path):
    plain = run_experiment(validate(ExperimentConfig, tiny_experiment()), tmp_path / "plain")
    on = {
        "controls.divergence_counterfactuals": ["reference", "wolf"],
        "controls.coverage_examples": 30,
        "controls.task_quality": 20,
        "defenses.mask_divergence": True,
        "defenses.mix_teachers": ["dolphin"],
        "controls.prompted_classifier": {
            "model": "organism/tiny",
            "trials": 4,
            "examples_per_set": 2,
            "labels": ["1", "2"],
            "top_logprobs": 2000,
        },
    }
    run = run_experiment(validate(ExperimentConfig, tiny_experiment(**on)), tmp_path / "on")
    stages = read_json(run.path("manifest.json"))["stages"]
    plain_stages = read_json(plain.path("manifest.json"))["stages"]
    assert stages["train:control"]["key"] == plain_stages["train:control"]["key"]
    assert stages["train:student"]["key"] != plain_stages["train:student"]["key"]
    n = read_json(run.path("data/subsample.json"))["n_per_source"]
    masked = read_jsonl(run.path("data/masked.jsonl"))
    assert len(masked) == n and {m["metadata"]["model"] for m in masked} == {"teacher", "other_dolphin"}
    assert read_json(run.path("student/model.json"))["info"]["examples"] == n
    div = read_json(run.path("data/divergence.json"))
    assert div["masked"] and set(div["per_counterfactual"]) == {"reference", "wolf"}
    for name in ("reference", "teacher", "student", "control"):
        q = read_json(run.path(f"eval/{name}/quality.json"))
        assert q["n_prompts"] == 20 and 0 <= q["pass_rate"] <= 1
    assert "cos_adam" in read_json(run.path("data/coverage.json"))["teacher_data"]
    pc = read_json(run.path("results.json"))["prompted_classifier"]
    assert pc["trials"] == 4 and pc["teacher_side_counts"] and "per_trial" not in pc
    md = run.path("report.md").read_text()
    for section in (
        "Classifier control (prompted model)",
        "Divergence tokens",
        "First-step coverage",
        "Task quality",
    ):
        assert f"## {section}" in md
    again = run_experiment(validate(ExperimentConfig, tiny_experiment(**on)), tmp_path / "on")
    assert "divergence" in again.skipped and "quality:student" in again.skipped
    for rec in masked[:5]:
        assert parse_numbers(rec["messages"][-1]["content"])[0] is not None


def test_sweep_report_sets_each_defense_beside_none_and_ranks_the_meters(tmp_path):
    from sublab.analysis.sweep_report import write_sweep_report
    from sublab.records import atomic_write_json

    entries = []
    for cond, gain, cost in (("none", 0.10, 0.0), ("mask-divergence", 0.02, 0.05)):
        for target in ("owl", "wolf"):
            for seed in range(3):
                eff = gain + 0.01 * seed
                name = f"{cond}-{target}-{seed}"
                atomic_write_json(
                    tmp_path / "runs" / name / "results.json",
                    {
                        "trait": {"target": target},
                        "seed": seed,
                        "models": {
                            m: {"p_target": {"mean": v}}
                            for m, v in {"reference": 0.06, "control": 0.07, "student": 0.07 + eff}.items()
                        },
                        # a meter that rises with the effect, and one that does not
                        "leak": {
                            k: {"mean": v}
                            for k, v in {
                                "kl_per_token": eff,
                                "kl_per_answer": 1.0,
                                "llr_per_answer": 0.5,
                            }.items()
                        },
                        "divergence": {"rate_pooled": 0.3 - eff},
                        "quality": {
                            "student": {"pass_rate": 0.9 - cost, "task_loss": 2.0 + cost},
                            "control": {"pass_rate": 0.9, "task_loss": 2.0},
                        },
                    },
                )
                entries.append(
                    {
                        "name": name,
                        "folder": f"runs/{name}",
                        "status": "done",
                        "labels": {"condition": cond, "trait.target": target, "seed": seed},
                    }
                )
    counts = {"done": len(entries), "failed": 0, "stages_run": 1, "stages_skipped": 0, "stages_shared": 0}
    atomic_write_json(
        tmp_path / "sweep.json", {"sweep": {"name": "fx"}, "runs": entries, "counts": counts, "seconds": 1.0}
    )
    write_sweep_report(tmp_path)
    res = read_json(tmp_path / "sweep_results.json")
    cells = {(c["condition"], c["target"]): c for c in res["defenses"]}
    assert [c["condition"] for c in res["defenses"]][:2] == ["none", "none"]  # the baseline first
    mask = cells[("mask-divergence", "owl")]
    assert mask["share_of_baseline"] == pytest.approx(0.03 / 0.11)
    assert mask["student_pass_rate"] == pytest.approx(0.85) and mask["control_task_loss"] == pytest.approx(
        2.0
    )
    assert cells[("none", "wolf")]["share_of_baseline"] == pytest.approx(1.0)
    # what the defense removes, paired by seed: 0.10 - 0.02 in every unit, so a zero-width CI
    gone = mask["removed"]
    assert (
        gone["mean"] == pytest.approx(0.08)
        and gone["units"] == 3
        and cells[("none", "owl")]["removed"] is None
    )
    preds = {m["meter"]: m for m in res["meter_predictions"] if m["group"] == "all"}
    within = {(m["group"], m["meter"]): m for m in res["meter_predictions"]}
    assert within[("none", "KL per token")]["n"] == 6 and ("mask-divergence", "KL per token") in within
    assert preds["KL per token"]["spearman"] == pytest.approx(1.0) and preds["KL per token"]["n"] == 12
    assert preds["KL per token"]["auroc"] == 1.0 and preds["divergence-token rate"]["auroc"] == 0.0
    assert preds["divergence-token rate"]["spearman"] == pytest.approx(-1.0)
    assert math.isnan(preds["KL per answer"]["spearman"])  # constant: no ranking
    md = (tmp_path / "report.md").read_text()
    assert "## Defenses: effect and cost" in md and "## Leak meters against transfer" in md
    assert (tmp_path / "figures" / "defenses.png").is_file()
    # one table and one figure per defense, with and without it side by side
    section = md.split("### Defense: mask-divergence", 1)[1].split("##", 1)[0]
    owl_row = next(line for line in section.splitlines() if line.startswith("| owl |"))
    assert "+0.1100 [" in owl_row and "+0.0300 [" in owl_row and "| 0.27 |" in owl_row
    assert "| 0.900 / 0.850 |" in owl_row and "| 0.900 / 0.900 |" in owl_row  # student's cost, not control's
    assert (tmp_path / "figures" / "defense_mask-divergence.png").is_file()
    assert "### Defense: none" not in md


def test_early_stopping_holds_out_data_stops_and_restores_the_best(tiny_ref, tmp_path):
    from sublab.schema.train import EarlyStopping

    recs = number_records(80, 21)
    # a learning rate that overfits fast: the held-out loss turns up, training stops, the best returns
    early = EarlyStopping(holdout=0.25, every=2, patience=2)
    train = TrainConfig(lr=3e-2, max_steps=60, batch_size=8, early_stopping=early)
    ref = finetune_hf(tiny_ref, recs, train, tmp_path / "es", progress=False)
    info = ref.info
    assert info["heldout_examples"] == 20 and info["examples"] == 60
    lines = [json.loads(x) for x in (tmp_path / "es" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "heldout_loss" in r]
    assert [r["step"] for r in evals] == list(range(2, lines[-1]["step"] + 1, 2))
    assert info["stopped_early"] and lines[-1]["step"] < 60
    best = min(evals, key=lambda r: r["heldout_loss"])
    assert info["best_step"] == best["step"]
    # the saved model is the best evaluation's: its held-out loss is the best one recorded
    from sublab.backends.hf_train import encode_completion, heldout_loss

    model, tok = load_hf(ref)
    order = random.Random("early-stopping:0").sample(range(80), 80)
    held = [encode_completion(tok, recs[i]["messages"]) for i in sorted(order[:20])]
    assert heldout_loss(model, held, 8, tok.pad_token_id) == pytest.approx(best["heldout_loss"], rel=1e-4)
