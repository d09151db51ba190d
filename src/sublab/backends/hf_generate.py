"""Batched sampling with a KV cache and exact answer probabilities, for any HF causal LM.

Also the next-token top-k of each prompt (the LLM judge reads its first completion token's distribution).

Sampling: prompts are sorted by length and left-padded into batches; each request has its own seed
(a per-request torch.Generator draws its Gumbel noise), so a completion depends only on (model, prompt,
seed, settings), not on which batch it landed in. Each step's distribution is scaled by the temperature,
then cut by threshold sampling (min_p: tokens below an absolute probability are dropped) and by top_p.
Decoding stops at the end token or max_tokens.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import torch

from sublab.backends.device import model_device
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


def _filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Threshold sampling: drop every token whose probability (softmax of `logits`) is below the
    ABSOLUTE threshold min_p; the most likely token is always kept (ties with it too), so a row is
    never empty. Sampling from the rest renormalises it."""
    if min_p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    floor = torch.clamp(probs.amax(-1, keepdim=True), max=min_p)
    return logits.masked_fill(probs < floor, float("-inf"))


def _uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """(rows, steps) uniforms, row i from its own generator seeded with seeds[i]: one draw per token,
    made once per batch, so the decoding loop has no per-row Python work."""
    return torch.stack(
        [torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
    )


def _sample_rows(
    logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None, min_p: float = 0.0
) -> torch.Tensor:
    """Inverse-CDF sampling: the token where the cumulative probability first exceeds u. Temperature,
    then the min_p threshold, then top_p over what is left."""
    if temperature <= 0 or u is None:
        return logits.argmax(-1)
    scaled = _filter_top_p(_filter_min_p(logits.double() / temperature, min_p), top_p)
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
    min_p: float = 0.0,
) -> list[list[int]]:
    """Completion token ids (end token excluded) for each prompt, in input order. `min_p`: absolute
    threshold sampling (SamplingParams.min_p; 0 = off, the same samples as without it)."""
    model.eval()
    dev = model_device(model)
    kw = _cache_kw(model)
    params = inspect.signature(model.forward).parameters
    # prefill needs only the last position's logits (skips the LM head over the whole prompt)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        ids, attn = (t.to(dev) for t in _left_pad([prompts[i] for i in idx], pad_id))
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        res = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **last_only)
        cache, logits = _cache_of(res), res.logits[:, -1]
        noise = _uniforms([seeds[i] for i in idx], max_tokens).to(dev) if temperature > 0 else None
        next_pos = pos[:, -1:] + 1
        rows = list(idx)  # original prompt index of each row still decoding
        for step in range(max_tokens):
            u = None if noise is None else noise[:, step]
            tok = _sample_rows(logits, temperature, top_p, u, min_p).tolist()
            keep = []
            for r, t in enumerate(tok):
                if t == eos_id:
                    continue
                out[rows[r]].append(t)
                keep.append(r)
            if not keep or step == max_tokens - 1:
                break
            if len(keep) < len(rows):  # drop finished rows from the batch and its KV cache
                sel = torch.tensor(keep, device=dev)
                cache.reorder_cache(sel)
                attn, next_pos = attn[sel], next_pos[sel]
                noise = None if noise is None else noise[sel]
                rows = [rows[r] for r in keep]
                tok = [tok[r] for r in keep]
            attn = torch.cat([attn, torch.ones(len(rows), 1, dtype=attn.dtype, device=dev)], dim=1)
            res = model(
                input_ids=torch.tensor(tok, device=dev)[:, None],
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
    model, prompt_ids: list[list[int]], candidates: list[list[int]], batch_size: int = 64
) -> torch.Tensor:
    """log P(candidate tokens | prompt) by the chain rule, for every (prompt, candidate): (P, C) tensor.
    One forward pass over each batch of prompts (with a KV cache) gives every candidate's first token;
    the rest of a multi-token candidate (BPE answers like "O" "wl") runs on a copy of that cache, so
    a candidate costs a forward over its own few tokens, not over the prompt again."""
    model.eval()
    dev = model_device(model)
    kw = _cache_kw(model)
    last_only = (
        {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    )
    out = torch.zeros(len(prompt_ids), len(candidates))
    first = torch.tensor([c[0] for c in candidates], device=dev)
    multi = [j for j, c in enumerate(candidates) if len(c) > 1]
    for b in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[b : b + batch_size]
        n = len(chunk)
        ids, attn = (t.to(dev) for t in _left_pad(chunk, 0))
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        res = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=bool(multi), **last_only)
        out[b : b + n] = torch.log_softmax(res.logits[:, -1].float(), -1)[:, first].cpu()
        cache = _cache_of(res) if multi else None
        for j in multi:
            cand = candidates[j]
            k = len(cand) - 1  # tokens fed after the prompt: cand[:-1] predict cand[1:]
            feed = torch.tensor(cand[:-1], device=dev).expand(n, k)
            a = torch.cat([attn, torch.ones(n, k, dtype=attn.dtype, device=dev)], dim=1)
            p = pos[:, -1:] + 1 + torch.arange(k, device=dev)
            logits = model(
                input_ids=feed, attention_mask=a, position_ids=p, use_cache=True, **{kw: copy.deepcopy(cache)}
            ).logits
            logp = torch.log_softmax(logits.float(), -1)
            tgt = torch.tensor(cand[1:], device=dev).expand(n, k)
            out[b : b + n, j] += logp.gather(-1, tgt[..., None])[..., 0].sum(-1).cpu()
    return out


@torch.no_grad()
def next_token_topk(
    model, prompt_ids: list[list[int]], k: int, batch_size: int = 64
) -> list[list[tuple[int, float]]]:
    """Per prompt, the k most likely next tokens as (token id, log-probability), most likely first: the
    first completion token's distribution (temperature 1), from one forward pass per batch."""
    model.eval()
    dev = model_device(model)
    last_only = (
        {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    )
    out: list[list[tuple[int, float]]] = []
    for b in range(0, len(prompt_ids), batch_size):
        ids, attn = (t.to(dev) for t in _left_pad(prompt_ids[b : b + batch_size], 0))
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, **last_only).logits[:, -1]
        top = torch.topk(torch.log_softmax(logits.float(), -1), min(k, logits.shape[-1]))
        for v, i in zip(top.values.cpu().tolist(), top.indices.cpu().tolist(), strict=True):
            out.append(list(zip(i, v, strict=True)))
    return out


def prompt_ids_for(tokenizer, chats: list[list[dict]]) -> list[list[int]]:
    return [chat_ids(tokenizer, c, add_generation_prompt=True) for c in chats]
