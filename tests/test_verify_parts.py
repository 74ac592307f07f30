"""The verify plugin's parts without sockets: schemas from clients, answers read
from bodies and streams, code blocks, the consensus decision; and the plugin
itself with a stub `call_next`."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers

from plugins.verify import Verify, VerifyConfig
from plugins.verify.answer import read_answer
from plugins.verify.code import code_blocks, program
from plugins.verify.consensus import Candidate, ConsensusConfig, decide, normalize, settled
from plugins.verify.schema import Schemas, check_answer, check_tool_calls
from proxy.config import parse_config
from proxy.errors import GatewayError, InvalidRequest
from proxy.pipeline import Call, Reply
from proxy.sse import Event

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
FORMAT = {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}


def test_answers_are_checked_against_the_requested_format():
    schemas = Schemas()
    assert check_answer(schemas, FORMAT, '{"n": 3}') is None
    assert check_answer(schemas, FORMAT, '```json\n{"n": 3}\n```') is None
    assert "required" in check_answer(schemas, FORMAT, '{"m": 3}')
    assert "not valid JSON" in check_answer(schemas, FORMAT, "{n: 3}")
    assert check_answer(schemas, {"response_format": {"type": "json_object"}}, "[1]")
    assert check_answer(schemas, {}, "anything") is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_answer_text_gets_a_verdict_never_an_exception(text):
    result = check_answer(Schemas(), FORMAT, text)
    assert result is None or isinstance(result, str)


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=10))  # fmt: skip
def test_any_schema_a_client_sends_is_used_or_refused_with_400(schema):
    body = {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}
    try:
        check_answer(Schemas(), body, '{"n": 1}')
    except InvalidRequest as exc:
        assert exc.status == 400 and exc.param == "response_format"


def test_patterns_run_on_re2_not_a_backtracking_engine():
    """RE2 answers `^(a+)+$` on a long near-match (Python's re would backtrack for
    ages; load/ has no need to time it: the engine is the point) and refuses what
    only a backtracking engine can do."""

    def body(pattern: str) -> dict:
        schema = {"type": "string", "pattern": pattern}
        return {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}

    assert check_answer(Schemas(), body("^(a+)+$"), orjson.dumps("a" * 100_000 + "!").decode())
    assert check_answer(Schemas(), body("^(a+)+$"), '"aaaa"') is None
    with pytest.raises(InvalidRequest):
        check_answer(Schemas(), body("(a)\\1"), '"aa"')  # a backreference: not RE2


def test_tool_calls_are_checked_by_name_and_arguments():
    body = {"tools": [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}]}

    def call(name, arguments):
        return [{"function": {"name": name, "arguments": arguments}}]

    schemas = Schemas()
    assert check_tool_calls(schemas, body, call("f", '{"n": 1}')) is None
    assert "did not offer" in check_tool_calls(schemas, body, call("g", "{}"))
    assert "not valid JSON" in check_tool_calls(schemas, body, call("f", "{"))
    assert "do not match" in check_tool_calls(schemas, body, call("f", '{"n": "x"}'))


def test_answers_read_from_a_stream_equal_the_same_answer_buffered():
    text, args = "Hello, world", '{"n": 12}'
    body = {"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "content": text, "tool_calls": [{"id": "t", "type": "function",
                                         "function": {"name": "f", "arguments": args}}]}}]}  # fmt: skip
    buffered = read_answer(Reply(body=orjson.dumps(body)), None)
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": text[i : i + 3]}}]}
               for i in range(0, len(text), 3)]  # fmt: skip
    chunks.append({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "t", "type": "function", "function": {"name": "f", "arguments": ""}}]}}]})  # fmt: skip
    chunks += [{"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": args[i : i + 4]}}]}}]} for i in range(0, len(args), 4)]  # fmt: skip
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events = [Event.of(c) for c in chunks] + [Event(b"data: [DONE]\n\n")]
    streamed = read_answer(Reply(body=b"{}"), events)
    assert streamed == buffered


def test_code_blocks_and_the_program_they_make():
    text = "x\n```python\na = 1\n```\n```js\nnope\n```\n~~~py\nb = a + 1\n~~~\n```\nc = b\n```"
    blocks = code_blocks(text)
    assert [b.source for b in blocks] == ["a = 1\n", "b = a + 1\n", "c = b\n"]
    language, source = program(blocks, "assert c == 2")
    assert language.name == "python" and source.endswith("assert c == 2")
    assert program(code_blocks("no code here"), "assert 1") is None


def candidates(keys: list[str | None]) -> list[Candidate]:
    return [Candidate(f"m{i}", i, key=k) for i, k in enumerate(keys)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["x", "y", "z", None]), min_size=1, max_size=7),
       st.integers(1, 4), st.sampled_from(["first", "fail"]))  # fmt: skip
def test_the_winner_is_always_from_a_largest_group_and_meets_the_quorum(keys, quorum, tie):
    config = ConsensusConfig(models=[f"m{i}" for i in range(7)], quorum=quorum, tie_break=tie)
    verdict = decide(config, candidates(keys))
    counts = {k: keys.count(k) for k in keys if k is not None}
    if verdict.winner is None:
        return
    assert counts[verdict.winner.key] == max(counts.values())
    if verdict.how == "agreed":
        assert counts[verdict.winner.key] >= quorum
        assert list(counts.values()).count(max(counts.values())) == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["x", "y", None]), max_size=5),
       st.lists(st.sampled_from(["x", "y", "z", None]), max_size=4))  # fmt: skip
def test_settled_means_no_late_answer_can_change_the_winner(early, late):
    config = ConsensusConfig(models=[f"m{i}" for i in range(9)], quorum=2)
    if not settled(config, candidates(early), len(late)):
        return
    now = decide(config, candidates(early)).winner
    later = decide(config, candidates(early + late)).winner
    assert now is not None and later is not None and now.key == later.key


def test_text_is_compared_without_case_space_or_a_final_full_stop():
    assert normalize("  Paris.\n") == normalize("paris") == normalize("PARIS!")
    assert normalize("Paris") != normalize("Lyon")


def plugin(verify_yaml: str) -> Verify:
    config = parse_config(
        "providers: {up: {type: simulated}}\n"
        "models: [{name: m, deployments: [{provider: up, model: m}]}]\n"
        f"pipeline:\n  - verify: {verify_yaml}\n",
        "t.yaml", env={},
    )  # fmt: skip
    spec = config.pipeline[0]
    catalog = SimpleNamespace(find=lambda name: object(), get=lambda name: None)
    context = SimpleNamespace(catalog=catalog, registry=None)
    from prometheus_client import CollectorRegistry

    context.registry = CollectorRegistry()
    assert isinstance(spec.config, VerifyConfig)
    return Verify(spec.config, context)  # type: ignore[arg-type]


def answer(text: str) -> Reply:
    return Reply(body=orjson.dumps({"choices": [{"index": 0, "message": {"content": text}}]}))


def test_each_repair_is_exactly_one_more_call_with_the_problem_in_it():
    verify = plugin("{rules: [{max_repairs: 3}]}")
    texts = iter(["no", "still no", '{"n": 1}'])
    seen: list[dict] = []

    async def call_next(call: Call) -> Reply:
        seen.append(call.body)
        return answer(next(texts))

    body = {"model": "m", "messages": [{"role": "user", "content": "q"}], **FORMAT}
    call = Call("chat", body, Headers(), "r1", model=SimpleNamespace(name="m"))
    reply = asyncio.run(verify(call, call_next))
    assert len(seen) == 3
    assert "not valid JSON" in seen[1]["messages"][-1]["content"]
    assert seen[1]["messages"][-2] == {"role": "assistant", "content": "no"}
    assert reply.headers["x-meshgate-verification"].startswith("repaired")
    assert len(call.replies) == 0  # recorded by the chain's links, not by the stub


def test_a_request_without_checks_passes_straight_through():
    verify = plugin("{rules: [{checks: [], allow: [json_schema]}]}")
    calls = []

    async def call_next(call: Call) -> Reply:
        calls.append(call)
        return answer("free text")

    body = {"model": "m", "messages": [], "verify": {"report": True}}
    call = Call("chat", body, Headers(), "r2", model=SimpleNamespace(name="m"))
    reply = asyncio.run(verify(call, call_next))
    assert calls == [call] and "verify" not in call.body
    assert "x-meshgate-verification" not in reply.headers


def test_a_stream_longer_than_the_buffer_goes_through_whole_and_says_so():
    verify = plugin("{max_buffer_bytes: 100, rules: [{}]}")

    async def events():
        for i in range(20):
            yield Event.of({"choices": [{"index": 0, "delta": {"content": f"part {i} "}}]})
        yield Event(b"data: [DONE]\n\n")

    async def call_next(call: Call) -> Reply:
        return Reply(events=events())

    body = {"model": "m", "messages": [], "stream": True, **FORMAT}
    call = Call("chat", body, Headers(), "r3", model=SimpleNamespace(name="m"))

    async def read() -> tuple[Reply, list[bytes]]:
        reply = await verify(call, call_next)
        got = []
        while (event := await reply.next_event()) is not None:
            got.append(event.raw)
        return reply, got

    reply, got = asyncio.run(read())
    assert len(got) == 21 and got[-1] == b"data: [DONE]\n\n"
    assert reply.headers["x-meshgate-verification"].startswith("skipped")


@pytest.mark.parametrize("bad", [[], "x", {"checks": [1]}, {"tests": b"x".decode() * 70000}])
def test_malformed_selections_are_refused(bad):
    verify = plugin("{rules: [{allow: [json_schema, code]}]}")
    call = Call("chat", {"model": "m", "messages": [], "verify": bad}, Headers(), "r",
                model=SimpleNamespace(name="m"))  # fmt: skip

    async def call_next(call: Call) -> Reply:
        return answer("x")

    with pytest.raises(InvalidRequest):
        asyncio.run(verify(call, call_next))


def replying(by_model: dict[str, str], seen: list[dict]):
    async def call_next(call: Call) -> Reply:
        seen.append(call.body)
        return answer(by_model[call.body["model"]])

    return call_next


def consensus_plugin(consensus: str) -> Verify:
    return plugin(f"{{rules: [{{checks: [consensus], consensus: {consensus}}}]}}")


def ask(verify: Verify, call_next, **body) -> tuple[Call, Reply]:
    call = Call("chat", {"model": "m", "messages": [{"role": "user", "content": "q"}], **body},
                Headers(), "c", model=SimpleNamespace(name="m"))  # fmt: skip
    return call, asyncio.run(verify(call, call_next))


def test_consensus_on_json_ignores_key_order_and_spacing():
    verify = consensus_plugin("{models: [a, b, c], match: json}")
    seen: list[dict] = []
    by_model = {"a": '{"x": 1, "y": 2}', "b": '{"y":2,"x":1}', "c": '{"x": 3}'}
    _, reply = ask(verify, replying(by_model, seen))
    assert "agreed=a,b" in reply.headers["x-meshgate-verification"]
    assert {body["model"] for body in seen} <= {"a", "b", "c"}


def test_a_scoring_judge_picks_the_best_scored_answer_when_none_agree():
    verify = consensus_plugin(
        "{models: [a, b, c], tie_break: judge, judge: {model: j, mode: score}}"
    )
    seen: list[dict] = []
    by_model = {"a": "one", "b": "two", "c": "three", "j": '{"scores": [2, 9, 5]}'}
    _, reply = ask(verify, replying(by_model, seen))
    assert orjson.loads(reply.body)["choices"][0]["message"]["content"] == "two"
    judge = seen[-1]
    assert judge["model"] == "j" and "Answer 3:\nthree" in judge["messages"][0]["content"]


def test_without_agreement_and_no_tie_break_the_request_fails_with_422():
    verify = consensus_plugin("{models: [a, b, c], tie_break: fail}")
    with pytest.raises(GatewayError) as caught:
        ask(verify, replying({"a": "x", "b": "y", "c": "z"}, []))
    assert caught.value.status == 422 and caught.value.code == "verification_failed"


def test_a_repair_can_go_to_another_model():
    verify = plugin("{rules: [{max_repairs: 2, repair_models: [m2]}]}")
    seen: list[dict] = []
    texts = iter(["no", '{"n": 2}'])

    async def call_next(call: Call) -> Reply:
        seen.append(call.body)
        return answer(next(texts))

    _, reply = ask(verify, call_next, **FORMAT)
    assert [b["model"] for b in seen] == ["m", "m2"]
    assert reply.headers["x-meshgate-verification"].startswith("repaired")


def test_a_failed_answer_marked_rather_than_refused_is_not_stored():
    verify = plugin("{rules: [{max_repairs: 0, on_failure: mark}]}")
    _, reply = ask(verify, replying({"m": "not json"}, []), **FORMAT)
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["x-meshgate-verification"].startswith("failed")
