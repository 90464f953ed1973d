"""End-to-end benchmark: REST -> controller -> Redis -> node -> miniworker -> container, against Celery.

Measured in one run on this machine (everything, clients included, shares its 2 cores):

shoal    2 agents; the trivial handler with one warm container per node (and, for comparison at c=32, the
         same handler with 2 to 4 per node).
         The ratios to Celery are taken with the same client on both sides: one Python script (CLIENT) of
         processes x threads, each thread making one call at a time (http.client keep-alive invokes for Shoal,
         each answer's status and result checked; `delay().get()` or `delay()` for Celery), timed by the same
         clock. wrk (a C load generator) drives Shoal too, for the figures a lighter client gives on these
         shared cores; those are printed with no ratio to Celery's Python-client figures.
         sync     latency p50/p99 at concurrency 1 (one client thread) and 32; at c=1 also the max and the
                  calls over 5 ms (the loops are closed: a slow call delays the next instead of showing in the
                  percentiles). Calls/s at saturation (the best of CLIENT_SHAPES), and by wrk (32 connections);
                  the client CPU per call of each.
         async    one call per request (the headline), the best of SUBMIT_SHAPES, and by wrk: while calls run
                  (nodes up), and ingest alone (nodes stopped), 10 s runs; then 500 calls per request
                  (batching, labelled so). After each ingest run Redis is SIGKILLed 1.5 s after the last answer
                  and started again from its AOF: the calls it recovered are counted against the 202s given.
                  That is what survives a crash of Redis; a crash of the host can lose about the last second
                  (appendfsync everysec), for both stacks alike. Then the nodes come back and every call
                  accepted meanwhile runs.
         floor    a bare aiohttp JSON round trip on uvloop (no Redis, no node) driven by the same client, at
                  c=1 and at saturation: what a REST call costs here before Shoal does anything.
         cold (preload none) vs warm latency; archive distribution (a 200 MiB-payload archive, MB = 10^6
                  bytes, fetched by 2 nodes at once, MB/s per node, with warm calls every 10 ms meanwhile; and
                  by one node alone, in a cluster of its own), each against a raw ZMQ transfer of the same
                  bytes (same chunk size and credit, sha256) and a page-cache write measured just before.
         A figure counts only if every call it counted ended DONE (the controller's finished-call counts are
         compared before and after each run: a FAILED sync call is a 200) and every answer had the status
         expected (wrk counts statuses other than 200 for sync, 202 for async).
celery   the same trivial function as a Celery 5 task (prefork, 2 processes) with Redis as broker and result
         backend (its client's connection pool raised to 64 so that 32 threads do not wait for one):
         `delay().get()` latency and tasks/s at saturation, results fetched; `delay()` submissions/s with the
         worker running, and with it stopped as the peer of Shoal's ingest, with the same durability check. A
         client call that fails or times out fails the run.

Both Redis servers run with the same persistence (AOF, appendfsync everysec, no RDB snapshots; the report
prints what each one says it runs with). Both stacks are up for the whole run. The sync figures are taken in
turns: latency Shoal then Celery; saturation Shoal (wrk, Python), Celery, Celery, Shoal (Python, wrk), each
figure the mean of its two rounds, each round's ratio printed too. A shared VM's cores can change speed by half
within minutes; taken apart, a ratio measures that. The async runs are Shoal's then Celery's, back to back in
each phase (one round: a durability check and a drain follow each ingest run). The client processes of a run
start together, at one wall-clock time given to each.

Run: `make bench` (`make bench ARGS=--quick`: 3 s runs, for a check that every path works, not for figures),
or `.venv/bin/python -m bench.e2e_bench [--quick]`. Writes bench/results/e2e.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.stats import pct
from bench.table import print_table
from controller.keys import ACTIVE as ACTIVE_KEY
from controller.keys import call as call_key
from shoal.archive import build_tar_gz
from shoal.devenv.procs import exit_on_termination
from shoal.devenv.redis_server import RedisServer, free_port, start_redis
from shoal.devenv.stack import start_infra
from shoal.localcluster import LocalCluster
from shoal.logs import configure

PROBE_EVERY = 0.01  # seconds between the warm calls made while an archive is distributed
ECHO = {"handler.py": "def handler(params):\n    return params\n"}
RESULTS = Path(__file__).parent / "results"


# ---- wrk ---------------------------------------------------------------------------------------
SLOW_MS = 5  # the c=1 p99 target: calls slower than this are counted


def wrk(url: str, body: str, connections: int, seconds: int, expect: int, threads: int = 1) -> dict[str, Any]:
    """wrk's figures, its latency tail from its whole histogram (max, and calls over SLOW_MS), the answers whose
    status was not ``expect`` (wrk's own count is of statuses over 399 only: a sync call's 202, its wait run out,
    would pass), and its own CPU per request (the client's cost, for comparison with the Python clients')."""
    import resource

    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    with script:
        script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                     'wrk.headers["Content-Type"] = "application/json"\n'
                     # Each wrk thread counts in its own Lua state; done() reads their counts.
                     "local threads = {}\n"
                     "setup = function(thread) table.insert(threads, thread) end\n"
                     "unexpected = 0\n"
                     f"response = function(status) if status ~= {expect} then unexpected = unexpected + 1 end end\n"
                     "done = function(summary, latency, requests)\n"
                     "  local slow, bad = 0, 0\n"
                     "  for i = 1, #latency do\n"  # each distinct latency (us) recorded, and its count
                     "    local us, count = latency(i)\n"
                     f"    if us > {SLOW_MS * 1000} then slow = slow + count end\n"
                     "  end\n"
                     "  for _, t in ipairs(threads) do bad = bad + t:get('unexpected') end\n"
                     "  io.write(string.format('P50 %d\\nP99 %d\\n', latency:percentile(50), latency:percentile(99)))\n"
                     "  io.write(string.format('MAX %d\\nSLOW %d\\n', latency.max, slow))\n"
                     "  io.write(string.format('UNEXPECTED %d\\n', bad))\n"
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
            "over_slow_ms": int(field(r"SLOW (\d+)")), "unexpected_status": int(field(r"UNEXPECTED (\d+)")),
            "requests": requests,
            "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0, "client_cpu_s": cpu,
            "client_cpu_us_per_call": cpu / max(requests, 1) * 1e6}


# ---- the HTTP floor ------------------------------------------------------------------------------
FLOOR_SERVER = r"""
# The floor of a REST call on this machine: aiohttp on uvloop, as the controller serves (no access log), reading
# and parsing the JSON body and answering a JSON body of a DONE call's shape; no Redis, no node.
import json, sys
import uvloop
from aiohttp import web

async def invoke(request):
    params = json.loads(await request.read())["params"]
    return web.json_response({"id": "floor", "status": "DONE", "result": params})

app = web.Application()
app.router.add_post("/invoke", invoke)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=uvloop.new_event_loop())
"""


class HttpFloor:
    """:data:`FLOOR_SERVER` in a process of its own: what a REST round trip costs here before Shoal does
    anything (the same client drives it as drives Shoal and Celery)."""

    def __enter__(self) -> HttpFloor:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/invoke"
        self.proc = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("the HTTP floor's server did not start") from None
                time.sleep(0.05)

    def __exit__(self, *_: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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
    client_errors = res.get("unexpected_status") or res.get("socket_errors")
    if any(not k.endswith(":DONE") for k in delta) or client_errors or done < calls:
        raise RuntimeError(f"{what}: not every call succeeded (finished: {delta}; client: {res}); no figure")


# ---- celery ------------------------------------------------------------------------------------
CELERY_APP = """
import os
from celery import Celery
app = Celery("bench", broker=os.environ["BENCH_REDIS"], backend=os.environ["BENCH_REDIS"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                worker_prefetch_multiplier=16, broker_connection_retry_on_startup=True,
                broker_pool_limit=64)  # (default 10: a client's 32 threads would queue for a connection)

@app.task
def echo(params):
    return params
"""


CLIENT = r"""
# A load client: THREADS threads, each making calls one after another from START_AT (a wall-clock time, the same
# for every client process of a run, so that they all start together after their imports and warm-up) for
# SECONDS. Prints one JSON line: calls done and failed (a failure is counted, its reason kept, and the process
# exits 1), the seconds from START_AT to its last call's end, its CPU seconds (user + system) meanwhile, and each
# call's latency (us, from the call's start to its answer read and checked: the same clock for both systems).
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
lat = [[] for _ in range(threads)]
stop = start_at + seconds


def run(i):
    time.sleep(max(0.0, start_at - time.time()))
    while time.time() < stop:
        t0 = time.perf_counter()
        try:
            calls[i]()
        except Exception as exc:
            failed[i] += 1
            if len(errors) < 5:
                errors.append(repr(exc)[:300])
        else:
            lat[i].append(round((time.perf_counter() - t0) * 1e6))
            done[i] += 1


cpu0 = cpu()
workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
print(json.dumps({"done": sum(done), "failed": sum(failed), "errors": errors, "elapsed": time.time() - start_at,
                  "cpu_s": cpu() - cpu0, "margin_s": margin, "lat_us": [x for t in lat for x in t]}), flush=True)
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
            "client_cpu_us_per_call": cpu / max(calls, 1) * 1e6, "start_margin_s": min(o["margin_s"] for o in outputs),
            **latencies([x / 1e6 for o in outputs for x in o["lat_us"]])}


def latencies(samples: list[float]) -> dict[str, Any]:
    """p50, p99 and max (ms) of ``samples`` (seconds), and how many are over SLOW_MS."""
    if not samples:
        return {"requests": 0}
    return {"p50_ms": pct(samples, 0.50) * 1000, "p99_ms": pct(samples, 0.99) * 1000, "max_ms": max(samples) * 1000,
            "over_slow_ms": sum(x * 1000 > SLOW_MS for x in samples), "requests": len(samples)}


CLIENT_SHAPES = ((1, 32), (4, 8))  # client processes x threads at saturation (more processes: less of the GIL)


def best_of_rounds(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """One system's figure from rounds that each tried every client shape: the shape that did best over all the
    rounds, and that shape's figures: its mean rate, its rate in each round, its client CPU per call, the mean of
    its rounds' p50 latencies and the worse of their p99s."""
    shape = max(rounds[0], key=lambda k: sum(rnd[k]["per_s"] for rnd in rounds))
    runs = [rnd[shape] for rnd in rounds]
    return {"per_s": statistics.fmean(r["per_s"] for r in runs), "by_round": [r["per_s"] for r in runs],
            "clients": shape, "client_cpu_us_per_call": statistics.fmean(r["client_cpu_us_per_call"] for r in runs),
            "p50_ms": statistics.fmean(r["p50_ms"] for r in runs), "p99_ms": max(r["p99_ms"] for r in runs),
            "rounds": rounds}


def celery_submitters(env: dict[str, str], workdir: Path, procs: int, threads: int, seconds: float) -> dict[str, Any]:
    """Tasks/s sent with ``delay()`` (results not awaited) by ``procs`` client processes of ``threads`` threads."""
    return run_clients("celery-submit", procs, threads, seconds, env, workdir)


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
        self.redis = start_redis("celery-redis", appendonly=True)  # as Shoal's (see persistence())
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

    def latency(self) -> dict[str, Any]:
        """``delay().get()`` one after another, by one client process of one thread (the client that times
        Shoal's calls at c=1 is the same script, making its calls with http.client)."""
        return celery_clients(self.env, self.workdir, 1, 1, self.seconds)

    def saturation(self, label: str) -> dict[str, dict[str, Any]]:
        """Tasks/s with results fetched, for each of CLIENT_SHAPES (processes x threads): the client must not be
        what limits Celery, and its better figure is its figure."""
        out = {}
        for procs, threads in CLIENT_SHAPES:
            print(f"  celery delay().get() at saturation, {procs}x{threads} clients ({label})...", flush=True)
            out[f"{procs}x{threads}"] = celery_clients(self.env, self.workdir, procs, threads, self.seconds)
        return out

    def stop_worker(self) -> None:
        if self.worker is not None:
            stop_group(self.worker)
            self.worker = None

    def flush(self) -> None:
        from redis import Redis

        with Redis.from_url(self.redis.url) as r:
            r.flushdb()

    def queued(self) -> int:
        """Tasks in Redis's queues (kombu keeps each queue as a list)."""
        from redis import Redis

        with Redis.from_url(self.redis.url) as r:
            return sum(int(r.llen(k)) for k in r.scan_iter(count=1000) if r.type(k) == b"list")

    def restart_redis(self) -> float:
        self.redis, took = kill_and_restart(self.redis)
        return took

    def submissions(self, seconds: float) -> dict[str, dict[str, Any]]:
        """``delay()`` submissions/s with the worker running the tasks on the same cores, for each of
        SUBMIT_SHAPES (client processes x threads), each run on an empty queue."""
        assert self.worker is not None
        out = {}
        for procs, threads in SUBMIT_SHAPES:
            print(f"  celery delay(), {procs}x{threads} clients, worker running...", flush=True)
            self.flush()
            out[f"{procs}x{threads}"] = celery_submitters(self.env, self.workdir, procs, threads, seconds)
        return out

    def ingest(self, procs: int, threads: int, seconds: float) -> dict[str, Any]:
        """``delay()`` submissions/s with the worker stopped (the peer of Shoal's ingest figure, taken with its
        nodes stopped), on an empty queue; then the durability check (see :func:`check_durability`). Each client
        process's warm-up task is not counted."""
        assert self.worker is None
        print(f"  celery delay(), {procs}x{threads} clients, worker stopped, then Redis killed...", flush=True)
        self.flush()
        res = celery_submitters(self.env, self.workdir, procs, threads, seconds)
        check_durability(res, lambda: self.queued() - procs, self.restart_redis, time.monotonic())
        return res


# ---- durability ----------------------------------------------------------------------------------
# Seconds from a run's last answer to the SIGKILL of its Redis. (A SIGKILL loses nothing Redis wrote to its AOF,
# fsynced or not: the page cache survives it. The check shows what survives a crash of Redis, not of the host,
# where appendfsync everysec can lose up to about a second: both stacks alike.)
KILL_AFTER = 1.5
# Async submitters, Celery's delay() and Shoal's POST, each thread one call at a time: client processes x threads
# (one caller, and 32 in flight as wrk's 32 connections, in one process or in four).
SUBMIT_SHAPES = ((1, 1), (1, 32), (4, 8))


def persistence(url: str) -> dict[str, str]:
    """The persistence settings a Redis runs with (both stacks' must be the same for their figures to compare)."""
    from redis import Redis

    with Redis.from_url(url, decode_responses=True) as r:
        conf: dict[str, str] = {}
        for name in ("appendonly", "appendfsync", "save"):
            conf.update(r.config_get(name))
        return conf


def kill_and_restart(server: RedisServer) -> tuple[RedisServer, float]:
    """SIGKILL ``server`` (no shutdown: what is not yet in its AOF on disk is lost, as in a crash) and start a new
    one on its port from its directory (it loads its AOF). Returns the new server and how long its start took."""
    pid = int((server.directory / "redis.pid").read_text().strip())
    title = Path(f"/proc/{pid}/cmdline").read_bytes()
    if b"redis-server" not in title or f":{server.port}".encode() not in title:
        raise RuntimeError(f"pid {pid} of {server.directory / 'redis.pid'} is not the redis-server on {server.port}")
    os.kill(pid, signal.SIGKILL)
    server.stop()  # reaps it; its directory stays
    t0 = time.monotonic()
    again = RedisServer(port=server.port, directory=server.directory, appendonly=server.appendonly).start()
    return again, time.monotonic() - t0


def check_durability(res: dict[str, Any], count: Callable[[], int], restart: Callable[[], float],
                     ended: float) -> None:
    """What survives a crash of Redis: ``count()`` (the calls of the run in Redis) read after the run, then Redis
    SIGKILLed KILL_AFTER seconds after the run's last answer and restarted from its AOF, and ``count()`` read
    again. ``res`` gains ``in_redis`` and ``recovered`` (calls), ``lost`` (accepted, not recovered), and
    ``durable_per_s``: the accepted calls that survived, per second of the run (the figure that counts as
    "accepted and durably recorded")."""
    res["in_redis"] = count()
    time.sleep(max(0.0, ended + KILL_AFTER - time.monotonic()))
    res["restart_s"] = restart()
    res["recovered"] = count()
    res["lost"] = max(0, res["calls"] - res["recovered"])
    res["durable_per_s"] = min(res["recovered"], res["calls"]) / res["seconds"]


def durable_calls(url: str) -> int:
    """Shoal's calls in Redis: those in its durable queue (ACTIVE) whose record is there too."""
    from redis import Redis

    with Redis.from_url(url, decode_responses=True) as r:
        ids = r.zrange(ACTIVE_KEY, 0, -1)
        found = 0
        for at in range(0, len(ids), 10_000):
            pipe = r.pipeline(transaction=False)
            for call_id in ids[at:at + 10_000]:
                pipe.exists(call_key(call_id))
            found += sum(pipe.execute())
        return found


# ---- shoal ---------------------------------------------------------------------------------------
def big_archive() -> bytes:
    """A tar.gz of 200 MiB of random bytes (compression level 1: it does not shrink, and takes little to make)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        payload = os.urandom(200 << 20)
        info = tarfile.TarInfo("blob.bin")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def mb_per_s(size: int, seconds: float) -> float:
    """MB/s in the target's unit: 10^6 bytes."""
    return size / 1e6 / max(seconds, 1e-9)


def distribute(cluster: LocalCluster, data: bytes, name: str) -> dict[str, float]:
    """Upload ``data`` as function ``name`` (preload none: no container is started for it) and return each
    node's MB/s (10^6 bytes), from the bytes and seconds the node timed for its transfer (from its first request
    to the last chunk written and hashed)."""
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
                    if t["bytes"] != len(data):
                        raise RuntimeError(f"{node['node_id']} fetched {t['bytes']} of {len(data)} bytes")
                    rates[node["node_id"]] = mb_per_s(t["bytes"], t["seconds"])
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
    failure: list[BaseException] = []

    def warm_calls() -> None:
        try:
            while not done.wait(PROBE_EVERY):  # paced: the probe takes little of the cores the transfer needs
                t0 = time.perf_counter()
                status, call, _ = cluster.request("POST", "/v1/functions/echo/invoke", {"params": 1})
                latencies.append(time.perf_counter() - t0)
                if status != 200 or call["status"] != "DONE" or call["result"] != 1:
                    raise RuntimeError(f"a warm call during the distribution did not succeed: {status} {call}")
        except BaseException as exc:  # noqa: BLE001 - raised again by the caller: no figure from part of the calls
            failure.append(exc)

    caller = threading.Thread(target=warm_calls, daemon=True)
    caller.start()
    try:
        rates = distribute(cluster, data, "big")
    finally:
        done.set()
        caller.join(60)
    if failure:
        raise failure[0]
    if caller.is_alive() or not latencies:
        raise RuntimeError("the warm calls made during the distribution did not end")
    ms = sorted(x * 1000 for x in latencies)
    return {"archive_mb": len(data) / 1e6, "mb_per_s_per_node": rates, "calls_during": len(ms),
            "call_p50_ms": pct(ms, 0.50), "call_p99_ms": pct(ms, 0.99), "call_max_ms": ms[-1]}


def bench_archive_one_node(docker_url: str, data: bytes) -> dict[str, Any]:
    """The same archive to a cluster of one node: what a node takes in when it does not share this machine's
    two cores with a second node fetching at once; and its floors just before (see zmq_floor, disk_rate)."""
    with LocalCluster(docker_url, agents=1, name="bench-one", log_level="error") as cluster:
        cluster.request("POST", "/registerRuntime", {"image": "pythonruntime", "path": "/ws", "run": "python3 x.py"})
        assert cluster.base is not None
        floor = zmq_floor(cluster.base, data, 1)[0]
        disk = disk_rate(cluster.base, data, 1)[0]
        return {"mb_per_s": next(iter(distribute(cluster, data, "big").values())), "zmq_floor_mb_per_s": floor,
                "page_cache_mb_per_s": disk}


ZMQ_SENDER = r"""
# The sender of the ZMQ floor: serves the file ARGV[1] to RECEIVERS DEALERs as the controller serves an archive,
# zero-copy chunks of CHUNK bytes from a read-only mapping, each receiver's credit honoured, until each has said
# it holds every byte. Prints its port first.
import mmap, sys, zmq
path, receivers, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "rb") as f:
    view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
size = len(view)
sock = zmq.Context().socket(zmq.ROUTER)
print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
sent, finished = {}, 0
while finished < receivers:
    ident, offset, credit = sock.recv_multipart()
    offset, credit = int(offset), int(credit)
    if offset >= size:
        finished += 1
        continue
    at = sent.get(ident, offset)
    while at < size and at - offset < credit * chunk:
        end = min(at + chunk, size)
        sock.send_multipart([ident, view[at:end]], copy=False)
        at = end
    sent[ident] = at
"""

ZMQ_RECEIVER = r"""
# A receiver of the ZMQ floor: connected before START_AT, then from START_AT asks for the bytes with CREDIT chunks
# in flight, hashes each chunk as it arrives (sha256) and acknowledges it, as a node's fetcher does (less the
# write to disk). Prints {"seconds", "ok"} (ok: the digest is SHA).
import hashlib, json, sys, time, zmq
url, size, sha, credit, start_at = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].encode(), float(sys.argv[5])
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(url)
time.sleep(max(0.0, start_at - time.time()))
t0 = time.perf_counter()
digest, received = hashlib.sha256(), 0
sock.send_multipart([b"0", credit])
while received < size:
    frame = sock.recv(copy=False)
    digest.update(frame.buffer)
    received += len(frame.buffer)
    sock.send_multipart([str(received).encode(), credit])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "ok": digest.hexdigest() == sha}), flush=True)
"""


def zmq_floor(where: Path, data: bytes, receivers: int) -> list[float]:
    """The floor of an archive's distribution over the network path: ``data`` sent over ZMQ on TCP loopback by
    one process to ``receivers`` processes at once, with the link's chunk size and credit, each receiver
    hashing what it gets (sha256) as a node does; MB/s (10^6 bytes) per receiver. A node's fetch does that and
    more (its messages' headers, the write to disk, its agent's loop), so its rate is at most about this."""
    import hashlib

    from node_agent.fetcher import CREDIT
    from shoal.archive_server import CHUNK_SIZE

    path = where / "zmq-floor.bin"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    sender = subprocess.Popen([sys.executable, "-c", ZMQ_SENDER, str(path), str(receivers), str(CHUNK_SIZE)],
                              stdout=subprocess.PIPE, text=True)
    clients: list[subprocess.Popen[str]] = []
    try:
        assert sender.stdout is not None
        port = int(sender.stdout.readline())
        start_at = time.time() + 2.0
        clients = [subprocess.Popen([sys.executable, "-c", ZMQ_RECEIVER, f"tcp://127.0.0.1:{port}", str(len(data)),
                                     sha, str(CREDIT), repr(start_at)], stdout=subprocess.PIPE, text=True)
                   for _ in range(receivers)]
        results = []
        for c in clients:
            out = c.communicate(timeout=300)[0]
            result = json.loads(out) if c.returncode == 0 and out.strip() else {}
            if not result.get("ok"):
                raise RuntimeError(f"a ZMQ floor receiver failed (exit {c.returncode}): {out!r}")
            results.append(mb_per_s(len(data), result["seconds"]))
        sender.wait(30)
        return results
    finally:
        for proc in (*clients, sender):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        path.unlink(missing_ok=True)


def disk_rate(where: Path, data: bytes, writers: int) -> list[float]:
    """A page-cache write, for comparison: ``writers`` threads each writing ``data`` at once, in 1 MiB writes, to
    new files where the nodes keep their archives (buffered, no fsync: as a node writes, so mostly the page
    cache's speed, not the disk's), MB/s (10^6 bytes) each."""
    import threading

    rates = [0.0] * writers
    files = [where / f"disk-baseline-{n}" for n in range(writers)]
    view = memoryview(data)

    def write(n: int) -> None:
        t0 = time.perf_counter()
        with open(files[n], "wb") as f:
            for at in range(0, len(view), 1 << 20):
                f.write(view[at:at + (1 << 20)])
        rates[n] = mb_per_s(len(data), time.perf_counter() - t0)

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


def wrk_calls(url: str, per_request: int, connections: int, seconds: int) -> dict[str, Any]:
    """wrk's figures for invoke-async (one call per request) or invoke-batch (``per_request`` calls per request),
    plus calls and calls/s; a non-2xx answer or a socket error fails the run."""
    body = json.dumps({"calls": [{"params": 1}] * per_request}) if per_request > 1 else '{"params": 1}'
    res = wrk(url, body, connections, seconds, expect=202)
    if res["unexpected_status"] or res["socket_errors"] or not res["requests"]:
        raise RuntimeError(f"async submissions to {url} failed: {res}")
    res.update(calls=res["requests"] * per_request, per_s=res["rps"] * per_request,
               seconds=res["requests"] / res["rps"], connections=connections, per_request=per_request)
    return res


def settle_controller(cluster: LocalCluster) -> int:
    """After its Redis restarted, each of the controller's pooled Redis connections fails the request that next
    uses it (a 503) and is then opened again: the bench makes them do so before its next run, with rounds of
    concurrent reads (GET of a call that does not exist: a 404 once Redis answers) until a round has no 503.
    Returns how many 503s it took."""
    from concurrent.futures import ThreadPoolExecutor

    def probe(_: int) -> int:
        return cluster.request("GET", "/v1/calls/bench-probe", timeout=30)[0]

    seen = 0
    with ThreadPoolExecutor(32) as pool:
        for _ in range(50):
            statuses = list(pool.map(probe, range(64)))
            if any(s not in (404, 503) for s in statuses):
                raise RuntimeError(f"the controller's answers after its Redis restarted: {statuses}")
            if 503 not in statuses:
                return seen
            seen += statuses.count(503)
            time.sleep(0.1)
    raise RuntimeError("the controller still answers 503 after its Redis restarted")


class ShoalRedis:
    """Shoal's Redis, started here rather than by the cluster, so that the durability check can kill it and start
    it again from its AOF. The same settings as the cluster would use (AOF, appendfsync everysec)."""

    def __init__(self) -> None:
        self.server = start_redis("bench-redis", appendonly=True)

    @property
    def url(self) -> str:
        return self.server.url

    def restart(self) -> float:
        self.server, took = kill_and_restart(self.server)
        return took

    def __enter__(self) -> ShoalRedis:
        return self

    def __exit__(self, *_: object) -> None:
        self.server.stop(remove=True)


def bench_async(cluster: LocalCluster, redis: ShoalRedis, seconds: int, peer_stack: CeleryPeer,
                out: dict[str, Any], peer: dict[str, Any]) -> None:
    """Async submissions of one call per request, Shoal's and Celery's back to back in each phase:

    while calls run  nodes and Celery's worker up, runs of half ``seconds``: Shoal driven by wrk (32 connections)
                     and by Python clients (SUBMIT_SHAPES, processes x threads, each thread one POST at a time
                     on a keep-alive connection), then Celery's ``delay()`` from the same shapes; and the rate at
                     which all of
                     the calls wrk submitted then ran;
    ingest alone     nodes and worker stopped, runs of ``seconds`` (10 in a full run), the same clients, then
                     Shoal's batching run (BATCH calls per request), each followed by the durability check (Redis
                     SIGKILLed and restarted from its AOF: see :func:`check_durability`); then the nodes come back
                     and run every call accepted meanwhile.
    """
    url = cluster.url + "/v1/functions/echo/invoke-async"
    short = max(2, seconds // 2)
    print("  shoal async submissions, wrk, nodes running...", flush=True)
    before = outcomes(cluster)
    t0 = time.monotonic()
    res = out["async_running_wrk"] = wrk_calls(url, 1, 32, short)
    drain(cluster, 300)
    res["completed_per_s"] = res["calls"] / (time.monotonic() - t0)  # from the first submission to the last end
    verified(cluster, "async submissions (wrk)", before, res, res["calls"])
    python: dict[str, Any] = {}
    for procs, threads in SUBMIT_SHAPES:
        print(f"  shoal async submissions, {procs}x{threads} Python clients, nodes running...", flush=True)
        before = outcomes(cluster)
        res = python[f"{procs}x{threads}"] = run_clients("shoal-async", procs, threads, short, target=url)
        verified(cluster, f"async submissions ({procs}x{threads} Python clients)", before, res, res["calls"])
    out["async_running_python"] = python
    peer["async_running"] = peer_stack.submissions(short)

    print("  stopping shoal's nodes and celery's worker (ingest alone)...", flush=True)
    nodes = list(cluster.node_ids)
    for node_id in nodes:
        cluster.stop_agent(node_id)
    peer_stack.stop_worker()
    before = outcomes(cluster)

    def shoal_ingest(label: str, run: Callable[[], dict[str, Any]], in_flight: int) -> dict[str, Any]:
        """``in_flight``: calls a client may have had accepted without seeing the answer (wrk stops with its
        requests in flight)."""
        print(f"  shoal ingest alone, {label}, then Redis killed (the controller logs store_unavailable for the "
              "503s of its connections to the old server)...", flush=True)
        already = durable_calls(redis.url)
        res = run()
        check_durability(res, lambda: durable_calls(redis.url) - already, redis.restart, time.monotonic())
        res["answered_503_after_restart"] = settle_controller(cluster)
        if res["recovered"] > res["calls"] + in_flight:
            raise RuntimeError(f"{label}: {res['recovered']} calls in Redis, but {res['calls']} accepted")
        return res

    ingest: dict[str, Any] = {"wrk": shoal_ingest("wrk", lambda: wrk_calls(url, 1, 32, seconds), 32)}
    for procs, threads in SUBMIT_SHAPES:
        ingest[f"python_{procs}x{threads}"] = shoal_ingest(
            f"{procs}x{threads} Python clients",
            functools.partial(run_clients, "shoal-async", procs, threads, seconds, target=url), 0)
    peer["ingest"] = {f"{procs}x{threads}": peer_stack.ingest(procs, threads, seconds)
                      for procs, threads in SUBMIT_SHAPES}
    peer_stack.flush()
    ingest["batch"] = shoal_ingest(f"wrk, {BATCH} calls per request",
                                   lambda: wrk_calls(cluster.url + "/v1/functions/echo/invoke-batch", BATCH, 2,
                                                     seconds), 2 * BATCH)
    out["ingest"] = ingest
    print("  shoal's nodes back, running every call accepted meanwhile...", flush=True)
    t0 = time.monotonic()
    for node_id in nodes:
        cluster.start_agent(node_id)
    drain(cluster, 1800)
    total = sum(r["recovered"] for r in ingest.values())
    out["ingest_completed"] = {"calls": total, "per_s": total / (time.monotonic() - t0)}
    verified(cluster, "ingest", before, {}, total)


def bench_shoal(docker_url: str, seconds: int, quick: bool,
                peer_stack: CeleryPeer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Shoal's figures, and the peer's sync figures measured in turns with them."""
    out: dict[str, Any] = {}
    peer: dict[str, Any] = {}
    with ShoalRedis() as redis, LocalCluster(docker_url, agents=2, name="bench", log_level="error",
                                             controller_env={"SHOAL_QUEUE_LIMIT": "2000000"},
                                             redis_url=redis.url) as cluster:
        out["redis_persistence"] = persistence(redis.url)
        peer["redis_persistence"] = persistence(peer_stack.redis.url)
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
            res = wrk(target, '{"params": 1}', conns, seconds, expect=200)
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
        print("  shoal sync c=1, one Python client (as celery's)...", flush=True)
        before = outcomes(cluster)
        res = out["sync_c1_python"] = run_clients("shoal-sync", 1, 1, seconds, target=url)
        verified(cluster, "sync c=1, Python client", before, res, res["calls"])
        print("  celery delay().get() one after another...", flush=True)
        peer.update(peer_stack.latency())
        print("  the HTTP floor: a bare aiohttp JSON round trip, c=1 and saturation (Python clients)...", flush=True)
        with HttpFloor() as floor:
            out["http_floor_c1"] = run_clients("shoal-sync", 1, 1, seconds, target=floor.url)
            out["http_floor_saturation"] = {f"{p}x{t}": run_clients("shoal-sync", p, t, seconds, target=floor.url)
                                            for p, t in CLIENT_SHAPES}
        first = sync_run("sync c=32 (round 1)", url, 32)
        python_rounds = [python_run("round 1")]
        celery_rounds = [peer_stack.saturation("round 1"), peer_stack.saturation("round 2")]
        python_rounds.append(python_run("round 2"))
        second = sync_run("sync c=32 (round 2)", url, 32)
        # Both rounds: the mean rate and p50 (each round's p50 is wrk's), the worse p99 and max.
        out["sync_c32"] = {"rps": (first["rps"] + second["rps"]) / 2,
                           "p50_ms": (first["p50_ms"] + second["p50_ms"]) / 2,
                           "p99_ms": max(first["p99_ms"], second["p99_ms"]),
                           "max_ms": max(first["max_ms"], second["max_ms"]), "unexpected_status": 0,
                           "requests": first["requests"] + second["requests"],
                           "client_cpu_us_per_call": (first["client_cpu_s"] + second["client_cpu_s"])
                           / (first["requests"] + second["requests"]) * 1e6, "rounds": [first, second]}
        python = out["sync_python"] = best_of_rounds(python_rounds)
        saturation = peer["saturation"] = best_of_rounds(celery_rounds)
        celery_rates = saturation["by_round"]
        out["ratio_wrk_by_round"] = [first["rps"] / celery_rates[0], second["rps"] / celery_rates[1]]
        out["ratio_python_by_round"] = [p / c for p, c in zip(python["by_round"], celery_rates, strict=True)]
        out["sync_c32_pool4"] = sync_run("sync c=32, 2-4 containers per node",
                                         cluster.url + "/v1/functions/echo4/invoke", 32)
        bench_async(cluster, redis, seconds, peer_stack, out, peer)
        print("  shoal cold vs warm...", flush=True)
        cold = []
        for i in range(5 if quick else 15):
            time.sleep(0.3)
            t0 = time.perf_counter()
            status, call, _ = cluster.request("POST", "/v1/functions/cold/invoke", {"params": i})
            cold.append(time.perf_counter() - t0)
            if status != 200 or call.get("status") != "DONE" or call.get("result") != i or not call.get("cold"):
                raise RuntimeError(f"expected a cold call that succeeded: {status} {call}")
        out["cold_p50_ms"], out["cold_calls"] = statistics.median(cold) * 1000, len(cold)
        print("  shoal archive distribution (and its floors: raw ZMQ, page-cache write)...", flush=True)
        data = big_archive()
        assert cluster.base is not None
        floor_two = zmq_floor(cluster.base, data, 2)
        disk_two = disk_rate(cluster.base, data, 2)
        out["archive"] = bench_archive(cluster, data)
        out["archive"].update(zmq_floor_mb_per_s_two=floor_two, page_cache_mb_per_s_two=disk_two)
    print("  shoal archive to one node (and its floors)...", flush=True)
    out["archive"]["one_node"] = bench_archive_one_node(docker_url, data)
    return out, peer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="3 s runs: a check that every path works, not figures")
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
    finally:
        infra.close()
    RESULTS.mkdir(exist_ok=True)
    results = {"shoal": shoal, "celery": celery}
    (RESULTS / "e2e.json").write_text(json.dumps(results, indent=2))
    report(results)
    return 0


def best(runs: dict[str, dict[str, Any]], key: str) -> tuple[str, dict[str, Any]]:
    """The run of ``runs`` (by client processes) with the highest ``key``."""
    return max(runs.items(), key=lambda kv: kv[1][key])


def async_rows(s: dict[str, Any], c: dict[str, Any]) -> list[tuple[str, str]]:
    ing, cing = s["ingest"], c["ingest"]
    shapes = "/".join(cing)
    cn, cbest = best(cing, "durable_per_s")
    pn, pbest = best({k.removeprefix("python_"): v for k, v in ing.items() if k.startswith("python_")},
                     "durable_per_s")

    def durable(res: dict[str, Any], accepted: str = "calls answered 202") -> str:
        return (f"{res['per_s']:.0f}/s accepted ({res['calls']} {accepted}), {res['recovered']} in Redis after "
                "its SIGKILL" + (f" ({res['lost']} LOST)" if res["lost"] else "")
                + f" = {res['durable_per_s']:.0f}/s kept")

    wrk_run, py_run, celery_run = s["async_running_wrk"], s["async_running_python"], c["async_running"]
    rn, rbest = best(py_run, "per_s")
    cr, crbest = best(celery_run, "per_s")
    batch = ing["batch"]
    return [
        ("async submissions/s",
         f"one call per request, ingest alone (shoal's nodes and celery's worker stopped), "
         f"{ing['wrk']['seconds']:.0f} s runs; after each, its Redis SIGKILLed >= {KILL_AFTER} s after the last "
         "answer and restarted from its AOF (what survives a crash of Redis; a crash of the host can lose about "
         "the last second's writes, appendfsync everysec, for both alike):\n"
         f"shoal, Python clients as celery's (best of {shapes} procs x threads: {pn}): {durable(pbest)} = "
         f"{pbest['durable_per_s'] / cbest['durable_per_s']:.2f}x celery\n"
         f"celery delay() (best of {shapes}: {cn}): {durable(cbest, 'delay() calls returned')}\n"
         f"shoal driven by wrk (a C client, 32 connections; its client takes less of the 2 cores, so no ratio): "
         f"{durable(ing['wrk'])}"),
        ("async while calls run",
         f"nodes and celery's worker running, {wrk_run['seconds']:.0f} s runs: shoal Python (best of {shapes}: "
         f"{rn}) {rbest['per_s']:.0f}/s = {rbest['per_s'] / crbest['per_s']:.2f}x celery; celery delay() (best of "
         f"{shapes}: {cr}) {crbest['per_s']:.0f}/s; shoal by wrk {wrk_run['per_s']:.0f}/s (all {wrk_run['calls']} "
         f"ran at {wrk_run['completed_per_s']:.0f}/s)"),
        ("async, batching",
         f"{BATCH} calls per request (wrk, 2 connections), ingest alone, {batch['seconds']:.0f} s: {durable(batch)} "
         f"(batches vs celery's one delay() per call: not like for like)\n"
         f"all {s['ingest_completed']['calls']} calls accepted while the nodes were stopped ran at "
         f"{s['ingest_completed']['per_s']:.0f}/s once they were back"),
        ("redis persistence", f"shoal's: {persistence_text(s['redis_persistence'])}; celery's: "
                              f"{persistence_text(c['redis_persistence'])}\n"
                              "after each restart of its Redis, shoal's controller answered "
                              + ", ".join(str(r["answered_503_after_restart"]) for r in ing.values())
                              + " requests 503 before its pooled Redis connections were open again (the bench's "
                              "probes, between runs)"),
    ]


def archive_rows(a: dict[str, Any]) -> list[tuple[str, str]]:
    nodes, floor, disk, one = (a["mb_per_s_per_node"], a["zmq_floor_mb_per_s_two"], a["page_cache_mb_per_s_two"],
                               a["one_node"])
    mean = statistics.fmean(nodes.values())

    def each(rates: Any) -> str:
        return ", ".join(f"{v:.0f}" for v in rates)

    return [
        ("archive to 2 nodes",
         f"{a['archive_mb']:.0f} MB archive (MB = 10^6 bytes), fetched by both at once: "
         + ", ".join(f"{n} {v:.0f} MB/s" for n, v in nodes.items())
         + f"\nfloor, raw ZMQ on TCP loopback to 2 receivers at once (same chunk size and credit, sha256): "
         f"{each(floor)} MB/s; nodes = {mean / statistics.fmean(floor):.2f}x the floor\n"
         f"page-cache write (buffered, no fsync), 2 writers at once: {each(disk)} MB/s\n"
         f"{a['calls_during']} warm calls (one per 10 ms) during the upload and distribution: p50 "
         f"{a['call_p50_ms']:.2f} ms, p99 {a['call_p99_ms']:.2f} ms, max {a['call_max_ms']:.1f} ms"),
        ("archive to 1 node",
         f"a cluster of one node: {one['mb_per_s']:.0f} MB/s; raw ZMQ floor {one['zmq_floor_mb_per_s']:.0f} MB/s "
         f"(node = {one['mb_per_s'] / one['zmq_floor_mb_per_s']:.2f}x); page-cache write "
         f"{one['page_cache_mb_per_s']:.0f} MB/s"),
    ]


def persistence_text(conf: dict[str, str]) -> str:
    return f"appendonly {conf['appendonly']}, appendfsync {conf['appendfsync']}, save '{conf['save']}'"


def report(r: dict[str, Any]) -> None:
    s, c = r["shoal"], r["celery"]
    c1, c1py, c32, py, sat = s["sync_c1"], s["sync_c1_python"], s["sync_c32"], s["sync_python"], c["saturation"]
    hf = s["http_floor_c1"]
    hfs_shape, hfs = best(s["http_floor_saturation"], "per_s")

    def slow(res: dict[str, Any]) -> str:
        return (f"max {res['max_ms']:.1f} ms, {res['over_slow_ms']} of {res['requests']} over {SLOW_MS} ms "
                f"({res['over_slow_ms'] / max(res['requests'], 1):.2%})")

    rows = [
        ("sync c=1", f"one Python client (the same script for both: http.client keep-alive for shoal, "
                     "delay().get() for celery), one call at a time:\n"
                     f"shoal p50 {c1py['p50_ms']:.2f} ms  p99 {c1py['p99_ms']:.2f} ms  {slow(c1py)}\n"
                     f"celery p50 {c['p50_ms']:.2f} ms  p99 {c['p99_ms']:.2f} ms  {slow(c)}\n"
                     f"celery's / shoal's: p50 {c['p50_ms'] / c1py['p50_ms']:.2f}x, p99 "
                     f"{c['p99_ms'] / c1py['p99_ms']:.2f}x\n"
                     f"floor, a bare aiohttp JSON round trip (no Redis, no node), same client: p50 "
                     f"{hf['p50_ms']:.2f} ms  p99 {hf['p99_ms']:.2f} ms (shoal's p50 = "
                     f"{c1py['p50_ms'] / hf['p50_ms']:.1f}x the floor)\n"
                     f"shoal driven by wrk (a C client): p50 {c1['p50_ms']:.2f} ms  p99 {c1['p99_ms']:.2f} ms  "
                     f"{slow(c1)}\n"
                     "(closed loops: a slow call delays the next instead of being counted in it; the max and the "
                     "count over 5 ms show the tail)"),
        ("sync c=32", f"Python clients (best shape, procs x threads): shoal ({py['clients']}) p50 {py['p50_ms']:.2f} "
                      f"ms  p99 {py['p99_ms']:.2f} ms; celery ({sat['clients']}) p50 {sat['p50_ms']:.2f} ms  p99 "
                      f"{sat['p99_ms']:.2f} ms (celery's / shoal's: p50 {sat['p50_ms'] / py['p50_ms']:.2f}x, p99 "
                      f"{sat['p99_ms'] / py['p99_ms']:.2f}x)\n"
                      f"shoal by wrk: p50 {c32['p50_ms']:.2f} ms  p99 {c32['p99_ms']:.2f} ms  max "
                      f"{c32['max_ms']:.1f} ms  ({c32['rps']:.0f}/s; 2-4 containers per node: "
                      f"{s['sync_c32_pool4']['rps']:.0f}/s)"),
        ("calls/s at saturation",
         f"shoal driven by Python clients as celery is (http.client, best of {'/'.join(py['rounds'][0])} procs x "
         f"threads: {py['clients']}): {py['per_s']:.0f}/s = {py['per_s'] / sat['per_s']:.2f}x celery (by round: "
         f"{', '.join(f'{x:.2f}x' for x in s['ratio_python_by_round'])})\n"
         f"celery delay().get() (best of {'/'.join(sat['rounds'][0])}: {sat['clients']}): {sat['per_s']:.0f}/s\n"
         f"floor, the bare aiohttp round trip with the same clients (best: {hfs_shape}): {hfs['per_s']:.0f}/s (shoal = "
         f"{py['per_s'] / hfs['per_s']:.2f}x the floor)\n"
         f"shoal driven by wrk (a C client, 32 connections): {c32['rps']:.0f}/s (its client takes less of the 2 "
         f"cores than a Python one: {c32['rps'] / sat['per_s']:.2f}x celery's Python-client figure, not like for "
         "like)\n"
         "(each the mean of 2 rounds, in the order shoal wrk, shoal Python, celery, celery, shoal Python, "
         "shoal wrk)"),
        ("client CPU per call", f"wrk {c32['client_cpu_us_per_call']:.0f} us; shoal's Python clients "
                                f"{py['client_cpu_us_per_call']:.0f} us; celery's "
                                f"{sat['client_cpu_us_per_call']:.0f} us "
                                "(user + system, at saturation, on the same 2 cores as the servers)"),
        *async_rows(s, c),
        ("cold (preload none) vs warm", f"cold p50 {s['cold_p50_ms']:.0f} ms vs warm p50 "
                                        f"{c1py['p50_ms']:.2f} ms (median of {s['cold_calls']} cold calls)"),
        *archive_rows(s["archive"]),
    ]
    print_table(rows)


if __name__ == "__main__":
    sys.exit(main())
