"""An upstream model: one model served by remote OpenAI-compatible replicas, streamed through.

``UpstreamModel.stream`` sends ``POST {base}/chat/completions`` (or ``/completions``) with ``stream: true``
and ``stream_options.include_usage``, parses the upstream's SSE and yields one event per upstream chunk as
it arrives (no added buffering). Until the first event is yielded nothing has reached the client, so a
replica that refuses the connection, answers 502/503/504 or stays silent past ``first_byte_timeout_s`` is
ejected and the request is tried on another one; after that, never: a replica that dies mid-stream ends
the stream with ``UpstreamStreamError``. A request still waiting for its first byte on a replica that is
ejected meanwhile (a failed health probe, another request's connect error) gives up that wait at once and is
retried elsewhere: a connection kept alive to a host that dropped off the network would otherwise hold it
until the first-byte timeout. The replica such a request waits on is probed every ``health_interval_s`` (on
a new connection, as every probe), so a partition is seen within about the connect timeout even when no
other request goes there. Closing the iterator (the client went away) closes the upstream
connection at once, which is how llama-server, vLLM and this gateway learn to stop generating.

This package is the only place an HTTP client to upstreams is imported (a ruff banned-api rule).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from engine.base import ModelLoadError
from engine.pool import ShuttingDownError
from engine.tools import ArgumentsDelta, ToolCallStart, new_call_id
from engine.upstream.config import UpstreamSettings
from engine.upstream.errors import (
    UpstreamBusyError,
    UpstreamRateLimitedError,
    UpstreamRequestError,
    UpstreamResponseError,
    UpstreamStreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    scrub,
)
from engine.upstream.replicas import Replica, ReplicaSet
from engine.upstream.sse import SSEEvent, SSEParser
from telemetry.requests import current_request

logger = logging.getLogger("pocketllm.upstream")

PROVIDER = "openai"
"""``gen_ai.provider.name`` of an upstream model (it speaks the OpenAI API)."""
SPAN_UPSTREAM = "upstream call"
HEALTHY_PROBE_EVERY = 5
"""Healthy replicas are probed every this many health intervals (ejected ones every interval)."""
RETRYABLE_STATUS = frozenset({502, 503, 504})
CLIENT_STATUS = frozenset({400, 404, 413, 422})
MAX_ERROR_BODY = 64 * 1024
_encoder = msgspec.json.Encoder()
_propagator = TraceContextTextMapPropagator()


def estimate_tokens(text: str) -> int:
    """A token count for ``text`` when the upstream reports none and its tokenizer is not here.

    An estimate, stated as one: about 4 bytes of UTF-8 per token, which BPE vocabularies of current models
    give for English and code; it over-counts Latin-script text slightly and under-counts some scripts.
    Only the rate limiter sees it, and only when the upstream sends no ``usage``.
    """
    return math.ceil(len(text.encode("utf-8", errors="replace")) / 4) if text else 0


@dataclass(frozen=True, slots=True)
class UpstreamDelta:
    """One upstream chunk's text and tool-call fragments (index-addressed as OpenAI streams them)."""

    text: str = ""
    tool_calls: tuple[ToolCallStart | ArgumentsDelta, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamFinish:
    """The end of an upstream answer, with the usage it reported (or an estimate, ``reported=False``)."""

    finish_reason: str
    prompt_tokens: int | None
    """``None`` when the upstream did not report usage (the caller keeps its own estimate)."""
    completion_tokens: int
    cached_tokens: int = 0
    reported: bool = True


@dataclass(frozen=True, slots=True)
class UpstreamWaiting:
    """The request still waits for room (every candidate replica is at its ``max_concurrency``): sent
    every ``notify_s`` of the wait, so a stream can keep its client informed (SSE pings)."""


UpstreamEvent = UpstreamDelta | UpstreamFinish | UpstreamWaiting


class _Retry(Exception):
    """A failure before the first byte: eject the replica and try another one."""

    def __init__(self, kind: str, error: Exception) -> None:
        super().__init__(kind)
        self.kind = kind
        self.error = error


class _FirstByte:
    """One attempt on a replica until its first event: each wait (``async with``: sending, reading) ends at
    ``deadline`` (loop time) with ``_Retry("timeout")``, or at once with ``_Retry("ejected")`` when the
    replica is ejected meanwhile (``ReplicaSet.eject`` calls ``give_up``). Registered on the replica from
    construction until ``done``."""

    def __init__(self, replicas: ReplicaSet, replica: Replica, deadline: float) -> None:
        self.replicas = replicas
        self.replica = replica
        self.deadline = deadline
        self.ejected = False
        self._scope: asyncio.Timeout | None = None
        replicas.begin_wait(replica, self.give_up)

    def give_up(self) -> None:
        """The replica was ejected: end the current wait now (from any task on the loop; never raises)."""
        self.ejected = True
        scope = self._scope
        if scope is not None and not scope.expired():
            scope.reschedule(asyncio.get_running_loop().time())

    def done(self) -> None:
        """The first event came (or the attempt ended): ejections no longer concern this attempt."""
        self.replicas.end_wait(self.replica, self.give_up)

    def _retry(self) -> _Retry:
        if self.ejected:
            return _Retry("ejected", UpstreamUnavailableError("the upstream replica was ejected"))
        return _Retry("timeout", UpstreamTimeoutError("the upstream did not answer in time"))

    async def __aenter__(self) -> None:
        if self.ejected:
            raise self._retry()
        scope = asyncio.timeout_at(self.deadline)
        await scope.__aenter__()
        self._scope = scope

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        scope, self._scope = self._scope, None
        assert scope is not None
        try:
            await scope.__aexit__(kind, error, tb)
        except TimeoutError:
            raise self._retry() from None


class _Chunks:
    """Turns a stream's parsed events into ``UpstreamEvent``s (chat or text completions)."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.text_bytes = 0
        self.pieces = 0
        self._started: set[int] = set()

    def handle(self, event: SSEEvent) -> UpstreamDelta | None:
        if event.event == "error":
            raise UpstreamStreamError(_error_message(event.data, "the upstream sent an error"))
        if event.data.strip() == "[DONE]":
            self.done = True
            return None
        try:
            chunk = msgspec.json.decode(event.data)
        except msgspec.DecodeError:
            raise UpstreamStreamError("the upstream sent a stream chunk that is not JSON") from None
        if not isinstance(chunk, dict):
            raise UpstreamStreamError("the upstream sent a stream chunk that is not an object")
        if "error" in chunk:
            raise UpstreamStreamError(_error_message(event.data, "the upstream sent an error"))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return None
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
        if self.chat:
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
            calls = self._calls(delta.get("tool_calls") or ())
        else:
            text, calls = choice.get("text") or "", ()
        if not text and not calls:
            return None
        self.text_bytes += len(text.encode("utf-8", errors="replace"))
        self.pieces += 1
        return UpstreamDelta(text, calls)

    def _calls(self, fragments: Any) -> tuple[ToolCallStart | ArgumentsDelta, ...]:
        out: list[ToolCallStart | ArgumentsDelta] = []
        for fragment in fragments:
            if not isinstance(fragment, dict):
                continue
            index = int(fragment.get("index", 0))
            function = fragment.get("function") or {}
            if index not in self._started:
                if index != len(self._started):  # calls must start in order (0, 1, ...)
                    raise UpstreamStreamError("the upstream sent tool calls out of order")
                self._started.add(index)
                out.append(
                    ToolCallStart(index, str(fragment.get("id") or new_call_id()), function.get("name") or "")
                )
            arguments = function.get("arguments")
            if arguments:
                out.append(ArgumentsDelta(index, str(arguments)))
        return tuple(out)

    def finish(self) -> UpstreamFinish:
        if self.finish_reason is None:
            raise UpstreamStreamError("the upstream stream ended before the answer finished")
        usage = self.usage or {}
        completion = usage.get("completion_tokens")
        prompt = usage.get("prompt_tokens")
        if isinstance(completion, int) and isinstance(prompt, int):
            details = usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            return UpstreamFinish(self.finish_reason, prompt, completion, int(cached or 0))
        # No usage reported: an estimate from what arrived (at least one token per chunk with text; most
        # servers send one token per chunk), never a claim of the upstream's own count.
        estimate = max(self.pieces, math.ceil(self.text_bytes / 4))
        return UpstreamFinish(self.finish_reason, None, estimate, 0, reported=False)


def _error_message(data: str | bytes, fallback: str) -> str:
    """The ``error.message`` of an OpenAI (or llama-server) error body, scrubbed; ``fallback`` if none."""
    try:
        body = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return fallback
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return scrub(error["message"]) or fallback
    if isinstance(error, str):
        return scrub(error) or fallback
    return fallback


def _retry_after(value: str | None) -> int:
    try:
        return max(1, min(3600, math.ceil(float(value)))) if value else 1
    except ValueError:
        return 1


class UpstreamModel:
    """A model served by one or more remote OpenAI-compatible replicas."""

    def __init__(
        self,
        model_id: str,
        settings: UpstreamSettings,
        *,
        max_wait_s: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Configure (nothing is connected until ``start``).

        Args:
            model_id: the gateway's id of the model (the upstream's name unless ``settings.model``).
            settings: replicas, key variable, timeouts, concurrency.
            max_wait_s: how long a request waits for room when every replica is at its limit.
            env: where ``api_key_env`` is read (``os.environ`` when ``None``).

        Raises:
            ModelLoadError: ``api_key_env`` names a variable that is not set.
        """
        self.id = model_id
        self.settings = settings
        self.upstream_model = settings.model or model_id
        self.max_wait_s = max_wait_s
        self.replicas = ReplicaSet(settings.urls, settings.max_concurrency)
        environment = os.environ if env is None else env
        self._api_key: str | None = None
        if settings.api_key_env:
            key = environment.get(settings.api_key_env)
            if not key:
                raise ModelLoadError(
                    f"model {model_id}: the environment variable {settings.api_key_env} (its upstream key) "
                    "is not set"
                )
            self._api_key = key
        self._client: httpx.AsyncClient | None = None
        self._probes: httpx.AsyncClient | None = None
        self._health: asyncio.Task[None] | None = None
        self._aborted: str | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = 0

    @property
    def digest(self) -> str:
        """Identifies what answers (the upstream model name and its replicas): part of cache keys."""
        identity = "\n".join([self.upstream_model, *sorted(r.url for r in self.replicas.replicas)])
        return hashlib.sha256(f"upstream\n{identity}".encode()).hexdigest()

    @property
    def api_key_set(self) -> bool:
        """Whether requests carry a bearer key (the key itself is never shown)."""
        return self._api_key is not None

    async def start(self) -> None:
        """Open the HTTP client and start the health checks."""
        s = self.settings
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=s.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            follow_redirects=False,
            trust_env=False,  # the upstream URL is what the configuration says, not a proxy's
        )
        # Probes never reuse a connection: one kept alive to a host that dropped off the network would hang
        # until the probe's whole timeout, where a new one fails at the connect timeout.
        self._probes = httpx.AsyncClient(
            timeout=httpx.Timeout(max(5.0, s.connect_timeout_s), connect=s.connect_timeout_s),
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"connection": "close"},
            follow_redirects=False,
            trust_env=False,
        )
        self._health = asyncio.create_task(self._check_health(), name=f"pocketllm-upstream-health-{self.id}")

    async def close(self) -> None:
        """Stop the health checks and close every connection; idempotent."""
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
            self._health = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._probes is not None:
            await self._probes.aclose()
            self._probes = None

    def abort(self, reason: str) -> None:
        """Refuse new requests, and end running streams at their next chunk (shutdown)."""
        self._aborted = reason

    def raise_if_aborted(self) -> None:
        """Raise ``ShuttingDownError`` once ``abort`` was called."""
        if self._aborted is not None:
            raise ShuttingDownError(self._aborted, 1)

    @property
    def running(self) -> int:
        """Requests in flight through this model."""
        return self._running

    async def drained(self) -> None:
        """Return once no request is in flight."""
        await self._idle.wait()

    def status(self, *, urls: bool = False) -> list[dict[str, Any]]:
        """Each replica's state (``urls``: include base URLs, for admins only)."""
        rows = []
        for replica in self.replicas.replicas:
            row: dict[str, Any] = {
                "index": replica.index,
                "host": replica.host,
                "state": replica.state,
                "outstanding": replica.outstanding,
            }
            if urls:
                row.update(
                    url=replica.url,
                    requests=replica.requests,
                    failures=replica.failures,
                    last_error=replica.last_error,
                )
            rows.append(row)
        return rows

    # --- requests ----------------------------------------------------------------------------------
    async def stream(
        self,
        path: str,
        body: dict[str, Any],
        *,
        affinity: str | None = None,
        notify_s: float | None = None,
    ) -> AsyncGenerator[UpstreamEvent]:
        """Stream one answer: ``UpstreamDelta`` per upstream chunk, then one ``UpstreamFinish``.

        Args:
            path: ``chat/completions`` or ``completions``.
            body: the request as the upstream takes it, without ``model``/``stream``/``stream_options``.
            affinity: a session key; requests with the same key go to the same healthy replica.
            notify_s: while the request waits for room on a replica, an ``UpstreamWaiting`` every this
                many seconds (``None``: wait silently).

        Raises:
            UpstreamError subclasses (see ``engine.upstream.errors``); ``ShuttingDownError``.
        """
        self.raise_if_aborted()
        payload = {
            **body,
            "model": self.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        content = _encoder.encode(payload)
        chat = path.startswith("chat")
        tried: set[int] = set()
        last: Exception | None = None
        self._enter()
        try:
            while True:
                deadline = time.monotonic() + self.max_wait_s
                while (replica := await self._acquire(affinity, tried, last, deadline, notify_s)) is None:
                    yield UpstreamWaiting()
                tried.add(replica.index)
                try:
                    with self._span(replica, path, len(tried)) as (span, headers):
                        try:
                            async with aclosing(
                                self._attempt(replica, path, content, headers, chat)
                            ) as events:
                                async for event in events:
                                    yield event
                            return
                        except _Retry as retry:
                            span.set_attribute("error.type", retry.kind)
                            raise
                except _Retry as retry:
                    if retry.kind == "ejected":
                        logger.info(
                            "upstream %s: replica %d was ejected before the first byte; trying another",
                            self.id,
                            replica.index,
                        )
                    else:
                        self.replicas.failed(replica, retry.kind)
                        logger.warning(
                            "upstream %s: replica %d failed before the first byte (%s); ejected",
                            self.id,
                            replica.index,
                            retry.kind,
                        )
                    last = retry.error
                finally:
                    self.replicas.release(replica)
        finally:
            self._leave()

    async def embed(self, inputs: list[str]) -> tuple[list[list[float]], int | None]:
        """Embeddings of ``inputs`` (floats), with the upstream's token count if it reports one.

        Retried on another replica as a stream is before its first byte (nothing is returned before the
        whole answer is in).
        """
        self.raise_if_aborted()
        content = _encoder.encode({"model": self.upstream_model, "input": inputs, "encoding_format": "float"})
        tried: set[int] = set()
        last: Exception | None = None
        self._enter()
        try:
            while True:
                replica = await self._acquire(None, tried, last, time.monotonic() + self.max_wait_s)
                assert replica is not None  # no notify_s: it waits until room or the deadline
                tried.add(replica.index)
                try:
                    with self._span(replica, "embeddings", len(tried)) as (_, headers):
                        data = await self._fetch(replica, "embeddings", content, headers)
                    self.replicas.succeeded(replica)
                    return _embeddings(data, len(inputs))
                except _Retry as retry:
                    if retry.kind != "ejected":
                        self.replicas.failed(replica, retry.kind)
                        last = retry.error
                finally:
                    self.replicas.release(replica)
        finally:
            self._leave()

    async def _fetch(self, replica: Replica, path: str, content: bytes, headers: dict[str, str]) -> bytes:
        """The whole body of a request that is not streamed; the head and then the body each within the
        first-byte timeout, and both given up at once if the replica is ejected meanwhile."""
        loop = asyncio.get_running_loop()
        wait = _FirstByte(self.replicas, replica, loop.time() + self.settings.first_byte_timeout_s)
        try:
            response = await self._send(replica, path, content, headers, wait)
            wait.deadline = loop.time() + self.settings.first_byte_timeout_s
            try:
                async with wait:
                    return await response.aread()
            except _Retry as retry:
                if retry.kind == "ejected":
                    raise
                raise _Retry("read", UpstreamUnavailableError("no upstream replica answered")) from None
            except httpx.TransportError:
                raise _Retry("read", UpstreamUnavailableError("no upstream replica answered")) from None
            finally:
                await response.aclose()
        finally:
            wait.done()

    def _enter(self) -> None:
        self._running += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._running -= 1
        if not self._running:
            self._idle.set()

    async def _acquire(
        self,
        affinity: str | None,
        tried: set[int],
        last: Exception | None,
        deadline: float,
        notify_s: float | None = None,
    ) -> Replica | None:
        """A replica with room, its count taken, waiting until ``deadline`` (``time.monotonic``) at most;
        ``None`` when ``notify_s`` passed first (the caller tells its client, then asks again)."""
        remaining = deadline - time.monotonic()
        wait = remaining if notify_s is None else min(remaining, notify_s)
        try:
            return await self.replicas.acquire(affinity, tried, max(0.0, wait))
        except TimeoutError:
            if wait < remaining:
                return None
            raise UpstreamBusyError(
                f"every replica of the upstream model {self.id} is at its concurrency limit", 1
            ) from None
        except LookupError:
            if isinstance(last, UpstreamTimeoutError):
                raise UpstreamTimeoutError(
                    f"no replica of the upstream model {self.id} answered within "
                    f"{self.settings.first_byte_timeout_s:g}s"
                ) from None
            raise UpstreamUnavailableError(
                f"the upstream model {self.id} is unavailable: none of its {len(self.replicas.replicas)} "
                "replicas could take the request"
            ) from None

    @contextlib.contextmanager
    def _span(self, replica: Replica, path: str, attempt: int) -> Any:
        """A child span per upstream call, and the headers that carry its trace context and request id."""
        record = current_request()
        attributes: dict[str, str | int | float | bool] = {
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": self.upstream_model,
            "server.address": replica.host,
            "pocketllm.upstream.replica": replica.index,
            "pocketllm.upstream.attempt": attempt,
            "url.path": f"/{path}",
        }
        with record.stage(SPAN_UPSTREAM, **attributes) as span:
            headers = {"content-type": "application/json", "accept": "text/event-stream"}
            if self._api_key is not None:
                headers["authorization"] = f"Bearer {self._api_key}"
            if record.request_id:
                headers["x-request-id"] = record.request_id
            if span.get_span_context().is_valid:
                _propagator.inject(headers, context=trace.set_span_in_context(span))
            yield span, headers

    async def _send(
        self, replica: Replica, path: str, content: bytes, headers: dict[str, str], wait: _FirstByte
    ) -> httpx.Response:
        """Send the request and wait for the response head (within ``wait``: the first-byte deadline, or
        the replica's ejection); a status that is not 200 becomes the right error here (its body read and
        the response closed)."""
        assert self._client is not None, "UpstreamModel.start() was not called"
        request = self._client.build_request(
            "POST", f"{replica.url}/{path}", content=content, headers=headers
        )
        try:
            async with wait:
                response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:  # the connect timeout
            raise _Retry("connect", UpstreamUnavailableError("the upstream is unreachable")) from None
        except httpx.TransportError as exc:
            raise _Retry("connect", UpstreamUnavailableError("the upstream is unreachable")) from exc
        if response.status_code == 200:
            return response
        try:
            async with asyncio.timeout(self.settings.first_byte_timeout_s):
                body = await _read_bounded(response)
        except (TimeoutError, httpx.TransportError):
            body = b""
        finally:
            await response.aclose()
        status = response.status_code
        if status in RETRYABLE_STATUS:
            raise _Retry(f"status {status}", UpstreamUnavailableError("the upstream is unavailable"))
        if status == 429:
            raise UpstreamRateLimitedError(
                _error_message(body, "the upstream is rate limiting requests"),
                _retry_after(response.headers.get("retry-after")),
            )
        if status in CLIENT_STATUS:
            raise UpstreamRequestError(
                _error_message(body, f"the upstream refused the request ({status})"), status
            )
        if status >= 500:
            self.replicas.failed(replica, f"status {status}", eject=False)
        logger.warning("upstream %s: replica %d answered %d", self.id, replica.index, status)
        raise UpstreamResponseError(f"the upstream answered with status {status}")

    async def _attempt(
        self, replica: Replica, path: str, content: bytes, headers: dict[str, str], chat: bool
    ) -> AsyncGenerator[UpstreamEvent]:
        """One try on one replica. Before its first event is yielded a failure raises ``_Retry`` (or a
        final error), and so does the replica's ejection; after, ``UpstreamStreamError``."""
        loop = asyncio.get_running_loop()
        wait = _FirstByte(self.replicas, replica, loop.time() + self.settings.first_byte_timeout_s)
        try:
            response = await self._send(replica, path, content, headers, wait)
            chunks = _Chunks(chat)
            parser = SSEParser()
            started = False
            raw_chunks = response.aiter_raw()
            try:
                while not chunks.done:
                    raw = await self._read(replica, raw_chunks, None if started else wait)
                    if raw is None:
                        break
                    try:
                        events = list(parser.feed(raw))
                    except ValueError as exc:
                        raise UpstreamStreamError(str(exc)) from None
                    for event in events:
                        delta = chunks.handle(event)
                        if delta is None:
                            continue
                        if not started:
                            started = True
                            wait.done()  # streaming: an ejection from now on leaves this stream alone
                            self.replicas.succeeded(replica)
                        self.raise_if_aborted()
                        yield delta
                if not chunks.done:
                    tail = parser.close()
                    delta = chunks.handle(tail) if tail is not None else None
                    if delta is not None:
                        yield delta
                if not started and chunks.finish_reason is None:
                    # closed without a word: a replica that went away between the head and the body
                    raise _Retry("empty stream", UpstreamUnavailableError("the upstream is unavailable"))
                if chunks.finish_reason is None:
                    self.replicas.failed(replica, "broken stream")
                finish = chunks.finish()
                if not started:
                    self.replicas.succeeded(replica)
                yield finish
            finally:
                await raw_chunks.aclose()  # type: ignore[attr-defined]
                await response.aclose()  # unread: the connection is closed, the upstream stops generating
        finally:
            wait.done()

    async def _read(
        self, replica: Replica, chunks: AsyncIterator[bytes], wait: _FirstByte | None
    ) -> bytes | None:
        """The next bytes of a stream, ``None`` at its end: within ``wait`` until the first event (which
        raises ``_Retry``), then (``wait`` is ``None``) within the idle timeout."""
        if wait is not None:
            try:
                async with wait:
                    return await anext(chunks)
            except StopAsyncIteration:
                return None
            except httpx.TransportError:
                raise _Retry("read", UpstreamUnavailableError("the upstream is unavailable")) from None
        try:
            async with asyncio.timeout(self.settings.idle_timeout_s):
                return await anext(chunks)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            self.replicas.failed(replica, "idle")
            raise UpstreamStreamError(
                f"the upstream sent nothing for {self.settings.idle_timeout_s:g}s; the stream was ended"
            ) from None
        except httpx.TransportError:
            self.replicas.failed(replica, "broken stream")
            raise UpstreamStreamError("the upstream replica failed while streaming") from None

    # --- health ------------------------------------------------------------------------------------
    async def _check_health(self) -> None:
        """Every ``health_interval_s``: probe the ejected replicas (a success re-admits one), and the
        replicas where a request has waited a whole interval for its first byte (a failure ejects one, which
        sends its waiting requests elsewhere); every ``HEALTHY_PROBE_EVERY`` intervals, every replica."""
        interval = self.settings.health_interval_s
        rounds = 0
        while True:
            await asyncio.sleep(interval)
            rounds += 1
            probe_healthy = rounds % HEALTHY_PROBE_EVERY == 0
            now = time.monotonic()
            targets = [
                r
                for r in self.replicas.replicas
                if r.state == "ejected" or probe_healthy or r.longest_wait(now) >= interval
            ]
            results = await asyncio.gather(*(self.probe(r) for r in targets), return_exceptions=True)
            for replica, alive in zip(targets, results, strict=True):
                if alive is True and replica.state == "ejected":
                    logger.info("upstream %s: replica %d answers again; re-admitted", self.id, replica.index)
                    self.replicas.admit(replica)
                elif alive is not True and replica.state == "healthy":
                    logger.warning(
                        "upstream %s: replica %d failed its health check; ejected", self.id, replica.index
                    )
                    self.replicas.failed(replica, "probe")
                elif alive is not True and replica.longest_wait(time.monotonic()) > 0:
                    # still ejected (every replica was, and a request tried this one anyway): its waits end
                    self.replicas.eject(replica)

    async def probe(self, replica: Replica) -> bool:
        """Whether ``replica`` answers ``GET {base}/models`` with any status below 500 (a 401 from a gateway
        that wants another key still proves it is up), on a new connection closed after it."""
        if self._probes is None:
            return False
        headers = {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        try:
            response = await self._probes.get(f"{replica.url}/models", headers=headers)
        except httpx.HTTPError:
            return False
        return response.status_code < 500


async def _read_bounded(response: httpx.Response) -> bytes:
    body = b""
    async for part in response.aiter_raw():
        body += part
        if len(body) > MAX_ERROR_BODY:
            break
    return body


def _embeddings(data: bytes, count: int) -> tuple[list[list[float]], int | None]:
    try:
        body = msgspec.json.decode(data)
        items = sorted(body["data"], key=lambda item: item["index"])
        vectors = [[float(x) for x in item["embedding"]] for item in items]
    except (msgspec.DecodeError, KeyError, TypeError, ValueError):
        raise UpstreamResponseError("the upstream's embeddings response is not the OpenAI shape") from None
    if len(vectors) != count:
        raise UpstreamResponseError("the upstream returned a different number of embeddings")
    usage = body.get("usage") if isinstance(body, dict) else None
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return vectors, tokens if isinstance(tokens, int) else None
