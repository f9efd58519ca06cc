"""`moe-watch size --config` refuses a hostile config.json with one line and exit 2, never a
traceback: the file is read like any other input from outside (limits.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from moe_watch import limits

CONFIGS = Path(__file__).parent / "configs"


def mixtral() -> dict[str, object]:
    config: dict[str, object] = json.loads((CONFIGS / "mixtral-8x7b.json").read_text())
    return config


def _with(**changes: object) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(json.dumps(mixtral() | changes))

    return write


def _text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _nested(depth: int) -> Callable[[Path], None]:
    inner = "[" * depth + "]" * depth
    return _text(json.dumps(mixtral())[:-1] + f', "deep": {inner}}}')


def _huge(path: Path) -> None:
    body = json.dumps(mixtral())[:-1]
    pad = " " * (limits.CONFIG_JSON_BYTES + 1)
    path.write_text(body + pad + "}")


def _digits(path: Path) -> None:
    path.write_text(json.dumps(mixtral())[:-1] + ', "hidden_size": ' + "9" * 4000 + "}")


CASES: dict[str, Callable[[Path], None]] = {
    "zero_attention_heads": _with(num_attention_heads=0),
    "zero_kv_heads": _with(num_key_value_heads=0),
    "negative_layers": _with(num_hidden_layers=-32),
    "negative_hidden": _with(hidden_size=-4096),
    "float_experts": _with(num_local_experts=8.5),
    "huge_layers": _with(num_hidden_layers=10**30),
    "string_heads": _with(num_attention_heads="many"),
    "bool_heads": _with(num_attention_heads=True),
    "nan": _text(json.dumps(mixtral())[:-1] + ', "rope_theta": NaN, "hidden_size": Infinity}'),
    "four_thousand_digits": _digits,
    "deep_1000": _nested(1000),
    "deep_100000": _nested(100_000),
    "top_level_array": _text("[1, 2, 3]"),
    "text_config_array": _text('{"text_config": [1]}'),
    "not_utf8": _bytes(b'{"hidden_size": "\xff\xfe"}'),
    "huge_file": _huge,
    "empty": _text(""),
    "directory": lambda path: path.mkdir(),
}


def size(path: Path, params_b: str = "47") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_watch.cli",
            "size",
            "--config",
            str(path),
            "--params-b",
            params_b,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_refused(run: subprocess.CompletedProcess[str]) -> None:
    assert run.returncode == 2, (run.returncode, run.stdout[-500:], run.stderr[-2000:])
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr[-2000:]
    assert lines[0].startswith("moe-watch: ")
    assert "Traceback" not in run.stderr
    assert len(lines[0]) < 500  # names the problem, does not echo the file


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_config_json_gives_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    path = tmp_path / "config.json"
    CASES[case](path)
    assert_refused(size(path))


@pytest.mark.parametrize("params_b", ["nan", "inf", "1e400", "-5", "0"])
def test_a_bad_parameter_count_gives_one_line_and_exit_2(tmp_path: Path, params_b: str) -> None:
    path = tmp_path / "config.json"
    _with()(path)
    assert_refused(size(path, params_b))


def test_the_real_config_still_sizes(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    _with()(path)
    run = size(path)
    assert run.returncode == 0, run.stderr
    assert "tensor_parallel_size" in run.stdout
