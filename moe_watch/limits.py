"""Every bound on what the agent reads from outside, declared once.

A value that crosses into the agent (a file a tenant's process writes, an engine's answer, a
command line of a process on the GPU, an API-server object, an HTTP client of the agent's own
server) is checked where it enters against a limit declared here; past it the value is refused
and counted under ``moe_watch_collect_errors_total{source,reason}`` with the ``reason`` the
limit names (or, for the agent's own server, the connection is closed). The readers import their
numbers from this module and nowhere else, and docs/limits.md is generated from it
(``python -m moe_watch.limits > docs/limits.md``; a test keeps the two equal).

Each number is a few times what the largest real case needs (DeepSeek-V3: 58 MoE layers x 256
experts, 15,616 cells with its 3 dense layers counted; Kimi K2: 384 experts), so real engines
never meet a limit, and small enough that one hostile input costs a bounded amount of memory and
CPU time.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TypeVar

N = TypeVar("N", int, float)


@dataclass(frozen=True, slots=True)
class Limit:
    name: str  # the constant's name in this module
    value: int | float
    unit: str  # "bytes", "cells", "characters", "seconds", ... ("" for a plain count)
    what: str  # what is bounded, where it enters
    why: str  # why that number
    past: str  # what happens past it: the counted reason, and what is kept

    @property
    def shown(self) -> str:
        value = self.value
        if self.unit == "bytes" and isinstance(value, int) and value >= 1024:
            for size, suffix in ((1 << 20, "MiB"), (1 << 10, "KiB")):
                if value % size == 0:
                    return f"{value // size} {suffix}"
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = f"{value:,}" if isinstance(value, int) else f"{value:g}"
        return f"{text} {self.unit}".strip()


LIMITS: dict[str, Limit] = {}


def _declare(name: str, value: N, unit: str, what: str, why: str, past: str) -> N:
    if name in LIMITS:
        raise ValueError(f"limit {name} declared twice")
    LIMITS[name] = Limit(name, value, unit, what, why, past)
    return value


# -- files in shared directories (plugin counts, SGLang dumps, the EPLB log) ------------------

PLUGIN_FILE_BYTES = _declare(
    "PLUGIN_FILE_BYTES", 8 * 1024 * 1024, "bytes",
    "one plugin counts file (`*.experts.json`)",
    "a DeepSeek-V3 worker's file is ~100 KB",
    "`too_large`: the file is not read; the engine's other files are",
)  # fmt: skip
CELLS_PER_FILE = _declare(
    "CELLS_PER_FILE", 1 << 17, "cells",
    "layers x experts of one plugin file or one SGLang dump",
    "8x DeepSeek-V3's 15,616",
    "`too_large`: the file is not read",
)  # fmt: skip
ENGINE_CELLS = _declare(
    "ENGINE_CELLS", 1 << 17, "cells",
    "layers x experts of one engine, all its files joined (pipeline stages add layers)",
    "8x DeepSeek-V3; the window keeps a copy per cycle, so memory follows this number",
    "`too_large`: the engine's expert counts are refused this cycle (its window ages out); "
    "other engines are untouched",
)  # fmt: skip
ENGINE_LAYERS = _declare(
    "ENGINE_LAYERS", 1024, "",
    "MoE layers of one engine, all its files joined",
    "16x DeepSeek-V3's 61; a `layer` label per layer",
    "`too_large` (as above)",
)  # fmt: skip
LAYER_INDEX = _declare(
    "LAYER_INDEX", 65_535, "",
    "a layer index in a plugin file (the `layer` label value)",
    "no model has 65,536 layers",
    "`bad_file`: the file is not read",
)  # fmt: skip
EXPERTS_PER_LAYER = _declare(
    "EXPERTS_PER_LAYER", 16_384, "",
    "logical experts per MoE layer (plugin files, SGLang dumps, the engine joined)",
    "42x Kimi K2's 384; an `expert` label per expert, and the EPLB what-if works on each",
    "`too_large`: the file (or the engine's counts) is not used",
)  # fmt: skip
EP_RANKS = _declare(
    "EP_RANKS", 1024, "",
    "`ep_size` of an engine (plugin files, the `experts.ep_size` setting); every other rank "
    "field (`dp_rank`, `tp_rank`, `pp_rank`, `ep_rank`) is below it",
    "4x the largest expert-parallel deployments (DeepSeek's 320 GPUs); one "
    "`expert_rank_load_ratio` series per rank, and the what-if allocates per rank",
    "`too_large` for `ep_size`, `bad_file` for a rank field: the file is not read",
)  # fmt: skip
PROCESS_ID = _declare(
    "PROCESS_ID", 1 << 22, "",
    "`pid` in a plugin file",
    "Linux's largest pid_max",
    "`bad_file`",
)  # fmt: skip
COUNT = _declare(
    "COUNT", 1 << 53, "",
    "one routed-token count (plugin files, SGLang dumps): finite, non-negative, at most this",
    "the largest integer a float holds exactly, so sums over ranks and dumps never lose counts",
    "`bad_file` (plugin), `bad_value` (SGLang): the file is not read",
)  # fmt: skip
A2A_BOUNDS = _declare(
    "A2A_BOUNDS", 64, "",
    "bucket bounds of a plugin file's all-to-all histogram",
    "the plugin writes 17",
    "`bad_file`",
)  # fmt: skip
FILES_PER_CYCLE = _declare(
    "FILES_PER_CYCLE", 64, "",
    "files read per engine directory per cycle (plugin: the most recently written; SGLang: the "
    "oldest dumps, the rest wait)",
    "one file per counting worker; a node has a few dozen at most",
    "`too_many_files` (plugin)",
)  # fmt: skip
SCAN_ENTRIES = _declare(
    "SCAN_ENTRIES", 4096, "",
    "directory entries looked at per cycle in an engine directory",
    "64x the files read",
    "the rest of the directory is not looked at this cycle",
)  # fmt: skip
DUMP_FILE_BYTES = _declare(
    "DUMP_FILE_BYTES", 64 * 1024 * 1024, "bytes",
    "one SGLang dump (`.pt` as stored, or CSV)",
    "a DeepSeek-V3 dump is a few MB",
    "`too_large`: the dump is consumed, not read",
)  # fmt: skip
DUMP_MEMBER_BYTES = _declare(
    "DUMP_MEMBER_BYTES", 64 * 1024 * 1024, "bytes",
    "one decompressed zip member of a `.pt` dump, and all its storages together",
    "zip bombs stop here",
    "`too_large`",
)  # fmt: skip
DUMP_PICKLE_BYTES = _declare(
    "DUMP_PICKLE_BYTES", 1024 * 1024, "bytes",
    "`data.pkl` of a `.pt` dump, decompressed",
    "a real one is a few hundred bytes",
    "`too_large`",
)  # fmt: skip
TENSOR_CELLS = _declare(
    "TENSOR_CELLS", 1 << 24, "cells",
    "elements of one tensor in a `.pt` dump, as declared (before it is rebuilt)",
    "passes x layers x experts of a long recording at DeepSeek-V3 scale",
    "`too_large`",
)  # fmt: skip
LOG_LINE_BYTES = _declare(
    "LOG_LINE_BYTES", 64 * 1024, "bytes",
    "one line of the EPLB log, whole or the partial line kept between cycles",
    "an EPLB line is ~200 bytes",
    "`line_too_long`: the line is dropped",
)  # fmt: skip
LOG_BYTES_PER_CYCLE = _declare(
    "LOG_BYTES_PER_CYCLE", 4 * 1024 * 1024, "bytes",
    "EPLB log read per cycle",
    "a backlog is caught up over a few cycles instead of stalling one",
    "the rest is read next cycle",
)  # fmt: skip
TOKEN_BYTES = _declare(
    "TOKEN_BYTES", 64 * 1024, "bytes",
    "the service-account token file",
    "a bound token is ~1 KB",
    "`credentials`: discovery connects without it",
)  # fmt: skip

# -- text that becomes a label value -----------------------------------------------------------

LABEL_VALUE_CHARS = _declare(
    "LABEL_VALUE_CHARS", 256, "characters",
    "a string from outside that becomes a label value or a /status field: model names (plugin "
    "files, `model_name` labels, EPLB log lines), versions, all-to-all backends, "
    "`cache_config_info` labels",
    "a Hugging Face id is at most 96 + 96 characters",
    "`bad_file` (plugin file); `label_too_long` (exposition series or info label, EPLB line, "
    "version): that value is dropped, the rest kept",
)  # fmt: skip
INFO_LABELS = _declare(
    "INFO_LABELS", 64, "",
    "labels of an engine's `cache_config_info` kept",
    "vLLM sets ~20",
    "`label_too_long`: the labels past it are dropped",
)  # fmt: skip

# -- engine answers ----------------------------------------------------------------------------

ENGINE_BODY_BYTES = _declare(
    "ENGINE_BODY_BYTES", 16 * 1024 * 1024, "bytes",
    "an engine's `/metrics` body after decompression (default of the `max_body_bytes` setting)",
    "a real vLLM exposition is ~50 KB per model and data-parallel replica",
    "`body_too_large`: the scrape fails, the engine is down this cycle",
)  # fmt: skip
BODY_BYTES_IN_FLIGHT = _declare(
    "BODY_BYTES_IN_FLIGHT", 64 * 1024 * 1024, "bytes",
    "engine `/metrics` bodies held at once, from their first byte until parsed, all engines "
    "together (default of the `max_body_bytes_in_flight` setting)",
    "the chart's memory limit is 256 MiB and the agent idles at ~85 MiB: 64 MiB of bodies and "
    "the parse of one leave room; 256 real engines' bodies are ~13 MB",
    "the largest body in flight is dropped (its connection closed): `body_budget` for that "
    "engine this cycle, the other engines read on",
)  # fmt: skip
METADATA_BYTES = _declare(
    "METADATA_BYTES", 1024 * 1024, "bytes",
    "an engine's `/v1/models` or `/version` answer",
    "a few hundred bytes in practice",
    "`metadata`: the value is not updated; the scrape goes on",
)  # fmt: skip
ERROR_BODY_BYTES = _declare(
    "ERROR_BODY_BYTES", 4096, "bytes",
    "the body of a refusal (an SGLang recorder call answered with an error status), read for "
    "the log message",
    "the first 200 characters are shown",
    "the rest is not read; the connection is closed",
)  # fmt: skip
SERIES_PER_ENGINE = _declare(
    "SERIES_PER_ENGINE", 10_000, "",
    "samples of mapped families kept per engine scrape",
    "a real vLLM exposition has ~110 per model and replica",
    "`series_limit`: the excess is dropped (also in `dropped_samples`)",
)  # fmt: skip
MODELS_PER_ENGINE = _declare(
    "MODELS_PER_ENGINE", 16, "",
    "distinct models per engine (`model_name` values of a scrape, models of its EPLB log)",
    "an engine serves one model, LoRA adapters a few more",
    "`series_limit`: the other models' samples are dropped",
)  # fmt: skip
LABEL_VALUES_PER_COUNTER = _declare(
    "LABEL_VALUES_PER_COUNTER", 16, "",
    "values of the one label an engine counter is split by (vLLM's `finished_reason` of "
    "`request_success_total`), per model",
    "vLLM 0.32 has 5 finish reasons",
    "`series_limit`: the other values are counted only in the model's total",
)  # fmt: skip
HISTOGRAM_BOUNDS = _declare(
    "HISTOGRAM_BOUNDS", 32, "",
    "finite bucket bounds of one engine histogram the agent re-publishes (latency, request "
    "lengths) when the engine's layout is not the fixed one",
    "vLLM 0.32 has at most 22 (TTFT); request lengths go 1, 2, 5 ... up to max_model_len",
    "thinned: evenly spaced bounds are kept (their counts stay exact, the buckets coarser), "
    "`+Inf` always",
)  # fmt: skip
MODEL_LEN = _declare(
    "MODEL_LEN", (1 << 31) - 1, "tokens",
    "`max_model_len` from an engine's `/v1/models` (a positive integer)",
    "200x the longest context served today (10M tokens)",
    "`bad_value`: the value is not used (no max_model_len for drift)",
)  # fmt: skip
KV_ALLOCATION = _declare(
    "KV_ALLOCATION", 1 << 50, "",
    "each number of what an engine's `cache_config_info` says it allocated (`num_gpu_blocks`, "
    "`block_size`, `kv_cache_size_tokens`, `kv_cache_max_concurrency`, "
    "`kv_cache_memory_bytes`, blocks x block size): finite, 0 to this",
    "1 PiB or 10^15 tokens; an engine core holds ~10^8 tokens and ~1 TB at most today",
    "`bad_value` under `cache_config`: the allocation is unknown (no allocated or coverage "
    "series, no `kv_cache_tokens` drift); the labels stay in /status",
)  # fmt: skip
JSON_DEPTH = _declare(
    "JSON_DEPTH", 64, "levels",
    "nesting of a JSON document read from outside (plugin files, engine metadata, pod lists "
    "and watch events, a model's `config.json`)",
    "the deepest real one (a pod object) is ~10",
    "`bad_file`, `metadata`, `bad_list`, `bad_event`: the document is not used (a "
    "`config.json`: exit 2, as `CONFIG_JSON_BYTES`)",
)  # fmt: skip

# -- a model's config.json (`moe-watch size --config`, a plan file's `config:`) -------------------

CONFIG_JSON_BYTES = _declare(
    "CONFIG_JSON_BYTES", 1024 * 1024, "bytes",
    "one Hugging Face `config.json` read for sizing",
    "the largest real one (Llama 4's, with per-layer lists) is ~10 KB",
    "exit 2 with one line naming the file (`size`); the plan file is refused (agent start)",
)  # fmt: skip
CONFIG_NUMBER = _declare(
    "CONFIG_NUMBER", 1 << 24, "",
    "each shape number a `config.json` gives sizing (layers, experts, heads, head size, hidden "
    "and intermediate sizes, windows, vocabulary): a whole number, 1 to this (0 where the key "
    "may be off)",
    "the largest real one is a vocabulary of ~262k; 64x that is no model",
    "as above: the number's key is named",
)  # fmt: skip

PARAMS_B = _declare(
    "PARAMS_B", 100_000, "billion parameters",
    "a model's total parameters given with its `config.json` (`size --params-b`, a plan "
    "file's `params_b`): a finite number above 0",
    "the largest open MoE models have ~1,000B; 100x that is no model",
    "as above",
)  # fmt: skip

# -- processes on the GPUs (/proc) ----------------------------------------------------------------

CMDLINE_BYTES = _declare(
    "CMDLINE_BYTES", 128 * 1024, "bytes",
    "one `/proc/<pid>/cmdline` (a process on an engine's GPU and its parents)",
    "Linux's single-argument limit; a vLLM command line is ~1 KB",
    "`too_large` (under `proc`): that command line is not used",
)  # fmt: skip
CMDLINE_ARGS = _declare(
    "CMDLINE_ARGS", 1024, "",
    "arguments of one command line",
    "vLLM has ~300 flags",
    "`too_large` (as above)",
)  # fmt: skip

NUM_SEQS = _declare(
    "NUM_SEQS", 1 << 20, "sequences",
    "`--max-num-seqs` on a vLLM command line (a whole number, for drift)",
    "vLLM's default is 256-1,024; a thousand times that is no real engine",
    "`bad_value` under `running`: that setting is unknown, the other drift rules still run",
)  # fmt: skip

# -- Kubernetes ----------------------------------------------------------------------------------

LIST_BYTES = _declare(
    "LIST_BYTES", 32 * 1024 * 1024, "bytes",
    "one pod list from the API server",
    "a node runs at most a few hundred pods (~10 KB each)",
    "`too_large`: listed again after a back-off",
)  # fmt: skip
WATCH_LINE_BYTES = _declare(
    "WATCH_LINE_BYTES", 2 * 1024 * 1024, "bytes",
    "one watch event (one pod object)",
    "the API server's own object limit is 1.5 MB",
    "`line_too_long`: the watch ends and the pods are listed again",
)  # fmt: skip
TARGETS_PER_AGENT = _declare(
    "TARGETS_PER_AGENT", 256, "",
    "engines one agent watches: configured targets (a start-up error past it) and discovered "
    "pods (first by namespace/pod)",
    "a node has 8-16 GPUs, 7 MIG slices each at most",
    "`too_many_targets` (under `discovery`): the pods past it are not watched, and a log line "
    "names how many and the first of them",
)  # fmt: skip

# -- the agent's own HTTP server -------------------------------------------------------------------

SERVER_CONNECTIONS = _declare(
    "SERVER_CONNECTIONS", 128, "",
    "open connections to the agent (default of `server_max_connections`)",
    "Prometheus, a few humans and the kubelet need a handful",
    "the connection of the oldest client still sending its request headers is closed to make "
    "room; when none is, the new connection is one of the probes' (below)",
)  # fmt: skip
PROBE_CONNECTIONS = _declare(
    "PROBE_CONNECTIONS", 8, "",
    "connections reserved for `/healthz` and `/readyz` on top of `server_max_connections`",
    "the kubelet probes one at a time per probe",
    "a reserved connection asking for anything else is closed; when all are taken, the oldest "
    "of them is closed to make room (it is sending nothing, trickling, or idle after its probe)",
)  # fmt: skip
HEADER_BYTES = _declare(
    "HEADER_BYTES", 8190, "bytes",
    "one request header line or field (default of `server_max_header_bytes`)",
    "aiohttp's and nginx's default",
    "400, connection closed",
)  # fmt: skip
HEADER_SECONDS = _declare(
    "HEADER_SECONDS", 10.0, "seconds",
    "time to send complete request headers (and the TLS handshake) (default of "
    "`server_header_timeout_seconds`)",
    "a real client sends them at once",
    "connection closed",
)  # fmt: skip
WRITE_SECONDS = _declare(
    "WRITE_SECONDS", 30.0, "seconds",
    "time to deliver one response (default of `server_write_timeout_seconds`)",
    "a 10 MB /experts body takes well under a second on a cluster network",
    "connection closed; responses are written in 64 KiB steps, so a client that does not read "
    "holds at most that much of the agent's memory until then",
)  # fmt: skip
PASSWORD_BYTES = _declare(
    "PASSWORD_BYTES", 72, "bytes",
    "a basic-auth password",
    "bcrypt's limit: longer ones are refused, not truncated",
    "401",
)  # fmt: skip


def _table() -> str:
    rows = [
        f"| `{limit.name}` | {limit.shown} | {limit.what} | {limit.why} | {limit.past} |"
        for limit in LIMITS.values()
    ]
    return (
        "| limit | value | what it bounds | why that number | past it |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def markdown() -> str:
    """docs/limits.md."""
    return (
        "# Limits\n\n"
        "Generated from `moe_watch/limits.py` (`python -m moe_watch.limits > docs/limits.md`): "
        "the one\nplace every bound on what the agent reads from outside is declared. Each "
        "reader checks its\ninput against these where it enters; past a limit the input is "
        "refused and counted as\n`moe_watch_collect_errors_total{source,reason}` with the "
        "reason below, and the rest of the\ncycle goes on (the other files, the other engines, "
        "the GPUs). Settings bound the agent's\nown server; their defaults are the values here "
        "([configuration.md](configuration.md)).\n\n" + _table()
    )


if __name__ == "__main__":
    sys.stdout.write(markdown())
