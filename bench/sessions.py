"""More chat sessions than slots: returning-turn TTFT, gateway (host KV cache) against llama-server.

``N`` chat sessions take turns round-robin on 4 slots, one request at a time: every session opens with
a ~500-token message, then each comes back with a short question, ``--turns`` times in all. With more
sessions than slots, a returning session's slot has been taken by others since its last turn: only a
host-memory KV cache (the gateway's ``kv_cache_mib``, llama-server's ``--cache-ram``, 8 GiB by default)
spares it recomputing its whole history. Both servers run side by side and every request goes to one,
then the same request to the other (paired). The gateway gets ``X-Session-Id`` and its response cache
is off. Reports TTFT p50 of the cold (opening) and returning turns and each server's RSS at the end.

    python bench/sessions.py [--sessions 12,32,64] [--turns 3] [--threads 2] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.build_llama_server import DEFAULT_CACHE, build  # noqa: E402
from bench.run import MODEL_ID, credentials, free_port, running_process, target_command  # noqa: E402
from engine.llamacpp.batched import DEFAULT_KV_CACHE_MIB  # noqa: E402
from engine.registry import ensure_model, load_registry  # noqa: E402

TARGETS = ("gateway", "llama-server")
SYSTEM = "You are a helpful assistant for a harbour town."
FILLER = (
    "Here is more background for you to keep in mind: the harbour town has narrow streets, a market "
    "on Thursdays, a lighthouse keeper called Ana, and a bakery that opens before dawn. "
)


@dataclass
class Server:
    """One target under test: where it listens, what it needs, its process."""

    name: str
    base_url: str
    headers: dict[str, str]
    pid: int
    cold: list[float] = field(default_factory=list)
    returning: list[float] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    """Prompt tokens the server reported as cached on returning turns (when it reports them)."""
    rss: float = 0.0
    """MiB resident at the end of the run."""

    def rss_mib(self) -> float:
        """Resident memory of the server process and its children."""
        process = psutil.Process(self.pid)
        rss = process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
        return float(rss) / 2**20


def opening(session: int) -> str:
    """A ~500-token first message, different from the first words on (no shared prefix but the system)."""
    return f"Visitor {session} ({uuid.uuid4().hex[:8]}) writes: " + FILLER * 14 + "What should I see first?"


def turn(
    http: httpx.Client, server: Server, messages: list[dict[str, str]], session: str
) -> tuple[float, str, int]:
    """Stream one reply; return (seconds to the first content token, the reply, cached prompt tokens)."""
    headers = {**server.headers, "X-Session-Id": session} if server.name == "gateway" else server.headers
    body = {
        "model": MODEL_ID,
        "messages": messages,
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    text = ""
    cached = 0
    with http.stream(
        "POST", f"{server.base_url}/v1/chat/completions", json=body, headers=headers
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or {}
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or cached
            for choice in chunk.get("choices") or []:
                piece = choice["delta"].get("content")
                if piece:
                    text += piece
                    first = first or time.perf_counter() - started
    assert first is not None, f"{server.name} sent no content"
    return first, text, cached


def run_sessions(servers: list[Server], sessions: int, turns: int, pause: float) -> None:
    """Every session's turns, round-robin; each request to every server in turn, ``pause`` seconds apart
    (a user's time to read the reply: background work of one server must not slow the other one)."""
    histories = {
        server.name: [[{"role": "system", "content": SYSTEM}] for _ in range(sessions)] for server in servers
    }
    ids = [uuid.uuid4().hex for _ in range(sessions)]
    openings = [opening(s) for s in range(sessions)]
    with httpx.Client(timeout=600) as http:
        for number in range(turns):
            for s in range(sessions):
                question = openings[s] if number == 0 else f"Question {number + 1}: and after that?"
                for server in servers:
                    history = histories[server.name][s]
                    history.append({"role": "user", "content": question})
                    ttft, reply, cached = turn(http, server, history, ids[s])
                    time.sleep(pause)
                    history.append({"role": "assistant", "content": reply})
                    (server.cold if number == 0 else server.returning).append(ttft)
                    if number:
                        server.cached.append(cached)
            print(
                f"{sessions} sessions, turn {number + 1}: "
                + ", ".join(
                    f"{server.name} p50 {statistics.median((server.returning or server.cold)[-sessions:]) * 1000:.0f} ms"
                    for server in servers
                ),
                flush=True,
            )


def measure(model: Path, binary: Path, sessions: int, turns: int, threads: int, pause: float) -> list[Server]:
    """Start both servers fresh, run the workload, read their RSS."""
    servers: list[Server] = []
    with contextlib.ExitStack() as stack:
        for name in TARGETS:
            port = free_port()
            command, env, ready, _ = target_command(name, model, threads, 4, 2048, port, binary)
            env["ENABLE_CACHE"] = "False"
            base_url, process = stack.enter_context(running_process(command, env, port, ready))
            servers.append(Server(name, base_url, credentials(name, base_url), process.pid))
        run_sessions(servers, sessions, turns, pause)
        for server in servers:
            server.rss = server.rss_mib()
    return servers


def p50_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="12,32,64")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between requests")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    model = ensure_model(load_registry()[MODEL_ID], ROOT / "models" / f"{MODEL_ID}.gguf")
    binary = build(args.cache, 2)
    header = (
        f"## Chat sessions beyond the slots: gateway vs llama-server ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)\n\n"
        f"Command: `python bench/sessions.py --sessions {args.sessions} --turns {args.turns} "
        f"--threads {args.threads} --pause {args.pause:g} --write`  \n"
        f"Machine: {os.cpu_count()} cores; model {MODEL_ID} Q4_1; both servers 4 slots x 2048 tokens, "
        f"{args.threads} threads, side by side, each request sent to one then the other; ~500-token "
        f"openings, then short questions, 24 greedy tokens per reply, one request at a time ({args.pause:g} s "
        f"apart), round-robin over the sessions. Gateway: `X-Session-Id`, response cache off, host KV cache "
        f"{DEFAULT_KV_CACHE_MIB} MiB (default); llama-server: default `--cache-ram` (8192 MiB). "
        f"Cold = the opening turn, returning = every later turn. Servers start afresh for each row.\n\n"
        "| sessions | target | cold TTFT p50 ms | returning TTFT p50 ms | returning TTFT p90 ms "
        "| cached tokens per returning turn (median) | RSS at end MiB | returning p50 gateway / llama-server "
        "| cold p50 gateway / llama-server |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    emit(header, args.write)
    for sessions in (int(n) for n in args.sessions.split(",")):
        servers = measure(model, binary, sessions, args.turns, args.threads, args.pause)
        ours, theirs = servers
        rows = []
        for server in servers:
            p90 = statistics.quantiles(server.returning, n=10)[-1] if len(server.returning) > 1 else 0.0
            ratios = " | |"
            if server is ours:
                returning = statistics.median(ours.returning) / statistics.median(theirs.returning)
                cold = statistics.median(ours.cold) / statistics.median(theirs.cold)
                ratios = f" **{returning:.2f}x** | **{cold:.2f}x** |"
            rows.append(
                f"| {sessions} | {server.name} | {p50_ms(server.cold)} | {p50_ms(server.returning)} | "
                f"{p90 * 1000:.0f} | {statistics.median(server.cached) if server.cached else 0:.0f} | "
                f"{server.rss:.0f} |" + ratios
            )
        emit("\n".join(rows), args.write, separator="\n")


def emit(text: str, write: bool, separator: str = "\n\n") -> None:
    """Print ``text`` and, with ``--write``, append it to bench/RESULTS.md at once (a long run that is
    stopped keeps the rows it finished)."""
    print(text, flush=True)
    if write:
        results_file = ROOT / "bench" / "RESULTS.md"
        results_file.write_text(results_file.read_text().rstrip() + separator + text + "\n")


if __name__ == "__main__":
    main()
