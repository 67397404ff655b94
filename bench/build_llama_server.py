"""Build llama.cpp's ``llama-server`` from the llama.cpp that the installed llama-cpp-python vendors.

The source distribution of the same llama-cpp-python version comes from the package index through
``pip download`` (pip's own configuration applies); its ``vendor/llama.cpp`` is built with cmake into a
cache directory keyed by the version, and reused on later runs. Prints the binary's path.

Two runs at once (two test sessions, a benchmark and CI) are safe: the second waits on a lock file next to
the cache directory and then finds the binary the first built. A build that cannot be done exits 1 with one
line saying why (``llama-server could not be built: ...``) and the tail of the build log.

    python bench/build_llama_server.py [--cache DIR] [--jobs 2]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "pocketllm"
LOG_TAIL_LINES = 30


class BuildError(RuntimeError):
    """``llama-server`` cannot be built here; the message says why in one line (plus a log tail)."""


def binary_path(cache: Path = DEFAULT_CACHE) -> Path:
    """Where the ``llama-server`` for the installed llama-cpp-python is (or will be) built."""
    return _root(cache) / "build" / "bin" / "llama-server"


def _root(cache: Path) -> Path:
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError as exc:
        raise BuildError(
            "llama-cpp-python is not installed (its version names the llama.cpp to build)"
        ) from exc
    return cache / f"llama-server-{version}"


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (waiting, and saying so, while another build holds it)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another build holds {lock_file}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(step: str, argv: list[str], log: Path) -> None:
    """Run one build step with its output appended to ``log``; a failure raises ``BuildError``."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        try:
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
        except OSError as exc:
            raise BuildError(f"{step}: cannot run {argv[0]} ({exc})") from exc
    if result.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        raise BuildError(
            f"{step} failed (exit {result.returncode}); full log: {log}\n"
            + "\n".join(f"  | {t}" for t in tail)
        )


def _check_tools() -> None:
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    if not any(shutil.which(compiler) for compiler in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (c++, g++ or clang++)")
    if missing:
        raise BuildError(f"{' and '.join(missing)} not found on PATH (on Debian: apt-get install cmake g++)")


def _fetch_source(source: Path, version: str, log: Path) -> None:
    """Extract llama-cpp-python's ``vendor/llama.cpp`` into ``source`` (complete, or not at all)."""
    with tempfile.TemporaryDirectory() as scratch:
        _run(
            f"pip download llama-cpp-python=={version} (source distribution)",
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--disable-pip-version-check",
                "--dest",
                scratch,
                f"llama-cpp-python=={version}",
            ],
            log,
        )
        archive = next(Path(scratch).glob("llama_cpp_python-*.tar.gz"), None)
        if archive is None:
            raise BuildError(f"pip download gave no llama_cpp_python-*.tar.gz source archive; see {log}")
        prefix = f"{archive.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        partial = source.with_name(source.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(partial, members=[m for m in members if m.name], filter="data")
        if not (partial / "CMakeLists.txt").exists():
            raise BuildError(f"{archive.name} holds no vendor/llama.cpp/CMakeLists.txt")
        shutil.rmtree(source, ignore_errors=True)
        partial.rename(source)


def last_failure(cache: Path = DEFAULT_CACHE) -> str | None:
    """Why the last build in ``cache`` failed, if it did (cleared by a build that succeeds)."""
    try:
        return _failure_file(_root(cache)).read_text()
    except BuildError as exc:
        return str(exc)
    except OSError:
        return None


def _failure_file(root: Path) -> Path:
    return root.with_name(root.name + ".failed")


def build(cache: Path = DEFAULT_CACHE, jobs: int = 2) -> Path:
    """Return the path of a ``llama-server`` built from the installed llama-cpp-python's llama.cpp.

    Raises:
        BuildError: it cannot be built here (the message says why; ``last_failure`` keeps it).
    """
    root = _root(cache)
    binary = root / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    with _locked(root.with_name(root.name + ".lock")):
        if binary.exists():  # built by the run we waited for
            return binary
        try:
            _build(root, jobs)
        except BuildError as exc:
            _failure_file(root).write_text(str(exc))
            raise
        _failure_file(root).unlink(missing_ok=True)
        return binary


def _build(root: Path, jobs: int) -> None:
    binary = root / "build" / "bin" / "llama-server"
    _check_tools()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    log.write_text(f"building llama-server into {root} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    print(f"building llama-server into {root} (log: {log})", file=sys.stderr, flush=True)
    source = root / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        _fetch_source(source, root.name.removeprefix("llama-server-"), log)
    _run(
        "cmake configure",
        [
            "cmake",
            "-S",
            str(source),
            "-B",
            str(root / "build"),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_TOOLS=ON",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_APP=OFF",
            "-DLLAMA_BUILD_UI=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DGGML_NATIVE=ON",
            "-DBUILD_SHARED_LIBS=OFF",
        ],
        log,
    )
    _run(
        "cmake build",
        ["cmake", "--build", str(root / "build"), "--target", "llama-server", "-j", str(jobs)],
        log,
    )
    if not binary.exists():
        raise BuildError(f"the build finished but {binary} is missing; see {log}")


def main() -> None:
    """Build (or find) llama-server and print its path; exit 1 with the reason when it cannot be built."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    try:
        print(build(args.cache, args.jobs))
    except BuildError as exc:
        print(f"llama-server could not be built: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
