"""Single-stream tokens/s and TTFT: the gateway (HTTP + SSE) against in-process llama-cpp-python.

Same GGUF, same threads, same prompts, greedy decoding, end-of-sequence tokens banned so every run
produces exactly ``--max-tokens`` tokens. Runs alternate between the two targets so machine noise
hits both alike; each run uses a fresh prompt (a nonce) so no target benefits from a cached prefix.

    python bench/gateway_vs_inprocess.py [--runs 6] [--max-tokens 128] [--threads 2] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.registry import ensure_model, load_registry  # noqa: E402

MODEL_ID = "smollm2-135m-instruct"
NO_EOS = {"0": -100.0, "1": -100.0, "2": -100.0}
TOPICS = [
    "the sea",
    "a lighthouse",
    "winter",
    "a small town",
    "the moon",
    "a train journey",
    "a garden",
    "an old library",
    "the desert",
    "a thunderstorm",
    "a market",
    "the mountains",
]


def _prompt(run: int) -> str:
    return f"Run {run}: write a long, detailed story about {TOPICS[run % len(TOPICS)]}."


def bench_inprocess(
    model: Path, threads: int, prompts: list[str], max_tokens: int
) -> list[tuple[float, float]]:
    """(ttft_s, tokens_per_s) per prompt, llama-cpp-python's own streaming chat completion."""
    from llama_cpp import Llama  # noqa: PLC0415

    import engine.llamacpp  # noqa: F401, PLC0415  # the gateway's model defaults (engine/llamacpp/cpu.py)

    llm = Llama(str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    bias = {int(k): v for k, v in NO_EOS.items()}
    out = []
    for prompt in prompts:
        started = time.perf_counter()
        first = None
        tokens = 0
        stream = llm.create_chat_completion(
            [{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            logit_bias=bias,
        )
        for chunk in stream:
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                tokens += 1
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        out.append((first - started, max_tokens / (end - started)))
    llm.close()
    return out


def bench_gateway(
    base_url: str, prompts: list[str], max_tokens: int, headers: dict[str, str]
) -> list[tuple[float, float, int]]:
    """(ttft_s, tokens_per_s, completion_tokens) per prompt, through HTTP and SSE."""
    out = []
    with httpx.Client(base_url=base_url, timeout=300, headers=headers) as http:
        for prompt in prompts:
            body = {
                "model": MODEL_ID,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "logit_bias": NO_EOS,
            }
            started = time.perf_counter()
            first = None
            usage = 0
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        usage = chunk["usage"]["completion_tokens"]
            end = time.perf_counter()
            assert first is not None
            out.append((first - started, usage / (end - started), usage))
    return out


def start_gateway(model: Path, threads: int, port: int) -> subprocess.Popen[bytes]:
    """``pocketllm serve`` with one slot on ``model``."""
    env = {
        **os.environ,
        "POCKETLLM_DATA_DIR": tempfile.mkdtemp(prefix="pocketllm-bench-"),
        "MODEL_PATH": str(model),
        "MODEL_N_THREADS": str(threads),
        "MODEL_SLOTS": "1",
        "MODEL_N_CTX": "2048",
        "POCKETLLM_TELEMETRY__LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the gateway did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8391)
    parser.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    entry = load_registry()[MODEL_ID]
    model = ensure_model(entry, ROOT / "models" / f"{MODEL_ID}.gguf")
    gateway = start_gateway(model, args.threads, args.port)
    base_url = f"http://127.0.0.1:{args.port}"
    from bench.run import credentials  # noqa: PLC0415 - bench/run.py imports this module's siblings

    headers = credentials("gateway", base_url)
    inproc: list[tuple[float, float]] = []
    through: list[tuple[float, float, int]] = []
    try:
        bench_gateway(base_url, ["warm-up"], 16, headers)
        bench_inprocess(model, args.threads, ["warm-up"], 16)
        for run in range(args.runs):
            prompt = _prompt(run)
            if run % 2:
                through += bench_gateway(base_url, [prompt], args.max_tokens, headers)
                inproc += bench_inprocess(model, args.threads, [prompt], args.max_tokens)
            else:
                inproc += bench_inprocess(model, args.threads, [prompt], args.max_tokens)
                through += bench_gateway(base_url, [prompt], args.max_tokens, headers)
    finally:
        gateway.terminate()
        gateway.wait(30)
    assert all(t[2] == args.max_tokens for t in through), "a gateway stream was cut short"

    med_in_tps = statistics.median(t for _, t in inproc)
    med_gw_tps = statistics.median(t for _, t, _ in through)
    med_in_ttft = statistics.median(t for t, _ in inproc) * 1000
    med_gw_ttft = statistics.median(t for t, _, _ in through) * 1000
    table = "\n".join(
        [
            "| target | tokens/s (median) | TTFT ms (median) | runs |",
            "|---|---|---|---|",
            f"| in-process llama-cpp-python | {med_in_tps:.1f} | {med_in_ttft:.1f} | {len(inproc)} |",
            f"| gateway (HTTP + SSE, 1 slot) | {med_gw_tps:.1f} | {med_gw_ttft:.1f} | {len(through)} |",
            f"| ratio gateway / in-process | **{med_gw_tps / med_in_tps:.3f}x** | {med_gw_ttft / med_in_ttft:.2f}x | |",
        ]
    )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    header = (
        f"## Single stream: gateway vs in-process ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)\n\n"
        f"Command: `python bench/gateway_vs_inprocess.py --runs {args.runs} --max-tokens {args.max_tokens} "
        f"--threads {args.threads} --write`  \n"
        f"Machine: {os.cpu_count()} cores, {cpu}; llama-cpp-python "
        f"{__import__('llama_cpp').__version__}; model {MODEL_ID} (Q4_1); greedy, EOS banned, "
        f"{args.max_tokens} tokens per run, fresh prompt per run, targets alternating.\n"
    )
    print(header)
    print(table)
    print(
        "\nper run (ttft ms, tok/s): in-process",
        [(round(a * 1000), round(b, 1)) for a, b in inproc],
        "gateway",
        [(round(a * 1000), round(b, 1)) for a, b, _ in through],
    )
    if args.write:
        results = ROOT / "bench" / "RESULTS.md"
        existing = results.read_text() if results.exists() else "# Benchmark results\n\n"
        results.write_text(existing.rstrip() + "\n\n" + header + "\n" + table + "\n")


if __name__ == "__main__":
    main()
