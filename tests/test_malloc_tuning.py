"""With glibc's thresholds fixed, memory freed after large transient buffers goes back to the
system; with its default (dynamic) thresholds it stays with the process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moe_watch.malloc_tuning import fix_malloc_thresholds

# A 16 MiB buffer freed (glibc then serves blocks up to 16 MiB from its heap), then eight
# 8 MiB buffers, each followed by a small block that lives on (as the agent's own objects do),
# freed: what stays resident? The heap cannot give back holes below a live block.
SCRIPT = """
import sys
from moe_watch.malloc_tuning import fix_malloc_thresholds
if sys.argv[1] == "fixed":
    assert fix_malloc_thresholds()
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
before = rss()
big = b"x" * (16 << 20)  # written: resident, unlike a calloc'd buffer
del big
buffers, kept = [], []
for _ in range(8):
    buffers.append(b"x" * (8 << 20))
    kept.append(b"k" * (200 << 10))
del buffers
print(rss() - before)
"""


def kept(mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=60
    )
    return int(run.stdout)


@pytest.mark.skipif(not fix_malloc_thresholds(), reason="no glibc mallopt here")
def test_freed_buffers_go_back_with_the_thresholds_fixed() -> None:
    assert kept("default") >= 32 << 20  # the problem: the freed buffers stay resident
    assert kept("fixed") < 8 << 20
