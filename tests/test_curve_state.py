"""The batching curves' state file: atomic, bounded, validated; a bad file costs only itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moe_watch.agent.curve_state import (
    FILE_NAME,
    FORMAT,
    MAX_CURVES,
    load_curves,
    save_curves,
)
from moe_watch.samples import Histogram
from moe_watch.signals.batching import BatchCurve, IntervalEvidence, add_interval


def curve(updated: float = 100.0) -> BatchCurve:
    itl = Histogram(((0.05, 40.0), (0.2, 50.0), (float("inf"), 50.0)), 50.0, 1.0)
    return add_interval(
        BatchCurve(updated=0.0), IntervalEvidence(5.0, 8.0, 400.0, itl=itl), updated, 3600.0
    )


def test_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "state" / FILE_NAME
    curves = {("vllm-0", "mixtral"): curve(), ("vllm-1", "qwen"): curve(50.0)}
    save_curves(path, curves, now=200.0)
    result = load_curves(path)
    assert (result.reason, result.message) == (None, None)
    assert result.curves == curves
    assert [p.name for p in path.parent.iterdir()] == [FILE_NAME]  # no temporary file left
    assert json.loads(path.read_text())["saved"] == 200.0


def test_a_missing_file_is_a_first_start(tmp_path: Path) -> None:
    assert load_curves(tmp_path / FILE_NAME).curves == {}
    assert load_curves(tmp_path / FILE_NAME).reason is None


def test_only_the_most_recently_updated_curves_are_kept(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    curves = {(f"e{i}", "m"): curve(float(i + 1)) for i in range(MAX_CURVES + 5)}
    save_curves(path, curves, now=1000.0)
    kept = load_curves(path).curves
    assert len(kept) == MAX_CURVES
    assert ("e0", "m") not in kept
    assert (f"e{MAX_CURVES + 4}", "m") in kept


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    save_curves(path, {("e", "m"): curve()}, now=1.0)
    broken = {("e", "m"): BatchCurve(updated=float("nan"))}
    with pytest.raises(ValueError, match="Out of range float"):
        save_curves(path, broken, now=2.0)
    assert load_curves(path).curves == {("e", "m"): curve()}
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]


def good_document() -> dict[str, object]:
    path_data = {
        "format": FORMAT,
        "saved": 1.0,
        "curves": [
            {
                "engine": "e",
                "model": "m",
                "updated": 100.0,
                "itl_bounds": [0.05, 0.2],
                "ttft_bounds": [],
                "bins": [
                    {"seconds": 0.0, "generation_tokens": 0.0, "itl": [], "ttft": []}
                    for _ in range(12)
                ],
            }
        ],
    }
    return path_data


def broken(change: str) -> str:
    document = good_document()
    item = document["curves"][0]  # type: ignore[index]
    if change == "format":
        document["format"] = "moe-watch-batching-curves/2"
    elif change == "bins":
        item["bins"] = item["bins"][:11]
    elif change == "negative":
        item["bins"][3]["seconds"] = -1.0
    elif change == "string":
        item["bins"][3]["generation_tokens"] = "12"
    elif change == "buckets":
        item["bins"][3]["itl"] = [1.0, 2.0]
    elif change == "bounds":
        item["itl_bounds"] = [0.2, 0.05]
    elif change == "name":
        item["engine"] = ""
    elif change == "missing":
        del item["updated"]
    elif change == "twice":
        document["curves"] = [item, item]
    elif change == "too_many":
        document["curves"] = [item] * (MAX_CURVES + 1)
    elif change == "nan":
        return json.dumps(document).replace('"updated": 100.0', '"updated": NaN')
    return json.dumps(document)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not JSON"),
        ('{"format": "moe-watch-batching-curves/1", "curves": [', "not JSON"),
        ("[]", "not a moe-watch-batching-curves/1 file"),
        (broken("format"), "not a moe-watch-batching-curves/1 file"),
        (broken("bins"), "does not have 12 bins"),
        (broken("negative"), "not a finite non-negative number"),
        (broken("string"), "not a finite non-negative number"),
        (broken("nan"), "not a finite non-negative number"),
        (broken("buckets"), "buckets do not fit"),
        (broken("bounds"), "not increasing"),
        (broken("name"), "not a string of 1-256 characters"),
        (broken("missing"), "'updated'"),
        (broken("twice"), "there twice"),
        (broken("too_many"), "at most 64"),
    ],
)
def test_a_corrupt_file_is_refused_as_a_whole_with_a_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / FILE_NAME
    path.write_text(json.dumps(good_document()))
    assert load_curves(path).reason is None  # the unbroken document loads
    path.write_text(text)
    result = load_curves(path)
    assert result.curves == {}
    assert result.reason == "bad_state"
    assert result.message is not None
    assert message in result.message


def test_special_and_oversized_files_are_refused_without_reading_them(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert load_curves(fifo).reason == "not_regular"
    link = tmp_path / "link.json"
    link.symlink_to("/dev/zero")
    assert load_curves(link).reason == "symlink"
    big = tmp_path / FILE_NAME
    big.write_text(" " * 2048)
    assert load_curves(big, max_bytes=1024).reason == "too_large"
