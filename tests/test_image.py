"""The container image: static checks of the Dockerfile (pinned base, locked and hashed
dependencies, OCI labels, multi-arch), and, where a docker daemon is available, a real build."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def docker_daemon() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30, check=False)
    return docker if info.returncode == 0 else None


def test_dockerfile_is_non_root_and_read_only_friendly() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 65532:65532" in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text  # nothing to write next to the code at run time
    final_stage = text.rsplit("FROM ", 1)[1]
    assert "pip wheel" not in final_stage  # build tools stay in the build stage


def test_the_base_image_is_pinned_by_digest_in_every_stage() -> None:
    text = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"docker\.io/library/python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]


def locked() -> dict[str, list[str]]:
    entries = re.findall(
        r"^([a-z0-9-]+)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\\n|\n))+)",
        (ROOT / "requirements.lock").read_text(),
        re.M,
    )
    return {name: re.findall(r"sha256:([0-9a-f]{64})", hashes) for name, _, hashes in entries}


def test_every_runtime_dependency_is_locked_with_hashes_and_installed_from_the_lock() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    lock = locked()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    assert names <= set(lock), names - set(lock)
    assert all(lock.values())
    # compiled packages carry an x86_64 and an aarch64 wheel (amd64 and arm64 images)
    for compiled in ("aiohttp", "grpcio", "pydantic-core", "pyyaml", "bcrypt"):
        assert len(lock[compiled]) >= 2, compiled
    text = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes" in text
    assert "-r requirements.lock" in text
    assert "--no-index" in text.rsplit("FROM ", 1)[1]  # the runtime stage installs only those


def test_the_image_carries_oci_labels_and_the_license() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    text = (ROOT / "Dockerfile").read_text()
    for label in ("title", "description", "version", "revision", "created", "licenses", "source"):
        assert f"org.opencontainers.image.{label}=" in text, label
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in text
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text
    assert "Version 2.0, January 2004" in license_text
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {
        "text": "Apache-2.0"
    }
    assert "--platform linux/amd64,linux/arm64" in text  # the documented multi-arch recipe


@pytest.mark.skipif(
    docker_daemon() is None,
    reason="no docker daemon on this machine (the docker client alone cannot build)",
)
def test_the_image_builds_and_runs_moe_watch_as_non_root() -> None:
    docker = docker_daemon()
    assert docker is not None
    tag = "moe-watch:test"
    build = subprocess.run(
        [docker, "build", "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run(
        [docker, "run", "--rm", "--read-only", "--entrypoint", "sh", tag, "-c", "id -u && moe-watch --version"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    uid, version = run.stdout.split()[:2]
    assert uid == "65532"
    assert version == "moe-watch"
