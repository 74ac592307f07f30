"""Logging: the gateway's own messages, and one JSON access-log line per request.

The access log carries no prompt or answer text, and no credentials: only
who (the key's name), what (model, deployment) and how it went.

A warning or error that a dependency's outage makes on every request (Redis
down: one per quota check and one per cache lookup) would otherwise be written
thousands of times a second. Each message (its logger and its text before
formatting) is written at most once per REPEAT_WINDOW_S; the next one written
says how many were left out (`"repeated"`). Metrics count every occurrence.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

access = logging.getLogger("meshgate.access")

REPEAT_WINDOW_S = 10.0
MOST_MESSAGES = 1024  # messages remembered; past it all are forgotten at once


class _Repeats(logging.Filter):
    """Warnings and errors: each message at most once per REPEAT_WINDOW_S."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[tuple[str, str], list] = {}  # message -> [next written at, left out]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        entry = self.seen.get(key)
        if entry is not None and record.created < entry[0]:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            record.repeated = entry[1]
        if len(self.seen) >= MOST_MESSAGES:
            self.seen.clear()
        self.seen[key] = [record.created + REPEAT_WINDOW_S, 0]
        return True


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        repeated = getattr(record, "repeated", 0)
        if repeated:  # left out since this message was last written
            entry["repeated"] = repeated
        return orjson.dumps(entry).decode()


def configure(level: str = "info", access_log: bool = True) -> None:
    """Send meshgate's logs to stderr as JSON lines and the access log to stdout."""
    root = logging.getLogger("meshgate")
    if getattr(root, "_meshgate_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter())
    handler.addFilter(_Repeats())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(out)
    access.setLevel(logging.INFO if access_log else logging.WARNING)
    access.propagate = False
    root._meshgate_configured = True  # type: ignore[attr-defined]


def access_line(fields: dict) -> None:
    if access.isEnabledFor(logging.INFO):
        fields["ts"] = round(time.time(), 3)
        access.info(orjson.dumps(fields).decode())
