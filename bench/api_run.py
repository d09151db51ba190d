"""A whole experiment through the OpenAI-compatible API, with faults and a kill, measured.

Starts `sublab serve organism/<preset> --faults 0.2` (20% of /v1/ requests answered 429 + Retry-After,
500, or dropped after the work is done), runs configs/api-quickstart.yaml against it (teacher and
students are fine-tuning jobs; sampling and the exact evaluation are chat completions), SIGKILLs the
run while the student's fine-tuning job is queued on the server, reruns the same command, and prints:
requests, injected faults (= client retries), jobs created (3 expected: teacher, student, control; the
rerun reattaches instead of creating a 4th), the exactly-once check (every prompt answered once, and
the reference arm equal to local sampling with the same request seeds), and wall times.

    python bench/api_run.py                      # organism/default, 3000 prompts (~3-4 min on 2 cores)
    python bench/api_run.py --preset tiny --prompts 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, what: str, poll: float = 0.2):
    t_end = time.time() + timeout
    while time.time() < t_end:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", help="organism preset served (default, tiny)")
    ap.add_argument("--prompts", type=int, default=3000)
    ap.add_argument("--faults", type=float, default=0.2)
    ap.add_argument(
        "--job-delay", type=float, default=5.0, help="seconds each job waits queued on the server"
    )
    ap.add_argument("--out", default="runs/api-bench")
    args = ap.parse_args()

    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "SUBLAB_THREADS": os.environ.get("SUBLAB_THREADS", "1")}
    env.pop("SUBLAB_SERVE_API_KEY", None)
    port = free_port()
    serve_cmd = [sys.executable, "-m", "sublab.cli", "serve", f"organism/{args.preset}", "--port", str(port)]
    serve_cmd += ["--state-dir", str(out / "serve-state"), "--faults", str(args.faults)]
    serve_cmd += ["--job-delay", str(args.job_delay), "--retry-after", "0.05"]
    server = subprocess.Popen(
        serve_cmd, env=env, stdout=open(out / "serve.log", "w"), stderr=subprocess.STDOUT
    )
    root = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return httpx.get(f"{root}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return server.poll() is not None and sys.exit(f"server died: {(out / 'serve.log').read_text()}")

    try:
        wait_for(healthy, 600, "sublab serve (it builds the organism on first use)")
        run_dir = out / "run"
        run_cmd = [sys.executable, "-m", "sublab.cli", "run", str(ROOT / "configs/api-quickstart.yaml")]
        run_cmd += [
            "--out",
            str(run_dir),
            "--set",
            f"api.base_url={root}/v1",
            "--set",
            "api.poll_interval_s=0.5",
        ]
        run_cmd += ["--set", f"prompts.count={args.prompts}", "--set", f"filter.dataset_size={args.prompts}"]
        run_cmd += ["--set", "api.backoff_s=0.05", "--set", f"reference=openai/organism/{args.preset}"]
        t0 = time.time()
        with open(out / "run1.log", "w") as log:
            first = subprocess.Popen(run_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

            def student_job():
                if first.poll() is not None:
                    sys.exit(
                        f"the run ended before its student job (rc {first.returncode}); see {out / 'run1.log'}"
                    )
                p = run_dir / "student/job.json"
                return p.is_file() and json.loads(p.read_text()).get("job_id")

            job_id = wait_for(student_job, 1800, "the student's fine-tuning job")
            first.send_signal(signal.SIGKILL)
            first.wait()
        t_kill = time.time() - t0
        status = httpx.get(f"{root}/v1/fine_tuning/jobs/{job_id}", timeout=10)
        killed_status = (
            status.json().get("status") if status.status_code == 200 else f"({status.status_code})"
        )
        print(f"killed the run {t_kill:.1f} s in, while job {job_id} was {killed_status}")
        t1 = time.time()
        with open(out / "run2.log", "w") as log:
            rc = subprocess.run(run_cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        t_rerun = time.time() - t1
        if rc != 0:
            sys.exit(f"rerun failed (rc {rc}); see {out / 'run2.log'}")
        stats = httpx.get(f"{root}/sublab/stats", timeout=10).json()
    finally:
        server.terminate()
        server.wait(timeout=30)

    # exactly once: every prompt answered once per arm; the reference arm equals local sampling
    from sublab.backends.hf import HFBackend
    from sublab.backends.registry import resolve
    from sublab.config import load_config
    from sublab.records import read_json, read_jsonl
    from sublab.schema import ExperimentConfig

    cfg = load_config(run_dir / "config.yaml", ExperimentConfig)
    prompts = read_jsonl(run_dir / "data/prompts.jsonl")
    once = {}
    for arm in ("data", "control/data"):
        idx = sorted(r["metadata"]["prompt_index"] for r in read_jsonl(run_dir / arm / "raw.jsonl"))
        once[arm] = idx == list(range(len(prompts)))
    local = HFBackend(resolve(f"organism/{args.preset}", {"seed": cfg.seed}, progress=False), progress=False)
    want = local.generate([p["messages"] for p in prompts], cfg.sample, list(range(len(prompts))))
    got = [r["messages"][-1]["content"] for r in read_jsonl(run_dir / "control/data/raw.jsonl")]
    same = sum(a == b for a, b in zip(got, want, strict=True))
    jobs = [
        json.loads((run_dir / n / "job.json").read_text())["job_id"]
        for n in ("teacher", "student", "control")
    ]
    faults = stats["faults"]
    total = stats["requests"] + faults["429"] + faults["500"]  # 429/500 never reach the app
    res = read_json(run_dir / "results.json")
    t = res["trait"]["target"]
    print(f"server: organism/{args.preset}, faults {args.faults:.0%}; {args.prompts} prompts per arm")
    print(f"wall time: {t_kill:.1f} s until the kill + {t_rerun:.1f} s rerun = {t_kill + t_rerun:.1f} s")
    print(f"requests: {total} to /v1/, of which {sum(faults.values())} failed by injection and were retried")
    print(
        f"  (429: {faults['429']}, 500: {faults['500']}, dropped: {faults['drop']}); chat completions served:"
    )
    print(f"  {stats['chat_completions']} in {stats['engine']['batches']} engine batches")
    print(
        f"fine-tuning jobs created: {stats['jobs_created']} (teacher, student, control; the rerun reattached"
    )
    print(f"  to {job_id}: {jobs[1] == job_id})")
    print(
        f"exactly once: teacher arm {once['data']}, control arm {once['control/data']}; reference arm equal"
    )
    print(f"  to local sampling with the same seeds: {same}/{len(want)} (the rest: float rounding of another")
    print("  batch composition flips a draw that sits on a boundary)")
    for name in ("reference", "teacher", "control", "student"):
        p = res["models"][name]["p_target"]
        print(f"P({t}) {name:10s} {p['mean']:.3f} [{p['lo']:.3f}, {p['hi']:.3f}]")
    ok = stats["jobs_created"] == 3 and all(once.values()) and same >= 0.99 * len(want) and jobs[1] == job_id
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
