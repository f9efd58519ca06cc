"""Optional TLS and basic auth on the agent's endpoints, configured like Prometheus exporters.

The file has the shape of the Prometheus exporter-toolkit's web config, so one file format
serves the whole monitoring stack:

```yaml
tls_server_config:
  cert_file: /etc/moe-watch/tls/tls.crt
  key_file: /etc/moe-watch/tls/tls.key
  client_ca_file: /etc/moe-watch/tls/ca.crt        # optional: mutual TLS
  client_auth_type: RequireAndVerifyClientCert     # or NoClientCert (default)
  min_version: TLS12                               # TLS12 (default) or TLS13
  max_version: TLS13                               # TLS12 or TLS13 (default)
  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]  # Go's names; TLS 1.2 only
  curve_preferences: [X25519]                      # one of CurveP256, CurveP384, CurveP521, X25519
  prefer_server_cipher_suites: true                # the default
basic_auth_users:
  prometheus: $2y$10$...                           # bcrypt hash (htpasswd -nBC 10 prometheus)
```
/healthz and /readyz stay open: kubelet probes carry no credentials. How the Go names map onto
OpenSSL, and what Python's ssl cannot do: ``moe_watch.serving.tls_options``. The certificate,
key and client CA are read again when they change on disk (``cert_reload``).

bcrypt is slow by design (~75 ms at cost 10), so it never runs on the event loop: checks run on
a small thread pool (``workers``), at most ``max_pending`` at a time (more get 429 at once), and
an unknown user is checked against a dummy hash of the same cost, so a wrong user name costs
what a wrong password costs (user names are not enumerable by timing). Hashes are validated at
load; a password over bcrypt's 72-byte limit is a 401.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import yaml
from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from moe_watch import limits
from moe_watch.serving import tls_options

TlsVersion = Literal["TLS10", "TLS11", "TLS12", "TLS13"]

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_BCRYPT = re.compile(r"^\$2[aby]\$(?P<cost>0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
MAX_PASSWORD_BYTES = limits.PASSWORD_BYTES  # bcrypt's: longer ones are refused, not truncated
_VERIFIED_MAX = 256


class TlsServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: Literal["NoClientCert", "RequireAndVerifyClientCert"] = "NoClientCert"
    min_version: TlsVersion = "TLS12"
    max_version: TlsVersion = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    curve_preferences: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True

    @field_validator("min_version", "max_version")
    @classmethod
    def _offered(cls, value: str) -> str:
        return tls_options.offered_version(value)

    @field_validator("cipher_suites")
    @classmethod
    def _known_ciphers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        tls_options.openssl_ciphers(value)
        return value

    @field_validator("curve_preferences")
    @classmethod
    def _one_curve(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        tls_options.openssl_curve(value)
        return value

    @model_validator(mode="after")
    def _coherent(self) -> TlsServerConfig:
        tls_options.version_order(self.min_version, self.max_version)
        if (
            self.cipher_suites
            and not tls_options.openssl_ciphers(self.cipher_suites)
            and self.min_version != "TLS13"
        ):
            raise ValueError(
                "cipher_suites lists only TLS 1.3 suites, which cannot be chosen (they are "
                "always on), leaving TLS 1.2 without any: add TLS 1.2 suites or set "
                "min_version: TLS13"
            )
        return self


class WebConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tls_server_config: TlsServerConfig | None = None
    basic_auth_users: dict[str, str] = {}


class WebConfigError(ValueError):
    pass


def load_web_config(path: Path) -> WebConfig:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise TypeError("expected a mapping at the top level")
        config = WebConfig(**data)
    except (OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            raise WebConfigError(f"web config {path}: {_first_error(exc)}") from None
        raise WebConfigError(
            f"web config {path}: cannot be read ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    except TypeError as exc:
        raise WebConfigError(f"web config {path}: {_first_error(exc)}") from None
    for user, hashed in config.basic_auth_users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(f"web config {path}: basic_auth_users.{user} is not a bcrypt hash")
        if not _valid_hash(hashed):
            raise WebConfigError(
                f"web config {path}: basic_auth_users.{user} is not a valid bcrypt hash "
                "(make one with htpasswd -nBC 10 USER)"
            )
    if config.tls_server_config is not None:
        ssl_context(config.tls_server_config, path)  # fail at start-up, not at the first scrape
    return config


def ssl_context(tls: TlsServerConfig, source: Path | None = None) -> ssl.SSLContext:
    """A server context with the certificate, key and client CA as they are on disk now."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = tls_options.VERSIONS[tls.min_version]
    context.maximum_version = tls_options.VERSIONS[tls.max_version]
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ciphers = tls_options.openssl_ciphers(tls.cipher_suites)
    for name in tls.cipher_suites:
        openssl_name = tls_options.CIPHERS.get(name)
        if openssl_name is None:
            continue  # a TLS 1.3 suite: always on
        try:  # one at a time, to name a suite this Python's OpenSSL lacks
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).set_ciphers(openssl_name)
        except ssl.SSLError:
            raise WebConfigError(
                f"web config {source}: cipher suite {name} ({openssl_name}) is not available "
                f"in this Python's {ssl.OPENSSL_VERSION}"
            ) from None
    if ciphers:
        context.set_ciphers(":".join(ciphers))
    curve = tls_options.openssl_curve(tls.curve_preferences)
    if curve is not None:
        context.set_ecdh_curve(curve)
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


def _valid_hash(hashed: str) -> bool:
    """The hash has bcrypt's shape and bcrypt accepts it (checked once, at load)."""
    import bcrypt

    if not _BCRYPT.match(hashed):
        return False
    try:
        bcrypt.checkpw(b"", hashed.encode())
    except ValueError:
        return False
    return True


def _cost(hashed: str) -> int:
    match = _BCRYPT.match(hashed)
    return int(match["cost"]) if match else 10


def basic_auth_middleware(
    users: dict[str, str],
    app: web.Application | None = None,
    *,
    workers: int = 2,
    max_pending: int = 16,
) -> Middleware:
    """401 without valid credentials. bcrypt runs on a bounded pool, never on the event loop;
    verified credentials are cached (a SHA-256 of user and password, at most 256 of them) so a
    15 s scrape interval does not pay it every time."""
    import bcrypt

    dummy = bcrypt.hashpw(b"moe-watch", bcrypt.gensalt(max(map(_cost, users.values()), default=10)))
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moe-watch-auth")
    verified: OrderedDict[str, None] = OrderedDict()
    pending = 0

    def checkpw(password: bytes, hashed: bytes) -> bool:
        try:
            return bool(bcrypt.checkpw(password, hashed))
        except ValueError:  # validated at load; never a 500 whatever arrives
            return False

    if app is not None:

        async def shutdown_pool(_: web.Application) -> None:
            executor.shutdown(wait=False, cancel_futures=True)

        app.on_cleanup.append(shutdown_pool)

    def refused(status: int = 401) -> web.Response:
        if status == 429:
            return web.Response(
                status=429, text="too many requests\n", headers={"Retry-After": "1"}
            )
        return web.Response(
            status=401,
            text="unauthorized\n",
            headers={"WWW-Authenticate": 'Basic realm="moe-watch"'},
        )

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal pending
        if request.path in OPEN_PATHS:
            return await handler(request)
        credentials = _basic_credentials(request.headers.get("Authorization", ""))
        if credentials is None:
            return refused()
        login, password = credentials
        secret = password.encode()
        if len(secret) > MAX_PASSWORD_BYTES:
            return refused()
        key = hashlib.sha256(f"{login}\0{password}".encode()).hexdigest()
        if key in verified:
            verified.move_to_end(key)
            return await handler(request)
        if pending >= max_pending:  # a flood: answer at once instead of queueing without end
            return refused(429)
        known = users.get(login)
        pending += 1
        try:
            loop = asyncio.get_running_loop()
            target = known.encode() if known is not None else dummy  # constant work
            ok = await loop.run_in_executor(executor, checkpw, secret, target)
        finally:
            pending -= 1
        if not ok or known is None:
            return refused()
        verified[key] = None
        while len(verified) > _VERIFIED_MAX:
            verified.popitem(last=False)
        return await handler(request)

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
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg'].removeprefix('Value error, ')}"
    return str(exc)
