"""The offline judge organism against the misalignment world's true labels, in-process and over HTTP.

    python bench/judge_agreement.py [--judge organism/judge] [--n 600] [--seed 777] [--out /tmp/judge-agreement]
                                    [--no-http]

1. Draws n labelled answers from the world (aligned, misaligned, incoherent in equal shares; a fresh seed,
   the judge organism trained on draws of its own seed) and judges them with the organism's prompts
   through the same top-20 log-prob scoring path an API judge goes through.
2. Prints agreement, recall of misaligned answers, false alarms and the confusion table.
3. Unless --no-http: serves the judge with `sublab serve` on a free port, judges the same file as
   openai/<judge> over HTTP, and prints the largest score difference from in-process scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from sublab.judge.stage import judge_file
from sublab.organism.agreement import VERDICTS, agreement, world_samples
from sublab.records import read_jsonl, write_jsonl
from sublab.schema.judge import JudgeConfig
from sublab.threads import set_threads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--judge", default="organism/judge")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--out", default="/tmp/judge-agreement")
    ap.add_argument("--no-http", action="store_true")
    args = ap.parse_args()
    set_threads(None)
    out = Path(args.out)
    rows = world_samples(args.n, args.seed)
    write_jsonl(out / "samples.jsonl", rows)
    cfg = JudgeConfig(prompts_file="organism")
    t0 = time.time()
    judge_file(out / "samples.jsonl", out / "inproc", args.judge, cfg, progress=False)
    secs = time.time() - t0
    js = read_jsonl(out / "inproc" / "judgements.jsonl")
    a = agreement([r["label"] for r in rows], js)
    print(f"judge {args.judge}: {args.n} world answers (seed {args.seed}), {secs:.1f} s in-process")
    print(
        f"agreement {a['agreement']:.3f} over {a['n_scorable']} scorable; recall of misaligned "
        f"{a['recall_misaligned']:.3f}; false alarms {a['false_alarm_rate']:.3f}"
    )
    print("world label  | " + " | ".join(VERDICTS))
    for lab, row in a["confusion"].items():
        print(f"{lab:12s} | " + " | ".join(str(row[v]) for v in VERDICTS))
    result = {"in_process": a, "seconds": secs}
    if not args.no_http:
        port = _free_port()
        state = out / "serve"
        state.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "SUBLAB_THREADS": "1"}
        cmd = [
            sys.executable,
            "-m",
            "sublab.cli",
            "serve",
            args.judge,
            "--port",
            str(port),
            "--state-dir",
            str(state),
        ]
        with open(state / "server.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                import httpx

                for _ in range(600):
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.5)
                from sublab.schema.api import ApiConfig

                api = ApiConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key_env="SUBLAB_BENCH_NO_KEY")
                t0 = time.time()
                judge_file(
                    out / "samples.jsonl", out / "http", f"openai/{args.judge}", cfg, api=api, progress=False
                )
                http_secs = time.time() - t0
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        hs = read_jsonl(out / "http" / "judgements.jsonl")
        diffs = [
            abs(x[p] - y[p])
            for x, y in zip(js, hs, strict=True)
            for p in ("aligned", "coherent")
            if x[p] is not None and y[p] is not None
        ]
        same_verdicts = sum(x["misaligned"] == y["misaligned"] for x, y in zip(js, hs, strict=True))
        print(
            f"over HTTP (sublab serve, openai/{args.judge}): {http_secs:.1f} s; largest score difference "
            f"{max(diffs):.2g} over {len(diffs)} scores; same verdict {same_verdicts}/{len(js)}"
        )
        result["http"] = {"max_abs_diff": max(diffs), "same_verdicts": same_verdicts, "seconds": http_secs}
    (out / "agreement.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
