"""In-cluster credentials for the Kubernetes API: the pod's service-account token and CA."""

from __future__ import annotations

import ssl
from pathlib import Path

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def in_cluster(directory: Path = SERVICE_ACCOUNT) -> tuple[dict[str, str], ssl.SSLContext | None]:
    """Headers and TLS context for the API server; empty outside a pod (e.g. a local proxy)."""
    token_file, ca_file = directory / "token", directory / "ca.crt"
    headers = (
        {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        if token_file.is_file()
        else {}
    )
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file.is_file() else None
    return headers, context
