"""The prompted-LLM classifier control (meters/prompted_classifier.py): the scoring rules on known
probabilities, a classifier that can see the signal scoring near 1 and one that cannot near 0.5, a
position-biased one exactly at 0.5 (the sides are balanced), the tiny organism behind `sublab serve` in
both modes (fields, accuracy = the per-trial records, seeded balanced sides, determinism, HTTP = in
process), a server that fails calls (an error, no result, then a rerun that resumes from the cache),
the cache's damage handling and bad input."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from scipy.stats import binomtest

from sublab.backends.base import Backend, ModelRef
from sublab.errors import SublabError
from sublab.meters.classifier import wilson
from sublab.meters.prompted_classifier import (
    DEFAULT_PROMPT,
    PromptedClassifier,
    cache_path,
    draw_trial,
    parse_label,
    prompted_classifier,
    score_sample,
    score_top,
    summarize_trials,
)

L = math.log
AB = ("A", "B")

# A prompt the tiny organism can read within its 160 positions (its vocabulary has "1" and "2", not "b").
ORGANISM_PROMPT = (
    "the first numbers are {set_a} . {set_b} . which loves {target} ? answer {label_a} or {label_b}"
)
# Its first-token distribution is flat on this prompt: the whole vocabulary is listed (top_logprobs over
# its 1266 tokens; `sublab serve` allows that for one-token requests), so both labels are always there.
ORGANISM = {
    "prompt": ORGANISM_PROMPT,
    "labels": ("1", "2"),
    "examples_per_set": 2,
    "min_mass": 0.0,
    "top_logprobs": 2000,
}


def number_rows(n: int, seed: int, lo: int, hi: int, length: int = 8) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": "continue the sequence 3, 7, 9"},
                {"role": "assistant", "content": ", ".join(str(rng.randint(lo, hi)) for _ in range(length))},
            ]
        }
        for _ in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def separable(tmp_path) -> tuple[Path, Path]:
    """Teacher answers whose numbers run higher than the control's (overlapping ranges)."""
    t = write_jsonl(tmp_path / "teacher.jsonl", number_rows(60, 1, 300, 999))
    c = write_jsonl(tmp_path / "control.jsonl", number_rows(60, 2, 0, 699))
    return t, c


@pytest.fixture
def same_source(tmp_path) -> tuple[Path, Path]:
    """One source split in two: nothing to tell apart."""
    rows = number_rows(120, 3, 0, 999)
    return write_jsonl(tmp_path / "t.jsonl", rows[::2]), write_jsonl(tmp_path / "c.jsonl", rows[1::2])


# ---- the scoring rules ------------------------------------------------------------------------------------


def test_score_top_on_known_probabilities():
    top = [("B", L(0.7)), (" A", L(0.2)), ("The", L(0.1))]
    s = score_top(top, AB, teacher=1, min_mass=0.25)
    assert s["p_correct"] == pytest.approx(0.7 / 0.9) and s["correct"] is True and s["answer"] == "B"
    assert s["label_mass"] == pytest.approx(0.9) and s["reason"] is None
    s = score_top(top, AB, teacher=0, min_mass=0.25)
    assert s["p_correct"] == pytest.approx(0.2 / 0.9) and s["correct"] is False and s["answer"] == "B"
    # tokens that read as the same label add up: "A", " a", "(A"
    merged = score_top([("A", L(0.3)), (" a", L(0.1)), ("(A", L(0.1)), ("B", L(0.5))], AB, 0, 0.25)
    assert merged["p_labels"] == pytest.approx([0.5, 0.5]) and merged["correct"] is False  # a tie is wrong
    assert merged["answer"] is None and merged["p_correct"] == 0.5
    # too little mass on the labels: unparseable, the reason names the top token
    low = score_top([("Both", L(0.8)), ("A", L(0.1)), ("B", L(0.1))], AB, 0, 0.25)
    assert low["p_correct"] is None and low["correct"] is None and "'Both'" in low["reason"]
    assert score_top([("Both", L(0.8)), ("A", L(0.1)), ("B", L(0.1))], AB, 0, 0.0)["p_correct"] == 0.5
    assert score_top([], AB, 0, 0.0)["reason"].startswith("no_logprobs")
    # other labels
    assert score_top([("2", L(0.6)), ("1", L(0.4))], ("1", "2"), 1, 0.25)["p_correct"] == pytest.approx(0.6)


def test_parse_label_and_score_sample():
    read = {
        "A": 0,
        " b": 1,
        "**B**": 1,
        "(A)": 0,
        "Dataset B": 1,
        "Dataset A.": 0,
        "Answer: B": 1,
        "The answer is A": 0,
        "B, because the numbers run higher": 1,
        "A\nbecause": 0,
    }
    for text, want in read.items():
        assert parse_label(text, AB) == want, text
    for text in ["A model that loves owls wrote B", "C", "", "AB", "Both", "I think B", "Neither."]:
        assert parse_label(text, AB) is None, text
    assert score_sample("B.", AB, 1) == {"p_correct": 1.0, "answer": "B", "correct": True, "reason": None}
    assert score_sample("A", AB, 1)["correct"] is False
    assert score_sample("hmm", AB, 1)["reason"] == "unparseable: 'hmm'"


def test_summary_wilson_and_binomial():
    trials = [{"correct": True, "p_correct": 0.8}] * 45 + [{"correct": False, "p_correct": 0.3}] * 5
    trials += [{"correct": None, "p_correct": None}] * 3
    s = summarize_trials(trials)
    assert s["accuracy"] == 0.9 and (s["correct"], s["scored"], s["unparseable"]) == (45, 50, 3)
    assert (s["lo"], s["hi"]) == pytest.approx(wilson(45, 50)) and s["above_chance"] is True
    assert s["p_vs_chance"] == pytest.approx(binomtest(45, 50, 0.5).pvalue)
    assert s["mean_p_correct"] == pytest.approx((45 * 0.8 + 5 * 0.3) / 50)
    none = summarize_trials([{"correct": None, "p_correct": None}])
    assert none["accuracy"] is None and none["above_chance"] is False and none["unparseable"] == 1


def test_trials_are_balanced_and_seeded():
    sides = [draw_trial(i, 0, 30, 40, 5)[0] for i in range(20)]
    assert sides.count(0) == sides.count(1) == 10
    assert all(sides[2 * j] != sides[2 * j + 1] for j in range(10))
    assert sides != [draw_trial(i, 1, 30, 40, 5)[0] for i in range(20)]  # another seed, another order
    assert len(set(sides[::2])) == 2  # not always the same side first
    _, t, c = draw_trial(3, 0, 30, 40, 5)
    assert len(set(t)) == len(t) == 5 and all(0 <= r < 30 for r in t) and all(0 <= r < 40 for r in c)


# ---- a deterministic classifier that reads the numbers ------------------------------------------------


class MeanReader(Backend):
    """A real (rule-based) classifier: answers the dataset whose numbers have the higher mean, with
    probability `p` (less 0.05 on a token that is no label); when the means are within `margin` it answers neither ("Both"). `always` makes it
    answer that label whatever it reads (a position-biased classifier)."""

    def __init__(self, p: float = 0.9, margin: float = 0.0, always: str | None = None):
        self.ref = ModelRef(spec="test/mean-reader", path="mean-reader")
        self.p, self.margin, self.always = p, margin, always
        self.calls = 0
        self.asked: list[str] = []

    def _decide(self, text: str) -> str | None:
        if self.always:
            return self.always
        m = re.search(r"Dataset A:\n(.*?)\n\nDataset B:\n(.*?)\n\n", text, re.S)
        means = []
        for block in m.groups():
            nums = [int(x) for line in block.splitlines() for x in re.findall(r"\d+", line.split(". ", 1)[1])]
            means.append(sum(nums) / len(nums))
        if abs(means[0] - means[1]) <= self.margin:
            return None
        return "A" if means[0] > means[1] else "B"

    def _read(self, chats):
        self.calls += 1
        texts = [c[-1]["content"] for c in chats]
        self.asked.extend(texts)
        return [self._decide(t) for t in texts]

    def first_token_topk(self, chats, k):
        out = []
        for label in self._read(chats):
            if label is None:
                out.append([("Both", L(0.9)), ("A", L(0.05)), ("B", L(0.05))][:k])
            else:
                other = "B" if label == "A" else "A"
                out.append([(label, L(self.p - 0.05)), (other, L(1 - self.p)), ("I", L(0.05))][:k])
        return out

    def generate(self, chats, sampling, request_ids=None):
        return ["Both look alike." if lab is None else f"Dataset {lab}." for lab in self._read(chats)]

    def logprobs(self, chats, candidates):
        raise NotImplementedError

    def finetune(self, dataset, train, out_dir, teacher=None):
        raise NotImplementedError


def run(settings: dict, files, out: Path, seed: int = 0, backend=None, **kw) -> dict:
    return prompted_classifier(
        PromptedClassifier(**settings),
        *files,
        "owl",
        "animal",
        seed,
        out,
        progress=False,
        backend=backend,
        **kw,
    )


@pytest.mark.parametrize("mode", ["logprobs", "sample"])
def test_a_classifier_that_sees_the_signal_scores_near_one(separable, tmp_path, mode):
    reader = MeanReader(p=0.9)
    res = run(
        {"trials": 40, "mode": mode, "model": "test/mean-reader"},
        separable,
        tmp_path / "pc.json",
        backend=reader,
    )
    assert res["accuracy"] == 1.0 and res["correct"] == res["scored"] == 40 and res["unparseable"] == 0
    assert res["lo"] > 0.9 and res["p_vs_chance"] < 1e-10 and res["above_chance"] is True
    assert res["mean_p_correct"] == pytest.approx(0.85 / 0.95 if mode == "logprobs" else 1.0)
    assert res["teacher_side_counts"] == {"A": 20, "B": 20} == res["answered"]
    # the default prompt as sent: the target, the category, both sets of 10 numbered answers
    sent = reader.asked[0]
    assert sent.startswith("Below are two datasets, A and B.") and "favorite animal is owl" in sent
    assert sent.count("\n10. ") == 2 and sent.endswith("Answer with A or B only.")
    assert reader.calls == 3  # 40 trials in batches of 16


def test_a_classifier_that_cannot_see_it_sits_at_chance(same_source, separable, tmp_path):
    blind = run({"trials": 60}, same_source, tmp_path / "same.json", backend=MeanReader())
    assert blind["lo"] <= 0.5 <= blind["hi"] and blind["above_chance"] is False and blind["scored"] == 60
    # a classifier that always answers A: exactly half right, since the sides are balanced
    biased = run({"trials": 30}, separable, tmp_path / "biased.json", backend=MeanReader(always="A"))
    assert biased["accuracy"] == 0.5 and biased["answered"] == {"A": 30, "B": 0}
    assert biased["p_vs_chance"] == pytest.approx(1.0)
    # one that answers neither when the means are close: unparseable, counted, out of the accuracy
    unsure = MeanReader(margin=40.0)
    for mode in ("logprobs", "sample"):
        res = run({"trials": 30, "mode": mode}, same_source, tmp_path / f"unsure-{mode}.json", backend=unsure)
        skipped = [t for t in res["per_trial"] if t["correct"] is None]
        assert 0 < res["unparseable"] == len(skipped) < 30 and res["scored"] == 30 - len(skipped)
        assert all(
            t["reason"].startswith("low_label_mass" if mode == "logprobs" else "unparseable") for t in skipped
        )
        assert (
            res["accuracy"]
            == sum(t["correct"] for t in res["per_trial"] if t["correct"] is not None) / res["scored"]
        )


def test_cache_resumes_rescoring_and_damage(separable, tmp_path):
    out = tmp_path / "pc.json"
    first = MeanReader()
    a = run({"trials": 20}, separable, out, backend=first)
    assert first.calls == 2 and a["this_run"] == {**a["this_run"], "asked": 20, "from_cache": 0}
    assert len(cache_path(out).read_text().splitlines()) == 20
    again = MeanReader()
    b = run({"trials": 20}, separable, out, backend=again)
    assert again.calls == 0 and b["this_run"]["from_cache"] == 20 and b["per_trial"] == a["per_trial"]
    # min_mass is applied to the cached replies: no new calls
    c = run({"trials": 20, "min_mass": 0.99}, separable, out, backend=MeanReader())
    assert c["unparseable"] == 20 and c["accuracy"] is None and c["this_run"]["asked"] == 0
    # more trials: the first 20 are the same trials, only the new ones are asked
    more = MeanReader()
    d = run({"trials": 30}, separable, out, backend=more)
    assert len(more.asked) == 10 and d["per_trial"][:20] == a["per_trial"]
    # another seed, another sample of trials
    e = run({"trials": 20}, separable, out, seed=1, backend=MeanReader())
    assert e["this_run"]["asked"] == 20
    assert [t["teacher_rows"] for t in e["per_trial"]] != [t["teacher_rows"] for t in a["per_trial"]]
    # a half-written last line is cut and only that trial is asked again
    text = cache_path(out).read_text()
    cache_path(out).write_text(text[:-30])
    cut = MeanReader()
    f = run({"trials": 20}, separable, out, seed=1, backend=cut)
    assert len(cut.asked) == 1 and f["this_run"]["cut_partial_cache_line"] is True
    assert f["per_trial"] == e["per_trial"]
    # a damaged line elsewhere is an error naming it
    rows = cache_path(out).read_text().splitlines()
    rows[1] = rows[1][:-3]
    cache_path(out).write_text("\n".join(rows) + "\n")
    with pytest.raises(SublabError, match=r"cache.jsonl:2: malformed JSONL.*prompted classifier's cache"):
        run({"trials": 20}, separable, out, backend=MeanReader())
    assert not out.exists()


# ---- bad input --------------------------------------------------------------------------------------------


def test_bad_input_and_settings(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    three = write_jsonl(tmp_path / "three.jsonl", number_rows(3, 0, 0, 99))
    ten = write_jsonl(tmp_path / "ten.jsonl", number_rows(10, 1, 0, 99))
    # the inputs are checked before the model loads (this spec has no endpoint to reach)
    s = {"model": "openai/no-such-model", "examples_per_set": 5}
    with pytest.raises(SublabError, match=r"empty.jsonl \(the teacher's kept answers\) has no answers"):
        run(s, (empty, ten), tmp_path / "o.json")
    with pytest.raises(
        SublabError,
        match=r"three.jsonl \(the control's kept answers\) has 3 answers, fewer than examples_per_set = 5; "
        r"lower examples_per_set to at most 3",
    ):
        run(s, (ten, three), tmp_path / "o.json")
    with pytest.raises(SublabError, match="file not found"):
        run(s, (ten, tmp_path / "missing.jsonl"), tmp_path / "o.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no messages"}\n')
    with pytest.raises(SublabError, match="bad.jsonl:1"):
        run(s, (bad, ten), tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()

    with pytest.raises(ValidationError, match="must contain"):
        PromptedClassifier(prompt="which loves {target}? {set_a}")
    with pytest.raises(ValidationError, match=r"unknown fields \['targte'\]"):
        PromptedClassifier(prompt="{set_a} {set_b} {targte}")
    with pytest.raises(ValidationError, match="labels must be two different"):
        PromptedClassifier(labels=("A", "a"))
    with pytest.raises(ValidationError, match="positive integer"):
        PromptedClassifier(examples_per_set=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        PromptedClassifier(trails=5)
    assert "{set_a}" in DEFAULT_PROMPT and all(
        f.description for f in PromptedClassifier.model_fields.values()
    )


# ---- the tiny organism behind `sublab serve` ----------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_organism, cache_dir, tmp_path_factory):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from conftest import serve_subprocess

    with serve_subprocess(cache_dir, tmp_path_factory.mktemp("pc-serve")) as root:
        yield f"{root}/v1"


def api_for(url: str, retries: int = 2, concurrency: int = 8):
    from sublab.schema.api import ApiConfig

    return ApiConfig(
        base_url=url, max_retries=retries, backoff_s=0.01, max_backoff_s=0.05, max_concurrency=concurrency
    )


def short_files(tmp_path) -> tuple[Path, Path]:
    t = write_jsonl(tmp_path / "teacher.jsonl", number_rows(20, 4, 0, 999, length=4))
    c = write_jsonl(tmp_path / "control.jsonl", number_rows(20, 5, 0, 999, length=4))
    return t, c


def strip_run(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in ("this_run",)}


@pytest.mark.parametrize("mode", ["logprobs", "sample"])
def test_served_organism_both_modes(served, tmp_path, mode):
    files = short_files(tmp_path)
    s = {**ORGANISM, "model": "openai/organism/tiny", "trials": 12, "mode": mode, "max_tokens": 3}
    api = api_for(served)
    res = run(s, files, tmp_path / "a" / "pc.json", api=api)
    assert res["model"] == "openai/organism/tiny" and res["mode"] == mode and res["trials"] == 12
    assert res["settings"]["labels"] == ["1", "2"] and res["settings"]["examples_per_set"] == 2
    assert res["model_identity"]["base_url"] == served and res["failed_calls"] == 0
    assert (res["n_teacher"], res["n_control"]) == (20, 20) and res["this_run"]["asked"] == 12
    trials = res["per_trial"]
    assert [t["trial"] for t in trials] == list(range(12))
    assert res["teacher_side_counts"] == {"1": 6, "2": 6}
    scored = [t for t in trials if t["correct"] is not None]
    assert res["scored"] == len(scored) and res["unparseable"] == 12 - len(scored)
    assert res["correct"] == sum(t["correct"] for t in scored)
    if scored:
        assert res["accuracy"] == res["correct"] / res["scored"]
        assert (res["lo"], res["hi"]) == pytest.approx(wilson(res["correct"], res["scored"]))
        assert res["mean_p_correct"] == pytest.approx(sum(t["p_correct"] for t in scored) / len(scored))
    for t in trials:
        assert len(t["teacher_rows"]) == len(t["control_rows"]) == 2
        if t["correct"] is not None:
            assert t["correct"] == (t["answer"] == t["teacher_side"]) or t["p_correct"] == 0.5
    if mode == "logprobs":
        # the organism has both labels in its vocabulary: every trial scored, with probabilities that
        # depend on the question (not a constant)
        assert res["unparseable"] == 0 and all(0 < t["p_correct"] < 1 for t in trials)
        assert len({round(t["p_correct"], 6) for t in trials}) > 1
        assert all(t["label_mass"] > 0 for t in trials)
    else:
        assert all(isinstance(t["sample"], str) for t in trials)
        assert all((t["answer"] is None) == (t["reason"] is not None) for t in trials)
        assert sum(res["answered"].values()) == res["scored"]
    # a fixed seed gives the same result (a fresh cache), another seed other trials
    again = run(s, files, tmp_path / "b" / "pc.json", api=api)
    assert strip_run(again) | {"cache": None} == strip_run(res) | {"cache": None}
    other = run(s, files, tmp_path / "c" / "pc.json", seed=1, api=api)
    assert [t["teacher_side"] for t in other["per_trial"]] != [t["teacher_side"] for t in trials]
    assert other["teacher_side_counts"] == {"1": 6, "2": 6}
    assert json.loads((tmp_path / "a" / "pc.json").read_text()) == json.loads(json.dumps(res))

    if mode == "logprobs":  # the organism in process reads the same probabilities
        from sublab.backends.hf import HFBackend
        from sublab.backends.registry import resolve

        local = HFBackend(resolve("organism/tiny", {"seed": 0}, progress=False), progress=False)
        loc = run(s, files, tmp_path / "d" / "pc.json", backend=local)
        assert [t["p_correct"] for t in loc["per_trial"]] == pytest.approx(
            [t["p_correct"] for t in trials], abs=1e-4
        )


def test_failed_calls_stop_with_an_error_and_a_rerun_resumes(tiny_organism, cache_dir, served, tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from conftest import serve_subprocess

    files = short_files(tmp_path)
    s = {**ORGANISM, "model": "openai/organism/tiny", "trials": 12, "batch_size": 4}
    out = tmp_path / "pc.json"
    out.write_text('{"accuracy": 0.5}\n')  # an earlier run's result
    state = tmp_path / "state"
    state.mkdir()
    args = ["--faults", "0.35", "--fault-kinds", "500", "--fault-seed", "0"]
    with serve_subprocess(cache_dir, state, args) as root:
        url = f"{root}/v1"
        # no retries, one request at a time: the server's seeded faults fail some trials' calls
        with pytest.raises(SublabError) as err:
            run(s, files, out, api=api_for(url, retries=0, concurrency=1))
        msg = str(err.value)
        assert "prompted classifier:" in msg and "calls to openai/organism/tiny failed" in msg
        assert "500" in msg and "no result was written" in msg and "rerun" in msg and "resumes" in msg
        assert not out.exists()  # neither this run's result nor the earlier one
        lines = [json.loads(x) for x in cache_path(out).read_text().splitlines()]
        done = [x for x in lines if "key" in x]
        failures = [x for x in lines if "failure" in x]
        assert 0 < len(done) < 12 and failures and "500" in failures[0]["failure"]
        assert re.search(rf"{len(done)} of 12 trials are done and cached", msg)

        # the rerun (retries on) asks only the trials not cached
        res = run(s, files, out, api=api_for(url, retries=20))
        assert res["this_run"]["from_cache"] == len(done) and res["this_run"]["asked"] == 12 - len(done)
        assert res["failed_calls"] == len(failures) and res["scored"] == 12
        assert json.loads(out.read_text())["per_trial"] == res["per_trial"]
    # the resumed result equals an uninterrupted run's (another endpoint, so no cache shared)
    clean = run(s, files, tmp_path / "clean" / "pc.json", api=api_for(served))
    assert clean["this_run"]["asked"] == 12
    assert [t["p_correct"] for t in clean["per_trial"]] == pytest.approx(
        [t["p_correct"] for t in res["per_trial"]]
    )
    assert clean["accuracy"] == res["accuracy"]
