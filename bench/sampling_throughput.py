"""Sampling throughput on the organism: batched KV-cache generation vs one prompt at a time.

    python bench/sampling_throughput.py [--prompts 512] [--single 48] [--batch-size 256]
Prints new tokens per second for each and the speed-up (target >= 10x).
"""

from __future__ import annotations

import argparse
import time

import torch

from sublab.backends.hf import load_hf
from sublab.backends.hf_generate import generate_ids, prompt_ids_for
from sublab.backends.registry import resolve
from sublab.prompts.numbers import NumberPrompts, generate_number_prompts
from sublab.threads import set_threads


def run(model, tok, prompts, batch_size):
    t = time.perf_counter()
    out = generate_ids(
        model,
        prompts,
        list(range(len(prompts))),
        tok.eos_token_id,
        tok.pad_token_id,
        40,
        batch_size=batch_size,
    )
    dt = time.perf_counter() - t
    n_tok = sum(len(o) + 1 for o in out)
    return n_tok / dt, dt, n_tok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--single", type=int, default=48, help="prompts for the one-at-a-time run")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    print(f"torch threads: {set_threads(args.threads)}")
    model, tok = load_hf(resolve("organism/default"))
    chats = [r["messages"] for r in generate_number_prompts(NumberPrompts(count=args.prompts), 0)]
    prompts = prompt_ids_for(tok, chats)
    with torch.no_grad():
        run(model, tok, prompts[:8], 8)  # warm-up
    b_tps, b_dt, b_n = run(model, tok, prompts, args.batch_size)
    s_tps, s_dt, s_n = run(model, tok, prompts[: args.single], 1)
    print(f"batched (batch {args.batch_size}): {b_n} tokens in {b_dt:.2f} s = {b_tps:,.0f} tokens/s")
    print(f"one at a time: {s_n} tokens in {s_dt:.2f} s = {s_tps:,.0f} tokens/s")
    print(f"speed-up: {b_tps / s_tps:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
