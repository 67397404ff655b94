"""Engine and identity errors map to API errors in one table; msgspec messages become params."""

from __future__ import annotations

import msgspec

from auth.errors import AuthenticationError, InvalidCredentialsError, LoginThrottledError
from engine.base import ContextOverflowError, EngineCrashedError, GrammarError
from engine.pool import QueueFullError, QueueTimeoutError
from gateway.errors import from_auth_error, from_engine_error, validation_error


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


def test_auth_error_table() -> None:
    """A failed password check is ``invalid_credentials``, a refused key or token ``invalid_api_key``: both 401
    with the identity layer's message; a throttled login is a 429 with ``Retry-After``."""
    login = from_auth_error(InvalidCredentialsError("invalid username or password"))
    assert (login.status_code, login.code) == (401, "invalid_credentials")
    assert msgspec.to_builtins(login.body()) == {
        "error": {
            "message": "invalid username or password",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_credentials",
        }
    }
    key = from_auth_error(AuthenticationError("invalid API key"))
    assert (key.status_code, key.code, key.message) == (401, "invalid_api_key", "invalid API key")
    throttled = from_auth_error(LoginThrottledError(9))
    assert (throttled.status_code, throttled.code) == (429, "login_throttled")
    assert throttled.headers == {"Retry-After": "9"}


def test_validation_messages_name_the_field() -> None:
    error = validation_error("Expected `float` <= 2.0 - at `$.temperature`")
    assert error.param == "temperature"
    error = validation_error("Object contains unknown field `tools`")
    assert error.param == "tools" and error.code == "unsupported_parameter"
    error = validation_error("Object contains unknown field `x` - at `$.messages[0]`")
    assert error.param == "messages[0].x"
