"""A function version whose preparation failed is prepared again when the failure may pass (its archive's
transfer, the package index, the disk), and not when the archive is hostile. The agent is real, with stand-ins
for the package resolver and its work pool (run inline); nothing is started."""

from __future__ import annotations

import errno
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from node_agent.agent import PREPARE_RETRIES, PREPARE_RETRY_FIRST, STARTUP_COLLECT_DELAY, Agent
from node_agent.errors import DependencyError
from node_agent.functions import FnState
from node_agent.tickets import Ticket
from shoal.archive import build_tar_gz
from shoal.models import FunctionSpec
from shoal.protocol import Message, Msg
from tests.shoal.test_archive import zip_loop


class FlakyResolver:
    """The package index is unreachable for the first ``failures`` resolutions."""

    def __init__(self, wheels: Path, failures: int) -> None:
        self.wheels = wheels
        self.failures = failures
        self.calls = 0

    def resolve(self, code_dir: Path) -> Path:
        self.calls += 1
        if self.calls <= self.failures:
            raise DependencyError("pip download failed: the package index is unreachable")
        return self.wheels


@pytest.fixture
def agent(agent: Agent) -> Agent:
    """The constructed agent (conftest), with what it sends recorded, pool work run inline, no miniworker."""
    agent.sent = []  # type: ignore[attr-defined]
    agent.link.send = lambda mtype, header, *payload: agent.sent.append((mtype, header))  # type: ignore[attr-defined,method-assign]

    def inline(work: Callable[[], Any], done: Callable[[Any, BaseException | None], None],
               executor: Any = None) -> None:
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001 - handed to `done`, as the pool does
            done(None, exc)
            return
        done(result, None)

    agent.run_in_pool = inline  # type: ignore[method-assign]
    agent.pool.reconcile = lambda: None  # type: ignore[method-assign] # no miniworker is started here
    return agent


def deploy(agent: Agent, name: str, archive: bytes) -> str:
    sha = hashlib.sha256(archive).hexdigest()
    blob = agent.cache.blob_path(sha)
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(archive)  # already fetched: the preparation starts at once
    spec = FunctionSpec(name=name, version=1, runtime="rt", sha256=sha, size=len(archive),
                        entrypoint="handler:handler")
    agent.on_function(Message(Msg.FUNCTION, spec.to_dict(), []))
    return spec.key


def states(agent: Agent, key: str) -> list[str]:
    return [h["state"] for m, h in agent.sent if m == Msg.FUNCTION_STATE and f"{h['name']}@{h['version']}" == key]  # type: ignore[attr-defined]


def test_a_preparation_that_failed_for_a_passing_reason_is_tried_again(agent: Agent, tmp_path: Path) -> None:
    agent.resolver = FlakyResolver(tmp_path / "wheels", failures=2)  # type: ignore[assignment]
    key = deploy(agent, "f", build_tar_gz({"handler.py": "def handler(p):\n    return p\n", "requirements.txt": "x\n"}))
    fn = agent.registry.functions[key]
    assert fn.state == FnState.FAILED and f"again in {PREPARE_RETRY_FIRST:g} s" in fn.error
    agent.retry_failed(time.monotonic())  # not yet
    assert fn.state == FnState.FAILED and agent.resolver.calls == 1  # type: ignore[attr-defined]
    agent.retry_failed(fn.retry_at)
    assert fn.state == FnState.FAILED and f"again in {2 * PREPARE_RETRY_FIRST:g} s" in fn.error  # backing off
    agent.retry_failed(fn.retry_at)
    assert fn.state == FnState.READY and fn.error == "" and fn.wheels_dir == tmp_path / "wheels"
    assert states(agent, key) == ["failed", "failed", "ready"]  # the controller learns it can place calls again
    assert fn.retries == 0  # ready: its next passing failures count anew (they added up over the node's life)


def test_retries_are_bounded_and_a_hostile_archive_is_not_tried_again(agent: Agent, tmp_path: Path) -> None:
    agent.resolver = FlakyResolver(tmp_path / "wheels", failures=1000)  # type: ignore[assignment]
    key = deploy(agent, "f", build_tar_gz({"handler.py": "def handler(p):\n    return p\n", "requirements.txt": "x\n"}))
    fn = agent.registry.functions[key]
    while fn.retry_at:
        agent.retry_failed(fn.retry_at)
    assert fn.state == FnState.FAILED and agent.resolver.calls == PREPARE_RETRIES + 1  # type: ignore[attr-defined]
    assert "again" not in fn.error

    hostile = deploy(agent, "evil", zip_loop())
    assert agent.registry.functions[hostile].state == FnState.FAILED
    assert "loop" in agent.registry.functions[hostile].error and not agent.registry.functions[hostile].retry_at


def test_the_node_takes_the_controllers_archive_limit_from_its_welcome(agent: Agent, tmp_path: Path) -> None:
    """A controller with a raised upload limit used to see its larger archives refused by every node (left at
    the default): the node now extracts within the limit its controller announces."""
    agent.resolver = FlakyResolver(tmp_path / "wheels", failures=0)  # type: ignore[assignment]
    archive = build_tar_gz({"handler.py": "def handler(p):\n    return p\n" + "# padding\n" * 400})
    agent.on_welcome(Message(Msg.WELCOME, {"v": 1, "seq": 0, "max_archive_bytes": len(archive) - 1}, []))
    small = agent.registry.functions[deploy(agent, "f", archive)]
    assert small.state == FnState.FAILED and f"limit of {len(archive) - 1}" in small.error
    agent.on_welcome(Message(Msg.WELCOME, {"v": 1, "seq": 0, "max_archive_bytes": 1 << 40}, []))
    assert agent.cache.limits.max_archive_bytes == 1 << 40


def test_an_agent_starting_removes_what_a_killed_one_left_half_done(agent: Agent) -> None:
    half = [agent.cache.root / "code" / ".extract-abc", agent.cache.root / "wheels" / ".resolve-def"]
    kept = agent.cache.root / "code" / ("0" * 64)
    for directory in (*half, kept):
        (directory / "sub").mkdir(parents=True)
    assert agent.cache.sweep() == 2
    assert not any(d.exists() for d in half) and kept.is_dir()


HANDLER = build_tar_gz({"handler.py": "def handler(p):\n    return p\n"})


def test_an_archive_kept_from_before_a_restart_is_hashed_again_and_a_damaged_one_fetched_again(
        agent: Agent, tmp_path: Path) -> None:
    """Nothing is synced to disk on the way: after a power loss an archive can be cut short. Trusted as it was, its
    extraction failed the function for good (a bad archive, no retry)."""
    agent.resolver = FlakyResolver(tmp_path / "wheels", failures=0)  # type: ignore[assignment]
    sha = hashlib.sha256(HANDLER).hexdigest()
    blob = agent.cache.blob_path(sha)
    blob.write_bytes(HANDLER[: len(HANDLER) // 2])  # what the crash left
    spec = FunctionSpec(name="f", version=1, runtime="rt", sha256=sha, size=len(HANDLER), entrypoint="handler:handler")
    agent.on_function(Message(Msg.FUNCTION, spec.to_dict(), []))
    fn = agent.registry.functions[spec.key]
    assert fn.state == FnState.FAILED and "damaged" in fn.error and fn.retry_at, fn.error
    assert not blob.exists()
    agent.retry_failed(fn.retry_at)  # the retry fetches it again
    assert fn.state == FnState.FETCHING and sha in agent.fetcher.transfers


def test_a_tree_kept_from_before_a_restart_is_extracted_anew(agent: Agent, tmp_path: Path) -> None:
    agent.resolver = FlakyResolver(tmp_path / "wheels", failures=0)  # type: ignore[assignment]
    sha = hashlib.sha256(HANDLER).hexdigest()
    cut = agent.cache.root / "code" / sha
    cut.mkdir(parents=True)
    (cut / "handler.py").write_text("")  # a tree cut short: it used to be trusted, and run
    key = deploy(agent, "f", HANDLER)
    fn = agent.registry.functions[key]
    assert fn.state == FnState.READY and fn.code_dir is not None
    assert (fn.code_dir / "handler.py").read_text().startswith("def handler")


def test_a_full_disk_while_extracting_is_a_passing_failure(agent: Agent, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """It was a bad archive: the function failed on this node for good."""
    agent.resolver = FlakyResolver(tmp_path / "wheels", failures=0)  # type: ignore[assignment]

    def full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr("shoal.archive._Extractor.file", full)
        key = deploy(agent, "f", HANDLER)
    fn = agent.registry.functions[key]
    assert fn.state == FnState.FAILED and "No space left" in fn.error and fn.retry_at
    agent.retry_failed(fn.retry_at)  # the disk has room again
    assert fn.state == FnState.READY


def test_what_a_restarted_agent_kept_of_functions_deleted_meanwhile_is_collected_after_its_sync(
        agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No FGONE names a function deleted while the agent was not running (its HELLO lists none): its archive and
    code stayed on disk for ever."""
    agent.resolver = FlakyResolver(tmp_path / "wheels", failures=0)  # type: ignore[assignment]
    gone = "ab" * 32
    agent.cache.blob_path(gone).write_bytes(b"an archive of a deleted function")
    (agent.cache.root / "code" / gone).mkdir()
    clock = [1000.0]
    monkeypatch.setattr("node_agent.agent.time.monotonic", lambda: clock[0])
    agent.on_welcome(Message(Msg.WELCOME, {"v": 1, "seq": 0}, []))
    key = deploy(agent, "kept", HANDLER)  # what the controller sends after the WELCOME
    assert agent.collect_after == 1000.0 + STARTUP_COLLECT_DELAY
    agent.on_welcome(Message(Msg.WELCOME, {"v": 1, "seq": 0}, []))  # a later WELCOME does not put it off
    assert agent.collect_after == 1000.0 + STARTUP_COLLECT_DELAY
    agent.collect_if_due(clock[0] + STARTUP_COLLECT_DELAY - 1)  # not yet
    assert agent.cache.blob_path(gone).exists()
    agent.collect_if_due(clock[0] + STARTUP_COLLECT_DELAY)
    assert not agent.cache.blob_path(gone).exists() and not (agent.cache.root / "code" / gone).exists()
    fn = agent.registry.functions[key]
    assert fn.state == FnState.READY and agent.cache.has_blob(fn.spec.sha256) and fn.code_dir is not None
    assert fn.code_dir.is_dir()


def test_a_function_whose_containers_will_not_start_here_gives_its_calls_back(agent: Agent, tmp_path: Path) -> None:
    """They were failed here (StartFailed) though another node could run them; the function stays failed here for
    a while (the controller places its calls elsewhere) and is tried again."""
    agent.resolver = FlakyResolver(tmp_path / "wheels", failures=0)  # type: ignore[assignment]
    key = deploy(agent, "f", HANDLER)
    agent.broker.submit(Ticket("c1", key, None, 30.0))  # no miniworker: it waits here
    agent.on_start_failures(key, "3 miniworkers failed to start: image missing")
    fn = agent.registry.functions[key]
    assert fn.state == FnState.FAILED and "image missing" in fn.error and fn.retry_at
    results = [h for m, h in agent.sent if m == Msg.RESULT]  # type: ignore[attr-defined]
    assert [(r["call_id"], r["status"]) for r in results] == [("c1", "REJECTED")]
    kinds = [(m, h.get("state")) for m, h in agent.sent]  # type: ignore[attr-defined]
    assert kinds.index((Msg.FUNCTION_STATE, "failed")) < kinds.index((Msg.RESULT, None))  # said before the call
    agent.retry_failed(fn.retry_at)
    assert fn.state == FnState.READY


def test_a_miniworker_still_starting_is_not_reported_warm(agent: Agent, tmp_path: Path) -> None:
    """Warm-first placement took a node whose container was still starting for one with a warm one."""
    from types import SimpleNamespace

    from node_agent.miniworkers import MwHandle, MwState
    proc: Any = SimpleNamespace(poll=lambda: 0, send_signal=lambda sig: None)
    for mw_id, state in (("starting", MwState.STARTING), ("idle", MwState.IDLE), ("busy", MwState.BUSY)):
        agent.broker.mws[mw_id] = MwHandle(mw_id, "bound", "rt", "f@1", proc, state=state)
    agent.send_status()
    [status] = [h for m, h in agent.sent if m == Msg.STATUS]  # type: ignore[attr-defined]
    assert status["warm"] == {"f@1": 2}


def test_a_call_crossing_a_failure_that_may_pass_is_given_back_not_failed(agent: Agent, tmp_path: Path) -> None:
    """The calls waiting here are given back (REJECTED) when the function fails for a reason that may pass; a CALL
    on its way then was answered FAILED, and ended so, though another node could run it."""
    agent.resolver = FlakyResolver(tmp_path / "wheels", failures=1000)  # type: ignore[assignment]
    key = deploy(agent, "f", build_tar_gz({"handler.py": "def handler(p):\n    return p\n", "requirements.txt": "x\n"}))
    fn = agent.registry.functions[key]

    def call(call_id: str) -> dict[str, Any]:
        agent.on_call(Message(Msg.CALL, {"call_id": call_id, "function": "f", "version": 1, "params": None,
                                         "timeout": 5.0, "seq": 1}, []))
        return [h for m, h in agent.sent if m == Msg.RESULT and h["call_id"] == call_id][-1]  # type: ignore[attr-defined]

    assert fn.retry_at and call("passing")["status"] == "REJECTED"
    while fn.retry_at:
        agent.retry_failed(fn.retry_at)
    given_up = call("given-up")  # retries spent: it will not pass
    assert given_up["status"] == "FAILED" and given_up["error"]["type"] == "FunctionUnavailable"
