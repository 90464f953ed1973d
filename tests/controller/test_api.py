"""The controller's REST API on a real cluster (Redis, Docker, 2 agents): own API, seed routes, bad input."""

from __future__ import annotations

import io
import json
import subprocess
import time
import urllib.parse
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from controller.api.openapi import DOCUMENT
from shoal.localcluster import LocalCluster
from tests.controller.conftest import ECHO, SLOW, build_tar_gz, metrics, seed_runtime, upload, wait_call, wait_ready
from tests.shoal.test_archive import zip_loop, zip_of_version
from tests.shoal.test_httpserver import MALFORMED, assert_json_error, raw_http, raw_http_answer

pytestmark = pytest.mark.docker
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def cluster(make_cluster: Any) -> LocalCluster:
    c: LocalCluster = make_cluster(agents=2, controller_env={"SHOAL_MAX_ARCHIVE_BYTES": str(8 << 20)})
    seed_runtime(c)
    return c


@pytest.fixture(scope="module")
def input_cluster(docker_url: str) -> Iterator[LocalCluster]:
    """A controller (and its Redis) with no agent, shared by this module's cases of bad input in one test worker:
    input is refused before any node is asked, and none of the cases leaves anything behind (a cluster of 2 agents
    for each of its 60 cases took a fifth of the suite's CPU besides the Ansible test)."""
    c = LocalCluster(docker_url, agents=0, name=f"in{uuid.uuid4().hex[:6]}", liveness=10,
                     controller_env={"SHOAL_MAX_ARCHIVE_BYTES": str(8 << 20)})
    c.start()
    try:
        seed_runtime(c)
        yield c
    finally:
        c.stop()


@pytest.mark.xdist_group("port-3000")
def test_the_main_seeds_curl_examples_work_as_written(make_cluster: Any) -> None:
    cluster: LocalCluster = make_cluster(agents=2, port=3000)
    out = subprocess.run(["bash", str(EXAMPLES / "api" / "seed-examples.sh")], capture_output=True, text=True,
                         timeout=300, check=True).stdout.splitlines()
    runtime, function, invoked, runtimes, functions, calls, call = (json.loads(line) for line in out if line)
    assert runtime["name"] == "pythonruntime" and runtime["run"] == "python3 test.py"
    assert function["functionName"] == "dice" and function["runtimeName"] == "pythonruntime"
    assert function["originalname"] == "python.tar.gz" and function["fieldname"] == "module"
    assert invoked == {"funcName": "dice", "params": {"roll": "4d6"}, "callNum": 1, "status": "PENDING", "result": ""}
    assert runtimes == ["pythonruntime"] and functions == ["dice"]
    assert list(calls) == ["c1"] and calls["c1"]["callNum"] == 1 and calls["c1"]["funcName"] == "dice"
    assert call["callNum"] == 1 and call["status"] in ("PENDING", "RUNNING", "DONE")
    deadline = time.monotonic() + 120
    while (call := cluster.get("/call/1"))["status"] != "DONE":
        assert call["status"] in ("PENDING", "RUNNING"), call
        assert time.monotonic() < deadline
        time.sleep(0.1)
    values = json.loads(call["result"])
    assert isinstance(call["result"], str) and len(values) == 4 and all(1 <= v <= 6 for v in values)
    assert cluster.get("/calls")["c1"]["status"] == "DONE"


def test_forwarder_seed_routes(cluster: LocalCluster) -> None:
    assert cluster.request("GET", "/ping")[:2] == (200, "pong")
    assert cluster.get("/version")["version"]
    status, reg, _ = cluster.request("POST", "/register", {"endpoint_id": "ep-1", "redis_url": "redis://x"})
    assert status == 200 and reg["endpoint_id"] == "ep-1"
    assert reg["task_url"].startswith("tcp://127.0.0.1:") and reg["result_url"] == reg["task_url"]
    # The mappings: the endpoint that registered (not connected: "registered") and the nodes (each registered as
    # itself when it started), all with the URLs /register answers.
    endpoints = cluster.get("/list_endpoints")
    assert set(endpoints) == {"ep-1", *cluster.node_ids}
    assert endpoints["ep-1"]["state"] == "registered" and endpoints["ep-1"]["registered"] > 0
    assert all(e["task_url"] == e["result_url"] == e["command_port"] == reg["task_url"] for e in endpoints.values())
    cluster.wait_nodes(len(cluster.node_ids))  # (a node briefly silent under load is not ready meanwhile)
    assert cluster.get("/list_endpoints")[cluster.node_ids[0]]["state"] == "ready"


def test_the_link_urls_are_the_advertised_address_else_the_bound_one() -> None:
    from types import SimpleNamespace

    from controller.api.compat import link_urls
    from controller.config import ControllerConfig

    def urls(**config: Any) -> set[str]:
        svc: Any = SimpleNamespace(config=ControllerConfig(**config), hub=SimpleNamespace(url="tcp://0.0.0.0:41234"))
        return set(link_urls(svc).values())

    assert urls(zmq_bind="tcp://0.0.0.0:5555", zmq_advertise="tcp://ctl-1.example:5555") == {"tcp://ctl-1.example:5555"}
    assert urls(zmq_bind="tcp://127.0.0.1:5555") == {"tcp://127.0.0.1:5555"}
    assert urls(zmq_bind="tcp://0.0.0.0:0") == {"tcp://0.0.0.0:41234"}  # the port the hub was given


def test_sync_async_states_listing_and_cancel(cluster: LocalCluster) -> None:
    upload(cluster, "echo", ECHO, entrypoint="handler:handler")
    upload(cluster, "slow", SLOW, entrypoint="handler:handler")
    wait_ready(cluster, "echo", 2)
    status, call, _ = cluster.request("POST", "/v1/functions/echo/invoke", {"params": {"x": 1}})
    assert status == 200 and call["status"] == "DONE" and call["result"] == {"echo": {"x": 1}}
    big = "x" * (3 << 20)  # a body of many TCP segments (it used to be read cut, as malformed JSON)
    status, call, _ = cluster.request("POST", "/v1/functions/echo/invoke", {"params": big})
    assert status == 200 and call["result"] == {"echo": big}
    assert set(call["timestamps"]) == {"QUEUED", "DISPATCHED", "RUNNING", "DONE"}
    ts = call["timestamps"]
    assert ts["QUEUED"] <= ts["DISPATCHED"] <= ts["DONE"] and ts["RUNNING"] <= ts["DONE"]
    assert call["node"] in cluster.node_ids and call["version"] == 1

    status, accepted, headers = cluster.request("POST", "/v1/functions/echo/invoke-async", {"params": 2})
    assert status == 202 and headers["Location"] == f"/v1/calls/{accepted['id']}"
    assert wait_call(cluster, accepted["id"])["result"] == {"echo": 2}

    wait_ready(cluster, "slow", 2)
    status, slow, _ = cluster.request("POST", "/v1/functions/slow/invoke-async", {"params": {"s": 30}})
    deadline = time.monotonic() + 60
    while cluster.get(f"/v1/calls/{slow['id']}")["status"] != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert cluster.request("POST", f"/v1/calls/{slow['id']}/cancel")[0] == 202
    cancelled = wait_call(cluster, slow["id"])
    assert cancelled["status"] == "CANCELLED"
    assert cluster.request("POST", f"/v1/calls/{slow['id']}/cancel")[0] == 409

    # A sync call that outlasts its wait answers 202 with where to look.
    status, late, headers = cluster.request("POST", "/v1/functions/slow/invoke", {"params": {"s": 2}, "wait": 0.2})
    assert status == 202 and "Location" in headers
    assert wait_call(cluster, late["id"])["status"] == "DONE"

    page = cluster.get("/v1/calls?function=echo&limit=1")
    assert len(page["calls"]) == 1 and page["calls"][0]["function"] == "echo" and page["next_cursor"]
    rest = cluster.get(f"/v1/calls?function=echo&limit=10&cursor={page['next_cursor']}")
    assert {c["id"] for c in rest["calls"]}.isdisjoint({page["calls"][0]["id"]})
    assert len(page["calls"]) + len(rest["calls"]) == 3
    done = cluster.get("/v1/calls?status=CANCELLED")["calls"]
    assert [c["id"] for c in done] == [slow["id"]]


def test_timeouts_and_failures_come_back_with_reasons(cluster: LocalCluster) -> None:
    upload(cluster, "slow", SLOW, entrypoint="handler:handler")
    bad = {"handler.py": "def handler(p):\n    raise KeyError('nope')\n"}
    upload(cluster, "bad", bad, entrypoint="handler:handler")
    wait_ready(cluster, "bad", 1)
    _, failed, _ = cluster.request("POST", "/v1/functions/bad/invoke", {})
    assert failed["status"] == "FAILED" and failed["error"]["type"] == "KeyError"
    _, timed, _ = cluster.request("POST", "/v1/functions/slow/invoke", {"params": {"s": 30}, "timeout": 1,
                                                                         "wait": 120})
    assert timed["status"] == "TIMEOUT" and "timeout" in timed["error"]["message"]
    # The controller's metrics count each outcome, and nothing is left waiting or in flight.
    m = metrics(cluster)
    assert m['shoal_controller_calls_accepted_total{function="bad"}'] == 1
    assert m['shoal_controller_calls_finished_total{function="bad",status="FAILED"}'] == 1
    assert m['shoal_controller_calls_finished_total{function="slow",status="TIMEOUT"}'] == 1
    assert m['shoal_controller_call_duration_seconds_count{function="slow"}'] == 1
    assert m['shoal_controller_call_duration_seconds_bucket{function="slow",le="0.5"}'] == 0  # it ran 1 s
    assert m["shoal_controller_calls_queued"] == 0 and m["shoal_controller_calls_active"] == 0
    assert m['shoal_controller_nodes{state="ready"}'] == 2 and m['shoal_controller_nodes{state="lost"}'] == 0
    assert sum(v for k, v in m.items() if k.startswith("shoal_controller_node_dispatched_total{")) == 2
    sizes = sum(cluster.get(f"/v1/functions/{name}")["size"] for name in ("slow", "bad"))
    assert m["shoal_controller_archive_bytes_sent_total"] >= sizes  # each archive reached at least one node


def test_idempotency_key_makes_a_retry_safe(cluster: LocalCluster) -> None:
    upload(cluster, "echo", ECHO, entrypoint="handler:handler")
    key = {"Idempotency-Key": uuid.uuid4().hex}
    _, first, _ = cluster.request("POST", "/v1/functions/echo/invoke-async", {"params": 1}, headers=key)
    _, second, _ = cluster.request("POST", "/v1/functions/echo/invoke-async", {"params": 1}, headers=key)
    assert first["id"] == second["id"]
    for bad in ("cl\xe9", "a\tb", "x" * 201):  # sent as latin-1 bytes; a control character; too long
        status, body, _ = cluster.request("POST", "/v1/functions/echo/invoke-async", {"params": 1},
                                          headers={"Idempotency-Key": bad})
        assert status == 400 and "Idempotency-Key" in body["error"]["message"], (bad, body)
    # Concurrent requests with one key make one call (a replay used to create its own while the first was
    # not stored yet).
    race = {"Idempotency-Key": uuid.uuid4().hex}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: cluster.request("POST", "/v1/functions/echo/invoke-async", {"params": 2},
                                                          headers=race), range(8)))
    assert {a[0] for a in answers} == {202} and len({a[1]["id"] for a in answers}) == 1, answers
    # A single call's key and a batch's key never meet (a batch's keys used to be stored as "batch:" + key).
    batch_key = uuid.uuid4().hex
    _, batch, _ = cluster.request("POST", "/v1/functions/echo/invoke-batch", {"calls": [{"params": 3}]},
                                  headers={"Idempotency-Key": batch_key})
    _, single, _ = cluster.request("POST", "/v1/functions/echo/invoke-async", {"params": 4},
                                   headers={"Idempotency-Key": "batch:" + batch_key})
    assert single["id"] != batch["calls"][0]["id"]
    for call_id in (first["id"], answers[0][1]["id"], batch["calls"][0]["id"], single["id"]):
        assert wait_call(cluster, call_id)["status"] == "DONE"
    assert len(cluster.get("/v1/calls?function=echo")["calls"]) == 4


def test_a_batch_of_calls_is_stored_and_queued_in_one_request(cluster: LocalCluster) -> None:
    upload(cluster, "echo", ECHO, entrypoint="handler:handler")
    key = {"Idempotency-Key": uuid.uuid4().hex}
    status, batch, _ = cluster.request("POST", "/v1/functions/echo/invoke-batch",
                                       {"calls": [{"params": i} for i in range(40)], "timeout": 20}, headers=key)
    assert status == 202 and batch["count"] == 40 and len({c["id"] for c in batch["calls"]}) == 40
    assert all(c["status"] == "QUEUED" and c["location"] == f"/v1/calls/{c['id']}" for c in batch["calls"])
    calls = [wait_call(cluster, c["id"]) for c in batch["calls"]]
    assert [c["result"] for c in calls] == [{"echo": i} for i in range(40)]  # each its own params, in order
    assert {c["status"] for c in calls} == {"DONE"} and {c["timeout"] for c in calls} == {20}
    assert len({c["num"] for c in calls}) == 40  # each has its seed-API number too
    # A retried batch (same key, same request) creates nothing: the first batch's calls, as they stand now.
    status, again, _ = cluster.request("POST", "/v1/functions/echo/invoke-batch",
                                       {"calls": [{"params": i} for i in range(40)], "timeout": 20}, headers=key)
    assert status == 202 and [c["id"] for c in again["calls"]] == [c["id"] for c in batch["calls"]]
    assert {c["status"] for c in again["calls"]} == {"DONE"}
    # The key with another request (here, no timeout) is refused: it names the first batch's calls.
    status, other, _ = cluster.request("POST", "/v1/functions/echo/invoke-batch",
                                       {"calls": [{"params": i} for i in range(40)]}, headers=key)
    assert status == 409 and "another request" in other["error"]["message"], other


def test_versions_runtimes_and_deletes(cluster: LocalCluster) -> None:
    v1 = upload(cluster, "v", {"handler.py": "def handler(p):\n    return 1\n"}, entrypoint="handler:handler")
    v2 = upload(cluster, "v", {"handler.py": "def handler(p):\n    return 2\n"}, entrypoint="handler:handler")
    assert (v1["version"], v2["version"]) == (1, 2) and v1["sha256"] != v2["sha256"]
    fn = cluster.get("/v1/functions/v")
    assert fn["version"] == 2 and fn["versions"] == [1, 2] and fn["size"] > 0 and fn["runtime"] == "pythonruntime"
    _, call, _ = cluster.request("POST", "/v1/functions/v/invoke", {})
    assert call["result"] == 2 and call["version"] == 2
    assert cluster.request("DELETE", "/v1/runtimes/pythonruntime")[0] == 409
    assert cluster.request("DELETE", "/v1/functions/v")[0] == 204
    assert cluster.request("GET", "/v1/functions/v")[0] == 404
    assert cluster.get("/v1/runtimes/pythonruntime")["image"] == "pythonruntime"
    # Multipart upload on the v1 route, with options as form fields.
    boundary = "shoalboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"runtime\"\r\n\r\npythonruntime\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"entrypoint\"\r\n\r\nhandler:handler\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"f.tar.gz\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + build_tar_gz(ECHO) + \
        f"\r\n--{boundary}--\r\n".encode()
    status, rec, _ = cluster.request("POST", "/v1/functions/mp", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 201 and rec["entrypoint"] == "handler:handler" and rec["original_name"] == "f.tar.gz"
    # A file name that is not UTF-8 is kept readable (it used to be stored, then break every listing with a 500).
    status, rec, _ = cluster.request("POST", "/v1/functions/mp2?runtime=pythonruntime",
                                     **form([("entrypoint", b"handler:handler")], build_tar_gz(ECHO), b"a\xffb.tgz"))
    assert status == 201 and rec["original_name"] == "a\ufffdb.tgz", rec
    assert {f["name"] for f in cluster.get("/v1/functions")} >= {"mp", "mp2"}
    # The runtime and options may come after the file (`curl -F archive=@f.tgz -F runtime=...`): they were ignored
    # (a 400 for want of a runtime, or an option silently left at its default).
    status, rec, _ = cluster.request("POST", "/v1/functions/mp3", **form_around(
        [("timeout", b"7")], [("runtime", b"pythonruntime"), ("entrypoint", b"handler:handler")]))
    assert status == 201 and (rec["runtime"], rec["entrypoint"], rec["timeout"]) == \
        ("pythonruntime", "handler:handler", 7), rec
    status, call, _ = cluster.request("POST", "/v1/functions/mp3/invoke", {"params": {"x": 1}})
    assert status == 200 and call["result"] == {"echo": {"x": 1}}, call


def raw(data: bytes) -> dict[str, Any]:
    return {"data": data, "headers": {"Content-Type": "application/octet-stream"}}


def multipart(field: str) -> dict[str, Any]:
    disposition = f'form-data; name="{field}"; filename="a"'
    data = f"--x\r\nContent-Disposition: {disposition}\r\n\r\nabc\r\n--x--\r\n".encode()
    return {"data": data, "headers": {"Content-Type": "multipart/form-data; boundary=x"}}


def form(fields: list[tuple[str, bytes]], file: bytes = b"", filename: bytes = b"a.tgz") -> dict[str, Any]:
    """A multipart body: form fields, then the file field ``archive``."""
    parts = [b'--x\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value + b"\r\n"
             for name, value in fields]
    parts.append(b'--x\r\nContent-Disposition: form-data; name="archive"; filename="' + filename + b'"\r\n\r\n'
                 + file + b"\r\n--x--\r\n")
    return {"data": b"".join(parts), "headers": {"Content-Type": "multipart/form-data; boundary=x"}}


def zip_slip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../escape.py", "x")
    return buf.getvalue()


ECHO_TGZ = build_tar_gz(ECHO)
# Found by schemathesis: a part header aiohttp cannot parse (it used to surface as a 500).
BAD_MULTIPART_HEADER = {"data": b'--x\r\nContent-Disposition: form-data; name="\xf3\x03"\r\n\r\na\r\n--x--\r\n',
                        "headers": {"Content-Type": "multipart/form-data; boundary=x"}}


def form_around(before: list[tuple[str, bytes]], after: list[tuple[str, bytes]], file: bytes = ECHO_TGZ,
                files: int = 1) -> dict[str, Any]:
    """A multipart body: the form fields ``before``, the file field ``archive`` (``files`` times), the fields
    ``after``."""
    def field(name: str, value: bytes) -> bytes:
        return b'--x\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value + b"\r\n"

    archive = b'--x\r\nContent-Disposition: form-data; name="archive"; filename="a.tgz"\r\n\r\n' + file + b"\r\n"
    data = b"".join([*(field(n, v) for n, v in before), archive * files, *(field(n, v) for n, v in after),
                     b"--x--\r\n"])
    return {"data": data, "headers": {"Content-Type": "multipart/form-data; boundary=x"}}


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("POST", "/v1/runtimes", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/v1/runtimes", {"body": ["a", "list"]}, 400),
        ("POST", "/v1/runtimes", {"body": {"image": 42}}, 400),
        ("POST", "/v1/runtimes", {"body": {"image": "x", "path": "relative"}}, 400),
        ("GET", "/v1/runtimes/nope", {}, 404),
        ("POST", "/v1/functions/f?runtime=nope", raw(b"x"), 404),
        ("POST", "/v1/functions/f?runtime=pythonruntime", raw(b""), 400),
        ("POST", "/v1/functions/f?runtime=pythonruntime", raw(b"not an archive"), 400),
        ("POST", "/v1/functions/f?runtime=pythonruntime", raw(zip_slip()), 400),
        ("POST", "/v1/functions/f?runtime=pythonruntime", raw(zip_loop()), 400),
        ("POST", "/v1/functions/f?runtime=pythonruntime", raw(b"\0" * (9 << 20)), 413),
        ("POST", "/v1/functions/f?runtime=pythonruntime&timeout=abc", raw(ECHO_TGZ), 400),
        ("POST", "/v1/functions/f?runtime=pythonruntime&entrypoint=bad", raw(ECHO_TGZ), 400),
        ("POST", "/v1/functions/..%2Fetc?runtime=pythonruntime", raw(ECHO_TGZ), 400),
        ("POST", "/v1/functions/nope/invoke", {"body": {}}, 404),
        ("POST", "/v1/functions/nope/invoke", {"data": b"[", "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/v1/functions/nope/invoke", {"data": b'{"params": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                               "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/invokeFunction", {"body": {"funcName": "nope", "params": json.loads("[" * 200 + "]" * 200)}}, 400),
        ("POST", "/v1/functions/nope/invoke", {"data": b'{"params": NaN}',
                                               "headers": {"Content-Type": "application/json"}}, 400),
        # UTF-16: the depth check, made on the bytes as UTF-8, saw no bracket (nested 976 deep: a 500 where stored).
        ("POST", "/v1/functions/nope/invoke", {"data": ('{"params": ["\\"", ' + "[" * 976 + "]" * 976 + "]}").encode(
            "utf-16-le"), "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/v1/functions/f?runtime=pythonruntime", raw(zip_of_version(64)), 400),  # (zipfile: 6.3 at most)
        ("POST", "/v1/functions/nope/invoke", {"data": b'{"params": "\\ud800"}',  # no UTF-8 can carry it on
                                               "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/v1/functions/f?runtime=pythonruntime", form([(f"o{i}", b"1") for i in range(17)], ECHO_TGZ), 400),
        ("POST", "/v1/functions/f?runtime=pythonruntime", form([("entrypoint", b"x" * 5000)], ECHO_TGZ), 400),
        ("GET", "/call/%C2%B2", {}, 400),  # a digit to str.isdigit, not to int()
        ("POST", "/v1/functions/nope/invoke", {"body": {"params": "x" * (4 << 20)}}, 413),
        ("POST", "/v1/functions/nope/invoke", {"body": {"timeout": "soon"}}, 400),
        ("POST", "/v1/functions/nope/invoke", {"body": {"timeout": -3}}, 400),
        ("POST", "/v1/functions/nope/invoke-batch", {"body": {"calls": [{}]}}, 404),
        ("POST", "/v1/functions/nope/invoke-batch", {"body": {}}, 400),
        ("POST", "/v1/functions/nope/invoke-batch", {"body": {"calls": []}}, 400),
        ("POST", "/v1/functions/nope/invoke-batch", {"body": {"calls": "x"}}, 400),
        ("POST", "/v1/functions/nope/invoke-batch", {"body": {"calls": [{}, 1]}}, 400),
        ("POST", "/v1/functions/nope/invoke-batch", {"body": {"calls": [{}] * 1001}}, 400),
        ("POST", "/v1/functions/nope/invoke-batch", {"body": {"calls": [{}], "timeout": 0}}, 400),
        ("GET", "/v1/calls/nope", {}, 404),
        ("GET", "/v1/calls?status=WHATEVER", {}, 400),
        ("GET", "/v1/calls?limit=0", {}, 400),
        ("GET", "/v1/calls?cursor=x", {}, 400),
        ("GET", "/v1/nodes/nope", {}, 404),
        ("GET", "/no/such/route", {}, 404),
        ("DELETE", "/v1/calls", {}, 405),
        ("POST", "/registerRuntime", {"data": b"{", "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/registerFunction/pythonruntime/dice", {"body": {"not": "multipart"}}, 415),
        ("POST", "/registerFunction/nope/dice", multipart("module"), 404),
        ("POST", "/registerFunction/pythonruntime/dice", multipart("other"), 400),
        ("POST", "/v1/functions/f", BAD_MULTIPART_HEADER, 400),
        ("POST", "/v1/functions/f", form_around([], [("entrypoint", b"handler:handler")]), 400),  # no runtime
        ("POST", "/v1/functions/f", form_around([], [("runtime", b"nope")]), 404),  # read after the archive
        ("POST", "/v1/functions/f", form_around([("runtime", b"pythonruntime")], [("runtime", b"pythonruntime")]),
         400),  # given twice
        ("POST", "/v1/functions/f?timeout=5", form_around([("runtime", b"pythonruntime")], [("timeout", b"5")]), 400),
        ("POST", "/v1/functions/f", form_around([("runtime", b"pythonruntime")], [], files=2), 400),
        ("POST", "/v1/functions/f", form_around([("runtime", b"pythonruntime")], [("timeout", b"-1")]), 400),
        # An option not listed (a typo) is refused, not ignored: the function ran with the default.
        ("POST", "/v1/functions/f?runtime=pythonruntime&timout=60", raw(ECHO_TGZ), 400),
        ("POST", "/v1/functions/f?runtime=pythonruntime&timeout=5&timeout=50", raw(ECHO_TGZ), 400),
        ("POST", "/v1/functions/f", form_around([("runtime", b"pythonruntime")], [("timout", b"60")]), 400),
        ("POST", "/invokeFunction", {"body": {"funcName": 5}}, 400),
        ("POST", "/invokeFunction", {"body": {"funcName": "nope", "params": {}}}, 404),
        ("GET", "/call/abc", {}, 400),
        ("GET", "/call/999999", {}, 404),
        ("POST", "/register", {"body": {"endpoint_id": ["x"]}}, 400),
        # A Content-Encoding whose data is not what it says (aiohttp decompresses as it reads): it was a 500.
        ("POST", "/v1/functions/nope/invoke", {"data": b"not gzip at all", "headers": {
            "Content-Type": "application/json", "Content-Encoding": "gzip"}}, 400),
        ("POST", "/v1/functions/f?runtime=pythonruntime", {"data": b"not deflate", "headers": {
            "Content-Type": "application/octet-stream", "Content-Encoding": "deflate"}}, 400),
        ("POST", "/v1/functions/f?runtime=pythonruntime", {
            "data": b'--x\r\nContent-Disposition: form-data; name="timeout"\r\nContent-Encoding: gzip\r\n\r\n'
                    b"garbage\r\n--x--\r\n",
            "headers": {"Content-Type": "multipart/mixed; boundary=x"}}, 400),
    ],
)
def test_bad_input_gets_a_clear_4xx_with_a_json_body(input_cluster: LocalCluster, method: str, path: str,
                                                     kwargs: dict[str, Any], status: int) -> None:
    cluster = input_cluster
    before = metrics(cluster)
    got, body, headers = cluster.request(method, path, **kwargs)
    assert got == status, body
    assert headers["Content-Type"].startswith("application/json")
    assert isinstance(body, dict) and body["error"]["message"]
    assert cluster.request("GET", "/ping")[1] == "pong"  # and the controller lives on
    series = f'shoal_controller_http_errors_total{{code="{body["error"]["code"]}",status="{got}"}}'
    assert metrics(cluster)[series] == before.get(series, 0) + 1
    assert cluster.get("/v1/functions") == []  # (nothing stored: the next case starts as this one did)


def test_an_empty_query_value_is_as_if_absent(input_cluster: LocalCluster) -> None:
    """`?function=&status=&limit=&cursor=` (a template with nothing filled in) was a 400."""
    status, body, _ = input_cluster.request("GET", "/v1/calls?function=&status=&limit=&cursor=")
    assert status == 200 and "calls" in body, body


def test_malformed_http_gets_a_json_400_and_the_controller_lives_on(input_cluster: LocalCluster) -> None:
    cluster = input_cluster
    url = urllib.parse.urlsplit(cluster.url)
    for request in MALFORMED.values():
        assert_json_error(raw_http(str(url.hostname), int(url.port or 80), request))
        assert cluster.request("GET", "/ping")[1] == "pong"


def test_an_upload_declared_past_the_limit_is_refused_before_its_body(input_cluster: LocalCluster) -> None:
    """Its bytes used to be written to disk up to the limit before the 413. And an unknown Expect is a JSON 417
    (aiohttp refuses it before the application's middleware runs)."""
    url = urllib.parse.urlsplit(input_cluster.url)
    for path in (b"/v1/functions/big?runtime=pythonruntime", b"/registerFunction/pythonruntime/big"):
        for kind in (b"application/octet-stream", b"multipart/form-data; boundary=b"):
            status, headers, body = raw_http_answer(str(url.hostname), int(url.port or 80), (
                b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + kind +
                b"\r\nContent-Length: 1000000000000\r\nConnection: close\r\n\r\n"))
            assert status == 413 and json.loads(body)["error"]["code"] == "too_large", body
    status, headers, body = raw_http(str(url.hostname), int(url.port or 80), (
        b"POST /v1/runtimes HTTP/1.1\r\nHost: x\r\nExpect: foo\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"))
    assert status == 417 and headers["content-type"].startswith("application/json"), body


def test_a_full_queue_answers_429_with_retry_after(make_cluster: Any) -> None:
    cluster: LocalCluster = make_cluster(agents=1, controller_env={"SHOAL_QUEUE_LIMIT": "3"})
    seed_runtime(cluster)
    upload(cluster, "echo", ECHO, entrypoint="handler:handler")
    cluster.stop_agent(cluster.node_ids[0])  # no node: calls wait in the controller's queue
    codes = [cluster.request("POST", "/v1/functions/echo/invoke-async", {"params": i})[:3] for i in range(5)]
    assert [c[0] for c in codes] == [202, 202, 202, 429, 429]
    assert codes[3][2]["Retry-After"] == "1" and codes[3][1]["error"]["code"] == "queue_full"
    # A batch is taken whole or not at all.
    status, body, _ = cluster.request("POST", "/v1/functions/echo/invoke-batch", {"calls": [{"params": 9}]})
    assert status == 429 and body["error"]["code"] == "queue_full"
    cluster.start_agent(cluster.node_ids[0])  # the waiting calls run once a node is back
    for _, body, _ in codes[:3]:
        assert wait_call(cluster, body["id"])["status"] == "DONE"
    m = metrics(cluster)
    assert m['shoal_controller_http_errors_total{code="queue_full",status="429"}'] == 3
    assert m['shoal_controller_calls_accepted_total{function="echo"}'] == 3
    assert m['shoal_controller_calls_finished_total{function="echo",status="DONE"}'] == 3


def test_openapi_document_matches_the_routes(cluster: LocalCluster) -> None:
    served = cluster.get("/openapi.json")
    assert served["openapi"].startswith("3.") and served["paths"] == json.loads(json.dumps(DOCUMENT["paths"]))
    upload(cluster, "echo", ECHO, entrypoint="handler:handler")
    samples = {"{name}": "echo", "{id}": cluster.node_ids[0]}
    for path, item in served["paths"].items():
        concrete = path
        for placeholder, value in samples.items():
            concrete = concrete.replace(placeholder, value)
        for method, op in item.items():
            if method == "parameters":
                continue
            documented = set(op["responses"])
            if method == "delete":
                continue  # exercised in test_versions_runtimes_and_deletes
            body: dict[str, Any] | None = {"params": 1} if "requestBody" in op and "invoke" in path else None
            if path == "/v1/runtimes" and method == "post":
                body = {"image": "pythonruntime", "name": "doc-rt"}
            if path.startswith("/v1/functions/{name}") and method == "post" and "invoke" not in path:
                continue  # archive uploads: see the upload tests
            status, answer, _ = cluster.request(method.upper(), concrete, body)
            assert str(status) in documented, (method, path, status, answer)
