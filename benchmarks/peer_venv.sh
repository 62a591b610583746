#!/usr/bin/env bash
# Create benchmarks/.venv-peer: llm-compressor 0.14.0.1 in its OWN virtual environment.
# llm-compressor is never a dependency of llmpress; only benchmarks/gptq_vs_peer.py uses it,
# by running a child process with this environment's python.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${PEER_VENV:-$here/.venv-peer}"
py="${PY:-python3}"
stamp="$venv/.installed-llmcompressor-0.14.0.1"
if [ -f "$stamp" ]; then
  echo "peer venv ready: $venv"
  exit 0
fi
test -x "$venv/bin/python" || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first, pinned to the CPU build (a plain `torch` from the index pulls a CUDA build)
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q llmcompressor==0.14.0.1
touch "$stamp"
echo "peer venv ready: $venv"
