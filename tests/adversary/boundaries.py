"""Hypothesis strategies for every declared limit (moe_watch/limits.py): each one generates
inputs at a limit and just past it (and far past it, where a number has no natural end), as a
``Case`` that says which boundary it crosses, what it writes there, and which reason the agent
counts when it is past. ``STRATEGIES`` maps a limit's name to its strategy; ``EXEMPT`` names the
limits without one and why. A test keeps the two together equal to ``limits.LIMITS``, so a limit
added without a strategy fails.

A case does not touch the world itself: ``apply`` receives a ``Hostile`` (the hostile engine's
answers, its plugin directory, its EPLB log, the command line of the process on its GPU) and
changes only those. A case of the agent's own server changes nothing there: its ``attack``
acts on the agent's address (connections, headers, unread answers, passwords) and is held
while the invariants that must hold during it are checked; it asserts what the limit says
happens to its own connections."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import resource
import socket
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hypothesis import strategies as st

from moe_watch import limits
from moe_watch.expert_file import SUFFIX
from moe_watch.sizing.allocated import ALLOCATION_LABELS
from tests.adversary.clients import (
    Reader,
    address,
    closed_by_agent,
    connect,
    request,
    send,
    sockets,
)
from tests.conftest import read_capture
from tests.hostile.conftest import _str, floats, tensor_opcodes

Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]  # name, labels -> value


class Hostile(Protocol):
    """What a case may change: the hostile engine and everything of it the agent reads."""

    plugin_dir: Path
    eplb_log: Path
    dump_dir: Path
    agent_url: str
    sockets: list[socket.socket]

    def serve_recorder(self, status: int, body: bytes | None) -> None: ...
    def publish_pods(self, pods: Callable[[int], tuple[bytes, list[bytes]]], *,
                     chunked: bool = False) -> int: ...  # fmt: skip
    def kube_listed(self, generation: int) -> bool: ...
    def kube_watched(self, generation: int) -> bool: ...
    def set_token(self, token: bytes) -> None: ...
    def serve_metrics(self, body: bytes) -> None: ...
    def serve_models(self, body: bytes) -> None: ...
    def serve_version(self, body: bytes) -> None: ...
    def set_cmdline(self, args: list[bytes]) -> None: ...


@dataclass(frozen=True)
class Case:
    limit: str
    boundary: str  # plugin | engine | metadata | eplb | proc | sglang | kube | server
    past: bool  # past the limit: refused with ``reason``; else accepted (``reason`` not counted)
    source: str  # the `source` label its refusal is counted under
    reason: str | None  # None: the limit bounds work, nothing is counted either side
    apply: Callable[[Hostile], None]
    note: str = ""  # what was generated, for the failure message
    settled: Callable[[Hostile], bool] | None = None  # the world has served it (async readers)
    expect: Callable[[Samples], None] | None = None  # asserts on the agent's /metrics after it
    attack: Callable[[Hostile], AbstractContextManager[None]] | None = None  # held while probed

    def __repr__(self) -> str:
        side = "past" if self.past else "at"
        return f"Case({self.limit} {side}: {self.note})"


PLUGIN = "experts:hostile"
ENGINE = "engine:hostile"
EPLB = "eplb:hostile"


def around(limit: int, far: int | None = None) -> st.SearchStrategy[int]:
    """A whole number at or just below ``limit``, just past it, or (``far``) far past it."""
    near = st.integers(max(limit - 2, 0), limit + 2)
    return near if far is None else st.one_of(near, st.integers(limit + 1, far))


# -- plugin counts files ---------------------------------------------------------------------


def plugin_doc(**changes: Any) -> dict[str, Any]:
    """A valid counts file of the hostile engine (4 experts, 1 layer), with ``changes``."""
    now = time.time()
    doc: dict[str, Any] = {
        "format": "moe-watch-expert-counts/1",
        "pid": 9,
        "started": now - 10,
        "updated": now + 3600,
        "model": "m",
        "top_k": 2,
        "num_experts": 4,
        "layers": [0],
        "counts": [[1, 2, 3, 4]],
    }
    doc.update(changes)
    return doc


def write_plugin(files: dict[str, dict[str, Any] | bytes]) -> Callable[[Hostile], None]:
    def apply(world: Hostile) -> None:
        for old in world.plugin_dir.iterdir():
            old.unlink()
        for name, doc in files.items():
            data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            (world.plugin_dir / f"{name}{SUFFIX}").write_bytes(data)

    return apply


def one_file(
    limit: str, value: int, reason: str, note: str, **changes: Any
) -> Case:  # one plugin file whose ``changes`` are ``value`` against ``limit``'s number
    bound = limits.LIMITS[limit].value
    return Case(limit, "plugin", value > bound, PLUGIN, reason,
                write_plugin({"w": plugin_doc(**changes)}), note)  # fmt: skip


def _ep_size(v: int) -> Case:
    return one_file("EP_RANKS", v, "too_large", f"ep_size={v}", ep_size=v)


def _pid(v: int) -> Case:
    return one_file("PROCESS_ID", v, "bad_file", f"pid={v}", pid=v)


def _layer(v: int) -> Case:
    return one_file("LAYER_INDEX", v, "bad_file", f"layers=[{v}]", layers=[v])


def _experts(v: int) -> Case:
    return one_file("EXPERTS_PER_LAYER", v, "too_large", f"num_experts={v}",
                    num_experts=v, counts=[[1] * v])  # fmt: skip


def _cells_per_file(layers: int) -> Case:
    experts = limits.CELLS_PER_FILE // 512  # 256: at 512 layers the file is at the limit
    case = one_file("CELLS_PER_FILE", layers * experts, "too_large",
                    f"{layers} layers x {experts} experts", num_experts=experts,
                    layers=list(range(layers)), counts=[[1] * experts] * layers)  # fmt: skip
    return case


def _stages(limit: str, experts: int, first: int, second: int) -> Case:
    """Two pipeline stages of one engine, each within the per-file limits."""
    layers = first + second
    stage0 = plugin_doc(num_experts=experts, layers=list(range(first)),
                        counts=[[1] * experts] * first)  # fmt: skip
    stage1 = plugin_doc(num_experts=experts, layers=list(range(first, layers)),
                        counts=[[1] * experts] * second, pp_rank=1, pid=10)  # fmt: skip
    total = layers * experts if limit == "ENGINE_CELLS" else layers
    return Case(limit, "plugin", total > limits.LIMITS[limit].value, PLUGIN, "too_large",
                write_plugin({"stage0": stage0, "stage1": stage1}),
                f"{first}+{second} layers x {experts} experts")  # fmt: skip


def _count(v: int | float) -> Case:
    past = not (isinstance(v, int) and 0 <= v <= limits.COUNT)
    return Case("COUNT", "plugin", past, PLUGIN, "bad_file",
                write_plugin({"w": plugin_doc(counts=[[v, 1, 1, 1]])}), f"count={v!r}")  # fmt: skip


def _a2a(n: int) -> Case:
    bounds = [0.001 * (i + 1) for i in range(n)]
    a2a = {"bounds": bounds, "buckets": [1] * (n + 1), "count": n + 1, "sum": 0.5}
    return one_file("A2A_BOUNDS", n, "bad_file", f"{n} all2all bounds", all2all=a2a)


def _files(n: int) -> Case:
    docs: dict[str, dict[str, Any] | bytes] = {
        f"w{i:03d}": plugin_doc(dp_rank=i, pid=100 + i) for i in range(n)
    }
    return Case("FILES_PER_CYCLE", "plugin", n > limits.FILES_PER_CYCLE, PLUGIN,
                "too_many_files", write_plugin(docs), f"{n} files")  # fmt: skip


def _entries(n: int) -> Case:
    def apply(world: Hostile) -> None:
        write_plugin({"w": plugin_doc()})(world)
        for i in range(n - 1):
            (world.plugin_dir / f"junk-{i:05d}.txt").touch()

    return Case("SCAN_ENTRIES", "plugin", n > limits.SCAN_ENTRIES, PLUGIN, None, apply,
                f"{n} directory entries")  # fmt: skip


def _file_bytes(size: int) -> Case:
    data = json.dumps(plugin_doc()).encode()
    padded = data + b" " * max(size - len(data), 0)  # whitespace: valid JSON of any size
    return Case("PLUGIN_FILE_BYTES", "plugin", size > limits.PLUGIN_FILE_BYTES, PLUGIN,
                "too_large", write_plugin({"w": padded}), f"{size} bytes")  # fmt: skip


def _model_chars(n: int) -> Case:
    return one_file("LABEL_VALUE_CHARS", n, "bad_file", f"model of {n} chars", model="m" * n)


def with_nested(doc: dict[str, Any], depth: int) -> bytes:
    """``doc`` with a field ``extra`` ``depth`` lists deep, written as text: json.dumps stops
    near 1,000 levels, the adversary goes to 100,000."""
    head = json.dumps(doc).encode()[:-1]
    return head + b', "extra": ' + b"[" * depth + b"]" * depth + b"}"


def _plugin_depth(depth: int) -> Case:
    # The document is one level; its field adds ``depth - 1``.
    return Case("JSON_DEPTH", "plugin", depth > limits.JSON_DEPTH, PLUGIN, "bad_file",
                write_plugin({"w": with_nested(plugin_doc(), depth - 1)}),
                f"{depth} levels")  # fmt: skip


# -- engine answers ----------------------------------------------------------------------------

FAMILY = "vllm:num_requests_running"


def exposition(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _metrics(limit: str, past: bool, reason: str | None, body: bytes, note: str) -> Case:
    def apply(world: Hostile) -> None:
        world.serve_metrics(body)

    return Case(limit, "engine", past, ENGINE, reason, apply, note)


# Comment lines (only the byte cap stops them), the first drawn first in CI: millions of tiny
# lines with a 4-byte character each once took one engine's 16 MiB body to a 390 MiB agent.
BODY_LINES = ("#\U0001f600\n".encode(), b"#\n", b"# " + b"x" * 1021 + b"\n")


def _body_bytes(size: int, padding: bytes = BODY_LINES[0]) -> Case:
    head = exposition([f'{FAMILY}{{model_name="m"}} 1'])
    body = head + padding * ((size - len(head)) // len(padding))
    body += b"#" * (size - len(body) - 1) + b"\n" if size - len(body) > 1 else b""
    return _metrics("ENGINE_BODY_BYTES", len(body) > limits.ENGINE_BODY_BYTES, "body_too_large",
                    body, f"{len(body)} bytes")  # fmt: skip


def _series(n: int) -> Case:
    lines = [f'{FAMILY}{{model_name="m",engine_index="{i}"}} 1' for i in range(n)]
    return _metrics("SERIES_PER_ENGINE", n > limits.SERIES_PER_ENGINE, "series_limit",
                    exposition(lines), f"{n} samples")  # fmt: skip


def _models(n: int) -> Case:
    lines = [f'{FAMILY}{{model_name="m{i}"}} 1' for i in range(n)]
    return _metrics("MODELS_PER_ENGINE", n > limits.MODELS_PER_ENGINE, "series_limit",
                    exposition(lines), f"{n} models")  # fmt: skip


def _label_chars(n: int) -> Case:
    lines = [f'{FAMILY}{{model_name="m"}} 1', f'{FAMILY}{{model_name="{"x" * n}"}} 1']
    return _metrics("LABEL_VALUE_CHARS", n > limits.LABEL_VALUE_CHARS, "label_too_long",
                    exposition(lines), f"model_name of {n} chars")  # fmt: skip


def _info_labels(n: int) -> Case:
    labels = ",".join(f'l{i}="v"' for i in range(n))
    lines = [f'{FAMILY}{{model_name="m"}} 1', f"vllm:cache_config_info{{{labels}}} 1"]
    return _metrics("INFO_LABELS", n > limits.INFO_LABELS, "label_too_long",
                    exposition(lines), f"{n} info labels")  # fmt: skip


def _models_answer(limit: str, past: bool, reason: str, answer: bytes, note: str) -> Case:
    def apply(world: Hostile) -> None:
        world.serve_models(answer)

    return Case(limit, "metadata", past, ENGINE, reason, apply, note)


def models_json(max_model_len: Any) -> bytes:
    return json.dumps(
        {"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": max_model_len}]}
    ).encode()


def _model_len(v: int | float) -> Case:
    ok = isinstance(v, int) and 1 <= v <= limits.MODEL_LEN
    # json.dumps writes NaN and Infinity, which Python's reader (and the agent's) accepts.
    return _models_answer("MODEL_LEN", not ok, "bad_value", models_json(v), f"max_model_len={v!r}")


def _metadata_bytes(size: int) -> Case:
    data = models_json(4096)
    answer = data + b" " * max(size - len(data), 0)
    return _models_answer("METADATA_BYTES", size > limits.METADATA_BYTES, "metadata", answer,
                          f"{size} bytes")  # fmt: skip


def _metadata_depth(depth: int) -> Case:
    doc = json.loads(models_json(4096))  # 3 levels: the answer, data, a model
    return _models_answer("JSON_DEPTH", depth > limits.JSON_DEPTH, "metadata",
                          with_nested(doc, depth - 1), f"{depth} levels")  # fmt: skip


def _version_chars(n: int) -> Case:
    def apply(world: Hostile) -> None:
        world.serve_version(json.dumps({"version": "v" * n}).encode())

    return Case("LABEL_VALUE_CHARS", "metadata", n > limits.LABEL_VALUE_CHARS, ENGINE,
                "label_too_long", apply, f"version of {n} chars")  # fmt: skip


# -- what an engine says it allocated (cache_config_info) -------------------------------------

KV_SERIES = ("moe_watch_kv_cache_allocated_tokens", "moe_watch_kv_cache_capacity_tokens",
             "moe_watch_kv_cache_free_tokens", "moe_watch_kv_cache_max_concurrency")  # fmt: skip
CACHE_INFO = re.compile(r"^vllm:cache_config_info\{.*$", re.MULTILINE)


def hostile_series(samples: Samples, names: tuple[str, ...]) -> dict[str, float]:
    return {
        name: value
        for (name, labels), value in samples.items()
        if name in names and dict(labels).get("engine") == "hostile"
    }


def _allocation_number(text: str) -> bool | None:
    """True: a number the limit accepts; False: one past it; None: not a number (unknown)."""
    if text in ("", "None"):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return math.isfinite(value) and 0 <= value <= limits.KV_ALLOCATION


def _kv_allocation(changes: dict[str, str]) -> Case:
    body = read_capture("after-load")
    line = CACHE_INFO.search(body)
    assert line is not None, "the capture has a cache_config_info"
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line.group(0)))
    labels.update(changes)
    numbers = {key: _allocation_number(labels[key]) for key in ALLOCATION_LABELS if key in labels}
    pool = (numbers.get("num_gpu_blocks"), numbers.get("block_size"))
    pool_past = False in pool or (
        pool == (True, True)
        and float(labels["num_gpu_blocks"]) * float(labels["block_size"]) > limits.KV_ALLOCATION
    )
    past = pool_past or False in numbers.values()
    text = ",".join(f'{key}="{value}"' for key, value in labels.items())
    served = body.replace(line.group(0), f"vllm:cache_config_info{{{text}}} 1.0").encode()

    def expect(samples: Samples) -> None:
        kv = hostile_series(samples, KV_SERIES)
        # whatever is published of the hostile engine's KV cache is a number within the limit
        assert all(math.isfinite(v) and 0 <= v <= limits.KV_ALLOCATION for v in kv.values()), kv
        if past:  # the allocation is unknown
            assert KV_SERIES[0] not in kv, kv
        if pool_past:  # ...and so is the block pool: no capacity derived from it
            assert KV_SERIES[1] not in kv, kv

    note = ", ".join(f"{k}={v[:40]}" for k, v in changes.items())
    return Case("KV_ALLOCATION", "engine", past, ENGINE, "bad_value",
                lambda world: world.serve_metrics(served), note, expect=expect)  # fmt: skip


def _kv_texts() -> st.SearchStrategy[str]:
    bound = limits.KV_ALLOCATION
    return st.one_of(
        around(bound, far=10**200).map(str),  # 201 digits: under LABEL_VALUE_CHARS
        st.integers(-(2**64), -1).map(str),
        st.sampled_from(["nan", "inf", "-inf", "1e400", "-0", "1e15", f"{bound}.5", "1e16",
                         "abc", "None", "", "0x10"]),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
    )  # fmt: skip


def _kv_strategy() -> st.SearchStrategy[Case]:
    one_label = st.builds(lambda key, text: {key: text}, st.sampled_from(ALLOCATION_LABELS),
                          _kv_texts())  # fmt: skip
    # each number within the limit, their product (the block pool in tokens) at or past it
    blocks = limits.KV_ALLOCATION // 128  # the capture's block_size
    product = st.integers(blocks - 2, blocks + 2).map(lambda n: {"num_gpu_blocks": str(n)})
    return st.one_of(one_label, product).map(_kv_allocation)


# -- counters split by a label, histograms the agent re-publishes --------------------------------


def _replace_samples(family: str, lines: list[str]) -> bytes:
    """The captured exposition with the samples of ``family`` replaced by ``lines``."""
    body = read_capture("after-load")
    block = re.compile(rf"^{re.escape(family)}(_bucket|_sum|_count|_total)?\{{.*\n", re.MULTILINE)
    first = block.search(body)
    assert first is not None, family
    body = block.sub("", body)
    return (body[: first.start()] + "".join(f"{line}\n" for line in lines)
            + body[first.start():]).encode()  # fmt: skip


MODEL = 'engine="0",model_name="tiny-mixtral"'


def _finish_reasons(n: int) -> Case:
    lines = [f'vllm:request_success_total{{{MODEL},finished_reason="r{i}"}} 1.0' for i in range(n)]
    served = _replace_samples("vllm:request_success", lines)

    def expect(samples: Samples) -> None:
        reasons = {
            dict(labels)["finished_reason"]
            for (name, labels), _ in samples.items()
            if name == "moe_watch_requests_finished_total" and dict(labels)["engine"] == "hostile"
        }
        assert len(reasons) == min(n, limits.LABEL_VALUES_PER_COUNTER), sorted(reasons)

    return Case("LABEL_VALUES_PER_COUNTER", "engine", n > limits.LABEL_VALUES_PER_COUNTER,
                ENGINE, "series_limit", lambda world: world.serve_metrics(served),
                f"{n} finished_reason values", expect=expect)  # fmt: skip


def _histogram_bounds(k: int, falling: bool) -> Case:
    """The prompt-length histogram (no fixed bounds: re-published as the engine has it) with
    ``k`` finite bounds; its cumulative counts rise, or (``falling``) fall."""
    monotonic = not falling
    counts = [float(i if monotonic else k - i) for i in range(k)]
    lines = [f'vllm:request_prompt_tokens_bucket{{{MODEL},le="{i + 1}.0"}} {c}'
             for i, c in enumerate(counts)]  # fmt: skip
    total = float(k if monotonic else k + 1)
    lines += [f'vllm:request_prompt_tokens_bucket{{{MODEL},le="+Inf"}} {total}',
              f"vllm:request_prompt_tokens_count{{{MODEL}}} {total}",
              f"vllm:request_prompt_tokens_sum{{{MODEL}}} {float(k * k)}"]  # fmt: skip
    served = _replace_samples("vllm:request_prompt_tokens", lines)
    engine = dict(zip([float(i + 1) for i in range(k)], counts, strict=True))

    def expect(samples: Samples) -> None:
        buckets = {
            float(dict(labels)["le"]): value
            for (name, labels), value in samples.items()
            if name == "moe_watch_request_prompt_tokens_bucket"
            and dict(labels)["engine"] == "hostile"
        }
        finite = {le: v for le, v in buckets.items() if math.isfinite(le)}
        assert len(finite) <= limits.HISTOGRAM_BOUNDS, len(finite)
        if not monotonic:  # not a histogram: whatever is published stays bounded
            return
        assert buckets.get(math.inf) == total, buckets.get(math.inf)
        assert all(engine[le] == v for le, v in finite.items()), finite  # counts stay exact
        assert len(finite) == min(k, limits.HISTOGRAM_BOUNDS), len(finite)

    order = "rising" if monotonic else "falling"
    return Case("HISTOGRAM_BOUNDS", "engine", k > limits.HISTOGRAM_BOUNDS, ENGINE, None,
                lambda world: world.serve_metrics(served),
                f"{k} bounds, counts {order}", expect=expect)  # fmt: skip


# -- the EPLB log ------------------------------------------------------------------------------

EPLB_LINE = (
    "EPLB step: {step} for model {model}: avg_tokens=1.0, max_tokens=2, balancedness=0.5, "
    "steps until the next rearrangement: 9\n"
)


def _append(text: str) -> Callable[[Hostile], None]:
    def apply(world: Hostile) -> None:
        with world.eplb_log.open("a") as stream:
            stream.write(text)

    return apply


def _line_bytes(n: int) -> Case:
    line = EPLB_LINE.format(step=1, model="m")
    line = line[:-1] + " " * max(n - len(line) + 1, 0) + "\n"  # n bytes before the newline
    size = len(line) - 1
    return Case("LOG_LINE_BYTES", "eplb", size > limits.LOG_LINE_BYTES, EPLB,
                "line_too_long", _append(line), f"line of {size} bytes")  # fmt: skip


def _log_backlog(n: int) -> Case:
    line = EPLB_LINE.format(step=1, model="m")
    lines = max(n // len(line), 1)
    return Case("LOG_BYTES_PER_CYCLE", "eplb", lines * len(line) > limits.LOG_BYTES_PER_CYCLE,
                EPLB, None, _append(line * lines), f"{lines * len(line)} bytes at once")  # fmt: skip


def _eplb_models(n: int) -> Case:
    text = "".join(EPLB_LINE.format(step=i, model=f"model-{i}") for i in range(n))
    return Case("MODELS_PER_ENGINE", "eplb", n > limits.MODELS_PER_ENGINE, EPLB, "series_limit",
                _append(text), f"{n} models")  # fmt: skip


def _eplb_model_chars(n: int) -> Case:
    return Case("LABEL_VALUE_CHARS", "eplb", n > limits.LABEL_VALUE_CHARS, EPLB,
                "label_too_long", _append(EPLB_LINE.format(step=1, model="m" * n)),
                f"model of {n} chars")  # fmt: skip


# -- the command line of the process on the hostile engine's GPU -------------------------------


def _cmdline(limit: str, past: bool, reason: str, args: list[bytes], note: str) -> Case:
    def apply(world: Hostile) -> None:
        world.set_cmdline(args)

    return Case(limit, "proc", past, "proc" if reason == "too_large" else ENGINE, reason,
                apply, note)  # fmt: skip


SERVE = [b"vllm", b"serve", b"m"]


def _cmdline_bytes(size: int) -> Case:
    # /proc/<pid>/cmdline ends every argument with a NUL
    head = sum(len(a) + 1 for a in [*SERVE, b"--x"])
    args = [*SERVE, b"--x", b"y" * max(size - head - 1, 1)]
    total = sum(len(a) + 1 for a in args)
    return _cmdline("CMDLINE_BYTES", total > limits.CMDLINE_BYTES, "too_large", args,
                    f"{total} bytes")  # fmt: skip


def _cmdline_args(n: int) -> Case:
    args = [*SERVE, *[b"--x"] * (n - len(SERVE))]
    return _cmdline("CMDLINE_ARGS", n > limits.CMDLINE_ARGS, "too_large", args, f"{n} arguments")


def _num_seqs(text: str) -> Case:
    try:
        value = float(text)
        ok = math.isfinite(value) and value.is_integer() and 1 <= value <= limits.NUM_SEQS
    except ValueError:
        ok = False
    # argparse takes a value that starts with "-" (other than a plain negative number) as the
    # next flag: vLLM's command line can only carry it attached
    flag = [b"--max-num-seqs=" + text.encode()] if text.startswith("-") else [
        b"--max-num-seqs", text.encode()]  # fmt: skip
    return _cmdline("NUM_SEQS", not ok, "bad_value", [*SERVE, *flag], f"--max-num-seqs {text}")


def _num_seqs_texts() -> st.SearchStrategy[str]:
    bound = limits.NUM_SEQS
    return st.one_of(
        around(bound, far=10**30).map(str),
        st.sampled_from(["nan", "inf", "-inf", "1e400", "-1", "0", "8.5", "0x10", "", "1e6"]),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
    )


# -- SGLang recorder dumps and answers ---------------------------------------------------------

SGLANG = "experts:sglang"
DUMP = "expert_distribution_recorder_{}.pt"
PICKLE_HEAD = b"\x80\x02"


def dump_pickle(value: bytes, pad: int = 0) -> bytes:
    """data.pkl of ``{"logical_count": value}``, ``pad`` bytes longer (a string pushed, popped)."""
    padding = b"X" + len(b"p" * pad).to_bytes(4, "little") + b"p" * pad + b"0" if pad else b""
    return PICKLE_HEAD + padding + b"}" + _str("logical_count") + value + b"s."


def write_dump(members: dict[str, tuple[bytes, bool]]) -> Callable[[Hostile], None]:
    """A .pt dump (``name -> (bytes, deflated)`` under archive/), written aside then renamed
    into the queue, so the agent never reads half of it."""

    def apply(world: Hostile) -> None:
        aside = world.dump_dir / "next.pt.part"
        with zipfile.ZipFile(aside, "w") as archive:
            for name, (data, deflated) in members.items():
                kind = zipfile.ZIP_DEFLATED if deflated else zipfile.ZIP_STORED
                archive.writestr(f"archive/{name}", data, compress_type=kind)
        os.replace(aside, world.dump_dir / DUMP.format(time.time_ns()))

    return apply


def _dump(limit: str, past: bool, reason: str, members: dict[str, tuple[bytes, bool]],
          note: str) -> Case:  # fmt: skip
    return Case(limit, "sglang", past, SGLANG, reason, write_dump(members), note)


GOOD_TENSOR = (dump_pickle(tensor_opcodes((1, 2, 4))), False)
GOOD_STORAGE = (floats([1.0] * 8), False)


def _zip_size(pad: int) -> int:
    members = {"data.pkl": GOOD_TENSOR, "data/0": GOOD_STORAGE, "pad": (b"\0" * pad, False)}
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, (data, _) in members.items():
            archive.writestr(f"archive/{name}", data)
    return len(buffer.getvalue())


def _dump_file_bytes(size: int) -> Case:
    pad = size - _zip_size(0)  # a stored member adds exactly its size (no zip64 below 4 GiB)
    members = {"data.pkl": GOOD_TENSOR, "data/0": GOOD_STORAGE, "pad": (b"\0" * pad, False)}
    return _dump("DUMP_FILE_BYTES", size > limits.DUMP_FILE_BYTES, "too_large", members,
                 f"a .pt of {size} bytes")  # fmt: skip


def _dump_member_bytes(size: int) -> Case:
    # zeros deflate ~1000:1: a bomb of ``size`` bytes, a byte storage the tensor reads 8 of
    members = {"data.pkl": (dump_pickle(tensor_opcodes((1, 2, 4), storage="ByteStorage")), False),
               "data/0": (b"\0" * size, True)}  # fmt: skip
    return _dump("DUMP_MEMBER_BYTES", size > limits.DUMP_MEMBER_BYTES, "too_large", members,
                 f"a storage decompressing to {size} bytes")  # fmt: skip


def _dump_pickle_bytes(size: int) -> Case:
    pad = size - len(dump_pickle(tensor_opcodes((1, 2, 4)), 1)) + 1
    pkl = dump_pickle(tensor_opcodes((1, 2, 4)), pad)
    members = {"data.pkl": (pkl, True), "data/0": GOOD_STORAGE}
    return _dump("DUMP_PICKLE_BYTES", len(pkl) > limits.DUMP_PICKLE_BYTES, "too_large", members,
                 f"data.pkl of {len(pkl)} bytes")  # fmt: skip


def _tensor_cells(cells: int) -> Case:
    # [cells, 1, 1]: one expert, ``cells`` passes, twice: once stored whole, once as a view
    # whose every pass reads the storage's one byte (stride 0), a file of a few hundred bytes
    # that declares the whole tensor.
    whole = tensor_opcodes((cells, 1, 1), storage="ByteStorage")
    strided = tensor_opcodes((cells, 1, 1), storage="ByteStorage", stride=(0, 1, 1))
    storage = b"\0" * min(cells, limits.DUMP_MEMBER_BYTES)
    write_whole = write_dump({"data.pkl": (dump_pickle(whole), False), "data/0": (storage, True)})
    write_strided = write_dump({"data.pkl": (dump_pickle(strided), False),
                                "data/0": (b"\0", False)})  # fmt: skip

    def apply(world: Hostile) -> None:
        write_whole(world)
        write_strided(world)

    return Case("TENSOR_CELLS", "sglang", cells > limits.TENSOR_CELLS, SGLANG, "too_large",
                apply, f"two tensors of {cells} cells (whole, stride 0)")  # fmt: skip


def _error_body(size: int | None) -> Case:
    def apply(world: Hostile) -> None:
        world.serve_recorder(500, None if size is None else b"e" * size)

    past = size is None or size > limits.ERROR_BODY_BYTES
    return Case("ERROR_BODY_BYTES", "sglang", past, SGLANG, None, apply,
                "an endless 500" if size is None else f"a 500 of {size} bytes")  # fmt: skip


# -- the Kubernetes API (pod list, watch, the service-account token) -------------------------

DISCOVERY = "discovery"
CLOSED_PORT = 1  # discovered engines point here: refused at once, nothing to scrape
STATIC_TARGETS = 3  # the world's configured targets count against TARGETS_PER_AGENT


def pod(i: int, generation: int, *, annotated: bool = False) -> dict[str, Any]:
    annotations = {"moe-watch.io/scrape": "true", "moe-watch.io/port": str(CLOSED_PORT)}
    return {
        "metadata": {"name": f"p{i:05d}", "namespace": "adv", "uid": f"uid-{i}",
                     "resourceVersion": str(generation),
                     "annotations": annotations if annotated else {}},
        "status": {"phase": "Running", "podIP": "127.0.0.1"},
    }  # fmt: skip


def pod_list(generation: int, items: list[dict[str, Any]], size: int = 0) -> bytes:
    body = json.dumps({"kind": "PodList", "metadata": {"resourceVersion": str(generation)},
                       "items": items}).encode()  # fmt: skip
    return body + b" " * max(size - len(body), 0)  # whitespace: valid JSON of any size


def _kube(limit: str, past: bool, reason: str, pods: Callable[[int], tuple[bytes, list[bytes]]],
          note: str, *, chunked: bool = False, watched: bool = False,
          before: Callable[[Hostile], None] | None = None) -> Case:  # fmt: skip
    published: list[int] = []

    def apply(world: Hostile) -> None:
        if before is not None:
            before(world)
        published.append(world.publish_pods(pods, chunked=chunked))

    def settled(world: Hostile) -> bool:
        seen = world.kube_watched if watched else world.kube_listed
        return bool(published) and seen(published[-1])

    return Case(limit, "kube", past, DISCOVERY, reason, apply, note, settled)


def _list_bytes(size: int, chunked: bool) -> Case:
    def pods(generation: int) -> tuple[bytes, list[bytes]]:
        return pod_list(generation, [pod(0, generation)], size), []

    return _kube("LIST_BYTES", size > limits.LIST_BYTES, "too_large", pods,
                 f"a list of {size} bytes" + (" (chunked)" if chunked else ""),
                 chunked=chunked)  # fmt: skip


def _watch_line(size: int) -> Case:
    def pods(generation: int) -> tuple[bytes, list[bytes]]:
        event = json.dumps({"type": "ADDED", "object": pod(0, generation)}).encode()
        return pod_list(generation, []), [event + b" " * (size - len(event)) + b"\n"]

    return _kube("WATCH_LINE_BYTES", size > limits.WATCH_LINE_BYTES, "line_too_long", pods,
                 f"a watch line of {size} bytes", watched=True)  # fmt: skip


def _targets(n: int) -> Case:
    def pods(generation: int) -> tuple[bytes, list[bytes]]:
        return pod_list(generation, [pod(i, generation, annotated=True) for i in range(n)]), []

    total = n + STATIC_TARGETS
    return _kube("TARGETS_PER_AGENT", total > limits.TARGETS_PER_AGENT, "too_many_targets",
                 pods, f"{n} pods + {STATIC_TARGETS} configured targets")  # fmt: skip


def _token(size: int) -> Case:
    def token(world: Hostile) -> None:
        world.set_token(b"t" * size)

    def pods(generation: int) -> tuple[bytes, list[bytes]]:
        return pod_list(generation, []), []

    return _kube("TOKEN_BYTES", size > limits.TOKEN_BYTES, "credentials", pods,
                 f"a token of {size} bytes", before=token)  # fmt: skip


# -- the agent's own server -------------------------------------------------------------------

# The adversary's agent runs its server with the time limits scaled down (the settings whose
# defaults are HEADER_SECONDS and WRITE_SECONDS), so a case waits a second, not half a minute;
# the connection and size limits are the defaults. It requires basic auth of one user whose
# password is PASSWORD_BYTES long.
AGENT_HEADER_SECONDS = 1.0
AGENT_WRITE_SECONDS = 1.0
LOGIN = "adversary"
PASSWORD = (b"moe-watch-adversary-" * 4)[: limits.PASSWORD_BYTES]
SERVER = "server"  # no source counts the server's refusals: the connection is the evidence
PATH = "/adversary"  # not a probe, not served: 404 once past basic auth


def basic(login: str, password: bytes) -> bytes:
    return b"Authorization: Basic " + base64.b64encode(login.encode() + b":" + password) + b"\r\n"


AUTH = basic(LOGIN, PASSWORD)


def server_cap() -> int:
    """The agent's connection cap: the default, unless its descriptors cannot hold it (the
    agent inherits this process's limit)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = limits.SERVER_CONNECTIONS
    return cap if soft == resource.RLIM_INFINITY else max(1, min(cap, soft // 2))


def _unchanged(world: Hostile) -> None:
    """A server case changes nothing the agent reads."""


def _server(limit: str, past: bool, note: str,
            attack: Callable[[Hostile], AbstractContextManager[None]]) -> Case:  # fmt: skip
    return Case(limit, "server", past, SERVER, None, _unchanged, note, attack=attack)


def _fill(world: Hostile, held: list[socket.socket], n: int) -> list[int | None]:
    """``n`` kept-alive connections that each asked for a non-probe path: the status each got
    (None: closed without an answer)."""
    statuses: list[int | None] = []
    for _ in range(n):
        sock = connect(address(world.agent_url))
        held.append(sock)
        send(sock, request(PATH, AUTH))
        answer = Reader(sock).answer()
        statuses.append(None if answer is None else answer[0])
    return statuses


def status(answer: tuple[int, bytes] | None) -> int | None:
    return None if answer is None else answer[0]


def _counted(statuses: list[int | None]) -> dict[int | None, int]:
    return {status: statuses.count(status) for status in set(statuses)}


def _connections(n: int) -> Case:
    cap = server_cap()

    @contextlib.contextmanager
    def attack(world: Hostile) -> Iterator[None]:
        with sockets() as held:
            statuses = _fill(world, held, n)
            # up to the cap each is served; past it, closed unanswered (a reserved connection
            # serves probes only, and past the reserve none is accepted)
            expected = [404] * min(n, cap) + [None] * max(n - cap, 0)
            assert statuses == expected, _counted(statuses)
            yield

    return _server("SERVER_CONNECTIONS", n > cap, f"{n} kept-alive connections", attack)


def _probe_connections(m: int, kind: str) -> Case:
    cap, reserve = server_cap(), limits.PROBE_CONNECTIONS

    @contextlib.contextmanager
    def attack(world: Hostile) -> Iterator[None]:
        with sockets() as held:
            assert _fill(world, held, cap) == [404] * cap  # every ordinary connection taken
            probes: list[int | None] = []
            for _ in range(m):
                sock = connect(address(world.agent_url))
                held.append(sock)
                if kind == "kept-alive probes":
                    send(sock, request("/healthz"))
                    answer = Reader(sock).answer()
                    probes.append(None if answer is None else answer[0])
            if kind == "kept-alive probes":
                assert set(probes) <= {200, None}, probes
                if m <= reserve:
                    assert probes == [200] * m, probes
            reserved = held[cap:]
            deadline = time.monotonic() + 0.5  # well inside the reserve's header timeout
            while sum(not closed_by_agent(s) for s in reserved) > reserve:
                assert time.monotonic() < deadline, "more reserved connections than the reserve"
                time.sleep(0.01)  # polls the condition
            yield

    return _server("PROBE_CONNECTIONS", m > reserve, f"{cap} connections + {m} {kind}", attack)


def _header_bytes(n: int, where: str) -> Case:
    if where == "a header value":
        data = request("/healthz", AUTH + b"X-Adversary: " + b"v" * n + b"\r\n")
    else:  # the request target: a query the probe ignores
        data = request("/healthz?" + "q" * (n - len("/healthz?")), AUTH)

    @contextlib.contextmanager
    def attack(world: Hostile) -> Iterator[None]:
        with sockets() as held:
            sock = connect(address(world.agent_url))
            held.append(sock)
            send(sock, data)
            reader = Reader(sock)
            answer = reader.answer()
            if n > limits.HEADER_BYTES:  # 400, and the connection closed
                assert status(answer) == 400, answer
                assert reader.until_closed(5.0), "still open after a 400"
            else:
                assert status(answer) == 200, answer
            yield

    return _server("HEADER_BYTES", n > limits.HEADER_BYTES, f"{where} of {n} bytes", attack)


def _header_seconds(fraction: float) -> Case:
    """Headers trickled over ``fraction`` of the agent's header timeout, a line at a time."""
    total = fraction * AGENT_HEADER_SECONDS
    lines = 10

    @contextlib.contextmanager
    def attack(world: Hostile) -> Iterator[None]:
        outcome: dict[str, Any] = {}
        with sockets() as held:
            sock = connect(address(world.agent_url))
            held.append(sock)
            reader = Reader(sock)

            def trickle() -> None:
                started = time.monotonic()
                send(sock, request("/healthz").removesuffix(b"\r\n"))  # headers not ended
                for i in range(lines):
                    # the attack's pace: a line every tenth of ``total``, unless closed first
                    if reader.until_closed(started + total * (i + 1) / lines - time.monotonic()):
                        outcome["closed"] = time.monotonic() - started
                        return
                    send(sock, b"X-Slow-%d: y\r\n" % i)
                send(sock, b"\r\n")
                outcome["answer"] = reader.answer()
                outcome["closed"] = time.monotonic() - started if reader.closed else None

            worker = threading.Thread(target=trickle, daemon=True)
            worker.start()
            yield
            worker.join(timeout=total + 10)
            assert not worker.is_alive(), "the trickler did not end"
        if fraction > 1:  # closed at the header deadline, unanswered
            assert outcome.get("answer") is None, outcome
            closed = outcome["closed"]
            assert closed is not None, outcome
            assert 0.8 * AGENT_HEADER_SECONDS <= closed <= AGENT_HEADER_SECONDS + 1.0, outcome
        else:
            answer = outcome.get("answer")
            assert status(answer) == 200, outcome

    return _server("HEADER_SECONDS", fraction > 1, f"headers over {total:.2f} s", attack)


PIPELINED = 512  # /metrics answers asked for at once: ~12 MB, past every socket buffer (4 MiB here)


def _write_seconds(fraction: float) -> Case:
    """``PIPELINED`` /metrics requests on one connection with a 4 KiB window, not read for
    ``fraction`` of the agent's write timeout, then read."""
    wait = fraction * AGENT_WRITE_SECONDS

    @contextlib.contextmanager
    def attack(world: Hostile) -> Iterator[None]:
        with sockets() as held:
            sock = connect(address(world.agent_url), rcvbuf=4096)
            held.append(sock)
            send(sock, request("/metrics", AUTH) * PIPELINED)
            sent = time.monotonic()
            yield  # probed while the agent's writes are stalled
            time.sleep(max(0.0, sent + wait - time.monotonic()))  # the attack: not reading
            reader = Reader(sock)
            answers = []
            for _ in range(PIPELINED):
                answer = reader.answer(10.0)
                if answer is None:
                    break
                answers.append(answer[0])
        if fraction > 1:  # the stalled answer is cut at the write deadline, the rest not sent
            assert reader.closed, (len(answers), reader.received)
            assert len(answers) < PIPELINED, (len(answers), reader.received)
        else:
            assert answers == [200] * PIPELINED, (len(answers), reader.closed)

    return _server("WRITE_SECONDS", fraction > 1, f"{PIPELINED} /metrics unread {wait:.2f} s",
                   attack)  # fmt: skip


def _password(n: int) -> Case:
    password = PASSWORD[:n] if n <= len(PASSWORD) else PASSWORD + b"x" * (n - len(PASSWORD))

    @contextlib.contextmanager
    def attack(world: Hostile) -> Iterator[None]:
        with sockets() as held:
            sock = connect(address(world.agent_url))
            held.append(sock)
            send(sock, request(PATH, basic(LOGIN, password)))
            answer = Reader(sock).answer()
            # only the whole password passes; one past bcrypt's 72 bytes is refused, though
            # bcrypt itself would compare only its first 72
            expected = 404 if password == PASSWORD else 401
            assert status(answer) == expected, (answer, n)
            yield

    return _server("PASSWORD_BYTES", n > limits.PASSWORD_BYTES, f"a password of {n} bytes",
                   attack)  # fmt: skip


# -- the table ---------------------------------------------------------------------------------

L = limits
P, E, M, G, C = "plugin", "engine", "metadata", "eplb", "proc"
S, K, H = "sglang", "kube", "server"
N = L.SERVER_CONNECTIONS

# limit -> (boundary, strategy) for every boundary where it is checked
STRATEGIES: dict[str, list[tuple[str, st.SearchStrategy[Case]]]] = {
    "PLUGIN_FILE_BYTES": [(P, around(L.PLUGIN_FILE_BYTES).map(_file_bytes))],
    "CELLS_PER_FILE": [(P, st.integers(510, 514).map(_cells_per_file))],
    "ENGINE_CELLS": [(P, st.integers(254, 258).map(lambda n: _stages("ENGINE_CELLS", 256, 256, n)))],
    "ENGINE_LAYERS": [(P, st.integers(510, 514).map(lambda n: _stages("ENGINE_LAYERS", 2, 512, n)))],
    "LAYER_INDEX": [(P, around(L.LAYER_INDEX, far=2**64).map(_layer))],
    "EXPERTS_PER_LAYER": [(P, around(L.EXPERTS_PER_LAYER, far=4 * L.EXPERTS_PER_LAYER).map(_experts))],
    "EP_RANKS": [(P, around(L.EP_RANKS, far=2**62).map(_ep_size))],
    "PROCESS_ID": [(P, around(L.PROCESS_ID, far=2**64).map(_pid))],
    "COUNT": [
        (P, st.one_of(
            around(L.COUNT, far=2**70),
            st.integers(-(2**64), -1),
            st.sampled_from([math.nan, math.inf, -math.inf, 0.5, 1e300]),
        ).map(_count))
    ],
    "A2A_BOUNDS": [(P, around(L.A2A_BOUNDS, far=4096).map(_a2a))],
    "FILES_PER_CYCLE": [(P, around(L.FILES_PER_CYCLE, far=256).map(_files))],
    "SCAN_ENTRIES": [(P, st.integers(L.SCAN_ENTRIES - 1, L.SCAN_ENTRIES + 64).map(_entries))],
    "LABEL_VALUE_CHARS": [
        (P, around(L.LABEL_VALUE_CHARS, far=100_000).map(_model_chars)),
        (E, around(L.LABEL_VALUE_CHARS, far=100_000).map(_label_chars)),
        (M, around(L.LABEL_VALUE_CHARS, far=100_000).map(_version_chars)),
        (G, around(L.LABEL_VALUE_CHARS, far=50_000).map(_eplb_model_chars)),
    ],
    "JSON_DEPTH": [
        (P, around(L.JSON_DEPTH, far=100_000).map(_plugin_depth)),
        (M, around(L.JSON_DEPTH, far=100_000).map(_metadata_depth)),
    ],
    "ENGINE_BODY_BYTES": [(E, st.builds(_body_bytes, around(L.ENGINE_BODY_BYTES, far=L.ENGINE_BODY_BYTES + 4096),
                                        st.sampled_from(BODY_LINES)))],
    "METADATA_BYTES": [(M, around(L.METADATA_BYTES, far=4 * L.METADATA_BYTES).map(_metadata_bytes))],
    "SERIES_PER_ENGINE": [(E, around(L.SERIES_PER_ENGINE, far=3 * L.SERIES_PER_ENGINE).map(_series))],
    "MODELS_PER_ENGINE": [
        (E, around(L.MODELS_PER_ENGINE, far=4096).map(_models)),
        (G, around(L.MODELS_PER_ENGINE, far=1000).map(_eplb_models)),
    ],
    "INFO_LABELS": [(E, around(L.INFO_LABELS, far=4096).map(_info_labels))],
    "KV_ALLOCATION": [(E, _kv_strategy())],
    "LABEL_VALUES_PER_COUNTER": [(E, around(L.LABEL_VALUES_PER_COUNTER, far=4096).map(_finish_reasons))],
    "HISTOGRAM_BOUNDS": [(E, st.builds(_histogram_bounds, around(L.HISTOGRAM_BOUNDS, far=4096),
                                       st.booleans()))],
    "MODEL_LEN": [
        (M, st.one_of(
            around(L.MODEL_LEN, far=10**400),
            st.integers(-(2**64), 0),
            st.sampled_from([math.nan, math.inf, 1e309, 4096.0, 0.5]),
        ).map(_model_len))
    ],
    "LOG_LINE_BYTES": [(G, around(L.LOG_LINE_BYTES, far=4 * L.LOG_LINE_BYTES).map(_line_bytes))],
    "LOG_BYTES_PER_CYCLE": [
        (G, st.integers(L.LOG_BYTES_PER_CYCLE - 200, 2 * L.LOG_BYTES_PER_CYCLE).map(_log_backlog))
    ],
    "CMDLINE_BYTES": [(C, around(L.CMDLINE_BYTES, far=4 * L.CMDLINE_BYTES).map(_cmdline_bytes))],
    "CMDLINE_ARGS": [(C, around(L.CMDLINE_ARGS, far=16 * L.CMDLINE_ARGS).map(_cmdline_args))],
    "NUM_SEQS": [(C, _num_seqs_texts().map(_num_seqs))],
    "DUMP_FILE_BYTES": [(S, around(L.DUMP_FILE_BYTES, far=L.DUMP_FILE_BYTES + 4096).map(_dump_file_bytes))],
    "DUMP_MEMBER_BYTES": [(S, around(L.DUMP_MEMBER_BYTES, far=2 * L.DUMP_MEMBER_BYTES).map(_dump_member_bytes))],
    "DUMP_PICKLE_BYTES": [(S, around(L.DUMP_PICKLE_BYTES, far=4 * L.DUMP_PICKLE_BYTES).map(_dump_pickle_bytes))],
    "TENSOR_CELLS": [(S, around(L.TENSOR_CELLS, far=2 * L.TENSOR_CELLS).map(_tensor_cells))],
    "ERROR_BODY_BYTES": [(S, st.one_of(around(L.ERROR_BODY_BYTES, far=1 << 20),
                                       st.none()).map(_error_body))],
    "LIST_BYTES": [(K, st.builds(_list_bytes, around(L.LIST_BYTES, far=L.LIST_BYTES + 4096),
                                 st.booleans()))],
    "WATCH_LINE_BYTES": [(K, around(L.WATCH_LINE_BYTES, far=2 * L.WATCH_LINE_BYTES).map(_watch_line))],
    "TARGETS_PER_AGENT": [(K, around(L.TARGETS_PER_AGENT - STATIC_TARGETS, far=1024).map(_targets))],
    "TOKEN_BYTES": [(K, around(L.TOKEN_BYTES, far=4 * L.TOKEN_BYTES).map(_token))],
    "SERVER_CONNECTIONS": [(H, around(N, far=4 * N).map(_connections))],
    "PROBE_CONNECTIONS": [(H, st.builds(_probe_connections, around(L.PROBE_CONNECTIONS, far=64),
                                        st.sampled_from(["silent connections",
                                                         "kept-alive probes"])))],
    "HEADER_BYTES": [(H, st.builds(_header_bytes, around(L.HEADER_BYTES, far=1 << 20),
                                   st.sampled_from(["a header value", "the request target"])))],
    "HEADER_SECONDS": [(H, st.one_of(st.floats(0.2, 0.6), st.floats(1.3, 3.0)).map(_header_seconds))],
    "WRITE_SECONDS": [(H, st.one_of(st.floats(0.0, 0.4), st.floats(1.5, 3.0)).map(_write_seconds))],
    "PASSWORD_BYTES": [(H, around(L.PASSWORD_BYTES, far=4096).map(_password))],
}  # fmt: skip

# Limits without a strategy, each with where it is held.
EXEMPT: dict[str, str] = {
    # Read by the `size` CLI, not the running agent: the property tests drive them instead.
    "CONFIG_JSON_BYTES": "size --config, not the agent: tests/sizing/test_size_config_input.py",
    "CONFIG_NUMBER": "size --config, not the agent: tests/test_properties.py (any config field)",
    "PARAMS_B": "size --params-b, not the agent: tests/sizing/test_size_config_input.py",
    # Bodies of several engines at once; the world has one hostile engine, whose body alone
    # stops at ENGINE_BODY_BYTES, under this budget.
    "BODY_BYTES_IN_FLIGHT": "several engines at once: tests/sources/test_body_budget.py",
}

BOUNDARIES = (P, E, M, G, C, S, K, H)


def by_boundary(boundary: str) -> st.SearchStrategy[Case]:
    """Every strategy of ``boundary``, as one."""
    return st.one_of(
        [strategy for entries in STRATEGIES.values() for b, strategy in entries if b == boundary]
    )
