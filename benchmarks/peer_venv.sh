#!/usr/bin/env bash
# Create a peer tool's OWN virtual environment: torch first (pinned, the CPU build), then the peer.
# Default: benchmarks/.venv-peer with llm-compressor 0.14.0.1 (benchmarks/gptq_vs_peer.py).
# Other peers call this with the folder as $1 (or PEER_VENV) and PEER_PKG (a pinned pip requirement),
# e.g. benchmarks/peer_autoround.sh. No peer is ever a dependency of llmpress: the benchmark
# scripts run a child process with the peer environment's python.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-${PEER_VENV:-$here/.venv-peer}}"
pkg="${PEER_PKG:-llmcompressor==0.14.0.1}"
py="${PY:-python3}"
stamp="$venv/.installed-${pkg//==/-}"  # e.g. .installed-llmcompressor-0.14.0.1
if [ -f "$stamp" ]; then
  echo "peer venv ready: $venv"
  exit 0
fi
test -x "$venv/bin/python" || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first, pinned to the CPU build (a plain `torch` from the index pulls a CUDA build)
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q "$pkg"
touch "$stamp"
echo "peer venv ready: $venv ($pkg)"
