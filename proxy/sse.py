"""Server-Sent Events as raw bytes, parsed only when someone asks.

A pure passthrough splits the upstream's byte stream on blank lines and
forwards each event's bytes untouched; `Event.json()` parses on demand.
"""

from __future__ import annotations

import orjson

from proxy.errors import UpstreamUnavailable

DONE = b"data: [DONE]\n\n"


class Event:
    """One SSE event, kept as the bytes it arrived in (blank-line terminator included)."""

    __slots__ = ("_json", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._json = None

    @classmethod
    def of(cls, payload: dict | bytes) -> Event:
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        return cls(b"data: " + data + b"\n\n")

    @property
    def data(self) -> bytes:
        """The event's data field: its `data:` lines joined by newlines."""
        lines = []
        for line in self.raw.splitlines():
            if line.startswith(b"data:"):
                value = line[5:]
                lines.append(value[1:] if value.startswith(b" ") else value)
        return b"\n".join(lines)

    @property
    def is_done(self) -> bool:
        return self.raw.startswith(b"data: [DONE]") or self.data == b"[DONE]"

    def json(self):
        """The data field parsed as JSON (cached), or None for `[DONE]` and comments.

        An event that is not JSON is the upstream's fault: UpstreamMalformed (502)."""
        if self._json is None:
            data = self.data
            if not data or data == b"[DONE]":
                return None
            try:
                self._json = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamMalformed(
                    "the upstream sent a stream event that is not JSON"
                ) from None
        return self._json

    def has_usage(self) -> bool:
        """True when the event carries a non-null `usage`, without parsing the rest."""
        at = self.raw.find(b'"usage"')
        if at < 0:
            return False
        rest = self.raw[at + 7 : at + 16].lstrip(b" :")
        return not rest.startswith(b"null")

    def __repr__(self) -> str:
        return f"Event({self.raw!r})"


class UpstreamMalformed(UpstreamUnavailable):
    code = "upstream_malformed_response"


class EventSplitter:
    """Cuts a byte stream into events at blank lines (LF or CRLF framing).

    The bytes of an event not yet ended are kept as they came and joined once it
    ends: an event that arrives in many chunks costs its length once, not once
    per chunk, and `pending_bytes` lets a reader refuse one that never ends."""

    __slots__ = ("_parts", "pending_bytes")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.pending_bytes = 0  # of the event not yet ended

    def feed(self, chunk: bytes) -> list[Event]:
        parts = self._parts
        if parts:
            # A blank line that ends the kept event lies in the chunk or across the
            # seam (the three bytes before it): if neither has one, keep the chunk.
            seam = b"".join(parts[-3:])[-3:] + chunk[:3]
            if not (_has_blank_line(chunk) or _has_blank_line(seam)):
                parts.append(chunk)
                self.pending_bytes += len(chunk)
                return []
            parts.append(chunk)
            buffer = b"".join(parts)
        else:
            buffer = chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            if end > start:
                events.append(Event(buffer[start : end + 2]))
            start = end + 2
        rest = buffer[start:]
        self._parts = [rest] if rest else []
        self.pending_bytes = len(rest)
        return events

    @property
    def pending(self) -> bytes:
        """Bytes received after the last complete event (a torn event when the stream ended)."""
        return b"".join(self._parts)


def _has_blank_line(data: bytes) -> bool:
    """Whether `data` holds the end of an event: LF LF, or either written as CRLF."""
    return b"\n\n" in data or b"\n\r\n" in data


def as_stream(endpoint: str, answer: dict) -> list[Event]:
    """A whole chat or text completion as the stream that would have carried it (for
    an upstream that ignored `stream`): one chunk with each choice whole, a usage
    chunk when the answer has usage, then [DONE]."""
    chat = endpoint == "chat"
    head = {k: answer[k] for k in ("id", "created", "model", "system_fingerprint") if k in answer}
    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    choices = []
    for i, choice in enumerate(answer.get("choices") or ()):
        if not isinstance(choice, dict):
            continue
        piece = {"index": choice.get("index", i)}
        if chat:
            message = choice.get("message")
            delta = {k: v for k, v in message.items() if v is not None} if isinstance(
                message, dict) else {}  # fmt: skip
            calls = delta.get("tool_calls")
            if isinstance(calls, list):  # a stream's tool calls each say their place
                delta["tool_calls"] = [{**c, "index": j} if isinstance(c, dict) else c
                                       for j, c in enumerate(calls)]  # fmt: skip
            piece["delta"] = delta
        else:
            piece["text"] = choice.get("text") or ""
        piece["logprobs"] = choice.get("logprobs")
        piece["finish_reason"] = choice.get("finish_reason")
        choices.append(piece)
    events = [Event.of({**head, "choices": choices})]
    if isinstance(answer.get("usage"), dict):
        events.append(Event.of({**head, "choices": [], "usage": answer["usage"]}))
    return [*events, Event(DONE)]
