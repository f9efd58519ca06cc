"""A fake kubelet pod-resources API: the real gRPC method on a unix socket, as the fake NVML stands
in for the driver, and the encoder of its answer (ListPodResourcesResponse, the fields
moe_watch/sources/podresources.py reads; tests/sources/test_podresources.py checks these bytes
against the real protobuf library).

``moe-watch demo --pod NAMESPACE/POD`` serves the simulated GPUs' allocation to that pod from one,
so the agent's real ``PodResourcesSource`` names their Kubernetes owner; the tests serve bytes made
by the real protobuf library from one.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from moe_watch.sources.podresources import METHOD

GPU_RESOURCE = "nvidia.com/gpu"


def gpu_allocation(namespace: str, pod: str, container: str, gpu_uuids: list[str]) -> bytes:
    """A ListPodResourcesResponse giving ``gpu_uuids`` to one container of one pod."""
    return encode_response([(namespace, pod, [(container, [(GPU_RESOURCE, gpu_uuids)])])])


def encode_response(
    pods: list[tuple[str, str, list[tuple[str, list[tuple[str, list[str]]]]]]],
) -> bytes:
    """ListPodResourcesResponse bytes: [(namespace, pod, [(container, [(resource, [ids])])])]."""
    out = b""
    for namespace, pod, containers in pods:
        body = _field(1, pod.encode()) + _field(2, namespace.encode())
        for cname, devices in containers:
            cbody = _field(1, cname.encode())
            for resource, ids in devices:
                cbody += _field(
                    2, _field(1, resource.encode()) + b"".join(_field(2, i.encode()) for i in ids)
                )
            body += _field(3, cbody)
        out += _field(1, body)
    return out


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class FakeKubelet:
    """``v1.PodResourcesLister/List`` on ``unix://socket``, answering ``payload`` (settable)."""

    def __init__(self, socket: Path, payload: bytes) -> None:
        self.socket = socket
        self.payload = payload
        self._server: grpc.aio.Server | None = None

    async def _list(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self.payload

    async def start(self) -> FakeKubelet:
        service, method = METHOD.strip("/").split("/")
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            self._list, request_deserializer=bytes, response_serializer=bytes
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {method: handler}),)
        )
        server.add_insecure_port(f"unix://{self.socket}")
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None
