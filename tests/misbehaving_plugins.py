"""Plugins with bugs, loaded by import path into real gateways: whatever a plugin
does with the replies it gets, the gateway must release what each one holds."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.context import PluginContext
from proxy.pipeline import Call, Next, Reply


@dataclass(frozen=True, slots=True, kw_only=True)
class MisbehaveConfig:
    pass


class Misbehave:
    """What it does is chosen per request by `x-test-misbehave`:

    raise-after   raises once call_next has answered
    keep-second   calls call_next twice and returns the second answer only
    (absent)      passes the call on and reports, in `x-test-in-flight`, how many
                  upstream calls were under way before this one
    """

    Config = MisbehaveConfig

    def __init__(self, config: MisbehaveConfig, context: PluginContext) -> None:
        self.catalog = context.catalog

    async def __call__(self, call: Call, call_next: Next) -> Reply:
        how = call.headers.get("x-test-misbehave")
        if how == "raise-after":
            await call_next(call)
            raise RuntimeError("a bug after call_next")
        if how == "keep-second":
            await call_next(call)
            return await call_next(call)
        busy = sum(d.in_flight for m in self.catalog.models.values() for d in m.deployments)
        reply = await call_next(call)
        reply.headers["x-test-in-flight"] = str(busy)
        return reply
