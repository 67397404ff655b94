"""Process logging: readable text by default, one JSON object per line when configured.

Every line carries the current request id (when there is one); the access logger
(``pocketllm.access``) writes one line per request with its structured fields. Prompts and completions
appear only when content logging is configured (see ``TelemetryConfig.log_content``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from telemetry.requests import current_request

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id", "access"}


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the current request's, or ``None``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; never drops it."""
        if not hasattr(record, "request_id"):
            current = current_request()
            record.request_id = current.request_id if current.active else None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, any structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON."""
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            payload["message"] = "access"
            payload.update(access)
        else:
            payload["message"] = record.getMessage()
            request_id = getattr(record, "request_id", None)
            if request_id:
                payload["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


def configure_logging(level: str = "INFO", *, json_format: bool = False) -> None:
    """Send every log record to stderr, as text or JSON (replacing any handler set before).

    Args:
        level: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
        json_format: one JSON object per line instead of readable text.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
