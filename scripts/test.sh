#!/usr/bin/env bash
# The whole test suite, as `make test` and CI run it: bootstrap, lint, type-check, start the local
# infrastructure (Docker engine, Redis, runtime image), run pytest against it, stop what was started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY=.venv/bin/python
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== infrastructure"
# The engine is held while this shell runs (the demo run meanwhile does not stop it under the tests, nor they it).
exports=$($PY -m shoal.devenv up --no-redis --holder $$)  # a failing `up` stops here (set -e), before pytest
eval "$exports"
trap '$PY -m shoal.devenv down --lease "${SHOAL_ENGINE_LEASE:-}"' EXIT  # (after `up`: its own lease only)
echo "docker: $DOCKER_HOST  redis: ${SHOAL_REDIS_URL:-none}"
echo "== pytest"
set +e
# Bounded (CI allows 90 minutes; it takes about 11 here): a test that hangs is interrupted (SIGINT: pytest reports
# where each test stood) rather than holding CI to its limit. --foreground: pytest stays in this job's process
# group, so a Ctrl-C or a hangup reaches it (and it ends before the trap stops the engine under it).
timeout --foreground -s INT -k 120 "${SHOAL_TEST_TIMEOUT:-3600}" \
  $PY -m pytest -n "${SHOAL_TEST_WORKERS:-2}" --dist loadgroup --durations=25 "$@"
code=$?
set -e
exit $code
