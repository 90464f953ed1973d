"""End-to-end benchmark: REST -> controller -> Redis -> node -> miniworker -> container, against Celery.

Measured in one run on this machine (everything shares its cores):

shoal    2 agents; the trivial handler with one warm container per node (and, for comparison at c=32, the
         same handler with 2 to 4 per node). Sync latency p50/p99 at concurrency 1 and 32 (wrk, a C load
         generator), calls/s at saturation, async submissions/s accepted (each stored in Redis, AOF with fsync
         every second, before its 202) and the rate at which all of them then ran, cold (preload none) vs warm
         latency, and archive distribution (a 200 MB archive fetched by 2 nodes at once, MB/s per node, with the
         latency of warm calls made every 10 ms meanwhile; and by one node alone, in a cluster of its own). A
         figure counts only if every call it counted ended DONE (the controller's finished-call counts are
         compared before and after each run: wrk only sees HTTP statuses, and a FAILED sync call is a 200);
celery   the same trivial function as a Celery 5 task (prefork, 2 processes) with Redis as broker and result
         backend: `delay().get()` latency and tasks/s at saturation (the better of 1 client process x 32
         threads and 4 x 8), results fetched; `delay()` submissions/s with the worker running and, as the
         peer of Shoal's ingest figure (nodes stopped), with it stopped.

Both stacks are up for the whole run, and the sync figures are taken in turns: latency Shoal then Celery,
saturation Shoal, Celery, Celery, Shoal (each figure the mean of its two rounds, each round's ratio printed
too). A shared VM's cores can change speed by half within minutes; taken apart, the ratio measured that.

Run: `make bench` (or `.venv/bin/python -m bench.e2e_bench [--quick]`). Writes bench/results/e2e.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import pct
from bench.table import print_table
from controller.keys import ACTIVE as ACTIVE_KEY
from shoal.archive import build_tar_gz
from shoal.devenv.procs import exit_on_termination
from shoal.devenv.redis_server import start_redis
from shoal.devenv.stack import start_infra
from shoal.localcluster import LocalCluster
from shoal.logs import configure

PROBE_EVERY = 0.01  # seconds between the warm calls made while an archive is distributed
ECHO = {"handler.py": "def handler(params):\n    return params\n"}
RESULTS = Path(__file__).parent / "results"


# ---- wrk ---------------------------------------------------------------------------------------
SLOW_MS = 5  # the c=1 p99 target: calls slower than this are counted


def wrk(url: str, body: str, connections: int, seconds: int, threads: int = 1) -> dict[str, Any]:
    """wrk's figures, its latency tail from its whole histogram (max, and calls over SLOW_MS), and its own CPU
    per request (the client's cost, for comparison with the Python clients')."""
    import resource

    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    with script:
        script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                     'wrk.headers["Content-Type"] = "application/json"\n'
                     "done = function(summary, latency, requests)\n"
                     "  local slow = 0\n"
                     "  for i = 1, #latency do\n"  # each distinct latency (us) recorded, and its count
                     "    local us, count = latency(i)\n"
                     f"    if us > {SLOW_MS * 1000} then slow = slow + count end\n"
                     "  end\n"
                     "  io.write(string.format('P50 %d\\nP99 %d\\n', latency:percentile(50), latency:percentile(99)))\n"
                     "  io.write(string.format('MAX %d\\nSLOW %d\\n', latency.max, slow))\n"
                     "  io.write(string.format('NON2XX %d\\n', summary.errors.status))\n"
                     "end\n")
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        # --timeout: a slow answer is counted (as a socket timeout, which fails the run), not dropped from the
        # latency histogram as wrk's default 2 s would.
        out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout",
                              "60s", "-s", script.name, url], capture_output=True, text=True, check=True).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped meanwhile
    finally:
        os.unlink(script.name)

    def field(pattern: str) -> str:
        found = re.search(pattern, out)
        if found is None:
            raise RuntimeError(f"wrk's output has no {pattern!r}: {out}")
        return found.group(1)

    requests = int(field(r"(\d+) requests in"))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"rps": float(field(r"Requests/sec:\s+([\d.]+)")), "p50_ms": int(field(r"P50 (\d+)")) / 1000,
            "p99_ms": int(field(r"P99 (\d+)")) / 1000, "max_ms": int(field(r"MAX (\d+)")) / 1000,
            "over_slow_ms": int(field(r"SLOW (\d+)")), "non_2xx": int(field(r"NON2XX (\d+)")), "requests": requests,
            "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0, "client_cpu_s": cpu,
            "client_cpu_us_per_call": cpu / max(requests, 1) * 1e6}


def outcomes(cluster: LocalCluster) -> dict[str, float]:
    """The controller's count of finished calls, by "function:status" (its /metrics page)."""
    _, text, _ = cluster.request("GET", "/metrics")
    found = re.findall(r'^shoal_controller_calls_finished_total\{function="([^"]+)",status="([^"]+)"\} (\S+)$',
                       text, re.M)
    return {f"{fn}:{status}": float(n) for fn, status, n in found}


def verified(cluster: LocalCluster, what: str, before: dict[str, float], res: dict[str, Any], calls: int) -> None:
    """A figure counts only if every call it counted ended DONE: wrk sees HTTP statuses, and a sync call that
    FAILED is a 200 too. Waits for the calls to end, then compares the controller's counts with ``before``."""
    drain(cluster, 600)
    after = outcomes(cluster)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    done = sum(v for k, v in delta.items() if k.endswith(":DONE"))
    if any(not k.endswith(":DONE") for k in delta) or res.get("non_2xx") or res.get("socket_errors") or done < calls:
        raise RuntimeError(f"{what}: not every call succeeded (finished: {delta}; client: {res}); no figure")


# ---- celery ------------------------------------------------------------------------------------
CELERY_APP = """
import os
from celery import Celery
app = Celery("bench", broker=os.environ["BENCH_REDIS"], backend=os.environ["BENCH_REDIS"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                worker_prefetch_multiplier=16, broker_connection_retry_on_startup=True)

@app.task
def echo(params):
    return params
"""


CLIENT = r"""
# A load client: THREADS threads, each making calls one after another from START_AT (a wall-clock time, the same
# for every client process of a run, so that they all start together after their imports and warm-up) for
# SECONDS. Prints one JSON line: calls done and failed (a failure is counted, its reason kept, and the process
# exits 1), the seconds from START_AT to its last call's end, and its CPU seconds (user + system) meanwhile.
# MODE: celery-sync (delay().get()), celery-submit (delay()), shoal-sync (POST invoke on a keep-alive
# connection, 200 and DONE checked), shoal-async (POST invoke-async, 202 checked).
import http.client, json, resource, sys, threading, time
from urllib.parse import urlsplit

mode, threads, start_at, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


if mode.startswith("celery"):
    from celery_bench_app import echo

    if mode == "celery-sync":
        echo.delay(0).get(timeout=60)  # warm-up: the connections, and the worker is there

        def make():
            def call():
                if echo.delay(1).get(timeout=30) != 1:
                    raise RuntimeError("wrong result")
            return call
    else:
        echo.delay(0)  # warm-up: one task, left in the queue (counted by the caller)

        def make():
            return lambda: echo.delay(1)
else:
    url = urlsplit(sys.argv[5])
    body, headers = b'{"params": 1}', {"Content-Type": "application/json"}
    expect = 200 if mode == "shoal-sync" else 202

    def make():
        conn = [http.client.HTTPConnection(url.hostname, url.port, timeout=60)]

        def call():
            try:
                conn[0].request("POST", url.path, body, headers)
                resp = conn[0].getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):
                conn[0].close()
                conn[0] = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
                raise
            if resp.status != expect:
                raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
            out = json.loads(data)
            if expect == 200 and (out.get("status") != "DONE" or out.get("result") != 1):
                raise RuntimeError(f"not DONE with the result: {out}")
            if expect == 202 and not out.get("id"):
                raise RuntimeError(f"no call id: {out}")

        conn[0].request("GET", "/ping")  # warm-up: the connection is open (and makes no call)
        conn[0].getresponse().read()
        return call

calls = [make() for _ in range(threads)]
margin = start_at - time.time()
if margin < 0:
    print(json.dumps({"error": f"ready {-margin:.2f} s after the common start time"}), flush=True)
    sys.exit(3)
done, failed, errors = [0] * threads, [0] * threads, []
stop = start_at + seconds


def run(i):
    time.sleep(max(0.0, start_at - time.time()))
    while time.time() < stop:
        try:
            calls[i]()
        except Exception as exc:
            failed[i] += 1
            if len(errors) < 5:
                errors.append(repr(exc)[:300])
        else:
            done[i] += 1


cpu0 = cpu()
workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
print(json.dumps({"done": sum(done), "failed": sum(failed), "errors": errors, "elapsed": time.time() - start_at,
                  "cpu_s": cpu() - cpu0, "margin_s": margin}), flush=True)
sys.exit(1 if sum(failed) else 0)
"""


def run_clients(mode: str, procs: int, threads: int, seconds: float, env: dict[str, str] | None = None,
                workdir: Path | None = None, target: str = "") -> dict[str, Any]:
    """``procs`` client processes of ``threads`` threads running :data:`CLIENT` in ``mode``, all from one common
    start time (a few seconds ahead: their imports and warm-up are not in the figure). Calls/s over all of them,
    and their CPU per call. A client that failed a call, started late or did not end is an error, not a figure
    (the processes left are killed)."""
    start_at = time.time() + 2.0 + 0.75 * procs  # time to import and warm up, for every process at once
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT, mode, str(threads), repr(start_at), str(seconds),
                                 target], env=env, cwd=workdir, stdout=subprocess.PIPE, text=True)
               for _ in range(procs)]
    deadline = start_at + seconds + 120
    outputs = []
    try:
        for c in clients:
            out = c.communicate(timeout=max(1.0, deadline - time.time()))[0]
            lines = out.strip().splitlines()
            result = json.loads(lines[-1]) if lines else {}
            if c.returncode or "error" in result:
                raise RuntimeError(f"a {mode} client ({procs}x{threads}) exited {c.returncode}: "
                                   f"{result or 'no output'}")
            outputs.append(result)
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
    calls = sum(o["done"] for o in outputs)
    elapsed = max(o["elapsed"] for o in outputs)
    cpu = sum(o["cpu_s"] for o in outputs)
    return {"per_s": calls / elapsed, "calls": calls, "seconds": elapsed, "client_cpu_s": cpu,
            "client_cpu_us_per_call": cpu / max(calls, 1) * 1e6, "start_margin_s": min(o["margin_s"] for o in outputs)}


CLIENT_SHAPES = ((1, 32), (4, 8))  # client processes x threads at saturation (more processes: less of the GIL)


def best_of_rounds(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """One system's figure from rounds that each tried every client shape: the mean of each round's best rate,
    the shape that did best over the rounds, and that shape's client CPU per call."""
    best = [max(r["per_s"] for r in rnd.values()) for rnd in rounds]
    shape = max(rounds[0], key=lambda k: sum(rnd[k]["per_s"] for rnd in rounds))
    return {"per_s": statistics.fmean(best), "best_by_round": best, "clients": shape,
            "client_cpu_us_per_call": statistics.fmean(rnd[shape]["client_cpu_us_per_call"] for rnd in rounds),
            "rounds": rounds}


def celery_submitters(env: dict[str, str], workdir: Path, procs: int, seconds: float) -> dict[str, Any]:
    """Tasks/s sent with ``delay()`` (results not awaited) by ``procs`` client processes."""
    return run_clients("celery-submit", procs, 1, seconds, env, workdir)


def celery_clients(env: dict[str, str], workdir: Path, procs: int, threads: int, seconds: float) -> dict[str, Any]:
    """Tasks/s with ``procs`` client processes of ``threads`` threads, each task's result fetched."""
    return run_clients("celery-sync", procs, threads, seconds, env, workdir)


def stop_group(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM to ``proc`` and its children (started in its own session), SIGKILL to what is left after
    ``grace`` seconds. Celery's warm shutdown can take longer than that with a backlog of delay()ed tasks."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass  # killed below
    except ProcessLookupError:
        return  # already gone, children included
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker if it is still there, and any prefork child left
    except ProcessLookupError:
        pass  # nothing left
    proc.wait()


class CeleryPeer:
    """The peer: Celery's stack (its own Redis, a prefork worker of 2 processes), up beside Shoal's for the whole
    run. The sync figures of both are measured in turns (see :func:`bench_shoal`): the speed of a shared VM's
    cores can change by half within minutes, and a ratio of two figures taken minutes apart measured that
    change as much as the two systems."""

    def __init__(self, seconds: float, quick: bool) -> None:
        self.seconds, self.quick = seconds, quick
        self.redis: Any = None
        self.workdir = Path(tempfile.mkdtemp(prefix="shoal-celery-"))
        self.worker: subprocess.Popen[Any] | None = None
        self.env: dict[str, str] = {}
        self.task: Any = None

    def __enter__(self) -> CeleryPeer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def start(self) -> None:
        self.redis = start_redis("celery-redis", appendonly=False)
        (self.workdir / "celery_bench_app.py").write_text(CELERY_APP)
        self.env = dict(os.environ, BENCH_REDIS=self.redis.url, PYTHONPATH=str(self.workdir))
        self.worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "celery_bench_app", "worker", "-c",
                                        "2", "--pool", "prefork", "--loglevel", "WARNING", "--without-gossip",
                                        "--without-mingle", "--without-heartbeat"], env=self.env, cwd=self.workdir,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        sys.path.insert(0, str(self.workdir))
        os.environ["BENCH_REDIS"] = self.redis.url
        import celery_bench_app

        self.task = celery_bench_app.echo
        self.task.delay(0).get(timeout=60)  # warm up (waits for the worker)
        for i in range(50):
            self.task.delay(i).get(timeout=10)

    def close(self) -> None:
        if self.worker is not None:
            stop_group(self.worker)
            self.worker = None
        if self.redis is not None:
            self.redis.stop(remove=True)
            self.redis = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def latency(self) -> dict[str, float]:
        """``delay().get()`` one after another."""
        samples = []
        for i in range(300 if self.quick else 2000):
            t0 = time.perf_counter()
            self.task.delay(i).get(timeout=10)
            samples.append(time.perf_counter() - t0)
        return {"p50_ms": pct(samples, 0.50) * 1000, "p99_ms": pct(samples, 0.99) * 1000,
                "max_ms": max(samples) * 1000, "over_slow_ms": sum(x * 1000 > SLOW_MS for x in samples),
                "requests": len(samples)}

    def saturation(self, label: str) -> dict[str, dict[str, Any]]:
        """Tasks/s with results fetched, for each of CLIENT_SHAPES (processes x threads): the client must not be
        what limits Celery, and its better figure is its figure."""
        out = {}
        for procs, threads in CLIENT_SHAPES:
            print(f"  celery delay().get() at saturation, {procs}x{threads} clients ({label})...", flush=True)
            out[f"{procs}x{threads}"] = celery_clients(self.env, self.workdir, procs, threads, self.seconds)
        return out

    def submissions(self) -> dict[str, Any]:
        """``delay()`` submissions/s, each run on an empty queue: with the worker running the tasks on the same
        cores, then with it stopped (the peer of Shoal's ingest figure, taken with its nodes stopped). Last:
        it stops the worker."""
        from redis import Redis

        assert self.worker is not None
        flush = Redis.from_url(self.redis.url)
        submits, alone = {}, {}
        try:
            for procs in (1, 2):
                flush.flushdb()
                submits[procs] = celery_submitters(self.env, self.workdir, procs, max(2, self.seconds // 2))["per_s"]
            stop_group(self.worker)
            self.worker = None
            for procs in (1, 2):
                flush.flushdb()
                alone[procs] = celery_submitters(self.env, self.workdir, procs, max(2, self.seconds // 2))["per_s"]
        finally:
            flush.close()
        return {"submits_per_s": max(submits.values()), "submits_by_procs": submits,
                "submits_alone_per_s": max(alone.values()), "submits_alone_by_procs": alone}


# ---- shoal ---------------------------------------------------------------------------------------
def big_archive() -> bytes:
    """A 200 MB tar.gz of random bytes (compression level 1: it does not shrink, and takes little to make)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        payload = os.urandom(200 << 20)
        info = tarfile.TarInfo("blob.bin")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def distribute(cluster: LocalCluster, data: bytes, name: str) -> dict[str, float]:
    """Upload ``data`` as function ``name`` (preload none: no container is started for it) and return each
    node's MB/s, as the node timed its transfer."""
    status, record, _ = cluster.request("POST", f"/v1/functions/{name}?runtime=pythonruntime&entrypoint=x:y"
                                        "&preload=none", data=data,
                                        headers={"Content-Type": "application/octet-stream"}, timeout=600)
    if status != 201:
        raise RuntimeError(f"upload answered {status}")
    deadline = time.monotonic() + 300
    rates: dict[str, float] = {}
    while len(rates) < len(cluster.nodes):
        for node in cluster.get("/v1/nodes"):
            _, st, _ = status_of(node["status_url"])
            for t in st.get("archive_transfers", []):
                if t["sha256"] == record["sha256"]:
                    rates[node["node_id"]] = t["mb_per_s"]
        if time.monotonic() > deadline:
            raise RuntimeError("the archive did not reach every node")
        time.sleep(0.1)
    return rates


def bench_archive(cluster: LocalCluster, data: bytes) -> dict[str, Any]:
    """The archive uploaded and fetched by both nodes at once, and a warm call every PROBE_EVERY seconds
    meanwhile: their latency shows what deploying a large function costs the calls being served."""
    import threading

    done = threading.Event()
    latencies: list[float] = []

    def warm_calls() -> None:
        while not done.wait(PROBE_EVERY):  # paced: the probe itself takes little of the cores the transfer needs
            t0 = time.perf_counter()
            status, call, _ = cluster.request("POST", "/v1/functions/echo/invoke", {"params": 1})
            latencies.append(time.perf_counter() - t0)
            if status != 200 or call["status"] != "DONE":
                raise RuntimeError(f"a warm call during the distribution did not succeed: {status} {call}")

    caller = threading.Thread(target=warm_calls, daemon=True)
    caller.start()
    try:
        rates = distribute(cluster, data, "big")
    finally:
        done.set()
        caller.join(60)
    if caller.is_alive() or not latencies:
        raise RuntimeError("the warm calls made during the distribution did not end")
    ms = sorted(x * 1000 for x in latencies)
    return {"archive_mb": len(data) / 2**20, "mb_per_s_per_node": rates, "calls_during": len(ms),
            "call_p50_ms": pct(ms, 0.50), "call_p99_ms": pct(ms, 0.99), "call_max_ms": ms[-1]}


def bench_archive_one_node(docker_url: str, data: bytes) -> tuple[float, float]:
    """The same archive to a cluster of one node: what a node takes in when it does not share this machine's
    two cores with a second node fetching at once; and the disk's own rate just before (see disk_rate)."""
    with LocalCluster(docker_url, agents=1, name="bench-one", log_level="error") as cluster:
        cluster.request("POST", "/registerRuntime", {"image": "pythonruntime", "path": "/ws", "run": "python3 x.py"})
        assert cluster.base is not None
        disk = disk_rate(cluster.base, data, 1)[0]
        return next(iter(distribute(cluster, data, "big").values())), disk


def disk_rate(where: Path, data: bytes, writers: int) -> list[float]:
    """The baseline of an archive's distribution: ``writers`` threads each writing ``data`` at once, in 1 MiB
    writes, to new files where the nodes keep their archives (buffered, no fsync: as a node writes), MB/s each.
    A node cannot store an archive faster than its disk takes it; on this machine's virtual disk, buffered
    writes slow down after a few hundred MB."""
    import threading

    rates = [0.0] * writers
    files = [where / f"disk-baseline-{n}" for n in range(writers)]
    view = memoryview(data)

    def write(n: int) -> None:
        t0 = time.perf_counter()
        with open(files[n], "wb") as f:
            for at in range(0, len(view), 1 << 20):
                f.write(view[at:at + (1 << 20)])
        rates[n] = len(data) / 2**20 / (time.perf_counter() - t0)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for file in files:
        file.unlink()
    return rates


def status_of(url: str) -> tuple[int, Any, dict[str, str]]:
    import urllib.request

    with urllib.request.urlopen(url + "/status", timeout=10) as resp:
        return resp.status, json.loads(resp.read()), {}


BATCH = 500  # calls per invoke-batch request


def drain(cluster: LocalCluster, seconds: float) -> None:
    """Wait until every accepted call has ended; a stuck call is a bug, not a figure: fail with the state."""
    deadline = time.monotonic() + seconds
    while cluster.get("/v1/health")["active"]:
        if time.monotonic() > deadline:
            nodes = cluster.get("/v1/nodes")
            statuses = [status_of(n["status_url"])[1] for n in nodes]
            raise RuntimeError(f"accepted calls did not all finish: {cluster.get('/v1/health')}\n"
                               f"{json.dumps(nodes, indent=1)}\n{json.dumps(statuses, indent=1)[:20000]}")
        time.sleep(0.05)


def wrk_batches(cluster: LocalCluster, seconds: int) -> dict[str, Any]:
    """invoke-batch requests of BATCH echo calls from 2 connections; wrk's figures plus calls and calls/s."""
    res = wrk(cluster.url + "/v1/functions/echo/invoke-batch", json.dumps({"calls": [{"params": 1}] * BATCH}),
              2, seconds)
    res["calls_per_s"], res["calls"] = res["rps"] * BATCH, res["requests"] * BATCH
    return res


def bench_ingest(cluster: LocalCluster, seconds: int) -> dict[str, Any]:
    """The ingest path alone: batches accepted while no node takes calls (the nodes are stopped, as for a
    maintenance window or while they are all busy), so that execution does not share the 2 cores. Every
    accepted call is counted in Redis's durable queue before the nodes come back, then all of them run."""
    from redis import Redis

    nodes = list(cluster.node_ids)
    for node_id in nodes:
        cluster.stop_agent(node_id)
    r = Redis.from_url(str(cluster.redis_url), decode_responses=True)
    before = int(r.zcard(ACTIVE_KEY))
    res = wrk_batches(cluster, seconds)
    res["durably_queued"] = int(r.zcard(ACTIVE_KEY)) - before
    r.close()
    # wrk counts the requests it saw answered; each of its 2 connections may have had one more batch accepted
    # whose answer came after wrk stopped.
    if not res["calls"] <= res["durably_queued"] <= res["calls"] + 2 * BATCH:
        raise RuntimeError(f"{res['calls']} calls accepted but {res['durably_queued']} in the durable queue")
    t0 = time.monotonic()
    for node_id in nodes:
        cluster.start_agent(node_id)
    drain(cluster, 900)
    res["completed_per_s"] = res["durably_queued"] / (time.monotonic() - t0)
    return res


def bench_shoal(docker_url: str, seconds: int, quick: bool,
                peer_stack: CeleryPeer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Shoal's figures, and the peer's sync figures measured in turns with them."""
    out: dict[str, Any] = {}
    peer: dict[str, Any] = {}
    with LocalCluster(docker_url, agents=2, name="bench", log_level="error",
                      controller_env={"SHOAL_QUEUE_LIMIT": "2000000"}) as cluster:
        cluster.request("POST", "/registerRuntime", {"image": "pythonruntime", "path": "/ws", "run": "python3 x.py"})
        # echo: one warm container per node (a trivial handler needs no more on 2 cores); echo4: 2 to 4 per
        # node, to show what extra containers cost on a small host.
        for name, extra in (("echo", "&min_warm=1&max_warm=1"), ("echo4", "&min_warm=2&max_warm=4"),
                            ("cold", "&preload=none")):
            status, body, _ = cluster.request("POST", f"/v1/functions/{name}?runtime=pythonruntime"
                                              f"&entrypoint=handler:handler{extra}", data=build_tar_gz(ECHO),
                                              headers={"Content-Type": "application/octet-stream"})
            if status != 201:
                raise RuntimeError(body)
        for _ in range(200):
            for name in ("echo", "echo4"):
                status, call, _ = cluster.request("POST", f"/v1/functions/{name}/invoke", {"params": 1})
                if status != 200 or call["status"] != "DONE" or call["result"] != 1:
                    raise RuntimeError(f"a warm-up call of {name} did not succeed: {status} {call}")
        url = cluster.url + "/v1/functions/echo/invoke"

        def sync_run(label: str, target: str, conns: int) -> dict[str, Any]:
            print(f"  shoal {label}...", flush=True)
            before = outcomes(cluster)
            res = wrk(target, '{"params": 1}', conns, seconds)
            verified(cluster, label, before, res, int(res["requests"]))
            return res

        def python_run(label: str) -> dict[str, dict[str, Any]]:
            """Shoal driven as Celery is: the same client shapes, each thread making sync invokes one after another
            on its keep-alive connection (http.client), the answer's status and result checked."""
            shapes = {}
            for procs, threads in CLIENT_SHAPES:
                print(f"  shoal sync at saturation, Python {procs}x{threads} clients ({label})...", flush=True)
                before = outcomes(cluster)
                res = run_clients("shoal-sync", procs, threads, seconds, target=url)
                verified(cluster, f"sync, Python clients {procs}x{threads}", before, res, res["calls"])
                shapes[f"{procs}x{threads}"] = res
            return shapes

        # In turns with the peer: latency, Shoal then Celery; saturation in the order Shoal (wrk, then Python
        # clients), Celery, Celery, Shoal (Python clients, then wrk), so that a steady change in the host's speed
        # weighs on both alike.
        out["sync_c1"] = sync_run("sync c=1", url, 1)
        print("  celery delay().get() one after another...", flush=True)
        peer.update(peer_stack.latency())
        first = sync_run("sync c=32 (round 1)", url, 32)
        python_rounds = [python_run("round 1")]
        celery_rounds = [peer_stack.saturation("round 1"), peer_stack.saturation("round 2")]
        python_rounds.append(python_run("round 2"))
        second = sync_run("sync c=32 (round 2)", url, 32)
        # Both rounds: the mean rate and p50 (each round's p50 is wrk's), the worse p99 and max.
        out["sync_c32"] = {"rps": (first["rps"] + second["rps"]) / 2,
                           "p50_ms": (first["p50_ms"] + second["p50_ms"]) / 2,
                           "p99_ms": max(first["p99_ms"], second["p99_ms"]),
                           "max_ms": max(first["max_ms"], second["max_ms"]), "non_2xx": 0,
                           "requests": first["requests"] + second["requests"],
                           "client_cpu_us_per_call": (first["client_cpu_s"] + second["client_cpu_s"])
                           / (first["requests"] + second["requests"]) * 1e6, "rounds": [first, second]}
        python = out["sync_python"] = best_of_rounds(python_rounds)
        saturation = peer["saturation"] = best_of_rounds(celery_rounds)
        celery_best = saturation["best_by_round"]
        out["ratio_wrk_by_round"] = [first["rps"] / celery_best[0], second["rps"] / celery_best[1]]
        out["ratio_python_by_round"] = [p / c for p, c in zip(python["best_by_round"], celery_best, strict=True)]
        out["sync_c32_pool4"] = sync_run("sync c=32, 2-4 containers per node",
                                         cluster.url + "/v1/functions/echo4/invoke", 32)
        print("  shoal async submissions...", flush=True)
        before = outcomes(cluster)
        t0 = time.monotonic()
        out["async_c32"] = wrk(cluster.url + "/v1/functions/echo/invoke-async", '{"params": 1}', 32,
                               max(2, seconds // 2))
        drain(cluster, 120)
        # Every accepted call ran: from the first submission to the last completion.
        out["async_completed_per_s"] = out["async_c32"]["requests"] / (time.monotonic() - t0)
        verified(cluster, "async submissions", before, out["async_c32"], out["async_c32"]["requests"])
        print(f"  shoal async batch submissions ({BATCH} calls per request)...", flush=True)
        before = outcomes(cluster)
        t0 = time.monotonic()
        batch = out["async_batch"] = wrk_batches(cluster, max(2, seconds // 2))
        drain(cluster, 600)
        out["async_batch_completed_per_s"] = batch["calls"] / (time.monotonic() - t0)
        verified(cluster, "async batches", before, batch, batch["calls"])
        before = outcomes(cluster)
        out["async_ingest"] = bench_ingest(cluster, 2)
        verified(cluster, "ingest", before, out["async_ingest"], out["async_ingest"]["calls"])
        print("  shoal cold vs warm...", flush=True)
        cold = []
        for i in range(5 if quick else 15):
            time.sleep(0.3)
            t0 = time.perf_counter()
            _, call, _ = cluster.request("POST", "/v1/functions/cold/invoke", {"params": i})
            cold.append(time.perf_counter() - t0)
            if not call.get("cold"):
                raise RuntimeError(f"expected a cold call: {call}")
        out["cold_p50_ms"] = statistics.median(cold) * 1000
        print("  shoal archive distribution...", flush=True)
        data = big_archive()
        assert cluster.base is not None
        disk_two = disk_rate(cluster.base, data, 2)
        out["archive"] = bench_archive(cluster, data)
        out["archive"]["disk_mb_per_s_two_writers"] = disk_two
    print("  shoal archive to one node...", flush=True)
    one, disk_one = bench_archive_one_node(docker_url, data)
    out["archive"].update(mb_per_s_one_node=one, disk_mb_per_s_one_writer=disk_one)
    return out, peer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    exit_on_termination()  # a SIGTERM or SIGHUP stops what the run started, as Ctrl-C does
    configure("error")
    seconds = 3 if args.quick else 10
    infra = start_infra(with_redis=False)
    try:
        print("celery (up beside shoal for the whole run)...", flush=True)
        with CeleryPeer(seconds, args.quick) as peer_stack:
            print("shoal, and celery in turns...", flush=True)
            shoal, celery = bench_shoal(infra.engine.url, seconds, args.quick, peer_stack)
            print("celery submissions...", flush=True)
            celery.update(peer_stack.submissions())
    finally:
        infra.close()
    RESULTS.mkdir(exist_ok=True)
    results = {"shoal": shoal, "celery": celery}
    (RESULTS / "e2e.json").write_text(json.dumps(results, indent=2))
    report(results)
    return 0


def report(r: dict[str, Any]) -> None:
    s, c = r["shoal"], r["celery"]
    c1, c32, py, sat = s["sync_c1"], s["sync_c32"], s["sync_python"], c["saturation"]

    def slow(res: dict[str, Any]) -> str:
        return (f"max {res['max_ms']:.1f} ms, {res['over_slow_ms']} of {res['requests']} over {SLOW_MS} ms "
                f"({res['over_slow_ms'] / max(res['requests'], 1):.2%})")

    rows = [
        ("sync c=1", f"shoal p50 {c1['p50_ms']:.2f} ms  p99 {c1['p99_ms']:.2f} ms  {slow(c1)}  "
                     f"({c1['rps']:.0f}/s, wrk)\n"
                     f"celery delay().get() p50 {c['p50_ms']:.2f} ms  p99 {c['p99_ms']:.2f} ms  {slow(c)}\n"
                     "(closed loop: one call at a time, so a slow call delays the next instead of being counted "
                     "in it; the max and the count over 5 ms show the tail)"),
        ("sync c=32", f"p50 {c32['p50_ms']:.2f} ms  p99 {c32['p99_ms']:.2f} ms  max {c32['max_ms']:.1f} ms  "
                      f"({c32['rps']:.0f}/s, wrk; 2-4 containers per node: {s['sync_c32_pool4']['rps']:.0f}/s)"),
        ("calls/s at saturation",
         f"shoal driven by wrk (C, 32 connections): {c32['rps']:.0f}/s = {c32['rps'] / sat['per_s']:.2f}x celery "
         f"(by round: {', '.join(f'{x:.2f}x' for x in s['ratio_wrk_by_round'])})\n"
         f"shoal driven by Python clients as celery is (http.client, best of {'/'.join(py['rounds'][0])} procs x "
         f"threads: {py['clients']}): {py['per_s']:.0f}/s = {py['per_s'] / sat['per_s']:.2f}x celery (by round: "
         f"{', '.join(f'{x:.2f}x' for x in s['ratio_python_by_round'])})\n"
         f"celery delay().get() (best of {'/'.join(sat['rounds'][0])}: {sat['clients']}): {sat['per_s']:.0f}/s\n"
         "(each the mean of 2 rounds, in the order shoal wrk, shoal Python, celery, celery, shoal Python, "
         "shoal wrk)"),
        ("client CPU per call", f"wrk {c32['client_cpu_us_per_call']:.0f} us; shoal's Python clients "
                                f"{py['client_cpu_us_per_call']:.0f} us; celery's "
                                f"{sat['client_cpu_us_per_call']:.0f} us "
                                "(user + system, at saturation, on the same 2 cores as the servers)"),
        ("async submissions/s", f"one per request: {s['async_c32']['rps']:.0f}/s accepted (non-2xx "
                                f"{s['async_c32']['non_2xx']}); all {s['async_c32']['requests']} ran at "
                                f"{s['async_completed_per_s']:.0f}/s"),
        ("async, batches", f"{BATCH} per request: {s['async_batch']['calls_per_s']:.0f} calls/s accepted (non-2xx "
                           f"{s['async_batch']['non_2xx']}, p50 {s['async_batch']['p50_ms']:.1f} ms per batch); all "
                           f"{s['async_batch']['calls']} ran at {s['async_batch_completed_per_s']:.0f}/s   celery "
                           f"delay() {c['submits_per_s']:.0f}/s = "
                           f"{s['async_batch']['calls_per_s'] / c['submits_per_s']:.1f}x celery"),
        ("async, ingest alone", f"{BATCH} per request, nodes stopped: {s['async_ingest']['calls_per_s']:.0f} calls/s "
                                f"accepted (non-2xx {s['async_ingest']['non_2xx']}), "
                                f"{s['async_ingest']['durably_queued']} counted in Redis's queue (AOF, fsync every "
                                f"second); all ran at {s['async_ingest']['completed_per_s']:.0f}/s once the nodes "
                                f"were back   celery delay(), worker stopped, {c['submits_alone_per_s']:.0f}/s = "
                                f"{s['async_ingest']['calls_per_s'] / c['submits_alone_per_s']:.1f}x"),
        ("cold (preload none) vs warm", f"cold p50 {s['cold_p50_ms']:.0f} ms vs warm p50 "
                                        f"{s['sync_c1']['p50_ms']:.2f} ms"),
        ("archive to 2 nodes", f"{s['archive']['archive_mb']:.0f} MB at "
                               + ", ".join(f"{n} {v:.0f} MB/s" for n, v in s["archive"]["mb_per_s_per_node"].items())
                               + " (disk, 2 writers at once: "
                               + ", ".join(f"{v:.0f}" for v in s["archive"]["disk_mb_per_s_two_writers"])
                               + f" MB/s); to one node alone {s['archive']['mb_per_s_one_node']:.0f} MB/s (disk, "
                               + f"one writer: {s['archive']['disk_mb_per_s_one_writer']:.0f} MB/s = "
                               + f"{s['archive']['mb_per_s_one_node'] / s['archive']['disk_mb_per_s_one_writer']:.2f}x)"
                               + f"; {s['archive']['calls_during']} warm calls (one per 10 ms) during the upload and "
                               f"distribution: p50 "
                               f"{s['archive']['call_p50_ms']:.2f} ms, p99 {s['archive']['call_p99_ms']:.2f} ms, "
                               f"max {s['archive']['call_max_ms']:.1f} ms"),
    ]
    print_table(rows)


if __name__ == "__main__":
    sys.exit(main())
