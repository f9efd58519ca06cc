"""The kubelet pod-resources API: moe-watch's wire codec against the kubelet's real messages
(built by google.protobuf from the vendored api.proto), for whole GPUs, time-slicing, MIG and
DRA, and a fake kubelet serving the real gRPC method on a unix socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from moe_watch.agent.ownership import gpu_allocations, gpu_owners, sole_owner
from moe_watch.demo.fake_kubelet import FakeKubelet, encode_response
from moe_watch.samples import GpuSample
from moe_watch.sources.podresources import (
    Allocation,
    DeviceOwner,
    PodResourcesError,
    allocations_from_response,
)
from moe_watch.sources.podresources import (
    gpu_allocations as kubelet_allocations,
)
from tests.sources.podresources_proto import PROTO, messages, parse

GPU0 = "GPU-00000000-0000-4000-8000-000000000000"
GPU1 = "GPU-00000000-0000-4000-8000-000000000001"
GPU2 = "GPU-00000000-0000-4000-8000-000000000002"
GPU3 = "GPU-00000000-0000-4000-8000-000000000003"
MIG_A = "MIG-11111111-1111-4111-8111-111111111111"
MIG_B = "MIG-22222222-2222-4222-8222-222222222222"
VLLM = DeviceOwner("llm", "mixtral-0", "vllm")


def response() -> Any:
    return messages()["ListPodResourcesResponse"]()


def whole_gpus() -> Any:
    r = response()
    pod = r.pod_resources.add(name="mixtral-0", namespace="llm")
    vllm = pod.containers.add(name="vllm")
    vllm.cpu_ids.extend([2, 3])  # fields the client does not read are skipped
    vllm.memory.add(memory_type="memory", size=1 << 30).topology.nodes.add(ID=0)
    devices = vllm.devices.add(resource_name="nvidia.com/gpu", device_ids=[GPU0, GPU1])
    devices.topology.nodes.add(ID=1)
    vllm.devices.add(resource_name="hugepages-2Mi", device_ids=["x"])
    other = r.pod_resources.add(name="exporter", namespace="monitoring")
    other.containers.add(name="agent")
    return r


def test_the_reader_knows_the_field_numbers_of_the_vendored_kubelet_api_proto() -> None:
    """The docstring's field table is what the real api.proto says (a renumbering fails here)."""
    fields = {
        (m.name, f.name): f.number for m in parse(PROTO.read_text()).message_type for f in m.field
    }
    assert fields[("ListPodResourcesResponse", "pod_resources")] == 1
    assert fields[("PodResources", "containers")] == 3
    assert fields[("ContainerResources", "devices")] == 2
    assert fields[("ContainerResources", "dynamic_resources")] == 5
    assert fields[("ContainerDevices", "device_ids")] == 2
    assert fields[("DynamicResource", "claim_resources")] == 4
    assert (fields[("ClaimResource", "driver_name")], fields[("ClaimResource", "pool_name")]) == (
        2,
        3,
    )
    assert (fields[("ClaimResource", "device_name")], fields[("ClaimResource", "share_id")]) == (
        4,
        5,
    )


def test_whole_gpus_from_the_real_message() -> None:
    real = whole_gpus()
    assert allocations_from_response(real.SerializeToString()) == (
        Allocation(GPU0, "nvidia.com/gpu", VLLM, gpu_uuid=GPU0),
        Allocation(GPU1, "nvidia.com/gpu", VLLM, gpu_uuid=GPU1),
    )
    ours = encode_response([("llm", "mixtral-0", [("vllm", [("nvidia.com/gpu", [GPU0, GPU1])])])])
    parsed = type(real)()
    parsed.ParseFromString(ours)
    assert parsed.pod_resources[0].containers[0].devices[0].device_ids == [GPU0, GPU1]
    with pytest.raises(PodResourcesError, match="truncated"):
        allocations_from_response(real.SerializeToString()[:-3])


def test_time_sliced_replicas_map_to_their_gpu() -> None:
    """Time-slicing / MPS: the device plugin hands out GPU-<uuid>::<replica> (renamed or not)."""
    r = response()
    for n, (pod, resource) in enumerate(
        [
            ("chat-a", "nvidia.com/gpu"),
            ("chat-b", "nvidia.com/gpu"),
            ("chat-c", "nvidia.com/gpu.shared"),
        ]
    ):
        container = r.pod_resources.add(name=pod, namespace="llm").containers.add(name="vllm")
        container.devices.add(resource_name=resource, device_ids=[f"{GPU0}::{n}"])
    found = allocations_from_response(r.SerializeToString())
    assert [(a.device_id, a.gpu_uuid, a.owner.pod) for a in found] == [
        (f"{GPU0}::0", GPU0, "chat-a"),
        (f"{GPU0}::1", GPU0, "chat-b"),
        (f"{GPU0}::2", GPU0, "chat-c"),
    ]
    assert found[2].resource == "nvidia.com/gpu.shared"


def test_mig_devices_map_to_their_parent_gpu_through_nvml_s_mig_uuids() -> None:
    r = response()
    a = r.pod_resources.add(name="small-a", namespace="llm").containers.add(name="vllm")
    a.devices.add(resource_name="nvidia.com/mig-1g.10gb", device_ids=[MIG_A])
    b = r.pod_resources.add(name="small-b", namespace="llm").containers.add(name="vllm")
    b.devices.add(resource_name="nvidia.com/mig-3g.40gb", device_ids=[MIG_B])
    old = r.pod_resources.add(name="legacy", namespace="llm").containers.add(name="vllm")
    old.devices.add(resource_name="nvidia.com/gpu", device_ids=[f"MIG-{GPU2}/1/0"])
    found = allocations_from_response(r.SerializeToString())
    assert [(x.device_id, x.mig_uuid, x.gpu_uuid) for x in found] == [
        (MIG_A, MIG_A, None),
        (MIG_B, MIG_B, None),
        (f"MIG-{GPU2}/1/0", None, GPU2),  # the old MIG ID format names its parent GPU
    ]
    gpus = [
        GpuSample(index=0, uuid=GPU0, name="H100", up=True),
        GpuSample(index=1, uuid=GPU1, name="H100", up=True, mig_uuids=(MIG_A, MIG_B)),
        GpuSample(index=2, uuid=GPU2, name="H100", up=True),
    ]
    per_gpu = gpu_allocations(gpus, found)
    assert sorted(per_gpu) == [1, 2]
    assert [x.owner.pod for x in per_gpu[1]] == ["small-a", "small-b"]
    assert sole_owner(per_gpu[1]) is None  # shared by two pods: no single owner
    assert sole_owner(per_gpu[2]) == DeviceOwner("llm", "legacy", "vllm")


def test_dra_claims_map_to_the_gpu_with_that_minor_number() -> None:
    """DRA (resource.k8s.io, NVIDIA's gpu.nvidia.com driver): gpu-<minor>, gpu-<minor>-mig-..."""
    r = response()
    pod = r.pod_resources.add(name="deepseek-0", namespace="llm")
    vllm = pod.containers.add(name="vllm")
    claim = vllm.dynamic_resources.add(claim_name="deepseek-0-gpus", claim_namespace="llm")
    for device in ("gpu-3", "gpu-2-mig-9-4-2"):
        resource = claim.claim_resources.add(
            driver_name="gpu.nvidia.com", pool_name="ip-10-0-1-5", device_name=device
        )
        resource.cdi_devices.add(name=f"k8s.gpu.nvidia.com/claim=5f1c-{device}")
    shared = vllm.dynamic_resources.add(claim_name="shared", claim_namespace="llm")
    shared.claim_resources.add(
        driver_name="gpu.nvidia.com", pool_name="ip-10-0-1-5", device_name="gpu-0", share_id="a1"
    )
    other = vllm.dynamic_resources.add(claim_name="nic", claim_namespace="llm")
    other.claim_resources.add(
        driver_name="sriovnetwork.k8snetworkplumbingwg.io", device_name="gpu-1"
    )
    other.claim_resources.add(driver_name="gpu.nvidia.com", device_name="gpu-vfio-0")
    found = allocations_from_response(r.SerializeToString())
    assert [(a.device_id, a.resource, a.minor) for a in found] == [
        ("gpu.nvidia.com/ip-10-0-1-5/gpu-3", "gpu.nvidia.com", 3),
        ("gpu.nvidia.com/ip-10-0-1-5/gpu-2-mig-9-4-2", "gpu.nvidia.com", 2),
        ("gpu.nvidia.com/ip-10-0-1-5/gpu-0::a1", "gpu.nvidia.com", 0),
    ]
    assert {a.owner for a in found} == {DeviceOwner("llm", "deepseek-0", "vllm")}
    # minor numbers need not follow the NVML index; a GPU without one matches no DRA device
    gpus = [
        GpuSample(index=0, uuid=GPU0, name="H100", up=True, minor=3),
        GpuSample(index=1, uuid=GPU1, name="H100", up=True, minor=2),
        GpuSample(index=2, uuid=GPU2, name="H100", up=True, minor=None),
        GpuSample(index=3, uuid=GPU3, name="H100", up=True, minor=0),
    ]
    per_gpu = gpu_allocations(gpus, found)
    assert {i: [a.device_id.rsplit("/", 1)[1] for a in v] for i, v in per_gpu.items()} == {
        0: ["gpu-3"],
        1: ["gpu-2-mig-9-4-2"],
        3: ["gpu-0::a1"],
    }
    no_minors = [replace(gpu, minor=None) for gpu in gpus]  # NVML without minor numbers
    per_gpu = gpu_allocations(no_minors, found)
    assert {i: len(v) for i, v in per_gpu.items()} == {0: 1, 2: 1, 3: 1}


def test_a_gpu_shared_by_two_engines_gets_its_engine_from_elsewhere() -> None:
    gpus = [GpuSample(index=0, uuid=GPU0, name="H100", up=True)]
    shared = (
        Allocation(f"{GPU0}::0", "nvidia.com/gpu", DeviceOwner("llm", "a", "vllm"), gpu_uuid=GPU0),
        Allocation(f"{GPU0}::1", "nvidia.com/gpu", DeviceOwner("llm", "b", "vllm"), gpu_uuid=GPU0),
    )
    per_gpu = gpu_allocations(gpus, shared)
    owners = gpu_owners(gpus, declared=[], kubelet=per_gpu, pod_engines={}, processes={})
    assert owners == {}
    single = gpu_allocations(gpus, shared[:1])
    owners = gpu_owners(gpus, declared=[], kubelet=single, pod_engines={}, processes={})
    assert owners == {0: "llm/a"}


@pytest.fixture
async def kubelet(tmp_path: Path) -> AsyncIterator[Path]:
    """A fake kubelet: the real gRPC method, the real message bytes, on a unix socket."""
    socket = tmp_path / "kubelet.sock"
    r = whole_gpus()
    # the node also runs time-sliced and MIG and DRA workloads
    ts = r.pod_resources.add(name="chat-a", namespace="llm").containers.add(name="vllm")
    ts.devices.add(resource_name="nvidia.com/gpu", device_ids=[f"{GPU2}::0"])
    ts = r.pod_resources.add(name="chat-b", namespace="llm").containers.add(name="vllm")
    ts.devices.add(resource_name="nvidia.com/gpu", device_ids=[f"{GPU2}::1"])
    mig = r.pod_resources.add(name="small", namespace="llm").containers.add(name="vllm")
    mig.devices.add(resource_name="nvidia.com/mig-1g.10gb", device_ids=[MIG_A])
    dra = r.pod_resources.add(name="deepseek-0", namespace="llm").containers.add(name="vllm")
    dra.dynamic_resources.add(claim_name="c", claim_namespace="llm").claim_resources.add(
        driver_name="gpu.nvidia.com", pool_name="node-a", device_name="gpu-7"
    )
    server = await FakeKubelet(socket, r.SerializeToString()).start()
    yield server.socket
    await server.stop()


async def test_gpu_allocations_over_grpc(kubelet: Path) -> None:
    found = await kubelet_allocations(kubelet)
    assert [a.device_id for a in found if a.owner == VLLM] == [GPU0, GPU1]
    assert len(found) == 6


async def test_no_kubelet_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        PodResourcesError, match=r"kubelet pod-resources at .*absent\.sock: UNAVAILABLE"
    ):
        await kubelet_allocations(tmp_path / "absent.sock", timeout=1.0)


async def test_the_agent_labels_gpus_with_the_pods_the_kubelet_allocated_them_to(
    kubelet: Path,
) -> None:
    from moe_watch.agent import Agent
    from moe_watch.config import load_settings
    from moe_watch.demo.fake_nvml import FakeGpu, FakeNvml
    from tests.test_agent import exposition

    nvml = FakeNvml(
        [
            FakeGpu(0, uuid=GPU0, minor=4),
            FakeGpu(1, uuid=GPU1, minor=5),
            FakeGpu(2, uuid=GPU2, minor=6),  # time-sliced between chat-a and chat-b
            FakeGpu(3, minor=0, mig_uuids=[MIG_A, MIG_B]),  # one MIG device in use
            FakeGpu(4, minor=7),  # DRA gpu-7
            FakeGpu(5, minor=1),  # free
        ]
    )
    config = load_settings(None, nvml="auto", pod_resources_socket=str(kubelet))
    async with Agent(config, nvml=nvml) as agent:
        snap = await agent.run_cycle()
    owners = {view.sample.index: view.engine for view in snap.gpus}
    assert owners == {
        0: "llm/mixtral-0",
        1: "llm/mixtral-0",
        2: None,  # shared by two engines
        3: "llm/small",
        4: "llm/deepseek-0",
        5: None,
    }
    series = exposition(snap)
    info = {
        labels["gpu"]: labels
        for name, labels in map(lambda s: (s[0], dict(s[1])), series)
        if name == "moe_watch_gpu_info"
    }
    assert (info["1"]["k8s_pod_name"], info["1"]["k8s_container_name"]) == ("mixtral-0", "vllm")
    assert info["2"]["k8s_pod_name"] == ""  # time-sliced: see gpu_allocation_info
    allocations = sorted(
        (
            labels["gpu"],
            labels["k8s_device_id"],
            labels["k8s_resource_name"],
            labels["k8s_pod_name"],
        )
        for labels in (
            dict(labels) for name, labels in series if name == "moe_watch_gpu_allocation_info"
        )
    )
    assert allocations == [
        ("0", GPU0, "nvidia.com/gpu", "mixtral-0"),
        ("1", GPU1, "nvidia.com/gpu", "mixtral-0"),
        ("2", f"{GPU2}::0", "nvidia.com/gpu", "chat-a"),
        ("2", f"{GPU2}::1", "nvidia.com/gpu", "chat-b"),
        ("3", MIG_A, "nvidia.com/mig-1g.10gb", "small"),
        ("4", "gpu.nvidia.com/node-a/gpu-7", "gpu.nvidia.com", "deepseek-0"),
    ]
    assert next(s for s in snap.sources if s.name == "pod_resources").up
