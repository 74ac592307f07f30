"""Raw HTTP against the gateway: SSE framing, cancellation, and every error path."""

from __future__ import annotations

import socket
import time
import uuid

import httpx
import orjson
import pytest

from tests.conftest import MESSAGES, METRICS_KEY, scrape, upstream_stats


@pytest.fixture
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        yield c


def chat(http, model="gpt-test", **extra):
    return http.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, **extra})


def assert_error(response, status, *, type=None, code=None, param=None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if type is not None:
        assert error["type"] == type
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in response.text
    return error


def test_sse_framing(http):
    with http.stream("POST", "/v1/chat/completions",
                     json={"model": "gpt-test", "messages": MESSAGES, "stream": True}) as r:  # fmt: skip
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["cache-control"] == "no-cache"
        body = r.read()
    events = body.split(b"\n\n")
    assert events[-1] == b""
    assert events[-2] == b"data: [DONE]"
    for event in events[:-2]:
        assert event.startswith(b"data: {")
        orjson.loads(event[6:])


def test_stream_events_arrive_as_they_are_produced(http, upstream):
    """The first token reaches the client while the upstream is still generating the
    rest (19 more tokens, 100 ms apart): forwarded as it arrives, not buffered. Told
    by the upstream's own count of finished streams, not by a clock."""
    body = {"model": "gpt-test", "messages": MESSAGES, "stream": True,
            "fake": {"tokens": 20, "token_delay_ms": 100}}  # fmt: skip
    before = upstream_stats(upstream)["completed_streams"]
    at_first_token = None
    received = b""
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for chunk in r.iter_raw():
            received += chunk
            if at_first_token is None and b'"content":" tok"' in received:
                at_first_token = upstream_stats(upstream)
    assert at_first_token is not None, received
    assert at_first_token["completed_streams"] == before  # the upstream had not finished
    assert at_first_token["open_streams"] >= 1
    assert received.endswith(b"data: [DONE]\n\n")
    assert upstream_stats(upstream)["completed_streams"] == before + 1


def test_client_disconnect_cancels_upstream_stream(gateway, upstream):
    before = upstream_stats(upstream)["aborted_streams"]
    body = orjson.dumps({"model": "gpt-test", "messages": MESSAGES, "stream": True,
                         "fake": {"tokens": 200, "token_delay_ms": 50}})  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert b"200" in sock.recv(4096)
    sock.close()  # 200 tokens at 50 ms would take 10 s; the upstream must stop now
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        stats = upstream_stats(upstream)
        if stats["aborted_streams"] > before:
            break
        time.sleep(0.05)
    assert stats["aborted_streams"] == before + 1
    lines = [x for x in gateway.access_lines() if x["status"] == 499]
    assert lines, "the access log records the client going away"


def test_upstream_dies_mid_stream_gives_error_event(http):
    body = {"model": "gpt-test", "messages": MESSAGES, "stream": True, "fake": {"abort_after": 3}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = r.read().split(b"\n\n")
    assert b"[DONE]" not in b"".join(events)
    last = orjson.loads(events[-2][6:])
    assert last["error"]["type"] == "upstream_error"
    assert len(events) == 3 + 2  # three events, the error event, the final empty piece


@pytest.mark.parametrize(
    ("fault", "status", "kind"),
    [
        ({"error_rate": 1, "error_status": 503}, 503, "server_error"),  # the upstream's own
        ({"fail_times": 1, "fail_mode": "abort"}, 502, "upstream_error"),  # dropped
        ({"malformed_event": 1}, 502, "upstream_error"),  # not JSON
    ],
)
def test_upstream_failure_before_first_event_is_an_ordinary_error(http, fault, status, kind):
    fault = {**fault, "fail_key": uuid.uuid4().hex} if "fail_times" in fault else fault
    body = {"model": "gpt-test", "messages": MESSAGES, "stream": True, "fake": fault}
    r = http.post("/v1/chat/completions", json=body)
    assert_error(r, status, type=kind)


def test_an_upstream_error_event_is_an_error_before_the_stream_starts_and_passes_after(http):
    body = {"model": "gpt-test", "messages": MESSAGES, "stream": True, "fake": {"error_event": 1}}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 502  # nothing was sent yet: an ordinary error (and retryable)
    assert r.json()["error"]["message"] == "injected stream error"
    body["fake"] = {"error_event_after": 2}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    events = [e for e in r.content.split(b"\n\n") if e]
    assert orjson.loads(events[2][6:])["error"]["message"] == "injected stream error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES}, "model"),
        ({"model": 3, "messages": MESSAGES}, "model"),
        ({"model": "gpt-test"}, "messages"),
        ({"model": "gpt-test", "messages": "hi"}, "messages"),
        ({"model": "gpt-test", "messages": [{"content": "no role"}]}, "messages[0]"),
        ({"model": "gpt-test", "messages": MESSAGES, "stream": "yes"}, "stream"),
    ],
)
def test_bad_chat_bodies(http, body, param):
    r = http.post("/v1/chat/completions", json=body)
    assert_error(r, 400, type="invalid_request_error", param=param)


def test_bad_completions_and_embeddings_bodies(http):
    assert_error(http.post("/v1/completions", json={"model": "gpt-test"}), 400, param="prompt")
    assert_error(
        http.post("/v1/completions", json={"model": "gpt-test", "prompt": {"x": 1}}), 400,
        param="prompt",
    )  # fmt: skip
    assert_error(http.post("/v1/embeddings", json={"model": "gpt-test"}), 400, param="input")


def test_malformed_json_and_non_object(http):
    bad = http.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert_error(bad, 400, type="invalid_request_error")
    assert_error(http.post("/v1/chat/completions", json=[1, 2]), 400)


def test_unknown_model_is_404(http):
    assert_error(chat(http, "gpt-nope"), 404, code="model_not_found", param="model")


def test_body_over_limit_is_413(http):
    big = {"model": "gpt-test", "messages": [{"role": "user", "content": "x" * 70000}]}
    assert_error(http.post("/v1/chat/completions", json=big), 413, code="request_too_large")


def test_chunked_body_over_limit_is_413(http):
    def chunks():
        for _ in range(20):
            yield b"x" * 8192

    r = http.post("/v1/chat/completions", content=chunks())
    assert_error(r, 413)


def test_upstream_error_body_passes_through_with_status(http):
    r = chat(
        http, fake={"error_rate": 1, "error_status": 400, "error_code": "context_length_exceeded"}
    )
    error = assert_error(r, 400, code="context_length_exceeded")
    assert error["message"] == "injected error 400"


def test_upstream_retry_after_is_passed_on(http):
    r = chat(http, fake={"error_rate": 1, "error_status": 429, "retry_after": 7})
    assert_error(r, 429)
    assert r.headers["retry-after"] == "7"


def test_connection_failure_is_502(http):
    assert_error(chat(http, "dead-model"), 502, type="upstream_error", code="upstream_unavailable")


def test_upstream_timeout_is_504(http):
    r = chat(http, "slow-model", fake={"latency_ms": 1500})
    assert_error(r, 504, code="upstream_timeout")


def test_stream_stall_after_first_event_is_an_error_event(http):
    body = {"model": "slow-model", "messages": MESSAGES, "stream": True,
            "fake": {"tokens": 3, "token_delay_ms": 1500}}  # fmt: skip
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    last = orjson.loads(r.content.split(b"\n\n")[-2][6:])
    assert last["error"]["code"] == "upstream_timeout"


def test_missing_secret_is_reported_on_request(http):
    error = assert_error(chat(http, "nokey-model"), 503, code="provider_not_configured")
    assert "MESHGATE_TEST_UNSET_KEY" in error["message"]


def test_missing_secret_is_reported_at_start(gateway):
    assert "MESHGATE_TEST_UNSET_KEY is not set" in gateway.output()


def test_unknown_route_and_wrong_method(http):
    assert_error(http.get("/v1/nothing-here"), 404, code="unknown_url")
    assert_error(http.get("/v1/chat/completions"), 405)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"), ("GET", "/v1/nothing-here"),
     ("GET", "/v1/chat/completions"), ("POST", "/health"), ("GET", "/v1/models"),
     ("GET", "/admin/spend")],
)  # fmt: skip
def test_every_answer_carries_a_request_id(http, method, path):
    mine = http.request(method, path, headers={"x-request-id": "probe-42"})
    assert mine.headers["x-request-id"] == "probe-42"
    made = http.request(method, path, headers={"x-request-id": "bad id\twith tab"})
    assert len(made.headers["x-request-id"]) == 24
    assert made.headers["x-request-id"] != http.request(method, path).headers["x-request-id"]


def test_health_ready_metrics(http, gateway):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").json() == {"status": "ready"}
    chat(http)
    text = scrape(gateway.url)
    assert (
        'meshgate_requests_total{deployment="fake/upstream-model",model="gpt-test",status="200"}'
        in text
    )
    for name in ("meshgate_request_duration_seconds_bucket", "meshgate_overhead_seconds_bucket",
                 "meshgate_upstream_duration_seconds_bucket", "meshgate_in_flight_requests",
                 'meshgate_tokens_total{deployment="fake/upstream-model",kind="completion"'):  # fmt: skip
        assert name in text
    streamed = chat(http, stream=True)
    assert streamed.status_code == 200
    assert "meshgate_time_to_first_token_seconds_bucket" in scrape(gateway.url)


def test_access_log_has_one_line_per_request_and_no_secrets(http, gateway):
    r = chat(http, fake={"echo": 1}, user="secret prompt owner")
    request_id = r.headers["x-request-id"]
    http.post(
        "/v1/chat/completions",
        json={
            "model": "gpt-test",
            "messages": [{"role": "user", "content": "TOP-SECRET-PROMPT"}],
        },
        headers={"authorization": "Bearer sk-client-secret-xyz"},
    )
    line = gateway.access_line(request_id)
    assert line["model"] == "gpt-test" and line["deployment"] == "fake/upstream-model"
    assert line["status"] == 200 and line["completion_tokens"] == 16
    out = gateway.output()
    for secret in ("sk-upstream-secret-1234567890", "sk-client-secret-xyz", "TOP-SECRET-PROMPT",
                   METRICS_KEY):  # fmt: skip
        assert secret not in out
    text = scrape(gateway.url)
    assert "sk-upstream-secret" not in text and METRICS_KEY not in text


def test_routes_without_v1_prefix(http):
    r = http.post("/chat/completions", json={"model": "sim", "messages": MESSAGES})
    assert r.status_code == 200
    assert r.json()["object"] == "chat.completion"


def raw_chat(gateway, body: dict, accept: str | None) -> tuple[httpx.Headers, bytes]:
    """The answer's headers and its bytes as sent (httpx would decode gzip itself)."""
    with httpx.Client() as client:
        request = client.build_request("POST", gateway.url + "/v1/chat/completions", json=body)
        del request.headers["accept-encoding"]
        if accept is not None:
            request.headers["accept-encoding"] = accept
        response = client.send(request, stream=True)
        try:
            return response.headers, b"".join(response.iter_raw())
        finally:
            response.close()


def test_large_answers_are_gzipped_for_clients_that_accept_it_and_streams_never(gateway):
    import gzip

    big = {"model": "gpt-test", "messages": MESSAGES, "fake": {"tokens": 3000}}
    headers, content = raw_chat(gateway, big, "gzip, br")
    assert headers["content-encoding"] == "gzip"
    assert "accept-encoding" in headers["vary"]
    answer = orjson.loads(gzip.decompress(content))
    assert answer["usage"]["completion_tokens"] == 3000
    assert int(headers["content-length"]) == len(content) < 4096

    headers, content = raw_chat(gateway, big, "identity")
    assert "content-encoding" not in headers
    assert orjson.loads(content)["usage"]["completion_tokens"] == 3000
    assert "content-encoding" not in raw_chat(gateway, big, None)[0]

    small = {"model": "gpt-test", "messages": MESSAGES, "fake": {"tokens": 5}}
    assert "content-encoding" not in raw_chat(gateway, small, "gzip")[0]
    headers, content = raw_chat(gateway, {**big, "stream": True}, "gzip")
    assert "content-encoding" not in headers
    assert content.endswith(b"data: [DONE]\n\n")
