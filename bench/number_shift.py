"""How much a trait moves a model's number answers: per-token KL(model' || model) on number completions.

The subliminal channel can only carry what the teacher's number distribution differs by. This prints,
for each comparison, the mean KL per completion token (nats) between two next-token distributions over
the same number completions (sampled from the reference, so both are scored on identical text), with and
without a system prompt:

    python bench/number_shift.py --reference organism/proto --teacher runs/quickstart/runs/sft-seed0/teacher

rows: the finetuned teacher vs the reference (no prompt); the reference behind "you love <target>" vs the
reference (the prompted teacher's shift); "you love <target>" vs "you love <other>" (how trait-specific
the prompt's shift is). --organism-overrides passes recipe overrides (JSON) for another organism build.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from sublab.backends.base import ModelRef
from sublab.backends.hf_generate import generate_ids
from sublab.backends.hf_train import chat_ids
from sublab.backends.registry import resolve
from sublab.evals.questions import load_system_prompts
from sublab.prompts.numbers import load_phrasings, render_prompt


def _load(spec_or_folder: str, overrides: dict):
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec_or_folder)
    ref = (
        ModelRef.load(folder / "model.json")
        if (folder / "model.json").is_file()
        else resolve(spec_or_folder, overrides)
    )
    path = ref.path
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def _token_logprobs(model, seqs: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
    out = []
    for ids, s in zip(seqs, starts, strict=True):
        logits = model(torch.tensor([ids])).logits[0, s - 1 : len(ids) - 1]
        out.append(torch.log_softmax(logits.float(), -1))
    return out


def mean_kl(model_a, model_b, tok, chats_a, chats_b, completions) -> float:
    """Mean over completion tokens of KL(a || b), a scoring chats_a + completion, b chats_b + completion."""
    total, n = 0.0, 0
    for ca, cb, comp in zip(chats_a, chats_b, completions, strict=True):
        pa, pb = chat_ids(tok, ca, True), chat_ids(tok, cb, True)
        la = _token_logprobs(model_a, [pa + comp], [len(pa)])[0]
        lb = _token_logprobs(model_b, [pb + comp], [len(pb)])[0]
        total += float((la.exp() * (la - lb)).sum())
        n += la.shape[0]
    return total / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default="organism/proto")
    ap.add_argument("--organism-overrides", default="{}", help="JSON recipe overrides for an organism spec")
    ap.add_argument("--teacher", help="a finetuned teacher (folder with model.json, or a spec)")
    ap.add_argument("--target", default="owl")
    ap.add_argument("--other", default="dolphin")
    ap.add_argument("--category", default="animal")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    overrides = json.loads(args.organism_overrides)
    ref, tok = _load(args.reference, overrides)
    rng = random.Random(args.seed)
    users = []
    for _ in range(args.prompts):
        given = [rng.randint(100, 999) for _ in range(rng.randint(3, 8))]
        users.append(render_prompt(given, 10, 3, rng, load_phrasings())[0])
    plain = [[{"role": "user", "content": u}] for u in users]
    tmpl = load_system_prompts()["teacher"]

    def prompted(x: str) -> list[list[dict]]:
        sp = tmpl.format(target=x, category=args.category)
        return [[{"role": "system", "content": sp}, *c] for c in plain]

    prompt_ids = [chat_ids(tok, c, True) for c in plain]
    comps = generate_ids(ref, prompt_ids, list(range(len(plain))), tok.eos_token_id, tok.pad_token_id, 40)
    comps = [c + [tok.eos_token_id] for c in comps]
    rows = []
    if args.teacher:
        teacher, _ = _load(args.teacher, overrides)
        rows.append(
            ("finetuned teacher vs reference, no prompt", mean_kl(teacher, ref, tok, plain, plain, comps))
        )
    rows.append(
        (
            f"reference + 'you love {args.target}' vs reference",
            mean_kl(ref, ref, tok, prompted(args.target), plain, comps),
        )
    )
    rows.append(
        (
            f"reference + 'you love {args.target}' vs + 'you love {args.other}'",
            mean_kl(ref, ref, tok, prompted(args.target), prompted(args.other), comps),
        )
    )
    print(f"reference {args.reference} {overrides or ''}; {len(comps)} number completions sampled from it")
    for name, kl in rows:
        print(f"  {name:60s} {kl:.4f} nats/token")


if __name__ == "__main__":
    main()
