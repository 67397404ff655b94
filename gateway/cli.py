"""The ``pocketllm`` command: ``serve`` and ``models list|pull|info``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from engine.base import ModelLoadError
from engine.llamacpp.model import check_gguf
from engine.registry import RegistryEntry, ensure_model, load_registry, pull, sha256_file
from gateway.identity_cli import add_commands
from gateway.settings import Settings, SettingsError, load_settings
from telemetry.logs import configure_logging

logger = logging.getLogger("pocketllm")


def _configure_logging(settings: Settings) -> None:
    configure_logging(settings.telemetry.log_level, json_format=settings.telemetry.log_json)


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config)
    except SettingsError as exc:
        print(f"pocketllm: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def prepare_models(settings: Settings) -> None:
    """Pull registry models on first use (with a progress bar) and check every GGUF before serving.

    Raises:
        ModelLoadError: naming the model and the file.
    """
    registry = load_registry()
    for model in settings.models:
        if model.upstream is not None:
            continue  # served by its replicas: nothing to pull or check here
        path = settings.model_path(model)
        if not model.path:
            entry = registry.get(model.source or model.id)
            if entry is None:
                raise ModelLoadError(f"model {model.id}: {model.source or model.id!r} is not in the registry")
            if not path.exists():
                logger.info(
                    "model %s is not in %s yet: pulling it once from %s",
                    model.id,
                    path.parent,
                    entry.parts[0].package or entry.parts[0].url,
                )
            ensure_model(entry, path)
        check_gguf(path)


def serve(args: argparse.Namespace) -> int:
    """Run the server until Ctrl-C or SIGTERM."""
    import uvicorn  # noqa: PLC0415 - only the serve command needs it

    from gateway.app import create_app  # noqa: PLC0415
    from gateway.server import server_config  # noqa: PLC0415

    settings = _settings(args)
    _configure_logging(settings)
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    try:
        prepare_models(settings)
    except ModelLoadError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    exit_code = 0
    server: uvicorn.Server | None = None
    _Server = _server_class()

    def on_load_failure(models: list[str]) -> None:
        nonlocal exit_code
        logger.error("cannot serve: model(s) %s failed to load; stopping", ", ".join(models))
        exit_code = 1
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    config = server_config(
        app,
        settings,
        host=host,
        port=port,
        log_level=settings.telemetry.log_level.lower(),
        lifespan="on",
        # the app drains first (gateway.draining); this only bounds what is left after it
        timeout_graceful_shutdown=5,
        access_log=False,
        log_config=None,
    )
    server = _Server(config)
    server.drainer = app.state.drainer  # type: ignore[union-attr]
    logger.info(
        "PocketLLM Gateway listening on http://%s:%d (models: %s)",
        host,
        port,
        ", ".join(m.id for m in settings.models),
    )
    if settings.server.replicas > 1:  # the settings check refused anything not shared
        logger.info(
            "one of %d replicas: identity and chat sessions in PostgreSQL; limits, leases, the login "
            "throttle and the response cache in Redis %s:%d (prefix %r)",
            settings.server.replicas,
            settings.redis.host,
            settings.redis.port,
            settings.redis.key_prefix,
        )
    server.run()
    return exit_code


def _server_class() -> type:
    import asyncio  # noqa: PLC0415
    import socket  # noqa: PLC0415

    import uvicorn  # noqa: PLC0415

    from gateway.draining import Drainer  # noqa: PLC0415

    class Server(uvicorn.Server):
        """uvicorn's server, draining on SIGTERM/SIGINT, then ending the process with status 0.

        The first signal starts the app's drain (new requests get 503 while the listener stays open;
        running ones finish within ``server.drain_timeout_s`` or are aborted with an error frame), and
        the server stops once it is over. A second signal stops at once. (uvicorn would also re-raise a
        captured signal after shutdown, so the process would die of it: the list is cleared.)
        """

        drainer: Drainer | None = None
        _loop: asyncio.AbstractEventLoop | None = None
        _drain_task: asyncio.Task[None] | None = None
        _drain_requested = False

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

        def handle_exit(self, sig: int, frame: object) -> None:
            loop = self._loop
            if self.drainer is None or loop is None or not self.started or self._drain_requested:
                super().handle_exit(sig, frame)  # type: ignore[arg-type]
                self._captured_signals.clear()
                return
            self._drain_requested = True
            loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            if self._drain_task is None and self._loop is not None:
                self._drain_task = self._loop.create_task(self._drain(), name="pocketllm-drain")

        async def _drain(self) -> None:
            assert self.drainer is not None
            finished = await self.drainer.drain()
            logger.info("drained (%s); stopping", "all requests finished" if finished else "some aborted")
            self.should_exit = True

    return Server


def _describe(entry: RegistryEntry, settings: Settings) -> dict[str, object]:
    path = settings.models_path / f"{entry.name}.gguf"
    return {
        "name": entry.name,
        "description": entry.description,
        "kind": entry.kind,
        "license": entry.license,
        "quantization": entry.quantization,
        "sha256": entry.sha256,
        "size": entry.size,
        "source": ", ".join(p.package or p.url or "" for p in entry.parts),
        "path": str(path),
        "present": path.exists(),
    }


def models_command(args: argparse.Namespace) -> int:
    """``pocketllm models list|pull|info``."""
    settings = _settings(args)
    _configure_logging(settings)
    registry = load_registry()
    if args.models_command == "list":
        configured = {m.source or m.id for m in settings.models if not m.path and not m.upstream}
        print(f"{'NAME':28} {'KIND':11} {'PRESENT':8} {'SERVED':7} DESCRIPTION")
        for entry in registry.values():
            info = _describe(entry, settings)
            print(
                f"{entry.name:28} {entry.kind:11} {'yes' if info['present'] else 'no':8} "
                f"{'yes' if entry.name in configured else 'no':7} {entry.description}"
            )
        for model in settings.models:
            if model.upstream is not None:
                replicas = len(model.upstream.urls)
                print(f"{model.id:28} {'upstream':11} {'-':8} {'yes':7} {replicas} replica(s)")
            elif model.path:
                print(
                    f"{model.id:28} {'local':11} {'yes' if settings.model_path(model).exists() else 'no':8} "
                    f"{'yes':7} {settings.model_path(model)}"
                )
        return 0
    found = registry.get(args.name)
    if found is None:
        print(f"pocketllm: unknown model {args.name!r}; see `pocketllm models list`", file=sys.stderr)
        return 2
    entry = found
    target = settings.models_path / f"{entry.name}.gguf"
    if args.models_command == "pull":
        try:
            pull(entry, target, progress=True, force=args.force)
        except ModelLoadError as exc:
            print(f"pocketllm: {exc}", file=sys.stderr)
            return 1
        print(f"{entry.name}: {target} (sha256 {entry.sha256})")
        return 0
    info = _describe(entry, settings)
    if target.exists():
        info["size_on_disk"] = target.stat().st_size
        info["verified"] = sha256_file(target, progress=sys.stderr.isatty()) == entry.sha256
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(prog="pocketllm", description="PocketLLM Gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the OpenAI-compatible server")
    serve_parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve_parser.add_argument("--config", default=None, help="TOML configuration file")
    serve_parser.set_defaults(handler=serve)
    models_parser = commands.add_parser("models", help="list, pull and inspect models")
    models_parser.add_argument("--config", default=None, help="TOML configuration file")
    sub = models_parser.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="registry models and configured files")
    pull_parser = sub.add_parser("pull", help="fetch a registry model (progress bar, sha256-verified)")
    pull_parser.add_argument("name")
    pull_parser.add_argument("--force", action="store_true", help="fetch again even if present")
    info_parser = sub.add_parser("info", help="details of a registry model")
    info_parser.add_argument("name")
    models_parser.set_defaults(handler=models_command)
    add_commands(commands, _settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pocketllm`` console script."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
