#!/usr/bin/env bash
# `make bench`: install what is missing, then run the benchmarks (they start and stop their own services).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m bench.node_bench "$@"
