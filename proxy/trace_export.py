"""OTLP/HTTP span export with JSON bodies, which collectors accept beside protobuf.

The SDK's OTLP exporter builds a protobuf message per span in Python; measured
with every request sampled, its encoding took 13% of a worker's time, on the
export thread but under the GIL. orjson writes the same spans as OTLP's JSON
mapping (ids in hex, 64-bit integers as strings) several times faster, and one
kept-alive connection carries the batches. `tracing.encoding: protobuf` keeps
the SDK's exporter.

An export has `timeout_s` as a whole, not per socket read: a collector that
answers a byte at a time has its connection cut at the deadline (from a timer,
since a blocked read cannot watch the clock), and of its answer only the first
`MAX_ANSWER_BYTES` are read. Otherwise one such collector would hold the export
thread for good, and every span after it would be dropped.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("meshgate.tracing")

MAX_ANSWER_BYTES = 64 * 1024  # a collector's answer is a status and a short message


class JsonSpanExporter(SpanExporter):
    def __init__(self, endpoint: str, headers: dict[str, str], timeout_s: float = 10.0) -> None:
        url = urlsplit(endpoint)
        self.https = url.scheme == "https"
        self.host = url.hostname or "localhost"
        self.port = url.port or (443 if self.https else 80)
        self.path = url.path or "/v1/traces"
        self.headers = {"content-type": "application/json", **headers}
        self.timeout_s = timeout_s
        self.connection: http.client.HTTPConnection | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        body = orjson.dumps(encode(spans))
        for attempt in range(2):  # a kept-alive connection the collector closed: once more
            cut = threading.Event()
            try:
                status = self._post(body, cut)
            except (OSError, http.client.HTTPException) as exc:
                self._close()
                if cut.is_set():  # not a stale connection: the collector is too slow
                    log.warning("could not export %d span(s): no answer within %g s",
                                len(spans), self.timeout_s)  # fmt: skip
                    return SpanExportResult.FAILURE
                if attempt:
                    log.warning("could not export %d span(s): %s", len(spans), exc)
                    return SpanExportResult.FAILURE
                continue
            if status < 300:
                return SpanExportResult.SUCCESS
            log.warning("the collector refused %d span(s): HTTP %d", len(spans), status)
            return SpanExportResult.FAILURE
        return SpanExportResult.FAILURE

    def _post(self, body: bytes, cut: threading.Event) -> int:
        """The collector's status; the connection is cut (and `cut` set) at the deadline."""
        if self.connection is None:
            kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self.connection = kind(self.host, self.port, timeout=self.timeout_s)
        connection = self.connection
        sent: list[socket.socket] = []  # an answer read to its close takes the socket over
        timer = threading.Timer(self.timeout_s, _cut, (connection, sent, cut))
        timer.daemon = True
        timer.start()
        try:
            connection.request("POST", self.path, body=body, headers=self.headers)
            if connection.sock is not None:
                sent.append(connection.sock)
            response = connection.getresponse()
            answer = response.read(MAX_ANSWER_BYTES + 1)
            if cut.is_set() or len(answer) > MAX_ANSWER_BYTES or not response.isclosed():
                self._close()  # the rest is not read: the connection cannot be reused
            return response.status
        finally:
            timer.cancel()

    def _close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def shutdown(self) -> None:
        self._close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _cut(connection: http.client.HTTPConnection, sent: list[socket.socket],
         cut: threading.Event) -> None:  # fmt: skip
    """Wake the export thread's blocked read or write: it fails at once."""
    cut.set()
    for sock in (connection.sock, *sent):
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)


def encode(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """OTLP's ExportTraceServiceRequest, in its JSON mapping, for spans of one resource."""
    resource = spans[0].resource.attributes if spans and spans[0].resource else {}
    return {"resourceSpans": [{
        "resource": {"attributes": _attributes(resource)},
        "scopeSpans": [{"scope": {"name": "meshgate"}, "spans": [_span(s) for s in spans]}],
    }]}  # fmt: skip


def _span(span: ReadableSpan) -> dict[str, Any]:
    context = span.context
    assert context is not None
    out: dict[str, Any] = {
        "traceId": f"{context.trace_id:032x}",
        "spanId": f"{context.span_id:016x}",
        "name": span.name,
        "kind": span.kind.value + 1,  # OTLP counts from SPAN_KIND_UNSPECIFIED = 0
        "startTimeUnixNano": str(span.start_time),
        "endTimeUnixNano": str(span.end_time),
        "attributes": _attributes(span.attributes or {}),
        "status": {"code": span.status.status_code.value},
    }
    if span.parent is not None:
        out["parentSpanId"] = f"{span.parent.span_id:016x}"
    if span.status.description:
        out["status"]["message"] = span.status.description
    return out


# Encoded attributes by (key, type, value) for strings, integers and booleans:
# most repeat from span to span (the model, the provider, the route), and building
# their dicts was a third of the encoding. Emptied when full, so values seen once
# (ids, counts) cannot grow it. (Not floats or arrays: -0.0 == 0.0, (1,) == (True,).)
_ENCODED: dict[tuple[str, type, Any], dict[str, Any]] = {}
_ENCODED_MAX = 4096
_REMEMBERED = (str, int, bool)


def _attributes(attributes) -> list[dict[str, Any]]:
    out = []
    for key, value in attributes.items():
        kind = type(value)
        if kind not in _REMEMBERED:
            out.append({"key": key, "value": _value(value)})
            continue
        pair = _ENCODED.get((key, kind, value))
        if pair is None:
            if len(_ENCODED) >= _ENCODED_MAX:
                _ENCODED.clear()
            pair = _ENCODED[key, kind, value] = {"key": key, "value": _value(value)}
        out.append(pair)
    return out


def _value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [_value(v) for v in value]}}
    return {"stringValue": str(value)}
