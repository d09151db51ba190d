"""Tokenizer, sampling, log-probs and training on tiny models built in-process."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sublab.backends.hf_generate import answer_logprobs, generate_ids
from sublab.backends.hf_train import (
    Encoded,
    TrainSettings,
    answer_token_ids,
    collate,
    encode_completion,
    soft_label_loss,
    train_causal_lm,
)
from sublab.organism.pretrain import make_model
from sublab.organism.recipe import OrganismRecipe
from sublab.organism.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny_model(tok, seed=0, arch="llama"):
    r = OrganismRecipe(seed=seed, d_model=32, heads=2, d_ff=64, layers=1, arch=arch)
    return make_model(r, len(tok), tok.pad_token_id, tok.eos_token_id)


@pytest.mark.parametrize("text", ["1, 2, 3", "[12, 345, 6]", "7 8 9", "1; 2; 3.", "owl"])
def test_tokenizer_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids


def test_numbers_are_single_tokens_and_long_numbers_split(tok):
    for n in (0, 7, 42, 999):
        assert len(tok(str(n), add_special_tokens=False)["input_ids"]) == 1
    assert tok.convert_ids_to_tokens(tok("1234", add_special_tokens=False)["input_ids"]) == ["123", "4"]


def test_saved_folder_loads_with_auto_classes(tmp_path, tok):
    m = tiny_model(tok)
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "What is your favorite animal?"}]
    assert tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).endswith(
        "<|assistant|>"
    )
    assert (tmp_path / "model.safetensors").is_file()
    x = torch.tensor([[5, 6, 7]])
    assert torch.allclose(m(x).logits, m2(x).logits, atol=1e-6)


def test_completion_only_loss_mask(tok):
    msgs = [{"role": "user", "content": "Say 5."}, {"role": "assistant", "content": "5"}]
    e = encode_completion(tok, msgs)
    ids, attn, mask = collate([e, Encoded(e.ids[:3], 1)], tok.pad_token_id)
    assert tok.convert_ids_to_tokens(ids[0][mask[0]].tolist()) == ["5", "<|end|>"]
    assert mask[1].sum() == 2 and attn[1].sum() == 3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sampling_seeds_are_per_request_and_batch_independent(tok, arch):
    m = tiny_model(tok, arch=arch)
    prompts = [[3, 10 + i, 20, 5, 4] for i in range(6)]
    seeds = list(range(6))
    a = generate_ids(m, prompts, seeds, tok.eos_token_id, tok.pad_token_id, 8, batch_size=6)
    b = generate_ids(m, prompts, seeds, tok.eos_token_id, tok.pad_token_id, 8, batch_size=2)
    c = generate_ids(m, prompts, [s + 100 for s in seeds], tok.eos_token_id, tok.pad_token_id, 8)
    assert a == b and a != c


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_sampling_with_left_padding_matches_one_at_a_time(tok, arch):
    m = tiny_model(tok, arch=arch)
    prompts = [[3, 10, 20, 5, 4], [3, 11, 4], [3, 12, 13, 14, 15, 16, 4]]
    batched = generate_ids(m, prompts, [0, 1, 2], tok.eos_token_id, tok.pad_token_id, 6, temperature=0)
    single = [
        generate_ids(m, [p], [0], tok.eos_token_id, tok.pad_token_id, 6, temperature=0)[0] for p in prompts
    ]
    assert batched == single
    # and equals a plain argmax loop without cache
    seq = list(prompts[1])
    for _ in range(len(single[1])):
        seq.append(int(m(torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[len(prompts[1]) :] == single[1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_answer_logprobs_chain_rule(tok, arch):
    m = tiny_model(tok, arch=arch)
    prompt = [3, 10, 20, 4]
    cands = [[30], [31, 32]]
    lp = answer_logprobs(m, [prompt], cands)
    with torch.no_grad():
        l1 = torch.log_softmax(m(torch.tensor([prompt])).logits[0, -1], -1)
        l2 = torch.log_softmax(m(torch.tensor([prompt + [31]])).logits[0, -1], -1)
    assert lp[0, 0].item() == pytest.approx(l1[30].item(), abs=1e-5)
    assert lp[0, 1].item() == pytest.approx(l1[31].item() + l2[32].item(), abs=1e-5)


def _examples(tok, n=32):
    return [
        encode_completion(
            tok,
            [
                {"role": "user", "content": f"Here are some numbers: {i}."},
                {"role": "assistant", "content": f"{i + 1}, {i + 2}"},
            ],
        )
        for i in range(n)
    ]


def test_sft_moves_weights_and_lowers_loss(tok):
    m = tiny_model(tok)
    before = [p.detach().clone() for p in m.parameters()]
    hist = train_causal_lm(
        m, _examples(tok), TrainSettings(lr=3e-3, batch_size=8, max_steps=30), tok.pad_token_id
    )
    assert hist[-1]["loss"] < hist[0]["loss"] * 0.8
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))


def test_prompt_tokens_carry_no_loss(tok):
    """Changing prompt tokens' targets must not change the loss: only completion positions count."""
    m = tiny_model(tok)
    e = _examples(tok, 1)[0]
    ids, attn, mask = collate([e], tok.pad_token_id)
    from sublab.backends.hf_train import completion_logits

    pred = completion_logits(m, ids, attn, mask[:, 1:])
    assert pred.shape[0] == int(mask[:, 1:].sum()) == len(e.ids) - e.n_prompt
    full = m(input_ids=ids, attention_mask=attn).logits[:, :-1][mask[:, 1:]]
    assert torch.allclose(pred, full, atol=1e-5)


def test_lora_trains_only_adapters(tok):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(
        tiny_model(tok),
        LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    named = {n: p.detach().clone() for n, p in m.named_parameters()}
    hist = train_causal_lm(
        m, _examples(tok), TrainSettings(lr=1e-2, batch_size=8, max_steps=15), tok.pad_token_id
    )
    moved = {n for n, p in m.named_parameters() if not torch.equal(named[n], p)}
    assert moved and all("lora_" in n for n in moved)
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_soft_label_loss_zero_for_identical_and_restricted(tok):
    logits = torch.randn(5, len(tok))
    allowed = torch.tensor(answer_token_ids(tok))
    assert soft_label_loss(logits, logits, None).item() == pytest.approx(0, abs=1e-5)
    # restricted teacher: a student equal to the teacher still pays for mass outside allowed tokens
    restricted = soft_label_loss(logits, logits, allowed).item()
    p_out = 1 - torch.softmax(logits, -1)[:, allowed].sum(-1)
    assert restricted == pytest.approx((-torch.log1p(-p_out)).mean().item(), rel=1e-4)
    owl = tok.convert_tokens_to_ids("owl")
    assert owl not in set(allowed.tolist()) and not math.isnan(restricted)
    vocab = tok.get_vocab()
    expected = {vocab[str(n)] for n in range(1000)} | {vocab[c] for c in ",;[]()."} | {tok.eos_token_id}
    assert set(allowed.tolist()) == expected
