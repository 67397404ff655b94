"""Settings: one msgspec Struct tree, loaded from a TOML file and overridden by environment variables.

Settings are built once (``load_settings``) and passed into ``create_app``; nothing here is global.

Environment overrides:
- ``POCKETLLM_<SECTION>__<FIELD>`` for any scalar field of a section, e.g. ``POCKETLLM_SERVER__PORT=9000``,
  ``POCKETLLM_QUEUE__MAX_WAIT_S=30``; ``POCKETLLM_ENV``, ``POCKETLLM_DATA_DIR``, ``POCKETLLM_MODELS_DIR``.
- ``POCKETLLM_MODEL__<FIELD>`` for the first model; ``POCKETLLM_MODEL__UPSTREAM__<FIELD>`` for its
  ``upstream`` section (``URLS`` comma-separated), e.g. ``POCKETLLM_MODEL__UPSTREAM__URLS=http://a:8080/v1``.
- The PocketLLM seed's names, which apply to the first (default) model or their section:
  ``MODEL_PATH``, ``MODEL_N_THREADS``, ``MODEL_N_CTX``, ``MODEL_SLOTS``, ``SECRET_KEY``, ``REDIS_HOST``,
  ``ENABLE_CACHE``.
- OpenTelemetry's ``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_ENDPOINT``,
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` and ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` (telemetry section).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from auth.bootstrap import DEFAULT_SECRET_KEY, check_secrets
from auth.errors import InsecureConfigurationError
from auth.stores import is_postgres_url
from engine.config import ModelSettings, QueueSettings
from engine.registry import REGISTRY_FILE

DEFAULT_MODEL_ID = "smollm2-135m-instruct"

PositiveInt = Annotated[int, Meta(ge=1)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Seconds = Annotated[float, Meta(gt=0)]


class SettingsError(Exception):
    """A setting is missing or invalid; the message names it."""


class ServerSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """HTTP server."""

    host: str = "127.0.0.1"
    port: Port = 8000
    max_body_bytes: PositiveInt = 2 * 1024 * 1024
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    drain_timeout_s: Seconds = 30.0
    replicas: PositiveInt = 1
    """How many gateway processes serve this deployment together (behind one load balancer). Above 1,
    start-up requires what they must share: a PostgreSQL store (``store.url``), Redis (``redis.host``) and
    a signing secret of the deployment's own (``auth.secret_key`` or ``auth.jwt_secret``)."""
    max_header_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024
    """Request line and headers of one request; beyond it: 431 and the connection is closed."""
    header_timeout_s: Seconds = 10.0
    """How long a request's line and headers may take to arrive (slow clients are closed: 408)."""
    body_timeout_s: Seconds = 10.0
    """How long a request body may take to arrive, plus one second per ``body_min_rate`` bytes received
    (a body sent slowly is closed: 408). Time while the server is not reading (the app has not asked for
    the body yet, or has not consumed what came) does not count."""
    body_min_rate: PositiveInt = 8 * 1024
    """Bytes per second a body must keep up once past ``body_timeout_s``: a 2 MiB body may take
    10 + 256 s, a trickle of a few bytes a second is closed after about 10 s."""
    keep_alive_timeout_s: PositiveInt = 5
    """An idle kept-alive connection is closed after this many seconds."""
    trusted_proxies: list[str] = field(default_factory=list)
    """Addresses (or networks) of reverse proxies whose ``X-Forwarded-For``/``-Proto`` are believed;
    none by default: forwarded headers are ignored and the peer's address is the client's. Environment:
    comma-separated (``POCKETLLM_SERVER__TRUSTED_PROXIES=10.0.0.5,10.0.0.6``)."""


class LimitsSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """Request validation bounds."""

    max_tokens_default: PositiveInt = 512
    max_stop: PositiveInt = 16
    max_n: PositiveInt = 8
    max_embedding_inputs: PositiveInt = 256
    max_embedding_tokens: PositiveInt = 16384
    """Input tokens of one ``/v1/embeddings`` request, all inputs together."""


class RedisSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """Redis connection (cache, rate limits). No ``host``: both run in-process (one gateway process)."""

    host: str | None = None
    port: Port = 6379
    db: Annotated[int, Meta(ge=0)] = 0
    password: str | None = None
    key_prefix: str = "pocketllm:"
    """Namespace of every key (the cache uses ``<prefix>cache:``, the limiter ``<prefix>rl:``)."""
    timeout_s: Seconds = 0.25
    """Longest wait for one Redis call on a request's path; beyond it the cache is bypassed and the
    limiter falls back to the in-process one."""
    connect_timeout_s: Seconds = 0.25
    retry_after_s: Seconds = 1.0
    """After a failure, Redis is skipped for this long, then tried again (recovery is automatic)."""


class CacheSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """Response cache."""

    enabled: bool = True
    ttl_s: Seconds = 3600.0
    """Entry lifetime unless a request's body ``cache.ttl`` sets its own."""
    max_ttl_s: Seconds | None = None
    """The longest lifetime a request's body ``cache.ttl`` gets (longer asks are capped); the larger of
    ``ttl_s`` and one day when unset."""
    shared_scope: bool = False
    """One cache for every user; by default each user (tenant) has a scope of their own."""
    memory_max_entries: PositiveInt = 10_000
    """Bounds of the in-process backend (used when no Redis is configured)."""
    memory_max_bytes: PositiveInt = 64 * 1024 * 1024
    local_ttl_s: Annotated[float, Meta(ge=0)] = 3.0
    """With Redis: how long a hit read from Redis (or an answer stored through this process) is also kept
    in this process's memory and answered from there without a Redis call; never past the entry's own
    expiry (its remaining ``PTTL`` is read with the value); 0 turns this layer off. An entry never changes
    under its key, so the only staleness is a removal: a flush or model reload on this process empties
    its layer at once, and a ``POST /admin/cache/flush`` on another replica reaches this one within
    ``local_ttl_s``. Unused without Redis (the in-process backend is local already)."""
    local_max_entries: PositiveInt = 1000
    """Bounds of that local layer (least recently used go first)."""
    local_max_bytes: PositiveInt = 16 * 1024 * 1024


Limit = Annotated[int, Meta(ge=0)] | None
"""A limit; ``None`` is unlimited."""


class RateLimitSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """Default limits per API key and per user (overrides per key/user live in the identity store).

    Flat so that every field has an environment name, e.g. ``POCKETLLM_RATELIMIT__KEY_RPM=60``.
    """

    enabled: bool = True
    window_s: Seconds = 60.0
    """The window of the ``rpm``/``tpm`` limits (a sliding minute)."""
    key_rpm: Limit = None
    key_tpm: Limit = None
    """Tokens per window: prompt + max_tokens reserved at admission, corrected to real usage."""
    key_concurrency: Limit = None
    user_rpm: Limit = None
    user_tpm: Limit = None
    user_concurrency: Limit = None
    lease_ttl_s: Seconds = 6.0
    """A concurrency slot lives this long unless renewed; each process renews the slots of its running
    requests every third of it, so the slots of a process that dies come back within this."""


class ExternalIdPSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """An external identity provider whose RS256/ES256 tokens are accepted."""

    issuer: str
    audience: str
    public_key_file: str | None = None
    jwks_file: str | None = None
    algorithms: list[str] = field(default_factory=lambda: ["RS256", "ES256"])
    username_claim: str = "sub"
    create_users: bool = False


class AuthSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """Identity: tokens, passwords, login throttling."""

    secret_key: str = DEFAULT_SECRET_KEY
    jwt_secret: str | None = None
    """HS256 signing secret; the ``secret_key`` when unset."""
    issuer: str = "pocketllm"
    audience: str = "pocketllm"
    token_ttl_s: Annotated[int, Meta(ge=60)] = 86400
    leeway_s: Annotated[int, Meta(ge=0, le=300)] = 30
    scrypt_n: Annotated[int, Meta(ge=2**14)] = 2**17
    login_max_failures: PositiveInt = 5
    """Failed logins of one user from one address before each further attempt is delayed (1 s, 2 s, ...
    up to ``login_max_delay_s``); the user is never locked out from another address."""
    login_window_s: Seconds = 300.0
    login_base_delay_s: Seconds = 1.0
    """The first delay; each further failure doubles it."""
    login_max_delay_s: Seconds = 60.0
    login_max_client_failures: PositiveInt | None = None
    """Failed logins per address (any user) within the window; 4 x ``login_max_failures`` when unset."""
    max_concurrent_hashes: PositiveInt = 2
    """Password hashes (scrypt, ~130 MiB each) at once per process; a login beyond them gets 503."""
    key_cache_ttl_s: Annotated[float, Meta(ge=0)] = 2.0
    """How long an API key's lookup (the key, its owner and their limit overrides) is reused in memory:
    the longest a revocation or a limit override changed through another process can go unseen (with
    PostgreSQL, replicas are told at once by NOTIFY; this is the bound when that channel is down)."""
    external: ExternalIdPSettings | None = None

    @property
    def signing_secret(self) -> str:
        """The HS256 secret in use."""
        return self.jwt_secret or self.secret_key


class StoreSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """The identity and session store."""

    url: str | None = None
    """``postgresql://user@host:port/db`` for a store shared by several replicas (``DATABASE_URL``);
    unset: SQLite under ``data_dir`` (one machine)."""


class TelemetrySettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """Logs, metrics, traces."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False
    log_content: bool = False
    """Log prompts and completions (off: they never reach a log)."""
    service_name: str = "pocketllm-gateway"
    """``service.name`` of the metrics and traces (``OTEL_SERVICE_NAME``)."""
    metrics_enabled: bool = True
    """Serve Prometheus exposition at ``GET /metrics``."""
    metrics_require_admin: bool = False
    """Guard ``GET /metrics`` like the admin routes (off: open, for scrapers on a private network)."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP receiver base URL for traces and metrics (``OTEL_EXPORTER_OTLP_ENDPOINT``)."""
    otlp_traces_endpoint: str | None = None
    """Full OTLP/HTTP traces URL (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), overriding the base URL."""
    otlp_metrics_endpoint: str | None = None
    """Full OTLP/HTTP metrics URL (``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``), overriding the base URL."""
    otlp_metrics_interval_s: Seconds = 60.0
    """How often metrics are pushed to the OTLP receiver."""


class Settings(Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole configuration tree."""

    env: Literal["development", "production"] = "development"
    data_dir: str = "data"
    models_dir: str = ""
    """Where GGUF files are kept; empty means the ``models/`` folder of this project."""
    models: list[ModelSettings] = field(default_factory=lambda: [ModelSettings(id=DEFAULT_MODEL_ID)])
    server: ServerSettings = field(default_factory=ServerSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)

    @property
    def shared_state(self) -> bool:
        """Whether everything several replicas must agree on is shared: identity and chat sessions in
        PostgreSQL, limits, leases, the login throttle and the response cache in Redis."""
        return bool(self.store.url and is_postgres_url(self.store.url) and self.redis.host)

    @property
    def models_path(self) -> Path:
        """The models folder."""
        return Path(self.models_dir).expanduser() if self.models_dir else REGISTRY_FILE.parent

    def served_models(self) -> list[tuple[ModelSettings, Path]]:
        """Every configured model with the path of its GGUF file (the model manager's input)."""
        return [(model, self.model_path(model)) for model in self.models]

    def model_path(self, model: ModelSettings) -> Path:
        """Where the model's GGUF lives (it may not exist yet when it is pulled on first use)."""
        if model.path:
            path = Path(model.path).expanduser()
            return path if path.is_absolute() else Path.cwd() / path
        return self.models_path / f"{model.source or model.id}.gguf"


# Seed and OpenTelemetry variable -> (section or "model", field)
_SEED_VARIABLES: dict[str, tuple[str, str]] = {
    "MODEL_PATH": ("model", "path"),
    "MODEL_N_THREADS": ("model", "n_threads"),
    "MODEL_N_CTX": ("model", "n_ctx"),
    "MODEL_SLOTS": ("model", "slots"),
    "SECRET_KEY": ("auth", "secret_key"),
    "REDIS_HOST": ("redis", "host"),
    "ENABLE_CACHE": ("cache", "enabled"),
    "DATABASE_URL": ("store", "url"),
    # OpenTelemetry's standard variables
    "OTEL_SERVICE_NAME": ("telemetry", "service_name"),
    "OTEL_EXPORTER_OTLP_ENDPOINT": ("telemetry", "otlp_endpoint"),
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ("telemetry", "otlp_traces_endpoint"),
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": ("telemetry", "otlp_metrics_endpoint"),
}
_TOP_LEVEL = {"env", "data_dir", "models_dir"}
_LIST_FIELDS = {("server", "cors_origins"), ("server", "trusted_proxies")}
"""List settings, given comma-separated in the environment."""


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if name.startswith("POCKETLLM_"):
            rest = name.removeprefix("POCKETLLM_").lower()
            if rest in _TOP_LEVEL:
                raw[rest] = value
            elif "__" in rest:
                section, key = rest.split("__", 1)
                if section == "model" and key.startswith("upstream__"):
                    # POCKETLLM_MODEL__UPSTREAM__URLS=http://a:8080/v1,http://b:8080/v1
                    field_name = key.removeprefix("upstream__")
                    upstream = _default_model(raw).setdefault("upstream", {})
                    upstream[field_name] = (
                        [v.strip() for v in value.split(",") if v.strip()] if field_name == "urls" else value
                    )
                elif section == "model":
                    _default_model(raw)[key] = value
                else:
                    listed = (section, key) in _LIST_FIELDS
                    parsed = [v.strip() for v in value.split(",") if v.strip()] if listed else value
                    raw.setdefault(section, {})[key] = parsed
        elif name in _SEED_VARIABLES:
            section, key = _SEED_VARIABLES[name]
            target = _default_model(raw) if section == "model" else raw.setdefault(section, {})
            target[key] = _coerce_bool(value) if key == "enabled" else value


def _default_model(raw: dict[str, Any]) -> dict[str, Any]:
    models = raw.setdefault("models", [])
    if not models:
        models.append({"id": DEFAULT_MODEL_ID})
    first: dict[str, Any] = models[0]
    return first


def _coerce_bool(value: str) -> bool | str:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    return value


def load_settings(
    config_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Build settings from an optional TOML file and the environment.

    Args:
        config_file: TOML file; ``POCKETLLM_CONFIG`` from ``env`` when ``None``.
        env: environment mapping (``os.environ`` when ``None``).

    Raises:
        SettingsError: naming the file or the setting that is wrong.
    """
    env = os.environ if env is None else env
    config_file = config_file or env.get("POCKETLLM_CONFIG")
    raw: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"config file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    _apply_env(raw, env)
    return settings_from_mapping(raw)


def settings_from_mapping(raw: Mapping[str, Any]) -> Settings:
    """Validate a plain mapping (as read from TOML) into ``Settings``; raises ``SettingsError``."""
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc).replace("`$.", "`").replace("`$`", "the top level")
        raise SettingsError(f"invalid setting: {message}") from None
    _check(settings)
    return settings


def _check_replicas(settings: Settings) -> None:
    """Refuse what cannot be correct when ``server.replicas`` processes serve one deployment."""
    replicas = settings.server.replicas
    if replicas == 1:
        return
    several = f"`server.replicas` is {replicas}, but"
    if not (settings.store.url and is_postgres_url(settings.store.url)):
        raise SettingsError(
            f"invalid setting: {several} `store.url` (DATABASE_URL) is not a postgresql:// URL: a SQLite "
            "store under `data_dir` belongs to one machine, so users, keys, revocations and chat sessions "
            "would differ between replicas"
        )
    if not settings.redis.host:
        raise SettingsError(
            f"invalid setting: {several} `redis.host` (REDIS_HOST) is unset: rate limits, concurrency "
            "leases, the login throttle and the response cache would be per process"
        )
    if settings.auth.jwt_secret is None and settings.auth.secret_key == DEFAULT_SECRET_KEY:
        raise SettingsError(
            f"invalid setting: {several} `auth.secret_key` (SECRET_KEY) is the development default: each "
            "replica would sign tokens with a random secret of its own, valid nowhere else"
        )


def _check(settings: Settings) -> None:
    _check_replicas(settings)
    try:
        check_secrets(
            settings.auth.secret_key, settings.auth.jwt_secret, production=settings.env == "production"
        )
    except InsecureConfigurationError as exc:
        raise SettingsError(f"invalid setting: `auth.secret_key` / `auth.jwt_secret`: {exc}") from None
    if settings.cache.max_ttl_s is not None and settings.cache.ttl_s > settings.cache.max_ttl_s:
        raise SettingsError("invalid setting: `cache.ttl_s` is above `cache.max_ttl_s`")
    if not settings.models:
        raise SettingsError("invalid setting: `models` must list at least one model")
    names: set[str] = set()
    for index, model in enumerate(settings.models):
        for name in (model.id, *model.aliases):
            if name in names:
                raise SettingsError(f"invalid setting: `models[{index}]` reuses the model name {name!r}")
            names.add(name)
        if model.n_ctx // model.slots < 64:
            raise SettingsError(
                f"invalid setting: `models[{index}].n_ctx` ({model.n_ctx}) leaves under 64 tokens for each "
                f"of its {model.slots} slots"
            )
        if model.upstream is not None:
            if model.path or model.source:
                raise SettingsError(
                    f"invalid setting: `models[{index}]` ({model.id}) has `upstream` and also `path` or "
                    "`source`: a model is either served here or by its upstream"
                )
            continue
        if not model.path and not model.source and model.id != DEFAULT_MODEL_ID:
            raise SettingsError(
                f"invalid setting: `models[{index}]` ({model.id}) needs `path`, `source` or `upstream`"
            )
