"""The node on the real Docker engine: policies, warm path, parallelism, failures, hostile input, status."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import docker
import pytest
import zmq

from miniworker.container import LABEL_MW, LABEL_NODE
from miniworker.worker import DISK_CHECK_EVERY
from shoal.localnode import SEED_RUNTIME, LocalNode
from shoal.models import Runtime
from shoal.protocol import MAX_JSON_DEPTH, PROTOCOL_VERSION, Msg, pack_runner
from tests.conftest import node_containers
from tests.integration.functions import CHAOS, DICE, ECHO, ESCAPE, HOSTILE, RUDE, SLOW, UPPER
from tests.shoal.test_archive import zip_loop
from tests.shoal.test_httpserver import MALFORMED, assert_json_error, raw_http

pytestmark = pytest.mark.docker


def wait_until(node: LocalNode, predicate: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        node.link.pump(0.1)


def miniworkers(node: LocalNode, function: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
    return [m for m in node.status()["miniworkers"]
            if (function is None or m["function"] == function) and (state is None or m["state"] == state)]


def metric(node: LocalNode, name: str) -> float:
    _, text = node.http("/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def assert_dice(result: dict[str, Any]) -> None:
    assert result["status"] == "DONE", result
    values = json.loads(result["result"])
    assert len(values) == 4 and all(1 <= v <= 6 for v in values), values


@pytest.mark.parametrize("policy", ["none", "runtime", "function"])
def test_seed_dice_function_returns_four_dice_under_each_policy(make_node, docker_client, policy: str) -> None:
    node = make_node(policy)
    state = node.deploy("dice", DICE)
    assert state["state"] == "ready", state
    first = node.call("dice", {"roll": "4d6"})
    second = node.call("dice", {"roll": "4d6"})
    assert_dice(first)
    assert_dice(second)
    if policy != "function":
        assert first["cold"] is True  # a container started (none) or the code was put in (runtime)
    if policy == "none":
        # A fresh container per call, removed after it.
        assert first["container_id"] != second["container_id"]
        assert second["cold"] is True
        used = {first["container_id"], second["container_id"]}
        wait_until(node, lambda: not used & set(node_containers(docker_client, node.node_id)),
                   what="the calls' containers to be removed")
    else:
        assert first["container_id"] == second["container_id"]
        assert second["cold"] is False


def container_events(client: docker.DockerClient, node_id: str, since: float) -> list[dict[str, Any]]:
    events = client.events(since=int(since), until=int(time.time()) + 1, decode=True,
                           filters={"type": "container", "label": f"{LABEL_NODE}={node_id}"})
    return [e for e in events if e.get("Action") in ("create", "start") or str(e.get("Action", "")).startswith("exec_")]


def test_warm_handler_answers_1000_calls_with_no_container_started_after_the_first(make_node, docker_client) -> None:
    node = make_node("function")
    node.deploy("echo", ECHO, entrypoint="handler:handler")
    first = node.call("echo", {"i": -1})
    assert first["result"] == {"echo": {"i": -1}}
    started_before = metric(node, "shoal_miniworkers_started_total")
    since = time.time() - 0.5
    time.sleep(1.0)  # docker events have one-second resolution: leave the first call's second behind
    since = time.time()
    for i in range(1000):
        r = node.call("echo", {"i": i})
        assert r["status"] == "DONE" and r["result"] == {"echo": {"i": i}}, r
        assert r["container_id"] == first["container_id"] and r["cold"] is False
    assert metric(node, "shoal_miniworkers_started_total") == started_before
    assert container_events(docker_client, node.node_id, since) == []
    assert metric(node, "shoal_calls_total") == 1001


def test_n_miniworkers_run_n_slow_calls_in_parallel(make_node) -> None:
    node = make_node("function")
    node.deploy("slow", SLOW, entrypoint="handler:handler", min_warm=3, max_warm=3)
    wait_until(node, lambda: len(miniworkers(node, "slow@1", "idle")) == 3, what="3 warm miniworkers")
    ids = [node.submit("slow", {"s": 3}) for _ in range(3)]
    results = node.link.wait_all(ids, timeout=60)
    runs = [r["result"] for r in results.values()]
    assert all(r["status"] == "DONE" for r in results.values())
    assert len({r["mw_id"] for r in results.values()}) == 3
    # They overlapped: every call started before any call ended.
    assert max(run["start"] for run in runs) < min(run["end"] for run in runs)


def running_miniworker(node: LocalNode, call_id: str) -> dict[str, Any]:
    return wait_until(node, lambda: next((m for m in node.status()["miniworkers"] if m["call_id"] == call_id), None),
                      what=f"call {call_id} to run")


def test_failures_reach_a_terminal_state_with_a_reason_and_the_pool_heals(make_node, docker_client) -> None:
    node = make_node("function")
    node.deploy("chaos", CHAOS, entrypoint="handler:handler")
    ok = node.call("chaos", {})
    assert ok["status"] == "DONE" and ok["logs"]["stdout"] == "to stdout\n" and ok["logs"]["stderr"] == "to stderr\n"
    # Output past sys.stdout (os.write, a child process) is the call's too, in order (it went to the container log).
    fds = node.call("chaos", {"do": "fds"})
    assert fds["logs"] == {"stdout": "py\nfd\nchild\n", "stderr": "child-err\n"}, fds["logs"]

    raised = node.call("chaos", {"do": "raise", "why": 7})
    assert raised["status"] == "FAILED"
    assert raised["error"]["type"] == "ValueError" and raised["error"]["message"] == "bad dice: 7"
    assert "raise ValueError" in raised["error"]["traceback"]
    assert node.call("chaos", {})["container_id"] == ok["container_id"]  # a raise does not cost the container

    # A result nested deeper than the protocol carries fails the call, not the processes on its way back.
    deep = node.call("chaos", {"do": "deep", "n": 150})
    assert deep["status"] == "DONE" and json.dumps(deep["result"]) == "[" * 150 + "]" * 150
    for n in (MAX_JSON_DEPTH, 100_000):
        too_deep = node.call("chaos", {"do": "deep", "n": n})
        assert too_deep["status"] == "FAILED" and too_deep["error"]["type"] == "ResultTooDeep", too_deep
    assert node.call("chaos", {})["container_id"] == ok["container_id"]  # nor does a result too deep
    big = node.call("chaos", {"do": "big", "n": 4 << 20})
    assert big["status"] == "DONE" and big["result"] == "x" * (4 << 20)
    too_big = node.call("chaos", {"do": "big", "n": 20 << 20})  # past what the broker's messages carry
    assert too_big["status"] == "FAILED" and too_big["error"]["type"] == "ResultTooLarge", too_big["error"]
    assert too_big["container_id"] == ok["container_id"]

    timed_out = node.call("chaos", {"do": "sleep", "s": 60}, timeout=1)
    assert timed_out["status"] == "TIMEOUT" and "timeout of 1 s" in timed_out["error"]["message"]
    healed = node.call("chaos", {})
    assert healed["status"] == "DONE" and healed["container_id"] != ok["container_id"]

    exited = node.call("chaos", {"do": "exit"})
    assert exited["status"] == "FAILED" and "code 3" in exited["error"]["message"], exited
    assert node.call("chaos", {})["status"] == "DONE"

    call_id = node.submit("chaos", {"do": "sleep", "s": 30})
    victim = running_miniworker(node, call_id)
    docker_client.containers.get(victim["container_id"]).kill()
    killed = node.link.result(call_id, timeout=60)
    assert killed["status"] == "FAILED" and "killed" in killed["error"]["message"], killed
    assert node.call("chaos", {})["status"] == "DONE"

    call_id = node.submit("chaos", {"do": "sleep", "s": 5})  # long enough to be killed mid-call under load
    victim = running_miniworker(node, call_id)
    os.kill(victim["pid"], signal.SIGKILL)
    retried = node.link.result(call_id, timeout=120)
    assert retried["status"] == "DONE" and retried["attempts"] == 2 and retried["mw_id"] != victim["id"], retried
    assert metric(node, "shoal_miniworkers_lost_total") >= 1
    # The lost miniworker's container is removed and the pool is back to its warm size.
    wait_until(node, lambda: victim["container_id"] not in set(node_containers(docker_client, node.node_id)),
               what="the lost miniworker's container to be removed")
    wait_until(node, lambda: len(miniworkers(node, "chaos@1", "idle")) == 1, what="the pool to heal")
    assert metric(node, "shoal_calls_total") == 17


def holding(node: LocalNode, call_id: str) -> dict[str, Any]:
    return wait_until(node, lambda: next((m for m in node.status()["miniworkers"] if m["next_call_id"] == call_id),
                                         None), what=f"call {call_id} to be held")


def test_a_busy_warm_miniworker_holds_one_short_call_and_gives_it_back_if_it_ends_first(make_node) -> None:
    # Every function counts as short here (runs averaging under 60 s are pipelined), so that the head calls
    # can run long enough for the test to see the held call under any load.
    node = make_node("function", env={"SHOAL_AGENT_PIPELINE_MAX_RUN": "60"})
    node.deploy("chaos", CHAOS, entrypoint="handler:handler", min_warm=1, max_warm=1)
    assert node.call("chaos", {})["status"] == "DONE"  # one run seen: the function's average is known

    # Held, then run by the same miniworker as soon as the running call ends.
    head = node.submit("chaos", {"do": "sleep", "s": 4})
    mw = running_miniworker(node, head)
    held = node.submit("chaos", {})
    assert holding(node, held)["id"] == mw["id"]
    results = node.link.wait_all([head, held], timeout=60)
    assert results[head]["status"] == results[held]["status"] == "DONE"
    assert results[held]["mw_id"] == mw["id"] and results[held]["attempts"] == 1
    assert results[held]["started_at"] >= results[head]["started_at"] + 4

    # Cancelled while held: it never runs.
    head = node.submit("chaos", {"do": "sleep", "s": 4})
    running_miniworker(node, head)
    held = node.submit("chaos", {"do": "raise", "why": "must not run"})
    holding(node, held)
    node.link.send(node.node_id, Msg.CANCEL, {"call_id": held})
    results = node.link.wait_all([head, held], timeout=60)
    assert results[held]["status"] == "CANCELLED" and "before it started" in results[held]["error"]["message"]
    assert results[head]["status"] == "DONE"

    # The running call times out: its container is replaced and the held call runs on the next one.
    head = node.submit("chaos", {"do": "sleep", "s": 60}, timeout=4)
    mw = running_miniworker(node, head)
    held = node.submit("chaos", {})
    holding(node, held)
    results = node.link.wait_all([head, held], timeout=120)
    assert results[head]["status"] == "TIMEOUT"
    assert results[held]["status"] == "DONE" and results[held]["mw_id"] != mw["id"], results[held]
    assert results[held]["attempts"] == 1  # holding it was not an attempt

    # The miniworker is SIGKILLed: the running call is retried, the held one queued again; both run.
    head = node.submit("chaos", {"do": "sleep", "s": 4})
    mw = running_miniworker(node, head)
    held = node.submit("chaos", {})
    holding(node, held)
    os.kill(mw["pid"], signal.SIGKILL)
    results = node.link.wait_all([head, held], timeout=120)
    assert results[head]["status"] == "DONE" and results[head]["attempts"] == 2, results[head]
    assert results[held]["status"] == "DONE" and results[held]["attempts"] == 1, results[held]


def test_the_status_lists_the_calls_held_and_echoes_the_controllers_last_sequence_number(make_node) -> None:
    """What the controller's check for dropped calls reads: every STATUS lists the calls on the node (running,
    held or queued) and the sequence number of the controller's last message that carried one."""
    node = make_node("function")
    node.deploy("slow", SLOW, entrypoint="handler:handler", min_warm=1, max_warm=1)
    link, node_id = node.link, node.node_id
    link.statuses.pop(node_id, None)
    link.wait_for(lambda: node_id in link.statuses, 30, "a STATUS")
    assert "seq" not in link.statuses[node_id]  # no sequence number yet: the node does not report calls

    def status_where(predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        link.statuses.pop(node_id, None)
        link.wait_for(lambda: node_id in link.statuses and predicate(link.statuses[node_id]), 30, what)
        return link.statuses[node_id]

    ids = ["first", "second", "third"]
    for seq, call_id in enumerate(ids, start=5):
        link.send(node_id, Msg.CALL, {"call_id": call_id, "function": "slow", "params": {"s": 1.5}, "seq": seq})
    status = status_where(lambda s: s.get("seq") == 7, "a STATUS after the CALLs")
    assert sorted(status["calls"]) == sorted(ids)
    link.send(node_id, Msg.HEARTBEAT, {"seq": 9})
    results = link.wait_all(ids, timeout=60)
    assert [results[c]["status"] for c in ids] == ["DONE"] * 3
    assert status_where(lambda s: s.get("seq") == 9, "a STATUS after the heartbeat")["calls"] == []


def test_a_call_lost_twice_fails_with_a_clear_reason(make_node) -> None:
    node = make_node("function")
    node.deploy("slow", SLOW, entrypoint="handler:handler")
    call_id = node.submit("slow", {"s": 30})
    first = running_miniworker(node, call_id)
    os.kill(first["pid"], signal.SIGKILL)
    wait_until(node, lambda: running_miniworker(node, call_id)["id"] != first["id"], timeout=120,
               what="the retry to run")
    os.kill(running_miniworker(node, call_id)["pid"], signal.SIGKILL)
    failed = node.link.result(call_id, timeout=60)
    assert failed["status"] == "FAILED" and failed["error"]["type"] == "MiniworkerLost", failed
    assert "after 2 attempt(s)" in failed["error"]["message"]


def test_a_call_still_running_at_the_drain_timeout_goes_back_to_the_controller(make_node) -> None:
    """The agent stopped without a word about it: the controller learnt only by taking the node for lost."""
    node = make_node("function", env={"SHOAL_AGENT_DRAIN_TIMEOUT": "1"})
    node.deploy("slow", SLOW, entrypoint="handler:handler")
    call_id = node.submit("slow", {"s": 60})
    running_miniworker(node, call_id)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    given_back = node.link.result(call_id, timeout=60)
    assert given_back["status"] == "REJECTED" and given_back["error"]["type"] == "Draining", given_back
    assert "drain timeout (1 s)" in given_back["error"]["message"]


def test_runtime_policy_starts_containers_ahead_and_puts_code_in_at_first_use(make_node) -> None:
    node = make_node("runtime")
    wait_until(node, lambda: len(miniworkers(node, state="idle")) == 2, what="2 started-ahead containers")
    assert all(m["pool"] == "rt:pythonruntime" and m["function"] is None for m in miniworkers(node))
    node.deploy("echo", ECHO, entrypoint="handler:handler")
    first, second = node.call("echo", 1), node.call("echo", 2)
    assert first["cold"] is True and second["cold"] is False
    assert first["container_id"] == second["container_id"]
    # The started-ahead pool was refilled in the background after one container was taken.
    wait_until(node, lambda: len([m for m in miniworkers(node, state="idle") if m["pool"] == "rt:pythonruntime"
                                     and m["function"] is None]) == 2,
               what="the refill")


def test_keepalive_stops_idle_containers_above_the_minimum(make_node, docker_client) -> None:
    node = make_node("runtime")
    node.deploy("echo", ECHO, entrypoint="handler:handler", keepalive=0.5)
    r = node.call("echo", 1)
    assert r["status"] == "DONE"
    wait_until(node, lambda: not miniworkers(node, "echo@1"), what="the idle container to be stopped")
    wait_until(node, lambda: r["container_id"] not in node_containers(docker_client, node.node_id),
               what="its container to be removed")


def test_command_style_passes_a_string_param_as_argv1(make_node) -> None:
    node = make_node("function")
    node.add_runtime(name="upper-rt", run="python3 upper.py", dependencies="")
    node.deploy("upper", UPPER, runtime="upper-rt")
    r = node.call("upper", "hello shoal")
    assert r["status"] == "DONE" and r["result"] == "HELLO SHOAL", r


def test_queue_is_bounded_per_function(make_node) -> None:
    node = make_node("function", env={"SHOAL_AGENT_QUEUE_LIMIT": "2"})
    node.deploy("slow", SLOW, entrypoint="handler:handler", max_warm=1)
    wait_until(node, lambda: miniworkers(node, "slow@1", "idle"), what="a warm miniworker")
    ids = [node.submit("slow", {"s": 1}) for _ in range(5)]
    results = node.link.wait_all(ids, timeout=60)
    statuses = sorted(r["status"] for r in results.values())
    assert statuses == ["DONE", "DONE", "DONE", "REJECTED", "REJECTED"], statuses
    assert {r["error"]["type"] for r in results.values() if r["status"] == "REJECTED"} == {"QueueFull"}


def test_a_new_version_takes_over_and_old_containers_retire(make_node) -> None:
    node = make_node("function")
    node.deploy("v", {"handler.py": "def handler(p):\n    return 1\n"}, entrypoint="handler:handler")
    assert node.call("v")["result"] == 1
    node.deploy("v", {"handler.py": "def handler(p):\n    return 2\n"}, entrypoint="handler:handler")
    assert node.call("v")["result"] == 2
    wait_until(node, lambda: not miniworkers(node, "v@1"), what="v1's container to retire")


def test_unknown_function_and_unloadable_function_fail_clearly(make_node) -> None:
    node = make_node("function")
    r = node.call("nope", {})
    assert r["status"] == "FAILED" and r["error"]["type"] == "UnknownFunction"
    node.deploy("broken", {"handler.py": "import does_not_exist\n"}, entrypoint="handler:handler")
    r = node.call("broken", {})
    assert r["status"] == "FAILED" and r["error"]["type"] == "ModuleNotFoundError", r
    # It never loads: after a few containers it is failed here and reported so, and none is started for it
    # again (a container was started, dependencies installed and the import tried every 30 s, for ever).
    info = node.link.nodes[node.node_id]
    wait_until(node, lambda: info.functions["broken@1"]["state"] == "failed", what="broken@1 to be failed")
    assert "does not load" in info.functions["broken@1"]["error"]
    wait_until(node, lambda: not miniworkers(node, "broken@1"), what="the last failed miniworker to exit")
    started = metric(node, "shoal_miniworkers_started_total")
    time.sleep(3)  # past the back-off after three failures (2 s): a fourth would have started by now
    assert metric(node, "shoal_miniworkers_started_total") == started
    assert not miniworkers(node, "broken@1")
    r = node.call("broken", {})
    assert r["status"] == "FAILED" and r["error"]["type"] == "FunctionUnavailable", r


def zip_slip_archive() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../../../tmp/shoal-zip-slip", "pwned")
    return buf.getvalue()


def zip_bomb_archive() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("handler.py", b"\n" * (256 << 20))
    return buf.getvalue()


@pytest.mark.parametrize(("archive", "needle"), [(zip_slip_archive, "traversal"), (zip_bomb_archive, "bomb"),
                                                 (zip_loop, "loop"),
                                                 (lambda: b"garbage, not an archive", "not a zip")])
def test_hostile_archives_are_refused_by_the_node(make_node, archive: Callable[[], bytes], needle: str) -> None:
    node = make_node("function")
    state = node.deploy("evil", archive=archive(), entrypoint="handler:handler")
    assert state["state"] == "failed" and needle in state["error"], state
    r = node.call("evil", {})
    assert r["status"] == "FAILED" and r["error"]["type"] == "FunctionUnavailable"
    assert not os.path.exists("/tmp/shoal-zip-slip")
    assert node.call("evil", {})["status"] == "FAILED"  # and the agent still answers


def test_garbage_frames_are_dropped_and_the_agent_keeps_serving(make_node) -> None:
    node = make_node("function")
    node.deploy("echo", ECHO, entrypoint="handler:handler")
    garbage = [[b"JUNK", b"{}"], [b"CALL", b"{not json"], [b"CALL", b'{"call_id": 1}'], [b"\xff" * 100],
               [b"CHUNK", b'{"sha256": "zz", "offset": -1, "last": false}', b"data"], [b"RESULT", b"[]"]]
    for frames in garbage:
        node.link.sock.send_multipart([node.node_id.encode(), *frames])
    # The broker socket too: a stranger connects to it and sends junk.
    ctx: zmq.Context[Any] = zmq.Context.instance()
    stranger = ctx.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 5000)  # closed at once, but what it sent still goes out
    stranger.connect(f"ipc://{node.state_dir / node.node_id / 'broker.ipc'}")
    for frames in garbage:
        stranger.send_multipart(frames)
    stranger.close()
    # Every message reached its socket and was dropped as such (counted), and the agent serves on.
    for socket in ("controller", "broker"):
        name = f'shoal_protocol_errors_total{{socket="{socket}"}}'
        wait_until(node, lambda: metric(node, name) == len(garbage),  # noqa: B023 (used within the iteration)
                   what=f"{len(garbage)} messages dropped on the {socket} socket")
    r = node.call("echo", "still here")
    assert r["status"] == "DONE" and r["result"] == {"echo": "still here"}
    assert node.proc is not None and node.proc.poll() is None


def test_a_function_writing_on_its_runners_socket_fails_its_call_and_the_pool_heals(make_node) -> None:
    node = make_node("function")
    node.deploy("rude", RUDE, entrypoint="handler:handler")
    polite = node.call("rude", {"hex": ""})
    assert polite["status"] == "DONE" and polite["result"] == "after the bytes"
    # A well-formed result for another call: logged and ignored; the call's own result follows.
    stray = pack_runner(Msg.R_RESULT, {"call_id": "someone-else", "ok": True, "result": "forged"})
    r = node.call("rude", {"hex": stray.hex()})
    assert r["status"] == "DONE" and r["result"] == "after the bytes", r
    assert r["container_id"] == polite["container_id"]
    # Bytes that break the protocol: the call fails with the reason, and the container (in doubt) is replaced.
    not_json = Msg.R_RESULT + b"\0{"
    for garbage in (len(not_json).to_bytes(4, "big") + not_json, b"\xff\xff\xff\xff"):
        r = node.call("rude", {"hex": garbage.hex()})
        assert r["status"] == "FAILED" and r["error"]["type"] == "RunnerProtocolError", r
        assert "broke the protocol" in r["error"]["message"], r
    healed = node.call("rude", {"hex": ""})
    assert healed["status"] == "DONE" and healed["container_id"] != polite["container_id"]
    assert node.proc is not None and node.proc.poll() is None


PROBE = {"handler.py": (
    "import os, socket\n"
    "def handler(params):\n"
    "    out = {'uid': os.getuid()}\n"
    "    for path in ('/etc/probe', '/usr/probe'):\n"
    "        try:\n"
    "            open(path, 'w')\n"
    "            out[path] = 'written'\n"
    "        except OSError as exc:\n"
    "            out[path] = exc.strerror\n"
    "    try:\n"
    "        socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
    "        out['net'] = 'reached'\n"
    "    except OSError as exc:\n"
    "        out['net'] = exc.strerror or str(exc)\n"
    "    os.write(1, b'x' * (3 << 20))  # past the call's logs: to the container's own log, which is bounded\n"
    "    return out\n")}


def test_a_functions_container_is_isolated_by_default(make_node, docker_client) -> None:
    """The defaults the node issue asks for, read back from the engine and seen from inside."""
    node = make_node("function")
    node.deploy("probe", PROBE, entrypoint="handler:handler")
    r = node.call("probe", {})
    assert r["status"] == "DONE", r
    seen = r["result"]
    assert seen["uid"] != 0 and seen["/etc/probe"] != "written" and seen["/usr/probe"] != "written", seen
    assert seen["net"] != "reached", seen
    host = docker_client.api.inspect_container(r["container_id"])["HostConfig"]
    assert host["NetworkMode"] == "none" and host["CapDrop"] == ["ALL"] and host["ReadonlyRootfs"] is True
    assert "no-new-privileges" in host["SecurityOpt"] and host["PidsLimit"] > 0 and host["Memory"] > 0
    assert host["MemorySwap"] == host["Memory"] and host["NanoCpus"] > 0 and host["Init"] is True
    assert host["LogConfig"] == {"Type": "local", "Config": {"max-size": "1m", "max-file": "1", "compress": "false"}}


def test_status_readyz_and_metrics_tell_the_truth(make_node, docker_client) -> None:
    node = make_node("function")
    assert node.http("/healthz") == (200, {"ok": True})
    # Ready once the agent has handled the controller's WELCOME (the link only saw its HELLO so far).
    _, ready = wait_until(node, lambda: (r := node.http("/readyz"))[0] == 200 and r, what="readyz to say 200")
    assert ready == {"ready": True, "controller": True, "draining": False, "docker": True}
    node.deploy("echo", ECHO, entrypoint="handler:handler")
    for i in range(5):
        node.call("echo", i)
    node.call("chaos-missing", {})
    status = node.status()
    assert status["node_id"] == node.node_id and status["policy"] == "function"
    assert "pythonruntime" in status["runtimes"]
    fn = next(f for f in status["functions"] if f["key"] == "echo@1")
    assert fn["state"] == "ready" and fn["calls_served"] == 5 and fn["style"] == "handler"
    (mw,) = [m for m in status["miniworkers"] if m["function"] == "echo@1"]
    assert mw["state"] == "idle" and mw["calls_served"] == 5
    assert docker_client.containers.get(mw["container_id"]).status == "running"
    assert {"cpu_percent", "memory", "disk", "load"} <= set(status["system"])
    code, text = node.http("/metrics")
    assert code == 200
    assert 'shoal_calls_total{function="echo@1",outcome="DONE"} 5' in text
    assert 'shoal_call_duration_seconds_count{function="echo@1"} 5' in text
    assert 'shoal_warm_pool_size{pool="echo@1",state="idle"} 1' in text
    assert 'shoal_cold_starts_total{function="echo@1"} 1' in text
    # HTTP the status server cannot parse is answered in JSON as every other error, and it serves on.
    url = urllib.parse.urlsplit(node.status_url)
    assert_json_error(raw_http(str(url.hostname), int(url.port or 80), MALFORMED["bad-method"]))
    assert node.http("/healthz") == (200, {"ok": True})
    # Told to drain, the node is no longer ready, then exits cleanly once idle.
    node.link.send(node.node_id, b"DRAIN", {})
    _, ready = wait_until(node, lambda: (r := node.http("/readyz"))[0] == 503 and r, what="readyz to say 503")
    assert ready["draining"] is True
    assert node.proc is not None
    wait_until(node, lambda: node.proc.poll() is not None, what="the drained agent to exit")
    assert node.proc.returncode == 0


def test_a_gap_in_the_controllers_numbered_messages_makes_the_agent_say_hello_again(make_node) -> None:
    # A reset connection loses what was on its way without a word from ZMQ: the numbers show it.
    node = make_node("function")
    info = node.link.nodes[node.node_id]
    # A STATUS sent after this point comes from a welcomed agent, behind any HELLO it repeated while it waited
    # for its WELCOME (one link keeps the order): those are counted in `before`.
    node.link.statuses.pop(node.node_id, None)
    wait_until(node, lambda: node.node_id in node.link.statuses, what="a STATUS from the welcomed agent")
    before = info.hellos
    node.link.send(node.node_id, Msg.WELCOME, {"v": PROTOCOL_VERSION, "seq": 10})
    node.link.send(node.node_id, Msg.HEARTBEAT, {"seq": 10})
    runtime = Runtime.from_dict(dict(SEED_RUNTIME, name="pythonruntime"))
    node.link.send(node.node_id, Msg.RUNTIME, dict(runtime.to_dict(), seq=11))  # the next number: no gap
    node.link.send(node.node_id, Msg.HEARTBEAT, {"seq": 11})
    node.link.send(node.node_id, Msg.HEARTBEAT, {"seq": 13})  # 12 never came
    wait_until(node, lambda: info.hellos == before + 1, what="a HELLO after the gap")
    assert 'shoal_controller_messages_lost_total 1' in node.http("/metrics")[1]  # one gap, one HELLO
    assert info.hellos == before + 1


def test_a_deleted_function_and_runtime_are_forgotten_with_their_containers_and_files(make_node,
                                                                                      docker_client) -> None:
    node = make_node("function")
    node.deploy("dice", DICE)  # with a requirements.txt: a wheelhouse too
    node.deploy("echo", ECHO, entrypoint="handler:handler")
    assert node.call("dice", "4d6")["status"] == "DONE" and node.call("echo", 1)["status"] == "DONE"
    cache = node.state_dir / node.node_id
    def entries() -> dict[str, int]:
        return {sub: len(list((cache / sub).iterdir())) for sub in ("blobs", "code", "wheels", "trash")}

    assert entries() == {"blobs": 2, "code": 2, "wheels": 2, "trash": 0}  # dice's wheelhouse, echo's empty one
    assert len(node_containers(docker_client, node.node_id)) == 2
    node.link.send(node.node_id, Msg.FUNCTION_GONE, {"name": "dice", "up_to": 1})
    wait_until(node, lambda: len(node_containers(docker_client, node.node_id)) == 1, what="dice's container to go")
    wait_until(node, lambda: entries() == {"blobs": 1, "code": 1, "wheels": 1, "trash": 0}, what="dice's files to go")
    assert [f["key"] for f in node.status()["functions"]] == ["echo@1"]
    result = node.call("dice", "4d6")
    assert result["status"] == "FAILED" and result["error"]["type"] == "UnknownFunction"
    assert node.call("echo", 2)["status"] == "DONE"  # the other function is untouched
    # A deleted runtime: its containers started ahead are stopped (a runtime-policy node).
    generic = make_node("runtime")
    wait_until(generic, lambda: len(node_containers(docker_client, generic.node_id)) == 2, what="runtime warm pool")
    generic.link.send(generic.node_id, Msg.RUNTIME_GONE, {"name": "pythonruntime"})
    wait_until(generic, lambda: node_containers(docker_client, generic.node_id) == [], what="the runtime's pool to go")
    assert generic.status()["runtimes"] == {}


def test_an_old_version_unused_for_a_while_is_dropped_and_a_call_of_it_comes_back_rejected(make_node) -> None:
    # A node kept every version ever deployed, code and archive, for ever.
    node = make_node("function", env={"SHOAL_AGENT_RETIRE_AFTER": "1"})
    node.deploy("v", {"handler.py": "def handler(p):\n    return 1\n"}, entrypoint="handler:handler")
    assert node.call("v")["result"] == 1
    node.deploy("v", {"handler.py": "def handler(p):\n    return 2\n"}, entrypoint="handler:handler")
    assert node.call("v")["result"] == 2
    info = node.link.nodes[node.node_id]
    wait_until(node, lambda: info.functions["v@1"]["state"] == "retired", what="v@1 to be retired")
    cache = node.state_dir / node.node_id
    wait_until(node, lambda: len(list((cache / "blobs").iterdir())) == 1 and len(list((cache / "code").iterdir())) == 1,
               what="v@1's archive and code to be collected")
    assert [f["key"] for f in node.status()["functions"]] == ["v@2"]
    late = node.link.result(node.link.submit(node.node_id, "v", None, version=1))  # as the controller's, crossing
    assert late["status"] == "REJECTED" and late["error"]["type"] == "VersionRetired", late
    assert node.call("v")["result"] == 2


def test_a_function_that_fills_its_directory_past_the_nodes_limit_loses_its_container(make_node,
                                                                                      docker_client) -> None:
    # Its code and work directories are on the host's disk: overlay2 gives no quota, the miniworker measures.
    node = make_node("function", env={"SHOAL_AGENT_CONTAINER_DISK_MB": "16"})
    node.deploy("chaos", CHAOS, entrypoint="handler:handler", min_warm=1, max_warm=1)
    assert node.call("chaos", {})["status"] == "DONE"
    (before,) = node_containers(docker_client, node.node_id)
    filled = node.call("chaos", {"do": "fill", "mb": 32, "s": 60}, timeout=120)
    assert filled["status"] == "FAILED" and filled["error"]["type"] == "DiskLimit", filled
    assert "more than this node's limit of 16 MB" in filled["error"]["message"]
    # The pool heals with a new container and the function serves on.
    wait_until(node, lambda: len(miniworkers(node, "chaos@1", "idle")) == 1, what="the pool to heal")
    assert before not in node_containers(docker_client, node.node_id)
    assert node.call("chaos", {})["status"] == "DONE"
    # Empty directories hold no data blocks, but they are disk (blocks, inodes): they used to count for nothing.
    filled = node.call("chaos", {"do": "dirs", "n": 6000, "s": 60}, timeout=120)
    assert filled["status"] == "FAILED" and filled["error"]["type"] == "DiskLimit", filled


def test_a_function_that_nests_directories_deep_runs_once_and_its_directory_goes(make_node) -> None:
    """1,500 directories deep: the miniworker's disk check (os.walk) raised RecursionError, the miniworker died,
    the call ran again, and the directory stayed (shutil.rmtree raised the same); the agent's next start failed."""
    node = make_node("function")
    node.deploy("chaos", CHAOS, entrypoint="handler:handler", min_warm=1, max_warm=1)
    nested = node.call("chaos", {"do": "nest", "n": 1500, "s": DISK_CHECK_EVERY + 1}, timeout=120)
    assert (nested["status"], nested["result"], nested["attempts"]) == ("DONE", "nested", 1), nested
    (served,) = miniworkers(node, "chaos@1")
    workdir = node.state_dir / node.node_id / "mw" / served["id"]
    assert workdir.is_dir()
    assert node.stop() == 0  # its miniworker removes its container and directory
    assert not workdir.exists()
    node.start()  # (and the fixture stops it again)


def test_what_a_function_does_to_its_runner_fails_its_call_once_with_the_reason(make_node) -> None:
    """The function's code shares the runner's process. Closing the runner's socket and working on used to hold
    the miniworker in a 10 s wait with no heartbeat: the broker took it for lost and ran the call again. Undoing
    the runner's bound on results used to send the agent a result it drops: the call waited for its timeout."""
    node = make_node("function")
    node.deploy("hostile", HOSTILE, entrypoint="handler:handler")
    assert node.call("hostile", {})["status"] == "DONE"
    unplugged = node.call("hostile", {"do": "unplug", "s": 30}, timeout=120)
    assert unplugged["status"] == "FAILED" and unplugged["attempts"] == 1, unplugged
    assert unplugged["error"]["type"] == "ContainerExited", unplugged
    assert "its runner closed the connection" in unplugged["error"]["message"], unplugged
    bloated = node.call("hostile", {"do": "bloat", "n": 20 << 20}, timeout=120)
    assert bloated["status"] == "FAILED" and bloated["attempts"] == 1, {k: v for k, v in bloated.items()
                                                                          if k != "result"}
    assert bloated["error"]["type"] == "ResultTooLarge", bloated["error"]
    assert node.call("hostile", {})["status"] == "DONE"  # the pool healed
    assert node.proc is not None and node.proc.poll() is None


def test_a_commands_leftover_processes_do_not_outlive_its_call(make_node, docker_client) -> None:
    node = make_node("function")
    node.add_runtime(name="escape-rt", run="python3 escape.py", dependencies="")
    node.deploy("escape", ESCAPE, runtime="escape-rt", min_warm=1, max_warm=1)
    for _ in range(2):  # the container stays warm: what the first call left is gone before the second
        r = node.call("escape", None)
        assert r["status"] == "DONE" and r["result"] == "escaped", r
        processes = docker_client.containers.get(r["container_id"]).top()["Processes"]
        assert not [p for p in processes if "sleep(600)" in " ".join(p)], processes


def test_a_running_agent_sweeps_containers_no_live_miniworker_owns(make_node, docker_client) -> None:
    # What a miniworker could not remove (the engine refused) and its agent's cleanup missed too.
    node = make_node("function", env={"SHOAL_AGENT_ORPHAN_SWEEP": "0.5"})
    node.deploy("echo", ECHO, entrypoint="handler:handler")
    assert node.call("echo", 1)["status"] == "DONE"
    (warm,) = node_containers(docker_client, node.node_id)
    # Made in one request (a sweep may come between the create and the start of containers.run): a container
    # created and never started is an orphan too.
    orphan = docker_client.api.create_container("pythonruntime", ["sleep", "300"],
                                                labels={LABEL_NODE: node.node_id, LABEL_MW: "gone"})["Id"]
    wait_until(node, lambda: node_containers(docker_client, node.node_id) == [warm], what="the orphan to go")
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(orphan)
    assert node.call("echo", 2)["status"] == "DONE"  # the live miniworker's container stayed
    assert "shoal_orphan_containers_removed_total 1" in node.http("/metrics")[1]


def test_an_agent_killed_leaves_no_container_and_removes_orphans_at_start(make_node, docker_client) -> None:
    node = make_node("function")
    node.deploy("echo", ECHO, entrypoint="handler:handler")
    assert node.call("echo", 1)["status"] == "DONE"
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait()
    # Its miniworkers notice the silence, remove their containers and exit.
    wait_until(node, lambda: node_containers(docker_client, node.node_id) == [], what="containers to go")
    # A container left behind (as by a crash of the whole host) is removed by the next start.
    orphan = docker_client.containers.create("pythonruntime", ["sleep", "60"], labels={LABEL_NODE: node.node_id})
    node.start()
    assert orphan.id not in set(node_containers(docker_client, node.node_id))
