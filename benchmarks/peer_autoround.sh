#!/usr/bin/env bash
# Create the AutoRound peer's own virtual environment in DIR (default benchmarks/.venv-autoround):
# torch 2.13.0 (CPU) then auto-round 0.16.1, through benchmarks/peer_venv.sh.
# benchmarks/learned.py runs benchmarks/peer_autoround_worker.py with DIR/bin/python.
#   bash benchmarks/peer_autoround.sh /work/peers/autoround
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PEER_PKG="auto-round==0.16.1" exec bash "$here/peer_venv.sh" "${1:-$here/.venv-autoround}"
