"""``pocketllm users`` and ``pocketllm keys`` against a data directory, then used by a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _cli(data_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCKETLLM_", "MODEL_"))}
    env.update(POCKETLLM_DATA_DIR=str(data_dir), POCKETLLM_AUTH__SCRYPT_N=str(2**14))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_users_and_keys_commands(tmp_path: Path) -> None:
    created = _cli(
        tmp_path, "users", "create", "erin", "--role", "admin", "--password-stdin", stdin="erin-password\n"
    )
    assert created.returncode == 0, created.stderr
    assert "created admin erin" in created.stdout
    assert (
        _cli(tmp_path, "users", "create", "erin", "--password-stdin", stdin="another-pass\n").returncode == 1
    )
    listed = _cli(tmp_path, "users", "list")
    assert "erin" in listed.stdout and "admin" in listed.stdout
    key = _cli(tmp_path, "keys", "create", "erin", "--scope", "inference", "--scope", "admin")
    assert key.returncode == 0, key.stderr
    full_key = key.stdout.strip().splitlines()[-1]
    assert full_key.startswith("sk-pl-")
    key_id = key.stdout.split()[2]
    keys = _cli(tmp_path, "keys", "list")
    assert (
        f"sk-pl-...{full_key[-4:]}" in keys.stdout and full_key not in keys.stdout and "active" in keys.stdout
    )
    assert _cli(tmp_path, "keys", "revoke", key_id).returncode == 0
    assert "revoked" in _cli(tmp_path, "keys", "list").stdout
    last = _cli(tmp_path, "users", "disable", "erin")  # the only admin: nobody could enable anyone again
    assert last.returncode == 1 and "last enabled admin" in last.stdout
    assert (
        _cli(
            tmp_path, "users", "create", "fay", "--role", "admin", "--password-stdin", stdin="fay-password\n"
        ).returncode
        == 0
    )
    assert _cli(tmp_path, "users", "disable", "erin").returncode == 0
    assert "disabled" in _cli(tmp_path, "users", "list").stdout
    assert _cli(tmp_path, "users", "enable", "erin").returncode == 0
    assert "disabled" not in _cli(tmp_path, "users", "list").stdout
    changed = _cli(tmp_path, "users", "password", "erin", "--password-stdin", stdin="erin-new-password\n")
    assert changed.returncode == 0 and "older tokens are refused" in changed.stdout
    assert full_key not in (tmp_path / "pocketllm.sqlite3").read_bytes().decode("latin-1")
