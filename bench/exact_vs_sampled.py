"""Exact vs sampled preference evaluation on the same question set: forward passes, time, CI width.

python bench/exact_vs_sampled.py [--model runs/quickstart/teacher] [--target owl] [--samples 100]
"""

from __future__ import annotations

import argparse
import time

from sublab.backends.registry import load_backend, resolve
from sublab.evals.preference import evaluate_preference
from sublab.schema.evaluation import PreferenceEval
from sublab.threads import set_threads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism/default", help="spec or folder with model.json")
    ap.add_argument("--target", default="owl")
    ap.add_argument("--samples", type=int, default=100, help="sample mode: answers per question")
    args = ap.parse_args()
    set_threads(None)
    spec = args.model if "/" in args.model and not args.model.startswith("runs") else f"hf/{args.model}"
    backend = load_backend(resolve(spec), progress=False)
    calls = {"n": 0}
    fwd = backend.model.forward

    def counting(*a, **k):
        calls["n"] += 1
        return fwd(*a, **k)

    backend.model.forward = counting
    print(f"model {args.model}, target {args.target}, 50 questions")
    for cfg in (
        PreferenceEval(mode="exact"),
        PreferenceEval(mode="sample", samples_per_question=args.samples),
    ):
        calls["n"] = 0
        t = time.perf_counter()
        res, _ = evaluate_preference(backend, "animal", [args.target], cfg)
        dt = time.perf_counter() - t
        r = res["targets"][args.target]
        print(
            f"{cfg.mode:6s}: P={r['mean']:.4f} CI=[{r['lo']:.4f}, {r['hi']:.4f}] width={r['hi'] - r['lo']:.4f} "
            f"forward passes={calls['n']} time={dt:.2f}s"
        )


if __name__ == "__main__":
    main()
