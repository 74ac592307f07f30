"""Logging: the gateway's own messages, and one JSON access-log line per request.

The access log carries no prompt or answer text, and no credentials: only
who (the key's name), what (model, deployment) and how it went.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

access = logging.getLogger("meshgate.access")


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
        return orjson.dumps(entry).decode()


def configure(level: str = "info", access_log: bool = True) -> None:
    """Send meshgate's logs to stderr as JSON lines and the access log to stdout."""
    root = logging.getLogger("meshgate")
    if getattr(root, "_meshgate_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter())
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
