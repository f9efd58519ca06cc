"""Which pod and container a process belongs to, from /proc/<pid>/cgroup (v1 and v2).

The kubelet puts every container in a cgroup whose path names the pod UID and the container ID.
The spelling depends on the cgroup driver and the runtime:

    cgroupfs:  /kubepods/burstable/pod<uid>/<container-id>
    systemd:   /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/
               cri-containerd-<id>.scope | crio-<id>.scope | docker-<id>.scope

With hostPID the agent maps NVML's PIDs on each GPU to the pod holding that GPU (the reads are
``sources/proc.py``; this module only parses).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_CONTAINER = re.compile(
    r"^(?:cri-containerd-|crio-|docker-|containerd-)?([0-9a-f]{64})(?:\.scope)?$"
)


@dataclass(frozen=True, slots=True)
class PodRef:
    pod_uid: str
    container_id: str | None


def parse_cgroup(text: str) -> PodRef | None:
    """The pod (and container) in the content of /proc/<pid>/cgroup, or None outside Kubernetes."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2]
        pod = _POD.search(path)
        if pod is None:
            continue
        container = None
        last = path.rstrip("/").rsplit("/", 1)[-1]
        match = _CONTAINER.match(last)
        if match:
            container = match[1]
        return PodRef(pod[1].replace("_", "-"), container)
    return None
