"""PostgreSQL for tests: a throw-away database on the shared server, and a server of our own to stop.

The shared server is the one on 127.0.0.1:5432 (trust auth, user ``postgres``). A test run makes a
database with a random name and drops it at the end. ``LocalPostgres`` runs a private server from the
Debian binaries (``/usr/lib/postgresql/<version>/bin``) on a spare port, so a test can stop and restart it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg

SHARED_ADMIN_URL = os.environ.get("POCKETLLM_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def unreachable_reason(admin_url: str = SHARED_ADMIN_URL) -> str | None:
    """Why the server cannot be used (None when it can)."""
    try:
        with psycopg.connect(admin_url, connect_timeout=3):
            return None
    except psycopg.OperationalError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"PostgreSQL is not reachable at {admin_url}: {first_line}"


def with_database(admin_url: str, dbname: str) -> str:
    """``admin_url`` (no query string) pointed at another database."""
    return f"{admin_url.rsplit('/', 1)[0]}/{dbname}"


@contextlib.contextmanager
def temporary_database(admin_url: str = SHARED_ADMIN_URL, prefix: str = "pocketllm_test_") -> Iterator[str]:
    """A new database with a random name; yields its URL and drops it (connections and all) afterwards."""
    name = prefix + uuid.uuid4().hex[:12]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_schema(database_url: str, name: str) -> str:
    """A new schema in the database; the URL whose connections use it as their search path."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    return database_url + "?options=" + quote(f"-csearch_path={name}")


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL binary directory, or None when the server package is missing."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalPostgres:
    """A private PostgreSQL server (``initdb`` + ``pg_ctl``) on a spare loopback port.

    PostgreSQL refuses to run as root; as root the server runs as the ``postgres`` system user.
    """

    def __init__(self, bin_dir: Path) -> None:
        """Initialise a data directory (trust auth on loopback, fsync off: a test server)."""
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pocketllm-pg-"))
        self.data = self.root / "data"
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} -F"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients; ``immediate``: like a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop the server if it runs and delete its files."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
