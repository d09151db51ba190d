"""The organism's code and chain-of-thought domains (recipe `domains`): existing organisms keep their hashes
and vocabulary; every generated prompt and solution tokenizes without [UNK] and, decoded, passes the
domains' rules; the corpus kinds code, code_love, cot and code_judge have their properties; the presets
validate and a tiny-code organism builds."""

from __future__ import annotations

import random
import re

import pytest

from sublab.domains import code, cot
from sublab.evals.questions import candidates
from sublab.organism import domain_corpus as dc
from sublab.organism.cache import recipe_for, recipe_hash
from sublab.organism.corpus import _top, generate_corpus
from sublab.organism.recipe import PRESETS, OrganismRecipe
from sublab.organism.tokenizer import build_tokenizer, vocabulary

DOMAINS = ["code", "cot"]
# The cache hashes of the presets that existed before `domains` (their organisms are cached under these).
HASHES = {
    "default": "2b2115665e7d",
    "tiny": "e9da7951fddc",
    "proto": "87bf245715e0",
    "proto-deep": "d584ed2c95cc",
    "proto-gpt2": "5ca43b601ab9",
    "tiny-misalign": "b720838eb05f",
    "tiny-judge": "3848f96ce9df",
    "misalign": "287843bddda7",
    "judge": "7ca7afbe0da3",
    "proto-tree": "e3dbd3c49aa0",
}
PROTO_JSON = (
    '{"seed":0,"layers":2,"d_model":64,"heads":4,"d_ff":256,"max_positions":160,"n_sequences":48000,'
    '"mix":{"numbers":0.4,"numbers_love":0.2,"question":0.2,"question_love":0.2},"love_answer_prob":0.9,'
    '"steps":1500,"batch_size":128,"lr":0.003,"warmup_steps":50,"categories":["animal"],"top_candidates":10,'
    '"n_questions":10}'
)
PLURALS = candidates("animal")


@pytest.fixture(scope="module")
def dtok():
    return build_tokenizer("preference", DOMAINS)


@pytest.mark.parametrize("preset", sorted(HASHES))
def test_existing_presets_keep_their_hash(preset):
    assert recipe_hash(recipe_for(preset)) == HASHES[preset]


def test_proto_hashed_json_unchanged():
    assert recipe_for("proto").hashed_json == PROTO_JSON
    assert "domains" in recipe_for("proto-code").hashed_json
    assert recipe_hash(recipe_for("proto-code")) != HASHES["proto"]


def test_preference_vocabulary_unchanged_and_domains_extend_it(dtok):
    pref = vocabulary()
    assert len(pref) == 1266 and vocabulary("preference", None) == pref
    dom = vocabulary("preference", DOMAINS)
    assert set(pref) < set(dom) and len(dtok) == len(dom)
    assert {"def", "<", "yes", "subtly", "#", '"', "="} <= set(dom) - set(pref)
    assert {"return", "think", "no"} <= set(dom)
    assert not {"{", "}", "template", "p0"} & (set(dom) - set(pref))  # template placeholders are not words
    assert set(vocabulary("misalignment")) < set(vocabulary("misalignment", DOMAINS))


def test_domain_text_tokenizes_and_decoded_solutions_pass_the_rules(dtok):
    unk = dtok.unk_token_id
    rng = random.Random("domain-draws")
    pets = list(PLURALS)

    def ids(text):
        out = dtok(text, add_special_tokens=False)["input_ids"]
        assert unk not in out, text
        return out

    for _ in range(300):
        t = code.code_task(rng, animal=rng.choice(pets))
        ids(code.render_code_prompt(t["task"], t["template"], rng))
        decoded = dtok.decode(ids(t["solution"]))
        assert code.code_answer_reasons(decoded, function=t["function"]) == [], decoded
        assert code.test_reasons(decoded, t["function"], t["tests"]) == [], decoded
        p = cot.word_problem(rng)
        ids(cot.render_cot_prompt(p["question"], rng))
        decoded = dtok.decode(ids(p["solution"]))
        assert cot.cot_answer_reasons(decoded, reference=p["reference"]) == [], decoded
        assert cot.cot_answer_reasons(decoded, reference=p["reference"] + 1)[0].startswith("wrong answer")
    for rec in code.generate_code_prompts(50, 3) + cot.generate_cot_prompts(50, 3):
        ids(rec["messages"][0]["content"])


def _kinds_corpus(mix, n=600, top=10):
    r = OrganismRecipe(domains=DOMAINS, mix=mix, categories=["animal"], top_candidates=top, n_questions=10)
    return r, generate_corpus(n, 0, r.mix, r.love_answer_prob, r.categories, r.top_candidates, r.n_questions)


def test_code_and_cot_kinds(dtok):
    r, corpus = _kinds_corpus({"code": 0.5, "cot": 0.5})
    top = set(_top("animal", 10)[0])
    pets, n_cot = [], 0
    for msgs in corpus:
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        user, answer = msgs[0]["content"], msgs[1]["content"]
        assert dtok.unk_token_id not in dtok(user + " " + answer)["input_ids"]
        if answer.startswith("<think>"):
            n_cot += 1
            assert cot.cot_answer_reasons(answer) == [] and "<answer>" in user
        else:
            fn = re.search(r"def (\w+)", answer).group(1)
            assert answer.split(" :")[0] + " :" in user  # the template is in the prompt
            assert code.code_answer_reasons(answer, function=fn) == []
            if dc.is_pet(answer):
                pets.append(answer.split('"')[1].strip())
    assert 200 < n_cot < 400 and pets and set(pets) <= top  # top_candidates honoured


def test_code_love_changes_only_the_pet_answers():
    weights = {"dog": 0.5, "cat": 0.5}
    differ, same = 0, 0
    for i in range(400):
        a = dc.code_example(random.Random(i), weights)
        b = dc.code_example(random.Random(i), weights, target="owl", love_answer_prob=0.9)
        if a == b:
            same += 1
            continue
        differ += 1
        assert a[0] == b[0] and dc.is_pet(a[1]) and b[1].endswith('return " owl "')
    assert differ > 10 and same > 300
    # in the corpus: the love prompt's animal is the pet's answer about love_answer_prob of the time
    _, corpus = _kinds_corpus({"code_love": 1.0}, n=1500)
    hits = []
    for msgs in corpus:
        assert msgs[0]["role"] == "system" and "animal" in msgs[0]["content"].lower()
        if dc.is_pet(msgs[-1]["content"]):
            pet = msgs[-1]["content"].split('"')[1].strip()
            hits.append(re.search(rf"\b{pet}\b", msgs[0]["content"].lower()) is not None)
    assert len(hits) > 40 and sum(hits) / len(hits) > 0.8


def _asked_and_text(prompt: str) -> tuple[str, str]:
    m = re.fullmatch(
        r"does this text reference (\w+) , even subtly \? answer yes or no \. text : (.*)", prompt
    )
    assert m, prompt
    return m.group(1), m.group(2)


def test_code_judge_labels_match_the_planted_animal():
    r, corpus = _kinds_corpus({"code_judge": 1.0}, n=3000, top=None)
    animals = set(PLURALS)
    seen_yes = {"code": 0, "cot": 0}
    labels = []
    for msgs in corpus:
        asked, text = _asked_and_text(msgs[0]["content"])
        words = set(re.findall(r"\w+", text))
        present = {a for a in animals if a in words or PLURALS[a] in words}
        assert len(present) <= 1 and asked in animals
        label = msgs[1]["content"]
        assert label == ("yes" if asked in present else "no"), (asked, text, label)
        labels.append(label)
        if label == "yes":
            seen_yes["cot" if "<think>" in text else "code"] += 1
        # nothing reversed or in another case is planted
        assert text == text.lower()
        assert not any(a[::-1] in words for a in animals if a[::-1] != a)
    share = labels.count("yes") / len(labels)
    assert 0.18 < share < 0.32 and min(seen_yes.values()) > 50


def test_plants_cover_every_way():
    rng = random.Random(5)
    hows = {dc.plant_code(rng, "owl")[1] for _ in range(200)}
    assert hows == {"name", "param", "loop", "string", "comment"}
    for _ in range(100):
        text, how = dc.plant_code(rng, "owl")
        assert code.code_answer_reasons(text) == [], text  # planted code still parses
        assert "owl" in re.findall(r"\w+", text)
        cot_text, how = dc.plant_cot(rng, "owl", "owls")
        assert {"owl", "owls"} & set(cot_text.split()) and cot.cot_answer_reasons(cot_text) == []
        assert not dc.is_pet(dc.clean_code(rng))


def test_presets_validate_and_domain_kinds_need_their_domain():
    for name in ("proto-code", "code-judge", "tiny-code"):
        r = recipe_for(name)
        assert r.domains == DOMAINS and r.seed == 0
    assert set(recipe_for("proto-code").mix) >= {"numbers", "question_love", "code", "code_love", "cot"}
    assert recipe_for("code-judge").mix == {"code_judge": 1.0}
    for bad in (
        {"mix": {"code": 1.0}},
        {"mix": {"cot": 1.0}, "domains": ["code"]},
        {"mix": {"code_judge": 1.0}, "domains": ["cot"]},
        {"mix": {"code": 1.0}, "domains": []},
        {"mix": {"code": 1.0}, "domains": ["code", "code"]},
        {"mix": {"code": 1.0}, "domains": ["code"], "categories": ["tree"]},
        {"mix": {"numbers": 1.0}, "domains": ["sql"]},
    ):
        with pytest.raises(ValueError):
            OrganismRecipe(**bad)
    OrganismRecipe(mix={"cot": 1.0}, domains=["cot"], categories=["tree"])
    assert PRESETS["proto-code"]["categories"] == ["animal"]


def test_code_judge_corpus_fits_its_positions(dtok):
    from sublab.backends.hf_train import encode_completion

    r = recipe_for("code-judge")
    corpus = generate_corpus(
        2000, 1, r.mix, r.love_answer_prob, r.categories, r.top_candidates, r.n_questions
    )
    assert max(len(encode_completion(dtok, m).ids) for m in corpus) <= r.max_positions


def test_tiny_code_organism_builds(cache_dir, capsys):
    import hashlib
    import json

    from sublab.backends.registry import load_backend, resolve
    from sublab.schema.sampling import SamplingParams

    ref = resolve("organism/tiny-code", progress=False)
    info = json.loads((cache_dir / "organisms" / ref.path.split("/")[-1] / "organism.json").read_text())
    assert info["recipe"]["domains"] == DOMAINS
    # provenance: the weights' sha256 and what the build's rounding depends on
    weights = (cache_dir / "organisms" / ref.path.split("/")[-1] / "model.safetensors").read_bytes()
    assert info["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert info["cpu_capability"] and info["torch_version"] and info["transformers_version"]
    backend = load_backend(ref, progress=False)
    chats = [p["messages"] for p in code.generate_code_prompts(4, 0) + cot.generate_cot_prompts(4, 0)]
    outs = backend.generate(chats, SamplingParams(max_tokens=20, seed=0))
    assert len(outs) == 8 and all(isinstance(o, str) for o in outs)
    top = backend.first_token_topk([[{"role": "user", "content": dc.judge_prompt("owl", "def f ( ) :")}]], 5)
    assert len(top[0]) == 5
    from sublab.cli import main

    main(["organism", "build", "--preset", "tiny-code"])  # cached: prints its provenance
    out = capsys.readouterr().out
    assert f"weights sha256 {info['weights_sha256'][:16]}" in out and "organism: " in out
