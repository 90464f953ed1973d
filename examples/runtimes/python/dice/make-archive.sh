#!/usr/bin/env bash
# Builds python.tar.gz, the archive the main seed's curl example uploads:
#   curl -X POST -F module=@../runtimes/python/dice/python.tar.gz localhost:3000/registerFunction/pythonruntime/dice
set -euo pipefail
cd "$(dirname "$0")"
tar czf python.tar.gz test.py requirements.txt
echo "built $(pwd)/python.tar.gz"
