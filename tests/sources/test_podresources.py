"""The kubelet pod-resources API: moe-watch's wire codec against the real protobuf library, and a
fake kubelet serving the real gRPC method on a unix socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from moe_watch.demo.fake_kubelet import FakeKubelet, gpu_allocation
from moe_watch.sources.podresources import (
    DeviceOwner,
    PodResourcesError,
    gpu_owners,
    owners_from_response,
)

GPU0 = "GPU-00000000-0000-4000-8000-000000000000"
GPU1 = "GPU-00000000-0000-4000-8000-000000000001"


def kubelet_messages() -> dict[str, Any]:
    """The messages of k8s.io/kubelet/pkg/apis/podresources/v1/api.proto this client reads."""
    f = descriptor_pb2.FileDescriptorProto(
        name="podresources_v1_test.proto", package="v1", syntax="proto3"
    )
    string, message, repeated, optional = (
        descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
        descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )

    def add(name: str, fields: list[tuple[str, int, int, int, str]]) -> None:
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = m.field.add(name=fname, number=number, type=ftype, label=label)  # type: ignore[arg-type]
            if type_name:
                field.type_name = type_name

    add(
        "ContainerDevices",
        [("resource_name", 1, string, optional, ""), ("device_ids", 2, string, repeated, "")],
    )
    add(
        "ContainerResources",
        [
            ("name", 1, string, optional, ""),
            ("devices", 2, message, repeated, ".v1.ContainerDevices"),
            ("cpu_ids", 3, 3, repeated, ""),
        ],
    )
    add(
        "PodResources",
        [
            ("name", 1, string, optional, ""),
            ("namespace", 2, string, optional, ""),
            ("containers", 3, message, repeated, ".v1.ContainerResources"),
        ],
    )
    add("ListPodResourcesResponse", [("pod_resources", 1, message, repeated, ".v1.PodResources")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"v1.{name}"))
        for name in ("ListPodResourcesResponse",)
    }


def real_response() -> Any:
    Response = kubelet_messages()["ListPodResourcesResponse"]
    response = Response()
    pod = response.pod_resources.add(name="mixtral-0", namespace="llm")
    vllm = pod.containers.add(name="vllm")
    vllm.cpu_ids.extend([2, 3])  # fields the client does not read are skipped
    vllm.devices.add(resource_name="nvidia.com/gpu", device_ids=[GPU0, GPU1])
    vllm.devices.add(resource_name="hugepages-2Mi", device_ids=["x"])
    other = response.pod_resources.add(name="exporter", namespace="monitoring")
    other.containers.add(name="agent")
    return response


def test_the_wire_codec_agrees_with_the_real_protobuf_library() -> None:
    real = real_response()
    assert owners_from_response(real.SerializeToString()) == {
        GPU0: DeviceOwner("llm", "mixtral-0", "vllm"),
        GPU1: DeviceOwner("llm", "mixtral-0", "vllm"),
    }
    ours = gpu_allocation("llm", "mixtral-0", "vllm", [GPU0, GPU1])
    parsed = type(real)()
    parsed.ParseFromString(ours)
    assert parsed.pod_resources[0].containers[0].devices[0].device_ids == [GPU0, GPU1]
    with pytest.raises(PodResourcesError, match="truncated"):
        owners_from_response(real.SerializeToString()[:-3])


@pytest.fixture
async def kubelet(tmp_path: Path) -> AsyncIterator[Path]:
    """A fake kubelet: the real gRPC method, the real message bytes, on a unix socket."""
    server = await FakeKubelet(
        tmp_path / "kubelet.sock", real_response().SerializeToString()
    ).start()
    yield server.socket
    await server.stop()


async def test_gpu_owners_over_grpc(kubelet: Path) -> None:
    owners = await gpu_owners(kubelet)
    assert owners[GPU1].engine == "llm/mixtral-0"
    assert owners[GPU1].container == "vllm"


async def test_no_kubelet_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        PodResourcesError, match=r"kubelet pod-resources at .*absent\.sock: UNAVAILABLE"
    ):
        await gpu_owners(tmp_path / "absent.sock", timeout=1.0)


async def test_the_agent_labels_gpus_with_the_pod_the_kubelet_allocated_them_to(
    kubelet: Path,
) -> None:
    from moe_watch.agent import Agent
    from moe_watch.config import load_settings
    from moe_watch.demo.fake_nvml import FakeGpu, FakeNvml
    from tests.test_agent import exposition

    nvml = FakeNvml([FakeGpu(0, uuid=GPU0), FakeGpu(1, uuid=GPU1), FakeGpu(2)])
    config = load_settings(None, nvml="auto", pod_resources_socket=str(kubelet))
    async with Agent(config, nvml=nvml) as agent:
        snap = await agent.run_cycle()
    owners = {view.sample.index: view.engine for view in snap.gpus}
    assert owners == {0: "llm/mixtral-0", 1: "llm/mixtral-0", 2: None}
    info = [dict(labels) for name, labels in exposition(snap) if name == "moe_watch_gpu_info"]
    gpu1 = next(labels for labels in info if labels["gpu"] == "1")
    assert (gpu1["k8s_namespace_name"], gpu1["k8s_pod_name"], gpu1["k8s_container_name"]) == (
        "llm",
        "mixtral-0",
        "vllm",
    )
    assert next(s for s in snap.sources if s.name == "pod_resources").up
