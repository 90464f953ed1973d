"""The service templates render what their managers read: a systemd unit that systemd-analyze accepts (with the
agent's stop semantics), and an environment file whose values survive quotes, backslashes, '$', '`' and '%' (a
Redis password in a URL is percent-encoded) when a supervisord program's command reads it. Rendered as
Ansible's template module does (trim_blocks)."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "playbooks/roles/shoal_service/templates"
ENV = {"SHOAL_REDIS_URL": "redis://:p%40ss%22w0rd@127.0.0.1:6379/0", "QUOTED": 'say "hi"', "SINGLE": "it's",
       "BACKSLASH": "a\\b\\", "SHELLISH": "$HOME `id` $(id)", "NUMBER": 3}


def render(name: str, **values: Any) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), trim_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["quote"] = shlex.quote  # Ansible's `quote` filter
    return env.get_template(name).render(ansible_managed="managed by Ansible", **values)


def test_the_unit_is_valid_and_stops_the_agent_only(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian's systemd package): the unit cannot be checked")
    unit = tmp_path / "shoal-agent.service"
    unit.write_text(render("unit.service.j2", shoal_program_name="shoal-agent", shoal_program_command="/bin/sleep 1",
                           shoal_program_stopwait=105, shoal_program_after=["docker.service", "dockerd.service"],
                           shoal_program_env_file=str(tmp_path / "shoal-agent.env"), shoal_service_nofile=65536))
    (tmp_path / "shoal-agent.env").write_text("")
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and str(unit) not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    parsed = configparser.ConfigParser(strict=False, interpolation=None)
    parsed.read_string(unit.read_text())
    service = parsed["Service"]
    assert service["KillMode"] == "mixed" and service["TimeoutStopSec"] == "105"
    assert service["EnvironmentFile"] == str(tmp_path / "shoal-agent.env") and service["Restart"] == "always"
    assert parsed["Unit"]["After"] == "network-online.target docker.service dockerd.service"
    assert parsed["Unit"]["Wants"] == "network-online.target"


def test_a_supervisor_programs_command_reads_its_environment_file_verbatim(tmp_path: Path) -> None:
    env_file = tmp_path / "shoal-controller.env"
    env_file.write_text(render("program.env.j2", shoal_program_env=ENV))
    text = render("program.conf.j2", shoal_program_name="shoal-controller", shoal_program_command="/usr/bin/env -0",
                  shoal_program_env_file=str(env_file), shoal_program_stopwait=30,
                  shoal_service_dir="/opt/shoal/supervisor")
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read_string(text)
    section = parsed["program:shoal-controller"]
    assert section["stopasgroup"] == "true" and section["stopwaitsecs"] == "30"
    # As supervisord runs it: %(name)s expansion, then split as a shell would.
    command = shlex.split(section["command"] % {})
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30, env={}).stdout
    seen = dict(item.split("=", 1) for item in out.split("\0") if item)
    assert {k: seen.get(k) for k in ENV} == {k: str(v) for k, v in ENV.items()}


def test_a_program_with_an_account_reads_the_root_only_file_then_runs_as_that_account(tmp_path: Path) -> None:
    env_file = tmp_path / "shoal-controller.env"
    env_file.write_text(render("program.env.j2", shoal_program_env={"SHOAL_API_TOKEN": "secret-token-0123456789"}))
    env_file.chmod(0o600)  # root's, as the role writes it: the account could not read it
    text = render("program.conf.j2", shoal_program_name="shoal-controller", shoal_program_user="nobody",
                  shoal_program_group="nogroup",
                  shoal_program_command="/bin/sh -c \"id -un; echo $SHOAL_API_TOKEN; cat " + str(env_file) + "\"",
                  shoal_program_env_file=str(env_file), shoal_program_stopwait=30,
                  shoal_service_dir="/opt/shoal/supervisor")
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read_string(text)
    command = shlex.split(parsed["program:shoal-controller"]["command"] % {})
    proc = subprocess.run(command, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["nobody", "secret-token-0123456789"], proc
    assert "Permission denied" in proc.stderr  # the program itself cannot read the file its environment came from
    unit = render("unit.service.j2", shoal_program_name="shoal-controller", shoal_program_command="/bin/true",
                  shoal_program_user="shoal", shoal_program_stopwait=30, shoal_program_env_file="/etc/shoal/x.env",
                  shoal_service_nofile=65536)
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read_string(unit)
    assert (service["Service"]["User"], service["Service"]["NoNewPrivileges"]) == ("shoal", "true")
