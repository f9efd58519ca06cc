"""The kubelet's real pod-resources messages, built with google.protobuf from the vendored
``podresources_v1_api.proto`` (k8s.io/kubelet/pkg/apis/podresources/v1/api.proto, verbatim).

No protoc here: a small reader turns the proto3 message definitions (the only constructs that
file uses: ``message``, scalar and message fields, ``repeated``, ``optional``) into a
FileDescriptorProto; everything else (encoding, field numbers, nesting) is the real library's.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO = Path(__file__).with_name("podresources_v1_api.proto")
F = descriptor_pb2.FieldDescriptorProto
SCALARS = {"string": F.TYPE_STRING, "int64": F.TYPE_INT64, "uint64": F.TYPE_UINT64}
FIELD = re.compile(r"^(?:(repeated|optional)\s+)?(\w+)\s+(\w+)\s*=\s*(\d+)\s*;")


def parse(text: str) -> descriptor_pb2.FileDescriptorProto:
    text = re.sub(r"//[^\n]*", "", text)
    package = re.search(r"^package\s+(\w+)\s*;", text, re.M)
    assert package is not None
    f = descriptor_pb2.FileDescriptorProto(
        name="k8s.io/kubelet/podresources/v1/api.proto", package=package[1], syntax="proto3"
    )
    for name, body in re.findall(r"^message\s+(\w+)\s*\{(.*?)\}", text, re.M | re.S):
        message = f.message_type.add(name=name)
        for line in body.splitlines():
            match = FIELD.match(line.strip())
            if not match:
                assert not line.strip(), f"unexpected line in message {name}: {line!r}"
                continue
            label, ftype, fname, number = match.groups()
            field = message.field.add(
                name=fname,
                number=int(number),
                label=F.LABEL_REPEATED if label == "repeated" else F.LABEL_OPTIONAL,
            )
            if ftype in SCALARS:
                field.type = SCALARS[ftype]  # type: ignore[assignment]
            else:
                field.type = F.TYPE_MESSAGE
                field.type_name = f".{package[1]}.{ftype}"
            if label == "optional":  # proto3 explicit presence: a synthetic oneof
                field.proto3_optional = True
                field.oneof_index = len(message.oneof_decl)
                message.oneof_decl.add(name=f"_{fname}")
    return f


@cache
def messages() -> dict[str, Any]:
    """Message name -> class, e.g. ``messages()["ListPodResourcesResponse"]()``."""
    f = parse(PROTO.read_text())
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return {
        m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{f.package}.{m.name}"))
        for m in f.message_type
    }
