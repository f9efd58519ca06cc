"""The standing adversary against the real agent process: for every declared limit and every
boundary where it is checked, hypothesis generates inputs at the limit and past it; the hostile
engine serves them (answers, plugin files, EPLB log lines, the command line on its GPU, SGLang
dumps and recorder answers; the Kubernetes API its pod lists, watch lines and token), or raw
clients attack the agent's own server (connections, headers, unread answers, passwords), while
a good engine runs beside it. During an attack /healthz answers within its bound and RSS stays
under its bound; after each example the invariants hold: the process is alive,
/healthz answers within a bound, the good engine's and its GPU's series are present and equal to
the control taken before any hostility, an input past a limit is counted under
``moe_watch_collect_errors_total`` with the limit's reason (one at the limit is not), RSS and the
cycle's duration stay under their bounds. At the end SIGTERM ends the agent within
``shutdown_timeout_seconds``.

One agent for the whole module; between examples the hostile inputs are reset and the next
example's are applied, and each example is judged over one whole cycle that started after it
was applied (inputs read once, like dumps and pod lists, are counted from just before it was
applied). Every strategy runs twice, once filtered to inputs at the limit and once past it, so
both sides are checked every run. ``MOE_WATCH_ADVERSARY_EXAMPLES`` sets the examples per side
(CI: one fixed, derandomized example; set it for a longer local run, which also draws new inputs)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.adversary.boundaries import STRATEGIES, Case
from tests.adversary.world import NEIGHBOUR_PID, Samples, World, engines, get, parse
from tests.hostile.conftest import AgentProcess, running_agent

EXAMPLES = int(os.environ.get("MOE_WATCH_ADVERSARY_EXAMPLES", "0")) or None
ADVERSARY = settings(
    max_examples=EXAMPLES or 1,  # per side
    deadline=None,
    derandomize=EXAMPLES is None,  # CI: the same inputs every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)  # fmt: skip

ROOT = Path(__file__).resolve().parents[2]
PROBE_SECONDS = 1.0  # the kubelet's default probe timeout


def reset_peak_rss(agent: AgentProcess) -> None:
    """Start the process's VmHWM afresh (Linux: 5 to clear_refs), so each case is judged by its
    own peak, not by the highest of every case before it."""
    with open(f"/proc/{agent.process.pid}/clear_refs", "w") as stream:
        stream.write("5")


def chart_memory_limit() -> int:
    """resources.limits.memory of the shipped chart's values, in bytes."""
    values = yaml.safe_load((ROOT / "charts" / "moe-watch" / "values.yaml").read_text())
    quantity = str(values["resources"]["limits"]["memory"])
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]]


# The chart's memory limit: past it the kubelet kills the agent, and every engine of the node
# goes unwatched (the agent idles at ~60-85 MB).
RSS_BOUND = chart_memory_limit()
CYCLE_BOUND = 2.0  # seconds; a clean cycle here takes ~20 ms
SHUTDOWN_SECONDS = 3.0
CYCLE_WAIT = 30.0  # seconds to wait for the next cycle before failing


ONCE = ("eplb", "sglang", "kube")  # boundaries whose input is read once, not every cycle


@dataclass
class Adversary:
    agent: AgentProcess
    world: World
    control: Samples
    seen: dict[str, dict[str, int]] = field(default_factory=dict)  # limit -> side -> examples
    worst_rss: int = 0  # the highest peak RSS of one case
    worst_rss_by: str = ""  # the limit of that case
    worst_now: int = 0  # the highest RSS after a case
    worst_cycle: float = 0.0

    def status(self) -> dict[str, Any]:
        body, _ = get(self.agent.url + "/status", 5)
        doc: dict[str, Any] = json.loads(body)
        return doc

    def cycle_after(self, cycle: int) -> dict[str, Any]:
        """/status once a cycle later than ``cycle`` has completed (bounded wait)."""
        deadline = time.monotonic() + CYCLE_WAIT
        while time.monotonic() < deadline:
            assert self.agent.process.poll() is None, self.agent.lines[-20:]
            doc = self.status()
            if doc.get("cycle", -1) > cycle:
                return doc
            time.sleep(0.02)  # polls the condition; cycles start 100 ms apart
        raise AssertionError(f"no cycle after {cycle} within {CYCLE_WAIT:g}s")


def good_samples(samples: Samples) -> Samples:
    return {
        key: value
        for key, value in samples.items()
        if dict(key[1]).get("engine") == "good" or dict(key[1]).get("gpu") == "0"
    }


def errors(doc: dict[str, Any]) -> dict[tuple[str, str], int]:
    return {
        (source["source"], reason): count
        for source in doc["sources"]
        for reason, count in source["errors_total"].items()
    }


@pytest.fixture(scope="module")
def adversary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Adversary]:
    root = tmp_path_factory.mktemp("adversary")
    with engines() as running:
        world = World(root, running)
        env = {"ADVERSARY_NEIGHBOUR_PID": str(NEIGHBOUR_PID),
               "ADVERSARY_PROC_ROOT": str(world.proc_root),
               "ADVERSARY_SERVICE_ACCOUNT": str(world.service_account)}  # fmt: skip
        with running_agent(root, world.settings(), env=env,
                           module="tests.adversary.agent_main") as agent:  # fmt: skip
            world.agent_url = agent.url
            probe = Adversary(agent, world, {})
            first = probe.cycle_after(2)  # expert windows and rates need a few cycles
            probe.cycle_after(first["cycle"] + 4)
            probe.control = good_samples(parse(get(agent.url + "/metrics", 5)[0].decode()))
            assert probe.control, "the good engine exports nothing"
            yield probe
            elapsed = agent.stop(SHUTDOWN_SECONDS)
            assert elapsed < SHUTDOWN_SECONDS + 0.5, elapsed
            print(f"\nadversary: {probe.seen}; RSS after a case up to {probe.worst_now / 2**20:.0f} MiB, "
                  f"peak within one case {probe.worst_rss / 2**20:.0f} MiB ({probe.worst_rss_by}), "
                  f"worst cycle {probe.worst_cycle:.3f} s, SIGTERM -> exit {elapsed:.2f} s")  # fmt: skip


def wait_until(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CYCLE_WAIT
    while not ready():
        assert time.monotonic() < deadline, f"not {what} within {CYCLE_WAIT:g}s"
        time.sleep(0.02)  # polls the condition


def judge(adversary: Adversary, case: Case) -> None:
    world, agent = adversary.world, adversary.agent
    world.reset()
    # Discovery lists on its own task: the reset's empty list is taken (and the previous
    # example's refusals counted) before the count starts.
    wait_until(lambda: world.kube_listed(world.reset_generation), "listed after the reset")
    adversary.cycle_after(adversary.status()["cycle"])
    ahead = adversary.status()  # read once (log lines, dumps, lists): may count at once
    reset_peak_rss(agent)
    case.apply(world)
    if case.attack is not None:
        with case.attack(world):  # the kubelet's probe and the memory bound hold during it
            _, took = get(agent.url + "/healthz", PROBE_SECONDS)
            assert took < PROBE_SECONDS
            assert agent.rss_bytes() < RSS_BOUND
    if case.settled is not None:
        settled = case.settled
        wait_until(lambda: settled(world), f"served {case!r}")
    applied = adversary.status()["cycle"]
    before = adversary.cycle_after(applied + 1)  # the first cycle wholly after the change...
    after = adversary.cycle_after(before["cycle"])  # ...has completed
    assert agent.process.poll() is None, agent.lines[-20:]
    _, took = get(agent.url + "/healthz", PROBE_SECONDS)
    assert took < PROBE_SECONDS
    text = get(agent.url + "/metrics", 5)[0].decode()
    samples = parse(text)
    if case.expect is not None:
        case.expect(samples)
    good = good_samples(samples)
    assert good == adversary.control, {
        k: (adversary.control.get(k), good.get(k))
        for k in adversary.control.keys() | good.keys()
        if adversary.control.get(k) != good.get(k)
    }
    if case.reason is not None:
        key = (case.source, case.reason)
        start = ahead if case.boundary in ONCE else before
        counted = errors(after).get(key, 0) - errors(start).get(key, 0)
        if case.past:
            assert counted >= 1, (key, errors(after))
            exported = samples.get(
                ("moe_watch_collect_errors_total",
                 frozenset({("source", case.source), ("reason", case.reason)})), 0.0
            )  # fmt: skip
            assert exported >= errors(after)[key]
        else:
            assert counted == 0, (key, errors(after))
    # The case's own peak (VmHWM, reset before it), however short: what the kubelet holds to
    # the memory limit; and the resident memory after it.
    peak = agent.rss_bytes("VmHWM")
    if peak > adversary.worst_rss:
        adversary.worst_rss, adversary.worst_rss_by = peak, case.limit
    rss = agent.rss_bytes()
    adversary.worst_now = max(adversary.worst_now, rss)
    assert peak < RSS_BOUND, (peak, case.note)
    assert rss < RSS_BOUND, (rss, case.note)
    cycle = after["cycle_duration_seconds"]
    adversary.worst_cycle = max(adversary.worst_cycle, cycle)
    assert cycle < CYCLE_BOUND, cycle
    sides = adversary.seen.setdefault(case.limit, {})
    side = "past" if case.past else "at"
    sides[side] = sides.get(side, 0) + 1


ENTRIES = [
    (limit, boundary, side, strategy)
    for limit, entries in STRATEGIES.items()
    for boundary, strategy in entries
    for side in ("at", "past")  # both sides of every limit, every run
]


@pytest.mark.parametrize(
    ("limit", "boundary", "side", "strategy"), ENTRIES,
    ids=[f"{e[0]}-{e[1]}-{e[2]}" for e in ENTRIES],
)  # fmt: skip
@ADVERSARY
@given(data=st.data())
def test_the_agent_holds_at_and_past_the_limit(
    adversary: Adversary, limit: str, boundary: str, side: str,
    strategy: st.SearchStrategy[Case], data: st.DataObject,
) -> None:  # fmt: skip
    case = data.draw(strategy.filter(lambda c: c.past == (side == "past")))
    assert case.limit == limit
    judge(adversary, case)


def test_strategies_cover_every_limit() -> None:
    from moe_watch import limits
    from tests.adversary.boundaries import EXEMPT

    assert not set(STRATEGIES) & set(EXEMPT)
    assert set(STRATEGIES) | set(EXEMPT) == set(limits.LIMITS)
    assert all(reason.strip() for reason in EXEMPT.values())
