"""The plugin contract, exercised directly with stub handlers: no sockets."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import RateLimited
from proxy.pipeline import Call, Reply, build_chain, finish_call, keep
from proxy.sse import Event


def make_call(**body) -> Call:
    return Call("chat", {"model": "m", "messages": [], **body}, {}, "rid")


def run(coro):
    return asyncio.run(coro)


def test_plugins_run_outermost_first_and_see_the_reply():
    order = []

    class Tag:
        def __init__(self, name):
            self.name = name

        async def __call__(self, call, call_next):
            order.append(self.name)
            call.body.setdefault("tags", []).append(self.name)
            reply = await call_next(call)
            order.append("/" + self.name)
            return reply

    async def terminal(call):
        return Reply.json({"tags": call.body["tags"]})

    handler = build_chain([Tag("a"), Tag("b")], terminal)
    reply = run(handler(make_call()))
    assert reply.parsed() == {"tags": ["a", "b"]}
    assert order == ["a", "b", "/b", "/a"]


def test_plugin_can_answer_or_refuse_without_calling_next():
    async def terminal(call):
        raise AssertionError("not reached")

    class Cached:
        async def __call__(self, call, call_next):
            return Reply.json({"cached": True})

    class Refuse:
        async def __call__(self, call, call_next):
            raise RateLimited("slow down", retry_after_s=2.2)

    assert run(build_chain([Cached()], terminal)(make_call())).parsed() == {"cached": True}
    with pytest.raises(RateLimited) as info:
        run(build_chain([Refuse()], terminal)(make_call()))
    assert info.value.headers["retry-after"] == "3"


def test_plugin_can_call_next_several_times():
    attempts = []

    async def terminal(call):
        attempts.append(call.body["try"])
        if call.body["try"] < 3:
            raise RuntimeError("flaky")
        return Reply.json({"ok": call.body["try"]})

    class Retry:
        async def __call__(self, call, call_next):
            for i in range(1, 4):
                call.body["try"] = i
                try:
                    return await call_next(call)
                except RuntimeError:
                    continue
            raise AssertionError

    assert run(build_chain([Retry()], terminal)(make_call())).parsed() == {"ok": 3}
    assert attempts == [1, 2, 3]


def test_stream_wrapping_and_completion_hooks():
    async def events():
        yield Event.of({"n": 1})
        yield Event.of({"n": 2})

    async def terminal(call):
        return Reply(events=events())

    seen = []

    class Watch:
        async def __call__(self, call, call_next):
            reply = await call_next(call)

            async def count(stream):
                async for event in stream:
                    seen.append(event.json()["n"])
                    yield event

            return reply.wrap_events(count).on_complete(lambda r: seen.append(r.completed))

    async def main():
        reply = await build_chain([Watch()], terminal)(make_call())
        raw = [e.raw async for e in reply.events]
        await reply.finish(True)
        return raw

    assert len(run(main())) == 2
    assert seen == [1, 2, True]


def test_failing_hook_does_not_stop_the_others():
    reply = Reply.json({})
    calls = []

    def bad(r):
        raise ValueError("boom")

    async def bad_later(r):
        raise ValueError("boom, awaited")

    async def good(r):
        calls.append(("awaited", r.completed))

    reply.on_complete(bad).on_complete(good).on_complete(bad_later)
    reply.on_complete(lambda r: calls.append(("plain", r.completed)))
    run(reply.finish(False))
    assert calls == [("awaited", False), ("plain", False)]


def test_reply_usage_from_buffered_body():
    reply = Reply(body=b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}')
    assert reply.get_usage() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    with pytest.raises(ValueError):
        Reply()


@pytest.mark.parametrize(
    "usage",
    [
        b'{"prompt_tokens": -5, "completion_tokens": "9", "total_tokens": -1}',
        b'{"prompt_tokens": 1000000000000000000, "completion_tokens": 1.5}',
        b'{"prompt_tokens": true}',
        b'"many"',
        b"[1, 2]",
    ],
)
def test_a_hostile_upstreams_usage_never_counts(usage):
    assert Reply(body=b'{"usage": ' + usage + b"}").get_usage() is None


def test_peek_then_wrap_keeps_every_event_in_order():
    async def events():
        for n in range(3):
            yield Event.of({"n": n})

    async def main():
        reply = Reply(events=events())
        first = await reply.peek()
        assert first.json() == {"n": 0} and await reply.peek() is first

        async def double(stream):
            async for event in stream:
                yield Event.of({"n": event.json()["n"] * 2})

        reply.wrap_events(double)
        out = []
        while (event := await reply.next_event()) is not None:
            out.append(event.json()["n"])
        return out

    assert run(main()) == [0, 2, 4]


def test_replies_a_plugin_drops_are_finished_once_each():
    # A plugin keeps one of two answers and its caller raises: the gateway's
    # finish_call closes and finishes every reply the chain produced, once.
    closed: list[str] = []

    async def terminal(call: Call) -> Reply:
        async def events():
            yield Event(b'data: {"choices": []}\n\n')

        reply = Reply(events=events()).owns(lambda: closed.append("response"))
        keep(call, reply)
        return reply.on_complete(lambda r: closed.append(f"hook:{r.completed}"))

    async def keep_second(call: Call, call_next) -> Reply:
        await call_next(call)
        return await call_next(call)

    async def main():
        call = make_call()
        reply = await build_chain([keep_second], terminal)(call)
        assert len(call.replies) == 2 and reply is call.replies[1]
        await finish_call(call, reply, True)
        await finish_call(call, reply, True)  # a second finish changes nothing
        return sorted(closed)

    assert run(main()) == ["hook:False", "hook:True", "response", "response"]


def test_buffer_reads_a_stream_whole_replays_it_and_keeps_its_usage():
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    raw = [Event.of({"choices": [{"delta": {"content": "a"}}]}),
           Event.of({"choices": [], "usage": usage}), Event(b"data: [DONE]\n\n")]  # fmt: skip

    async def events():
        for event in raw:
            yield event

    async def go(limit: int):
        reply = Reply(events=events())
        buffered = await reply.buffer(limit)
        replayed = []
        while (event := await reply.next_event()) is not None:
            replayed.append(event)
        return reply, buffered, replayed

    reply, buffered, replayed = asyncio.run(go(10_000))
    assert buffered == replayed == raw and reply.usage == usage
    reply, buffered, replayed = asyncio.run(go(10))  # too long: nothing is lost
    assert buffered is None and replayed == raw


def test_a_forked_call_records_its_replies_with_its_parent_and_sums_their_cost():
    parent = Call("chat", {"model": "m", "messages": []}, {}, "r")
    child = parent.fork({"model": "n", "messages": []})
    assert child.request_id == "r" and child.body["model"] == "n" and parent.body["model"] == "m"
    assert child.state is not parent.state and child.failed is not parent.failed
    keep(child, Reply(body=b"{}"))
    assert len(parent.replies) == 1
    assert parent.cost() is None  # nothing priced
