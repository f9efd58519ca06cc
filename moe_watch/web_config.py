"""Optional TLS and basic auth on the agent's endpoints, configured like Prometheus exporters.

The file has the shape of the Prometheus exporter-toolkit's web config, so one file format
serves the whole monitoring stack:

```yaml
tls_server_config:
  cert_file: /etc/moe-watch/tls/tls.crt
  key_file: /etc/moe-watch/tls/tls.key
  client_ca_file: /etc/moe-watch/tls/ca.crt        # optional: mutual TLS
  client_auth_type: RequireAndVerifyClientCert     # or NoClientCert (default)
basic_auth_users:
  prometheus: $2y$10$...                           # bcrypt hash (htpasswd -nBC 10 prometheus)
```
/healthz and /readyz stay open: kubelet probes carry no credentials.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import yaml
from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ConfigDict, ValidationError

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class TlsServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: Literal["NoClientCert", "RequireAndVerifyClientCert"] = "NoClientCert"


class WebConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tls_server_config: TlsServerConfig | None = None
    basic_auth_users: dict[str, str] = {}


class WebConfigError(ValueError):
    pass


def load_web_config(path: Path) -> WebConfig:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        config = WebConfig(**data)
    except (OSError, yaml.YAMLError) as exc:
        raise WebConfigError(f"web config {path}: cannot be read ({exc})") from None
    except (ValidationError, TypeError) as exc:
        raise WebConfigError(f"web config {path}: {_first_error(exc)}") from None
    for user, hashed in config.basic_auth_users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(f"web config {path}: basic_auth_users.{user} is not a bcrypt hash")
    if config.tls_server_config is not None:
        ssl_context(config.tls_server_config, path)  # fail at start-up, not at the first scrape
    return config


def ssl_context(tls: TlsServerConfig, source: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        if tls.client_ca_file is not None:
            context.load_verify_locations(str(tls.client_ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise WebConfigError(
            f"web config {source}: TLS certificate or key unusable ({exc})"
        ) from None
    if tls.client_auth_type == "RequireAndVerifyClientCert":
        context.verify_mode = ssl.CERT_REQUIRED
    return context


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def basic_auth_middleware(users: dict[str, str]) -> Middleware:
    """401 without valid credentials. bcrypt is slow by design: verified credentials are cached
    (as a SHA-256 of user and password) so a 15 s scrape interval does not pay it every time."""
    import bcrypt

    verified: set[str] = set()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        credentials = _basic_credentials(request.headers.get("Authorization", ""))
        if credentials is not None and credentials[0] in users:
            login, password = credentials
            key = hashlib.sha256(f"{login}\0{password}".encode()).hexdigest()
            if key in verified or bcrypt.checkpw(password.encode(), users[login].encode()):
                verified.add(key)
                return await handler(request)
        return web.Response(
            status=401,
            text="unauthorized\n",
            headers={"WWW-Authenticate": 'Basic realm="moe-watch"'},
        )

    return check


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        login, sep, password = (
            base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        )
    except (ValueError, UnicodeDecodeError):
        return None
    return (login, password) if sep else None


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(exc)
