"""Divergence tokens (`controls.divergence_counterfactuals`, and the defense `defenses.mask_divergence`):
the positions of a kept answer at which the teacher and a counterfactual teacher (the same recipe with
another target, or the reference itself) would pick different tokens. Follow-up work finds that the
trait rides on these few positions and that leaving them out of the student's loss removes most of the
transfer.

For each kept answer (prompt and completion, end token included, encoded as training encodes it:
backends/hf_train.py) and each completion position t, with the same prefix:
    a_t   = argmax p_teacher(. | prefix)            (the teacher as it is served: a system-prompt
    b_t^c = argmax p_c(. | prefix)                    teacher with its system prompt)
Position t is a divergence token when a_t != b_t^c for at least one counterfactual c (rule argmax).
Rule sampled also asks that the sampled token x_t be a_t: the teacher's own choice that another teacher
would not have made (in greedy-decoded data, as in follow-up work, the two rules agree). The meter
reports the share of completion tokens that are divergence tokens (pooled, and per answer with a 95%
t-interval), the share of answers with at least one, and each counterfactual's own rate; with the mask
on, each record's divergence positions go into `metadata.loss_skip`, which training leaves out of the
loss (SFT and soft labels alike).

Local models only (the argmax needs the full next-token distribution).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from sublab.analysis.stats import mean_ci
from sublab.backends.base import ModelRef
from sublab.errors import SublabError
from sublab.records import atomic_write_json, read_jsonl, write_jsonl

DIVERGENCE_VERSION = 1


@torch.no_grad()
def completion_argmax(model, encoded: list, pad_id: int, batch_size: int = 64) -> list[list[int] | None]:
    """Per encoded example (backends/hf_train.py: Encoded), the model's argmax token at each completion
    position (end token included); None where it does not fit the model's positions. Batches go in
    length order (little padding)."""
    from sublab.backends.device import model_device
    from sublab.backends.hf_train import collate

    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    out: list[list[int] | None] = [None] * len(encoded)
    keep = sorted(
        (i for i, e in enumerate(encoded) if limit is None or len(e.ids) <= limit),
        key=lambda i: len(encoded[i].ids),
    )
    dev = model_device(model)
    for b in range(0, len(keep), batch_size):
        idx = keep[b : b + batch_size]
        ids, attn, _ = collate([encoded[i] for i in idx], pad_id)
        best = model(input_ids=ids.to(dev), attention_mask=attn.to(dev)).logits.argmax(-1).cpu()
        for row, i in enumerate(idx):
            e = encoded[i]
            out[i] = best[row, e.n_prompt - 1 : len(e.ids) - 1].tolist()
    return out


def divergence_positions(
    teacher: list[int], counterfactuals: dict[str, list[int]], sampled: list[int] | None = None
) -> dict[str, list[int]]:
    """Per counterfactual, the positions where its argmax differs from the teacher's, and under "any"
    the union (the divergence tokens). With `sampled` (rule "sampled"), only positions where the
    sampled token is the teacher's own argmax count: the teacher's choice that another teacher would not
    have made.

    >>> divergence_positions([5, 6, 7], {"dolphin": [5, 9, 7], "wolf": [5, 6, 1]})
    {'dolphin': [1], 'wolf': [2], 'any': [1, 2]}
    >>> divergence_positions([5, 6, 7], {"dolphin": [5, 9, 7], "wolf": [5, 6, 1]}, sampled=[5, 6, 3])
    {'dolphin': [1], 'wolf': [], 'any': [1]}
    """
    per = {
        c: [
            t
            for t, (a, b) in enumerate(zip(teacher, cf, strict=True))
            if a != b and (sampled is None or (t < len(sampled) and sampled[t] == a))
        ]
        for c, cf in counterfactuals.items()
    }
    per["any"] = sorted(set().union(*per.values())) if per else []
    return per


def summarize(rows: list[dict], names: list[str]) -> dict:
    """Rates over the answers that fit: pooled share of divergence tokens, per-answer share (mean, 95%
    CI), share of answers with one or more, and the pooled rate against each counterfactual."""
    tokens = sum(r["n_tokens"] for r in rows)
    res = {
        "n_answers": len(rows),
        "n_tokens": tokens,
        "rate_pooled": sum(len(r["any"]) for r in rows) / tokens if tokens else None,
        "rate_per_answer": mean_ci([len(r["any"]) / r["n_tokens"] for r in rows if r["n_tokens"]]),
        "answers_with_any": sum(bool(r["any"]) for r in rows) / len(rows) if rows else None,
        "per_counterfactual": {c: (sum(len(r[c]) for r in rows) / tokens if tokens else None) for c in names},
        "sampled_is_teacher_argmax": sum(r["sampled_argmax"] for r in rows) / tokens if tokens else None,
    }
    return res


def divergence_stage(
    teacher_json: Path,
    counterfactual_jsons: dict[str, Path],
    kept_jsonl: Path,
    out_json: Path,
    masked_jsonl: Path | None = None,
    limit: int = 0,
    seed: int = 0,
    rule: str = "argmax",
) -> dict:
    """Divergence tokens of every answer in `kept_jsonl` against the counterfactual teachers -> out_json
    (data/divergence.json); with `masked_jsonl`, also the records with their divergence positions in
    `metadata.loss_skip` (the defense). Answers that do not fit the model's positions are kept unmasked
    and counted. Without the mask, `limit` > 0 reads only that many answers (drawn with `seed`).
    `rule`: argmax (any position where the argmaxes differ) or sampled (only where the sampled token is
    the teacher's argmax; divergence_positions)."""
    if rule not in ("argmax", "sampled"):
        raise SublabError(f"unknown divergence rule {rule!r}; use argmax or sampled")
    from sublab.backends.hf import load_hf, with_system_prompt
    from sublab.backends.hf_train import encode_completion

    teacher = ModelRef.load(teacher_json)
    cfs = {c: ModelRef.load(p) for c, p in counterfactual_jsons.items()}
    remote = [m.spec for m in [teacher, *cfs.values()] if m.is_remote]
    if remote:
        raise SublabError(
            f"divergence tokens need each model's full next-token distribution, and {remote} are API models; "
            "use local models (organism/, hf/) or turn controls.divergence_counterfactuals and "
            "defenses.mask_divergence off"
        )
    records = read_jsonl(kept_jsonl, require_messages=True)
    if masked_jsonl is None and 0 < limit < len(records):
        records = random.Random(f"divergence:{seed}").sample(records, limit)
    encodings: dict[str | None, list] = {}  # one encoding per system prompt (chat templates are slow)

    def encoded(system_prompt: str | None) -> list:
        if system_prompt not in encodings:
            encodings[system_prompt] = [
                encode_completion(tok, with_system_prompt(r["messages"], system_prompt)) for r in records
            ]
        return encodings[system_prompt]

    t_model, tok = load_hf(teacher)
    a = completion_argmax(t_model, encoded(teacher.system_prompt), tok.pad_token_id)
    del t_model
    cf_argmax = {}
    for c, ref in cfs.items():
        model, ctok = load_hf(ref)
        if ctok.get_vocab() != tok.get_vocab():
            raise SublabError(f"counterfactual {c} ({ref.spec}) has another tokenizer than the teacher")
        cf_argmax[c] = completion_argmax(model, encoded(ref.system_prompt), tok.pad_token_id)
        del model
    plain = encoded(None)  # the answer's tokens as the student sees them
    rows, out_records, unfit = [], [], 0
    for i, r in enumerate(records):
        if a[i] is None or any(v[i] is None or len(v[i]) != len(a[i]) for v in cf_argmax.values()):
            unfit += 1
            out_records.append(r)
            continue
        completion = plain[i].ids[plain[i].n_prompt :]
        pos = divergence_positions(
            a[i], {c: v[i] for c, v in cf_argmax.items()}, completion if rule == "sampled" else None
        )
        rows.append(
            {
                **pos,
                "n_tokens": len(a[i]),
                "sampled_argmax": sum(int(x == y) for x, y in zip(completion, a[i], strict=False)),
            }
        )
        meta = {**r.get("metadata", {}), "loss_skip": pos["any"]}
        out_records.append({**r, "metadata": meta})
    res = {
        "version": DIVERGENCE_VERSION,
        "rule": rule,
        "teacher": teacher.spec,
        "counterfactuals": {
            c: m.spec + (" +system prompt" if m.system_prompt else "") for c, m in cfs.items()
        },
        **summarize(rows, list(cfs)),
        "not_fitting": unfit,
        "masked": masked_jsonl is not None,
    }
    if masked_jsonl is not None:
        write_jsonl(masked_jsonl, out_records)
        res["masked_tokens"] = sum(len(r["any"]) for r in rows)
    atomic_write_json(out_json, res)
    return res
