"""The agent's TLS server picks up a rotated certificate without a restart: a real TLS client on
127.0.0.1 sees the new certificate's serial after the files change, and a bad new pair keeps
the old certificate (counted once)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from moe_watch.serving.cert_reload import CertificateReloader
from moe_watch.serving.server import make_app, start_server
from moe_watch.serving.web_config import load_web_config


def make_pair(directory: Path, name: str, serial: int) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    assert openssl, "openssl not found: the test makes its own certificates with it"
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-set_serial", str(serial),
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("pairs")
    return {"old": make_pair(directory, "old", 0x1001), "new": make_pair(directory, "new", 0x2002)}


def install(source: Path, target: Path) -> None:
    """Replace ``target`` at once, as the kubelet swaps a Secret volume's files."""
    staged = target.with_suffix(target.suffix + ".staged")
    shutil.copyfile(source, staged)
    os.replace(staged, target)


async def served_serial(url: str, cafile: Path) -> str:
    """The serial number of the certificate a verifying client is served."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    client = ssl.create_default_context(cafile=str(cafile))
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, int(port), ssl=client, server_hostname=host), 10
    )
    try:
        peer = writer.get_extra_info("ssl_object").getpeercert()
        return str(peer["serialNumber"])
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@pytest.fixture
def live(tmp_path: Path, pairs: dict[str, tuple[Path, Path]]) -> tuple[Path, Path, Path, Path]:
    """The mounted files (the old pair), the web config naming them, and a CA file trusting
    both pairs."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    install(pairs["old"][0], cert)
    install(pairs["old"][1], key)
    config = tmp_path / "web-config.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    cafile = tmp_path / "trusted.pem"
    cafile.write_text(pairs["old"][0].read_text() + pairs["new"][0].read_text())
    return cert, key, config, cafile


@contextlib.asynccontextmanager
async def tls_server(config: Path) -> AsyncIterator[tuple[CertificateReloader, str]]:
    """The agent's server with the web config's TLS pair, reloading it as the files change."""
    tls = load_web_config(config).tls_server_config
    assert tls is not None
    reloader = CertificateReloader(tls, config)
    runner, url = await start_server(make_app(lambda: None), "127.0.0.1", 0, reloader.context)
    try:
        yield reloader, url
    finally:
        await runner.cleanup()


async def test_a_rotated_certificate_is_served_without_a_restart(
    live: tuple[Path, Path, Path, Path], pairs: dict[str, tuple[Path, Path]]
) -> None:
    cert, key, config, cafile = live
    async with tls_server(config) as (reloader, url):
        assert await served_serial(url, cafile) == "1001"
        assert await served_serial(url, cafile) == "1001"  # unchanged files: nothing reloaded
        assert reloader.reloads == 0
        install(pairs["new"][0], cert)
        install(pairs["new"][1], key)
        assert await served_serial(url, cafile) == "2002"
        assert await served_serial(url, cafile) == "2002"
        assert (reloader.reloads, reloader.failures) == (1, 0)


async def test_a_bad_new_pair_keeps_the_old_certificate_and_is_counted_once(
    live: tuple[Path, Path, Path, Path], pairs: dict[str, tuple[Path, Path]]
) -> None:
    cert, key, config, cafile = live
    async with tls_server(config) as (reloader, url):
        install(pairs["new"][0], cert)  # half a rotation: the new certificate, the old key
        for _ in range(3):
            assert await served_serial(url, cafile) == "1001"
        assert (reloader.reloads, reloader.failures) == (0, 1)  # once per change, not per handshake
        assert reloader.last_error is not None
        assert "TLS certificate or key unusable" in reloader.last_error

        install(pairs["new"][1], key)  # the rest of the rotation arrives
        assert await served_serial(url, cafile) == "2002"
        assert (reloader.reloads, reloader.failures) == (1, 1)

        cert.write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")  # garbage in place
        assert await served_serial(url, cafile) == "2002"
        assert reloader.failures == 2
        cert.unlink()  # gone for a moment
        assert await served_serial(url, cafile) == "2002"
        assert reloader.failures == 3


async def test_the_agent_serves_a_rotated_certificate(
    live: tuple[Path, Path, Path, Path], pairs: dict[str, tuple[Path, Path]]
) -> None:
    from moe_watch.config import load_settings
    from moe_watch.demo.fake_nvml import FakeNvml
    from moe_watch.serving.service import serve

    cert, key, config, cafile = live
    stop = asyncio.Event()
    seen: list[str] = []

    async def started(url: str, _: object) -> None:
        try:
            seen.append(await served_serial(url, cafile))
            install(pairs["new"][0], cert)
            install(pairs["new"][1], key)
            seen.append(await served_serial(url, cafile))
        finally:
            stop.set()

    settings = load_settings(None, listen="127.0.0.1:0", web_config_file=str(config))
    await asyncio.wait_for(
        serve(settings, stop=stop, nvml=FakeNvml.with_gpus(1), on_started=started), 60
    )
    assert seen == ["1001", "2002"]
