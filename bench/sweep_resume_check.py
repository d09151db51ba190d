"""Kill a sweep with SIGKILL after some of its runs finished, rerun it, and compare its aggregated
results with an uninterrupted sweep of the same file (the --reference folder).

    python bench/sweep_resume_check.py --reference runs/sweep-replicates [--sweep configs/sweep-replicates.yaml]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", default="configs/sweep-replicates.yaml")
    ap.add_argument("--reference", required=True, help="folder of an uninterrupted run of the same sweep")
    ap.add_argument("--out", default="runs/sweep-resume-check")
    ap.add_argument("--kill-after-runs", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "sublab.cli", "sweep", args.sweep, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_path = out / "sweep.json"
    while proc.poll() is None:
        if state_path.is_file():
            done = len(json.loads(state_path.read_text())["runs"])
            if done >= args.kill_after_runs:
                time.sleep(5)  # into the next run's stages
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                print(f"killed (SIGKILL) after {done} finished runs")
                break
        time.sleep(0.5)
    t = time.time()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    state = json.loads(state_path.read_text())
    print(
        f"rerun: exit {rc}, {time.time() - t:.0f} s; stages computed {state['counts']['stages_run']}, "
        f"already done (skipped) {state['counts']['stages_skipped']}, "
        f"copied from the shared store {state['counts']['stages_shared']}"
    )
    ref = json.loads((Path(args.reference) / "sweep_results.json").read_text())
    got = json.loads((out / "sweep_results.json").read_text())
    print(f"aggregated results equal the uninterrupted sweep: {ref['effects'] == got['effects']}")
    print(f"per-run P(target) equal: {ref['runs'] == [dict(r, folder=r['folder']) for r in got['runs']]}")


if __name__ == "__main__":
    main()
