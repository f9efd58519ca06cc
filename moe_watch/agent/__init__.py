"""The agent: one cycle collects every source, derives signals and publishes a Snapshot.

- ``cycle``: the Agent (lifecycle, the cycle, the schedule, discovered targets);
- ``engine_target``: one engine and everything kept for it (runners, windows, plan, budget);
- ``ownership``: which engine owns each GPU (pure);
- ``assemble``: one record per engine, in one pass, and the one place a Snapshot is built;
- ``stages``: the boundary around each stage of an engine (one engine fails alone).
"""

from moe_watch.agent.cycle import Agent

__all__ = ["Agent"]
