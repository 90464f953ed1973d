#!/usr/bin/env bash
# Installs what Shoal needs on a fresh Debian machine, idempotently:
#   - Debian packages: docker.io (engine), redis-server, mmdebstrap (offline image build)
#   - a virtualenv in .venv with the project and its dev tools
# Starting services (dockerd, redis, the runtime image) is done by `python -m shoal.devenv`.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${SHOAL_PYTHON:-python3}
need=()
"$PY" -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)  # Debian splits venv's pip out
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)  # the Ansible tests' rig: an sshd on loopback addresses
command -v ss >/dev/null 2>&1 || need+=(iproute2)  # the link-reset test: ss -K
if [ ${#need[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

stamp=.venv/.shoal-installed
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: preparing .venv"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
  touch "$stamp"
fi
