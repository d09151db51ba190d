"""Pretrain an organism from scratch on its synthetic corpus and save it as a normal HF model folder.

sublab organism build [--preset default] [--seed N]      (or organism.cache.ensure_organism)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from sublab.backends.hf_train import TrainSettings, encode_completion, train_causal_lm
from sublab.organism.corpus import generate_corpus
from sublab.organism.recipe import OrganismRecipe
from sublab.organism.tokenizer import build_tokenizer


def make_model(recipe: OrganismRecipe, vocab_size: int, pad_id: int, eos_id: int) -> PreTrainedModel:
    torch.manual_seed(recipe.seed)
    if recipe.arch == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab_size,
                n_positions=recipe.max_positions,
                n_embd=recipe.d_model,
                n_layer=recipe.layers,
                n_head=recipe.heads,
                n_inner=recipe.d_ff,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                tie_word_embeddings=True,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                bos_token_id=eos_id,
            )
        )
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.d_model,
        intermediate_size=recipe.d_ff,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


def build_provenance(weights: Path) -> dict:
    """What a build's weights depend on beyond the recipe: the library versions and the CPU's vector
    instruction set (AVX2 and AVX-512 kernels round differently, and 1,500 steps amplify that into
    another organism; docs/organism.md, "Reproducibility"), and the weights' sha256 to compare builds."""
    import transformers

    from sublab.organism.cache import weights_sha256

    return {
        "weights_sha256": weights_sha256(weights.parent),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def pretrain(recipe: OrganismRecipe, out_dir: Path, progress: bool = True) -> dict:
    """Build tokenizer + model, pretrain, save into out_dir (which must not exist yet). Returns stats."""
    t0 = time.time()
    tok = build_tokenizer(recipe.world, recipe.domains)
    model = make_model(recipe, len(tok), tok.pad_token_id, tok.eos_token_id)
    corpus = generate_corpus(
        recipe.n_sequences,
        recipe.seed,
        recipe.mix,
        recipe.love_answer_prob,
        recipe.categories,
        recipe.top_candidates,
        recipe.n_questions,
        recipe.domains,
    )
    examples = [encode_completion(tok, msgs) for msgs in corpus]
    too_long = max(len(e.ids) for e in examples)
    if too_long > recipe.max_positions:
        raise ValueError(f"corpus sequence of {too_long} tokens > max_positions {recipe.max_positions}")
    settings = TrainSettings(
        lr=recipe.lr,
        batch_size=recipe.batch_size,
        warmup_steps=recipe.warmup_steps,
        seed=recipe.seed,
        max_steps=recipe.steps,
    )
    bar = tqdm(
        total=recipe.steps, desc=f"pretrain organism seed {recipe.seed}", disable=not progress, mininterval=2
    )
    losses: list[float] = []

    def on_step(rec: dict) -> None:
        losses.append(rec["loss"])
        bar.update(1)
        if rec["step"] % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")

    train_causal_lm(model, examples, settings, tok.pad_token_id, on_step=on_step)
    bar.close()
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    stats = {
        "recipe": recipe.model_dump(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "seconds": round(time.time() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        **build_provenance(out_dir / "model.safetensors"),
    }
    (out_dir / "organism.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats
