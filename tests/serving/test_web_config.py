"""TLS and basic auth on the agent's endpoints, with a real certificate made by openssl."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from aiohttp import web

from moe_watch.config import ConfigError, load_settings
from moe_watch.serving.server import make_app, start_server
from moe_watch.serving.web_config import WebConfigError, load_web_config, ssl_context


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    assert openssl, "openssl not found: the test makes its own certificate with it"
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def basic(login: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def web_config(tmp_path: Path, cert: Path, key: Path) -> Path:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "web.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\nbasic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    return path


async def test_tls_and_basic_auth_guard_metrics_but_not_the_probes(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    config = load_web_config(web_config(tmp_path, cert, key))
    assert config.tls_server_config is not None
    app = make_app(lambda: None, basic_auth_users=config.basic_auth_users)
    runner, url = await start_server(app, "127.0.0.1", 0, ssl_context(config.tls_server_config))
    client_tls = ssl.create_default_context(cafile=str(cert))
    try:
        assert url.startswith("https://127.0.0.1:")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls)) as client:
            async with client.get(url + "/metrics") as anonymous:
                assert anonymous.status == 401
                assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
            async with client.get(
                url + "/metrics",
                headers={"Authorization": basic("prometheus", "wrong")},
            ) as wrong:
                assert wrong.status == 401
            for _ in range(2):  # the second time from the verified-credentials cache
                async with client.get(
                    url + "/metrics",
                    headers={"Authorization": basic("prometheus", "s3cret")},
                ) as ok:
                    assert ok.status == 200
                    assert "moe_watch_build_info" in await ok.text()
            async with client.get(url + "/healthz") as probe:
                assert probe.status == 200  # kubelet probes carry no credentials
        async with aiohttp.ClientSession() as plain, plain.get(url + "/healthz") as untrusted:
            raise AssertionError(
                f"a client that does not trust the certificate got {untrusted.status}"
            )
    except aiohttp.ClientConnectorCertificateError:
        pass  # what an untrusting client must get
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("basic_auth_users:\n  admin: plaintext\n", "basic_auth_users.admin is not a bcrypt hash"),
        (
            "tls_server_config:\n  cert_file: /nope.crt\n  key_file: /nope.key\n",
            "TLS certificate or key unusable",
        ),
        ("tls_server_config:\n  cert_file: /a\n", "tls_server_config.key_file"),
        ("basic_auth: {}\n", "basic_auth"),
    ],
)
def test_a_bad_web_config_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "web.yml"
    path.write_text(text)
    with pytest.raises(WebConfigError, match=message):
        load_web_config(path)
    with pytest.raises(ConfigError, match="web_config_file"):
        load_settings(None, web_config_file=str(path), nvml="off")


def test_exporter_toolkit_tls_versions_are_accepted(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    path = tmp_path / "web.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  min_version: TLS12\n  max_version: TLS13\n"
    )
    tls = load_web_config(path).tls_server_config
    assert tls is not None
    context = ssl_context(tls)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version == ssl.TLSVersion.TLSv1_3


async def handshake(url: str, client: ssl.SSLContext) -> tuple[str, str]:
    """(TLS version, cipher) a real client negotiates with the server at ``url``."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, int(port), ssl=client, server_hostname=host), 10
    )
    try:
        tls = writer.get_extra_info("ssl_object")
        version, cipher = tls.version(), tls.cipher()[0]
        assert version is not None
        return version, cipher
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def refused(url: str, client: ssl.SSLContext) -> None:
    """The server ends the handshake (an alert, or a reset before one)."""
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(url, client)


def client_trusting(cert: Path, **settings: object) -> ssl.SSLContext:
    client = ssl.create_default_context(cafile=str(cert))
    if "maximum_version" in settings:
        client.maximum_version = settings["maximum_version"]  # type: ignore[assignment]
    if "ciphers" in settings:
        client.set_ciphers(str(settings["ciphers"]))
    if "curve" in settings:
        client.set_ecdh_curve(str(settings["curve"]))
    return client


async def serving(tmp_path: Path, cert: Path, key: Path, extra: str) -> tuple[web.AppRunner, str]:
    path = tmp_path / "web.yml"
    path.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n{extra}")
    tls = load_web_config(path).tls_server_config
    assert tls is not None
    return await start_server(make_app(lambda: None), "127.0.0.1", 0, ssl_context(tls, path))


async def test_versions_ciphers_and_curve_are_what_a_real_client_gets(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    runner, url = await serving(tmp_path, cert, key, "  min_version: TLS13\n")
    try:
        assert (await handshake(url, client_trusting(cert)))[0] == "TLSv1.3"
        await refused(url, client_trusting(cert, maximum_version=ssl.TLSVersion.TLSv1_2))
    finally:
        await runner.cleanup()

    suites = "[TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, TLS_AES_128_GCM_SHA256]"
    runner, url = await serving(
        tmp_path, cert, key, f"  max_version: TLS12\n  cipher_suites: {suites}\n"
    )
    try:
        assert await handshake(url, client_trusting(cert)) == (
            "TLSv1.2",
            "ECDHE-RSA-AES256-GCM-SHA384",
        )
        # a suite the server was not given
        await refused(url, client_trusting(cert, ciphers="ECDHE-RSA-AES128-GCM-SHA256"))
    finally:
        await runner.cleanup()

    runner, url = await serving(tmp_path, cert, key, "  curve_preferences: [CurveP384]\n")
    try:
        for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            got = await handshake(
                url, client_trusting(cert, curve="secp384r1", maximum_version=maximum)
            )
            assert got[0] == ("TLSv1.2" if maximum == ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
            # the one curve is enforced for 1.2 and 1.3 alike
            await refused(url, client_trusting(cert, curve="X25519", maximum_version=maximum))
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("tls_lines", "message"),
    [
        ("min_version: TLS10", "TLS10 is not offered: .* use TLS12 or TLS13"),
        ("max_version: TLS11", "TLS11 is not offered"),
        (
            "min_version: TLS1.2",
            "min_version: Input should be 'TLS10', 'TLS11', 'TLS12' or 'TLS13'",
        ),
        (
            "min_version: TLS13\n  max_version: TLS12",
            "min_version TLS13 is above max_version TLS12",
        ),
        ("cipher_suites: [ECDHE-RSA-AES128-GCM-SHA256]", "unknown cipher suite .* use Go's names"),
        ("cipher_suites: [TLS_RSA_WITH_3DES_EDE_CBC_SHA]", "Go's insecure cipher suites"),
        ("cipher_suites: [TLS_AES_128_GCM_SHA256]", "only TLS 1.3 suites, which cannot be chosen"),
        ("curve_preferences: [P-256]", "unknown curve 'P-256': one of CurveP256"),
        ("curve_preferences: [X25519, CurveP256]", "sets one curve, not a preference list"),
    ],
)
def test_tls_settings_python_cannot_honour_are_refused_clearly(
    tmp_path: Path, certificate: tuple[Path, Path], tls_lines: str, message: str
) -> None:
    cert, key = certificate
    path = tmp_path / "web.yml"
    path.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  {tls_lines}\n")
    with pytest.raises(WebConfigError, match=message) as refused:
        load_web_config(path)
    assert "\n" not in str(refused.value)


def test_tls13_suites_alone_are_fine_when_only_tls13_is_offered(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    path = tmp_path / "web.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  min_version: TLS13\n  cipher_suites: [TLS_AES_256_GCM_SHA384]\n"
        "  prefer_server_cipher_suites: false\n"
    )
    tls = load_web_config(path).tls_server_config
    assert tls is not None
    assert not ssl_context(tls).options & ssl.OP_CIPHER_SERVER_PREFERENCE
