"""A ``pocketllm serve`` whose model runs on two real ``llama-server`` replicas on networks of their own.

The replicas (``tests/upstream_support.py``) sit in network namespaces of their own (or on loopback
addresses of their own where namespaces cannot be made), so one can be killed, restarted, or cut off the
network while it keeps running. The openai SDK talks to the gateway; the test reads each replica's own
``/slots`` and ``/metrics`` to see where requests went and what they cost there.

One module-scoped set of processes serves every test; a test that breaks a replica mends it before it
ends (and ``mended`` checks at the start of each test). Measured delays are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import NO_EOS, create_key, free_port, login
from tests.serve_support import server_env, start_server, wait_healthy
from tests.upstream_support import UPSTREAM_MODEL, LlamaServers, llama_servers, until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "remote-smol"
CONNECT_TIMEOUT_S = 1.0
FIRST_BYTE_TIMEOUT_S = 20.0
IDLE_TIMEOUT_S = 3.0
HEALTH_INTERVAL_S = 0.5
ADMISSION_BOUND_S = 10 * HEALTH_INTERVAL_S + 2
"""A replica that is back is probed (every health interval while ejected) and admitted well within this."""
SLOT_FREED_BOUND_S = 1.0
CLIENTS = 8
NO_STORE = {"Cache-Control": "no-store"}
"""Greedy requests would be answered from the gateway's response cache without reaching an upstream."""


def upstream_config(urls: list[str], model: str, **extra: str) -> str:
    """The TOML of a gateway whose one model ``MODEL`` is served by ``urls``."""
    lines = [
        "[[models]]",
        f'id = "{MODEL}"',
        "[models.upstream]",
        "urls = [" + ", ".join(f'"{url}"' for url in urls) + "]",
        f'model = "{model}"',
        f"connect_timeout_s = {CONNECT_TIMEOUT_S}",
        f"first_byte_timeout_s = {FIRST_BYTE_TIMEOUT_S}",
        f"idle_timeout_s = {IDLE_TIMEOUT_S}",
        f"health_interval_s = {HEALTH_INTERVAL_S}",
        *(f'{key} = "{value}"' for key, value in extra.items()),
        "",
    ]
    return "\n".join(lines)


@dataclass
class Gateway:
    """A running ``pocketllm serve`` and an API key on it."""

    base_url: str
    key: str
    process: subprocess.Popen[str]
    config: Path
    admin: dict[str, str] = field(default_factory=dict)

    def client(self, **options: Any) -> openai.OpenAI:
        """An openai SDK client on the gateway; no SDK retries (they would hide what the gateway did)."""
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.key,
            max_retries=0,
            default_headers=NO_STORE,
            **options,
        )

    def replicas(self) -> list[dict[str, Any]]:
        """The model's replicas as ``/health`` shows them (one object per replica, in configured order)."""
        body = httpx.get(f"{self.base_url}/health", timeout=5).json()
        entry = body["models"][MODEL]
        rows: list[dict[str, Any]] = entry["replicas"]
        return rows

    def states(self) -> list[str]:
        """Each replica's state in ``/health`` (``healthy``, ``ejected``)."""
        return [row["state"] for row in self.replicas()]


@contextlib.contextmanager
def running_gateway(config_text: str, **env: str) -> Iterator[Gateway]:
    """``pocketllm serve --config`` on ``config_text`` (and ``env``), with a fresh API key of user1."""
    environment = server_env(POCKETLLM_QUEUE__PING_INTERVAL_S="0.5", **env)
    config = Path(environment["POCKETLLM_DATA_DIR"]) / "upstream.toml"
    config.write_text(config_text)
    port = free_port()
    process = start_server(port, environment, "--config", str(config))
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, base_url)
        admin = {"Authorization": f"Bearer {login(base_url, 'admin', 'admin123')}"}
        key = create_key(base_url, admin["Authorization"].removeprefix("Bearer "), "user1")["key"]
        yield Gateway(base_url, key, process, config, admin)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        output, _ = process.communicate(timeout=30)
        assert "Traceback" not in output, f"the gateway logged a traceback:\n{output}"


@pytest.fixture(scope="module")
def replicas(model_path: Path) -> Iterator[LlamaServers]:
    """Two llama-server replicas, two slots each, one thread each (the machine has two cores)."""
    with llama_servers(2, model_path, slots=2, ctx_per_slot=2048, threads=1) as servers:
        print(
            f"\nllama-server replicas on {servers.network.kind}: {servers.base_url(0)}, {servers.base_url(1)}"
        )
        yield servers


@pytest.fixture(scope="module")
def gateway(replicas: LlamaServers) -> Iterator[Gateway]:
    """The gateway in front of both replicas."""
    urls = [replicas.base_url(i) for i in range(len(replicas))]
    with running_gateway(upstream_config(urls, UPSTREAM_MODEL)) as served:
        yield served


@pytest.fixture
def mended(replicas: LlamaServers, gateway: Gateway) -> LlamaServers:
    """Both replicas running, reachable, idle and admitted by the gateway (whatever an earlier test left)."""
    for index in range(len(replicas)):
        replicas.heal(index)
        if replicas.pid(index) is None:
            replicas.start(index)
    until(lambda: gateway.states() == ["healthy"] * len(replicas), ADMISSION_BOUND_S, 0.1)
    until(lambda: all(replicas.busy_slots(i) == 0 for i in range(len(replicas))), 30, 0.1)
    return replicas


def chat(max_tokens: int, content: str = "Write a story about the sea.", **extra: Any) -> dict[str, Any]:
    """Keyword arguments of a greedy chat completion that runs to ``max_tokens`` (EOS banned)."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": NO_EOS,
        **extra,
    }


def counter(replicas: LlamaServers, index: int, name: str) -> float:
    return replicas.metrics(index).get(f"llamacpp:{name}", 0.0)


def answered_by(
    gateway: Gateway, replicas: LlamaServers, prompt: str, **extra: Any
) -> tuple[int, float, Any]:
    """Send one short chat completion through the gateway: (the replica that answered it, the prompt tokens
    that replica evaluated for it, the gateway's ``usage``). One request at a time."""
    before = [
        (counter(replicas, i, "tokens_predicted_total"), counter(replicas, i, "prompt_tokens_total"))
        for i in range(len(replicas))
    ]
    with gateway.client() as client:
        answer = client.chat.completions.create(**chat(4, prompt), **extra)
    assert answer.choices[0].finish_reason == "length"

    def moved() -> list[int]:
        return [
            i for i in range(len(replicas)) if counter(replicas, i, "tokens_predicted_total") > before[i][0]
        ]

    until(lambda: len(moved()) == 1, 5, 0.05)
    index = moved()[0]
    return index, counter(replicas, index, "prompt_tokens_total") - before[index][1], answer.usage


def session_on(gateway: Gateway, replicas: LlamaServers, index: int) -> dict[str, str]:
    """Headers of a new session that the gateway places on replica ``index`` (found by trying)."""
    for attempt in range(16):
        session = {"X-Session-Id": f"on-{index}-{attempt}-{uuid.uuid4().hex}"}
        if answered_by(gateway, replicas, "Hello there.", extra_headers=session)[0] == index:
            return session
    pytest.fail(f"no session of 16 was placed on replica {index}")


# --- the harness itself, on llama-server alone ---------------------------------------------------------------


def test_replicas_serve_and_can_be_killed_restarted_and_partitioned(replicas: LlamaServers) -> None:
    with httpx.Client(timeout=30, trust_env=False) as http:
        for index in range(len(replicas)):
            response = http.post(
                f"{replicas.base_url(index)}/chat/completions",
                json={
                    "model": UPSTREAM_MODEL,
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 2,
                },
            )
            assert response.status_code == 200, response.text
            assert len(replicas.slots(index)) == 2
        old_pid = replicas.pid(1)
        replicas.kill(1)
        with pytest.raises(httpx.TransportError):
            http.get(f"{replicas.root_url(1)}/health", timeout=2)
        replicas.restart(1)
        assert replicas.pid(1) not in (None, old_pid)
        replicas.partition(1)
        try:
            started = time.monotonic()
            with pytest.raises(httpx.TimeoutException):  # unreachable: no answer at all, not a refusal
                http.get(f"{replicas.root_url(1)}/health", timeout=1)
            assert time.monotonic() - started >= 0.9
            assert http.get(f"{replicas.root_url(0)}/health").status_code == 200
        finally:
            replicas.heal(1)
        until(lambda: http.get(f"{replicas.root_url(1)}/health", timeout=1).status_code == 200, 10, 0.1)


# --- through the gateway ---------------------------------------------------------------------------------------


def test_the_openai_sdk_streams_through_the_gateway(gateway: Gateway, mended: LlamaServers) -> None:
    with gateway.client() as client:
        assert MODEL in [m.id for m in client.models.list()]
        stream = client.chat.completions.create(
            **chat(12), stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text.strip()
    assert finishes == ["length"]
    assert {c.model for c in chunks} == {MODEL}  # the gateway's name, not the upstream's
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 12 and usage.prompt_tokens > 0
    rows = gateway.replicas()
    assert [row["state"] for row in rows] == ["healthy", "healthy"]
    hosts = [f"{mended.network.addresses[i]}:{mended.ports[i]}" for i in range(2)]
    assert [row["host"] for row in rows] == hosts


def test_a_session_sticks_to_one_replica_and_reuses_its_prompt_cache(
    gateway: Gateway, mended: LlamaServers
) -> None:
    story = " ".join(f"Line {n}: the keeper of the lighthouse counted ships." for n in range(40))

    sessions: list[dict[str, Any]] = [
        {"extra_headers": {"X-Session-Id": f"sticky-{uuid.uuid4().hex}"}} for _ in range(2)
    ] + [{"extra_body": {"prompt_cache_key": f"sticky-{uuid.uuid4().hex}"}} for _ in range(2)]
    for n, session in enumerate(sessions):
        prompt = f"Session {n}. {story}"  # a prompt of its own: no other session's cache helps it
        first_replica, first_cost, _ = answered_by(gateway, mended, prompt, **session)
        second_replica, second_cost, usage = answered_by(gateway, mended, prompt, **session)
        print(
            f"session {n}: replica {first_replica} -> {second_replica}; prompt tokens evaluated "
            f"{first_cost:.0f} -> {second_cost:.0f}; gateway usage {usage}"
        )
        assert second_replica == first_replica
        assert second_cost < 0.2 * usage.prompt_tokens  # the rest came from that replica's KV cache
        details = getattr(usage, "prompt_tokens_details", None)
        if details is not None and details.cached_tokens is not None:
            assert details.cached_tokens >= 0.8 * usage.prompt_tokens


def test_a_client_that_leaves_frees_the_upstream_slot_within_a_second(
    gateway: Gateway, mended: LlamaServers
) -> None:
    with gateway.client() as client:
        stream = client.chat.completions.create(**chat(1500), stream=True)
        received = 0
        for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received >= 3:
                break
        busy = [mended.busy_slots(i) for i in range(2)]
        assert sorted(busy) == [0, 1], busy  # one slot, on one replica, is generating for us
        index = busy.index(1)
        decoded = mended.decoded(index)
        stream.close()
        left = time.monotonic()
    until(lambda: mended.busy_slots(index) == 0, 10, 0.02)
    freed = time.monotonic() - left
    print(f"slot freed {freed * 1000:.0f} ms after the client left (it had decoded {decoded} of 1500 tokens)")
    assert freed < SLOT_FREED_BOUND_S
    assert mended.decoded(index) == 0


@dataclass
class Outcome:
    """What one client of the load saw."""

    first_content: float | None = None
    """monotonic time of its first content token"""
    finish: str | None = None
    tokens: int = 0
    error: dict[str, Any] | None = None
    """the error frame's ``error`` object"""
    exception: str | None = None
    """anything else that ended it (a transport error, a timeout)"""
    ended: float = 0.0


def stream_one(client: openai.OpenAI, max_tokens: int, topic: str) -> Outcome:
    """One streamed chat completion under load; never raises."""
    outcome = Outcome()
    try:
        stream = client.chat.completions.create(
            **chat(max_tokens, f"Write a long story about {topic}."), stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                outcome.tokens += 1
                if outcome.first_content is None:
                    outcome.first_content = time.monotonic()
            if chunk.choices and chunk.choices[0].finish_reason:
                outcome.finish = chunk.choices[0].finish_reason
    except openai.APIStatusError as exc:
        outcome.exception = f"HTTP {exc.status_code}: {exc.body}"
    except openai.APIError as exc:
        if isinstance(exc.body, dict) and {"message", "type", "code"} <= exc.body.keys():
            outcome.error = exc.body
        else:
            outcome.exception = f"{type(exc).__name__}: {exc}"
    outcome.ended = time.monotonic()
    return outcome


def test_a_replica_killed_under_load_is_ejected_and_readmitted(
    gateway: Gateway, mended: LlamaServers
) -> None:
    topics = ["the sea", "a lighthouse", "winter", "a town", "the moon", "a train", "a garden", "a river"]
    with gateway.client(timeout=120) as client, ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(stream_one, client, 64, topic) for topic in topics]
        # replica 0 is streaming (tokens decoded on each busy slot) while more requests wait behind
        until(lambda: len(decoding := mended.decoding(0)) == 2 and min(decoding) >= 3, 60, 0.02)
        time.sleep(0.1)  # every token decoded so far has reached its client
        mended.kill(0)
        killed = time.monotonic()
        ejected = until(lambda: gateway.states()[0] == "ejected", 5, 0.02)
        outcomes = [future.result(timeout=90) for future in futures]
    streaming = [o for o in outcomes if o.first_content is not None and o.first_content < killed]
    waiting = [o for o in outcomes if o not in streaming]
    print(
        f"{len(streaming)} streaming at the kill, {len(waiting)} not yet; "
        f"errors {[o.error for o in outcomes if o.error]}; ejected within {ejected:.2f} s"
    )
    assert not [o.exception for o in outcomes if o.exception], (
        "no client saw anything but an answer or an error frame"
    )
    for outcome in waiting:  # retried on the other replica before their first byte
        assert outcome.error is None and outcome.finish == "length" and outcome.tokens == 64, outcome
    errors = [o for o in streaming if o.error is not None]
    assert 1 <= len(errors) <= 2, outcomes  # the ones on the dead replica (it had two busy slots)
    for outcome in errors:
        assert outcome.tokens < 64 and outcome.finish is None
        assert outcome.ended - killed < IDLE_TIMEOUT_S, "the error frame came at once, not after a timeout"
    for outcome in streaming:
        assert outcome.error is not None or (outcome.finish == "length" and outcome.tokens == 64), outcome

    mended.start(0)
    back = time.monotonic()
    admitted = until(lambda: gateway.states()[0] == "healthy", ADMISSION_BOUND_S, 0.05)
    print(f"replica 0 re-admitted {admitted:.2f} s after it was back")
    before = counter(mended, 0, "tokens_predicted_total")
    with gateway.client() as client, ThreadPoolExecutor(2) as pool:  # two at once: one lands on each
        answers = list(pool.map(lambda _: client.chat.completions.create(**chat(4)), range(2)))
    assert [a.choices[0].finish_reason for a in answers] == ["length", "length"]
    until(lambda: counter(mended, 0, "tokens_predicted_total") > before, 5, 0.05)
    assert time.monotonic() - back < 60


def test_a_partitioned_replica_is_ejected_within_the_connect_timeout(
    gateway: Gateway, mended: LlamaServers
) -> None:
    bound = CONNECT_TIMEOUT_S if mended.partition_hits_connect else FIRST_BYTE_TIMEOUT_S
    session = session_on(gateway, mended, 0)  # its next request goes to replica 0 first
    with gateway.client(timeout=120) as client, ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(stream_one, client, 400, topic) for topic in ("a desert", "a storm")]
        until(lambda: mended.busy_slots(0) == 1 and mended.busy_slots(1) == 1, 30, 0.02)
        until(lambda: all(mended.decoded(i) >= 3 for i in range(2)), 30, 0.02)
        mended.partition(0)
        cut = time.monotonic()
        try:
            durations, states = [], []
            for _ in range(3):  # new requests of its session while it is unreachable: every one is answered
                started = time.monotonic()
                answer = client.chat.completions.create(**chat(4, "Hello there."), extra_headers=session)
                durations.append(time.monotonic() - started)
                states.append(gateway.states())
                assert answer.choices[0].finish_reason == "length"
            outcomes = [future.result(timeout=90) for future in futures]
        finally:
            mended.heal(0)
    healed = time.monotonic()
    print(
        f"session requests during the partition took {', '.join(f'{d:.2f}' for d in durations)} s; "
        f"streams: {[(o.finish, o.tokens, o.error and o.error['code'], round(o.ended - cut, 2)) for o in outcomes]}"
    )
    assert states[0] == ["ejected", "healthy"]  # by the first request that could not connect
    assert durations[0] < bound + 3.0
    assert max(durations[1:]) < 3.0  # the others go straight to replica 1
    cut_off, survivor = sorted(outcomes, key=lambda o: o.error is None)
    assert survivor.error is None and survivor.finish == "length" and survivor.tokens == 400
    assert cut_off.error is not None and cut_off.exception is None  # an error frame, not a hang
    assert cut_off.ended - cut < IDLE_TIMEOUT_S + 3.0
    admitted = until(lambda: gateway.states()[0] == "healthy", ADMISSION_BOUND_S, 0.05)
    print(
        f"replica 0 re-admitted {admitted:.2f} s after the network was back ({time.monotonic() - healed:.2f} s)"
    )


def test_a_partition_is_seen_within_the_connect_timeout_on_pooled_connections_too(
    gateway: Gateway, mended: LlamaServers
) -> None:
    """A replica that drops off the network just after a burst of requests to it: the next request must not
    wait until the first-byte timeout on a connection kept alive from the burst (a gateway that pools its
    upstream connections, as it should, must still notice the partition within the connect timeout)."""
    if not mended.partition_hits_connect:
        pytest.skip("loopback replicas: a partition is a frozen process, seen at the first-byte timeout")
    session = session_on(gateway, mended, 0)
    ss = ["ss", "-Htn", "state", "established", "dst", mended.network.addresses[0]]
    with gateway.client(timeout=120) as client, ThreadPoolExecutor(3) as pool:
        for _ in range(5):
            # three at once on replica 0: three connections to it, idle after if the gateway keeps them alive
            list(
                pool.map(lambda _: client.chat.completions.create(**chat(2), extra_headers=session), range(3))
            )
            pooled = subprocess.run(ss, capture_output=True, text=True, check=False).stdout.splitlines()
            if pooled:
                break
        else:
            pytest.skip("the gateway kept no idle connection to the replica after a burst: nothing to test")
        mended.partition(0)
        try:
            started = time.monotonic()
            answer = client.chat.completions.create(**chat(4, "Hello there."), extra_headers=session)
            took = time.monotonic() - started
            states = gateway.states()
            info = httpx.get(f"{gateway.base_url}/admin/model/info", headers=gateway.admin, timeout=5).json()
        finally:
            mended.heal(0)
    why = next(m for m in info["models"] if m["id"] == MODEL)["upstream"]["replicas"][0]["last_error"]
    print(
        f"the first request after the partition took {took:.2f} s (connect timeout {CONNECT_TIMEOUT_S} s); "
        f"{len(pooled)} connections to the replica were open before it; ejected for {why!r}"
    )
    assert answer.choices[0].finish_reason == "length"
    assert states == ["ejected", "healthy"]
    assert took < CONNECT_TIMEOUT_S + 3.0, "it waited on a dead pooled connection"
    until(lambda: gateway.states()[0] == "healthy", ADMISSION_BOUND_S, 0.05)


def test_key_model_lists_limits_and_the_cache_apply_to_an_upstream_model(
    gateway: Gateway, mended: LlamaServers
) -> None:
    def key(**fields: Any) -> tuple[str, dict[str, str]]:
        made = create_key(
            gateway.base_url, gateway.admin["Authorization"].removeprefix("Bearer "), "user1", **fields
        )
        return made["id"], {"Authorization": f"Bearer {made['key']}"}

    body = chat(3, f"Say hello to {uuid.uuid4().hex[:8]}.")
    with httpx.Client(base_url=gateway.base_url, timeout=60) as http:
        _, elsewhere = key(models=["some-other-model"])  # a key for another model only
        refused = http.post("/v1/chat/completions", json=body, headers=elsewhere)
        assert refused.status_code in (403, 404), refused.text
        assert set(refused.json()["error"]) >= {"message", "type", "param", "code"}

        key_id, limited = key()
        limits = http.put(f"/admin/keys/{key_id}/limits", json={"rpm": 1}, headers=gateway.admin)
        assert limits.status_code == 200, limits.text
        before = sum(counter(mended, i, "tokens_predicted_total") for i in range(2))
        first = http.post("/v1/chat/completions", json=body, headers=limited)
        assert first.status_code == 200, first.text
        assert first.headers["x-cache"] == "miss"
        until(
            lambda: sum(counter(mended, i, "tokens_predicted_total") for i in range(2)) == before + 3, 5, 0.05
        )
        second = http.post("/v1/chat/completions", json=body, headers=limited)
        assert second.status_code == 429, second.text  # one request per minute for this key
        assert second.json()["error"]["type"] and "retry-after" in second.headers

        _, other = key()  # the same deterministic request by another key of the same user: a cache hit
        hit = http.post("/v1/chat/completions", json=body, headers=other)
        assert hit.status_code == 200 and hit.headers["x-cache"] == "hit", hit.headers
        assert hit.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
        time.sleep(0.3)
        assert (
            sum(counter(mended, i, "tokens_predicted_total") for i in range(2)) == before + 3
        )  # not upstream


def test_a_gateway_in_front_of_a_gateway(gateway: Gateway, mended: LlamaServers) -> None:
    outer_config = upstream_config([f"{gateway.base_url}/v1"], MODEL, api_key_env="INNER_GATEWAY_KEY")
    with running_gateway(outer_config, INNER_GATEWAY_KEY=gateway.key) as outer:
        request = chat(16, f"Name three colours, {uuid.uuid4().hex[:6]}.")
        before = sum(counter(mended, i, "tokens_predicted_total") for i in range(2))
        with outer.client() as client:
            chunks = list(
                client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
            )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip()
        # generated by a llama-server behind the inner gateway, once
        until(
            lambda: sum(counter(mended, i, "tokens_predicted_total") for i in range(2)) == before + 16,
            5,
            0.05,
        )
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            "length"
        ]
        assert {c.model for c in chunks} == {MODEL} and chunks[0].id.startswith("chatcmpl-")
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
        assert outer.states() == ["healthy"]
        with httpx.Client(base_url=outer.base_url, timeout=30) as http:  # the inner key is not the outer's
            refused = http.post(
                "/v1/chat/completions", json=chat(2), headers={"Authorization": f"Bearer {gateway.key}"}
            )
        assert refused.status_code == 401
        assert set(refused.json()["error"]) >= {"message", "type", "param", "code"}
