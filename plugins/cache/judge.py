"""A second opinion on a refused semantic candidate, from a model the gateway serves.

    semantic: {verify_with: {model: judge-small, timeout_s: 3}}

The near-miss checks (verify.py) refuse any prompt pair whose words they cannot
align, and many of those are true paraphrases ("the function of a CPU" / "what
a CPU does"). With `verify_with` set, such a candidate (refused for a word or
the order only) is put to a small model: "do these two requests ask for the
same thing?". A refusal for a mark (a number, a negation, an antonym, a tense,
a person) is never put to it: those are the differences a model is most often
talked out of. The judge is called through the whole chain as the caller
whose request is being looked up, so quotas count it and its cost is theirs;
its own request skips the cache. Verdicts are remembered per process.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from starlette.datastructures import Headers

from proxy.errors import GatewayError
from proxy.pipeline import Call

if TYPE_CHECKING:
    from proxy.context import PluginContext
    from proxy.pipeline import Identity

log = logging.getLogger("meshgate.cache")

# Refusals the judge may overrule: the words did not align. The others are marks.
SOFT = frozenset({"word", "added word", "order"})
INSTRUCTION = (
    "You decide whether two requests to an assistant ask for the same thing, so that "
    "one correct answer serves both. Differences in wording, spelling or politeness do "
    "not matter; any difference in subject, quantity, time, place, language, format, "
    "audience or direction does. Reply with one word: same or different."
)


@dataclass(frozen=True, slots=True, kw_only=True)
class JudgeConfig:
    model: str  # a chat model under models:
    timeout_s: float = 5.0
    max_verdicts: int = 10_000  # remembered per process

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_verdicts < 1:
            raise ValueError("timeout_s and max_verdicts must be positive")


class Judge:
    def __init__(self, config: JudgeConfig, context: PluginContext) -> None:
        self.config = config
        self.call = context.call
        # keyed by a digest of the two prompts: 10,000 verdicts hold no prompts
        self.verdicts: OrderedDict[bytes, bool] = OrderedDict()

    async def same(
        self, stored: str, asked: str, identity: Identity | None, request_id: str
    ) -> bool:
        """Whether the judge says `asked` may be answered with `stored`'s answer. A
        judge that fails or says anything else says no."""
        pair = hashlib.sha256(f"{len(stored)}:{stored}{asked}".encode()).digest()
        if pair in self.verdicts:
            self.verdicts.move_to_end(pair)
            return self.verdicts[pair]
        body = {
            "model": self.config.model, "temperature": 0, "max_tokens": 3,
            "messages": [
                {"role": "system", "content": INSTRUCTION},
                {"role": "user", "content": f"Request A: {stored}\n\nRequest B: {asked}"},
            ],
        }  # fmt: skip
        # no-store: the judge's own request is neither looked up nor stored.
        call = Call("chat", body, Headers({"cache-control": "no-store"}), request_id)
        call.identity = identity
        try:
            reply = await asyncio.wait_for(self.call(call), self.config.timeout_s)
        except (GatewayError, TimeoutError) as exc:
            log.warning("request %s: the semantic judge %s failed: %r",
                        request_id, self.config.model, exc)  # fmt: skip
            return False
        if reply.status != 200 or reply.body is None:
            return False
        verdict = _verdict(reply.body)
        self.verdicts[pair] = verdict
        if len(self.verdicts) > self.config.max_verdicts:
            self.verdicts.popitem(last=False)
        return verdict


def _verdict(body: bytes) -> bool:
    try:
        text = orjson.loads(body)["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return False
    if not isinstance(text, str):
        return False
    words = text.strip().lower().split()
    return bool(words) and words[0].strip(".,:;!*\"'`") == "same"
