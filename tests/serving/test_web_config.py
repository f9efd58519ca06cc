"""TLS and basic auth on the agent's endpoints, with a real certificate made by openssl."""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import bcrypt
import pytest

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
