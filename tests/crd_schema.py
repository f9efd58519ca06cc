"""Offline validation of Prometheus Operator objects against the CRDs' own OpenAPI v3 schemas
(tests/crds/, vendored with their provenance), as strictly as `kubectl apply --validate=strict`:
a field the schema does not declare is an error, as in kubernetes_validate's strict mode.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS = Path(__file__).with_name("crds")


def _strict(schema: Any) -> Any:
    """Close every object schema that lists its properties (unknown fields become errors)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        if out.get("x-kubernetes-int-or-string"):
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def validator(kind: str) -> jsonschema.protocols.Validator:
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            schema = _strict(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: the API server's
            return jsonschema.Draft7Validator(schema)
    raise KeyError(f"no vendored CRD for {kind}")


def validate(obj: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when ``obj`` breaks its CRD's schema."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1", obj["apiVersion"]
    errors = sorted(validator(obj["kind"]).iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        raise errors[0]
