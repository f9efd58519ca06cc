"""Hostile settings and command lines: every one is a single human line (exit 2), never a
traceback, and a password in a target URL is never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_watch.cli import main
from moe_watch.config import ConfigError, load_settings


def test_yaml_nested_5000_deep_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "moe-watch.yaml"
    path.write_text("targets: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_settings(path)


@pytest.mark.parametrize("flag", ["--gpus", "--max-model-len", "--max-num-seqs"])
@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_size_with_a_non_positive_count_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["size", "--model", "mixtral-8x7b", flag, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert flag in err


@pytest.mark.parametrize("interval", [0, 0.0001, -1])
def test_the_interval_has_a_floor(interval: float) -> None:
    with pytest.raises(ConfigError, match="interval_seconds"):
        load_settings(None, interval_seconds=interval, nvml="off")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://admin:hunter2@10.0.0.1:8000", "user:password@"),
        ("http://admin:hunter2@10.0.0.1:port", "not a valid URL"),
        ("http://10.0.0.1:99999", "port out of range|not a valid URL"),
        ("http://10.0.0.1:8000/?debug=1", "without query or fragment"),
        ("http://10.0.0.1:8000/#x", "without query or fragment"),
        ("http://10.0.0.1 :8000", "http\\(s\\) URL"),
        ("file:///etc/passwd", "http\\(s\\) URL"),
    ],
)
def test_a_bad_target_url_is_refused_without_echoing_a_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        load_settings(None, targets=[{"name": "e", "url": url}], nvml="off")
    assert "hunter2" not in str(refused.value)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=200))
def test_any_settings_file_loads_or_is_one_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "moe-watch.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    message = None
    try:
        load_settings(path, nvml="off")
    except ConfigError as exc:
        message = str(exc)
    assert message is None or "\n" not in message
