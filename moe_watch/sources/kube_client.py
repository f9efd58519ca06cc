"""In-cluster credentials for the Kubernetes API: the pod's service-account token and CA.

Bound service-account tokens rotate (the kubelet rewrites the projected file about hourly; EKS
rejects a token older than 90 days), so the token is read on every connection
(``token_headers``), never once at start-up.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from moe_watch import limits
from moe_watch.sources.safe_io import read_regular

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_TOKEN_BYTES = limits.TOKEN_BYTES


def token_headers(directory: Path = SERVICE_ACCOUNT) -> dict[str, str]:
    """The Authorization header with the token as it is now; empty outside a pod."""
    token_file = directory / "token"
    if not token_file.exists():
        return {}
    # the projected file is a symlink (..data/token): followed; a regular file, bounded
    token = read_regular(token_file, MAX_TOKEN_BYTES, follow_symlinks=True).decode().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def ca_context(directory: Path = SERVICE_ACCOUNT) -> ssl.SSLContext | None:
    """TLS context trusting the cluster CA; None outside a pod (e.g. a local proxy)."""
    ca_file = directory / "ca.crt"
    return ssl.create_default_context(cafile=str(ca_file)) if ca_file.is_file() else None


def in_cluster(directory: Path = SERVICE_ACCOUNT) -> tuple[dict[str, str], ssl.SSLContext | None]:
    """Headers (the token as it is now) and TLS context for the API server."""
    return token_headers(directory), ca_context(directory)
