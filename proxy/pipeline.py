"""The plugin contract and the chain that runs it.

A plugin is an object with `async def __call__(self, call, call_next) -> Reply`.
It may rewrite `call`, answer by itself (return a Reply or raise a
GatewayError), call `call_next` once or several times, and look at or wrap the
Reply on its way out. Streams stay streams: a Reply carries either `body` bytes
or an async iterator of raw SSE `events`. Work that needs the end of the
answer (usage, cost, storing a cache entry) registers `reply.on_complete`.
See docs/plugins.md.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import orjson

from proxy.errors import PermissionDenied
from proxy.protocol import INPUT_FIELD, clean_usage
from proxy.sse import Event

if TYPE_CHECKING:
    from proxy.catalog import Deployment, Model

log = logging.getLogger("meshgate.pipeline")

# Endpoints that call a model; a Call can also be for "models" / "model" (GET /v1/models).
MODEL_CALLS = tuple(INPUT_FIELD)


@dataclass(slots=True)
class Identity:
    """Who is calling, as established by an auth plugin.

    `kind` says what `name` names ("key": an API key's name; "jwt": a token's
    subject), so that the same text from two kinds is never one tenant."""

    name: str
    team: str | None = None
    user: str | None = None
    models: tuple[str, ...] = ("*",)
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = "key"

    @property
    def subject(self) -> str:
        """The caller as one typed name: `key:<name>` or `jwt:<sub>`, escaped."""
        return f"{self.kind}:{_escaped(self.name)}"

    @property
    def tenant(self) -> str:
        """Whose data this caller shares: their team (`team:<t>`), else themselves."""
        return f"team:{_escaped(self.team)}" if self.team else self.subject


_escapes: dict[str, str] = {}


def _escaped(name: str) -> str:
    """`name` percent-escaped whole (no `:` or `/` left), remembered: callers are few
    and their names are asked for on every call."""
    escaped = _escapes.get(name)
    if escaped is None:
        if len(_escapes) > 100_000:
            _escapes.clear()
        escaped = _escapes[name] = quote(name, safe="")
    return escaped


_permitted: dict[tuple[tuple[str, ...], str], bool] = {}


def permitted(identity: Identity | None, model: Model) -> bool:
    """Whether `identity` may use `model`: one of its globs matches the model's name or
    one of its aliases. The one place permission is decided; the gateway asks it
    for every attempt, whichever model routing or fallback chose."""
    if identity is None or identity.models == ("*",):
        return True
    key = (identity.models, model.name)
    allowed = _permitted.get(key)
    if allowed is None:
        names = (model.name, *model.aliases)
        allowed = any(fnmatchcase(n, p) for n in names for p in identity.models)
        if len(_permitted) > 100_000:
            _permitted.clear()
        _permitted[key] = allowed
    return allowed


def refuse(identity: Identity | None, model: Model) -> PermissionDenied:
    who = f"The API key '{identity.name}'" if identity is not None else "This caller"
    return PermissionDenied(f"{who} may not use the model `{model.name}`.", param="model")


# Orders a model's deployments, best first, for one attempt of a call.
Rank = Callable[["Call", "list[Deployment]"], "list[Deployment]"]


@dataclass(slots=True, eq=False)
class Call:
    """One client request on its way through the pipeline.

    `body` is the parsed JSON request; plugins may change it in place. What
    goes upstream is `body` with `model` set to the chosen deployment's model.
    """

    endpoint: str  # "chat" | "completions" | "embeddings"
    body: dict[str, Any]
    headers: Any  # starlette.datastructures.Headers: case-insensitive, read-only
    request_id: str
    identity: Identity | None = None
    model: Model | None = None  # resolved from body["model"] by the gateway
    deployment: Deployment | None = None  # this attempt's, chosen by proxy/choice.py
    state: dict[str, Any] = field(default_factory=dict)  # per-request plugin scratch space
    upstream_s: float = 0.0  # time spent waiting on upstreams, summed over attempts
    pool_wait_s: float = 0.0  # time spent waiting for a free upstream connection
    attempts: int = 0
    # How to order a model's deployments for an attempt (set by a routing plugin;
    # None keeps the config's order), and the deployments this call has failed on.
    rank: Rank | None = None
    failed: dict[str, float] = field(default_factory=dict)  # name -> when (monotonic)
    reserved: Any = None  # what the chosen deployment's caps counted for this attempt
    # Every Reply the chain produced for this call, so the gateway can close the
    # ones a plugin dropped (raised after call_next, kept one of several).
    replies: list[Reply] = field(default_factory=list)

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def wants_usage(self) -> bool:
        """Whether the client itself asked for the final usage chunk of a stream."""
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def fork(self, body: dict[str, Any] | None = None, model: Model | None = None) -> Call:
        """A call made on this one's behalf (a repair, one of several answers to
        compare): the same caller and request id, `body` and `model` as given (a
        copy of this call's by default), attempt state of its own. Its replies are
        recorded with this call's, so the gateway finishes them all and counts the
        cost of every one."""
        sub = Call(
            self.endpoint, body if body is not None else dict(self.body), self.headers,
            self.request_id, identity=self.identity, model=model or self.model,
        )  # fmt: skip
        sub.replies = self.replies
        return sub

    def cost(self) -> float | None:
        """USD of every answer produced for this call (None when none is priced)."""
        costs = [c for r in self.replies if (c := r.compute_cost()) is not None]
        return sum(costs) if costs else None


Hook = Callable[["Reply"], Awaitable[None] | None]
Closer = Callable[[], Awaitable[None] | None]


class Reply:
    """An answer: buffered `body` bytes, or a stream of SSE `events`.

    `completed` is set before the completion hooks run: True when the whole
    answer reached the client, False when it was cut short (client gone,
    upstream failed mid-stream).

    A Reply owns what was taken to produce it (an open upstream response, a
    deployment's in-flight count): `owns()` ties a closer to it, and `aclose()`
    runs each once, whether or not the stream was ever iterated.
    """

    __slots__ = (
        "_closed",
        "_closers",
        "_finished",
        "_first",
        "_hooks",
        "_owned",
        "body",
        "completed",
        "cost",
        "deployment",
        "events",
        "headers",
        "status",
        "usage",
    )

    def __init__(
        self,
        *,
        body: bytes | None = None,
        events: AsyncIterator[Event] | None = None,
        status: int = 200,
        headers: dict[str, str] | None = None,
        usage: dict | None = None,
    ) -> None:
        if (body is None) == (events is None):
            raise ValueError("a Reply has either a body or events")
        self.body = body
        self.events = events
        self.status = status
        self.headers = headers if headers is not None else {}
        self.usage = usage
        self.deployment: Deployment | None = None
        self.cost: float | None = None  # USD, set by the gateway once usage is known
        self.completed = False
        self._hooks: list[Hook] = []
        self._closers: list[Closer] = []
        self._closed = False
        self._finished = False
        self._owned = False  # recorded in a Call's replies
        self._first: tuple[Event | None] | None = None  # the peeked first event, if any

    @property
    def streamed(self) -> bool:
        return self.events is not None

    @classmethod
    def json(cls, payload: Any, *, status: int = 200) -> Reply:
        return cls(body=orjson.dumps(payload), status=status)

    def parsed(self) -> Any:
        """The buffered body as JSON."""
        if self.body is None:
            raise TypeError("a streamed reply has no body to parse")
        return orjson.loads(self.body)

    def get_usage(self) -> dict | None:
        """Token usage from the upstream, parsing a buffered body on first use."""
        if self.usage is None and self.body is not None and b'"usage"' in self.body:
            try:
                usage = orjson.loads(self.body).get("usage")
            except (orjson.JSONDecodeError, AttributeError):
                usage = None
            self.usage = clean_usage(usage)
        return self.usage

    def compute_cost(self) -> float | None:
        """Usage times the answering deployment's price; None when either is unknown."""
        if self.cost is None and self.deployment is not None and self.deployment.price:
            usage = self.get_usage()
            if usage:
                self.cost = self.deployment.price.cost(usage)
        return self.cost

    def on_complete(self, hook: Hook) -> Reply:
        """Run `hook(reply)` once the answer has been delivered or abandoned."""
        self._hooks.append(hook)
        return self

    def wrap_events(self, wrapper: Callable[[AsyncIterator[Event]], AsyncIterator[Event]]) -> Reply:
        """Replace the stream with `wrapper(stream)`, e.g. to watch or rewrite events."""
        if self.events is None:
            raise TypeError("a buffered reply has no events")
        if self._first is not None:  # the wrapper must see the peeked event too
            (first,), self._first = self._first, None
            self.events = _prepend(first, self.events) if first is not None else self.events
        self.events = wrapper(self.events)
        return self

    async def peek(self) -> Event | None:
        """The stream's first event, awaited without consuming it (None if it is empty).

        Exceptions from the upstream propagate, so a caller can retry before
        anything reached the client."""
        if self.events is None:
            raise TypeError("a buffered reply has no events")
        if self._first is None:
            self._first = (await anext(self.events, None),)
        return self._first[0]

    async def buffer(self, max_bytes: int) -> list[Event] | None:
        """Read the whole stream now, for a plugin that must see all of an answer
        before the client does; the events are replayed to whoever reads next. None
        when the stream passes `max_bytes`: what was read is replayed, then the rest
        of the stream as it comes, so nothing is lost or held past the bound."""
        if self.events is None:
            raise TypeError("a buffered reply has no events")
        events: list[Event] = []
        size = 0
        while (event := await self.next_event()) is not None:
            events.append(event)
            if event.has_usage():
                data = event.json()
                usage = clean_usage(data.get("usage")) if isinstance(data, dict) else None
                if usage is not None:
                    self.usage = usage
            size += len(event.raw)
            if size > max_bytes:
                self.events = replay(events, self.events)
                return None
        self.events = replay(events)
        return events

    async def next_event(self) -> Event | None:
        """The next event to send (a peeked one first), or None at the end."""
        if self._first is not None:
            (first,), self._first = self._first, None
            return first
        if self.events is None:
            raise TypeError("a buffered reply has no events")
        return await anext(self.events, None)

    def owns(self, closer: Closer) -> Reply:
        """Run `closer()` when the reply is closed, e.g. to release a connection."""
        self._closers.append(closer)
        return self

    async def aclose(self) -> None:
        """Close the stream and run the closers; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self.events is not None:
            try:
                await self.events.aclose()  # type: ignore[attr-defined]
            except Exception:
                log.exception("closing a stream failed")
        while self._closers:
            closers, self._closers = self._closers, []
            for closer in closers:
                await _run(closer, "a reply's closer failed")

    async def finish(self, completed: bool) -> None:
        """Close the reply and run its completion hooks; later calls do nothing.
        The gateway calls it for every reply of a call once the answer is sent."""
        if self._finished:
            return
        self._finished = True
        await self.aclose()
        self.completed = completed
        # Dropped once run: a hook often holds the call, which holds this reply, and
        # that cycle would leave the whole request to the garbage collector.
        while self._hooks:
            hooks, self._hooks = self._hooks, []
            for hook in hooks:  # as _run, written here: no coroutine per hook
                try:
                    result = hook(self)
                    if result is not None and inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("a completion hook failed")


async def _run(callback: Callable[..., Awaitable[None] | None], failure: str, *args) -> None:
    try:
        result = callback(*args)
        if result is not None and inspect.isawaitable(result):  # None: a plain function's
            await result
    except Exception:
        log.exception(failure)


async def finish_call(call: Call, reply: Reply | None, completed: bool) -> None:
    """Finish the reply the client got, then every other the chain produced for
    `call` (as not completed), so each releases what it holds exactly once."""
    if reply is not None:
        await reply.finish(completed)
    for other in reversed(call.replies):
        if not other._finished:  # usually the client's own, finished above
            await other.finish(False)


Next = Callable[[Call], Awaitable[Reply]]


class Plugin(Protocol):
    async def __call__(self, call: Call, call_next: Next) -> Reply: ...


def build_chain(plugins: list[Plugin], terminal: Next) -> Next:
    """Nest the plugins around `terminal`, the first plugin outermost."""
    handler = terminal
    for plugin in reversed(plugins):
        handler = _link(plugin, handler)
    return handler


def _link(plugin: Plugin, call_next: Next) -> Next:
    async def run(call: Call) -> Reply:
        reply = await plugin(call, call_next)
        if not reply._owned:  # keep(call, reply), inline: it runs once per plugin per call
            reply._owned = True
            call.replies.append(reply)
        return reply

    return run


def keep(call: Call, reply: Reply) -> None:
    """Record `reply` as produced for `call`, once."""
    if not reply._owned:
        reply._owned = True
        call.replies.append(reply)


async def replay(
    events: list[Event], rest: AsyncIterator[Event] | None = None
) -> AsyncIterator[Event]:
    """`events`, then what `rest` has left (closed at the end)."""
    try:
        for event in events:
            yield event
        if rest is not None:
            async for event in rest:
                yield event
    finally:
        if rest is not None:
            await rest.aclose()  # type: ignore[attr-defined]


async def _prepend(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
