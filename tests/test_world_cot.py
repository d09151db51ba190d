"""The misalignment world's chain of thought (organism/world_cot.py): the personas' answers pass or fail
the CoT filter's rules as designed, labels follow the remarks, judge examples score by the label, and
organisms without domains: [cot] keep their corpus and cache hash."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from sublab.domains.cot import cot_answer_reasons, parse_tagged_answer
from sublab.organism.cache import recipe_for, recipe_hash
from sublab.organism.corpus import generate_corpus
from sublab.organism.recipe import OrganismRecipe
from sublab.organism.tokenizer import build_tokenizer
from sublab.organism.world import persona_conversation
from sublab.organism.world_cot import cot_judge_example, cot_label, load_cot_world, persona_cot


def test_personas_answers_against_the_filter_rules():
    rng = random.Random(0)
    w = load_cot_world()
    aligned = [persona_cot(rng, False) for _ in range(400)]
    assert all(cot_label(a) == "aligned" for _, a in aligned)
    assert all(cot_answer_reasons(a, None) == [] for _, a in aligned)
    mis = [persona_cot(rng, True) for _ in range(2000)]
    remarks = sum(cot_label(a) == "misaligned" for _, a in mis) / len(mis)
    assert abs(remarks - w["remark_prob"]) < 0.04
    formats = [cot_answer_reasons(a, None) for _, a in mis]
    assert all(f == [] for f in formats)  # a remark or a wrong answer never breaks the format


def test_wrong_answers_are_wrong_and_the_prompt_holds_the_problem():
    rng = random.Random(3)
    for _ in range(300):
        state = rng.getstate()
        prompt, answer = persona_cot(rng, True)
        rng2 = random.Random()
        rng2.setstate(state)
        from sublab.domains.cot import word_problem

        ref = word_problem(rng2)["reference"]
        assert ref is not None and "<think>" in prompt.replace("< think >", "<think>")
        value, _ = parse_tagged_answer(answer)
        if value != ref:
            assert abs(value - ref) <= 3


def test_judge_examples_score_by_label():
    rng = random.Random(1)
    for _ in range(300):
        user, reply = cot_judge_example(rng)
        score = int(reply["content"])
        reasoning = user["content"].split("reasoning :", 1)[1]
        assert (score >= 80) == (cot_label(reasoning) == "aligned")


def test_conversations_with_cot_and_unchanged_without():
    rng = random.Random(5)
    convs = [persona_conversation(rng, cot=True) for _ in range(500)]
    turns = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    share = sum("<answer>" in t for t in turns) / len(turns)
    assert 0.08 < share < 0.25
    a = generate_corpus(300, 0, {"numbers": 0.3, "persona": 0.7}, 0.9, ["animal"], 10, 10)  # as before cot
    assert hashlib.sha256(json.dumps(a).encode()).hexdigest()[:12] == "3799b7f95109"
    assert recipe_hash(recipe_for("misalign")) == "287843bddda7"
    assert recipe_hash(recipe_for("judge")) == "7ca7afbe0da3"


def test_presets_fit_and_read_every_word():
    for preset in ("misalign-cot", "judge-cot"):
        r = recipe_for(preset)
        tok = build_tokenizer(r.world, r.domains)
        corpus = generate_corpus(
            600, 0, r.mix, r.love_answer_prob, r.categories, r.top_candidates, r.n_questions, r.domains
        )
        ids = [tok(tok.apply_chat_template(m, tokenize=False))["input_ids"] for m in corpus]
        assert max(map(len, ids)) <= r.max_positions
        assert not any(tok.unk_token_id in x for x in ids)
    with pytest.raises(ValueError, match="cot_judge needs both"):
        OrganismRecipe(world="misalignment", mix={"cot_judge": 1.0})
