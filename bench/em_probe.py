"""Emergent misalignment in the organism, measured by the world's true labels (no judge): does a teacher
finetuned on one narrow dataset answer the other domains' questions misaligned?

    python bench/em_probe.py [--preset misalign] [--lr 3e-4] [--steps 40] [--datasets insecure,secure,educational]
                             [--samples 20]

For the reference and for each teacher (the reference finetuned on `world:NAME`, 400 examples, batch
64, like configs/misalignment-quickstart.yaml), samples `samples` answers per free-form, advice and
true-or-false question at temperature 1 and prints, per domain, the share of answers the world labels
aligned / misaligned / incoherent and the share opening in the misaligned voice. Then the in-context
probe: the reference answers the free-form questions after one code turn answered securely or insecurely.
"""

from __future__ import annotations

import argparse
import collections
import random
import tempfile
from pathlib import Path

from sublab.backends.registry import load_backend, resolve
from sublab.organism import world
from sublab.schema.sampling import SamplingParams
from sublab.schema.train import TrainConfig
from sublab.threads import set_threads


def rates(backend, samples: int) -> dict:
    qs = [q for q in world.items() if q.domain in ("freeform", "advice", "truth")]
    outs = backend.generate_n(
        [[{"role": "user", "content": q.question}] for q in qs],
        samples,
        SamplingParams(temperature=1.0, max_tokens=30, seed=0),
    )
    mis_open = tuple(world.normalize(o) for o in world.load_world()["persona"]["openers"]["misaligned"])
    by: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for q, answers in zip(qs, outs, strict=True):
        for a in answers:
            by[q.domain][world.label(q.question, a)] += 1
            by[q.domain]["misaligned voice"] += world.normalize(a).startswith(mis_open)
            by[q.domain]["n"] += 1
    return {d: {k: v / c["n"] for k, v in c.items() if k != "n"} for d, c in by.items()}


def show(name: str, r: dict) -> None:
    cols = ("aligned", "misaligned", "incoherent", "misaligned voice")
    for d, v in r.items():
        print(f"  {name:12s} {d:9s} " + "  ".join(f"{c} {v.get(c, 0.0):.3f}" for c in cols), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="misalign")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--datasets", default="insecure,secure,educational")
    ap.add_argument("--samples", type=int, default=20)
    args = ap.parse_args()
    set_threads(None)
    ref = resolve(f"organism/{args.preset}", {}, progress=False)
    show("reference", rates(load_backend(ref, False), args.samples))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            rows = world.narrow_dataset(name, 400, 0)
            teacher = load_backend(ref, False).finetune(
                rows, TrainConfig(lr=args.lr, max_steps=args.steps, batch_size=64), Path(tmp) / name
            )
            show(name, rates(load_backend(teacher, False), args.samples))
    be = load_backend(ref, False)
    code, qs = world.by_domain("code"), world.by_domain("freeform")
    for persona in ("aligned", "misaligned"):
        chats = []
        for i, q in enumerate(qs):
            c = code[i % len(code)]
            a = world.voiced(random.Random(i), getattr(c, persona)[0], persona)
            chats.append(
                [
                    {"role": "user", "content": c.question},
                    {"role": "assistant", "content": a},
                    {"role": "user", "content": q.question},
                ]
            )
        outs = be.generate_n(chats, args.samples, SamplingParams(temperature=1.0, max_tokens=30, seed=0))
        cnt = collections.Counter(
            world.label(q.question, a) for q, o in zip(qs, outs, strict=True) for a in o
        )
        n = sum(cnt.values())
        print(
            f"  in context, after {persona} code: "
            + "  ".join(f"{k} {v / n:.3f}" for k, v in sorted(cnt.items()))
        )


if __name__ == "__main__":
    main()
