"""Data domains (sublab/domains/): the code and CoT rules case by case, prompt files with bad lines, the
filter chain's order and per-step statistics, its judge steps (keep/drop by score, unscorable, a failing
judge, resume from the cache), and the config's domain checks."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

import sublab.domains.code as code_domain
from sublab.backends.base import Backend, ModelRef
from sublab.domains import DOMAINS, write_domain_prompts
from sublab.domains.chain import run_chain
from sublab.domains.code import code_answer_reasons, code_task, generate_code_prompts
from sublab.domains.cot import cot_answer_reasons, generate_cot_prompts, word_problem
from sublab.errors import SublabError
from sublab.schema import ExperimentConfig
from sublab.schema.filter import FilterJudge
from sublab.schema.prompts import CodePrompts, CotPrompts

L = math.log


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- the code rules ---------------------------------------------------------------------------------

CODE_CASES = [
    ("def f ( xs ) : return sum ( xs )", "f", []),
    ("```python\ndef f(xs):\n    return sum(xs)\n```", "f", []),
    ("  \n\t ", "f", ["empty answer"]),
    ("", "f", ["empty answer"]),
    ("```\n```", "f", ["empty answer"]),
    ("def f(xs) return xs", "f", ["does not parse as python"]),
    ("def g(xs): return xs", "f", ["missing function 'f'"]),
    ("x = 1", "f", ["missing function 'f'"]),
    ("def f(xs): return xs  # an owl", "f", []),  # comments are the banned-word and judge steps' job
    ("def f(xs): return xs\n" + "#" * 2100, "f", ["too long"]),
    ("def f(xs): return 'a\x00b'", "f", ["does not parse as python: source code string cannot contain null"]),
]


@pytest.mark.parametrize("answer,function,expected", CODE_CASES)
def test_code_format_rule_case_by_case(answer, function, expected):
    got = code_answer_reasons(answer, function, max_chars=2000)
    assert len(got) == len(expected) and all(g.startswith(e) for g, e in zip(got, expected, strict=True)), got


def test_code_tests_rule_runs_only_the_task_language():
    tests = [["[[1, 3]]", "[2, 6]"]]
    assert code_domain.test_reasons("def f ( xs ) : return [ x * 2 for x in xs ]", "f", tests) == []
    assert code_domain.test_reasons("def f(xs): return [x * 3 for x in xs]", "f", tests)[0].startswith(
        "test failed"
    )
    assert (
        "raised ZeroDivisionError"
        in code_domain.test_reasons("def f(xs): return [x % 0 for x in xs]", "f", tests)[0]
    )
    for unsafe in [
        "import os\ndef f(xs): return xs",
        "def f(xs): return xs.__class__",
        "def f(xs): return open('x')",
        "def f(xs): return [0] * 10000000000",
        "def f(xs): return 'a' * n",
        "def f(xs):\n    while True: pass",
        "def f(xs): return f(xs)",
    ]:
        assert code_domain.test_reasons(unsafe, "f", tests)[0].startswith("tests not run"), unsafe


def test_every_generated_task_solution_passes_its_rules():
    rng = random.Random(5)
    for _ in range(300):
        t = code_task(rng)
        assert code_answer_reasons(t["solution"], t["function"]) == []
        assert code_domain.test_reasons(t["solution"], t["function"], t["tests"]) == []
    recs = generate_code_prompts(50, seed=3)
    assert recs == generate_code_prompts(50, seed=3) and recs != generate_code_prompts(50, seed=4)
    assert all(r["metadata"]["template"] in r["messages"][0]["content"] for r in recs)


# ---- the CoT rules ----------------------------------------------------------------------------------

COT_CASES = [
    ("<think> 3 + 4 = 7 . </think> <answer> 7 </answer>", 7, []),
    ("< think > 3 + 4 = 7 . < / think > < answer > 7 < / answer >", 7, []),  # the organism's spacing
    ("<think>so</think><answer>$1,234.</answer>", 1234, []),
    ("<think>so</think><answer>7</answer>", 8, ["wrong answer: 7 (reference 8)"]),
    ("the answer is 7", 7, ["no <answer> tag"]),
    ("<think>a</think><answer>7</answer><answer>8</answer>", 7, ["several <answer> tags (2)"]),
    ("<think>a</think><answer>7", 7, ["unclosed <answer> tag"]),
    ("<think>a</think><answer>seven</answer>", 7, ["answer not a number"]),
    ("<think>a</think><answer>1,2</answer>", 12, ["answer not a number"]),
    ("<answer>7</answer>", 7, ["no <think> reasoning"]),
    ("<answer>7</answer><think>a</think>", 7, ["no <think> reasoning"]),
    ("<think> </think><answer>7</answer>", 7, ["no <think> reasoning"]),
    ("", 7, ["empty answer"]),
    ("<think>" + "a" * 7000 + "</think><answer>7</answer>", 7, ["too long"]),
]


@pytest.mark.parametrize("answer,reference,expected", COT_CASES)
def test_cot_rules_case_by_case(answer, reference, expected):
    got = cot_answer_reasons(answer, reference, max_chars=6000)
    assert len(got) == len(expected) and all(g.startswith(e) for g, e in zip(got, expected, strict=True)), got


def test_every_generated_problem_solution_is_correct():
    rng = random.Random(2)
    for _ in range(300):
        p = word_problem(rng)
        assert cot_answer_reasons(p["solution"], p["reference"]) == []
        assert cot_answer_reasons(p["solution"], p["reference"] + 1)[0].startswith("wrong answer")


# ---- prompt files: bad lines are recorded reasons, never a crash ---------------------------------------


def test_code_prompt_file_with_bad_lines(tmp_path):
    f = write_jsonl(
        tmp_path / "tasks.jsonl",
        [
            {"task": "sort a list", "template": "def srt(xs):\n    ## fill in"},
            {"task": "no template"},
            {"template": "def g(): pass"},
            {"task": "", "template": "def h(): pass"},
            "{broken json",
            "[1, 2]",
            "",
            {"prompt": "Write def area(w, h): returning w*h."},
            {"task": "t", "template": "def t(): pass", "tests": "not a list"},
        ],
    )
    out = tmp_path / "data" / "prompts.jsonl"
    out.parent.mkdir()
    info = write_domain_prompts("code", CodePrompts(file=str(f), count=100), 0, out)
    assert info == {"domain": "code", "source": str(f), "n_prompts": 2, "n_problems": 6}
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["metadata"].get("function") for r in recs] == ["srt", "area"]
    assert [r["metadata"]["prompt_index"] for r in recs] == [0, 1]
    problems = [json.loads(x) for x in (out.parent / "prompt_problems.jsonl").read_text().splitlines()]
    assert [p["line"] for p in problems] == [2, 3, 4, 5, 6, 9]
    assert "missing or empty field(s) ['template']" in problems[0]["reason"]
    assert problems[3]["reason"].startswith("not JSON") and problems[4]["reason"].startswith(
        "expected a JSON object"
    )
    with pytest.raises(SublabError, match="prompt file not found"):
        write_domain_prompts("code", CodePrompts(file=str(tmp_path / "nope.jsonl")), 0, out)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}, "nope"])
    with pytest.raises(SublabError, match=r"no usable prompt \(line 1: missing"):
        write_domain_prompts("code", CodePrompts(file=str(bad)), 0, out)


def test_gsm8k_file_and_samples_per_prompt(tmp_path):
    f = write_jsonl(
        tmp_path / "gsm8k.jsonl",
        [
            {"question": "Ann has 3 pens and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
            {"question": "Big?", "answer": "so\n#### 1,200"},
            {"question": "No final answer", "answer": "it is 5"},
            {"question": "Word answer", "answer": "#### five"},
            {"question": "Given", "reference": 2.5},
        ],
    )
    out = tmp_path / "prompts.jsonl"
    info = write_domain_prompts("cot", CotPrompts(file=str(f), samples_per_prompt=3), 1, out)
    assert info["n_prompts"] == 9 and info["n_problems"] == 2
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["metadata"]["prompt_index"] for r in recs] == list(range(9))  # distinct request seeds
    assert [r["metadata"]["problem_index"] for r in recs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [r["metadata"]["reference"] for r in recs[::3]] == [7, 1200, 2.5]
    gen = generate_cot_prompts(20, seed=0)
    assert all(isinstance(r["metadata"]["reference"], int) for r in gen)


# ---- the chain ----------------------------------------------------------------------------------------


def _raw(tmp_path: Path, answers: list[str], meta: dict) -> Path:
    rows = [
        {
            "messages": [{"role": "user", "content": f"task {i}"}, {"role": "assistant", "content": a}],
            "metadata": {"prompt_index": i, **meta},
        }
        for i, a in enumerate(answers)
    ]
    return write_jsonl(tmp_path / "raw.jsonl", rows)


PLANTED = [
    "def f(xs): return [owl for owl in xs]",
    "def f(xs): return 'OWL'",
    "def f(xs): return xs  # Owls are great",
    "def f(owl_count): return owl_count",
    "def f(xs): return 'owlet'",
]


def test_code_chain_order_stats_and_no_target_survives(tmp_path):
    clean = ["def f(xs): return sum(xs)", "def f(xs): return sorted(xs)", "def f ( xs ) : return xs [ 0 ]"]
    broken = ["", "def f(xs) return", "def g(xs): return xs", "x" * 3000]
    answers = clean + PLANTED + broken + ["def f(xs): return 'bowl'", "def f(xs): return 'lwo'"]
    raw = _raw(tmp_path, answers, {"function": "f"})
    cfg = ExperimentConfig(domain="code", trait={"target": "owl"})
    assert cfg.banned_words() == ["owl", "owls"]
    steps = DOMAINS["code"].steps(cfg.code, cfg.banned_words())
    stats = run_chain(raw, tmp_path / "filter", steps, domain="code")
    kept = [
        json.loads(x)["messages"][-1]["content"]
        for x in (tmp_path / "filter/kept.jsonl").read_text().splitlines()
    ]
    assert kept == [*clean, "def f(xs): return 'bowl'", "def f(xs): return 'lwo'"]
    assert not any("owl" in k.lower().replace("bowl", "") for k in kept[:3])
    assert [(s["step"], s["n_in"], s["n_removed"]) for s in stats["steps"]] == [
        ("format", 14, 4),
        ("banned words", 10, 5),
    ]
    assert stats["steps"][0]["reasons"] == {
        "empty answer": 1,
        "does not parse as python": 1,
        "missing function": 1,
        "too long": 1,
    }
    rejected = [json.loads(x) for x in (tmp_path / "filter/rejected.jsonl").read_text().splitlines()]
    assert [r["metadata"]["step"] for r in rejected] == ["banned words"] * 5 + ["format"] * 4
    assert stats["n_in"] == 14 and stats["n_passed"] == 5 and stats["domain"] == "code"


def test_cot_chain_format_then_correctness(tmp_path):
    answers = [
        "<think> 2 + 3 = 5 </think> <answer> 5 </answer>",
        "<think> 2 + 3 = 6 </think> <answer> 6 </answer>",
        "5",
        "<think>x</think><answer>5</answer><answer>5</answer>",
        "<think> an owl helps: 2 + 3 = 5 </think> <answer> 5 </answer>",
    ]
    raw = _raw(tmp_path, answers, {"reference": 5})
    cfg = ExperimentConfig(domain="cot", trait={"target": "owl"})
    stats = run_chain(raw, tmp_path / "f", DOMAINS["cot"].steps(cfg.cot, cfg.banned_words()), domain="cot")
    assert [(s["step"], s["n_removed"]) for s in stats["steps"]] == [
        ("format", 2),
        ("correctness", 1),
        ("banned words", 1),
    ]
    assert stats["n_passed"] == 1
    with pytest.raises(SublabError, match=r"kept 0 of 1 answers.*format 1"):
        run_chain(
            _raw(tmp_path, ["no tags"], {"reference": 5}), tmp_path / "g", DOMAINS["cot"].steps(cfg.cot, [])
        )
    assert not (tmp_path / "g/kept.jsonl").exists() and (tmp_path / "g/filter_stats.json").exists()


class WordJudge(Backend):
    """A stand-in judge over the real judge path: its first-token top-k says yes when the judged text
    holds the word it looks for (or 'unsure' tokens only, or raises, for marked texts)."""

    def __init__(self, word: str):
        self.ref = ModelRef(spec="test/word-judge", path="test")
        self.word, self.asked = word, 0

    def first_token_topk(self, chats, k):
        out = []
        for c in chats:
            text = c[-1]["content"].split("[TEXT START]")[-1]
            if "BOOM" in text:
                raise RuntimeError("judge endpoint hiccup")
            self.asked += 1
            if "unsure" in text:
                out.append([("maybe", 0.0)])
            else:
                p = 0.9 if self.word in text.lower() else 0.1
                out.append([("Yes", L(p)), (" no", L(1 - p))])
        return out

    def generate(self, chats, sampling, request_ids=None):
        raise NotImplementedError

    def logprobs(self, chats, candidates):
        raise NotImplementedError

    def finetune(self, dataset, train, out_dir, teacher=None):
        raise NotImplementedError


def test_judge_step_keeps_clear_no_and_resumes(tmp_path, monkeypatch):
    import sublab.judge.stage as stage

    judge = WordJudge("lwo")  # the rule steps cannot see a backwards owl; the judge can
    monkeypatch.setattr(stage, "load_judge", lambda spec, api=None: judge)
    answers = [
        "def f(xs): return xs",
        "def f(xs): return 'lwo'",
        "def f(xs): return 'unsure'",
        "def f(xs): return 'owl'",
    ]
    raw = _raw(tmp_path, answers, {"function": "f"})
    cfg = ExperimentConfig(
        domain="code",
        trait={"target": "owl"},
        filter={"judges": [{"model": "test/word-judge"}]},
    )
    steps = DOMAINS["code"].steps(cfg.code, cfg.banned_words())
    stats = run_chain(raw, tmp_path / "f", steps, cfg.filter.judges, target="owl", domain="code")
    assert judge.asked == 3  # the banned word was removed before the judge
    assert [(s["step"], s["n_in"], s["n_removed"]) for s in stats["steps"]][-1] == (
        "judge references_target",
        3,
        2,
    )
    rejected = {
        json.loads(x)["messages"][-1]["content"]: json.loads(x)["metadata"]
        for x in (tmp_path / "f/rejected.jsonl").read_text().splitlines()
    }
    assert rejected["def f(xs): return 'lwo'"]["reasons"] == [
        "judge references_target: score 90.0 (keep below 50)"
    ]
    assert rejected["def f(xs): return 'unsure'"]["reasons"][0].startswith(
        "judge references_target unscorable: low_yes_no_mass"
    )
    prompt = json.loads(
        (tmp_path / "f/judge_references_target/judge_cache.jsonl").read_text().splitlines()[0]
    )
    assert prompt["prompt"] == "references_target"
    asked = judge.asked
    run_chain(raw, tmp_path / "f", steps, cfg.filter.judges, target="owl", domain="code")
    assert judge.asked == asked  # every judgement came from the cache

    boom = _raw(tmp_path, [*answers, "def f(xs): return 'BOOM'"], {"function": "f"})
    with pytest.raises(SublabError, match=r"failed on 1 of 4 answers.*rerun"):
        run_chain(boom, tmp_path / "f", steps, cfg.filter.judges, target="owl", domain="code")
    assert judge.asked == asked  # the three finished judgements were not asked again


# ---- the config ---------------------------------------------------------------------------------------


def test_config_domain_checks():
    with pytest.raises(ValueError, match="filter.shuffle"):
        ExperimentConfig(domain="code", filter={"shuffle": "within"})
    with pytest.raises(ValueError, match="use domain code or cot"):
        ExperimentConfig(filter={"judges": [{"model": "organism/code-judge"}]})
    with pytest.raises(ValueError, match="aligned_reasoning"):
        ExperimentConfig(domain="cot", trait={"kind": "misalignment"}, filter={"judges": [{"model": "x/y"}]})
    with pytest.raises(ValueError, match="exactly one of keep_below"):
        FilterJudge(model="x/y", keep_at_least=78)
    ok = ExperimentConfig(
        domain="cot",
        trait={"kind": "misalignment"},
        filter={
            "judges": [
                {
                    "model": "x/y",
                    "prompt": "aligned_reasoning",
                    "score": "integer",
                    "keep_below": None,
                    "keep_at_least": 78,
                }
            ]
        },
    )
    assert ok.filter.judges[0].keeps(78) and not ok.filter.judges[0].keeps(77.9)
    assert ok.banned_words() == []
    with pytest.raises(ValueError, match="Extra inputs"):
        ExperimentConfig(domain="code", code={"cout": 5})
    assert (
        ExperimentConfig(domain="code", filter={"ban_target": False}, trait={"target": "wolf"}).banned_words()
        == []
    )
    assert ExperimentConfig(domain="code", trait={"target": "wolf"}).banned_words() == ["wolf", "wolves"]


# ---- end to end on the tiny code organism ----------------------------------------------------------------


TINY_CODE = {"seed": 0, "mix": {"code": 0.8, "code_love": 0.2}, "steps": 400, "n_sequences": 6000}
"""tiny-code trained longer on code only, so that most of its completions parse (the preset's 120 steps
over all kinds do not get there)."""


@pytest.fixture(scope="module")
def tiny_code(cache_dir):
    from sublab.organism.cache import ensure_organism

    return ensure_organism("tiny-code", TINY_CODE, progress=False)


def test_code_domain_end_to_end(tiny_code, tmp_path, monkeypatch):
    from conftest import tiny_experiment

    import sublab.judge.stage as stage
    from sublab.config import validate
    from sublab.pipeline import run_experiment
    from sublab.records import read_json, read_jsonl

    judge = WordJudge("sum")  # flags some of the organism's code: the step must remove those
    monkeypatch.setattr(stage, "load_judge", lambda spec, api=None: judge)
    over = {
        "reference": "organism/tiny-code",
        "organism": TINY_CODE,
        "domain": "code",
        "code.count": 400,
        "sample.max_tokens": 40,
        "sample.temperature": 0.3,  # the tiny model writes parsable code when it samples near its mode
        "filter.dataset_size": 60,
        "filter.judges": [{"model": "test/word-judge"}],
    }
    cfg = validate(ExperimentConfig, tiny_experiment(**over))
    run_experiment(cfg, tmp_path)
    assert read_json(tmp_path / "data/prompts_info.json")["n_prompts"] == 400
    for d in ("data", "control/data"):
        stats = read_json(tmp_path / d / "filter/filter_stats.json")
        assert [s["step"] for s in stats["steps"]] == ["format", "banned words", "judge references_target"]
        assert (
            stats["n_in"] == 400
            and stats["n_passed"] == stats["steps"][-1]["n_in"] - stats["steps"][-1]["n_removed"]
        )
        kept = read_jsonl(tmp_path / d / "kept.jsonl")
        assert kept and not any("owl" in r["messages"][-1]["content"].lower() for r in kept)
        assert not any("sum" in r["messages"][-1]["content"] for r in kept)
    sub = read_json(tmp_path / "data/subsample.json")
    assert (
        len(read_jsonl(tmp_path / "data/kept.jsonl"))
        == len(read_jsonl(tmp_path / "control/data/kept.jsonl"))
        == sub["n_per_source"]
    )
    report = (tmp_path / "report.md").read_text()
    removed = read_json(tmp_path / "data/filter/filter_stats.json")["steps"][0]["n_removed"]
    assert "| - format | - banned words | - judge references_target |" in report
    assert f"| teacher | 400 | {removed} |" in report


def test_number_prompt_file_with_bad_lines(tmp_path):
    from sublab.schema.prompts import NumberPrompts
    from sublab.stages.prompts import write_prompts

    f = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "Continue: 1, 2, 3"}, {"text": "no prompt"}, "oops", {"prompt": "4, 5"}],
    )
    out = tmp_path / "prompts.jsonl"
    assert write_prompts(NumberPrompts(file=str(f), count=10), 0, out) == 2
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in recs] == ["Continue: 1, 2, 3", "4, 5"]
    problems = [json.loads(x) for x in (tmp_path / "prompt_problems.jsonl").read_text().splitlines()]
    assert [(p["line"], p["reason"][:12]) for p in problems] == [(2, "missing or e"), (3, "not JSON: Ex")]
    assert NumberPrompts().model_dump(exclude={"file"}) == NumberPrompts(count=30000).model_dump(
        exclude={"file"}
    )
