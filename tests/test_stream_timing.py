"""Streams are timed in one place, the gateway, whatever the adapter: the wait for
each event is upstream time, not the gateway's overhead. In process."""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers

from proxy.config import parse_config
from proxy.gateway import Gateway
from proxy.pipeline import Call, Reply, finish_call
from proxy.sse import DONE, Event
from proxy.upstream.base import ProviderConfig, Upstream


class Bare(Upstream):
    """An adapter that times nothing itself (as TGI's did not): 30 ms to the first
    event, then 20 ms between events."""

    async def send(self, call, model) -> Reply:
        async def events():
            for i in range(12):
                await asyncio.sleep(0.030 if i == 0 else 0.020)
                yield Event.of({"choices": [{"index": 0, "delta": {"content": "w"}}]})
            yield Event(DONE)

        return Reply(events=events())


CONFIG = """
providers: {sim: {type: simulated}}
models: [{name: slow, deployments: [{provider: sim, model: s}]}]
"""


def test_the_wait_for_every_event_counts_as_upstream_time():
    async def main() -> tuple[float, int, float | None]:
        g = Gateway(parse_config(CONFIG, "t.yaml", env={}))
        g.upstreams["sim"] = Bare("bare", ProviderConfig(type="bare"))
        await g.start()
        try:
            body = {"model": "slow", "messages": [{"role": "user", "content": "x"}],
                    "stream": True}  # fmt: skip
            call = Call("chat", body, Headers(), "r")
            reply = await g.handler(call)
            events = 0
            while await reply.next_event() is not None:
                events += 1
            await finish_call(call, reply, True)
            deployment = g.catalog.get("slow").deployments[0]
            return call.upstream_s, events, deployment.latency_s
        finally:
            await g.close()

    upstream_s, events, first_event_s = asyncio.run(main())
    # The adapter's sleeps alone are a floor for what was waited on the upstream.
    assert events == 13
    assert upstream_s >= 0.030 + 11 * 0.020
    assert first_event_s is not None and first_event_s >= 0.030
