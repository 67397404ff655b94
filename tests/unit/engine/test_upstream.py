"""Upstream engines without a real upstream: replica choice, stickiness, ejection and re-admission, the SSE
parser, stream chunks -> events, the settings that configure an upstream model; and, on real loopback
sockets (small asyncio HTTP servers), what an ejection does to requests still waiting for their first byte,
and that health probes never reuse a connection."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import pytest

from engine.tools import ArgumentsDelta, ToolCallStart
from engine.upstream.config import UpstreamSettings
from engine.upstream.errors import UpstreamStreamError, scrub
from engine.upstream.model import UpstreamDelta, UpstreamFinish, UpstreamModel, _Chunks, estimate_tokens
from engine.upstream.replicas import EJECT_AFTER_5XX, ReplicaSet
from engine.upstream.sse import SSEEvent, SSEParser
from gateway.settings import SettingsError, load_settings, settings_from_mapping

URLS = [f"http://10.200.{i}.2:8080/v1" for i in range(1, 4)]


# --- replica choice ---------------------------------------------------------------------------------
def test_least_outstanding_requests() -> None:
    replicas = ReplicaSet(URLS)
    a, b, c = replicas.replicas
    a.outstanding, b.outstanding, c.outstanding = 3, 1, 2
    assert replicas.choose(None) is b
    b.outstanding = 5
    assert replicas.choose(None) is c


def test_spreads_evenly_when_idle() -> None:
    async def run() -> Counter[int]:
        replicas = ReplicaSet(URLS)
        taken = [await replicas.acquire(None, set(), 1.0) for _ in range(9)]
        return Counter(r.index for r in taken)

    assert asyncio.run(run()) == {0: 3, 1: 3, 2: 3}


def test_session_sticks_to_one_replica_while_it_is_healthy() -> None:
    replicas = ReplicaSet(URLS)
    keys = [f"session-{i}" for i in range(60)]
    first = {key: replicas.choose(key) for key in keys}
    # load does not move a session
    for replica in replicas.replicas:
        replica.outstanding = 7 * replica.index
    assert all(replicas.choose(key) is first[key] for key in keys)
    # sessions spread over every replica
    assert len({r.index for r in first.values() if r is not None}) == 3
    # ejecting one replica moves only its own sessions; re-admitting it brings them back
    victim = replicas.replicas[1]
    replicas.eject(victim)
    moved = {key: replicas.choose(key) for key in keys}
    for key in keys:
        if first[key] is victim:
            assert moved[key] is not victim
        else:
            assert moved[key] is first[key]
    replicas.admit(victim)
    assert all(replicas.choose(key) is first[key] for key in keys)


def test_sticky_replica_at_its_limit_gives_way() -> None:
    replicas = ReplicaSet(URLS, max_concurrency=1)
    home = replicas.choose("s")
    assert home is not None
    home.outstanding = 1
    other = replicas.choose("s")
    assert other is not None and other is not home


def test_ejection_and_readmission() -> None:
    replicas = ReplicaSet(URLS[:2])
    a, b = replicas.replicas
    replicas.failed(a, "connect")
    assert a.state == "ejected" and a.last_error == "connect"
    assert replicas.choose(None) is b
    assert replicas.choose("any-session") is b
    # a plain 500 ejects only after several in a row; a success resets the count
    for _ in range(EJECT_AFTER_5XX - 1):
        replicas.failed(b, "status 500", eject=False)
    assert b.state == "healthy"
    replicas.succeeded(b)
    replicas.failed(b, "status 500", eject=False)
    assert b.state == "healthy"
    replicas.admit(a)
    assert a.state == "healthy" and a.ejected_at is None


def test_every_replica_ejected_still_tries_each_once() -> None:
    replicas = ReplicaSet(URLS[:2])
    for replica in replicas.replicas:
        replicas.eject(replica)
    first = replicas.choose(None)
    assert first is not None
    second = replicas.choose(None, {first.index})
    assert second is not None and second is not first
    with pytest.raises(LookupError):
        replicas.choose(None, {0, 1})


def test_concurrency_limit_waits_for_room() -> None:
    async def run() -> None:
        replicas = ReplicaSet(URLS[:1], max_concurrency=1)
        held = await replicas.acquire(None, set(), 1.0)
        with pytest.raises(TimeoutError):
            await replicas.acquire(None, set(), 0.05)
        waiter = asyncio.ensure_future(replicas.acquire(None, set(), 2.0))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        replicas.release(held)
        got = await waiter
        assert got is held and held.outstanding == 1

    asyncio.run(run())


def test_health_shows_host_only() -> None:
    replicas = ReplicaSet(["http://user:secret@10.0.0.5:8080/v1/"])
    assert replicas.replicas[0].host == "10.0.0.5:8080"
    assert replicas.replicas[0].url == "http://user:secret@10.0.0.5:8080/v1"


# --- SSE --------------------------------------------------------------------------------------------
def _events(*chunks: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    out = [event for chunk in chunks for event in parser.feed(chunk)]
    tail = parser.close()
    return [*out, *([tail] if tail else [])]


def test_sse_split_anywhere() -> None:
    stream = b'data: {"a": 1}\n\n: ping\n\ndata: {"b":\ndata: 2}\r\n\r\ndata: [DONE]\n\n'
    whole = _events(stream)
    assert [e.data for e in whole] == ['{"a": 1}', '{"b":\n2}', "[DONE]"]
    for size in (1, 2, 3, 7):
        pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert _events(*pieces) == whole


def test_sse_events_dispatch_as_soon_as_complete() -> None:
    parser = SSEParser()
    assert list(parser.feed(b"data: x")) == []
    assert list(parser.feed(b"\n")) == []
    assert [e.data for e in parser.feed(b"\n")] == ["x"]


def test_sse_lone_cr_and_trailing_event_without_blank_line() -> None:
    assert [e.data for e in _events(b"data: a\r\rdata: b")] == ["a", "b"]


def test_sse_llama_server_error_line() -> None:
    (event,) = _events(b'error: {"code": 500, "message": "boom"}\n\n')
    assert event.event == "error"


def test_sse_refuses_a_huge_event() -> None:
    parser = SSEParser()
    for _ in range(3):
        list(parser.feed(b"data: " + b"x" * (1024 * 1024)))
    with pytest.raises(ValueError, match="larger"):
        list(parser.feed(b"data: " + b"x" * (1024 * 1024) + b"\n"))


# --- chunks -> events -------------------------------------------------------------------------------
def _chunk(data: str) -> SSEEvent:
    return SSEEvent(data)


def test_chat_chunks_with_usage() -> None:
    chunks = _Chunks(chat=True)
    assert chunks.handle(_chunk('{"choices":[{"index":0,"delta":{"role":"assistant"}}]}')) is None
    assert chunks.handle(_chunk('{"choices":[{"delta":{"content":"Hel"}}]}')) == UpstreamDelta("Hel")
    assert chunks.handle(_chunk('{"choices":[{"delta":{"content":"lo"},"finish_reason":"length"}]}'))
    usage = '{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14}}'
    assert chunks.handle(_chunk(usage)) is None
    assert chunks.handle(_chunk("[DONE]")) is None and chunks.done
    finish = chunks.finish()
    assert (finish.finish_reason, finish.prompt_tokens, finish.completion_tokens, finish.reported) == (
        "length",
        12,
        2,
        True,
    )


def test_chunks_without_usage_are_estimated() -> None:
    chunks = _Chunks(chat=False)
    for text in ("a", "bb", "ccccccccccccc"):
        chunks.handle(_chunk(f'{{"choices":[{{"text":"{text}"}}]}}'))
    chunks.handle(_chunk('{"choices":[{"text":"","finish_reason":"stop"}]}'))
    finish = chunks.finish()
    assert finish.prompt_tokens is None and not finish.reported
    assert finish.completion_tokens == max(3, -(-16 // 4))


def test_tool_call_fragments() -> None:
    chunks = _Chunks(chat=True)
    start = '{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]}}]}'
    more = '{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"x\\":1}"}}]}}]}'
    assert chunks.handle(_chunk(start)) == UpstreamDelta("", (ToolCallStart(0, "call_1", "f"),))
    assert chunks.handle(_chunk(more)) == UpstreamDelta("", (ArgumentsDelta(0, '{"x":1}'),))
    out_of_order = '{"choices":[{"delta":{"tool_calls":[{"index":2,"id":"c","function":{"name":"g"}}]}}]}'
    with pytest.raises(UpstreamStreamError):
        chunks.handle(_chunk(out_of_order))


def test_stream_that_ends_early_or_errors() -> None:
    chunks = _Chunks(chat=True)
    chunks.handle(_chunk('{"choices":[{"delta":{"content":"x"}}]}'))
    with pytest.raises(UpstreamStreamError, match="ended before"):
        chunks.finish()
    with pytest.raises(UpstreamStreamError, match="boom") as caught:
        chunks.handle(_chunk('{"error":{"message":"boom at http://10.0.0.1:8080/v1 now"}}'))
    assert "10.0.0.1" not in str(caught.value)


def test_scrub_and_estimate() -> None:
    assert scrub("failed http://u:k@host:1/v1/chat and https://x.y") == "failed [url] and [url]"
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd" * 10) == 10


# --- settings ---------------------------------------------------------------------------------------
def test_upstream_model_needs_no_path() -> None:
    settings = settings_from_mapping(
        {"models": [{"id": "remote-smol", "upstream": {"urls": URLS[:2], "model": "smollm2"}}]}
    )
    upstream = settings.models[0].upstream
    assert upstream is not None and upstream.model == "smollm2" and upstream.max_concurrency == 0


def test_upstream_and_path_refused() -> None:
    with pytest.raises(SettingsError, match="either served here or by its upstream"):
        settings_from_mapping({"models": [{"id": "m", "path": "x.gguf", "upstream": {"urls": URLS[:1]}}]})
    with pytest.raises(SettingsError):
        settings_from_mapping({"models": [{"id": "m", "upstream": {"urls": []}}]})
    with pytest.raises(SettingsError):
        settings_from_mapping({"models": [{"id": "m", "upstream": {"urls": ["ftp://x"]}}]})
    with pytest.raises(SettingsError, match="needs `path`, `source` or `upstream`"):
        settings_from_mapping({"models": [{"id": "m"}]})


def test_upstream_from_the_environment() -> None:
    settings = load_settings(
        env={
            "POCKETLLM_MODEL__ID": "remote",
            "POCKETLLM_MODEL__UPSTREAM__URLS": f"{URLS[0]}, {URLS[1]}",
            "POCKETLLM_MODEL__UPSTREAM__MAX_CONCURRENCY": "4",
            "POCKETLLM_MODEL__UPSTREAM__API_KEY_ENV": "UPSTREAM_KEY",
        }
    )
    upstream = settings.models[0].upstream
    assert upstream is not None
    assert (
        upstream.urls == URLS[:2] and upstream.max_concurrency == 4 and upstream.api_key_env == "UPSTREAM_KEY"
    )


# --- ejection and requests waiting for their first byte (real sockets) ---------------------------------
class Replica:
    """A loopback HTTP/1.1 server standing in for an upstream replica. ``GET /v1/models`` answers at once;
    a ``POST`` is never answered when ``silent`` (the request waits, as on a kept-alive connection to a
    host that dropped off the network), else answered with a short SSE stream, ``gap_s`` between chunks."""

    def __init__(self, *, silent: bool = False, gap_s: float = 0.0) -> None:
        self.silent = silent
        self.gap_s = gap_s
        self.connections = 0
        self.closed_by_client = 0
        """connections the client closed (EOF) while the server still waited on them"""
        self.posts_waiting = 0
        self.posts_abandoned = 0
        self.posts_answered = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def __aenter__(self) -> Replica:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.stop_listening()
        for writer in list(self._writers):
            writer.close()
        assert self._server is not None
        await self._server.wait_closed()

    def stop_listening(self) -> None:
        """New connections are refused from now on; those already open stay (a host gone from the network
        for new connections, its kept-alive ones silent)."""
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = next(
                    (int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:")),
                    0,
                )
                if length:
                    await reader.readexactly(length)
                if lines[0].startswith("GET"):
                    body = b'{"object":"list","data":[]}'
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        + f"content-length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    await writer.drain()
                    continue
                if self.silent:
                    self.posts_waiting += 1
                    await reader.read()  # returns at EOF: the client gave up on this request
                    self.posts_waiting -= 1
                    self.posts_abandoned += 1
                    return
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                )
                chunks = [
                    '{"choices":[{"delta":{"content":"Hel"}}]}',
                    '{"choices":[{"delta":{"content":"lo"},"finish_reason":"length"}]}',
                    '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}',
                    "[DONE]",
                ]
                for n, chunk in enumerate(chunks):
                    if n:
                        await asyncio.sleep(self.gap_s)
                    writer.write(f"data: {chunk}\n\n".encode())
                    await writer.drain()
                self.posts_answered += 1
                return
        except asyncio.IncompleteReadError:
            self.closed_by_client += 1
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s"
        await asyncio.sleep(0.01)


def _model(*urls: str, health_interval_s: float = 60.0) -> UpstreamModel:
    settings = UpstreamSettings(
        urls=list(urls),
        model="m",
        connect_timeout_s=1.0,
        first_byte_timeout_s=30.0,  # far beyond what these tests wait: only an ejection can end a wait
        idle_timeout_s=5.0,
        health_interval_s=health_interval_s,
    )
    return UpstreamModel("m", settings, env={})


BODY = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_ejection_sends_a_request_waiting_for_its_first_byte_to_another_replica() -> None:
    async def run() -> None:
        async with Replica(silent=True) as silent, Replica() as answering:
            model = _model(silent.url, answering.url)  # both idle: the first request goes to replica 0
            await model.start()
            events = model.stream("chat/completions", BODY)
            try:
                first = asyncio.ensure_future(anext(events))
                await _until(lambda: silent.posts_waiting == 1)
                waiting_on = model.replicas.replicas[0]
                assert waiting_on.longest_wait(time.monotonic()) > 0
                ejected = time.monotonic()
                model.replicas.failed(waiting_on, "connect")  # as another request's connect error does
                event = await asyncio.wait_for(first, 5)
                retried_in = time.monotonic() - ejected
                rest = [e async for e in events]
            finally:
                await events.aclose()
                await model.close()
            assert event == UpstreamDelta("Hel")
            assert rest[0] == UpstreamDelta("lo") and isinstance(rest[-1], UpstreamFinish)
            assert retried_in < 2.0  # not the 30 s first-byte timeout
            assert answering.posts_answered == 1
            await _until(lambda: silent.posts_abandoned == 1)  # its connection was closed: the upstream knows
            assert waiting_on.longest_wait(time.monotonic()) == 0
            assert waiting_on.last_error == "connect"  # what ejected it, not overwritten by the retry

    asyncio.run(run())


def test_a_replica_a_request_waits_on_is_probed_and_its_partition_found() -> None:
    async def run() -> None:
        async with Replica(silent=True) as cut_off, Replica() as answering:
            model = _model(cut_off.url, answering.url, health_interval_s=0.1)
            await model.start()
            events = model.stream("chat/completions", BODY)
            try:
                first = asyncio.ensure_future(anext(events))
                await _until(lambda: cut_off.posts_waiting == 1)
                cut_off.stop_listening()  # new connections (the probe's) are refused; the request's hangs
                started = time.monotonic()
                event = await asyncio.wait_for(first, 5)
                found_in = time.monotonic() - started
                rest = [e async for e in events]
            finally:
                await events.aclose()
                await model.close()
            replica = model.replicas.replicas[0]
            assert event == UpstreamDelta("Hel") and isinstance(rest[-1], UpstreamFinish)
            assert replica.state == "ejected" and replica.last_error == "probe"
            assert found_in < 2.0  # about two health intervals, not the 30 s first-byte timeout
            await _until(lambda: cut_off.posts_abandoned == 1)

    asyncio.run(run())


def test_ejection_leaves_a_stream_under_way_alone() -> None:
    async def run() -> None:
        async with Replica(gap_s=0.2) as slow:
            model = _model(slow.url)
            await model.start()
            events = model.stream("chat/completions", BODY)
            try:
                first = await anext(events)
                model.replicas.failed(model.replicas.replicas[0], "connect")  # ejected mid-stream
                rest = [e async for e in events]
            finally:
                await events.aclose()
                await model.close()
            assert first == UpstreamDelta("Hel")
            assert rest[0] == UpstreamDelta("lo") and isinstance(rest[-1], UpstreamFinish)
            assert slow.posts_answered == 1

    asyncio.run(run())


def test_health_probes_use_a_new_connection_each_time() -> None:
    async def run() -> None:
        async with Replica() as replica:
            model = _model(replica.url)
            await model.start()
            try:
                target = model.replicas.replicas[0]
                assert await model.probe(target) and await model.probe(target)
            finally:
                await model.close()
            assert replica.connections == 2
            await _until(lambda: replica.closed_by_client == 2)  # none kept alive

    asyncio.run(run())
