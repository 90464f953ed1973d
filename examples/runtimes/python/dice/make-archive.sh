#!/usr/bin/env bash
# Builds python.tar.gz, the archive the main seed's curl example uploads:
#   curl -X POST -F module=@../runtimes/python/dice/python.tar.gz localhost:3000/registerFunction/pythonruntime/dice
set -euo pipefail
cd "$(dirname "$0")"
# Reproducible: the same files give the same bytes (no timestamps, owners or order of the build machine), so
# rebuilding it, as examples/api/seed-examples.sh does, leaves the committed archive as it is.
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --mode=u+rw,go+r -cf - test.py requirements.txt \
  | gzip -n -9 > python.tar.gz
echo "built $(pwd)/python.tar.gz"
