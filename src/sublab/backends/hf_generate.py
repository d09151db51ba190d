"""Batched sampling with a KV cache and exact answer probabilities, for any HF causal LM.

Sampling: prompts are sorted by length and left-padded into batches; each request has its own seed
(a per-request torch.Generator draws its Gumbel noise), so a completion depends only on (model, prompt,
seed, settings), not on which batch it landed in. Decoding stops at the end token or max_tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from sublab.backends.hf_train import chat_ids


def _cache_kw(model) -> str:
    """transformers >= 5.2x names the KV cache `cache`; older releases `past_key_values`."""
    fwd = getattr(model, "forward", None)
    return "cache" if fwd is not None and "cache" in inspect.signature(fwd).parameters else "past_key_values"


def _cache_of(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        attn[i, width - len(s) :] = 1
    return ids, attn


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """(rows, steps) uniforms, row i from its own generator seeded with seeds[i]: one draw per token,
    made once per batch, so the decoding loop has no per-row Python work."""
    return torch.stack(
        [torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
    )


def _sample_rows(
    logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None
) -> torch.Tensor:
    """Inverse-CDF sampling: the token where the cumulative probability first exceeds u."""
    if temperature <= 0 or u is None:
        return logits.argmax(-1)
    scaled = _filter_top_p(logits.double() / temperature, top_p)
    cdf = torch.softmax(scaled, dim=-1).cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1)
    return idx.clamp_max(logits.shape[-1] - 1)


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    seeds: list[int],
    eos_id: int,
    pad_id: int,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Completion token ids (end token excluded) for each prompt, in input order."""
    model.eval()
    kw = _cache_kw(model)
    params = inspect.signature(model.forward).parameters
    # prefill needs only the last position's logits (skips the LM head over the whole prompt)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        ids, attn = _left_pad([prompts[i] for i in idx], pad_id)
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        res = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **last_only)
        cache, logits = _cache_of(res), res.logits[:, -1]
        noise = _uniforms([seeds[i] for i in idx], max_tokens) if temperature > 0 else None
        next_pos = pos[:, -1:] + 1
        rows = list(idx)  # original prompt index of each row still decoding
        for step in range(max_tokens):
            tok = _sample_rows(logits, temperature, top_p, None if noise is None else noise[:, step]).tolist()
            keep = []
            for r, t in enumerate(tok):
                if t == eos_id:
                    continue
                out[rows[r]].append(t)
                keep.append(r)
            if not keep or step == max_tokens - 1:
                break
            if len(keep) < len(rows):  # drop finished rows from the batch and its KV cache
                sel = torch.tensor(keep)
                cache.reorder_cache(sel)
                attn, next_pos = attn[sel], next_pos[sel]
                noise = None if noise is None else noise[sel]
                rows = [rows[r] for r in keep]
                tok = [tok[r] for r in keep]
            attn = torch.cat([attn, torch.ones(len(rows), 1, dtype=attn.dtype)], dim=1)
            res = model(
                input_ids=torch.tensor(tok)[:, None],
                attention_mask=attn,
                position_ids=next_pos,
                use_cache=True,
                **{kw: cache},
            )
            cache, logits = _cache_of(res), res.logits[:, -1]
            next_pos = next_pos + 1
        if on_batch:
            on_batch(len(idx))
    return out


@torch.no_grad()
def answer_logprobs(
    model, prompt_ids: list[list[int]], candidates: list[list[int]], batch_size: int = 512
) -> torch.Tensor:
    """log P(candidate tokens | prompt) by the chain rule, for every (prompt, candidate): (P, C) tensor.
    One forward pass over the prompt; candidates that are a single token are read off its last logits,
    longer ones get a batched forward of prompt + candidate."""
    model.eval()
    out = torch.zeros(len(prompt_ids), len(candidates))
    single = [j for j, c in enumerate(candidates) if len(c) == 1]
    multi = [j for j, c in enumerate(candidates) if len(c) > 1]
    pad = 0
    for b in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[b : b + batch_size]
        ids, attn = _left_pad(chunk, pad)
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        last = torch.log_softmax(
            model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1].float(), -1
        )
        if single:
            out[b : b + len(chunk), single] = last[:, [candidates[j][0] for j in single]]
    for j in multi:
        cand = candidates[j]
        for b in range(0, len(prompt_ids), batch_size):
            chunk = [p + cand for p in prompt_ids[b : b + batch_size]]
            ids, attn = _left_pad(chunk, pad)
            pos = (attn.cumsum(-1) - 1).clamp_min(0)
            logp = torch.log_softmax(
                model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float(), -1
            )
            n = len(cand)
            # tokens at the last n positions are predicted by positions -n-1 .. -2
            tgt = torch.tensor(cand)
            lp = logp[:, -n - 1 : -1].gather(-1, tgt.expand(len(chunk), n)[..., None])[..., 0]
            out[b : b + len(chunk), j] = lp.sum(-1)
    return out


def prompt_ids_for(tokenizer, chats: list[list[dict]]) -> list[list[int]]:
    return [chat_ids(tokenizer, c, add_generation_prompt=True) for c in chats]
