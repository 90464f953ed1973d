#!/usr/bin/env bash
# `make demo`: install what is missing, then run the demo (which starts and stops its own services).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m shoal.demo
