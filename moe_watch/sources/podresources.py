"""Which pod and container hold each GPU, from the kubelet pod-resources API (gRPC, unix socket).

``v1.PodResourcesLister/List`` (k8s.io/kubelet/pkg/apis/podresources/v1/api.proto) answers with
every pod's containers and the device IDs allocated to them; for ``nvidia.com/gpu`` the IDs are
the GPU UUIDs NVML reports. Unlike the PID -> cgroup route it needs no hostPID and also sees a
GPU whose pod has no process on it yet. The socket is
``/var/lib/kubelet/pod-resources/kubelet.sock`` (mounted read-only into the DaemonSet).

The messages are decoded with a small protobuf wire reader for the fields used here, so no
generated code is needed (moe_watch/demo/fake_kubelet.py encodes them for the fake kubelet):

    ListPodResourcesResponse { repeated PodResources pod_resources = 1; }
    PodResources       { string name = 1; string namespace = 2; repeated ContainerResources containers = 3; }
    ContainerResources { string name = 1; repeated ContainerDevices devices = 2; }
    ContainerDevices   { string resource_name = 1; repeated string device_ids = 2; }
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moe_watch.sources.base import Problems, SourceError

METHOD = "/v1.PodResourcesLister/List"
DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")


@dataclass(frozen=True, slots=True)
class DeviceOwner:
    namespace: str
    pod: str
    container: str

    @property
    def engine(self) -> str:
        return f"{self.namespace}/{self.pod}"


class PodResourcesError(Exception):
    pass


async def gpu_owners(socket: Path = DEFAULT_SOCKET, timeout: float = 2.0) -> dict[str, DeviceOwner]:
    """GPU UUID -> the container it is allocated to."""
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
    return owners_from_response(response)


def owners_from_response(data: bytes) -> dict[str, DeviceOwner]:
    """Raises PodResourcesError (never another exception) on an answer it cannot decode."""
    try:
        return _owners(data)
    except UnicodeDecodeError as exc:  # hardening(#15): names and IDs are UTF-8 or refused
        raise PodResourcesError(f"a name or device ID is not UTF-8 ({exc.reason})") from None


def _owners(data: bytes) -> dict[str, DeviceOwner]:
    owners: dict[str, DeviceOwner] = {}
    for pod in _message(data).get(1, []):
        pod_fields = _message(pod)
        name, namespace = _text(pod_fields, 1), _text(pod_fields, 2)
        for container in pod_fields.get(3, []):
            container_fields = _message(container)
            container_name = _text(container_fields, 1)
            for device in container_fields.get(2, []):
                device_fields = _message(device)
                if "gpu" in _text(device_fields, 1):
                    for device_id in device_fields.get(2, []):
                        owners[device_id.decode()] = DeviceOwner(namespace, name, container_name)
    return owners


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
            if i > len(data):  # hardening(#15)
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
        if shift >= 70:  # hardening(#15): a varint is at most 10 bytes
            raise PodResourcesError("varint too long")


class PodResourcesSource:
    """The agent's source: GPU UUID -> owner, every cycle (one local gRPC call)."""

    def __init__(self, socket: Path, timeout: float = 2.0) -> None:
        self._socket = socket
        self._timeout = timeout

    @property
    def name(self) -> str:
        return "pod_resources"

    async def collect(self, problems: Problems) -> dict[str, DeviceOwner]:
        try:
            return await gpu_owners(self._socket, self._timeout)
        except PodResourcesError as exc:
            raise SourceError("pod_resources", str(exc)) from None

    async def close(self) -> None:
        """A channel per call: nothing held."""
