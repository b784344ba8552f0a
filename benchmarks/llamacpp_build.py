"""llama.cpp's tools and Python bindings, built from the ``llama-cpp-python`` sdist on PyPI, for
benchmarks that let llama.cpp judge GGUF files (``benchmarks/gguf_judge.py``).

The sdist vendors llama.cpp (``vendor/llama.cpp``: the C++ sources, ``convert_hf_to_gguf.py``
and ``gguf-py``), so one download from PyPI gives both the tools and the bindings at the same
llama.cpp commit. Each step is skipped when what it makes is already there and works:

1. ``pip download --no-binary :all: --no-deps llama-cpp-python`` into ``DEST/sdist``, extracted
   under ``DEST/src``;
2. cmake (CPU only, Release, ``GGML_NATIVE=ON``, no tests, examples, server or network code) into
   ``DEST/build``, building only ``llama-perplexity``, ``llama-quantize`` and ``llama-imatrix``
   (``llama-cli`` is left out: it links the whole server);
3. ``DEST/venv`` (python3.11): the bindings from the same sdist (``pip install SDIST``, their own
   copy of llama.cpp compiled by scikit-build-core, without the multimodal library), the vendored
   ``gguf-py``, and what ``convert_hf_to_gguf.py`` imports: torch 2.13.0 (the CPU wheel on this
   disk; a CUDA build is an error), transformers, numpy, sentencepiece.

Prints the llama.cpp commit, the binaries' paths and each step's seconds (also kept in
``DEST/build.json``).

    python benchmarks/llamacpp_build.py [--dest /work/llamacpp]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

DEFAULT_DEST = Path("/work/llamacpp")
TOOLS = ("llama-perplexity", "llama-quantize", "llama-imatrix")
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",  # the tools read local files only
]
# the bindings' own build: the same CPU options, no multimodal (llava / mtmd) library
BINDINGS_CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF"
TORCH = "torch==2.13.0"
CONVERT_PACKAGES = ["numpy", "sentencepiece", "transformers"]
JOBS = "2"


def run(cmd: list, log: Path, env: dict | None = None, cwd: Path | None = None) -> None:
    """``cmd`` with its output in ``log``; a failure raises with the log's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False)
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}); its log {log} ends:\n{tail}")


def works(cmd: list) -> bool:
    return subprocess.run([str(c) for c in cmd], capture_output=True, check=False).returncode == 0


def tool_runs(binary: Path) -> bool:
    """``binary --version`` loads its libraries and answers (llama-quantize answers with its usage and exit 1)."""
    if not binary.is_file():
        return False
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    return proc.returncode in (0, 1) and re.search(r"^(version|usage):", proc.stdout + proc.stderr, re.M) is not None


def fetch_sdist(dest: Path) -> Path:
    """The ``llama-cpp-python`` sdist in ``DEST/sdist`` (downloaded when none is there)."""
    found = sorted((dest / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if not found:
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "llama-cpp-python", "-d", dest / "sdist"], dest / "logs" / "download.log")
        found = sorted((dest / "sdist").glob("llama_cpp_python-*.tar.gz"))
    return found[-1]


def extract(sdist: Path, dest: Path) -> Path:
    """The sdist's tree under ``DEST/src`` (extracted when its vendored llama.cpp is missing)."""
    tree = dest / "src" / sdist.name.removesuffix(".tar.gz")
    if not (tree / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        shutil.rmtree(tree, ignore_errors=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(dest / "src", filter="data")
    return tree


def llamacpp_commit(tree: Path) -> str:
    """The llama.cpp commit the sdist vendors: its changelog's newest "update llama.cpp to ...@HASH"
    (the sdist has no git history, so llama.cpp's own build info cannot know it)."""
    found = re.search(r"llama\.cpp@([0-9a-f]{7,40})", (tree / "CHANGELOG.md").read_text())
    return found.group(1) if found else "unknown"


def build_tools(llama: Path, build: Path, commit: str, log: Path) -> dict[str, Path]:
    """``TOOLS`` built into ``BUILD/bin`` (configured and built when one does not run)."""
    binaries = {name: build / "bin" / name for name in TOOLS}
    if all(tool_runs(b) for b in binaries.values()):
        return binaries
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(["cmake", "-S", llama, "-B", build, *generator, *CMAKE_OPTIONS, f"-DLLAMA_BUILD_COMMIT={commit}"], log)
    run(["cmake", "--build", build, "--config", "Release", "-j", JOBS, "--target", *TOOLS], log)
    return binaries


def build_venv(venv: Path, sdist: Path, gguf_py: Path, log: Path) -> tuple[Path, dict[str, float]]:
    """``DEST/venv`` with the bindings, ``gguf-py`` and the converter's imports; returns its python
    and the seconds of each install (the bindings' wheel build is the long one)."""
    python = venv / "bin" / "python"
    seconds: dict[str, float] = {}
    if python.is_file() and works([python, "-c", "import llama_cpp, gguf, torch, transformers, sentencepiece"]):
        return python, seconds
    if not python.is_file():
        run(["python3.11", "-m", "venv", venv], log)
    pip = [python, "-m", "pip", "install"]
    # torch first and alone: ==2.13.0 takes the local +cpu wheel, and the check below refuses any other
    start = time.perf_counter()
    run([*pip, TORCH], log)
    run([python, "-c", "import torch, sys; sys.exit(torch.version.cuda is not None)"], log)
    run([*pip, *CONVERT_PACKAGES, "-e", gguf_py], log)
    seconds["venv packages"] = time.perf_counter() - start
    env = {**os.environ, "CMAKE_ARGS": BINDINGS_CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": JOBS}
    start = time.perf_counter()
    run([*pip, "--no-cache-dir", sdist], log, env=env)  # no cached wheel: the build is what we time
    seconds["bindings wheel"] = time.perf_counter() - start
    return python, seconds


def version_line(binary: Path) -> str:
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("version")]
    return lines[0] if lines else "?"


def build(dest: Path = DEFAULT_DEST) -> dict:
    """Everything above, idempotently. Returns the paths (``bin``, one per tool, ``python``,
    ``convert``, ``gguf_py``), ``commit``, ``version`` and ``seconds`` per step."""
    dest = dest.resolve()
    seconds: dict[str, float] = {}

    def step(name: str, fn, *args):
        start = time.perf_counter()
        value = fn(*args)
        seconds[name] = time.perf_counter() - start
        return value

    sdist = step("download sdist", fetch_sdist, dest)
    tree = step("extract", extract, sdist, dest)
    llama = tree / "vendor" / "llama.cpp"
    commit = llamacpp_commit(tree)
    tools = step("build tools", build_tools, llama, dest / "build", commit, dest / "logs" / "tools.log")
    python, installs = step("venv", build_venv, dest / "venv", sdist, llama / "gguf-py", dest / "logs" / "venv.log")
    seconds.update(installs)
    info = {
        "sdist": str(sdist),
        "commit": commit,
        "version": version_line(tools["llama-perplexity"]),
        "bin": str(dest / "build" / "bin"),
        **{name: str(path) for name, path in tools.items()},
        "python": str(python),
        "convert": str(llama / "convert_hf_to_gguf.py"),
        "gguf_py": str(llama / "gguf-py"),
        "seconds": seconds,
    }
    record = dest / "build.json"
    previous = json.loads(record.read_text()) if record.is_file() else {}
    # a step skipped now took ~0 s: keep the times of the run that did the work
    kept = {k: v for k, v in previous.get("seconds", {}).items() if v > seconds.get(k, 0)}
    record.write_text(json.dumps({**info, "seconds": {**seconds, **kept}}, indent=1))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    args = ap.parse_args()
    info = build(args.dest)
    print(f"llama-cpp-python sdist: {info['sdist']}")
    print(f"llama.cpp commit {info['commit']} ({info['version']})")
    for name in (*TOOLS, "python", "convert"):
        print(f"{name:>16}: {info[name]}")
    recorded = json.loads((args.dest.resolve() / "build.json").read_text())["seconds"]
    print("seconds this run: " + ", ".join(f"{k} {v:.0f}" for k, v in info["seconds"].items()))
    print("seconds of the runs that did each step: " + ", ".join(f"{k} {v:.0f}" for k, v in recorded.items()))


if __name__ == "__main__":
    main()
