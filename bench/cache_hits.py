"""Response-cache hits against the same server's floor (``GET /health``), under the same ``wrk`` load.

One ``pocketllm serve`` (the default model, 2 threads) is started; a greedy chat request is answered once
(stored), then ``wrk`` (Debian's package) drives, in turn: ``GET /health`` (the floor: routing and
middleware, no auth), and the cached ``POST /v1/chat/completions`` with an API key (auth, rate-limit
check, cache lookup, replay as JSON). Then the same at one connection for the latency p50. With
``--redis`` the cache and the limiter live in the local Redis (127.0.0.1:6379) as in a multi-replica
deployment; without it, in process. Writes a section to bench/RESULTS.md with ``--write``.

    python bench/cache_hits.py [--connections 16] [--seconds 10] [--redis] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import MODEL_ID, free_port, running  # noqa: E402

LUA = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def wrk(url: str, connections: int, seconds: int, script: Path | None = None) -> dict[str, float]:
    """Requests/s and latency percentiles (ms) of one wrk run (one thread: the server has the other core)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script is not None:
        command += ["-s", str(script)]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def percentile(name: str) -> float:
        value, unit = re.search(rf"\s{name}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": percentile("50"),
        "p99_ms": percentile("99"),
        "errors": float(non_2xx.group(1)) if non_2xx else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--redis", action="store_true", help="cache and limits in the local Redis")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCKETLLM_", "MODEL_"))}
    env |= {
        "POCKETLLM_DATA_DIR": tempfile.mkdtemp(prefix="pocketllm-bench-"),
        "MODEL_N_THREADS": "2",
        "POCKETLLM_TELEMETRY__LOG_LEVEL": "WARNING",
    }
    if args.redis:
        env |= {"REDIS_HOST": "127.0.0.1", "POCKETLLM_REDIS__KEY_PREFIX": f"bench-{port}:"}
    command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)]
    with running(command, env, port, "/health") as base:
        token = httpx.post(
            f"{base}/auth/login", json={"username": "admin", "password": "admin123"}, timeout=60
        ).json()["access_token"]
        key = httpx.post(
            f"{base}/admin/keys",
            json={"username": "user1"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        ).json()["key"]
        body = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "Say hello."}],
            "temperature": 0,
            "max_tokens": 16,
        }
        headers = {"Authorization": f"Bearer {key}"}
        first = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120)
        second = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120)
        if (first.headers["x-cache"], second.headers["x-cache"]) != ("miss", "hit"):
            raise SystemExit(f"the answer was not cached: {first.headers}, {second.headers}")
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(LUA.format(body=json.dumps(body), key=key))
        lua = Path(script.name)
        rows = []
        for connections in (args.connections, 1):
            health = wrk(f"{base}/health", connections, args.seconds)
            hits = wrk(f"{base}/v1/chat/completions", connections, args.seconds, lua)
            rows.append((connections, health, hits))
    backend = "Redis" if args.redis else "in-process"
    lines = [
        f"## Cache hits vs GET /health, {backend} cache and limits "
        f"({datetime.now(UTC).strftime('%Y-%m-%d %H:%M')} UTC)",
        "",
        f"`python bench/cache_hits.py --connections {args.connections} --seconds {args.seconds}"
        f"{' --redis' if args.redis else ''}` — one `pocketllm serve`, `wrk -t1` from Debian on the same "
        f"machine ({os.cpu_count()} cores), an API key, a greedy 16-token chat answer already cached.",
        "",
        "| connections | /health req/s | hit req/s | hit / health | /health p50 ms | hit p50 ms | hit p99 ms "
        "| non-2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for connections, health, hits in rows:
        lines.append(
            f"| {connections} | {health['rps']:.0f} | {hits['rps']:.0f} | {hits['rps'] / health['rps']:.2f} "
            f"| {health['p50_ms']:.2f} | {hits['p50_ms']:.2f} | {hits['p99_ms']:.2f} | {hits['errors']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with (ROOT / "bench" / "RESULTS.md").open("a", encoding="utf-8") as results:
            results.write("\n" + text)


if __name__ == "__main__":
    main()
