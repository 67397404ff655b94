"""Engine errors map to API errors in one table; msgspec messages become params."""

from __future__ import annotations

from engine.base import ContextOverflowError, EngineCrashedError, GrammarError
from engine.pool import QueueFullError, QueueTimeoutError
from gateway.errors import from_engine_error, validation_error


def test_engine_error_table() -> None:
    cases = [
        (ContextOverflowError(10, 20, 16), 400, "context_length_exceeded"),
        (GrammarError("bad"), 400, None),
        (QueueFullError("full", 7), 503, "queue_full"),
        (QueueTimeoutError("late", 7), 503, "queue_timeout"),
        (EngineCrashedError("boom"), 500, "internal_error"),
    ]
    for exc, status, code in cases:
        error = from_engine_error(exc)
        assert error.status_code == status
        assert error.code == code
    assert from_engine_error(QueueFullError("x", 7)).headers == {"Retry-After": "7"}
    assert "boom" not in from_engine_error(EngineCrashedError("boom")).message


def test_validation_messages_name_the_field() -> None:
    error = validation_error("Expected `float` <= 2.0 - at `$.temperature`")
    assert error.param == "temperature"
    error = validation_error("Object contains unknown field `tools`")
    assert error.param == "tools" and error.code == "unsupported_parameter"
    error = validation_error("Object contains unknown field `x` - at `$.messages[0]`")
    assert error.param == "messages[0].x"
