"""The plugin context: what a plugin is given, and the calls it makes through the
whole chain (auth keeps the identity the caller set, quotas count it, the call is
accounted). In process, with the simulated provider: no sockets needed."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from starlette.datastructures import Headers

from proxy.config import parse_config
from proxy.errors import AuthenticationFailed, RateLimited
from proxy.gateway import Gateway
from proxy.pipeline import Call, Identity

CONFIG = """
server: {admin_key: admin-key-0123456789abcdef}
providers: {sim: {type: simulated}}
models:
  - {name: chat, deployments: [{provider: sim, model: s}]}
pipeline:
  - auth: {keys: [{name: a, key: sk-a-0123456789}]}
  - quotas: {limits: [{per: key, rpm: 2}]}
"""


def gateway() -> Gateway:
    return Gateway(parse_config(CONFIG, "t.yaml", env={}))


def call(identity: Identity | None = None, **body) -> Call:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], **body}
    made = Call("chat", body, Headers(), "internal-1")
    made.identity = identity
    return made


def test_the_context_is_read_only_and_the_gateway_keeps_no_plugin_slots():
    g = gateway()
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.context.catalog = None  # type: ignore[misc]
    assert not hasattr(g, "breakers")
    assert g.admin_key == "admin-key-0123456789abcdef"  # the server's, not a plugin's
    assert sorted(r.path for r in g.admin_routes) == ["spend"]  # added through the context


def test_a_plugins_call_goes_through_the_whole_chain_and_is_accounted():
    async def main():
        g = gateway()
        await g.start()
        try:
            caller = Identity("verifier", kind="internal")
            first = await g.context.call(call(caller))
            assert first.parsed()["choices"][0]["finish_reason"] == "stop"
            await g.context.call(call(caller))
            with pytest.raises(RateLimited):  # quotas counted the caller: rpm 2
                await g.context.call(call(caller))
            with pytest.raises(AuthenticationFailed):  # no identity: auth asks for a key
                await g.context.call(call())
            with pytest.raises(ValueError, match="buffered"):
                await g.context.call(call(caller, stream=True))
            return g.metrics.render()[0].decode()
        finally:
            await g.close()

    metrics = asyncio.run(main())
    assert 'meshgate_requests_total{deployment="sim/s",model="chat",status="200"} 2.0' in metrics
    assert 'meshgate_requests_total{deployment="",model="chat",status="429"} 1.0' in metrics
