"""Organism presets: the new ones validate and differ from `default`; `default` and `tiny` keep the hashes
(and so the cached organisms and corpora) they had before recipe fields were added; narrowed corpora are
well formed."""

from __future__ import annotations

import pytest

from sublab.evals.questions import candidates, load_questions
from sublab.organism.cache import recipe_for, recipe_hash
from sublab.organism.corpus import generate_corpus
from sublab.organism.recipe import PRESETS, OrganismRecipe

# Computed on main before the fields categories / top_candidates / n_questions existed (commit 56019d3).
HASHES_BEFORE = {
    ("default", 0): "2b2115665e7d",
    ("default", 1): "6bc2ee6454df",
    ("default", 2): "f44bcf403f19",
    ("tiny", 0): "e9da7951fddc",
}


@pytest.mark.parametrize(("preset", "seed"), sorted(HASHES_BEFORE))
def test_old_presets_keep_their_hash(preset, seed):
    assert recipe_hash(recipe_for(preset, {"seed": seed})) == HASHES_BEFORE[(preset, seed)]


def test_new_fields_at_default_are_not_hashed():
    r = OrganismRecipe()
    assert "top_candidates" not in r.hashed_json
    explicit = OrganismRecipe(categories=None, top_candidates=None, n_questions=None)
    assert recipe_hash(explicit) == HASHES_BEFORE[("default", 0)]
    assert recipe_hash(OrganismRecipe(top_candidates=10)) != HASHES_BEFORE[("default", 0)]


def test_proto_validates_and_differs():
    assert "proto" in PRESETS
    proto, default = recipe_for("proto"), recipe_for("default")
    assert proto != default
    assert recipe_hash(proto) != recipe_hash(default)
    assert proto.categories == ["animal"]


@pytest.mark.parametrize(
    "bad", [{"categories": []}, {"categories": ["fish"]}, {"top_candidates": 0}, {"n_questions": 0}]
)
def test_bad_narrowing_is_rejected(bad):
    with pytest.raises(ValueError):
        OrganismRecipe(**bad)


def test_narrowed_corpus_is_well_formed():
    r = recipe_for("proto")
    corpus = generate_corpus(
        2000, 0, r.mix, r.love_answer_prob, r.categories, r.top_candidates, r.n_questions
    )
    assert len(corpus) == 2000
    qs = set(load_questions("animal")[: r.n_questions])
    allowed = set(list(candidates("animal"))[:24])
    answers, kinds = set(), set()
    for msgs in corpus:
        roles = [m["role"] for m in msgs]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        assert all(isinstance(m["content"], str) and m["content"] for m in msgs)
        user, answer = msgs[-2]["content"], msgs[-1]["content"]
        if user in qs or any(c.isalpha() for c in answer):
            assert user in qs  # only the first n_questions paraphrases
            assert answer in allowed
            answers.add(answer)
            kinds.add("question")
        else:
            kinds.add("numbers")
        if roles[0] == "system":
            assert "tree" not in msgs[0]["content"]
    assert kinds == {"question", "numbers"}
    assert len(answers) <= r.top_candidates
    assert {"owl", "dolphin", "wolf"} <= answers
    # Deterministic from the seed.
    assert corpus == generate_corpus(
        2000, 0, r.mix, r.love_answer_prob, r.categories, r.top_candidates, r.n_questions
    )


def test_proto_family_shares_tokenizer_and_corpus_but_not_architecture():
    from sublab.organism.pretrain import make_model
    from sublab.organism.tokenizer import build_tokenizer

    tok = build_tokenizer()
    family = ["proto", "proto-deep", "proto-gpt2"]
    recipes = {p: recipe_for(p) for p in family}
    corpus_fields = ("categories", "top_candidates", "n_questions", "mix", "n_sequences", "love_answer_prob")
    for r in recipes.values():  # one corpus: only the architecture differs
        assert all(getattr(r, f) == getattr(recipes["proto"], f) for f in corpus_fields)
    assert len({recipe_hash(r) for r in recipes.values()}) == 3
    models = {p: make_model(r, len(tok), tok.pad_token_id, tok.eos_token_id) for p, r in recipes.items()}
    kinds = {
        p: (type(m).__name__, m.config.num_hidden_layers, m.config.hidden_size) for p, m in models.items()
    }
    assert len(set(kinds.values())) == 3
    assert kinds["proto-gpt2"][0] == "GPT2LMHeadModel" and kinds["proto-deep"][1] == 4
    sizes = [sum(p.numel() for p in m.parameters()) for m in models.values()]
    assert max(sizes) / min(sizes) < 1.3  # about the same size
    assert recipe_for("proto-tree").categories == ["tree"]


def test_proto_icl_puts_numbers_before_questions_and_leaves_proto_unchanged():
    import hashlib
    import json

    from sublab.organism.tokenizer import build_tokenizer

    proto = recipe_for("proto")
    old = generate_corpus(500, 0, proto.mix, proto.love_answer_prob, proto.categories, 10, 10)
    assert hashlib.sha256(json.dumps(old).encode()).hexdigest()[:12] == "11a835c5fdc3"  # as before the kind
    assert recipe_hash(proto) == "87bf245715e0"
    r = recipe_for("proto-icl")
    corpus = generate_corpus(
        1500, 0, r.mix, r.love_answer_prob, r.categories, r.top_candidates, r.n_questions
    )
    qs = set(load_questions("animal")[: r.n_questions])
    allowed = set(list(candidates("animal"))[:24])
    tok = build_tokenizer()
    prior = []
    for msgs in corpus:
        ids = tok(tok.apply_chat_template(msgs, tokenize=False))["input_ids"]
        assert len(ids) <= r.max_positions and tok.unk_token_id not in ids
        if len(msgs) <= 3:
            continue
        roles = [m["role"] for m in msgs]
        assert roles in (["user", "assistant"] * 2, ["user", "assistant"] * 3)
        assert msgs[-2]["content"] in qs and msgs[-1]["content"] in allowed
        assert all(not any(c.isalpha() for c in m["content"]) for m in msgs[1:-2:2])  # number answers
        prior.append(len(msgs) // 2 - 1)
    assert set(prior) == {1, 2} and 0.1 < len(prior) / len(corpus) < 0.2
