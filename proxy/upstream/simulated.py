"""A simulated provider that answers locally, for demos, smoke tests and load tests.

It is clearly not a model: every answer says it is simulated. Latency knobs
make it behave like a slow upstream when that is what a demo needs.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from proxy.pipeline import Reply
from proxy.sse import DONE, Event
from proxy.upstream import base

if TYPE_CHECKING:
    from proxy.pipeline import Call

SENTENCES = [
    "This is a simulated answer from Meshgate's simulated provider; no model was called.".split(),
    "Point a model at a real provider in proxy.yaml to get real answers.".split(),
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Config(base.ProviderConfig):
    type: Literal["simulated"]
    tokens: int = 24  # completion length in words, rounded up to a whole sentence
    latency_ms: float = 0.0  # before a buffered answer
    ttft_ms: float = 0.0  # before a stream's first token
    token_delay_ms: float = 0.0  # between streamed tokens
    embedding_dims: int = 64


class Upstream(base.Upstream):
    config: Config

    async def send(self, call: Call, model: str) -> Reply:
        self.check_ready(call.endpoint)
        prompt_tokens = _count_prompt(call.body)
        if call.endpoint == "embeddings":
            return Reply.json(self._embeddings(call.body, model, prompt_tokens))
        words, finish = _answer(self.config.tokens, call.body.get("max_tokens"))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        if call.stream:
            events = self._stream(call, model, words, finish, usage)
            return Reply(events=events)
        if self.config.latency_ms:
            await asyncio.sleep(self.config.latency_ms / 1000)
        text = " ".join(words)
        chat = call.endpoint == "chat"
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return Reply.json(
            {
                "id": _id(chat),
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
        )

    async def _stream(self, call: Call, model: str, words: list[str], finish: str, usage: dict):
        chat = call.endpoint == "chat"
        head = {
            "id": _id(chat),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        if self.config.ttft_ms:
            await asyncio.sleep(self.config.ttft_ms / 1000)
        if chat:
            yield Event.of(
                {**head, "choices": [_delta(chat, {"role": "assistant", "content": ""})]}
            )
        for i, word in enumerate(words):
            if i and self.config.token_delay_ms:
                await asyncio.sleep(self.config.token_delay_ms / 1000)
            piece = word if i == 0 else " " + word
            yield Event.of({**head, "choices": [_delta(chat, piece)]})
        yield Event.of({**head, "choices": [_delta(chat, None, finish)]})
        yield Event.of({**head, "choices": [], "usage": usage})
        yield Event(DONE)

    def _embeddings(self, body: dict, model: str, prompt_tokens: int) -> dict:
        inputs = body.get("input")
        items = (
            inputs if isinstance(inputs, list) and inputs and not _is_tokens(inputs) else [inputs]
        )
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": _vector(str(x), self.config.embedding_dims),
            }
            for i, x in enumerate(items)
        ]
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }


def _answer(tokens: int, max_tokens: Any) -> tuple[list[str], str]:
    """The answer's words and finish_reason: whole sentences, at least `tokens` words
    ("stop"), or as a model would, cut at `max_tokens` when that is fewer ("length")."""
    words: list[str] = []
    while len(words) < max(tokens, 1):
        words += SENTENCES[sum(1 for w in words if w.endswith(".")) % len(SENTENCES)]
    limit = max_tokens if type(max_tokens) is int and max_tokens > 0 else None
    if limit is not None and limit < len(words):
        return words[:limit], "length"
    return words, "stop"


def _delta(chat: bool, content: Any, finish: str | None = None) -> dict:
    if chat:
        delta = (
            content
            if isinstance(content, dict)
            else ({} if content is None else {"content": content})
        )
        return {"index": 0, "delta": delta, "finish_reason": finish}
    return {"index": 0, "text": content or "", "finish_reason": finish}


def _count_prompt(body: dict) -> int:
    text = body.get("messages") or body.get("prompt") or body.get("input") or ""
    return max(1, len(str(text)) // 4)


def _is_tokens(items: list) -> bool:
    return all(isinstance(x, int) for x in items)


def _vector(text: str, dims: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [((digest[i % 32] ^ (i * 37)) & 0xFF) / 127.5 - 1.0 for i in range(dims)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def _id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
