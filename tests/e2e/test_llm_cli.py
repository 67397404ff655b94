"""A third client that speaks the OpenAI API: Simon Willison's ``llm`` CLI, configured for the gateway
as an OpenAI-compatible model (its ``extra-openai-models.yaml``), streaming and not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.conftest import MODEL_ID

pytestmark = pytest.mark.e2e

PROMPT = "Name three fruits."


def _llm(tmp_path: Path, base_url: str, key: str, *args: str) -> str:
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: pocket\n  model_name: {MODEL_ID}\n  api_base: {base_url}/v1\n  api_key_name: pocket\n"
    )
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "llm", "prompt", "-m", "pocket", "--key", key, *args, PROMPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.rstrip("\n")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_llm_cli_gets_the_same_greedy_answer_as_the_sdk(
    server: tuple[str, str], tmp_path: Path, stream: bool
) -> None:
    base_url, key = server
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
    expected = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12,
        temperature=0,
    )
    answer = expected.choices[0].message.content
    assert answer
    options = ["-o", "temperature", "0", "-o", "max_tokens", "12"]
    text = _llm(tmp_path, base_url, key, *options, *([] if stream else ["--no-stream"]))
    assert text == answer.rstrip("\n")
