"""Settings from TOML and the environment; bad settings are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import DEFAULT_MODEL_ID, SettingsError, load_settings


def test_defaults_serve_the_default_model() -> None:
    settings = load_settings(env={})
    assert [m.id for m in settings.models] == [DEFAULT_MODEL_ID]
    assert settings.model_path(settings.models[0]).name == f"{DEFAULT_MODEL_ID}.gguf"
    assert settings.server.port == 8000 and settings.cache.enabled


STRONG = "q7Vd-2KpX9sLm4Rt8ZyN1bWc6HfJ0aEu"


def test_weak_secret_key_is_refused_in_development_too() -> None:
    for weak in ("secret", "a" * 32, "change-me-in-production" * 2):
        with pytest.raises(SettingsError, match="SECRET_KEY"):
            load_settings(env={"SECRET_KEY": weak})
    assert load_settings(env={}).auth.secret_key == "change-me-in-production"  # unset: a random secret


def test_seed_variable_names_keep_working(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    settings = load_settings(
        env={
            "MODEL_PATH": str(gguf),
            "MODEL_N_THREADS": "3",
            "MODEL_N_CTX": "1024",
            "MODEL_SLOTS": "2",
            "SECRET_KEY": STRONG,
            "REDIS_HOST": "redis.local",
            "ENABLE_CACHE": "False",
        }
    )
    model = settings.models[0]
    assert (model.path, model.n_threads, model.n_ctx, model.slots) == (str(gguf), 3, 1024, 2)
    assert settings.model_path(model) == gguf
    assert settings.auth.secret_key == STRONG
    assert settings.redis.host == "redis.local"
    assert settings.cache.enabled is False


def test_toml_file_and_pocketllm_variables(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[server]\nport = 9000\n[[models]]\nid = "a"\npath = "/x/a.gguf"\naliases = ["gpt-3.5-turbo"]\n'
        '[[models]]\nid = "b"\npath = "/x/b.gguf"\nslots = 1\n'
    )
    settings = load_settings(
        config, env={"POCKETLLM_SERVER__HOST": "0.0.0.0", "POCKETLLM_QUEUE__MAX_QUEUE": "3"}
    )
    assert settings.server.port == 9000 and settings.server.host == "0.0.0.0"
    assert settings.queue.max_queue == 3
    assert [m.id for m in settings.models] == ["a", "b"]
    assert settings.models[0].aliases == ["gpt-3.5-turbo"]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MODEL_SLOTS": "many"}, "models[0].slots"),
        ({"MODEL_SLOTS": "0"}, "models[0].slots"),
        ({"POCKETLLM_SERVER__PORT": "70000"}, "server.port"),
        ({"POCKETLLM_SERVER__PORTS": "1"}, "ports"),
        ({"POCKETLLM_ENV": "staging"}, "env"),
        ({"MODEL_N_CTX": "100", "MODEL_SLOTS": "4"}, "models[0].n_ctx"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(env=env)
    assert named in str(err.value)


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(broken, env={})
    dup = tmp_path / "dup.toml"
    dup.write_text(
        '[[models]]\nid = "a"\npath = "a.gguf"\n[[models]]\nid = "b"\npath = "b.gguf"\naliases = ["a"]\n'
    )
    with pytest.raises(SettingsError, match="reuses the model name"):
        load_settings(dup, env={})


def test_rate_limit_and_redis_settings(tmp_path: Path) -> None:
    defaults = load_settings(env={})
    limits = defaults.ratelimit
    assert limits.enabled and limits.window_s == 60.0
    assert (limits.key_rpm, limits.key_tpm, limits.user_concurrency) == (None, None, None)  # unlimited
    config = tmp_path / "c.toml"
    config.write_text('[ratelimit]\nuser_tpm = 10000\nkey_concurrency = 4\n[redis]\nhost = "r"\n')
    settings = load_settings(
        config,
        env={
            "POCKETLLM_RATELIMIT__KEY_RPM": "20",
            "POCKETLLM_REDIS__KEY_PREFIX": "gw1:",
            "POCKETLLM_REDIS__TIMEOUT_S": "0.5",
        },
    )
    assert (settings.ratelimit.key_rpm, settings.ratelimit.user_tpm) == (20, 10000)
    assert settings.ratelimit.key_concurrency == 4
    assert (settings.redis.host, settings.redis.key_prefix, settings.redis.timeout_s) == ("r", "gw1:", 0.5)
    with pytest.raises(SettingsError, match="key_rpm"):
        load_settings(env={"POCKETLLM_RATELIMIT__KEY_RPM": "-1"})


SHARED = {
    "POCKETLLM_SERVER__REPLICAS": "3",
    "DATABASE_URL": "postgresql://gateway@db.internal:5432/pocketllm",
    "REDIS_HOST": "redis.internal",
    "SECRET_KEY": "a-deployment-secret-of-32-bytes-at-least",
}


@pytest.mark.parametrize(
    ("missing", "replaced_by", "named", "why"),
    [
        ("DATABASE_URL", None, "`store.url` (DATABASE_URL)", "SQLite"),
        ("DATABASE_URL", "/srv/pocketllm", "`store.url` (DATABASE_URL)", "SQLite"),
        ("REDIS_HOST", None, "`redis.host` (REDIS_HOST)", "per process"),
        ("SECRET_KEY", None, "`auth.secret_key` (SECRET_KEY)", "random secret"),
    ],
)
def test_several_replicas_refuse_what_cannot_be_shared(
    missing: str, replaced_by: str | None, named: str, why: str
) -> None:
    env = {k: v for k, v in SHARED.items() if k != missing}
    if replaced_by is not None:
        env[missing] = replaced_by
    for extra in ({}, {"POCKETLLM_ENV": "production"}):
        with pytest.raises(SettingsError) as err:
            load_settings(env=env | extra)
        assert (
            "`server.replicas` is 3" in str(err.value) and named in str(err.value) and why in str(err.value)
        )
    one = load_settings(env=env | {"POCKETLLM_SERVER__REPLICAS": "1"})  # one replica: all of it is fine
    assert one.server.replicas == 1 and one.shared_state is (missing == "SECRET_KEY")


def test_several_replicas_with_shared_state(tmp_path: Path) -> None:
    settings = load_settings(env=SHARED)
    assert settings.server.replicas == 3 and settings.shared_state
    assert settings.store.url == SHARED["DATABASE_URL"] and settings.redis.host == "redis.internal"
    config = tmp_path / "replica.toml"
    config.write_text(
        '[server]\nreplicas = 2\n[store]\nurl = "postgres://db/p"\n[redis]\nhost = "r"\n'
        '[auth]\njwt_secret = "q7Vd2xL9mZ4rT8kW1nB6yH3sJ0fG5pEuA"\n'
    )
    assert load_settings(config, env={}).shared_state
    with pytest.raises(SettingsError, match=r"server\.replicas"):
        load_settings(env=SHARED | {"POCKETLLM_SERVER__REPLICAS": "0"})


def test_cache_local_layer_settings() -> None:
    cache = load_settings(env={}).cache
    assert (cache.local_ttl_s, cache.local_max_entries, cache.local_max_bytes) == (3.0, 1000, 16 << 20)
    assert load_settings(env={"POCKETLLM_CACHE__LOCAL_TTL_S": "0"}).cache.local_ttl_s == 0.0  # off
    with pytest.raises(SettingsError, match="local_ttl_s"):
        load_settings(env={"POCKETLLM_CACHE__LOCAL_TTL_S": "-1"})
