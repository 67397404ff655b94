"""The gateway against llama.cpp's ``llama-server`` and llama-cpp-python's server, side by side.

Same GGUF, same threads, same slots (llama-server ``-np``; the gateway's ``MODEL_SLOTS``; llama-cpp-python's
server has one), same per-slot context, same streaming load (greedy, EOS banned, fixed max_tokens) at each
concurrency level. Targets run one after another on the same machine; the table's ratios compare them
within this one run. Writes a section to bench/RESULTS.md with ``--write``.

    python bench/run.py [--concurrency 1,4,8] [--max-tokens 128] [--threads 2] [--slots 4] \
        [--requests-per-client 3] [--targets gateway,llama-server,llama-cpp-python] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.build_llama_server import DEFAULT_CACHE, build  # noqa: E402
from bench.loadgen import PhaseResult, run_phase  # noqa: E402
from engine.llamacpp.cpu import weight_repack  # noqa: E402
from engine.registry import ensure_model, load_registry  # noqa: E402

MODEL_ID = "smollm2-135m-instruct"
DEFAULT_TARGETS = "gateway,llama-server,llama-cpp-python"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], port: int, ready_path: str) -> Iterator[str]:
    """Start a server, wait until ``ready_path`` answers 200, stop it afterwards."""
    with running_process(command, env, port, ready_path) as (base_url, _):
        yield base_url


@contextlib.contextmanager
def running_process(
    command: list[str], env: dict[str, str], port: int, ready_path: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``running``, also yielding the server's process."""
    log = open(ROOT / "bench" / f".server-{port}.log", "w")
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{command[0]} exited early; see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base_url + ready_path, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{command[0]} never became ready")
            time.sleep(0.3)
        yield base_url, process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        Path(log.name).unlink(missing_ok=True)


def target_command(
    name: str, model: Path, threads: int, slots: int, ctx_per_slot: int, port: int, server_binary: Path | None
) -> tuple[list[str], dict[str, str], str, str]:
    """(argv, env, readiness path, model name to send) for a target."""
    env = dict(os.environ)
    if name == "gateway":
        env.update(
            {
                "POCKETLLM_DATA_DIR": tempfile.mkdtemp(prefix="pocketllm-bench-"),
                "MODEL_PATH": str(model),
                "MODEL_N_THREADS": str(threads),
                "MODEL_SLOTS": str(slots),
                "MODEL_N_CTX": str(ctx_per_slot * slots),
                "POCKETLLM_TELEMETRY__LOG_LEVEL": "WARNING",
                "POCKETLLM_QUEUE__MAX_QUEUE": "1000",
            }
        )
        return ([sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)], env, "/health", MODEL_ID)
    if name == "llama-server":
        assert server_binary is not None
        return (
            [
                str(server_binary),
                "-m",
                str(model),
                "-t",
                str(threads),
                "-tb",
                str(threads),
                "-np",
                str(slots),
                "-c",
                str(ctx_per_slot * slots),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-webui",
                # the same kernels as the gateway: no repacking where ggml's AMX kernels would crash
                *([] if weight_repack() else ["--no-repack"]),
            ],
            env,
            "/health",
            MODEL_ID,
        )
    if name == "llama-cpp-python":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return (
            [
                sys.executable,
                "-c",
                # llama-cpp-python's server on the model defaults the gateway uses (see engine/llamacpp/cpu.py)
                "import runpy, engine.llamacpp; runpy.run_module('llama_cpp.server', run_name='__main__')",
                "--model",
                str(model),
                "--n_threads",
                str(threads),
                "--n_threads_batch",
                str(threads),
                "--n_ctx",
                str(ctx_per_slot),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--model_alias",
                MODEL_ID,
            ],
            env,
            "/v1/models",
            MODEL_ID,
        )
    raise SystemExit(f"unknown target {name}")


def merge(phases: list[PhaseResult]) -> PhaseResult:
    """One row from several rounds: the median round's tokens/s, latencies over every request."""
    ordered = sorted(phases, key=lambda p: p.tokens_per_s)
    median = ordered[len(ordered) // 2]
    merged = PhaseResult(median.concurrency, median.wall)
    merged.results = [r for p in phases for r in p.results]
    merged.tokens_override = median.tokens
    return merged


def credentials(name: str, base_url: str) -> dict[str, str]:
    """Request headers a target needs: the gateway wants an API key (made here through its admin route)."""
    if name != "gateway":
        return {}
    token = httpx.post(
        f"{base_url}/auth/login", json={"username": "admin", "password": "admin123"}, timeout=30
    ).json()["access_token"]
    key = httpx.post(
        f"{base_url}/admin/keys",
        json={"username": "user1"},
        timeout=30,
        headers={"Authorization": f"Bearer {token}"},
    ).json()["key"]
    return {"Authorization": f"Bearer {key}"}


def row(name: str, phase: PhaseResult, requests: int) -> list[str]:
    return [
        name,
        str(phase.concurrency),
        f"{phase.tokens_per_s:.1f}",
        f"{phase.pct('ttft', 50) * 1000:.0f}",
        f"{phase.pct('ttft', 99) * 1000:.0f}",
        f"{phase.pct('e2e', 50):.2f}",
        f"{phase.pct('e2e', 99):.2f}",
        f"{phase.complete}/{requests}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--ctx-per-slot", type=int, default=2048)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; rows show the median round"
    )
    parser.add_argument("--targets", default=DEFAULT_TARGETS)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    model = ensure_model(load_registry()[MODEL_ID], ROOT / "models" / f"{MODEL_ID}.gguf")
    targets = args.targets.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    server_binary = build(args.cache, 2) if "llama-server" in targets else None
    runs: dict[str, dict[int, list[PhaseResult]]] = {
        name: {level: [] for level in levels} for name in targets
    }
    with contextlib.ExitStack() as stack:
        endpoints = {}
        for name in targets:
            port = free_port()
            command, env, ready, model_name = target_command(
                name, model, args.threads, args.slots, args.ctx_per_slot, port, server_binary
            )
            base_url = stack.enter_context(running(command, env, port, ready))
            headers = credentials(name, base_url)
            asyncio.run(run_phase(base_url, model_name, 1, 2, 16, offset=10_000, headers=headers))  # warm-up
            endpoints[name] = (base_url, model_name, headers)
        # Rounds interleave the targets, so a noisy minute on this shared machine hits them all alike.
        for round_number in range(args.rounds):
            for level in levels:
                for name in targets:
                    base_url, model_name, headers = endpoints[name]
                    total = level * args.requests_per_client
                    # fresh prompts in every round and level: no target can answer from a prompt cache
                    offset = 1000 * (round_number * len(levels) + levels.index(level))
                    phase = asyncio.run(
                        run_phase(
                            base_url,
                            model_name,
                            level,
                            total,
                            args.max_tokens,
                            offset=offset,
                            headers=headers,
                        )
                    )
                    runs[name][level].append(phase)
                    print(
                        f"round {round_number + 1} {name:18} c={level}: {phase.tokens_per_s:6.1f} tok/s, "
                        f"TTFT p50 {phase.pct('ttft', 50) * 1000:.0f} ms, complete {phase.complete}/{total}",
                        flush=True,
                    )
    results = {name: [merge(runs[name][level]) for level in levels] for name in targets}

    header = [
        "target",
        "concurrency",
        "tokens/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "e2e p50 s",
        "e2e p99 s",
        "complete streams",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in targets:
        for phase in results[name]:
            lines.append("| " + " | ".join(row(name, phase, len(phase.results))) + " |")
    if "gateway" in results and "llama-server" in results:
        lines += [
            "",
            "| concurrency | gateway / llama-server tokens/s | gateway / llama-server TTFT p50 "
            "| tokens/s ratio per round |",
            "|---|---|---|---|",
        ]
        for ours, theirs in zip(results["gateway"], results["llama-server"], strict=True):
            # each round ran both targets back to back: its ratio is a paired comparison
            paired = [
                a.tokens_per_s / b.tokens_per_s
                for a, b in zip(
                    runs["gateway"][ours.concurrency], runs["llama-server"][ours.concurrency], strict=True
                )
            ]
            lines.append(
                f"| {ours.concurrency} | **{ours.tokens_per_s / theirs.tokens_per_s:.2f}x** | "
                f"{ours.pct('ttft', 50) / theirs.pct('ttft', 50):.2f}x | "
                f"{' / '.join(f'{r:.2f}' for r in paired)} |"
            )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import llama_cpp  # noqa: PLC0415

    text = (
        f"## Concurrency: gateway vs llama-server vs llama-cpp-python's server "
        f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)\n\n"
        f"Command: `python bench/run.py --concurrency {args.concurrency} --max-tokens {args.max_tokens} "
        f"--threads {args.threads} --slots {args.slots} --requests-per-client {args.requests_per_client} "
        f"--rounds {args.rounds} "
        f"{'' if args.targets == DEFAULT_TARGETS else f'--targets {args.targets} '}"
        f"--write`  \nMachine: {os.cpu_count()} cores, {cpu}; llama-cpp-python {llama_cpp.__version__} "
        f"(llama-server built from its vendored llama.cpp); weight repacking "
        f"{'on' if weight_repack() else 'off (ggml built with AMX)'}; model {MODEL_ID} Q4_1; {args.slots} slots x "
        f"{args.ctx_per_slot} tokens ({'llama-cpp-python server: 1 slot' if 'llama-cpp-python' in targets else ''}); "
        f"greedy, EOS banned, {args.max_tokens} tokens per request, each client sends "
        f"{args.requests_per_client} requests back to back.\n\n" + "\n".join(lines) + "\n"
    )
    print()
    print(text)
    if args.write:
        results_file = ROOT / "bench" / "RESULTS.md"
        existing = results_file.read_text() if results_file.exists() else "# Benchmark results\n"
        results_file.write_text(existing.rstrip() + "\n\n" + text)


if __name__ == "__main__":
    main()
