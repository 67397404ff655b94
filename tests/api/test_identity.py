"""Users, keys, JWTs, chat sessions and their routes, on a real server with the real store."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from litestar.testing import TestClient
from websockets.sync.client import connect

from gateway.app import create_app
from tests.conftest import MODEL_ID, ServedApp, create_key, login, make_settings, serve
from tests.unit.auth.test_credentials import _claims


@pytest.fixture(scope="module")
def app(model_path: Path) -> Iterator[ServedApp]:
    del model_path
    # delays long enough that a slow machine's next attempt still falls inside them
    auth = {"login_base_delay_s": 30.0}
    with serve(make_settings(model={"slots": 2, "n_ctx": 4096}, auth=auth)) as served:
        yield served


def _http(app: ServedApp, credential: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    return httpx.Client(base_url=app.base_url, timeout=60, headers=headers)


def _chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, **extra}


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code:
        assert error["code"] == code
    return error


def test_login_shape_and_same_401_for_unknown_user_and_wrong_password(app: ServedApp) -> None:
    with _http(app) as http:
        body = http.post("/auth/login", json={"username": "user1", "password": "password123"}).json()
        assert set(body) == {"access_token", "token_type", "user_id", "username", "is_admin"}
        assert body["token_type"] == "bearer" and body["username"] == "user1" and body["is_admin"] is False
        claims = jwt.decode(body["access_token"], options={"verify_signature": False})
        assert {"sub", "iat", "exp", "iss", "aud", "jti"} <= set(claims)
        wrong = http.post("/auth/login", json={"username": "user1", "password": "nope"})
        unknown = http.post("/auth/login", json={"username": "nobody", "password": "nope"})
        assert wrong.status_code == unknown.status_code == 401
        assert wrong.json() == unknown.json()
        state = http.get("/auth/test").json()
        assert state["status"] == "ok" and state["token_algorithms"] == ["HS256"]
        assert "secret" not in json.dumps(state).lower()


def test_repeated_failures_are_throttled(app: ServedApp) -> None:
    with _http(app) as http:
        statuses = [
            http.post("/auth/login", json={"username": "victim", "password": f"guess{i}"}).status_code
            for i in range(6)
        ]
        assert statuses[:5] == [401] * 5
        assert statuses[5] == 429
        throttled = http.post("/auth/login", json={"username": "victim", "password": "x"})
        _error(throttled, 429, "login_throttled")
        assert int(throttled.headers["retry-after"]) > 0


def test_v1_needs_credentials(app: ServedApp) -> None:
    with _http(app) as http:
        _error(http.post("/v1/chat/completions", json=_chat_body()), 401, "invalid_api_key")
        _error(
            http.get("/v1/models", headers={"Authorization": "Bearer sk-pl-not-a-real-key"}),
            401,
            "invalid_api_key",
        )
        assert http.get("/v1/models", headers={"x-api-key": app.api_key}).status_code == 200
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {app.api_key}"}).status_code == 200
        token = login(app.base_url, "user1", "password123")
        assert (
            http.post(
                "/v1/chat/completions", json=_chat_body(), headers={"Authorization": f"Bearer {token}"}
            ).status_code
            == 200
        )


@pytest.mark.parametrize(
    "attack",
    [
        "alg none",
        "alg None",
        "stripped signature",
        "tampered payload",
        "expired beyond leeway",
        "future nbf",
        "wrong aud",
        "iss with a suffix",
        "missing exp",
    ],
)
def test_jwt_attacks_are_401_with_the_openai_envelope(app: ServedApp, attack: str) -> None:
    secret = (Path(app.settings.data_dir) / "jwt-secret").read_text().strip()
    good = jwt.decode(login(app.base_url, "admin", "admin123"), options={"verify_signature": False})
    now = int(time.time())
    base = {**good, "iat": now, "exp": now + 600}
    header, payload, signature = jwt.encode(base, secret, algorithm="HS256").split(".")

    def b64(data: dict[str, Any]) -> str:
        import base64  # noqa: PLC0415

        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    tokens = {
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "alg None": f"{b64({'alg': 'None', 'typ': 'JWT'})}.{payload}.",
        "stripped signature": f"{header}.{payload}.",
        "tampered payload": f"{header}.{b64({**base, 'role': 'admin', 'sub': 'x'})}.{signature}",
        "expired beyond leeway": jwt.encode({**base, "exp": now - 120}, secret, algorithm="HS256"),
        "future nbf": jwt.encode({**base, "nbf": now + 600}, secret, algorithm="HS256"),
        "wrong aud": jwt.encode({**base, "aud": "other"}, secret, algorithm="HS256"),
        "iss with a suffix": jwt.encode({**base, "iss": base["iss"] + ".evil"}, secret, algorithm="HS256"),
        "missing exp": jwt.encode({k: v for k, v in base.items() if k != "exp"}, secret, algorithm="HS256"),
    }
    with _http(app, tokens[attack]) as http:
        _error(http.get("/v1/models"), 401, "invalid_api_key")
        _error(http.get("/admin/users"), 401, "invalid_api_key")
    assert _claims  # the unit suite covers the same attacks at the decoder


def test_keys_scopes_models_and_revocation(app: ServedApp) -> None:
    admin = login(app.base_url, "admin", "admin123")
    limited = create_key(app.base_url, admin, "user1", models=["other-model"])
    assert limited["key"].startswith("sk-pl-") and limited["key_prefix"].endswith(limited["key"][-4:])
    with _http(app, limited["key"]) as http:
        _error(http.post("/v1/chat/completions", json=_chat_body()), 403, "permission_denied")
    admin_key = create_key(app.base_url, admin, "admin", scopes=["admin"])
    with _http(app, admin_key["key"]) as http:
        _error(http.post("/v1/chat/completions", json=_chat_body()), 403)  # no inference scope
        assert http.get("/admin/users").status_code == 200
    with _http(app, admin) as http:
        _error(http.post("/admin/keys", json={"username": "user1", "scopes": ["admin"]}), 400)
        listed = http.get("/admin/keys").json()["keys"]
        assert all("key" not in k and k["key_prefix"].startswith("sk-pl-...") for k in listed)
        assert limited["key"] not in json.dumps(listed)
        fresh = create_key(app.base_url, admin, "user1")
        with _http(app, fresh["key"]) as user:
            assert user.get("/v1/models").status_code == 200
            assert http.delete(f"/admin/keys/{fresh['id']}").status_code == 204
            _error(user.get("/v1/models"), 401, "invalid_api_key")
        _error(http.delete("/admin/keys/no-such-key"), 404)
        expired = create_key(app.base_url, admin, "user1", expires_at=time.time() - 1)
        with _http(app, expired["key"]) as user:
            _error(user.get("/v1/models"), 401)


def test_admin_user_routes(app: ServedApp) -> None:
    admin = login(app.base_url, "admin", "admin123")
    with _http(app, admin) as http:
        created = http.post("/admin/users", json={"username": "carol", "password": "carol-secret-1"})
        assert created.status_code == 201 and created.json()["role"] == "user"
        assert "password" not in json.dumps(created.json())
        _error(
            http.post("/admin/users", json={"username": "carol", "password": "carol-secret-1"}),
            400,
            "user_exists",
        )
        assert "carol" in [u["username"] for u in http.get("/admin/users").json()["users"]]
        carol_token = login(app.base_url, "carol", "carol-secret-1")
        carol_key = create_key(app.base_url, admin, "carol")["key"]
        assert http.post(f"/admin/users/{created.json()['id']}/disable").json()["disabled_at"] is not None
    for credential in (carol_token, carol_key):
        with _http(app, credential) as carol:
            _error(carol.get("/v1/models"), 401)
    _error(
        httpx.post(f"{app.base_url}/auth/login", json={"username": "carol", "password": "carol-secret-1"}),
        401,
    )


def test_chat_sessions_and_history(app: ServedApp) -> None:
    with _http(app, app.api_key) as http:
        first = http.post("/chat", json={"prompt": "Hello, my name is Ana.", "max_tokens": 8})
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["response"] and body["session_id"] and body["model"] == MODEL_ID
        session_id = body["session_id"]
        second = http.post(
            "/chat", json={"prompt": "What is my name?", "session_id": session_id, "max_tokens": 8}
        ).json()
        assert second["session_id"] == session_id
        history = http.get(f"/chat/history/{session_id}").json()
        assert [m["role"] for m in history["messages"]] == ["user", "assistant", "user", "assistant"]
        assert history["messages"][0]["content"] == "Hello, my name is Ana."
        assert history["messages"][3]["content"] == second["response"]
        stream = http.post("/chat", json={"prompt": "Count to three.", "stream": True, "max_tokens": 6})
        frames = [json.loads(f[6:]) for f in stream.text.split("\n\n") if f.startswith("data: {")]
        assert frames[-1]["done"] is True
        streamed = "".join(f.get("delta", "") for f in frames)
        stream_session = frames[-1]["session_id"]
        assert http.get(f"/chat/history/{stream_session}").json()["messages"][1]["content"] == streamed
        listing = http.get("/chat/history", params={"limit": 1}).json()
        assert listing["total"] >= 2 and len(listing["sessions"]) == 1
        assert listing["sessions"][0]["id"] == stream_session  # newest first
        _error(http.get("/chat/history/not-a-session"), 404, "session_not_found")
        _error(http.get("/chat/history/..%2F..%2Fetc"), 404)
        _error(
            http.post("/chat", json={"prompt": "x", "session_id": "../etc/passwd"}), 400, "invalid_session_id"
        )
        assert http.delete(f"/chat/history/{stream_session}").status_code == 204
        _error(http.get(f"/chat/history/{stream_session}"), 404)
    admin = login(app.base_url, "admin", "admin123")
    with _http(app, admin) as http:
        _error(http.get(f"/chat/history/{session_id}"), 404)  # another user's session looks missing
        _error(http.delete(f"/chat/history/{session_id}"), 404)
        counts = http.get("/admin/sessions/count").json()
        assert counts["total"] >= 1 and counts["per_user"]["user1"] >= 1


def test_chat_system_prompt_leads_the_turn_and_is_not_stored(app: ServedApp) -> None:
    system = "You are a pirate. Answer in one word."
    with _http(app, app.api_key) as http:

        def v1_prompt_tokens(*messages: dict[str, str]) -> int:
            response = http.post("/v1/chat/completions", json={**_chat_body(messages=list(messages))})
            assert response.status_code == 200, response.text
            tokens: int = response.json()["usage"]["prompt_tokens"]
            return tokens

        turn = http.post("/chat", json={"prompt": "Hi", "system": system, "max_tokens": 3})
        assert turn.status_code == 200, turn.text
        plain = http.post("/chat", json={"prompt": "Hi", "max_tokens": 3}).json()
        # the same prompt as /v1 with a leading system message (the template's default one otherwise)
        user = {"role": "user", "content": "Hi"}
        assert turn.json()["usage"]["prompt_tokens"] == v1_prompt_tokens(
            {"role": "system", "content": system}, user
        )
        assert plain["usage"]["prompt_tokens"] == v1_prompt_tokens(user)
        assert turn.json()["usage"]["prompt_tokens"] != plain["usage"]["prompt_tokens"]
        history = http.get(f"/chat/history/{turn.json()['session_id']}").json()
        assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
        _error(http.post("/chat", json={"prompt": "Hi", "system": ""}), 400)


def test_x_session_id_records_the_exchange(app: ServedApp) -> None:
    with _http(app, app.api_key) as http:
        plain = http.post("/v1/chat/completions", json=_chat_body())
        assert "x-session-id" not in plain.headers
        recorded = http.post(
            "/v1/chat/completions", json=_chat_body(), headers={"X-Session-Id": "sdk-session-1"}
        )
        assert recorded.headers["x-session-id"] == "sdk-session-1"
        streamed = http.post(
            "/v1/chat/completions", json=_chat_body(stream=True), headers={"X-Session-Id": "sdk-session-1"}
        )
        assert streamed.headers["x-session-id"] == "sdk-session-1"
        messages = http.get("/chat/history/sdk-session-1").json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 2
        assert messages[1]["content"] == recorded.json()["choices"][0]["message"]["content"]
    admin = login(app.base_url, "admin", "admin123")
    with _http(app, admin) as http:  # session ids are per user: the same id is the admin's own session
        mine = http.post("/v1/chat/completions", json=_chat_body(), headers={"X-Session-Id": "sdk-session-1"})
        assert (
            mine.status_code == 200 and len(http.get("/chat/history/sdk-session-1").json()["messages"]) == 2
        )


def test_websocket_chat(app: ServedApp) -> None:
    url = f"ws://127.0.0.1:{app.port}/chat/ws"
    with connect(url) as socket:
        socket.send(json.dumps({"token": app.api_key}))
        assert json.loads(socket.recv(timeout=10))["type"] == "ready"
        socket.send(json.dumps({"prompt": "Say hello.", "max_tokens": 5}))
        deltas, done = [], None
        while done is None:
            frame = json.loads(socket.recv(timeout=60))
            if frame["type"] == "delta":
                deltas.append(frame["delta"])
            else:
                done = frame
        assert done["type"] == "done" and deltas
    with _http(app, app.api_key) as http:
        messages = http.get(f"/chat/history/{done['session_id']}").json()["messages"]
    assert messages[1]["content"] == "".join(deltas)
    with connect(url, additional_headers={"Authorization": f"Bearer {app.api_key}"}) as socket:
        socket.send(json.dumps({"prompt": "Hi", "max_tokens": 2}))
        assert json.loads(socket.recv(timeout=60))["type"] in {"delta", "done"}
    with connect(url) as socket:
        socket.send(json.dumps({"token": "sk-pl-wrong"}))
        assert json.loads(socket.recv(timeout=10))["error"]["code"] == "invalid_api_key"


def test_passwords_in_the_database_use_scrypt_at_owasp_parameters(app: ServedApp) -> None:
    database = Path(app.settings.data_dir) / "pocketllm.sqlite3"
    conn = sqlite3.connect(database)
    try:
        hashes = [
            row[0] for row in conn.execute("SELECT password_hash FROM users WHERE password_hash IS NOT NULL")
        ]
        dump = "\n".join(conn.iterdump())
    finally:
        conn.close()
    assert hashes and all(h.startswith("scrypt$n=131072,r=8,p=1$") for h in hashes)
    for secret in ("password123", "admin123", "carol-secret-1", app.api_key):
        assert secret not in dump


def test_restart_on_the_same_data_directory_keeps_everything(model_path: Path, tmp_path: Path) -> None:
    del model_path
    settings = make_settings(data_dir=str(tmp_path / "data"), model={"slots": 1, "n_ctx": 2048})
    with serve(settings) as first:
        admin = login(first.base_url, "admin", "admin123")
        with _http(first, admin) as http:
            assert (
                http.post("/admin/users", json={"username": "dave", "password": "dave-secret-1"}).status_code
                == 201
            )
        with _http(first, first.api_key) as http:
            session_id = http.post("/chat", json={"prompt": "Remember me.", "max_tokens": 3}).json()[
                "session_id"
            ]
        key = first.api_key
    with serve(settings) as second, _http(second, key) as http:
        assert http.get("/v1/models").status_code == 200  # the key from before the restart
        assert len(http.get(f"/chat/history/{session_id}").json()["messages"]) == 2
        assert login(second.base_url, "dave", "dave-secret-1")


def test_production_refuses_default_secrets() -> None:
    from gateway.settings import SettingsError, load_settings  # noqa: PLC0415

    with pytest.raises(SettingsError, match="SECRET_KEY"):
        load_settings(env={"POCKETLLM_ENV": "production"})
    with pytest.raises(SettingsError, match="32 bytes"):
        load_settings(env={"POCKETLLM_ENV": "production", "SECRET_KEY": "short-secret"})
    with pytest.raises(SettingsError, match="repetition"):
        load_settings(env={"POCKETLLM_ENV": "production", "SECRET_KEY": "p" * 40})
    settings = make_settings(env="production", auth={"secret_key": "q7Vd-2KpX9sLm4Rt8ZyN1bWc6HfJ0aEu"})
    with TestClient(create_app(settings)) as client:
        assert client.get("/auth/test").json()["users"] == 0  # no default users in production


def test_access_matrix_from_the_route_table(app: ServedApp) -> None:
    """Every session/key/user route: no token 401, revoked key 401, non-admin 403, another user's 404."""
    admin = login(app.base_url, "admin", "admin123")
    with _http(app, admin) as http:
        http.post("/admin/users", json={"username": "mallory", "password": "mallory-secret"})
        victim = http.post("/admin/users", json={"username": "victim2", "password": "victim-secret"}).json()
        spare_key = create_key(app.base_url, admin, "victim2")
    revoked = create_key(app.base_url, admin, "user1")
    with _http(app, admin) as http:
        assert http.delete(f"/admin/keys/{revoked['id']}").status_code == 204
    with _http(app, app.api_key) as http:
        owned = http.post("/chat", json={"prompt": "mine", "max_tokens": 2}).json()["session_id"]
    mallory = login(app.base_url, "mallory", "mallory-secret")
    values = {"session_id": owned, "user_id": victim["id"], "key_id": spare_key["id"]}
    routes = []
    for route in app.app.routes:
        if not route.path.startswith(("/chat/history", "/admin/users", "/admin/keys", "/admin/sessions")):
            continue
        path = route.path
        for name, value in values.items():
            path = path.replace(f"{{{name}:str}}", value)
        methods = sorted(route.methods - {"OPTIONS", "HEAD"}, key=lambda m: (m == "DELETE", m))
        routes += [(method, path) for method in methods]
    assert len(routes) >= 10, routes
    bodies = {
        ("POST", "/admin/users"): {"username": "zed", "password": "zed-password"},
        ("POST", "/admin/keys"): {"username": "user1"},
    }
    for method, path in routes:
        body = bodies.get((method, path))
        for credential, expected in ((None, 401), (revoked["key"], 401)):
            with _http(app, credential) as http:
                _error(http.request(method, path, json=body), expected)
        if path.startswith("/chat/history/"):
            with _http(app, mallory) as http:  # another user's session: exactly like a missing one
                _error(http.request(method, path), 404, "session_not_found")
        with _http(app, app.api_key) as http:  # a valid non-admin credential (the session's owner)
            response = http.request(method, path, json=body)
            if path.startswith("/admin"):
                _error(response, 403, "permission_denied")
            else:
                assert response.status_code in {200, 204}, (method, path, response.text)


def test_no_secret_reaches_the_logs(app: ServedApp, caplog: pytest.LogCaptureFixture) -> None:
    import logging  # noqa: PLC0415

    caplog.set_level(logging.DEBUG)
    token = login(app.base_url, "admin", "admin123")
    key = create_key(app.base_url, token, "user1")["key"]
    httpx.post(f"{app.base_url}/auth/login", json={"username": "admin", "password": "wrong-password-xyz"})
    with _http(app, key) as http:
        http.post("/v1/chat/completions", json=_chat_body())
        http.get("/v1/models", headers={"Authorization": "Bearer sk-pl-forged-key-value"})
    logged = caplog.text
    for secret in ("admin123", "wrong-password-xyz", token, key, "sk-pl-forged-key-value"):
        assert secret not in logged
