"""The gateway in front of llama.cpp's ``llama-server`` against that ``llama-server`` alone.

One ``llama-server`` (built from the llama.cpp llama-cpp-python vendors) runs the model; one
``pocketllm serve`` serves it as an upstream model. The same streaming load (greedy, EOS banned, fixed
max_tokens, fresh prompts of one shape, never repeated, since the llama-server and its prompt cache are
shared) goes to each in turn at every concurrency level, in interleaved rounds, so both see the same
machine. The table gives each side's tokens/s and TTFT, the tokens/s ratio (gateway / direct,
paired by round) and the TTFT the gateway adds (p50, p99). Writes (or replaces) its section in
bench/RESULTS.md with ``--write``; the section names the machine's load average, since on a shared
machine the numbers are noise.

    python bench/upstream.py [--concurrency 1,4,8] [--max-tokens 64] [--threads 2] [--slots 4] \
        [--requests-per-client 3] [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.build_llama_server import DEFAULT_CACHE, build  # noqa: E402
from bench.loadgen import PhaseResult, run_phase  # noqa: E402
from bench.run import MODEL_ID, credentials, free_port, merge, running, target_command  # noqa: E402
from engine.registry import ensure_model, load_registry  # noqa: E402

SECTION_TITLE = "## Upstream: gateway in front of llama-server vs llama-server alone"
GATEWAY_MODEL = "remote-smol"
NOISY = "; other work shared the machine: these numbers are noise until re-run on a quiet machine"


def gateway_config(upstream_base_url: str) -> str:
    """A TOML configuration whose only model is served by the one llama-server upstream."""
    return (
        "[[models]]\n"
        f'id = "{GATEWAY_MODEL}"\n'
        "[models.upstream]\n"
        f'urls = ["{upstream_base_url}/v1"]\n'
        f'model = "{MODEL_ID}"\n'
        # what is measured is the gateway's cost, not its timeouts: a queued request on a loaded machine
        # may wait long for its first token, as it does on llama-server alone
        "first_byte_timeout_s = 600.0\n"
        "idle_timeout_s = 600.0\n"
        "\n[queue]\nmax_queue = 1000\n"
        '\n[telemetry]\nlog_level = "WARNING"\n'
    )


def write_section(text: str) -> None:
    """Replace this benchmark's section of bench/RESULTS.md (or append it when there is none)."""
    results_file = ROOT / "bench" / "RESULTS.md"
    existing = results_file.read_text() if results_file.exists() else "# Benchmark results\n"
    lines = existing.rstrip("\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith(SECTION_TITLE)), None)
    if start is None:
        results_file.write_text(existing.rstrip() + "\n\n" + text)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    kept = "\n".join(lines[:start]).rstrip() + "\n\n" + text
    rest = "\n".join(lines[end:]).strip()
    results_file.write_text(kept + ("\n" + rest + "\n" if rest else ""))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--ctx-per-slot", type=int, default=1024)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; rows show the median")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    model = ensure_model(load_registry()[MODEL_ID], ROOT / "models" / f"{MODEL_ID}.gguf")
    levels = [int(c) for c in args.concurrency.split(",")]
    binary = build(args.cache, 2)
    load_before = os.getloadavg()
    names = ["llama-server", "gateway"]
    runs: dict[str, dict[int, list[PhaseResult]]] = {name: {level: [] for level in levels} for name in names}
    with contextlib.ExitStack() as stack:
        port = free_port()
        command, env, ready, _ = target_command(
            "llama-server", model, args.threads, args.slots, args.ctx_per_slot, port, binary
        )
        direct = stack.enter_context(running(command, env, port, ready))
        config = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pocketllm-bench-"))) / "up.toml"
        config.write_text(gateway_config(direct))
        gateway_port = free_port()
        gateway_env = dict(os.environ)
        gateway_env["POCKETLLM_DATA_DIR"] = str(config.parent)
        gateway = stack.enter_context(
            running(
                [
                    sys.executable,
                    "-m",
                    "gateway.cli",
                    "serve",
                    "--port",
                    str(gateway_port),
                    "--config",
                    str(config),
                ],
                gateway_env,
                gateway_port,
                "/health",
            )
        )
        endpoints = {
            "llama-server": (direct, MODEL_ID, {}),
            "gateway": (gateway, GATEWAY_MODEL, credentials("gateway", gateway)),
        }
        for name in names:  # warm-up: connections, the first prompt
            base_url, model_name, headers = endpoints[name]
            asyncio.run(run_phase(base_url, model_name, 1, 2, 16, offset=10_000, headers=headers))
        # Rounds interleave the targets, so a noisy minute on this shared machine hits both alike.
        for round_number in range(args.rounds):
            for level in levels:
                # fresh prompts in every round, level and target: both sides share one llama-server, whose
                # prompt cache would otherwise give the second side's prompts for free
                base_offset = 1000 * (round_number * len(levels) + levels.index(level))
                for name in names if round_number % 2 == 0 else reversed(names):
                    offset = base_offset + (500 if name == "gateway" else 0)
                    base_url, model_name, headers = endpoints[name]
                    total = level * args.requests_per_client
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
                        f"round {round_number + 1} {name:12} c={level}: {phase.tokens_per_s:6.1f} tok/s, "
                        f"TTFT p50 {ms(phase.pct('ttft', 50))} ms, complete {phase.complete}/{total}",
                        flush=True,
                    )
    load_after = os.getloadavg()
    results = {name: {level: merge(runs[name][level]) for level in levels} for name in names}

    lines = [
        "| concurrency | llama-server tok/s | gateway tok/s | **tokens/s ratio** (per round) "
        "| TTFT p50 ms (direct / gateway) | **TTFT p50 added ms** | TTFT p99 ms (direct / gateway) "
        "| TTFT p99 added ms | complete streams (direct / gateway) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        theirs, ours = results["llama-server"][level], results["gateway"][level]
        paired = [
            a.tokens_per_s / b.tokens_per_s
            for a, b in zip(runs["gateway"][level], runs["llama-server"][level], strict=True)
            if b.tokens_per_s
        ]
        lines.append(
            f"| {level} | {theirs.tokens_per_s:.1f} | {ours.tokens_per_s:.1f} | "
            f"**{ours.tokens_per_s / theirs.tokens_per_s:.3f}** ({' / '.join(f'{r:.3f}' for r in paired)}) | "
            f"{ms(theirs.pct('ttft', 50))} / {ms(ours.pct('ttft', 50))} | "
            f"**{(ours.pct('ttft', 50) - theirs.pct('ttft', 50)) * 1000:+.1f}** | "
            f"{ms(theirs.pct('ttft', 99))} / {ms(ours.pct('ttft', 99))} | "
            f"{(ours.pct('ttft', 99) - theirs.pct('ttft', 99)) * 1000:+.1f} | "
            f"{theirs.complete}/{len(theirs.results)} / {ours.complete}/{len(ours.results)} |"
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
        f"{SECTION_TITLE} ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)\n\n"
        f"Command: `python bench/upstream.py --concurrency {args.concurrency} --max-tokens {args.max_tokens} "
        f"--threads {args.threads} --slots {args.slots} --requests-per-client {args.requests_per_client} "
        f"--rounds {args.rounds} --write`  \n"
        f"Machine: {os.cpu_count()} cores, {cpu}; llama-cpp-python {llama_cpp.__version__} (llama-server built "
        f"from its vendored llama.cpp); one llama-server ({args.threads} threads, {args.slots} slots x "
        f"{args.ctx_per_slot} tokens) serves both sides, one after the other; the gateway reaches it over "
        f"loopback as the upstream model `{GATEWAY_MODEL}`; model {MODEL_ID} Q4_1; greedy, EOS banned, "
        f"{args.max_tokens} tokens per request, each client sends {args.requests_per_client} requests back "
        f"to back; rows: the median of {args.rounds} interleaved rounds (TTFT over every request).  \n"
        f"**Machine load** (1/5/15-min load average, {os.cpu_count()} cores): "
        f"{' / '.join(f'{v:.2f}' for v in load_before)} before the run (others' work), "
        f"{' / '.join(f'{v:.2f}' for v in load_after)} at its end (including its own)"
        f"{NOISY if load_before[0] > 0.5 else ''}."
        "\n\n" + "\n".join(lines) + "\n"
    )
    print()
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
