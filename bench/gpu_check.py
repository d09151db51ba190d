"""A short device check for a GPU machine: no hub, no data files, only torch + transformers + peft + sublab.

    python bench/gpu_check.py            # ~110M-param Llama built from a config, on cuda in bf16 if present
    python bench/gpu_check.py --tiny     # a tiny Llama (CPU-friendly, seconds) to check the script itself

It builds a random Llama in-process and measures, through sublab's hf backend code:
- sampling throughput (batched KV-cache generation with per-request seeds, vs batch 1), new tokens/s;
- one LoRA training step (r=8 on all attention and MLP projections, completion-only loss), seconds;
- that bf16 logits agree with fp32 ones and the loss is finite.
Device and dtype follow sublab's rules (SUBLAB_DEVICE / SUBLAB_DTYPE, auto = bf16 on cuda, fp32 on cpu).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sublab.backends.device import resolve_device, resolve_dtype
from sublab.backends.hf_generate import generate_ids
from sublab.backends.hf_train import Encoded, TrainSettings, train_causal_lm


def build(tiny: bool, seed: int = 0) -> LlamaForCausalLM:
    if tiny:
        cfg = dict(
            vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
    else:  # ~110M parameters (tied embeddings), GPT-2-small-like shape
        cfg = dict(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
        )
    config = LlamaConfig(
        **cfg,
        num_key_value_heads=cfg["num_attention_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a tiny model: checks the script in seconds on a CPU")
    ap.add_argument(
        "--prompts", type=int, default=None, help="prompts for the batched run (default 256; tiny 32)"
    )
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-len", type=int, default=128)
    args = ap.parse_args()
    dev = resolve_device()
    dtype = resolve_dtype(dev)
    n_prompts = args.prompts or (32 if args.tiny else 256)
    ref = build(args.tiny)
    model = build(args.tiny).to(device=dev, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}  device {dev} ({gpu})  dtype {str(dtype).removeprefix('torch.')}")
    print(f"model: Llama {n_params / 1e6:.1f}M params")

    # bf16 (or whatever dtype) vs fp32 logits on the same weights
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    x = torch.randint(2, vocab, (2, 32), generator=g)
    with torch.no_grad():
        lo = model(input_ids=x.to(dev)).logits.float().cpu()
        hi = ref(input_ids=x).logits
    agree = (lo.argmax(-1) == hi.argmax(-1)).float().mean().item()
    print(f"logits vs fp32: max |diff| {(lo - hi).abs().max().item():.3g}, argmax agreement {agree:.1%}")

    # sampling: random prompts, an end token the random model (almost) never draws -> full length
    prompts = torch.randint(2, vocab, (n_prompts, args.prompt_len), generator=g).tolist()
    seeds = list(range(n_prompts))
    generate_ids(model, prompts[:2], seeds[:2], 1, 0, 4, batch_size=2)  # warm-up (kernels, allocator)
    rows = []
    for bs in (1, n_prompts):
        k = min(n_prompts, 8) if bs == 1 else n_prompts
        sync(dev)
        t = time.perf_counter()
        out = generate_ids(model, prompts[:k], seeds[:k], 1, 0, args.new_tokens, batch_size=bs)
        sync(dev)
        dt = time.perf_counter() - t
        n = sum(len(o) for o in out)
        rows.append(n / dt)
        print(f"sampling batch {bs:4d}: {n:7d} new tokens in {dt:6.2f} s = {n / dt:10,.0f} tokens/s")
    print(f"batched / batch 1: {rows[1] / rows[0]:.1f}x")

    # one LoRA step (and a second, timed) with the completion-only loss
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lmodel = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    )
    L = args.train_len
    data = torch.randint(2, vocab, (args.train_batch * 2, L), generator=g).tolist()
    examples = [Encoded(ids, L // 2) for ids in data]
    settings = TrainSettings(lr=2e-4, batch_size=args.train_batch, max_steps=2, warmup_steps=1)
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(rec: dict) -> None:
        sync(dev)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        print(
            f"LoRA step {rec['step']}: {times[-1]:.3f} s  loss {rec['loss']:.3f}  grad_norm {rec['grad_norm']:.3f}"
            f"  ({args.train_batch} x {L} tokens, loss on {rec['tokens']})"
        )

    hist = train_causal_lm(lmodel, examples, settings, pad_id=0, on_step=on_step)
    if dev.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")
    ok = all(math.isfinite(h["loss"]) for h in hist) and agree > 0.5
    print("OK" if ok else "FAILED: non-finite loss or logits far from fp32")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
