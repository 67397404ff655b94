"""Build llama.cpp's ``llama-server`` from the llama.cpp that the installed llama-cpp-python vendors.

The source distribution of the same llama-cpp-python version comes from the package index through
``pip download`` (pip's own configuration applies); its ``vendor/llama.cpp`` is built with cmake into a
cache directory keyed by the version, and reused on later runs. Prints the binary's path.

    python bench/build_llama_server.py [--cache DIR] [--jobs 2]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "pocketllm"


def build(cache: Path, jobs: int) -> Path:
    """Return the path of a ``llama-server`` built from the installed llama-cpp-python's llama.cpp."""
    version = importlib.metadata.version("llama-cpp-python")
    root = cache / f"llama-server-{version}"
    binary = root / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    source = root / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run(
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
                check=True,
            )
            archive = next(Path(scratch).glob("llama_cpp_python-*.tar.gz"))
            prefix = f"{archive.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
                for member in members:
                    member.name = member.name[len(prefix) :]
                tar.extractall(source, members=[m for m in members if m.name], filter="data")
    subprocess.run(
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
        check=True,
    )
    subprocess.run(
        ["cmake", "--build", str(root / "build"), "--target", "llama-server", "-j", str(jobs)], check=True
    )
    if not binary.exists():
        raise SystemExit(f"the build finished but {binary} is missing")
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    print(build(args.cache, args.jobs))


if __name__ == "__main__":
    main()
