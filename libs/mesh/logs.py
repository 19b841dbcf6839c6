"""Logging: JSON lines on stdout in the shape Cloud Logging reads, readable text on a terminal.

Every line made while a span is active carries its trace and span ids, so Cloud Logging groups a request's
lines under its trace. Anything shaped like a JWT or a PEM private key is redacted before it is written: tokens
must never reach logs, even through an exception message from a library.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from opentelemetry import trace

_SECRET = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # a JWT (ID or access token)
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{16,}"
)
REDACTED = "[REDACTED]"


def redact(text: str) -> str:
    return _SECRET.sub(REDACTED, text)


def _message(record: logging.LogRecord, formatter: logging.Formatter) -> str:
    message = record.getMessage()
    if record.exc_info:
        message = f"{message}\n{formatter.formatException(record.exc_info)}"
    return redact(message)


class CloudLoggingFormatter(logging.Formatter):
    """One JSON object per line: severity, message, time, trace and span ids, and any `json_fields` extra;
    `worker` (the worker's number) on every line of a worker of a multi-process instance."""

    def __init__(self, project: str | None, worker: int | None = None) -> None:
        super().__init__()
        self._trace_prefix = f"projects/{project}/traces/" if project else ""
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "message": _message(record, self),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "logger": record.name,
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["logging.googleapis.com/trace"] = f"{self._trace_prefix}{context.trace_id:032x}"
            entry["logging.googleapis.com/spanId"] = f"{context.span_id:016x}"
            entry["logging.googleapis.com/trace_sampled"] = context.trace_flags.sampled
        fields = getattr(record, "json_fields", None)
        if isinstance(fields, Mapping):
            entry.update({k: redact(v) if isinstance(v, str) else v for k, v in fields.items()})
        return json.dumps(entry, default=str)


class TerminalFormatter(logging.Formatter):
    """`12:00:00 INFO  ping  message  trace=…` for people."""

    def __init__(self, service: str, worker: int | None = None) -> None:
        super().__init__()
        self._service = service if worker is None else f"{service}[{worker}]"

    def format(self, record: logging.LogRecord) -> str:
        context = trace.get_current_span().get_span_context()
        suffix = f"  trace={context.trace_id:032x}" if context.is_valid else ""
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        return f"{stamp} {record.levelname:<7} {self._service}  {_message(record, self)}{suffix}"


def configure(
    service: str,
    *,
    level: str = "INFO",
    project: str | None = None,
    stream: TextIO | None = None,
    worker: int | None = None,
) -> None:
    """Route the root logger to `stream` (stdout): JSON unless it is a terminal. `worker`: this process's
    number in a multi-process instance, on every line."""
    out = stream or sys.stdout
    handler = logging.StreamHandler(out)
    formatter: logging.Formatter = (
        TerminalFormatter(service, worker) if out.isatty() else CloudLoggingFormatter(project, worker)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
