#!/usr/bin/env bash
# `make bench`: install what is missing, then run the benchmarks (they start and stop their own services).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
command -v wrk >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
}
.venv/bin/pip install -q --disable-pip-version-check -e ".[bench]"
# `make bench ARGS=--quick`: --quick goes to both; anything else (--only warm) to the node bench only.
quick=()
for a in "$@"; do [[ "$a" == --quick ]] && quick=(--quick); done
.venv/bin/python -m bench.node_bench "$@"
.venv/bin/python -m bench.e2e_bench "${quick[@]}"
