"""What a defense costs (`controls.task_quality`): how well each model still does the number task.

On `n` held-out number prompts (drawn with a seed no training data uses) the reference answers once
(stage quality_data -> data/quality/), and each evaluated model (stage quality:NAME ->
eval/NAME/quality.json) gets two scores:
- **pass rate**: it answers the same prompts (the run's sampling settings) and its answers go through
  the run's number filter (format, count, range, banned numbers and words);
- **task loss**: its mean negative log-likelihood per token (completion and end token, as training
  counts them) of the reference's kept held-out answers, the number task as the model family does it
  without any trait. Local models only (API models: the pass rate alone, the reason recorded).

A defense that removes the trait but leaves the student's pass rate and task loss where the control's
are is cheap; one that moves them has a cost the report shows beside its effect.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sublab.analysis.stats import mean_ci
from sublab.backends.base import ModelRef
from sublab.records import atomic_write_json, read_jsonl
from sublab.schema.filter import FilterConfig
from sublab.schema.sampling import SamplingParams

QUALITY_VERSION = 1
HELDOUT_SEED = 10_000_000
"""Held-out prompts use replicate seed + this (no run's prompts use such a seed)."""


@torch.no_grad()
def answer_nll(
    model, tok, records: list[dict], system_prompt: str | None = None, batch_size: int = 32
) -> list[tuple[float, int]]:
    """Per record, (sum of the negative log-likelihoods of its completion tokens and end token, their
    number) under `model` (behind `system_prompt`, if any), encoded as training encodes it."""
    import torch.nn.functional as F

    from sublab.backends.device import model_device
    from sublab.backends.hf import with_system_prompt
    from sublab.backends.hf_train import collate, encode_completion

    dev = model_device(model)
    enc = [encode_completion(tok, with_system_prompt(r["messages"], system_prompt)) for r in records]
    out = []
    for b in range(0, len(enc), batch_size):
        batch = enc[b : b + batch_size]
        ids, attn, lmask = (t.to(dev) for t in collate(batch, tok.pad_token_id))
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        m = lmask[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * m
        out += [(float(nll[i].sum()), int(m[i].sum())) for i in range(len(batch))]
    return out


def task_quality(
    model_json: Path,
    prompts_jsonl: Path,
    reference_kept: Path,
    sampling: SamplingParams,
    filter_cfg: FilterConfig,
    out: Path,
    progress: bool = True,
    api=None,
) -> dict:
    """The model's pass rate on the held-out prompts and its task loss on the reference's kept held-out
    answers -> out (eval/NAME/quality.json)."""
    from sublab.backends.registry import load_backend
    from sublab.filters import banned_word_reasons, number_answer_reasons
    from sublab.stages.sample import read_prompts

    ref = ModelRef.load(model_json)
    prompts = read_prompts(prompts_jsonl)
    backend = load_backend(ref, progress, api=api)
    ids = [p["metadata"]["prompt_index"] for p in prompts]
    answers = backend.generate([p["messages"] for p in prompts], sampling, request_ids=ids)
    banned = filter_cfg.banned_set()
    verdicts = [
        not (number_answer_reasons(a, filter_cfg, banned) + banned_word_reasons(a, filter_cfg.banned_words))
        for a in answers
    ]
    res: dict = {
        "version": QUALITY_VERSION,
        "model": ref.spec,
        "n_prompts": len(prompts),
        "pass_rate": sum(verdicts) / len(verdicts) if verdicts else math.nan,
        "passed": sum(verdicts),
    }
    heldout = read_jsonl(reference_kept, require_messages=True)
    if ref.is_remote:
        res["task_loss_skipped"] = "API models: no token log-likelihoods of given answers"
    elif not heldout:
        res["task_loss_skipped"] = "the reference kept none of its held-out answers"
    else:
        from sublab.backends.hf import HFBackend, load_hf

        # the sampling backend's own weights when it is the hf backend (organisms too), else load them
        model, tok = (backend.model, backend.tok) if isinstance(backend, HFBackend) else load_hf(ref)
        rows = answer_nll(model, tok, heldout, ref.system_prompt)
        tokens = sum(n for _, n in rows)
        res |= {
            "n_answers": len(rows),
            "task_loss": sum(s for s, _ in rows) / tokens if tokens else math.nan,
            "task_loss_per_answer": mean_ci([s / n for s, n in rows if n]),
        }
    atomic_write_json(out, res)
    return res
