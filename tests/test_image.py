"""The container image builds and runs as a non-root user, where a docker daemon is available."""

from __future__ import annotations

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
