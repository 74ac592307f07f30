"""The gateway's metrics: tallied counters reach Prometheus whole."""

from __future__ import annotations

import asyncio
import gc

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import parse_config
from proxy.gateway import Gateway
from proxy.metrics import Metrics

STEPS = st.lists(
    st.one_of(
        st.floats(min_value=0, max_value=1e6, allow_nan=False),
        st.just("flush"),
        st.just("render"),
    ),
    max_size=40,
)


def requests_total(metrics: Metrics, status: str) -> float | None:
    labels = {"model": "m", "deployment": "d", "status": status}
    return metrics.registry.get_sample_value("meshgate_requests_total", labels)


@given(steps=STEPS)
def test_every_increment_is_counted_whenever_the_counter_is_read(steps):
    metrics = Metrics()
    tally = metrics.requests_of("m", "d", "200")
    counted = 0.0
    for step in steps:
        if step == "flush":
            metrics.flush()
        elif step == "render":  # what /metrics sends
            body, _ = metrics.render()
            rendered = [
                sample.value
                for family in text_string_to_metric_families(body.decode())
                for sample in family.samples
                if sample.name == "meshgate_requests_total"
            ]
            assert rendered == [pytest.approx(counted, rel=1e-12)]
        else:
            tally.inc(step)
            counted += step
        assert requests_total(metrics, "200") == pytest.approx(counted, rel=1e-12)


def test_a_tally_refuses_to_go_down_at_once_as_a_counter_does():
    metrics = Metrics()
    tally = metrics.requests_of("m", "d", "200")
    with pytest.raises(ValueError):
        tally.inc(-1)
    with pytest.raises(ValueError):
        metrics.requests.labels("m", "d", "200").inc(-1)
    assert requests_total(metrics, "200") == 0.0


def test_a_tally_dropped_with_counts_not_flushed_hands_them_on():
    metrics = Metrics()
    child = metrics.requests.labels("m", "d", "500")
    tally = metrics.tally(child)
    tally.inc(3)
    assert len(metrics.tallies) == 1
    del tally
    gc.collect()
    assert len(metrics.tallies) == 0  # a plugin's tallies go with the plugin
    assert requests_total(metrics, "500") == 3.0


def test_the_cache_stats_count_what_the_tallies_hold():
    config = (
        "providers:\n  sim: {type: simulated}\n"
        "models:\n  - name: m\n    deployments: [{provider: sim, model: m}]\n"
        "pipeline:\n  - cache: {}\n"
    )
    gateway = Gateway(parse_config(config, "t.yaml", env={}))
    cache = gateway.plugins[0]
    for _ in range(4):
        cache.metrics.exact_misses.inc()
    cache.metrics.exact_hits.inc()

    lookups = asyncio.run(cache.stats(None))["lookups"]["exact"]
    assert (lookups["hit"], lookups["miss"]) == (1, 4)
