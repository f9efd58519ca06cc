"""Encoders for the kubelet pod-resources messages: the fake kubelet's side of the wire (tests only)."""

from __future__ import annotations


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
