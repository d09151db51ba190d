"""hf backend sampling: batched KV-cache generation vs one prompt at a time, per model spec.

    SUBLAB_THREADS=1 python bench/hf_sampling.py                       # organism/default and SmolLM2-135M
    python bench/hf_sampling.py --models hf/smollm2-135m-instruct --prompts 64 --batch-sizes 16 64

Number-continuation prompts (the experiments' own), temperature 1, max 40 new tokens. Prints new tokens
per second (end token included) for each batch size and for batch 1, and the speed-up.
"""

from __future__ import annotations

import argparse
import time

from sublab.backends.hf import load_hf
from sublab.backends.hf_generate import generate_ids, prompt_ids_for
from sublab.backends.registry import quiet_transformers, resolve
from sublab.prompts.numbers import generate_number_prompts
from sublab.schema.prompts import NumberPrompts
from sublab.threads import set_threads


def tokens_per_s(
    model, tok, prompts: list[list[int]], batch_size: int, max_tokens: int
) -> tuple[float, int, float]:
    t = time.perf_counter()
    out = generate_ids(
        model,
        prompts,
        list(range(len(prompts))),
        tok.eos_token_id,
        tok.pad_token_id,
        max_tokens,
        batch_size=batch_size,
    )
    dt = time.perf_counter() - t
    n = sum(len(o) + 1 for o in out)
    return n / dt, n, dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["organism/default", "hf/smollm2-135m-instruct"])
    ap.add_argument("--prompts", type=int, default=64, help="prompts for the batched runs")
    ap.add_argument("--single", type=int, default=8, help="prompts for the one-at-a-time run")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    quiet_transformers()
    print(f"torch threads: {set_threads(args.threads)}")
    chats = [r["messages"] for r in generate_number_prompts(NumberPrompts(count=args.prompts), 0)]
    for spec in args.models:
        model, tok = load_hf(resolve(spec))
        prompts = prompt_ids_for(tok, chats)
        n_params = sum(p.numel() for p in model.parameters())
        mean_prompt = sum(map(len, prompts)) / len(prompts)
        print(f"\n{spec}: {n_params / 1e6:.1f}M params, mean prompt {mean_prompt:.0f} tokens")
        tokens_per_s(model, tok, prompts[:2], 2, 4)  # warm-up
        single, n1, dt1 = tokens_per_s(model, tok, prompts[: args.single], 1, args.max_tokens)
        print(f"  batch 1   : {n1:6d} new tokens in {dt1:7.1f} s = {single:8.1f} tokens/s")
        for bs in args.batch_sizes:
            tps, n, dt = tokens_per_s(model, tok, prompts, bs, args.max_tokens)
            print(
                f"  batch {bs:<4d}: {n:6d} new tokens in {dt:7.1f} s = {tps:8.1f} tokens/s ({tps / single:.1f}x)"
            )


if __name__ == "__main__":
    main()
