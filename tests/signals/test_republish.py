import math

from moe_watch import samples as s
from moe_watch.samples import Histogram, ModelSample
from moe_watch.signals.engine import derive_engine_signals
from moe_watch.signals.republish import FIXED_BOUNDS, republished
from moe_watch.sources.exposition import parse_engine_exposition
from tests.conftest import read_capture

INF = math.inf


def cumulative(bounds: tuple[float, ...]) -> Histogram:
    buckets = (*tuple((b, float(i + 1)) for i, b in enumerate(bounds)), (INF, len(bounds) + 1.0))
    return Histogram(buckets, len(bounds) + 1.0, 12.5)


def test_real_vllm_layouts_are_republished_on_exactly_the_fixed_bounds() -> None:
    model = parse_engine_exposition(read_capture("after-load")).models[0]
    for kind in s.LATENCY_KINDS:
        engine = model.histograms[kind]
        out = republished(kind, engine)
        assert tuple(b for b, _ in out.buckets[:-1]) == FIXED_BOUNDS[kind]
        assert out.buckets[-1] == engine.buckets[-1]
        assert (out.count, out.sum) == (engine.count, engine.sum)
        # the engine's own cumulative counts, bound for bound
        assert set(out.buckets) <= set(engine.buckets)


def test_a_finer_layout_publishes_the_fixed_bounds_only() -> None:
    fixed = FIXED_BOUNDS[s.LATENCY_ITL]
    finer = tuple(sorted({*fixed, 0.0125, 0.033, 90.0}))
    out = republished(s.LATENCY_ITL, cumulative(finer))
    assert tuple(b for b, _ in out.buckets[:-1]) == fixed
    assert dict(out.buckets)[0.05] == finer.index(0.05) + 1  # its own count at that bound


def test_another_layout_keeps_its_own_bounds_thinned_to_the_limit() -> None:
    own = tuple(float(2**i) for i in range(40))  # 40 finite bounds, none of vLLM's set
    out = republished(s.LATENCY_E2E, cumulative(own), max_bounds=10)
    bounds = [b for b, _ in out.buckets]
    assert len(bounds) == 11
    assert bounds[-1] == INF
    assert bounds[-2] == own[-1]  # the highest finite bound stays
    assert all(dict(out.buckets)[b] == own.index(b) + 1 for b in bounds[:-1])  # exact counts
    short = republished(s.LATENCY_E2E, cumulative((1.0, 2.0)))
    assert [b for b, _ in short.buckets] == [1.0, 2.0, INF]


def test_engine_signals_carry_the_latest_cumulative_histograms_and_finish_reasons() -> None:
    older = ModelSample("m", histograms={s.LATENCY_E2E: cumulative((1.0, 2.0))})
    latest = ModelSample(
        "m",
        histograms={
            s.LATENCY_E2E: cumulative((1.0, 3.0)),
            s.HISTOGRAM_PROMPT_TOKENS: cumulative((1.0, 2.0, 5.0)),
            s.HISTOGRAM_ITERATION_TOKENS: cumulative((1.0,)),  # not re-published
        },
        labelled_counters={s.COUNTER_REQUESTS_FINISHED: {"stop": 3.0, "abort": 1.0}},
    )
    sig = derive_engine_signals([(0.0, older), (5.0, latest)])
    assert set(sig.histograms) == {s.LATENCY_E2E, s.HISTOGRAM_PROMPT_TOKENS}
    assert sig.histograms[s.LATENCY_E2E].buckets[1] == (3.0, 2.0)
    assert dict(sig.requests_finished) == {"stop": 3.0, "abort": 1.0}
