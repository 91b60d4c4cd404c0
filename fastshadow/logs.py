"""Structured logs: one line per event, `event=... key=value ...` or JSON.

Every line names what happened and the device it happened to, so that an
operator can grep one device's story out of a process serving many. Text
lines start with an ISO-8601 local time with its UTC offset, to the
millisecond (`2025-03-14T07:01:12.184+01:00`); JSON lines carry the same as
`time`, and `ts` in Unix seconds.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

_RESERVED = set(vars(logging.makeLogRecord({})))


def kv(logger: logging.Logger, level: int, event: str, /, **fields) -> None:
    """Log `event` with structured fields (kept on the record for the JSON formatter)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields}, stacklevel=2)


def _fmt_value(v) -> str:
    s = str(v)
    if not s or any(c in s for c in ' ="'):
        return json.dumps(s)
    return s


def iso_time(created: float) -> str:
    """ISO-8601 local time with the UTC offset, to the millisecond."""
    return datetime.datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = iso_time(record.created)
        fields = getattr(record, "fields", {})
        parts = [ts, record.levelname.lower(), record.getMessage()]
        parts += [f"{k}={_fmt_value(v)}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": record.created, "time": iso_time(record.created), "level": record.levelname.lower(),
               "logger": record.name,
               "event": record.getMessage()}
        doc.update({k: v if isinstance(v, (int, float, bool)) or v is None else str(v)
                    for k, v in getattr(record, "fields", {}).items()})
        return json.dumps(doc)


def setup(level: str = "info", fmt: str = "text", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("fastshadow")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
