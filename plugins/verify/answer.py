"""What an answer says, read from a buffered body or from its stream's events,
and the conversation that asks for a repaired one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.pipeline import Reply
from proxy.sse import Event


@dataclass(slots=True)
class Answer:
    """The first choice of an answer: its text, its tool calls, why it ended."""

    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None


def read_answer(reply: Reply, events: list[Event] | None) -> Answer:
    """The answer in `reply`'s body, or assembled from its stream's `events`."""
    if events is None:
        try:
            data = orjson.loads(reply.body or b"{}")
        except orjson.JSONDecodeError:
            return Answer()
        choice = _first_choice(data)
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        text = message.get("content") if message else choice.get("text")
        listed = message.get("tool_calls") if message else None
        return Answer(
            text if isinstance(text, str) else "",
            [c for c in listed if isinstance(c, dict)] if isinstance(listed, list) else [],
            choice.get("finish_reason"),
        )
    answer = Answer()
    parts: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        data = event.json()
        if not isinstance(data, dict):
            continue
        choice = _first_choice(data)
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        piece = delta.get("content") if delta else choice.get("text")
        if isinstance(piece, str):
            parts.append(piece)
        for call in delta.get("tool_calls") or [] if delta else []:
            if isinstance(call, dict):
                _merge_call(calls.setdefault(int(call.get("index") or 0), {}), call)
        if choice.get("finish_reason"):
            answer.finish_reason = choice["finish_reason"]
    answer.text = "".join(parts)
    answer.tool_calls = [calls[i] for i in sorted(calls)]
    return answer


def _first_choice(data: Any) -> dict:
    choices = data.get("choices") if isinstance(data, dict) else None
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                return choice
    return {}


def _merge_call(into: dict[str, Any], delta: dict[str, Any]) -> None:
    """Tool calls stream as pieces: the id and name once, the arguments in parts."""
    for key in ("id", "type"):
        if delta.get(key):
            into[key] = delta[key]
    function = delta.get("function")
    if isinstance(function, dict):
        target = into.setdefault("function", {"name": "", "arguments": ""})
        if isinstance(function.get("name"), str):
            target["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            target["arguments"] += function["arguments"]


def repair_body(body: dict, answer: Answer, problem: str) -> dict:
    """The request again, with the rejected answer and why it was rejected appended,
    so the model can correct itself."""
    repaired = dict(body)
    if "messages" in body:
        said: dict[str, Any] = {"role": "assistant", "content": answer.text or None}
        if answer.tool_calls:
            said["tool_calls"] = answer.tool_calls
        repaired["messages"] = [
            *body["messages"], said,
            {"role": "user", "content": (
                f"Your previous answer was rejected: {problem}. Answer again, correcting "
                "this; reply with the corrected answer only."
            )},
        ]  # fmt: skip
        if answer.tool_calls:  # a tool call needs tool results, not a user turn: ask afresh
            repaired["messages"] = [
                *body["messages"],
                {"role": "user", "content": f"(Your last tool call was invalid: {problem}.)"},
            ]
    else:
        repaired["prompt"] = f"{body.get('prompt', '')}{answer.text}\n\n(Rejected: {problem}.)\n"
    return repaired
