from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import Event, EventSplitter


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
