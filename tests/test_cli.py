"""The command line: bad settings exit 2 with one line; `run` serves and stops on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from importlib.metadata import entry_points
from pathlib import Path

import aiohttp
import pytest

from moe_watch.cli import main
from tests.conftest import EngineStub, free_port


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "setting"),
    [
        (["run", "--target", "e=http://127.0.0.1:1", "--interval", "-1"], "interval_seconds"),
        (["run", "--target", "no-equals-sign"], "targets"),
        (["run", "--target", "e=ftp://x"], "targets"),
        (["run", "--target", "e=http://127.0.0.1:1", "--listen", "nowhere"], "listen"),
        (["run", "--nvml", "off"], "targets"),
    ],
)
def test_a_bad_value_exits_2_with_one_line_naming_the_setting(
    capsys: pytest.CaptureFixture[str], argv: list[str], setting: str
) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert f"'{setting}" in err


def test_environment_values_are_validated_like_flags(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOE_WATCH_TARGETS", "e=http://127.0.0.1:1")
    monkeypatch.setenv("MOE_WATCH_WINDOW_SECONDS", "five minutes")
    code, _, err = run_cli(capsys, "run")
    assert code == 2
    assert "'window_seconds'" in err


def test_check_reports_the_targets_of_a_valid_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "moe-watch.yaml"
    config.write_text(
        "targets:\n"
        "  - name: mixtral-0\n    url: http://10.0.0.5:8000\n    gpus: [0, 1]\n"
        "  - deepseek-0=http://10.0.0.6:30000\n"
        "interval_seconds: 10\n"
    )
    code, out, _ = run_cli(capsys, "check", "--config", str(config))
    assert code == 0
    assert "2 target(s)" in out
    assert "mixtral-0: http://10.0.0.5:8000/metrics" in out


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("interval_secs: 5\n", "'interval_secs'"),
        ("targets: [{name: a, url: http://h:1, colour: red}]\n", "unknown setting"),
        ("targets: [a=http://h:1, a=http://h:2]\n", "used by two targets"),
        ("listen: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "mapping of settings"),
    ],
)
def test_check_rejects_a_bad_file_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, yaml_text: str, expected: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    code, _, err = run_cli(capsys, "check", "--config", str(config))
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert expected in err


def test_check_lists_every_problem_one_line_each(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "interval_secs: 5\n"
        "window_seconds: -1\n"
        "listen: nowhere\n"
        "targets:\n"
        "  - {name: a, url: ftp://h}\n"
        "  - {name: b, url: http://h:1, colour: red}\n"
    )
    code, out, err = run_cli(capsys, "check", "--config", str(config))
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    named = ["'interval_secs'", "'window_seconds'", "'listen'", "'targets.0.url'",
             "'targets.1.colour'"]  # fmt: skip
    assert len(lines) == len(named), lines
    for line, setting in zip(sorted(lines), sorted(named), strict=True):
        assert line.startswith("moe-watch: invalid setting ")
        assert setting in line
    assert "more problem" not in err  # listed, not counted


def test_the_console_script_is_declared() -> None:
    scripts = entry_points(group="console_scripts")
    assert any(ep.name == "moe-watch" and ep.value == "moe_watch.cli:main" for ep in scripts)


async def read_event(
    stream: asyncio.StreamReader, event: str, deadline: float = 20.0
) -> dict[str, object]:
    """The first JSON log line with this event (bounded by ``deadline`` seconds)."""

    async def scan() -> dict[str, object]:
        while line := await stream.readline():
            record = json.loads(line)
            if record.get("event") == event:
                return dict(record)
        raise AssertionError(f"the process ended before logging {event!r}")

    return await asyncio.wait_for(scan(), deadline)


async def test_run_serves_metrics_and_exits_0_on_sigterm(engine_stub: EngineStub) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moe_watch.cli", "run",
        "--target", f"mixtral-0={engine_stub.url}",
        "--listen", "127.0.0.1:0", "--interval", "0.2", "--nvml", "off", "--log-format", "json",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        serving = await read_event(proc.stderr, "serving")
        url = str(serving["url"])
        async with aiohttp.ClientSession() as client:
            for _ in range(100):  # bounded: wait for the first cycle through /readyz
                async with client.get(url.replace("/metrics", "/readyz")) as ready:
                    if ready.status == 200:
                        break
                await asyncio.sleep(0.05)
            async with client.get(url) as response:
                body = await response.text()
        assert 'moe_watch_target_up{engine="mixtral-0"} 1.0' in body
        assert "moe_watch_kv_cache_usage_ratio" in body
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), timeout=10)
    assert code == 0


async def test_run_exits_2_when_the_listen_port_is_taken(engine_stub: EngineStub) -> None:
    taken = engine_stub.url.rsplit(":", 1)[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moe_watch.cli", "run",
        "--target", f"e=http://127.0.0.1:{free_port()}", "--listen", f"127.0.0.1:{taken}",
        "--nvml", "off", "--log-format", "json",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 2
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith("moe-watch: cannot listen on 127.0.0.1:")


def test_bench_never_imports_from_tests() -> None:
    """bench/ runs without pytest or the test tree: shared harness lives in bench/ (vllm_env,
    vllm_server) and the package (moe_watch.demo.replay_server)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted((root / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "tests"]
    assert offenders == []
