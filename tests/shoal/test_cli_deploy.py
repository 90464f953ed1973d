"""`shoal deploy` wraps ansible-playbook with the project's config (the playbooks' real runs are in
tests/deploy); here: it finds them, passes the inventory and extra arguments, and fails clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_deploy_lists_the_local_inventorys_hosts_for_each_playbook() -> None:
    for action in ("site", "upgrade", "teardown"):
        proc = shoal("deploy", "-i", "inventory/local", action, "--", "--list-hosts")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "shoal-node-a" in proc.stdout and "shoal-node-b" in proc.stdout
    proc = shoal("deploy", "-i", "inventory/example", "site", "--", "--syntax-check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = shoal("deploy", "-i", "inventory/local", "--", "--list-hosts")  # the action is optional: site
    assert proc.returncode == 0 and "shoal-node-a" in proc.stdout, proc.stdout + proc.stderr
    proc = shoal("--json", "deploy", "-i", "inventory/local", "upgrade", "--", "--list-hosts")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # stdout is one JSON answer; the playbook's on stderr
    assert json.loads(proc.stdout) == {"deployed": "upgrade", "playbook": str(ROOT / "playbooks" / "upgrade.yml"),
                                       "inventory": "inventory/local"}
    assert "shoal-node-a" in proc.stderr
    proc = shoal("deploy", "-i", "inventory/local", "sideways")
    assert proc.returncode == 2 and "expected site | teardown | upgrade" in proc.stderr, proc.stderr


def test_deploy_refuses_a_missing_inventory() -> None:
    proc = shoal("deploy", "-i", "no/such/inventory")
    assert proc.returncode == 2 and "no inventory at no/such/inventory" in proc.stderr
