"""Store-backed API-key authentication: cost per request, SQLite vs PostgreSQL, with and without the
in-memory key cache.

Direct calls to ``Authenticator.authenticate`` with an API key (no HTTP), sequentially and with
``--concurrency`` callers at once. Targets per backend: ``uncached`` (``key_cache_ttl_s=0``: one round
trip per call, the key, its owner and their limit overrides in one query), ``cached`` (2 s TTL; each of
the ``--keys`` keys is looked up once per TTL) and ``two lookups`` (the code path before this change: key by digest, then the
owner; the store calls only). The targets alternate within each round (the machine is shared and noisy),
after one unmeasured warm-up pass each.
PostgreSQL is the server on 127.0.0.1:5432 (a throw-away database); SQLite a file in a temporary
directory. Last, how long a revocation made on one PostgreSQL replica takes to be refused by another
that holds the key in its cache (with a 1 h TTL: only the NOTIFY can make it refuse).

    python bench/store_auth.py [--calls 2000] [--rounds 5] [--keys 100] [--concurrency 8] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auth.authenticate import Authenticator  # noqa: E402
from auth.errors import AuthenticationError  # noqa: E402
from auth.keys import hash_api_key  # noqa: E402
from auth.passwords import ScryptParams  # noqa: E402
from auth.store import IdentityStore  # noqa: E402
from auth.stores import open_store  # noqa: E402
from auth.tokens import TokenSettings  # noqa: E402
from tests.postgres_support import temporary_database  # noqa: E402

TOKENS = TokenSettings("b" * 48, issuer="bench", audience="bench")
Call = Callable[[str], Awaitable[object]]


async def populate(store: IdentityStore, keys: int) -> list[str]:
    """``keys`` users with one key each; the keys."""
    maker = Authenticator(store, TOKENS, ScryptParams(n=2**10))
    issued = []
    for i in range(keys):
        user = await store.create_user(f"user{i}", None, "user")
        issued.append((await maker.create_key(user)).key)
    return issued


def targets(store: IdentityStore) -> dict[str, Call]:
    """The ways to authenticate a key that are measured."""
    uncached = Authenticator(store, TOKENS, key_cache_ttl_s=0)
    cached = Authenticator(store, TOKENS, key_cache_ttl_s=2.0)

    async def two_lookups(key: str) -> object:
        record = await store.get_key_by_hash(hash_api_key(key))
        assert record is not None
        return await store.get_user(record.user_id)

    return {
        "uncached": lambda key: uncached.authenticate(None, key),
        "cached (2 s TTL)": lambda key: cached.authenticate(None, key),
        "two lookups (before)": two_lookups,
    }


async def measure(call: Call, keys: list[str], calls: int, concurrency: int) -> list[float]:
    """Latencies (seconds) of ``calls`` calls made by ``concurrency`` callers."""
    latencies: list[float] = []
    per_caller = calls // concurrency

    async def caller(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(per_caller):
            key = rng.choice(keys)
            started = time.perf_counter()
            await call(key)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return latencies


async def propagation(url: str, samples: int) -> list[float]:
    """Seconds from the revocation call on replica B until replica A refuses the key it had cached."""
    a_store, b_store = open_store(url), open_store(url)
    try:
        a = Authenticator(a_store, TOKENS, key_cache_ttl_s=3600)
        user = await a_store.create_user("propagation", None, "user")
        await a_store.open()
        await b_store.open()
        await asyncio.wait_for(a_store.listening.wait(), 10)  # type: ignore[attr-defined]
        delays = []
        for _ in range(samples):
            issued = await a.create_key(user)
            await a.authenticate(None, issued.key)
            started = time.perf_counter()
            await b_store.revoke_key(issued.record.id)
            while True:
                try:
                    await a.authenticate(None, issued.key)
                except AuthenticationError:
                    break
                await asyncio.sleep(0.0002)
            delays.append(time.perf_counter() - started)
        return delays
    finally:
        await a_store.close()
        await b_store.close()


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(
    args: argparse.Namespace,
) -> tuple[list[tuple[str, str, int, float, float, float]], list[float]]:
    """Rows: backend, target, concurrency, p50 us, p99 us, calls/s; and the revocation delays."""
    with tempfile.TemporaryDirectory() as data_dir, temporary_database(prefix="pocketllm_bench_") as url:
        stores = {"SQLite": open_store(data_dir), "PostgreSQL": open_store(url)}
        try:
            for store in stores.values():
                await store.open()
            keys = {name: await populate(store, args.keys) for name, store in stores.items()}
            plans = [
                (backend, name, call)
                for backend, store in stores.items()
                for name, call in targets(store).items()
            ]
            for backend, _, call in plans:  # warm-up: pools grown, statements prepared, caches filled
                await measure(call, keys[backend], 4 * args.keys, args.concurrency)
            samples: dict[tuple[str, str, int], list[float]] = {}
            walls: dict[tuple[str, str, int], float] = {}
            for round_ in range(args.rounds):
                order = plans if round_ % 2 == 0 else plans[::-1]
                for concurrency in (1, args.concurrency):
                    for backend, name, call in order:
                        started = time.perf_counter()
                        got = await measure(call, keys[backend], args.calls, concurrency)
                        slot = (backend, name, concurrency)
                        walls[slot] = walls.get(slot, 0.0) + time.perf_counter() - started
                        samples.setdefault(slot, []).extend(got)
                print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        finally:
            for store in stores.values():
                await store.close()
        delays = await propagation(url, args.revocations)
    return [
        (
            backend,
            name,
            conc,
            quantile(v, 0.5) * 1e6,
            quantile(v, 0.99) * 1e6,
            len(v) / walls[(backend, name, conc)],
        )
        for (backend, name, conc), v in samples.items()
    ], delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per target per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keys", type=int, default=100, help="distinct keys (users) called at random")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--revocations", type=int, default=50, help="revocations timed across replicas")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    rows, delays = asyncio.run(run(args))
    lines = [
        "| backend | target | callers | p50 us | p99 us | calls/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {b} | {t} | {c} | {p50:.0f} | {p99:.0f} | {rate:,.0f} |" for b, t, c, p50, p99, rate in rows
    ]
    by = {(b, t, c): p50 for b, t, c, p50, _, _ in rows}
    ratios = []
    for c in sorted({r[2] for r in rows}):
        pg, lite = by[("PostgreSQL", "uncached", c)], by[("SQLite", "uncached", c)]
        before = by[("PostgreSQL", "two lookups (before)", c)]
        cached = by[("PostgreSQL", "cached (2 s TTL)", c)]
        ratios.append(
            f"- {c} caller(s), p50: PostgreSQL / SQLite uncached **{pg / lite:.2f}x**; PostgreSQL one query / "
            f"two lookups **{pg / before:.2f}x**; PostgreSQL cached / uncached **{cached / pg:.3f}x**"
        )
    ratios.append(
        f"- a revocation on PostgreSQL replica B refused by replica A (key cached, 1 h TTL) after "
        f"p50 **{quantile(delays, 0.5) * 1000:.1f} ms**, p99 {quantile(delays, 0.99) * 1000:.1f} ms, "
        f"max {max(delays) * 1000:.1f} ms ({len(delays)} revocations; from the call on B, its round trip included)"
    )
    command = (
        f"python bench/store_auth.py --calls {args.calls} --rounds {args.rounds} --keys {args.keys} "
        f"--concurrency {args.concurrency} --revocations {args.revocations} --write"
    )
    text = (
        f"## Store-backed API-key authentication: SQLite vs PostgreSQL ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)\n\n"
        f"Command: `{command}`  \n"
        f"Machine: {os.cpu_count()} cores (shared); PostgreSQL {server_version()} on 127.0.0.1 (TCP), SQLite "
        f"WAL in a temporary directory; {args.keys} keys of {args.keys} users called at random; "
        f"latency of one `Authenticator.authenticate` call, {args.calls} calls per target per round x "
        f"{args.rounds} rounds, targets alternating.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(ratios)
        + "\n"
    )
    print(text)
    if args.write:
        results_file = ROOT / "bench" / "RESULTS.md"
        existing = results_file.read_text() if results_file.exists() else "# Benchmark results\n"
        results_file.write_text(existing.rstrip() + "\n\n" + text)


def server_version() -> str:
    """The PostgreSQL server's version."""
    import psycopg  # noqa: PLC0415

    from tests.postgres_support import SHARED_ADMIN_URL  # noqa: PLC0415

    with psycopg.connect(SHARED_ADMIN_URL) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "?"


if __name__ == "__main__":
    main()
