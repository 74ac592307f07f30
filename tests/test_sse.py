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
