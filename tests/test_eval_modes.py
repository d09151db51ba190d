"""The preference eval names its estimand: exact chain-rule probabilities on hf models, first-token top-k
log-probs through an API (with the mass outside the top-k reported, and a warning when it is large),
sampled answers in sample mode."""

from __future__ import annotations

import asyncio
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from sublab.backends.base import ModelRef
from sublab.backends.hf import HFBackend
from sublab.backends.openai_backend import OpenAIBackend, candidate_logprobs, topk_missing_mass
from sublab.errors import SublabError
from sublab.evals.preference import (
    TOPK_MISSING_MASS_WARN,
    PreferenceEval,
    TopKMassWarning,
    evaluate_preference,
)
from sublab.evals.questions import candidates
from sublab.organism.pretrain import make_model
from sublab.organism.recipe import OrganismRecipe
from sublab.organism.tokenizer import build_tokenizer

# ---- the API path, against a stand-in for the client ---------------------------------------------


class FakeClient:
    """Stands in for ApiClient + the openai client: every logprobs request answers with `top`."""

    def __init__(self, top: list[tuple[str, float]]):
        self.top, self.requests = top, []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    async def _create(self, **kw):
        self.requests.append(kw)
        listed = [SimpleNamespace(token=t, logprob=lp) for t, lp in self.top]
        content = [SimpleNamespace(token=self.top[0][0], logprob=self.top[0][1], top_logprobs=listed)]
        return SimpleNamespace(choices=[SimpleNamespace(logprobs=SimpleNamespace(content=content))])

    def run(self, fn):
        return asyncio.run(fn(self))

    async def call(self, what, fn, client=None, model=None):
        return await fn()

    async def map(self, client, fn, items, desc, progress):
        return [await fn(client, i) for i in items]


def api_backend(top: list[tuple[str, float]], monkeypatch) -> OpenAIBackend:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    ref = ModelRef(spec="openai/fake-model", path="fake-model", info={"api": {"base_url": "http://x/v1"}})
    b = OpenAIBackend(ref, progress=False)
    b.client = FakeClient(top)
    return b


def test_api_exact_runs_as_first_token_topk_and_reports_missing_mass(monkeypatch):
    # 0.5 owl, 0.2 cat, 0.1 " Owl" (merges with no candidate: "Owl" is its own form): 0.2 unlisted
    top = [("owl", math.log(0.5)), ("cat", math.log(0.2)), (" Owl", math.log(0.1))]
    b = api_backend(top, monkeypatch)
    with pytest.warns(TopKMassWarning, match="unlisted"):
        res, rows = evaluate_preference(b, "animal", ["owl"], PreferenceEval(mode="exact", max_questions=3))
    assert res["mode"] == "api_topk" and res["requested_mode"] == "exact"
    assert res["estimand"] == "first_token_topk"
    tm = res["topk_missing_mass"]
    assert tm["mean"] == pytest.approx(0.2) and tm["max"] == pytest.approx(0.2)
    assert tm["per_question"] == pytest.approx([0.2] * 3) and tm["warn_above"] == TOPK_MISSING_MASS_WARN
    assert all(r["topk_missing_mass"] == pytest.approx(0.2) for r in rows)
    # owl = "owl" + "Owl" forms; every absent form gets the floor: the unlisted 0.2 spread over them
    assert res["targets"]["owl"]["mean"] == pytest.approx(0.6, abs=0.01)
    assert all(
        r["top_logprobs"] == b.api.top_logprobs and r["max_completion_tokens"] == 1 for r in b.client.requests
    )
    # an explicit api_topk is the same evaluation
    with pytest.warns(TopKMassWarning):
        again, _ = evaluate_preference(b, "animal", ["owl"], PreferenceEval(mode="api_topk", max_questions=3))
    assert again["mode"] == "api_topk" and again["targets"] == res["targets"]


def test_api_topk_without_missing_mass_does_not_warn(monkeypatch):
    names = list(candidates("animal"))
    top = [(c, math.log(1 / len(names))) for c in names]  # all the mass on listed candidates
    b = api_backend(top, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TopKMassWarning)
        res, _ = evaluate_preference(b, "animal", ["owl"], PreferenceEval(max_questions=2))
    assert res["topk_missing_mass"]["max"] == pytest.approx(0.0, abs=1e-9)
    assert res["targets"]["owl"]["mean"] == pytest.approx(1 / len(names))


def test_topk_missing_mass_and_floor():
    top = [("owl", math.log(0.7)), ("cat", math.log(0.2))]
    assert topk_missing_mass(top) == pytest.approx(0.1)
    lp = candidate_logprobs(top, ["owl", "dog", "fox"])
    assert math.exp(lp[1]) == pytest.approx(0.05) and lp[1] == lp[2]  # the unlisted 0.1 split in two


# ---- the hf path ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_backend(tmp_path_factory):
    tok = build_tokenizer()
    torch.manual_seed(0)
    r = OrganismRecipe(seed=0, d_model=32, heads=2, d_ff=64, layers=1)
    folder = tmp_path_factory.mktemp("tiny-eval")
    make_model(r, len(tok), tok.pad_token_id, tok.eos_token_id).save_pretrained(folder)
    tok.save_pretrained(folder)
    return HFBackend(ModelRef(spec=f"hf/{folder}", path=str(folder)), progress=False)


def test_hf_exact_is_the_chain_rule_and_sample_is_sampled(hf_backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error", TopKMassWarning)
        ex, _ = evaluate_preference(hf_backend, "animal", ["owl"], PreferenceEval(max_questions=2))
    assert (ex["mode"], ex["requested_mode"], ex["estimand"]) == ("exact", "exact", "exact_chain_rule")
    assert "topk_missing_mass" not in ex
    cfg = PreferenceEval(mode="sample", samples_per_question=2, max_tokens=3, max_questions=2)
    sa, _ = evaluate_preference(hf_backend, "animal", ["owl"], cfg)
    assert (sa["mode"], sa["estimand"]) == ("sample", "sampled") and "topk_missing_mass" not in sa
    # the keys the report reads are all still there
    for res in (ex, sa):
        assert {"category", "n_questions", "targets", "named_mass", "distribution"} <= set(res)
        assert {"mean", "per_question", "share_of_named"} <= set(res["targets"]["owl"])


def test_api_topk_on_an_hf_model_is_an_error(hf_backend):
    with pytest.raises(SublabError, match="use eval.mode: exact"):
        evaluate_preference(hf_backend, "animal", ["owl"], PreferenceEval(mode="api_topk", max_questions=1))
