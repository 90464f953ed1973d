#!/usr/bin/env bash
# Installs what Shoal needs on a fresh Debian machine, idempotently:
#   - Debian packages: docker.io (engine), redis-server, mmdebstrap (offline image build)
#   - a virtualenv in .venv with the project and its dev tools
# Starting services (dockerd, redis, the runtime image) is done by `python -m shoal.devenv`.
set -euo pipefail
cd "$(dirname "$0")/.."

# One bootstrap at a time (`make demo` and `make test` started together): apt and pip into one .venv at once
# break each other.
# (apt waits for its own lock: see below)
exec 9>"${TMPDIR:-/tmp}/shoal-bootstrap.$(id -u).lock"
flock 9

PY=${SHOAL_PYTHON:-python3}
need=()
"$PY" -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)  # Debian splits venv's pip out
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)  # the Ansible tests' rig: an sshd on loopback addresses
command -v ss >/dev/null 2>&1 || need+=(iproute2)  # the link-reset test: ss -K
# docker.io recommends apparmor, left out below: where the kernel enforces AppArmor, dockerd cannot create a
# container without apparmor_parser.
if [ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" = Y ] && ! command -v apparmor_parser >/dev/null 2>&1
then
  need+=(apparmor)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The packages' own services (the system dockerd and its bridge and NAT rules, a Redis on 6379, an sshd on every
  # interface) are not started, nor enabled for the next boot: Shoal starts private ones, on loopback, and stops
  # them. A policy-rc.d of our own says so while apt runs, unless the machine has one already.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# shoal bootstrap: no service starts while it installs packages\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  # (the lock: a fresh VM's unattended-upgrades may hold it for minutes)
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [ -d /run/systemd/system ]; then
    # Under systemd, the units of the packages installed just now (none that ran before) are not left enabled
    # for the next boot: policy-rc.d only kept them from starting now.
    units=()
    for pkg in "${need[@]}"; do
      case $pkg in
        docker.io) units+=(docker.socket docker.service) ;;
        redis-server) units+=(redis-server.service) ;;
        openssh-server) units+=(ssh.service) ;;
      esac
    done
    [ ${#units[@]} -eq 0 ] || systemctl disable --now "${units[@]}" >/dev/null 2>&1 \
      || echo "bootstrap: could not disable ${units[*]} (they may start at the next boot)" >&2
  fi
fi

stamp=.venv/.shoal-installed
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: preparing .venv"
  # A venv whose creation was cut short (its pip missing) is made again.
  .venv/bin/python -m pip --version >/dev/null 2>&1 || "$PY" -m venv --clear .venv
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
  touch "$stamp"
fi
