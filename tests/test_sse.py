from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import Event, EventSplitter, as_stream
from tests.conftest import JSON_VALUES


def test_splitter_handles_split_chunks_and_crlf():
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a"') == []
    events = splitter.feed(b": 1}\r\n\r\ndata: [DONE]\r\n\r\n")
    assert [e.raw for e in events] == [b'data: {"a": 1}\n\n', b"data: [DONE]\n\n"]
    assert events[0].json() == {"a": 1}
    assert events[1].is_done and events[1].json() is None
    assert splitter.pending == b""


def test_multiline_data_and_comments():
    (event,) = EventSplitter().feed(b": keep-alive\ndata: one\ndata:two\n\n")
    assert event.data == b"one\ntwo"


def test_has_usage_without_parsing():
    assert Event(b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n').has_usage()
    assert not Event(b'data: {"choices":[],"usage":null}\n\n').has_usage()
    assert not Event(b'data: {"choices":[], "usage": null}\n\n').has_usage()
    assert not Event(b'data: {"choices":[]}\n\n').has_usage()


lines = st.lists(
    st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"") or b"x"),
    min_size=1,
    max_size=3,
)
events = st.lists(st.tuples(lines, st.sampled_from([b"\n", b"\r\n"])), max_size=6)


@settings(max_examples=300, deadline=None)
@given(events, st.binary(max_size=10).map(lambda b: b.replace(b"\n", b"")),
       st.lists(st.integers(min_value=1, max_value=9), max_size=40))  # fmt: skip
def test_any_chunking_gives_the_same_events(written, torn, cuts):
    """However the bytes arrive, the same events come out, LF or CRLF framed, and
    what is left is the torn event at the end, counted in pending_bytes."""
    data = b"".join(end.join(ls) + end + end for ls, end in written) + torn
    expected = [b"\n".join(ls) + b"\n\n" for ls, _ in written]
    splitter = EventSplitter()
    got, at = [], 0
    for cut in [*cuts, len(data)]:
        got += [event.raw for event in splitter.feed(data[at : at + cut])]
        at += cut
        assert splitter.pending_bytes == len(splitter.pending)
    assert got == expected
    assert splitter.pending == torn.replace(b"\r\n", b"\n")


CHOICE_LIKE = st.fixed_dictionaries(
    {},
    optional={"index": JSON_VALUES, "message": JSON_VALUES | st.fixed_dictionaries(
        {}, optional={"role": JSON_VALUES, "content": JSON_VALUES,
                      "tool_calls": JSON_VALUES | st.lists(JSON_VALUES | st.dictionaries(
                          st.sampled_from(["id", "type", "function"]), JSON_VALUES), max_size=3)}),
              "text": JSON_VALUES, "finish_reason": JSON_VALUES, "logprobs": JSON_VALUES},
)  # fmt: skip


@given(
    endpoint=st.sampled_from(["chat", "completions"]),
    choices=st.lists(CHOICE_LIKE | JSON_VALUES, max_size=3),
    usage=JSON_VALUES,
)
def test_any_whole_answer_becomes_a_stream_of_json_chunks_ending_in_done(endpoint, choices, usage):
    answer = {"id": "x", "model": "m", "choices": choices, "usage": usage}
    events = as_stream(endpoint, answer)
    assert events[-1].is_done
    chunks = [e.json() for e in events[:-1]]
    assert len(chunks) == (2 if isinstance(usage, dict) else 1)
    kind = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
    assert all(c["object"] == kind and c["id"] == "x" for c in chunks)
    assert len(chunks[0]["choices"]) == sum(isinstance(c, dict) for c in choices)
    for piece in chunks[0]["choices"]:
        calls = piece.get("delta", {}).get("tool_calls")
        if isinstance(calls, list):
            assert [c["index"] for c in calls if isinstance(c, dict)] == [
                i for i, c in enumerate(calls) if isinstance(c, dict)
            ]
