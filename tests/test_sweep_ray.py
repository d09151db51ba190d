"""The Ray executor: same results as the local executor on a tiny sweep, Ray listening on loopback only,
and clear errors for unreachable clusters. Ray's gRPC servers bind every interface of a host, so the
Ray sweep runs in a network namespace this test creates (only `lo` inside); `ss -tlnp` polled inside
it during the sweep must show loopback addresses only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sublab.errors import SublabError
from sublab.records import read_json
from sublab.sweep.local import run_sweep

pytest.importorskip("ray")

LOOPBACK = ("127.", "[::ffff:127.", "[::1]")


def _can_unshare() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip") and shutil.which("ss")):
        return False
    r = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare --net (root) to keep Ray off the network")
def test_ray_matches_local_and_listens_on_loopback_only(tiny_organism, cache_dir, sweep_file, tmp_path):
    local = run_sweep(sweep_file, out=tmp_path / "local", progress=False)
    sublab = Path(sys.executable).with_name("sublab")
    ss_log = tmp_path / "ss.log"
    script = (
        "ip link set lo up; "
        f"'{sublab}' sweep '{sweep_file}' --executor ray --workers 2 --out '{tmp_path / 'ray'}' & p=$!; "
        f"while kill -0 $p 2>/dev/null; do ss -tlnpH >> '{ss_log}'; sleep 0.3; done; wait $p"
    )
    env = {**os.environ, "SUBLAB_CACHE": str(cache_dir), "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run(
        ["unshare", "--net", "bash", "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_json(local / "sweep_results.json"), read_json(tmp_path / "ray" / "sweep_results.json")
    assert a["effects"] == b["effects"] and a["runs"] == b["runs"]
    state = read_json(tmp_path / "ray" / "sweep.json")
    assert state["executor"] == "ray" and state["ray"]["version"]
    assert state["counts"]["done"] == 2
    listening = [line.split()[3] for line in ss_log.read_text().splitlines() if line.strip()]
    assert any("raylet" in line or "gcs_server" in line for line in ss_log.read_text().splitlines())
    assert listening and all(addr.startswith(LOOPBACK) for addr in listening), sorted(set(listening))


def test_unreachable_ray_address_is_a_clear_error(sweep_file, tmp_path):
    with pytest.raises(SublabError, match="cannot reach a Ray cluster at 127.0.0.1:1"):
        run_sweep(sweep_file, out=tmp_path / "o", progress=False, executor="ray", address="127.0.0.1:1")
    with pytest.raises(SublabError, match="not 'auto' or host:port"):
        run_sweep(sweep_file, out=tmp_path / "o", progress=False, executor="ray", address="nowhere")
