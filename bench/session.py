"""Multi-turn session: time to first token of turn N with KV reuse against a cold start.

A conversation grows turn by turn to about 1,500 prompt tokens. Each turn is sent twice to the same
gateway: as the next turn of the session (``X-Session-Id``: the slot that holds the history in its KV
cache only decodes the new tokens), and cold (a nonce at the start of the system prompt, so no slot
holds any of it and the whole history is decoded). Reports TTFT of both and their ratio per turn.

    python bench/session.py [--turns 12] [--threads 2] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import MODEL_ID, credentials, free_port, running, target_command  # noqa: E402
from engine.registry import ensure_model, load_registry  # noqa: E402

FILLER = (
    "Here is more background for you to keep in mind: the harbour town has narrow streets, a market "
    "on Thursdays, a lighthouse keeper called Ana, and a bakery that opens before dawn. "
)


def ttft(http: httpx.Client, messages: list[dict[str, str]], session: str | None) -> tuple[float, str, int]:
    """Stream one reply; return (seconds to the first content token, the reply, prompt tokens)."""
    headers = {"X-Session-Id": session} if session else {}
    body = {
        "model": MODEL_ID,
        "messages": messages,
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    text = ""
    prompt_tokens = 0
    with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
            for choice in chunk.get("choices") or []:
                piece = choice["delta"].get("content")
                if piece:
                    text += piece
                    first = first or time.perf_counter() - started
    assert first is not None
    return first, text, prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    model = ensure_model(load_registry()[MODEL_ID], ROOT / "models" / f"{MODEL_ID}.gguf")
    port = free_port()
    command, env, ready, _ = target_command("gateway", model, args.threads, 4, 2048, port, None)
    rows = []
    with running(command, env, port, ready) as base_url, httpx.Client(base_url=base_url, timeout=300) as http:
        http.headers.update(credentials("gateway", base_url))
        session = uuid.uuid4().hex
        history = [{"role": "system", "content": "You are a helpful assistant for a harbour town."}]
        for turn in range(1, args.turns + 1):
            history.append({"role": "user", "content": FILLER + f"Question {turn}: what should I visit?"})
            warm, reply, prompt_tokens = ttft(http, history, session)
            nonce = [{"role": "system", "content": f"[{uuid.uuid4().hex}] " + history[0]["content"]}]
            cold, _, _ = ttft(http, nonce + history[1:], None)
            rows.append((turn, prompt_tokens, warm, cold))
            print(
                f"turn {turn:2}: {prompt_tokens:5} prompt tokens, TTFT session {warm * 1000:6.0f} ms, "
                f"cold {cold * 1000:6.0f} ms, ratio {warm / cold:.2f}",
                flush=True,
            )
            history.append({"role": "assistant", "content": reply})
    lines = [
        "| turn | prompt tokens | TTFT with session (KV reuse) ms | TTFT cold ms | ratio |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {t} | {p} | {w * 1000:.0f} | {c * 1000:.0f} | {w / c:.2f} |" for t, p, w, c in rows]
    late = [r for r in rows if r[1] >= 1000]
    summary = ""
    if late:
        ratio = sum(w for _, _, w, _ in late) / sum(c for _, _, _, c in late)
        summary = f"\nTurns with >= 1,000 prompt tokens: session TTFT = **{ratio:.2f}x** cold.\n"
    text = (
        f"## Multi-turn session: KV reuse vs cold ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)\n\n"
        f"Command: `python bench/session.py --turns {args.turns} --threads {args.threads} --write`  \n"
        f"Machine: {os.cpu_count()} cores; gateway with 4 slots x 2048 tokens, {args.threads} threads; "
        f"24 tokens per reply, greedy.\n\n" + "\n".join(lines) + "\n" + summary
    )
    print(text)
    if args.write:
        results_file = ROOT / "bench" / "RESULTS.md"
        existing = results_file.read_text() if results_file.exists() else "# Benchmark results\n"
        results_file.write_text(existing.rstrip() + "\n\n" + text)


if __name__ == "__main__":
    main()
