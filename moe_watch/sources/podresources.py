"""Which pod and container hold each GPU, or each share of one, from the kubelet pod-resources
API (gRPC, unix socket ``/var/lib/kubelet/pod-resources/kubelet.sock``, mounted read-only).

``v1.PodResourcesLister/List`` (k8s.io/kubelet/pkg/apis/podresources/v1/api.proto) answers with
every pod's containers, the device-plugin device IDs allocated to them and (Kubernetes 1.34+,
DRA) the devices of their resource claims. Unlike the PID -> cgroup route it needs no hostPID
and also sees a GPU whose pod has no process on it yet. ``Get`` answers the same for one pod:
the agent wants every pod of the node each cycle, so one ``List`` is the cheaper call.

What the NVIDIA device plugin and DRA driver allocate, and which GPU it is on (``Allocation``):

    nvidia.com/gpu               GPU-<uuid>                 a whole GPU            -> its UUID
    nvidia.com/gpu[.shared]      GPU-<uuid>::<replica>      time-slicing / MPS     -> the UUID before ::
    nvidia.com/mig-<profile>     MIG-<uuid>[::<replica>]    a MIG device           -> its parent GPU (NVML
                                                                                     lists each GPU's MIG UUIDs)
    (old MIG ID format)          MIG-GPU-<uuid>/<gi>/<ci>   a MIG device           -> GPU-<uuid>
    DRA, driver gpu.nvidia.com   gpu-<minor>                a whole GPU            -> the GPU with that minor
                                 gpu-<minor>-mig-<p>-<s>-<n>  a MIG device           number (/dev/nvidia<minor>)

The kubelet's device ID (and for DRA ``<driver>/<pool>/<device>``, plus ``::<share_id>`` for a
shared claim) is kept as ``device_id``: the ``k8s_device_id`` label of ``gpu_allocation_info``.

Codec: the messages are decoded with a small protobuf wire reader for the fields used here,
not with stubs generated from api.proto. DRA adds three nested messages (DynamicResource,
ClaimResource, CDIDevice), which the reader walks like the others; generated stubs would add
protobuf (and a protoc step, or vendored generated code pinned to one protobuf major) to the
agent's image for five string fields. moe_watch/demo/fake_kubelet.py encodes them for the demo's fake kubelet; tests/sources/
builds the kubelet's real messages from
the vendored api.proto with google.protobuf and checks the reader against them, so a field
renumbering upstream fails a test rather than mislabelling GPUs. Fields read:

    ListPodResourcesResponse { repeated PodResources pod_resources = 1; }
    PodResources       { string name = 1; string namespace = 2; repeated ContainerResources containers = 3; }
    ContainerResources { string name = 1; repeated ContainerDevices devices = 2;
                         repeated DynamicResource dynamic_resources = 5; }
    ContainerDevices   { string resource_name = 1; repeated string device_ids = 2; }
    DynamicResource    { string claim_name = 2; string claim_namespace = 3;
                         repeated ClaimResource claim_resources = 4; }
    ClaimResource      { repeated CDIDevice cdi_devices = 1; string driver_name = 2;
                         string pool_name = 3; string device_name = 4; optional string share_id = 5; }
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moe_watch.sources.base import Problems, SourceError

METHOD = "/v1.PodResourcesLister/List"
DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
DRA_GPU_DRIVERS = frozenset({"gpu.nvidia.com"})  # NVIDIA's DRA driver (k8s-dra-driver-gpu)
_DRA_GPU = re.compile(r"^gpu-(?P<minor>\d+)(?:-mig-\d+-\d+-\d+)?$")
_OLD_MIG = re.compile(r"^MIG-(?P<gpu>GPU-[0-9A-Fa-f-]+)/\d+/\d+$")


@dataclass(frozen=True, slots=True)
class DeviceOwner:
    namespace: str
    pod: str
    container: str

    @property
    def engine(self) -> str:
        return f"{self.namespace}/{self.pod}"


@dataclass(frozen=True, slots=True)
class Allocation:
    """One GPU device (whole, a time-slice replica, a MIG device, a DRA device) and its owner.

    Exactly one of ``gpu_uuid``, ``mig_uuid``, ``minor`` says which physical GPU it is on.
    """

    device_id: str
    resource: str  # the device-plugin resource name, or the DRA driver name
    owner: DeviceOwner
    gpu_uuid: str | None = None
    mig_uuid: str | None = None
    minor: int | None = None


class PodResourcesError(Exception):
    pass


async def gpu_allocations(
    socket: Path = DEFAULT_SOCKET, timeout: float = 2.0
) -> tuple[Allocation, ...]:
    """Every GPU device the kubelet allocated on this node, with its container."""
    import grpc

    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        call = channel.unary_unary(
            METHOD, request_serializer=lambda _: b"", response_deserializer=bytes
        )
        try:
            response: bytes = await call(None, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise PodResourcesError(
                f"kubelet pod-resources at {socket}: {exc.code().name}: {exc.details()}"
            ) from None
    return allocations_from_response(response)


def allocations_from_response(data: bytes) -> tuple[Allocation, ...]:
    """Raises PodResourcesError (never another exception) on an answer it cannot decode."""
    try:
        return _allocations(data)
    except UnicodeDecodeError as exc:  # names and IDs are UTF-8 or refused
        raise PodResourcesError(f"a name or device ID is not UTF-8 ({exc.reason})") from None


def _allocations(data: bytes) -> tuple[Allocation, ...]:
    found: list[Allocation] = []
    for pod in _message(data).get(1, []):
        pod_fields = _message(pod)
        name, namespace = _text(pod_fields, 1), _text(pod_fields, 2)
        for container in pod_fields.get(3, []):
            container_fields = _message(container)
            owner = DeviceOwner(namespace, name, _text(container_fields, 1))
            for device in container_fields.get(2, []):
                device_fields = _message(device)
                resource = _text(device_fields, 1)
                if "gpu" in resource or resource.startswith("nvidia.com/mig-"):
                    for raw in device_fields.get(2, []):
                        found.append(_plugin_device(raw.decode(), resource, owner))
            for claim in container_fields.get(5, []):
                for resource_bytes in _message(claim).get(4, []):
                    allocation = _dra_device(_message(resource_bytes), owner)
                    if allocation is not None:
                        found.append(allocation)
    return tuple(found)


def _plugin_device(device_id: str, resource: str, owner: DeviceOwner) -> Allocation:
    physical = device_id.split("::", 1)[0]  # time-slicing / MPS replicas: <id>::<n>
    old_mig = _OLD_MIG.match(physical)
    if old_mig:
        return Allocation(device_id, resource, owner, gpu_uuid=old_mig["gpu"])
    if physical.startswith("MIG-"):
        return Allocation(device_id, resource, owner, mig_uuid=physical)
    return Allocation(device_id, resource, owner, gpu_uuid=physical)


def _dra_device(fields: dict[int, list[bytes]], owner: DeviceOwner) -> Allocation | None:
    driver, pool, device = _text(fields, 2), _text(fields, 3), _text(fields, 4)
    match = _DRA_GPU.match(device)
    if driver not in DRA_GPU_DRIVERS or not match:
        return None  # another driver's device, or a GPU passed through to a VM (gpu-vfio-N)
    device_id = f"{driver}/{pool}/{device}"
    if 5 in fields:  # a shared (consumable-capacity) allocation of the device
        device_id += f"::{_text(fields, 5)}"
    return Allocation(device_id, driver, owner, minor=int(match["minor"]))


def _message(data: bytes) -> dict[int, list[bytes]]:
    """The length-delimited fields (strings, sub-messages) of one message, by field number."""
    fields: dict[int, list[bytes]] = {}
    for number, value in _fields(data):
        if isinstance(value, bytes):
            fields.setdefault(number, []).append(value)
    return fields


def _text(fields: dict[int, list[bytes]], number: int) -> str:
    values = fields.get(number)
    return values[-1].decode() if values else ""  # proto3: the last value of a field wins


def _fields(data: bytes) -> Iterator[tuple[int, bytes | int]]:
    """(field number, value) of one message; skips what it does not use, rejects truncation."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            yield field, value
        elif wire == 2:
            length, i = _varint(data, i)
            if i + length > len(data):
                raise PodResourcesError("truncated protobuf message")
            yield field, data[i : i + length]
            i += length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            if i > len(data):
                raise PodResourcesError("truncated protobuf message")
        else:
            raise PodResourcesError(f"unsupported protobuf wire type {wire}")


def _varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(data):
            raise PodResourcesError("truncated varint")
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7
        if shift >= 70:  # a varint is at most 10 bytes
            raise PodResourcesError("varint too long")


class PodResourcesSource:
    """The agent's source: the GPU allocations of the node, every cycle (one local gRPC call)."""

    def __init__(self, socket: Path, timeout: float = 2.0) -> None:
        self._socket = socket
        self._timeout = timeout

    @property
    def name(self) -> str:
        return "pod_resources"

    async def collect(self, problems: Problems) -> tuple[Allocation, ...]:
        try:
            return await gpu_allocations(self._socket, self._timeout)
        except PodResourcesError as exc:
            raise SourceError("pod_resources", str(exc)) from None

    async def close(self) -> None:
        """A channel per call: nothing held."""
