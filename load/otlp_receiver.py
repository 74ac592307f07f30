"""A small OTLP/HTTP traces receiver, for the tracing tests and benchmark.

    python -m load.otlp_receiver --port 4318

Accepts `POST /v1/traces` (protobuf or JSON, plain or gzip), as a collector would,
answers 200, and keeps what it got: `GET /spans` returns every span received
(name, kind, ids, attributes) as JSON, `GET /stats` the counts.
"""

from __future__ import annotations

import argparse
import gzip

import orjson
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def _json_value(value: dict):
    ((kind, inner),) = value.items()
    if kind == "arrayValue":
        return [_json_value(v) for v in inner.get("values", [])]
    return int(inner) if kind == "intValue" else inner


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class Receiver:
    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.spans: list[dict] = []
        self.requests = 0
        self.count = 0

    async def traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.requests += 1
        if request.content_type == "application/json":
            if self.keep:
                self._json(orjson.loads(body))
            else:  # counting only: as little of the machine as a collector written in Go
                self.count += body.count(b'"spanId"')
            return web.Response(body=b"{}", content_type="application/json")
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource in message.resource_spans:
            for scope in resource.scope_spans:
                self.count += len(scope.spans)
                if not self.keep:
                    continue
                for span in scope.spans:
                    self.spans.append({
                        "name": span.name, "kind": span.kind,
                        "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "status": span.status.code,
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                    })  # fmt: skip
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    def _json(self, message: dict) -> None:
        for resource in message.get("resourceSpans", []):
            for scope in resource.get("scopeSpans", []):
                spans = scope.get("spans", [])
                self.count += len(spans)
                if not self.keep:
                    continue
                for span in spans:
                    self.spans.append({
                        "name": span["name"], "kind": span.get("kind", 0),
                        "trace_id": span["traceId"], "span_id": span["spanId"],
                        "parent_span_id": span.get("parentSpanId", ""),
                        "status": span.get("status", {}).get("code", 0),
                        "attributes": {a["key"]: _json_value(a["value"])
                                       for a in span.get("attributes", [])},
                    })  # fmt: skip

    async def spans_json(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.spans), content_type="application/json")

    async def stats(self, request: web.Request) -> web.Response:
        counts = {"requests": self.requests, "spans": self.count}
        return web.Response(body=orjson.dumps(counts), content_type="application/json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    parser.add_argument("--count-only", action="store_true", help="keep counts, not spans")
    args = parser.parse_args(argv)
    receiver = Receiver(keep=not args.count_only)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", receiver.traces)
    app.router.add_get("/spans", receiver.spans_json)
    app.router.add_get("/stats", receiver.stats)
    app.router.add_get("/health", receiver.stats)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
