"""Training correctness on tiny models built in-process: gradient accumulation is a per-token mean over
the whole optimizer step, bf16 finetunes keep float32 trainable weights (small steps are not rounded
away), every trainable weight moves, and a saved model (full or LoRA) reloads to exactly the trained
weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import sublab.backends.hf as hf
from sublab.backends.base import ModelRef
from sublab.backends.device import configure
from sublab.backends.hf import finetune_hf, load_hf
from sublab.backends.hf_train import (
    TrainSettings,
    answer_token_ids,
    collate,
    encode_completion,
    fp32_trainable,
    soft_label_loss,
    train_causal_lm,
)
from sublab.organism.pretrain import make_model
from sublab.organism.recipe import OrganismRecipe
from sublab.schema.train import LoraSettings, TrainConfig

pytestmark = pytest.mark.usefixtures("default_device")


def tiny(tok, seed=0, layers=1, tied=True):
    torch.manual_seed(seed)
    if tied:  # the organism's architecture (tied input embedding and LM head)
        r = OrganismRecipe(seed=seed, d_model=32, heads=2, d_ff=64, layers=layers)
        return make_model(r, len(tok), tok.pad_token_id, tok.eos_token_id)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("tiny-train")
    tiny(tok, layers=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    return ModelRef(spec=f"hf/{folder}", path=str(folder), kind="base")


def chat(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def number_records(n: int) -> list[dict]:
    return [
        {"messages": chat(f"Here are some numbers: {i}.", f"{i + 1}, {i + 2}, {i + 3}")} for i in range(n)
    ]


def uneven_examples(tok):
    """Two 1-number completions and two long ones: per-micro-batch means weigh their tokens very
    differently from one per-token mean."""
    recs = [
        chat("Here are some numbers: 1.", "2"),
        chat("Here are some numbers: 5.", "6"),
        chat("Here are some numbers: 3.", ", ".join(str(i) for i in range(40))),
        chat("Here are some numbers: 9.", ", ".join(str(i) for i in range(7, 60))),
    ]
    return [encode_completion(tok, r) for r in recs]


def step_grads(model, examples, pad_id, batch_size, grad_accum, **kw):
    """The gradient of one optimizer step (left in .grad: zeroed at the start of the next step only)."""
    m = copy.deepcopy(model)
    s = TrainSettings(lr=1e-3, batch_size=batch_size, grad_accum=grad_accum, max_steps=1, max_grad_norm=1e9)
    hist = train_causal_lm(m, examples, s, pad_id, **kw)
    return {n: p.grad.clone() for n, p in m.named_parameters()}, hist[0]


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---- gradient accumulation ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sft", "soft_label"])
def test_grad_accum_is_a_per_token_mean_over_the_step(tok, method):
    """batch_size=4, grad_accum=1 and batch_size=2, grad_accum=2 on the same 4 examples (one step, so
    both see all of them) give the same gradient and loss, although the completions have 2, 2, 80 and
    106 loss tokens; the old per-micro-batch mean gives a clearly different gradient."""
    model = tiny(tok)
    ex = uneven_examples(tok)
    assert sorted(len(e.ids) - e.n_prompt for e in ex) == [2, 2, 80, 106]
    kw = {}
    if method == "soft_label":
        kw = {"teacher": tiny(tok, seed=1).eval(), "allowed_ids": answer_token_ids(tok)}
    g1, h1 = step_grads(model, ex, tok.pad_token_id, 4, 1, **kw)
    g2, h2 = step_grads(model, ex, tok.pad_token_id, 2, 2, **kw)
    scale = max(g.abs().max().item() for g in g1.values())
    assert max_diff(g1, g2) < 1e-5 * scale  # measured ~3e-8 with scale ~0.4
    assert all(torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6) for k in g1)
    assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-6) and h1["tokens"] == h2["tokens"] == 190

    # what per-micro-batch averaging computed: the mean of the two micro-batch means (length-bucketed
    # batching puts the two short examples together)
    m = copy.deepcopy(model)
    srt = sorted(ex, key=lambda e: len(e.ids))
    for mb in (srt[:2], srt[2:]):
        ids, attn, lmask = collate(mb, tok.pad_token_id)
        pred = m(input_ids=ids, attention_mask=attn).logits[:, :-1][lmask[:, 1:]]
        if method == "sft":
            loss = F.cross_entropy(pred, ids[:, 1:][lmask[:, 1:]])
        else:
            with torch.no_grad():
                t = kw["teacher"](input_ids=ids, attention_mask=attn).logits[:, :-1][lmask[:, 1:]]
            loss = soft_label_loss(pred, t, torch.tensor(kw["allowed_ids"]))
        (loss / 2).backward()
    old = {n: p.grad for n, p in m.named_parameters()}
    assert max_diff(g1, old) > 0.05 * scale


def test_soft_label_loss_reductions():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    allowed = torch.tensor([0, 2, 3])
    assert soft_label_loss(s, t, allowed, "sum").item() == pytest.approx(
        5 * soft_label_loss(s, t, allowed).item(), rel=1e-6
    )


# ---- precision -----------------------------------------------------------------------------------


class Capture:
    """Wraps train_causal_lm inside finetune_hf: the model trained, the trainable dtypes and autocast
    dtype it trained with, and its weights before and right after training."""

    def __init__(self, monkeypatch):
        self.real = hf.train_causal_lm
        monkeypatch.setattr(hf, "train_causal_lm", self)

    def __call__(self, model, *a, **kw):
        self.model = model
        self.dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
        self.autocast = kw.get("autocast_dtype")
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        out = self.real(model, *a, **kw)
        self.after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return out


def test_bf16_full_finetune_trains_fp32_weights_and_keeps_small_steps(tmp_path, tiny_ref, tok, monkeypatch):
    """dtype bfloat16 on CPU: the trainable weights are float32 while AdamW runs, forwards run under bf16
    autocast, and 3 steps at lr 1e-5 change every weight tensor and >= 99% of each one's elements (measured:
    all but a handful whose bf16 gradient was exactly 0). A bf16 weight of magnitude ~0.02 has a rounding
    step ~1e-4, so pure-bf16 AdamW drops such steps: below, ~85% of the elements and every norm weight
    stay put."""
    configure("cpu", "bfloat16")
    cap = Capture(monkeypatch)
    train = TrainConfig(lr=1e-5, max_steps=3, batch_size=4)
    ref = finetune_hf(tiny_ref, number_records(8), train, tmp_path / "bf", progress=False)
    assert cap.dtypes == {torch.float32} and cap.autocast == torch.bfloat16
    changed = {n: (cap.after[n] != cap.before[n]).float().mean().item() for n in cap.before}
    assert min(changed.values()) >= 0.99, changed
    assert ref.info["dtype"] == "bfloat16" and ref.info["trainable_dtype"] == "float32"
    assert ref.info["autocast_dtype"] == "bfloat16"
    # saved in the load dtype: the reloaded model is the trained float32 weights rounded to bf16
    reloaded, _ = load_hf(ref)
    sd = reloaded.state_dict()
    assert all(torch.equal(sd[n], cap.after[n].to(torch.bfloat16)) for n in cap.after)

    # the same run without float32 trainable weights (the old behaviour) loses most of the update
    model, _ = load_hf(tiny_ref)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ex = [encode_completion(tok, r["messages"]) for r in number_records(8)]
    train_causal_lm(model, ex, TrainSettings(lr=1e-5, max_steps=3, batch_size=4), tok.pad_token_id)
    moved = sum((p != before[n]).sum().item() for n, p in model.named_parameters())
    assert moved / sum(p.numel() for p in model.parameters()) < 0.5  # measured ~0.15
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "norm" in n)


def test_fp32_trainable_leaves_frozen_weights_and_ties():
    m = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    m[1].weight = m[0].weight  # tied
    extra = torch.nn.Linear(3, 3)
    extra.requires_grad_(False)
    m.append(extra)
    m.to(torch.bfloat16)
    assert fp32_trainable(m) == torch.bfloat16
    assert m[0].weight.dtype == torch.float32 and m[1].weight is m[0].weight
    assert extra.weight.dtype == torch.bfloat16  # frozen: unchanged


# ---- every trainable weight moves ------------------------------------------------------------------


def test_every_weight_of_a_tied_model_moves(tok):
    """With tied embeddings every vocabulary row gets a gradient through the LM head (softmax over the
    whole vocabulary), so after a few steps every element of every parameter has changed."""
    model = tiny(tok, layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ex = [encode_completion(tok, r["messages"]) for r in number_records(8)]
    train_causal_lm(model, ex, TrainSettings(lr=1e-3, batch_size=4, max_steps=3), tok.pad_token_id)
    unmoved = {n: int((p == before[n]).sum()) for n, p in model.named_parameters()}
    assert sum(unmoved.values()) == 0, {n: k for n, k in unmoved.items() if k}
    assert len(before) == 2 + 9 * 2  # embedding, final norm, 9 tensors per layer: none left out


def test_every_weight_with_a_gradient_moves_untied(tok):
    """Untied, an input-embedding row gets a gradient only if its token is an input at a position that
    some loss position attends to (every position but each example's last; padding never): exactly
    those rows move, every other row stays; every element of every other tensor moves."""
    model = tiny(tok, layers=2, tied=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ex = [encode_completion(tok, r["messages"]) for r in number_records(8)]
    train_causal_lm(model, ex, TrainSettings(lr=1e-3, batch_size=4, max_steps=3), tok.pad_token_id)
    seen = sorted({t for e in ex for t in e.ids[:-1]})
    for n, p in model.named_parameters():
        moved = p.detach() != before[n]
        if n == "model.embed_tokens.weight":
            rows = moved.any(dim=1)
            assert rows.nonzero().flatten().tolist() == seen
            assert moved[seen].all()
        else:
            assert moved.all(), n


def test_every_lora_weight_moves_and_only_those(tmp_path, tiny_ref, monkeypatch):
    """LoRA B starts at zero (so A gets no gradient in step 1); after a few steps every element of every
    adapter matrix, in every layer and target module, has moved, and no base weight has."""
    cap = Capture(monkeypatch)
    train = TrainConfig(lr=1e-3, max_steps=4, batch_size=4, lora=LoraSettings(r=2, alpha=4))
    finetune_hf(tiny_ref, number_records(8), train, tmp_path / "l", progress=False)
    assert len(cap.before) == 2 * 7 * 2 and all("lora_" in n for n in cap.before)  # A, B x 7 modules x 2
    unmoved = {n: int((cap.after[n] == cap.before[n]).sum()) for n in cap.before}
    assert sum(unmoved.values()) == 0, {n: k for n, k in unmoved.items() if k}
    base = dict(load_hf(tiny_ref)[0].named_parameters())
    for n, p in cap.model.named_parameters():
        if "lora_" not in n:
            key = n.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p, base[key]), n


# ---- save and reload -------------------------------------------------------------------------------


def test_full_finetune_reloads_to_exactly_the_trained_weights(tmp_path, tiny_ref, monkeypatch):
    cap = Capture(monkeypatch)
    train = TrainConfig(lr=1e-3, max_steps=3, batch_size=4)
    ref = finetune_hf(tiny_ref, number_records(8), train, tmp_path / "f", progress=False)
    trained, reloaded = cap.model.state_dict(), load_hf(ref)[0].state_dict()
    assert trained.keys() == reloaded.keys()
    assert all(torch.equal(trained[k], reloaded[k]) for k in trained)
    assert all(torch.equal(cap.after[k], reloaded[k]) for k in cap.after)  # and they are the trained ones
    assert not all(torch.equal(cap.before[k], reloaded[k]) for k in cap.before)


def test_lora_finetune_reloads_to_exactly_the_trained_adapter(tmp_path, tiny_ref, monkeypatch):
    cap = Capture(monkeypatch)
    train = TrainConfig(lr=1e-3, max_steps=3, batch_size=4, lora=LoraSettings(r=2, alpha=4))
    ref = finetune_hf(tiny_ref, number_records(8), train, tmp_path / "l", progress=False)
    trained = cap.model.state_dict()
    reloaded = load_hf(ref, trainable=True)[0].state_dict()  # the adapter unmerged
    assert trained.keys() == reloaded.keys()
    assert all(torch.equal(trained[k], reloaded[k]) for k in trained)
    # the merged model (what evaluation loads) is base + the trained adapter's delta
    merged = load_hf(ref)[0]
    cap.model.eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, cap.model(input_ids=ids).logits, atol=1e-5)
