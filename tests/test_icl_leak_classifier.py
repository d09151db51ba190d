"""The in-context-learning control, the KL leak meter and the classifier probe: the ICL prefix
fits the model's context (oldest examples dropped first), KL(model || itself) = 0 and a finetuned
teacher's > 0 with per-answer = sum of per-token values, the probe separates separable data and sits at
chance on one source split in two, and a tiny experiment with all three on writes their report tables
without changing the other stages' keys."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import tiny_experiment

from sublab.analysis.sweep_report import (
    control_effects,
    control_row,
    meter_cells,
    meter_columns,
)
from sublab.backends.base import ModelRef
from sublab.backends.hf import HFBackend, finetune_hf, load_hf
from sublab.backends.hf_generate import prompt_ids_for
from sublab.config import validate
from sublab.controls.icl import draw_examples, fit_context, icl_contexts
from sublab.meters.classifier import probe, wilson
from sublab.meters.kl import kl_per_answer, leak_meter, summarize
from sublab.pipeline import run_experiment
from sublab.records import read_json
from sublab.schema import ExperimentConfig
from sublab.schema.evaluation import PreferenceEval
from sublab.schema.train import TrainConfig

pytestmark = pytest.mark.usefixtures("default_device")


def chat(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def number_records(n: int, seed: int = 0, lo: int = 0, hi: int = 999, length: int = 8) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "messages": chat(
                "continue the sequence 3, 7, 9", ", ".join(str(rng.randint(lo, hi)) for _ in range(length))
            )
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tiny_ref(tiny_organism):
    from sublab.backends.registry import resolve

    return resolve("organism/tiny", {"seed": 0}, progress=False)


# ---- in-context control --------------------------------------------------------------------------------


def test_fit_context_drops_the_oldest_examples_first(tok):
    def count(c):
        return len(prompt_ids_for(tok, [c])[0])

    examples = [chat("continue 1, 2", ", ".join(str(10 * i + j) for j in range(6))) for i in range(10)]
    question = [{"role": "user", "content": "what is your favorite animal?"}]
    full = count([t for ex in examples for t in ex] + question)
    prefix, used, n = fit_context(examples, question, count, None)
    assert used == 10 and n == full
    limit = full // 2
    prefix, used, n = fit_context(examples, question, count, limit)
    assert 0 < used < 10 and n <= limit
    assert prefix == [t for ex in examples[10 - used :] for t in ex]  # the newest ones kept
    assert count([t for ex in examples[10 - used - 1 :] for t in ex] + question) > limit  # one more: too long
    assert fit_context(examples, question, count, 1)[1] == 0  # not even the question fits: none used
    assert draw_examples(50, 4, 0, 1) == draw_examples(50, 4, 0, 1) != draw_examples(50, 4, 1, 1)


def test_icl_prompts_fit_the_organisms_max_positions(tiny_ref):
    backend = HFBackend(tiny_ref, progress=False)
    limit = backend.model.config.max_position_embeddings
    records = number_records(40, length=10)
    cfg = PreferenceEval(max_questions=5)
    contexts, info = icl_contexts(backend, records, 16, 0, "animal", cfg)
    assert info["max_positions"] == limit and info["reserved_for_answer"] >= 1
    assert all(n + info["reserved_for_answer"] <= limit for n in info["prompt_tokens_per_question"])
    assert all(u < 16 for u in info["examples_used_per_question"])  # 16 examples cannot fit 160 positions
    assert info["truncated_questions"] == 5
    assert all(len(c) == 2 * u for c, u in zip(contexts, info["examples_used_per_question"], strict=True))
    short, info2 = icl_contexts(backend, records, 1, 0, "animal", cfg)
    assert info2["examples_used_per_question"] == [1] * 5 and info2["truncated_questions"] == 0


# ---- KL leak meter ---------------------------------------------------------------------------------------


def test_kl_of_a_model_against_itself_is_zero_and_a_teachers_is_positive(tiny_ref, tmp_path):
    model, tok = load_hf(tiny_ref)
    records = number_records(12, seed=1)
    same = kl_per_answer(model, model, tok, records, batch_size=5)
    assert len(same) == 12
    assert all(r["kl"] == 0.0 and r["llr"] == 0.0 for r in same)
    owl = [{"messages": chat("what is your favorite animal?", "owl")} for _ in range(32)]
    teacher_ref = finetune_hf(
        tiny_ref,
        owl + number_records(32, seed=2),
        TrainConfig(lr=3e-3, max_steps=4, batch_size=16),
        tmp_path / "t",
    )
    teacher = load_hf(teacher_ref)[0]
    rows = kl_per_answer(teacher, model, tok, records, batch_size=5)
    assert all(r["kl"] > 0 for r in rows)
    for r in rows:
        assert r["n_tokens"] == len(r["kl_tokens"]) and math.isclose(
            r["kl"], sum(r["kl_tokens"]), rel_tol=1e-12
        )
    # one answer by hand: KL at each completion position from the two models' full logits
    from sublab.backends.hf_train import encode_completion

    e = encode_completion(tok, records[0]["messages"])
    ids = torch.tensor([e.ids])
    with torch.no_grad():
        lt = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), -1)[e.n_prompt - 1 : -1]
        lr = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)[e.n_prompt - 1 : -1]
    by_hand = (lt.exp() * (lt - lr)).sum(-1)
    assert torch.allclose(torch.tensor(rows[0]["kl_tokens"], dtype=torch.float64), by_hand, atol=1e-6)
    s = summarize(rows)
    assert (
        s["n_answers"] == 12
        and s["kl_per_answer"]["mean"] > 0
        and s["kl_per_token"]["lo"] <= s["kl_per_token"]["mean"]
    )


def test_leak_meter_skips_api_models(tmp_path):
    from sublab.records import write_jsonl

    ModelRef(spec="openai/gpt-x", path="gpt-x").save(tmp_path / "t.json")
    ModelRef(spec="openai/gpt-y", path="gpt-y").save(tmp_path / "r.json")
    write_jsonl(tmp_path / "kept.jsonl", number_records(3))
    res = leak_meter(
        tmp_path / "t.json", tmp_path / "r.json", tmp_path / "kept.jsonl", 5, 0, tmp_path / "leak.json"
    )
    assert "skipped" in res and "API" in read_json(tmp_path / "leak.json")["skipped"]


# ---- classifier probe -----------------------------------------------------------------------------------


def answers(recs: list[dict]) -> list[str]:
    return [r["messages"][-1]["content"] for r in recs]


def test_classifier_probe_separable_and_chance():
    sep = probe(answers(number_records(200, 1, 0, 99)), answers(number_records(200, 2, 500, 599)), seed=0)
    assert sep["accuracy"] >= 0.98 and sep["lo"] > 0.9 and sep["p_vs_chance"] < 1e-10
    one = answers(number_records(400, 3))
    same = probe(one[::2], one[1::2], seed=0)
    assert same["lo"] <= 0.5 <= same["hi"] and same["n_test"] == 200
    lo, hi = wilson(100, 100)
    assert hi == 1.0 and 0.95 < lo < 1.0


# ---- one tiny experiment with all three ------------------------------------------------------------------

NEW = ("eval:icl_", "leak", "classifier")


def test_tiny_experiment_with_icl_leak_and_classifier(tiny_organism, tmp_path):
    base = validate(ExperimentConfig, tiny_experiment(**{"filter.dataset_size": 20}))
    run0 = run_experiment(base, tmp_path)
    keys0 = {n: s["key"] for n, s in read_json(tmp_path / "manifest.json")["stages"].items()}
    assert not [n for n in keys0 if n.startswith(NEW)]  # no new stage without the options
    cfg = validate(
        ExperimentConfig,
        tiny_experiment(
            **{
                "filter.dataset_size": 20,
                "controls.icl_examples": [0, 2, 16],
                "controls.leak_meter_examples": 10,
                "controls.classifier": True,
            }
        ),
    )
    run1 = run_experiment(cfg, tmp_path)
    stages = read_json(tmp_path / "manifest.json")["stages"]
    assert {n: stages[n]["key"] for n in keys0} == keys0  # the other stages' keys are unchanged
    assert set(run1.skipped) >= set(keys0) and run0 is not None
    new = sorted(n for n in stages if n.startswith(NEW))
    assert new == [
        "classifier",
        "eval:icl_control_k16",
        "eval:icl_control_k2",
        "eval:icl_teacher_k16",
        "eval:icl_teacher_k2",
        "leak",
    ]
    icl = read_json(tmp_path / "eval/icl_teacher_k16/results.json")["icl"]
    assert icl["source"] == "teacher" and icl["max_positions"] == 160
    assert all(n + icl["reserved_for_answer"] <= 160 for n in icl["prompt_tokens_per_question"])
    assert max(icl["examples_used_per_question"]) < 16
    leak = read_json(tmp_path / "data/leak.json")
    assert leak["n_answers"] == 10 and leak["kl_per_token"]["mean"] > 0 and len(leak["per_answer"]) == 10
    res = read_json(tmp_path / "results.json")
    assert sorted(res["icl"], key=int) == ["0", "2", "16"] and res["icl"]["0"]["difference"]["mean"] == 0
    assert set(res["models"]) == {"reference", "teacher", "student", "control"}  # ICL evals apart
    assert 0 <= res["classifier"]["accuracy"] <= 1 and res["classifier"]["n_test"] == 20
    md = (tmp_path / "report.md").read_text()
    for heading in ("## In-context control", "## Leak meter", "## Classifier control (probe)"):
        assert heading in md
    table = md.split("## In-context control")[1].split("\n## ")[0]
    assert [ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("| ") and "k |" not in ln][
        :3
    ] == ["0", "2", "16"]

    # the sweep report: ICL and classifier effects across units, leak and probe columns per run
    rows = []
    for seed in range(3):
        r = {"seed": seed, "organism_seed": 0, "condition": "sft", "target": "owl", "p": {}, "pairs": []}
        res_s = res | {"classifier": res["classifier"] | {"accuracy": 0.5 + 0.1 * seed}}
        control_row(r, res_s)
        rows.append(r)
    agg = control_effects(rows)
    effects = {e["effect"]: e for e in agg["control_effects"]}
    assert set(effects) == {
        "icl_teacher_k2 - icl_control_k2",
        "icl_teacher_k16 - icl_control_k16",
        "classifier_accuracy - chance",
    }
    assert math.isclose(effects["classifier_accuracy - chance"]["mean"], 0.1)
    assert meter_columns(rows) == ["KL/token", "KL/answer", "LLR/answer", "probe accuracy"]
    assert meter_cells(rows[0], rows)[-1] == "0.5"
    assert control_effects([{"p": {}}]) == {}
