"""cgroup paths as the kubelet writes them: v1 and v2, cgroupfs and systemd drivers, containerd,
CRI-O and Docker."""

from __future__ import annotations

import pytest

from moe_watch.sources.cgroup import PodRef, parse_cgroup

UID = "3f2a1b7c-1234-4d5e-8f90-abcdef012345"
CID = "8b1a9953c4611296a827abf8c47804d7e6c49c6b3f0c7b0d7d5c1e0a9f8e7d6c"
U = UID.replace("-", "_")


@pytest.mark.parametrize(
    ("content", "container"),
    [
        # cgroup v1, cgroupfs driver, containerd/docker: one line per controller
        (
            f"12:memory:/kubepods/burstable/pod{UID}/{CID}\n11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n",
            CID,
        ),
        # cgroup v1, systemd driver, containerd
        (
            f"11:cpu,cpuacct:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U}.slice/cri-containerd-{CID}.scope\n",
            CID,
        ),
        # cgroup v2, systemd driver, containerd, BestEffort
        (
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U}.slice/cri-containerd-{CID}.scope\n",
            CID,
        ),
        # cgroup v2, CRI-O, Guaranteed (no QoS slice)
        (f"0::/kubepods.slice/kubepods-pod{U}.slice/crio-{CID}.scope\n", CID),
        # cgroup v2, Docker with the systemd driver
        (
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U}.slice/docker-{CID}.scope\n",
            CID,
        ),
        # cgroup v2, cgroupfs driver
        (f"0::/kubepods/besteffort/pod{UID}/{CID}\n", CID),
        # the pod-level cgroup itself (the sandbox): pod known, no container
        (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U}.slice\n", None),
    ],
)
def test_real_cgroup_paths_name_the_pod_and_container(content: str, container: str | None) -> None:
    assert parse_cgroup(content) == PodRef(UID, container)


@pytest.mark.parametrize(
    "content",
    [
        "0::/user.slice/user-1000.slice/session-3.scope\n",
        "0::/system.slice/containerd.service\n",
        "",
        "garbage",
    ],
)
def test_processes_outside_kubernetes_have_no_pod(content: str) -> None:
    assert parse_cgroup(content) is None
