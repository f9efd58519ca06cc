"""Engine /metrics text -> canonical ModelSamples. Pure: no I/O, no clock.

prometheus_client's own parser does the parsing. Before it runs, lines of families we do not
map are dropped: a real vLLM exposition is ~50 KB of which we use ~15 %, so this cuts the cost
several-fold, and a malformed line in a family we ignore cannot fail the scrape.
"""

from __future__ import annotations

import functools
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from moe_watch import limits
from moe_watch import samples as s
from moe_watch.samples import Histogram, ModelSample
from moe_watch.sources.engine_names import BY_KIND, MODEL_LABEL, PREFIXES, Route

# Gauges where the fullest data-parallel replica matters more than the total.
_MAX_AGGREGATED = frozenset({s.GAUGE_KV_CACHE_USAGE, s.GAUGE_KV_CACHE_HIT_RATE})
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")

# Bounds (moe_watch/limits.py). An engine that exposes 100k label values must not turn into 400k
# exported series: the excess is dropped and counted (series_limit); so are label values longer
# than a label value may be (label_too_long).
MAX_SERIES = limits.SERIES_PER_ENGINE  # samples of mapped families kept per scrape
MAX_MODELS = limits.MODELS_PER_ENGINE  # distinct model_name values per engine
# The most text one target's ExpositionLayout keeps between scrapes (a real vLLM layout is
# ~10 KB); past it nothing is kept and every scrape takes the full parse: slower, never refused.
LAYOUT_CHARS = 1 << 20
MAX_LABEL_VALUES = limits.LABEL_VALUES_PER_COUNTER  # e.g. finished_reason values kept apart


class ExpositionError(ValueError):
    """The text is not a usable engine exposition. ``reason`` is a short label value."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ParsedExposition:
    kind: str
    models: tuple[ModelSample, ...]
    info: dict[str, str] = field(default_factory=dict)
    dropped_samples: int = 0
    series_dropped: int = 0  # samples over MAX_SERIES or of models over MAX_MODELS
    labels_dropped: int = 0  # samples and info labels whose value is over LABEL_VALUE_CHARS


def _allocation(info: dict[str, str], key: str) -> float | None:
    """A ``cache_config_info`` number as the KV plan accepts it: finite, 0 to
    ``limits.KV_ALLOCATION``; None when absent, not a number or out of that range."""
    try:
        value = float(info[key])
    except (KeyError, ValueError):
        return None
    return value if 0 <= value <= limits.KV_ALLOCATION else None  # NaN fails both


def detect_kind(text: bytes | str) -> str:
    """``vllm`` or ``sglang`` from the metric prefixes present."""
    body = text.encode() if isinstance(text, str) else text
    for kind, prefix in PREFIXES.items():
        name = prefix.encode()
        if b"\n" + name in body or body.startswith(name) or b"# TYPE " + name in body:
            return kind
    raise ExpositionError(
        "no_engine_metrics",
        "no vllm:* or sglang:* metrics in the response (is the URL a serving engine's /metrics?)",
    )


class ExpositionLayout:
    """What one target's last exposition parsed to, line by line, up to the values.

    An engine sends the same families and label sets scrape after scrape, only the values
    move. When every kept line is the same as last time up to its value, the names and labels
    parsed then are reused and only the values are read. Anything else (a new series, a
    timestamp, a value written differently) goes through prometheus_client's parser, which
    stays the one judge of what a line means; the layout it parsed is remembered only when
    every line of it is one the shortcut reads the same way.
    """

    __slots__ = ("_lines", "_series")

    def __init__(self) -> None:
        self._lines: tuple[str, ...] = ()  # comment lines whole, sample lines up to the value
        self._series: tuple[tuple[str, dict[str, str]], ...] = ()  # per sample line

    def samples(self, lines: list[str]) -> list[tuple[str, dict[str, str], float]] | None:
        """The lines' samples, when they are the remembered layout with new values."""
        known = self._lines
        if not known or len(lines) != len(known):
            return None
        series = iter(self._series)
        out = []
        for line, seen in zip(lines, known, strict=True):
            if line[0] == "#":
                if line != seen:
                    return None
                continue
            prefix, space, text = line.rpartition(" ")
            value = _plain_value(text)
            if value is None or prefix != seen or not space:
                return None
            name, labels = next(series)
            out.append((name, labels, value))
        return out

    def remember(self, lines: list[str], parsed: list[Sample]) -> None:
        """Keep the layout of ``lines``, which prometheus_client parsed to ``parsed``."""
        self._lines, self._series = (), ()
        layout: list[str] = []
        series: list[tuple[str, dict[str, str]]] = []
        if sum(map(len, lines)) > LAYOUT_CHARS:
            return
        samples = iter(parsed)
        for line in lines:
            if line[0] == "#":
                layout.append(line)
                continue
            sample = next(samples, None)
            prefix, space, text = line.rpartition(" ")
            value = _plain_value(text)
            if sample is None or not space or value is None or sample.timestamp is not None:
                return
            if not (value == sample.value or (math.isnan(value) and math.isnan(sample.value))):
                return
            layout.append(prefix)
            series.append((sample.name, sample.labels))
        if next(samples, None) is None:
            self._lines, self._series = tuple(layout), tuple(series)


def _plain_value(text: str) -> float | None:
    """A sample value as prometheus_client reads a lone one (int first, then float; no
    surrounding whitespace, no underscores), or None for anything else."""
    if not text or text != text.strip() or "_" in text:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def parse_engine_exposition(
    text: bytes | str,
    kind: str = "auto",
    *,
    max_series: int = MAX_SERIES,
    max_models: int = MAX_MODELS,
    layout: ExpositionLayout | None = None,
) -> ParsedExposition:
    """Parse one engine exposition (the body as received, or its text). Raises ExpositionError
    on a body that cannot be used.

    At most ``max_series`` samples and ``max_models`` models are kept; the rest is dropped and
    counted in ``series_dropped`` (and ``dropped_samples``). ``layout``: the target's previous
    layout (see ExpositionLayout), updated here; the result is the same with or without it.
    Only the lines of mapped families are decoded: a body costs about its own size whatever
    its shape (millions of tiny lines, wide characters), and a line that is not UTF-8 fails the
    scrape only in a family we read."""
    body = text.encode() if isinstance(text, str) else text
    if kind == "auto":
        kind = detect_kind(body)
    names = BY_KIND[kind]
    filtered, over = _filter_lines(body, kind, max_series)
    if not filtered:
        raise ExpositionError(
            "no_engine_metrics", f"no known {kind} metrics in the response (checked {len(names)})"
        )
    if body and not body.endswith(b"\n"):
        # Every line of the text format ends with a newline: a body cut mid-way (a proxy or an
        # engine that died while writing) would otherwise pass as a valid, shorter exposition.
        raise ExpositionError("truncated", f"the exposition ends mid-line after {len(body)} bytes")
    builder = _Builder(names, max_models)
    builder.series_dropped = over
    known = layout.samples(filtered) if layout is not None else None
    if known is not None:
        for name, labels, value in known:
            builder.add(name, labels, value)
        return builder.build(kind)
    try:
        parsed = [
            sample
            for family in text_string_to_metric_families("\n".join(filtered) + "\n")
            for sample in family.samples
        ]
    except ValueError as exc:  # the parser raises ValueError subclasses on malformed text
        raise ExpositionError("parse", f"malformed exposition: {exc}") from None
    for sample in parsed:
        builder.add(sample.name, sample.labels, sample.value)
    if layout is not None:
        layout.remember(filtered, parsed)
    return builder.build(kind)


def _wanted_line_names(names: dict[str, Route]) -> frozenset[str]:
    wanted: set[str] = set()
    for name, mapping in names.items():
        wanted.add(name)
        if mapping.value_kind == "histogram":
            wanted.update(name + suffix for suffix in _HISTOGRAM_SUFFIXES)
    return frozenset(wanted)


def _alternatives(words: Iterable[str]) -> str:
    """A regex matching exactly ``words``, as a trie: one pass over a line's first bytes
    decides, instead of one try per word."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + emit(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        if len(branches) == 1 and "" not in node:
            return branches[0]
        group = "(?:" + "|".join(branches) + ")"
        return group + "?" if "" in node else group

    return emit(trie)


# What str.split() (prometheus_client's comment parser) splits on, within ASCII.
_SPACE = r"[\t\n\x0b\x0c\r\x1c-\x1f ]"
_WORD = r"[^\t\n\x0b\x0c\r\x1c-\x1f ]"


@functools.cache
def _line_pattern(kind: str) -> re.Pattern[bytes]:
    """The lines of ``kind``'s mapped families: a sample of a wanted name (the name ends at `{`,
    a space or the line's end, as the filter always read it), or a `# TYPE`/`# HELP` line of
    one (split on whitespace, as prometheus_client reads comments)."""
    names = _alternatives(_wanted_line_names(BY_KIND[kind]))
    return re.compile(
        rf"^(?:(?:{names})(?=[{{ \n]|$)|#{_WORD}*{_SPACE}+(?:TYPE|HELP){_SPACE}+(?:{names})"
        rf"(?={_SPACE}|$))[^\n]*".encode(),
        re.MULTILINE,
    )


def _filter_lines(body: bytes, kind: str, max_series: int) -> tuple[list[str], int]:
    """The lines of mapped families (at most ``max_series`` samples), decoded, and the samples
    over it. Lines are found by one regex over the body, so the lines of other families (a
    flood of comments, say) never become objects."""
    kept: list[str] = []
    samples = over = 0
    for match in _line_pattern(kind).finditer(body):
        raw = match.group()
        if raw.endswith(b"\r"):  # a CRLF body: the line break is both
            raw = raw[:-1]
        if raw[:1] != b"#":
            samples += 1
            if samples > max_series:
                over += 1
                continue
        try:
            kept.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ExpositionError(
                "encoding", f"a line of a mapped family is not UTF-8 ({exc.reason})"
            ) from None
    return kept, over


class _Builder:
    """Accumulates parsed samples per model, summing across data-parallel replicas."""

    def __init__(self, names: dict[str, Route], max_models: int = MAX_MODELS) -> None:
        self._names = names
        self._max_models = max_models
        self._models: set[str] = set()
        self.series_dropped = 0
        self._gauges: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
        self._counters: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
        # model -> key -> label value -> value (Route.split_by), summed over replicas
        self._split: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
        # model -> key -> priority, {(replica labels) -> {"buckets": {le: v}, "count", "sum"}}
        self._histograms: dict[str, dict[str, tuple[int, dict[tuple[str, ...], _RawHist]]]] = (
            defaultdict(dict)
        )
        self._info: dict[str, str] = {}
        self._capacity_tokens = 0.0
        self._dropped = 0
        self.labels_dropped = 0

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        mapping, part = self._lookup(name)
        if mapping is None:
            return
        if mapping.value_kind == "info":
            self._add_info(labels)
            return
        model = labels.get(MODEL_LABEL, "")
        if len(model) > limits.LABEL_VALUE_CHARS:  # it would become the `model` label
            self.labels_dropped += 1
            return
        if model not in self._models:
            if len(self._models) >= self._max_models:
                self.series_dropped += 1
                return
            self._models.add(model)
        if mapping.value_kind == "histogram":
            self._add_histogram(model, mapping, part, labels, value)
            return
        if not math.isfinite(value):
            self._dropped += 1
            return
        target = self._gauges if mapping.value_kind == "gauge" else self._counters
        self._accumulate(target[model], mapping, value)
        if mapping.split_by:
            self._add_split(model, mapping, labels.get(mapping.split_by, ""), value)

    def _add_split(self, model: str, mapping: Route, label: str, value: float) -> None:
        values = self._split[model].setdefault(mapping.key, {})
        if label not in values:
            if len(values) >= MAX_LABEL_VALUES or len(label) > limits.LABEL_VALUE_CHARS:
                self.series_dropped += 1  # still in the summed counter
                return
            values[label] = 0.0
        values[label] += value

    def _lookup(self, name: str) -> tuple[Route | None, str]:
        mapping = self._names.get(name)
        if mapping is not None:
            return mapping, ""
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                mapping = self._names.get(name[: -len(suffix)])
                if mapping is not None and mapping.value_kind == "histogram":
                    return mapping, suffix
        return None, ""

    def _accumulate(
        self, values: dict[str, tuple[int, float]], mapping: Route, value: float
    ) -> None:
        current = values.get(mapping.key)
        if current is None or mapping.priority > current[0]:
            values[mapping.key] = (mapping.priority, value)
        elif mapping.priority == current[0]:
            combined = (
                max(current[1], value) if mapping.key in _MAX_AGGREGATED else current[1] + value
            )
            values[mapping.key] = (mapping.priority, combined)

    def _add_info(self, labels: dict[str, str]) -> None:
        info: dict[str, str] = {}
        for key, value in labels.items():
            if key == "engine":
                continue
            if len(value) > limits.LABEL_VALUE_CHARS or len(info) >= limits.INFO_LABELS:
                self.labels_dropped += 1  # shown in /status and read by drift: bounded
                continue
            info[key] = value
        if not self._info:
            self._info = info
        # KV capacity of this replica, summed over data-parallel replicas; a pool the KV plan
        # refuses (a number, or their product, not finite within KV_ALLOCATION) adds nothing
        blocks, block_size = _allocation(info, "num_gpu_blocks"), _allocation(info, "block_size")
        pool = blocks * block_size if blocks is not None and block_size is not None else None
        if pool is not None and pool <= limits.KV_ALLOCATION:
            self._capacity_tokens += pool

    def _add_histogram(
        self, model: str, mapping: Route, part: str, labels: dict[str, str], value: float
    ) -> None:
        by_key = self._histograms[model]
        current = by_key.get(mapping.key)
        if current is None or mapping.priority > current[0]:
            current = (mapping.priority, {})
            by_key[mapping.key] = current
        elif mapping.priority < current[0]:
            return
        replica = tuple(f"{k}={v}" for k, v in sorted(labels.items()) if k != "le")
        raw = current[1].setdefault(replica, _RawHist())
        if part == "_bucket":
            try:
                raw.buckets[float(labels.get("le", "nan"))] = value
            except ValueError:
                raw.valid = False
        elif part == "_count":
            raw.count = value
        elif part == "_sum":
            raw.sum = value

    def build(self, kind: str) -> ParsedExposition:
        models = set(self._gauges) | set(self._counters) | set(self._histograms)
        models.discard("")  # series without a model label cannot be attributed
        result: list[ModelSample] = []
        for model in sorted(models):
            gauges = {k: v for k, (_, v) in self._gauges[model].items()}
            if self._capacity_tokens > 0 and s.GAUGE_KV_CACHE_CAPACITY_TOKENS not in gauges:
                gauges[s.GAUGE_KV_CACHE_CAPACITY_TOKENS] = self._capacity_tokens
            histograms: dict[str, Histogram] = {}
            for key, (_, replicas) in self._histograms[model].items():
                merged = self._merge(list(replicas.values()))
                if merged is not None:
                    histograms[key] = merged
            result.append(
                ModelSample(
                    model=model,
                    gauges=gauges,
                    counters={k: v for k, (_, v) in self._counters[model].items()},
                    histograms=histograms,
                    labelled_counters=self._split.get(model, {}),
                )
            )
        return ParsedExposition(
            kind,
            tuple(result),
            self._info,
            self._dropped + self.series_dropped + self.labels_dropped,
            self.series_dropped,
            self.labels_dropped,
        )

    def _merge(self, replicas: list[_RawHist]) -> Histogram | None:
        """Sum replica histograms bucket by bucket; drop (and count) malformed ones."""
        merged: Histogram | None = None
        for raw in replicas:
            histogram = raw.to_histogram()
            if histogram is None:
                self._dropped += 1
                continue
            if merged is None:
                merged = histogram
            elif [b for b, _ in merged.buckets] == [b for b, _ in histogram.buckets]:
                merged = Histogram(
                    buckets=tuple(
                        (bound, a + b)
                        for (bound, a), (_, b) in zip(
                            merged.buckets, histogram.buckets, strict=True
                        )
                    ),
                    count=merged.count + histogram.count,
                    sum=merged.sum + histogram.sum,
                )
            else:
                self._dropped += 1
        return merged


class _RawHist:
    __slots__ = ("buckets", "count", "sum", "valid")

    def __init__(self) -> None:
        self.buckets: dict[float, float] = {}
        self.count: float | None = None
        self.sum: float | None = None
        self.valid = True

    def to_histogram(self) -> Histogram | None:
        """A well-formed cumulative histogram, or None (missing +Inf, NaN, not cumulative)."""
        if not self.valid or self.count is None or self.sum is None:
            return None
        bounds = sorted(self.buckets)
        if not bounds or not math.isinf(bounds[-1]) or any(math.isnan(b) for b in bounds):
            return None
        counts = [self.buckets[b] for b in bounds]
        if any(not math.isfinite(c) or c < 0 for c in counts) or not math.isfinite(self.count):
            return None
        if any(later < earlier for earlier, later in pairwise(counts)):
            return None
        return Histogram(
            buckets=tuple(zip(bounds, counts, strict=True)),
            count=self.count,
            sum=self.sum if math.isfinite(self.sum) else 0.0,
        )
