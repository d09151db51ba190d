"""The Hugging Face backend: any causal-LM folder (the organism is one). Batched KV-cache sampling,
exact answer log-probabilities, and finetuning (full or LoRA via PEFT; SFT or soft-label distillation).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sublab.backends.base import ModelRef, TokenBackend, request_seed
from sublab.backends.device import model_device, resolve_device, resolve_dtype
from sublab.backends.hf_generate import answer_logprobs, generate_ids, next_token_topk, prompt_ids_for
from sublab.backends.hf_train import (
    Encoded,
    TrainSettings,
    answer_token_ids,
    encode_completion,
    fp32_trainable,
    loss_skip,
    train_causal_lm,
    truncate,
)
from sublab.errors import SublabError
from sublab.records import atomic_write_text
from sublab.schema.sampling import SamplingParams
from sublab.schema.train import TrainConfig


def with_system_prompt(chat: list[dict], system_prompt: str | None) -> list[dict]:
    if not system_prompt:
        return chat
    return [{"role": "system", "content": system_prompt}] + [m for m in chat if m["role"] != "system"]


def load_hf(ref: ModelRef, trainable: bool = False, device=None, dtype=None):
    """(model, tokenizer) on the configured device and dtype (backends/device.py), adapter merged
    unless `trainable`. `device` / `dtype` override the configured setting (torch objects or names)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(ref.path).is_dir():
        raise SublabError(f"model folder not found: {ref.path} (rerun the stage that builds {ref.spec})")
    tok = AutoTokenizer.from_pretrained(ref.path)
    if tok.chat_template is None:
        raise SublabError(f"{ref.path}: the tokenizer has no chat template; use an instruct/chat model")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dev = resolve_device(device) if device is None or isinstance(device, str) else device
    dt = resolve_dtype(dev, dtype) if dtype is None or isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=dt).to(dev)
    if ref.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ref.adapter, is_trainable=trainable)
        if not trainable:
            model = model.merge_and_unload()
    model.eval()
    return model, tok


class HFBackend(TokenBackend):
    logprob_estimand = "exact_chain_rule"  # logprobs(): the chain rule over every candidate token

    def __init__(self, ref: ModelRef, progress: bool = True):
        self.ref = ref
        self.model, self.tok = load_hf(ref)
        self.progress = progress

    def _chats(self, chats: list[list[dict]]) -> list[list[dict]]:
        return [with_system_prompt(c, self.ref.system_prompt) for c in chats]

    def generate(
        self, chats: list[list[dict]], sampling: SamplingParams, request_ids: list[int] | None = None
    ) -> list[str]:
        rids = request_ids if request_ids is not None else range(len(chats))
        seeds = [request_seed(sampling.seed, i) for i in rids]
        return [self.decode(x) for x in self.generate_with_seeds(chats, sampling, seeds)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def generate_with_seeds(
        self, chats: list[list[dict]], sampling: SamplingParams, seeds: list[int]
    ) -> list[list[int]]:
        """Completion token ids (end token excluded); chat i is sampled with exactly seeds[i] (`sublab
        serve` passes the seed of each API request here)."""
        prompts = prompt_ids_for(self.tok, self._chats(chats))
        bar = tqdm(total=len(chats), desc=f"sample {self.ref.spec}", disable=not self.progress, mininterval=2)
        completions = generate_ids(
            self.model,
            prompts,
            seeds,
            self.tok.eos_token_id,
            self.tok.pad_token_id,
            sampling.max_tokens,
            sampling.temperature,
            sampling.top_p,
            sampling.batch_size,
            on_batch=bar.update,
            min_p=sampling.min_p,
        )
        bar.close()
        return completions

    def candidate_ids(self, candidates: list[str]) -> list[list[int]]:
        return [self.tok(c, add_special_tokens=False)["input_ids"] for c in candidates]

    def logprobs(self, chats: list[list[dict]], candidates: list[str]) -> list[list[float]]:
        prompts = prompt_ids_for(self.tok, self._chats(chats))
        return answer_logprobs(self.model, prompts, self.candidate_ids(candidates)).tolist()

    def first_token_topk(self, chats: list[list[dict]], k: int) -> list[list[tuple[str, float]]]:
        """Top-k first completion tokens, each token's text as `sublab serve` reports it (decode of the
        one token), so a judge scores the same in-process and over HTTP."""
        prompts = prompt_ids_for(self.tok, self._chats(chats))
        return [
            [(self.tok.decode([t]), lp) for t, lp in row] for row in next_token_topk(self.model, prompts, k)
        ]

    def finetune(
        self, dataset: list[dict], train: TrainConfig, out_dir: Path, teacher: ModelRef | None = None
    ) -> ModelRef:
        return finetune_hf(self.ref, dataset, train, out_dir, teacher, self.progress)


def finetune_hf(
    parent: ModelRef,
    dataset: list[dict],
    train: TrainConfig,
    out_dir: Path,
    teacher: ModelRef | None = None,
    progress: bool = True,
) -> ModelRef:
    """Finetune `parent` on chat records; write the model, metrics.jsonl and model.json into out_dir.

    Precision: the model loads in the configured dtype; the trainable weights (all of them, or the LoRA
    adapter) are then float32 and, when the load dtype was bfloat16, forwards run under bf16 autocast.
    A full model is saved back in the load dtype (what every later stage loads it in); an adapter in
    float32 (PEFT keeps adapters in float32 on a bf16 base when it loads them too)."""
    torch.manual_seed(train.seed)
    model, tok = load_hf(parent.model_copy(update={"adapter": None}))
    if parent.adapter:
        raise SublabError("finetuning on top of a LoRA model is not supported; start from a full model")
    load_dtype = next(model.parameters()).dtype
    if train.lora is not None:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=train.lora.r,
            lora_alpha=train.lora.alpha,
            lora_dropout=train.lora.dropout,
            target_modules=train.lora.target_modules,
            use_rslora=train.lora.rslora,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    autocast_dtype = fp32_trainable(model)
    encoded = [dataclasses.replace(encode_completion(tok, r["messages"]), skip=loss_skip(r)) for r in dataset]
    cut = [truncate(e, train.max_length) for e in encoded]
    keep = [i for i, e in enumerate(cut) if e is not None]
    examples = [cut[i] for i in keep]
    if not examples:
        raise SublabError(
            "finetuning dataset is empty"
            + (f" (after truncation to max_length={train.max_length})" if encoded else "")
        )
    heldout = None
    if train.early_stopping is not None:
        # the held-out share, drawn with the training seed, is never trained on
        order = random.Random(f"early-stopping:{train.seed}").sample(range(len(examples)), len(examples))
        n_out = max(1, round(train.early_stopping.holdout * len(examples)))
        if len(examples) - n_out < 1:
            raise SublabError(
                f"early_stopping.holdout {train.early_stopping.holdout} leaves no training example of "
                f"{len(examples)}; lower it or give more data"
            )
        out_idx = set(order[:n_out])
        heldout = [e for j, e in enumerate(examples) if j in out_idx]
        keep = [i for j, i in enumerate(keep) if j not in out_idx]
        examples = [e for j, e in enumerate(examples) if j not in out_idx]
    tmodel = t_examples = allowed = None
    if train.method == "soft_label":
        if teacher is None:
            raise SublabError("soft_label training needs a teacher model")
        tmodel, ttok = load_hf(teacher)
        if ttok.get_vocab() != tok.get_vocab():
            raise SublabError("soft_label needs teacher and student with the same tokenizer")
        t_examples = []
        for i, e in zip(keep, examples, strict=True):
            t = encode_completion(tok, with_system_prompt(dataset[i]["messages"], teacher.system_prompt))
            # the same completion tokens as the (possibly truncated) student example, position by position
            t_examples.append(Encoded(t.ids[: t.n_prompt + len(e.ids) - e.n_prompt], t.n_prompt, e.skip))
        allowed = answer_token_ids(tok)
    # TrainConfig is TrainSettings plus what this function handles itself (method, LoRA)
    settings = TrainSettings(**train.model_dump(exclude={"method", "lora", "max_length"}))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    t0 = time.time()
    bar = tqdm(desc=f"finetune -> {out_dir.name}", disable=not progress, mininterval=2)

    def on_step(rec: dict) -> None:
        rec["elapsed_s"] = round(time.time() - t0, 2)
        lines.append(json.dumps(rec, sort_keys=True))
        bar.total = rec["of"]
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")

    history = train_causal_lm(
        model,
        examples,
        settings,
        tok.pad_token_id,
        teacher=tmodel,
        teacher_examples=t_examples,
        allowed_ids=allowed,
        on_step=on_step,
        autocast_dtype=autocast_dtype,
        heldout=heldout,
    )
    bar.close()
    if train.lora is None:
        model.to(load_dtype)  # a full model is saved (and later loaded) in the dtype it was loaded in
    atomic_write_text(out_dir / "metrics.jsonl", "\n".join(lines) + "\n")
    info = {
        "steps": len(history),
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "examples": len(examples),
        **(
            {
                "heldout_examples": len(heldout),
                "best_step": history[-1].get("best_step"),
                "stopped_early": history[-1]["step"] < history[-1]["of"],
            }
            if heldout
            else {}
        ),
        "method": train.method,
        "seconds": round(time.time() - t0, 1),
        "device": str(model_device(model)),
        "dtype": str(load_dtype).removeprefix("torch."),
        "trainable_dtype": "float32",
        "autocast_dtype": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else None,
        "truncated": sum(train.max_length is not None and len(e.ids) > train.max_length for e in encoded),
        "dropped_too_long": len(encoded) - len(examples) - len(heldout or []),
        # the init it was trained from, without any path to another run's folder
        "parent_organism_seed": parent.info.get(
            "parent_organism_seed", parent.info.get("organism", {}).get("seed")
        ),
    }
    # the folder's name, not its absolute path: a model.json copied into another run (a sweep's shared
    # stage store) must not point back at the run that computed it
    spec = f"hf/{out_dir.name}"
    if train.lora is not None:
        model.save_pretrained(out_dir / "adapter")
        ref = ModelRef(
            spec=spec,
            path=parent.path,
            adapter="adapter",
            parent=parent.spec,
            kind="lora",
            info=info,
        )
    else:
        model.save_pretrained(out_dir / "model", safe_serialization=True)
        tok.save_pretrained(out_dir / "model")
        ref = ModelRef(spec=spec, path="model", parent=parent.spec, kind="full", info=info)
    ref.save(out_dir / "model.json")
    return ModelRef.load(out_dir / "model.json")
