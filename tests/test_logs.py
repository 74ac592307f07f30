"""proxy/logs.py: a warning repeated on every request is written once per window,
with the count of those left out; everything below a warning is always written."""

from __future__ import annotations

import logging

import orjson
from hypothesis import given
from hypothesis import strategies as st

from proxy import logs

MESSAGES = st.sampled_from([("meshgate.quotas", "state down: %s"), ("meshgate.cache", "miss: %s"),
                            ("meshgate.cache", "state down: %s")])  # fmt: skip
LEVELS = st.sampled_from([logging.INFO, logging.WARNING, logging.ERROR])


def record(name: str, msg: str, level: int, at: float) -> logging.LogRecord:
    made = logging.LogRecord(name, level, __file__, 1, msg, ("redis: refused",), None)
    made.created = at
    return made


@given(st.lists(st.tuples(MESSAGES, LEVELS, st.floats(0, 25))))
def test_each_warning_is_written_once_per_window_with_the_count_left_out(events):
    repeats = logs._Repeats()
    formatter = logs._JSONFormatter()
    now = 1000.0
    model: dict[tuple[str, str], list] = {}  # message -> [next written at, left out]
    for (name, msg), level, later in events:
        now += later
        made = record(name, msg, level, now)
        written = repeats.filter(made)
        if level < logging.WARNING:
            assert written
            continue
        entry = model.get((name, msg))
        expected = entry is None or now >= entry[0]
        assert written == expected
        if not written:
            entry[1] += 1
            continue
        line = orjson.loads(formatter.format(made))
        assert line.get("repeated", 0) == (entry[1] if entry else 0)
        assert line["message"] == msg % ("redis: refused",)
        model[name, msg] = [now + logs.REPEAT_WINDOW_S, 0]


def test_the_messages_remembered_are_bounded():
    repeats = logs._Repeats()
    for i in range(3 * logs.MOST_MESSAGES):
        assert repeats.filter(record("meshgate.x", f"unique {i}", logging.WARNING, 1000.0))
    assert len(repeats.seen) <= logs.MOST_MESSAGES
