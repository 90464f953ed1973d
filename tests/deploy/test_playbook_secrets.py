"""Where the playbooks put their secrets (the Redis password, the API and node tokens), read from the YAML itself:
never in a task's ``environment:`` (Ansible prefixes the remote command with it: it is in the host's process
list and in ``-vvv``'s EXEC lines) nor on a command line, and a module that is handed one (an HTTP header, a
command's stdin) runs under ``no_log`` (else Ansible prints its arguments, and the module logs them to the
host's syslog). Variables made from a secret (the controller's Redis URL) count as secrets. What counts is a
secret's value reaching a template's output: ``'--askpass' if redis_password else ''`` only tests it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2 import nodes

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = ROOT / "playbooks"
SECRETS = {"redis_password", "shoal_api_token", "shoal_node_token"}
# Names a secret goes by in a process's environment.
SECRET_ENV_NAMES = ("REDISCLI_AUTH", "SHOAL_API_TOKEN", "SHOAL_NODE_TOKEN", "SHOAL_REDIS_URL")
# Task keywords (not a module's arguments): a secret in `vars:` of an include is handed to the role, not printed.
TASK_KEYWORDS = {
    "name", "when", "register", "loop", "loop_control", "vars", "environment", "no_log", "changed_when",
    "failed_when", "until", "retries", "delay", "ignore_errors", "ignore_unreachable", "check_mode", "diff",
    "become", "become_user", "become_method", "become_flags", "delegate_to", "delegate_facts", "run_once", "tags",
    "notify", "listen", "args", "any_errors_fatal", "throttle", "timeout", "module_defaults", "collections",
    "debugger", "async", "poll", "connection", "block", "rescue", "always",
}
COMMAND_MODULES = {"command", "shell", "raw", "script", "expect"}
INCLUDES = {"include_role", "import_role", "include_tasks", "import_tasks", "import_playbook"}


def yaml_files() -> list[Path]:
    return sorted(p for p in PLAYBOOKS.rglob("*.yml") if "templates" not in p.parts and "files" not in p.parts)


def secret_names() -> set[str]:
    """The secrets, and every variable a role's defaults or vars (or an inventory's) make from one."""
    definitions: dict[str, list[Any]] = {}
    for path in [*PLAYBOOKS.glob("roles/*/defaults/*.yml"), *PLAYBOOKS.glob("roles/*/vars/*.yml"),
                 *ROOT.glob("inventory/*/group_vars/*.yml")]:
        for key, value in (yaml.safe_load(path.read_text()) or {}).items():
            definitions.setdefault(key, []).append(value)
    names = set(SECRETS)
    while True:
        more = {k for k, v in definitions.items() if k not in names and mentions(v, names)}
        if not more:
            return names
        names |= more


JINJA = jinja2.Environment(extensions=["jinja2.ext.do", "jinja2.ext.loopcontrols"])


def output_names(node: nodes.Node) -> Iterator[str]:
    """Variables whose value (or part of it) an expression can give: not those it only tests (an ``if``'s
    condition, a comparison, an ``is`` test, a ``not``). A constant string counts too (``hostvars[h]['x']``)."""
    if isinstance(node, nodes.CondExpr):
        yield from output_names(node.expr1)
        if node.expr2 is not None:
            yield from output_names(node.expr2)
        return
    if isinstance(node, nodes.If):
        for child in (*node.body, *node.elif_, *node.else_):
            yield from output_names(child)
        return
    if isinstance(node, (nodes.Compare, nodes.Test, nodes.Not)):
        return
    if isinstance(node, nodes.Name):
        yield node.name
    elif isinstance(node, nodes.Const) and isinstance(node.value, str):
        yield node.value
    for child in node.iter_child_nodes():
        yield from output_names(child)


def mentions(value: Any, names: set[str]) -> bool:
    """Whether ``value`` (YAML: every string in it is a template) can put a secret in what it renders to."""
    if isinstance(value, dict):
        return any(mentions(k, names) or mentions(v, names) for k, v in value.items())
    if isinstance(value, list):
        return any(mentions(v, names) for v in value)
    if not isinstance(value, str):
        return False
    return not names.isdisjoint(output_names(JINJA.parse(value)))


def tasks_of(node: Any) -> Iterator[dict[str, Any]]:
    """Every task in a playbook (its plays' task lists) or a task file, blocks opened."""
    if not isinstance(node, list):
        return
    for item in node:
        if not isinstance(item, dict):
            continue
        if "hosts" in item:  # a play
            for key in ("pre_tasks", "tasks", "post_tasks", "handlers"):
                yield from tasks_of(item.get(key))
            continue
        yield item
        for key in ("block", "rescue", "always"):
            yield from tasks_of(item.get(key))


def all_tasks() -> list[tuple[str, dict[str, Any]]]:
    found = [(f"{path.relative_to(ROOT)}: {task.get('name', '?')}", task)
             for path in yaml_files() for task in tasks_of(yaml.safe_load(path.read_text()))]
    assert len(found) > 50, found  # the walk found the playbooks' tasks
    return found


def module_of(task: dict[str, Any]) -> tuple[str, Any] | None:
    modules = [k for k in task if k not in TASK_KEYWORDS]
    assert len(modules) <= 1, (task, modules)
    if not modules:
        return None
    return modules[0].rsplit(".", 1)[-1], task[modules[0]]


def test_the_secret_variables_include_what_is_made_from_them() -> None:
    names = secret_names()
    assert {"shoal_controller_redis_url", "shoal_agent_node_token", "shoal_agent_api_token"} <= names, names


def test_no_secret_goes_through_a_tasks_environment() -> None:
    names = secret_names()
    leaks = [where for where, task in all_tasks() if "environment" in task
             and (mentions(task["environment"], names)
                  or any(env in yaml.safe_dump(task["environment"]) for env in SECRET_ENV_NAMES))]
    assert leaks == []


def test_no_secret_is_on_a_command_line() -> None:
    names = secret_names()
    leaks = []
    for where, task in all_tasks():
        module = module_of(task)
        if module is None or module[0] not in COMMAND_MODULES:
            continue
        args = module[1]
        line = args if isinstance(args, str) else {k: v for k, v in (args or {}).items() if k != "stdin"}
        extra = {k: v for k, v in (task.get("args") or {}).items() if k != "stdin"}
        if mentions([line, extra], names):
            leaks.append(where)
    assert leaks == []


def test_a_module_handed_a_secret_runs_under_no_log() -> None:
    names = secret_names()
    unguarded = []
    handed = []
    for where, task in all_tasks():
        module = module_of(task)
        if module is None or module[0] in INCLUDES:
            continue
        if mentions([module[1], task.get("args")], names):
            handed.append(where)
            # true, or a template (e.g. "only when a password is set"); never absent or false
            if task.get("no_log") in (None, False) or str(task.get("no_log")).strip().lower() in ("false", "no"):
                unguarded.append(where)
    assert unguarded == []
    # The two that are handed one: the agent's wait for "ready" (API token) and Redis's (password on stdin).
    assert any("Wait until the controller sees this node ready" in w for w in handed), handed
    assert any("Wait until the Redis answering is this role's" in w for w in handed), handed


def test_the_redis_password_reaches_redis_cli_on_its_stdin() -> None:
    tasks = dict(all_tasks())
    task = tasks["playbooks/roles/redis/tasks/main.yml: Wait until the Redis answering is this role's (its data "
                 "directory)"]
    args = task["ansible.builtin.command"]
    assert "--askpass" in args["cmd"] and "redis_password" in args["stdin"]
    assert "redis_password" in str(task["no_log"])
