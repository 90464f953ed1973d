"""shoal_service's program tasks, run by ansible-playbook on this machine (connection local) with a stand-in
supervisorctl that records what it is asked: a program restarts when what it runs with (code or configuration)
differs from what it was started with, also after a run that wrote the change and stopped before the restart."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = """
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - ansible.builtin.include_role:
        name: shoal_service
        tasks_from: program
      vars:
        shoal_service_kind: supervisor
        shoal_program_name: shoal-x
        shoal_program_command: /bin/true
        shoal_program_stopwait: 5
        shoal_program_stamp: "{{ code }}"
        shoal_program_env:
          SHOAL_X: "{{ setting }}"
"""


def run(tmp: Path, code: str, setting: str, fail_restart: bool = False) -> tuple[int, list[str]]:
    """One run; its exit status and the supervisorctl commands it made."""
    calls = tmp / "calls"
    calls.unlink(missing_ok=True)
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(ROOT / "playbooks" / "roles"), ANSIBLE_NOCOLOR="1",
               FAIL_RESTART="1" if fail_restart else "0", ANSIBLE_LOCALHOST_WARNING="False",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="False")
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), str(tmp / "play.yml"),
                           "-e", f"code={code} setting={setting} shoal_service_dir={tmp}/sup "
                           f"shoal_service_stamp_dir={tmp}/run shoal_service_supervisorctl={tmp}/supervisorctl "
                           f"ansible_python_interpreter={sys.executable}"],
                          env=env, capture_output=True, text=True, timeout=300)
    made = calls.read_text().split("\n")[:-1] if calls.exists() else []
    return proc.returncode, [c for c in made if not c.startswith("status")] or (
        [proc.stdout[-3000:]] if proc.returncode and not fail_restart else [])


def test_a_configuration_written_by_a_run_cut_short_restarts_the_program_at_the_next(tmp_path: Path) -> None:
    """The restart went by what this run changed: a run that wrote a new environment and failed before the
    restart left the program on the old one, and every later run saw nothing changed (a rotated Redis password:
    every run after it failed)."""
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    (tmp_path / "sup" / "programs").mkdir(parents=True)
    (tmp_path / "run").mkdir()
    ctl = tmp_path / "supervisorctl"
    ctl.write_text(f'#!/bin/sh\necho "$3 $4" >> {tmp_path}/calls\n'
                   'case $3 in status) echo "$4 RUNNING";; restart) [ "$FAIL_RESTART" = 1 ] && exit 7;; esac\n'
                   "exit 0\n")
    ctl.chmod(0o755)
    assert run(tmp_path, "c1", "a") == (0, ["update shoal-x"])  # new: loaded (it starts so)
    code, made = run(tmp_path, "c1", "b", fail_restart=True)  # its new environment written, then the restart failed
    assert code != 0 and made == ["restart shoal-x"]
    assert run(tmp_path, "c1", "b") == (0, ["restart shoal-x"])  # the next run restarts it on what was written
    assert run(tmp_path, "c1", "b") == (0, [])  # and then it runs with it: nothing to do
