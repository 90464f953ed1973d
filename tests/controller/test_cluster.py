"""Placement and resilience on a real 2-node cluster: spread, warm-first, node loss, controller restart,
and a 200 MB archive streamed to both nodes in constant memory."""

from __future__ import annotations

import http.client
import io
import os
import signal
import subprocess
import tarfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest
import zmq

from shoal import protocol
from shoal.localcluster import LocalCluster
from shoal.protocol import Msg
from tests.conftest import node_containers
from tests.controller.conftest import ECHO, SLOW, metrics, seed_runtime, upload, wait_call, wait_ready

pytestmark = pytest.mark.docker


def submit(cluster: LocalCluster, name: str, params: Any) -> str:
    status, body, _ = cluster.request("POST", f"/v1/functions/{name}/invoke-async", {"params": params})
    assert status == 202, body
    return str(body["id"])


def test_calls_spread_over_both_nodes(make_cluster: Any) -> None:
    cluster: LocalCluster = make_cluster(agents=2, placement="least-loaded")
    seed_runtime(cluster)
    upload(cluster, "slow", SLOW, entrypoint="handler:handler", min_warm=2, max_warm=2)
    wait_ready(cluster, "slow", 2)
    ids = [submit(cluster, "slow", {"s": 0.3}) for _ in range(8)]
    nodes = Counter(wait_call(cluster, i)["node"] for i in ids)
    assert set(nodes) == set(cluster.node_ids), nodes


def test_warm_first_placement_prefers_the_node_with_a_warm_container(make_cluster: Any) -> None:
    cluster: LocalCluster = make_cluster(agents=2, placement="warm-first")
    seed_runtime(cluster)
    # preload=runtime on nodes whose policy is `function`: no container until a call needs one.
    upload(cluster, "echo", ECHO, entrypoint="handler:handler", preload="runtime")
    wait_ready(cluster, "echo", 2)
    _, first, _ = cluster.request("POST", "/v1/functions/echo/invoke", {"params": 0})
    assert first["status"] == "DONE" and first["cold"] is True
    warm_node = first["node"]
    deadline = time.monotonic() + 30
    while cluster.get(f"/v1/nodes/{warm_node}")["warm_pool"].get("echo@1", 0) < 1:
        assert time.monotonic() < deadline, "the node never reported its warm container"
        time.sleep(0.1)
    later = [cluster.request("POST", "/v1/functions/echo/invoke", {"params": i})[1] for i in range(10)]
    assert {c["node"] for c in later} == {warm_node}
    assert not any(c["cold"] for c in later)


def test_kill_9_of_an_agent_with_calls_in_flight_loses_no_call(make_cluster: Any) -> None:
    cluster: LocalCluster = make_cluster(agents=2, placement="least-loaded", liveness=3)
    seed_runtime(cluster)
    upload(cluster, "slow", SLOW, entrypoint="handler:handler", min_warm=2, max_warm=4)
    wait_ready(cluster, "slow", 2)
    ids = [submit(cluster, "slow", {"s": 1.5}) for _ in range(10)]
    deadline = time.monotonic() + 60
    first = cluster.node_ids[0]
    while not any(cluster.get(f"/v1/calls/{i}")["node"] == first for i in ids):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim = cluster.nodes[first].proc
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    calls = [wait_call(cluster, i, timeout=180) for i in ids]
    assert all(c["status"] == "DONE" for c in calls), [(c["status"], c.get("error")) for c in calls]
    assert any(c["attempts"] >= 2 for c in calls)  # some were re-dispatched to node-2
    deadline = time.monotonic() + 30
    while cluster.get(f"/v1/nodes/{first}")["state"] != "lost":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    m = metrics(cluster)
    assert m['shoal_controller_calls_requeued_total{reason="node_lost"}'] >= 1
    assert m['shoal_controller_nodes{state="lost"}'] == 1 and m['shoal_controller_nodes{state="ready"}'] == 1
    assert m['shoal_controller_calls_finished_total{function="slow",status="DONE"}'] == 10


def test_a_call_on_its_last_attempt_on_a_node_only_stalled_ends_with_that_nodes_result(make_cluster: Any) -> None:
    """The node's host stalls (SIGSTOP) long enough to be taken for lost, while it runs a call on its last
    attempt. When it is heard again, its run is the call's outcome: the call used to fail NodeLost at the loss,
    and the result the node then sent was ignored as late."""
    cluster: LocalCluster = make_cluster(agents=1, liveness=3, controller_env={"SHOAL_MAX_ATTEMPTS": "1"})
    seed_runtime(cluster)
    upload(cluster, "slow", SLOW, entrypoint="handler:handler", min_warm=1, max_warm=1)
    wait_ready(cluster, "slow", 1)
    [node_id] = cluster.node_ids
    call_id = submit(cluster, "slow", {"s": 4})
    deadline = time.monotonic() + 30
    while cluster.get(f"/v1/calls/{call_id}")["status"] != "RUNNING":
        assert time.monotonic() < deadline, "the call never ran"
        time.sleep(0.05)
    agent = psutil.Process(cluster.nodes[node_id].proc.pid)
    agent.suspend()  # its miniworker runs on; the agent says nothing
    try:
        deadline = time.monotonic() + 30
        while cluster.get(f"/v1/nodes/{node_id}")["state"] != "lost":
            assert time.monotonic() < deadline, "the stalled node was never taken for lost"
            time.sleep(0.05)
        assert cluster.get(f"/v1/calls/{call_id}")["status"] == "RUNNING"  # neither failed nor placed again
        assert cluster.get("/v1/health")["awaiting_lost_nodes"] == 1
    finally:
        agent.resume()
    call = wait_call(cluster, call_id, timeout=60)
    assert (call["status"], call["result"], call["attempts"], call["node"]) == ("DONE", 4, 1, node_id), call
    assert cluster.get("/v1/health")["awaiting_lost_nodes"] == 0


def test_calls_lost_with_a_reset_link_to_a_live_node_run_again(make_cluster: Any) -> None:
    """A connection reset loses what was on its way to a node that stays alive (ZMQ reconnects underneath; its
    heartbeats barely paused). The calls run again: the node sees the gap in the numbers and says HELLO without
    them, or its next STATUS shows them missing, whichever comes first."""
    cluster: LocalCluster = make_cluster(agents=1)
    seed_runtime(cluster)
    upload(cluster, "echo", ECHO, entrypoint="handler:handler", min_warm=1, max_warm=1)
    wait_ready(cluster, "echo", 1)
    [node_id] = cluster.node_ids
    agent = psutil.Process(cluster.nodes[node_id].proc.pid)
    agent.suspend()  # it reads nothing: the CALLs fill its socket's buffers, the rest waits in the controller's
    try:
        params = ["x" * 2_500_000, "y" * 2_500_000, "small"]  # more than loopback's buffers hold
        ids = [submit(cluster, "echo", p) for p in params]
        deadline = time.monotonic() + 20
        while any(cluster.get(f"/v1/calls/{i}")["status"] != "DISPATCHED" for i in ids):  # sent to the node
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)
        # Reset the node's end of the link: the messages cut in half are dropped, and ZMQ reconnects.
        subprocess.run(["ss", "-K", "state", "established", "dst", "127.0.0.1", "dport", "=",
                        f":{cluster.zmq_port}"], check=True, capture_output=True)
    finally:
        agent.resume()
    calls = [wait_call(cluster, i, timeout=60) for i in ids]
    assert [(c["status"], c["result"]) for c in calls] == [("DONE", {"echo": p}) for p in params]
    assert [c["attempts"] for c in calls] == [2, 2, 2]
    m = metrics(cluster)
    requeued = {k.split('"')[1]: v for k, v in m.items() if k.startswith("shoal_controller_calls_requeued_total")}
    assert sum(requeued.values()) == 3 and set(requeued) <= {"node_dropped", "node_hello"}, requeued
    assert cluster.get(f"/v1/nodes/{node_id}")["state"] == "ready"


def test_controller_killed_and_restarted_with_queued_async_calls_completes_them_all(make_cluster: Any) -> None:
    cluster: LocalCluster = make_cluster(agents=2)
    seed_runtime(cluster)
    upload(cluster, "slow", SLOW, entrypoint="handler:handler", max_warm=1)
    wait_ready(cluster, "slow", 2)
    ids = [submit(cluster, "slow", {"s": 0.2}) for _ in range(30)]
    cluster.stop_controller(signal.SIGKILL)
    cluster.start_controller()
    calls = [wait_call(cluster, i, timeout=180) for i in ids]
    assert [c["status"] for c in calls] == ["DONE"] * 30
    assert cluster.get("/v1/health")["active"] == 0
    # The new controller accepted nothing itself: every call it finished, it had taken from the store.
    m = metrics(cluster)
    recovered = m['shoal_controller_calls_requeued_total{reason="controller_restarted"}']
    assert recovered >= 1 and m['shoal_controller_calls_finished_total{function="slow",status="DONE"}'] == recovered
    assert not any(k.startswith("shoal_controller_calls_accepted_total") for k in m)


def wait_status(cluster: LocalCluster, call_id: str, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while cluster.get(f"/v1/calls/{call_id}")["status"] != status:
        assert time.monotonic() < deadline, f"call {call_id} never {status}"
        time.sleep(0.05)


def test_calls_that_end_while_the_controller_is_down_are_taken_from_their_nodes_not_run_again(
        make_cluster: Any) -> None:
    """Two calls run, one per node, when the controller is killed; they end while it is away and the agents hold
    their results. The restarted controller takes those results (they come before the nodes' HELLOs, which no
    longer list the calls): each call ends DONE having run once. It used to drop them and run both again."""
    cluster: LocalCluster = make_cluster(agents=2)
    seed_runtime(cluster)
    upload(cluster, "slow", SLOW, entrypoint="handler:handler", min_warm=1, max_warm=1)
    wait_ready(cluster, "slow", 2)
    ids = [submit(cluster, "slow", {"s": 3}) for _ in range(2)]
    for call_id in ids:
        wait_status(cluster, call_id, "RUNNING")
    assert {cluster.get(f"/v1/calls/{i}")["node"] for i in ids} == set(cluster.node_ids)  # one on each node
    cluster.stop_controller(signal.SIGKILL)
    time.sleep(4)  # the calls end meanwhile
    cluster.start_controller()
    calls = [wait_call(cluster, i, timeout=120) for i in ids]
    assert [(c["status"], c["attempts"], c["result"]) for c in calls] == [("DONE", 1, 3)] * 2
    m = metrics(cluster)
    assert m['shoal_controller_calls_finished_total{function="slow",status="DONE"}'] == 2
    assert not any(k.startswith('shoal_controller_calls_requeued_total{reason="node_') for k in m), m


def test_a_200mb_archive_reaches_both_agents_in_constant_memory(make_cluster: Any, tmp_path: Any) -> None:
    cluster: LocalCluster = make_cluster(agents=2)
    seed_runtime(cluster)
    archive = tmp_path / "big.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tf:
        payload = os.urandom(200 << 20)
        info = tarfile.TarInfo("blob.bin")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo("handler.py")
        code = b"import os\ndef handler(p):\n    return os.path.getsize('blob.bin')\n"
        info.size = len(code)
        tf.addfile(info, io.BytesIO(code))
        del payload
    size = archive.stat().st_size
    assert size > 200 << 20
    procs = {"controller": psutil.Process(cluster.controller.pid)} if cluster.controller else {}
    procs.update({n: psutil.Process(a.proc.pid) for n, a in cluster.nodes.items()})
    base = {n: p.memory_info().rss for n, p in procs.items()}
    peak = dict(base)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for n, p in procs.items():
                peak[n] = max(peak[n], p.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=300)
        with open(archive, "rb") as f:
            conn.request("POST", "/v1/functions/big?runtime=pythonruntime&entrypoint=handler:handler", body=f,
                         headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        resp = conn.getresponse()
        assert resp.status == 201, resp.read()
        wait_ready(cluster, "big", 2, timeout=300)
    finally:
        stop.set()
        sampler.join()
    growth = {n: (peak[n] - base[n]) / 2**20 for n in procs}
    assert all(g < 64 for g in growth.values()), growth
    _, call, _ = cluster.request("POST", "/v1/functions/big/invoke", {})
    assert call["status"] == "DONE" and call["result"] == 200 << 20


def test_garbage_frames_to_the_controller_are_dropped_and_a_strangers_result_is_ignored(make_cluster: Any) -> None:
    cluster: LocalCluster = make_cluster(agents=1)
    seed_runtime(cluster)
    upload(cluster, "slow", SLOW, entrypoint="handler:handler")
    wait_ready(cluster, "slow", 1)
    call_id = submit(cluster, "slow", {"s": 2})
    _, reg, _ = cluster.request("POST", "/register", {"endpoint_id": "stranger"})
    ctx: zmq.Context[Any] = zmq.Context.instance()
    stranger: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    stranger.setsockopt(zmq.IDENTITY, b"stranger")  # named as an agent names itself, but it never said HELLO
    stranger.setsockopt(zmq.LINGER, 5000)  # closed at once, but what it sent still goes out
    stranger.connect(reg["task_url"])
    garbage = [[b"JUNK", b"{}"], [b"RESULT", b"{not json"], [b"RESULT", b'{"call_id": 1}'], [b"\xff" * 100],
               [b"FETCH", b'{"sha256": "zz", "offset": -1, "credit": 1}'], [b"HELLO", b"[]"]]
    for frames in garbage:
        stranger.send_multipart(frames)
    # Well-formed, but from a peer that never said HELLO: not the call's outcome. It is asked to introduce itself.
    stranger.send_multipart(protocol.encode(Msg.RESULT, {"call_id": call_id, "status": "DONE", "result": "forged"}))
    assert stranger.poll(30_000), "the controller did not answer the stranger"
    answer = protocol.decode(stranger.recv_multipart())
    assert answer.type == Msg.WELCOME and answer.header.get("hello") is True
    stranger.close()
    # A peer with ZMQ's anonymous (binary) identity cannot be a node: what it sends is dropped as well.
    anonymous: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    anonymous.setsockopt(zmq.LINGER, 5000)
    anonymous.connect(reg["task_url"])
    anonymous.send_multipart(protocol.encode(Msg.RESULT, {"call_id": call_id, "status": "DONE", "result": "forged"}))
    anonymous.close()
    dropped = len(garbage) + 1
    deadline = time.monotonic() + 30
    while metrics(cluster).get('shoal_protocol_errors_total{socket="nodes"}', 0) < dropped:
        assert time.monotonic() < deadline, metrics(cluster)
        time.sleep(0.1)
    assert metrics(cluster)['shoal_protocol_errors_total{socket="nodes"}'] == dropped
    call = wait_call(cluster, call_id)
    assert call["status"] == "DONE" and call["result"] == 2
    assert cluster.request("POST", "/v1/functions/slow/invoke", {"params": {"s": 0}})[1]["result"] == 0
    assert cluster.controller is not None and cluster.controller.poll() is None


def test_redis_down_answers_503_and_calls_are_taken_again_once_it_is_back(make_cluster: Any) -> None:
    cluster: LocalCluster = make_cluster(agents=1)
    seed_runtime(cluster)
    upload(cluster, "echo", ECHO, entrypoint="handler:handler")
    wait_ready(cluster, "echo", 1)
    assert wait_call(cluster, submit(cluster, "echo", 1))["status"] == "DONE"
    redis = cluster._redis
    assert redis is not None and cluster.controller is not None
    redis.stop()
    for route in ("invoke", "invoke-async"):
        for _ in range(3):
            status, body, _ = cluster.request("POST", f"/v1/functions/echo/{route}", {"params": 2})
            assert status == 503 and body["error"]["code"] == "store_unavailable", (status, body)
    assert cluster.controller.poll() is None
    redis.start()
    deadline = time.monotonic() + 30
    while True:
        status, body, _ = cluster.request("POST", "/v1/functions/echo/invoke", {"params": 3})
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200 and body["status"] == "DONE" and body["result"] == {"echo": 3}, body


def test_after_a_redis_restart_no_request_fails_on_a_connection_it_closed(make_cluster: Any) -> None:
    """Each connection the controller held to the old server failed the first command sent on it: up to 21
    requests answered 503 after a restart, though Redis was back."""
    cluster: LocalCluster = make_cluster(agents=1)
    seed_runtime(cluster)
    upload(cluster, "echo", ECHO, entrypoint="handler:handler")
    wait_ready(cluster, "echo", 1)
    call_id = submit(cluster, "echo", 1)
    assert wait_call(cluster, call_id)["status"] == "DONE"
    with ThreadPoolExecutor(8) as pool:  # several connections in the controller's pool, each used once
        assert set(pool.map(lambda _: cluster.request("GET", f"/v1/calls/{call_id}")[0], range(32))) == {200}
    redis = cluster._redis
    assert redis is not None
    redis.stop()
    redis.start()  # (same port, same directory: the calls are back from its AOF)
    statuses = [cluster.request("GET", path)[0] for _ in range(8)
                for path in (f"/v1/calls/{call_id}", "/v1/runtimes", "/v1/functions")]
    assert statuses == [200] * len(statuses)
    status, body, _ = cluster.request("POST", "/v1/functions/echo/invoke", {"params": 2})
    assert status == 200 and body["result"] == {"echo": 2}, body


def test_calls_waiting_for_room_on_a_node_are_placed_as_its_calls_end(make_cluster: Any) -> None:
    # The node queues 2 calls of a function: the controller holds the rest, and each result must place the
    # next one (no new request comes to wake it). Every call ends; none came back REJECTED to be placed again.
    cluster: LocalCluster = make_cluster(agents=1, agent_env={"SHOAL_AGENT_QUEUE_LIMIT": "2"})
    seed_runtime(cluster)
    upload(cluster, "slow", SLOW, entrypoint="handler:handler", min_warm=1, max_warm=1)
    wait_ready(cluster, "slow", 1)
    ids = [submit(cluster, "slow", {"s": 0.1}) for _ in range(12)]
    calls = [wait_call(cluster, i, timeout=60) for i in ids]
    assert [c["status"] for c in calls] == ["DONE"] * 12
    [node] = cluster.get("/v1/nodes")
    # Nothing was sent twice but what the node lost (a re-HELLO under load re-sends what it does not run).
    assert node["dispatched"] == sum(c["attempts"] for c in calls) and node["inflight_by_function"] == {}


def test_deleting_a_function_cancels_its_waiting_calls_and_its_nodes_forget_it(make_cluster: Any,
                                                                               docker_client: Any) -> None:
    # The node takes one call of it at a time: the others wait in the controller.
    cluster: LocalCluster = make_cluster(agents=1, agent_env={"SHOAL_AGENT_QUEUE_LIMIT": "1"})
    seed_runtime(cluster)
    upload(cluster, "slow", SLOW, entrypoint="handler:handler", min_warm=1, max_warm=1)
    wait_ready(cluster, "slow", 1)
    [node_id] = cluster.node_ids
    ids = [submit(cluster, "slow", {"s": 3})] + [submit(cluster, "slow", {"s": 0}) for _ in range(3)]
    deadline = time.monotonic() + 30
    while cluster.get(f"/v1/calls/{ids[0]}")["status"] != "RUNNING":  # in its container
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert node_containers(docker_client, node_id)
    assert cluster.request("DELETE", "/v1/functions/slow")[0] == 204
    calls = [wait_call(cluster, i, timeout=60) for i in ids]
    assert [c["status"] for c in calls] == ["DONE", "CANCELLED", "CANCELLED", "CANCELLED"]
    assert {c["error"]["type"] for c in calls[1:]} == {"FunctionDeleted"}
    # Once its last call ended, the node forgot it: its warm container is gone, and it is not started again.
    deadline = time.monotonic() + 30
    while node_containers(docker_client, node_id):
        assert time.monotonic() < deadline, "the deleted function's container stayed"
        time.sleep(0.1)
    assert cluster.get(f"/v1/nodes/{node_id}")["functions_ready"] == []


def test_an_old_version_a_node_dropped_runs_again_when_invoked(make_cluster: Any) -> None:
    cluster: LocalCluster = make_cluster(agents=1, agent_env={"SHOAL_AGENT_RETIRE_AFTER": "1"})
    seed_runtime(cluster)
    for n in (1, 2):
        upload(cluster, "v", {"handler.py": f"def handler(p):\n    return {n}\n"}, entrypoint="handler:handler")
        wait_ready(cluster, "v", 1)
        assert cluster.request("POST", "/v1/functions/v/invoke", {})[1]["result"] == n
    [node_id] = cluster.node_ids
    deadline = time.monotonic() + 60
    while "v@1" in cluster.get(f"/v1/nodes/{node_id}")["functions_ready"]:
        assert time.monotonic() < deadline, "v@1 was not retired"
        time.sleep(0.2)
    status, call, _ = cluster.request("POST", "/v1/functions/v/invoke", {"version": 1, "wait": 60})
    assert status == 200 and call["status"] == "DONE" and call["result"] == 1 and call["version"] == 1, call
