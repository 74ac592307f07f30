"""proxy/tracing.py: off, nothing is installed; on, a server span per request (no
per-send spans), a client span per upstream attempt with the GenAI attributes,
spans for the cache, quotas, routing and verification, traceparent to the
upstream and the trace id in the access log. Spans are read from the SDK's
in-memory exporter, and once from a real OTLP/HTTP receiver over a socket."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from proxy import trace_export, tracing
from proxy.app import create_app
from proxy.config import parse_config
from tests.conftest import HOSTILE_WAYS, LogLines, Server, free_port, start_gateway

KEY = "sk-tracing-0123456789"


def config(upstream_port: int, tracing_yaml: str) -> str:
    return f"""
server: {{host: 127.0.0.1}}
tracing: {tracing_yaml}
providers: {{up: {{type: openai, base_url: "http://127.0.0.1:{upstream_port}/v1"}}}}
models:
  - name: m
    deployments:
      - {{provider: up, model: up-m, name: d1, price: {{input_usd_per_mtok: 1, output_usd_per_mtok: 1}}}}
      - {{provider: up, model: up-m, name: d2, price: {{input_usd_per_mtok: 1, output_usd_per_mtok: 1}}}}
pipeline:
  - auth: {{keys: [{{name: k, key: {KEY}, team: t}}]}}
  - verify: {{rules: [{{checks: [json_schema]}}]}}
  - quotas: {{limits: [{{per: key, rpm: 1000}}]}}
  - cache: {{}}
  - routing: {{strategy: least-busy}}
"""


def test_off_installs_nothing(upstream):
    app = create_app(parse_config(config(upstream.port, "{enabled: false}"), "t.yaml", env={}))
    assert not tracing.enabled()
    assert "OpenTelemetryMiddleware" not in repr(app.user_middleware)
    assert tracing.span("x") is tracing.span("y")  # one shared do-nothing context


@contextlib.contextmanager
def tracing_app(upstream: Server, how: str) -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    """The app of `config` with tracing `how`, its spans in an in-memory exporter."""
    exporter = InMemorySpanExporter()
    cfg = parse_config(config(upstream.port, how), "t.yaml", env={})
    original = tracing.setup
    tracing.setup = lambda c: original(c, exporter=exporter)  # type: ignore[assignment]
    try:
        app = create_app(cfg)
    finally:
        tracing.setup = original  # type: ignore[assignment]
    try:
        with TestClient(app) as client:
            yield client, exporter
    finally:
        tracing.setup(tracing.TracingConfig())  # off again for the other tests


@pytest.fixture
def traced(upstream) -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    with tracing_app(upstream, "{enabled: true}") as traced:
        yield traced


def test_a_request_makes_one_server_span_and_children_for_each_step(traced):
    client, exporter = traced
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}, "fake": {"reply": '{"a": 1}', "echo": 1}}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    servers = [s for s in spans if s.kind.name == "SERVER"]
    assert len(servers) == 1 and not any("http send" in n or "http receive" in n for n in names)
    (server,) = servers
    trace_id = server.context.trace_id
    assert all(s.context.trace_id == trace_id for s in spans)
    for step in ("meshgate.cache.lookup", "meshgate.quota.check", "meshgate.route",
                 "meshgate.verify.json_schema", "chat up-m"):  # fmt: skip
        assert step in names, names
    (attempt,) = [s for s in spans if s.name == "chat up-m"]
    a = attempt.attributes
    assert attempt.kind.name == "CLIENT"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.system"] == "openai"
    assert a["gen_ai.request.model"] == "up-m" and a["gen_ai.response.model"] == "up-m"
    assert a["gen_ai.response.id"].startswith("chatcmpl-")
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    # traceparent reached the upstream, naming the attempt's span
    echoed = r.json()["echo"]["headers"]["traceparent"]
    assert echoed.split("-")[1] == f"{trace_id:032x}"
    assert echoed.split("-")[2] == f"{attempt.context.span_id:016x}"


def test_a_caller_s_trace_is_joined_and_its_tracestate_stays_here(traced):
    client, exporter = traced
    caller = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"authorization": f"Bearer {KEY}", "traceparent": f"00-{caller}-00f067aa0ba902b7-01",
               "tracestate": "vendor=secret-tenant-42,other=x"}  # fmt: skip
    body = {"model": "m", "messages": [{"role": "user", "content": "joined"}],
            "fake": {"echo": 1}}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200
    sent = r.json()["echo"]["headers"]
    assert sent["traceparent"].split("-")[1] == caller
    assert "tracestate" not in sent and "secret-tenant-42" not in r.text
    (attempt,) = [s for s in exporter.get_finished_spans() if s.name == "chat up-m"]
    assert attempt.context.trace_id == int(caller, 16)


def traced_call(client: TestClient, traceparent: str | None) -> dict:
    """One chat request with `traceparent` (if any); the traceparent the upstream got."""
    headers = {"authorization": f"Bearer {KEY}"}
    if traceparent is not None:
        headers["traceparent"] = traceparent
    body = {"model": "m", "messages": [{"role": "user", "content": f"sampled? {traceparent!r}"}],
            "fake": {"echo": 1}}  # fmt: skip
    headers["cache-control"] = "no-cache"
    r = client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["echo"]["headers"]["traceparent"]


TRACE_ID = st.integers(1, 2**128 - 1).map(lambda n: f"{n:032x}")
SPAN_ID = st.integers(1, 2**64 - 1).map(lambda n: f"{n:016x}")
TRACEPARENTS = st.builds(lambda t, s, f: f"00-{t}-{s}-{f}", TRACE_ID, SPAN_ID,
                         st.sampled_from(["00", "01"]))  # fmt: skip
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)


def test_a_malformed_traceparent_is_sampled_by_the_ratio_not_always(upstream):
    """With a ratio of 0 nothing is recorded, whatever a client puts in traceparent
    that is not a valid one (it would otherwise make a root the SDK always samples)."""
    with tracing_app(upstream, "{enabled: true, sample_ratio: 0}") as (client, exporter):

        @settings(max_examples=60, deadline=None)
        @given(st.one_of(HEADER_TEXT, TRACEPARENTS.map(lambda t: t.replace("-", "_", 1)),
                         TRACEPARENTS.map(lambda t: "00-" + "0" * 32 + t[35:])))  # fmt: skip
        def check(garbage):
            sent = traced_call(client, garbage)
            assert sent.endswith("-00")  # the ids travel on, unsampled
            assert exporter.get_finished_spans() == ()

        check()


@pytest.mark.parametrize("ratio", [0, 1])
@pytest.mark.parametrize("follow", [True, False])
def test_a_caller_s_flag_decides_unless_the_gateway_does_not_follow_callers(
    upstream, ratio, follow
):
    """follow_caller (the default): a caller's sampled flag is followed. false: the
    ratio decides for every request, the caller's trace still joined."""
    how = f"{{enabled: true, sample_ratio: {ratio}, follow_caller: {str(follow).lower()}}}"
    with tracing_app(upstream, how) as (client, exporter):

        @settings(max_examples=15, deadline=None)
        @given(TRACEPARENTS)
        def check(traceparent):
            exporter.clear()
            _, trace_id, span_id, flag = traceparent.split("-")
            sent = traced_call(client, traceparent)
            assert sent.split("-")[1] == trace_id  # joined, sampled or not
            sampled = flag == "01" if follow else ratio == 1
            spans = exporter.get_finished_spans()
            assert bool(spans) == sampled and sent.endswith("-01" if sampled else "-00")
            for server in [s for s in spans if s.kind.name == "SERVER"]:
                assert server.parent is not None and f"{server.parent.span_id:016x}" == span_id

        check()


def test_a_stream_s_attempt_span_ends_with_the_stream_and_has_its_first_token_time(traced):
    client, exporter = traced
    body = {"model": "m", "messages": [{"role": "user", "content": "stream"}], "stream": True,
            "stream_options": {"include_usage": True}, "fake": {"reply": "{}"}}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    (attempt,) = [s for s in exporter.get_finished_spans() if s.name == "chat up-m"]
    assert attempt.attributes["gen_ai.response.time_to_first_chunk"] >= 0
    assert attempt.attributes["gen_ai.usage.output_tokens"] > 0


def test_a_failed_attempt_is_an_error_span(traced):
    client, exporter = traced
    body = {"model": "m", "messages": [{"role": "user", "content": "fail"}],
            "fake": {"error_rate": 1, "error_status": 500}}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code >= 500
    (attempt,) = [s for s in exporter.get_finished_spans() if s.name == "chat up-m"]
    assert attempt.status.status_code.name == "ERROR" and attempt.attributes["error.type"]


@pytest.fixture(scope="module")
def receiver(tmp_path_factory) -> Iterator[Server]:
    port = free_port()
    args = [sys.executable, "-m", "load.otlp_receiver", "--port", str(port)]
    server = Server(args, port, tmp_path_factory.mktemp("otlp") / "otlp.log", "/health")
    yield server
    server.stop()


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
def test_spans_reach_a_real_otlp_receiver_and_the_trace_id_is_in_the_access_log(
    tmp_path, upstream, receiver, encoding
):
    endpoint = f"http://127.0.0.1:{receiver.port}/v1/traces"
    how = f'{{enabled: true, endpoint: "{endpoint}", encoding: {encoding}}}'
    gateway = start_gateway(tmp_path, config(upstream.port, how))
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "over the wire"}]}
        r = httpx.post(gateway.url + "/v1/chat/completions", json=body,
                       headers={"authorization": f"Bearer {KEY}"}, timeout=30)  # fmt: skip
        assert r.status_code == 200
    finally:
        gateway.stop()  # shutting down flushes what the batch processor holds
    (line,) = [x for x in gateway.access_lines() if x.get("endpoint") == "chat"]
    deadline = time.monotonic() + 10
    while True:
        spans = orjson.loads(httpx.get(receiver.url + "/spans").content)
        ours = [s for s in spans if s["trace_id"] == line["trace_id"]]
        if len(ours) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    names = {s["name"] for s in ours}
    assert "chat up-m" in names and "meshgate.route" in names
    (attempt,) = [s for s in ours if s["name"] == "chat up-m"]
    assert attempt["attributes"]["gen_ai.request.model"] == "up-m"
    assert attempt["attributes"]["gen_ai.usage.output_tokens"] > 0


SCALARS = st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text()
ATTRIBUTES = st.dictionaries(
    st.sampled_from(["gen_ai.system", "n", "flag", "ratio", "ids"]),
    SCALARS | st.lists(SCALARS, max_size=3).map(tuple),
)


@given(st.lists(ATTRIBUTES, min_size=1, max_size=4))
def test_attributes_encode_as_otlp_json_however_often_they_repeat(spans):
    """Encoded pairs are remembered, so repeats cost nothing: True, 1 and 1.0 stay
    three types, and every encoding equals the one made from scratch."""
    for attributes in spans + spans:
        expected = [{"key": k, "value": trace_export._value(v)} for k, v in attributes.items()]
        assert trace_export._attributes(attributes) == expected
    assert len(trace_export._ENCODED) <= trace_export._ENCODED_MAX


def test_values_seen_once_cannot_grow_the_remembered_encodings():
    for i in range(3 * trace_export._ENCODED_MAX):
        trace_export._attributes({"gen_ai.response.id": f"chatcmpl-{i}"})
    assert len(trace_export._ENCODED) <= trace_export._ENCODED_MAX
    assert trace_export._attributes({"flag": True}) == [
        {"key": "flag", "value": {"boolValue": True}}
    ]
    assert trace_export._attributes({"flag": 1}) == [{"key": "flag", "value": {"intValue": "1"}}]


@pytest.mark.parametrize("way", HOSTILE_WAYS)
def test_an_export_has_its_timeout_as_a_whole_and_reads_a_short_answer(hostile_http, way):
    """A collector that sends its status line a byte at a time is cut at `timeout_s`
    (not retried: it is not a stale connection); one that sends a 200 and then a
    body slowly or without end has said yes, and its connection is not kept."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    exporter = trace_export.JsonSpanExporter(hostile_http(way) + "/v1/traces", {}, timeout_s=0.5)
    done: list = []
    with LogLines("meshgate.tracing") as said:
        export = threading.Thread(target=lambda: done.append(exporter.export([])), daemon=True)
        export.start()
        export.join(30)
    assert done, "the export hung"
    if way == "slow-head":
        assert done == [SpanExportResult.FAILURE]
        assert said.lines == ["could not export 0 span(s): no answer within 0.5 s"]
    else:
        assert done == [SpanExportResult.SUCCESS] and not said.lines
    assert exporter.connection is None  # what was left unread is never read as an answer


def test_shutdown_gives_the_last_spans_seconds_whatever_the_collector_does(hostile_http,
                                                                          monkeypatch):  # fmt: skip
    """The SDK would wait 30 s for its batch processor, whose export waits out the
    exporter's own timeout: the process exits after SHUTDOWN_S, and says so."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    monkeypatch.setattr(tracing, "SHUTDOWN_S", 0.5)
    url = hostile_http("slow-head") + "/v1/traces"
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(trace_export.JsonSpanExporter(url, {}, 600)))
    provider.get_tracer("test").start_span("queued").end()
    returned = threading.Event()
    with LogLines("meshgate.tracing") as said:
        threading.Thread(target=lambda: (tracing.shutdown(provider), returned.set()),
                         daemon=True).start()  # fmt: skip
        assert returned.wait(20), "shutdown waited on the collector"
    assert said.lines == ["the last spans did not reach the collector within 0.5 s"]
