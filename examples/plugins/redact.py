"""An example plugin (docs/plugins.md): redact e-mail addresses from chat prompts."""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.context import PluginContext
from proxy.pipeline import Call, Next, Reply

EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class RedactConfig:
    replacement: str = "[email]"


class RedactEmails:
    Config = RedactConfig

    def __init__(self, config: RedactConfig, context: PluginContext) -> None:
        self.replacement = config.replacement
        self.redacted = 0

    async def __call__(self, call: Call, call_next: Next) -> Reply:
        if call.endpoint != "chat":
            return await call_next(call)
        count = 0
        for message in call.body["messages"]:
            if isinstance(message.get("content"), str):
                message["content"], n = EMAIL.subn(self.replacement, message["content"])
                count += n
        self.redacted += count
        reply = await call_next(call)
        reply.headers["x-redacted-emails"] = str(count)
        return reply
