"""Streams are timed in one place, the gateway, whatever the adapter: the wait for
each event is upstream time, not the gateway's overhead. In process."""

from __future__ import annotations

import asyncio

import pytest
from starlette.datastructures import Headers

from proxy import gateway as gateway_module
from proxy.config import parse_config
from proxy.gateway import Gateway
from proxy.pipeline import Call, Reply, finish_call
from proxy.sse import DONE, Event
from proxy.upstream.base import ProviderConfig, Upstream


class Clock:
    """perf_counter, moved only by the adapter and the reader below."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Bare(Upstream):
    """An adapter that times nothing itself (as TGI's did not): 30 ms to the first
    event, then 20 ms between events, on the clock it is given."""

    clock: Clock

    async def send(self, call, model) -> Reply:
        async def events():
            for i in range(12):
                self.clock.now += 0.030 if i == 0 else 0.020
                await asyncio.sleep(0)
                yield Event.of({"choices": [{"index": 0, "delta": {"content": "w"}}]})
            yield Event(DONE)

        return Reply(events=events())


CONFIG = """
providers: {sim: {type: simulated}}
models: [{name: slow, deployments: [{provider: sim, model: s}]}]
"""


def test_the_wait_for_every_event_counts_as_upstream_time(monkeypatch):
    """On fixed clock readings: the upstream's 30 + 11 x 20 ms are upstream time,
    and the 5 ms the reader spends on each event are not."""
    clock = Clock()
    monkeypatch.setattr(gateway_module.time, "perf_counter", clock)

    async def main() -> tuple[float, int, float | None]:
        g = Gateway(parse_config(CONFIG, "t.yaml", env={}))
        bare = Bare("bare", ProviderConfig(type="bare"))
        bare.clock = clock
        g.upstreams["sim"] = bare
        await g.start()
        try:
            body = {"model": "slow", "messages": [{"role": "user", "content": "x"}],
                    "stream": True}  # fmt: skip
            call = Call("chat", body, Headers(), "r")
            reply = await g.handler(call)
            events = 0
            while await reply.next_event() is not None:
                events += 1
                clock.now += 0.005  # the gateway and the client at work, not the upstream
            await finish_call(call, reply, True)
            deployment = g.catalog.get("slow").deployments[0]
            return call.upstream_s, events, deployment.latency_s
        finally:
            await g.close()

    upstream_s, events, first_event_s = asyncio.run(main())
    assert events == 13
    assert upstream_s == pytest.approx(0.030 + 11 * 0.020)
    assert first_event_s == pytest.approx(0.030)
