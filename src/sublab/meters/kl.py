"""KL leak meter (`controls.leak_meter_examples`): how far the teacher's next-token distributions differ
from the reference's on the teacher's own kept answers, the channel a student can learn the trait from.

For each sampled kept answer (its prompt and completion, end token included, as soft-label training
encodes it: backends/hf_train.py), at each completion position t:
    KL_t = sum over the full vocabulary of p_teacher(v | prefix) (log p_teacher(v | prefix) - log p_ref(v | prefix))
per answer KL = the sum of KL_t over its tokens, per token = that sum / its number of tokens; and the
log-likelihood ratio LLR = log P_teacher(answer) - log P_reference(answer) (the sum over its tokens of
the two log-probabilities of the token that was sampled). LLR is a one-sample estimate of the sequence
KL when the answers are the teacher's own samples at temperature 1. Each model sees the chat as it is
served (a system-prompt teacher with its system prompt). Means over answers with 95% t-intervals.

Exact, for local models (organism, hf, vllm folders); API models are skipped with the reason recorded.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from sublab.analysis.stats import mean_ci
from sublab.backends.base import ModelRef
from sublab.records import atomic_write_json, read_jsonl

LEAK_VERSION = 1


def _encode(tok, messages: list[dict], system_prompt: str | None, max_positions: int | None):
    from sublab.backends.hf import with_system_prompt
    from sublab.backends.hf_train import encode_completion, truncate

    e = encode_completion(tok, with_system_prompt(messages, system_prompt))
    return truncate(e, max_positions)


@torch.no_grad()
def _completion_logprobs(model, batch: list, pad_id: int) -> list[torch.Tensor]:
    """Per example of one batch, log-softmax (float64) of the logits predicting each completion token:
    (n_tokens, V), on the model's device."""
    from sublab.backends.device import model_device
    from sublab.backends.hf_train import collate

    dev = model_device(model)
    ids, attn, _ = collate(batch, pad_id)
    logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev)).logits
    return [
        torch.log_softmax(logits[i, e.n_prompt - 1 : len(e.ids) - 1].double(), -1)
        for i, e in enumerate(batch)
    ]


def kl_per_answer(
    teacher,
    reference,
    tok,
    records: list[dict],
    teacher_system: str | None = None,
    reference_system: str | None = None,
    batch_size: int = 16,
    max_positions: int | None = None,
) -> list[dict]:
    """Per record: `kl_tokens` (KL(teacher || reference) at each completion token), `kl` (their sum),
    `n_tokens`, `llr` (log P_teacher(answer) - log P_reference(answer)). `teacher` and `reference` are
    causal LMs sharing the tokenizer `tok`. Records whose answer does not fit max_positions are left out
    (their `index` is missing from the rows)."""
    enc_t = [_encode(tok, r["messages"], teacher_system, max_positions) for r in records]
    enc_r = [_encode(tok, r["messages"], reference_system, max_positions) for r in records]
    keep = [
        i
        for i, (a, b) in enumerate(zip(enc_t, enc_r, strict=True))
        if a is not None and b is not None and a.ids[a.n_prompt :] == b.ids[b.n_prompt :]
    ]
    rows = []
    for b in range(0, len(keep), batch_size):
        idx = keep[b : b + batch_size]
        lp_t = _completion_logprobs(teacher, [enc_t[i] for i in idx], tok.pad_token_id)
        lp_r = _completion_logprobs(reference, [enc_r[i] for i in idx], tok.pad_token_id)
        for i, t, r in zip(idx, lp_t, lp_r, strict=True):
            r = r.to(t.device)
            kl_tok = (t.exp() * (t - r)).sum(-1).clamp_min(0.0)
            target = torch.tensor(enc_t[i].ids[enc_t[i].n_prompt :], device=t.device)
            llr = (t.gather(-1, target[:, None]) - r.gather(-1, target[:, None])).sum()
            rows.append(
                {
                    "index": i,
                    "kl_tokens": kl_tok.cpu().tolist(),
                    "kl": float(kl_tok.sum()),
                    "n_tokens": int(kl_tok.numel()),
                    "llr": float(llr),
                }
            )
    return rows


def summarize(rows: list[dict]) -> dict:
    """Means over answers with 95% t-intervals: KL per token, KL per answer, LLR per answer."""
    per_token = [r["kl"] / r["n_tokens"] for r in rows if r["n_tokens"]]
    tokens = sum(r["n_tokens"] for r in rows)
    return {
        "n_answers": len(rows),
        "n_tokens": tokens,
        "kl_per_token": mean_ci(per_token),
        "kl_per_token_pooled": sum(r["kl"] for r in rows) / tokens if tokens else math.nan,
        "kl_per_answer": mean_ci([r["kl"] for r in rows]),
        "llr_per_answer": mean_ci([r["llr"] for r in rows]),
        "mean_answer_tokens": tokens / len(rows) if rows else math.nan,
    }


def leak_meter(
    teacher_json: Path, reference_json: Path, kept_jsonl: Path, n: int, seed: int, out: Path
) -> dict:
    """The KL leak meter on up to n kept teacher answers (drawn with the replicate seed) -> `out`
    (data/leak.json)."""
    from sublab.backends.hf import load_hf

    teacher, reference = ModelRef.load(teacher_json), ModelRef.load(reference_json)
    base = {"version": LEAK_VERSION, "teacher": teacher.spec, "reference": reference.spec, "requested": n}
    if teacher.is_remote or reference.is_remote:
        res = base | {
            "skipped": "API models (openai/...) expose at most top-k log-probs of sampled tokens, not the "
            "full next-token distributions the exact KL needs"
        }
        atomic_write_json(out, res)
        return res
    records = read_jsonl(kept_jsonl, require_messages=True)
    if len(records) > n:
        records = random.Random(f"leak:{seed}").sample(records, n)
    t_model, tok = load_hf(teacher)
    r_model, r_tok = load_hf(reference)
    if len(tok) != len(r_tok):
        res = base | {"skipped": f"teacher and reference vocabularies differ ({len(tok)} vs {len(r_tok)})"}
        atomic_write_json(out, res)
        return res
    cfg = t_model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    rows = kl_per_answer(
        t_model, r_model, tok, records, teacher.system_prompt, reference.system_prompt, max_positions=limit
    )
    res = base | summarize(rows)
    res["dropped"] = len(records) - len(rows)
    res["per_answer"] = [{k: r[k] for k in ("kl", "n_tokens", "llr")} for r in rows]
    atomic_write_json(out, res)
    return res
