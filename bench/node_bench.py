"""Node benchmark: the warm and cold paths through a real node agent, against the machine's floors.

Everything is measured in the same run, on the same engine and image:

floors   bare ZMQ round trip (ipc, two processes), bare `docker exec`, bare `docker run --rm` (the CLI) and
         the same run through the Engine API without the removal (as a cold call is timed), bare start of
         the runtime's interpreter inside a running container;
shoal    warm handler-style round trip (sequential p50/p99 and calls/s through one miniworker, plus
         pipelined calls/s), warm command-style round trip, cold start under preload `none`, and the
         agent's RSS over 100,000 calls.

Run: `make bench` (or `.venv/bin/python -m bench.node_bench [--quick]`). Prints a table and writes JSON to
bench/results/node.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import psutil
import zmq

from bench.stats import pct
from bench.table import print_table
from shoal.devenv.procs import exit_on_termination
from shoal.devenv.stack import start_infra
from shoal.localnode import LocalNode
from shoal.logs import configure

ECHO = {"handler.py": "def handler(params):\n    return params\n"}
NOOP_COMMAND = {"noop.py": "print('ok')\n"}


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(samples, 0.5) * 1000, "p99_ms": pct(samples, 0.99) * 1000,
            "max_ms": max(samples) * 1000, "mean_ms": statistics.fmean(samples) * 1000, "n": len(samples)}


# ---- floors ------------------------------------------------------------------------------------
ECHO_SERVER = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.REP); s.bind(sys.argv[1])
while True:
    m = s.recv()
    if m == b"stop": s.send(b"bye"); break
    s.send(m)
"""


def floor_zmq(n: int) -> dict[str, float]:
    path = f"/tmp/shoal-bench-{os.getpid()}.ipc"
    url = f"ipc://{path}"
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, url])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)  # an echo server that did not start is an error, not a hang
    sock.connect(url)
    try:
        for _ in range(200):
            sock.send(b"x")
            sock.recv()

        def rt() -> None:
            sock.send(b"x" * 64)
            sock.recv()

        samples = timed(rt, n)
        sock.send(b"stop")
        sock.recv()
    finally:
        sock.close(0)
        ctx.term()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        Path(path).unlink(missing_ok=True)
    return summary(samples)


def floor_docker(env: dict[str, str], image: str, n_exec: int, n_run: int) -> dict[str, dict[str, float]]:
    cli = dict(os.environ, **env)
    cid = subprocess.run(["docker", "run", "-d", "--init", "--network", "none", image, "sleep", "3600"],
                         env=cli, check=True, capture_output=True, text=True).stdout.strip()
    try:
        def exec_true() -> None:
            subprocess.run(["docker", "exec", cid, "true"], env=cli, check=True, capture_output=True)

        exec_samples = timed(exec_true, n_exec)
        inner = subprocess.run(
            ["docker", "exec", cid, "python3", "-c",
             "import subprocess,time,statistics\n"
             "s=[]\n"
             "for _ in range(30):\n"
             "    t=time.perf_counter(); subprocess.run(['python3','-c','pass']); s.append(time.perf_counter()-t)\n"
             "print(statistics.median(s))"],
            env=cli, check=True, capture_output=True, text=True)
        interp = float(inner.stdout.strip())
    finally:
        subprocess.run(["docker", "rm", "-f", cid], env=cli, capture_output=True, check=False)

    def run_true() -> None:
        subprocess.run(["docker", "run", "--rm", "--init", "--network", "none", image, "true"],
                       env=cli, check=True, capture_output=True)

    run_samples = timed(run_true, n_run)
    # The same through the Engine API, as a miniworker does it (no CLI process to start), and with the removal
    # off the clock, as it is for a cold call (the container is removed after its result is sent).
    with ApiRun(cli["DOCKER_HOST"], image) as api_run:
        api_samples = timed(api_run, n_run)
    return {"docker_exec": summary(exec_samples), "docker_run": summary(run_samples),
            "docker_run_api": summary(api_samples), "interpreter_start": {"p50_ms": interp * 1000}}


class ApiRun:
    """``docker run`` of the image through the Engine API (create, start, wait), without the removal: a cold
    call's floor. Callable; the containers are removed when the context ends."""

    def __init__(self, docker_url: str, image: str) -> None:
        self.api = docker.APIClient(base_url=docker_url, version="1.41")
        self.image = image
        self.created: list[str] = []

    def __call__(self) -> None:
        cid = self.api.create_container(self.image, ["true"], host_config=self.api.create_host_config(
            network_mode="none", init=True))["Id"]
        self.created.append(cid)
        self.api.start(cid)
        self.api.wait(cid, timeout=60)

    def __enter__(self) -> ApiRun:
        return self

    def __exit__(self, *_: object) -> None:
        for cid in self.created:
            self.api.remove_container(cid, force=True)
        self.api.close()


# ---- shoal ---------------------------------------------------------------------------------------
def pipelined(node: LocalNode, name: str, total: int, window: int) -> float:
    """Calls/s with `window` calls in flight (one miniworker serves them one after another)."""
    link = node.link
    sent = done = 0
    outstanding: set[str] = set()
    t0 = time.perf_counter()
    while done < total:
        while sent < total and len(outstanding) < window:
            outstanding.add(link.submit(node.node_id, name, sent))
            sent += 1
        link.pump(0.5)
        finished = [c for c in outstanding if c in link.results]
        for c in finished:
            r = link.results.pop(c)
            if r["status"] != "DONE":
                raise RuntimeError(f"call failed: {r}")
            outstanding.discard(c)
            link.states.pop(c, None)
        done += len(finished)
    return total / (time.perf_counter() - t0)


def bench_warm(node: LocalNode, n: int) -> dict[str, Any]:
    node.deploy("echo", ECHO, entrypoint="handler:handler", max_warm=1)
    node.call("echo", 0)
    for i in range(300):
        node.call("echo", i)

    broker: list[float] = []

    def one() -> None:
        r = node.link.call(node.node_id, "echo", 1)
        node.link.states.clear()
        if r["status"] != "DONE":
            raise RuntimeError(r)
        broker.append(r["timings"]["broker_rtt_s"])

    samples = timed(one, n)
    out: dict[str, Any] = summary(samples)
    # What the issue defines: the broker's dispatch to the miniworker until its result is back in the broker.
    out["broker_rtt"] = summary(broker)
    out["calls_per_s_sequential"] = len(samples) / sum(samples)
    out["calls_per_s_pipelined"] = pipelined(node, "echo", max(2000, n), 32)
    return out


def bench_command(node: LocalNode, n: int) -> dict[str, Any]:
    node.add_runtime(name="noop-rt", run="python3 noop.py", dependencies="")
    node.deploy("noop", NOOP_COMMAND, runtime="noop-rt")
    for _ in range(5):
        node.call("noop")
    return summary(timed(lambda: node.call("noop"), n))


def bench_cold(docker_url: str, n: int) -> dict[str, Any]:
    """Cold calls under preload ``none``, each after a run of the same image through the Engine API (the floor,
    sampled in turns with the calls so that a change in the host's speed weighs on both alike)."""
    with LocalNode(docker_url, node_id="bench-cold", policy="none") as node, \
            ApiRun(docker_url, "pythonruntime") as api_run:
        node.add_runtime()
        node.deploy("echo", ECHO, entrypoint="handler:handler")
        node.call("echo", 0)
        samples, floor = [], []
        for i in range(n):
            # Each on a quiet engine: the previous call's container removed, the spare miniworker process ready
            # (as it is between calls on a real node).
            time.sleep(0.3)
            floor.extend(timed(api_run, 1))
            time.sleep(0.3)
            t0 = time.perf_counter()
            r = node.call("echo", i)
            samples.append(time.perf_counter() - t0)
            if not r["cold"] or r["status"] != "DONE":
                raise RuntimeError(f"expected a cold call: {r}")
        return dict(summary(samples), floor_api_run=summary(floor))


def bench_rss(node: LocalNode, total: int) -> dict[str, float]:
    assert node.proc is not None
    proc = psutil.Process(node.proc.pid)
    pipelined(node, "echo", 10_000, 32)
    before = proc.memory_info().rss
    samples = [before]
    for _ in range(10):
        pipelined(node, "echo", total // 10, 32)
        samples.append(proc.memory_info().rss)
    return {"calls": total, "rss_before_mb": before / 2**20, "rss_after_mb": samples[-1] / 2**20,
            "growth_mb": (samples[-1] - before) / 2**20, "max_mb": max(samples) / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--only", choices=["warm"], help="run one part (with its floors)")
    args = parser.parse_args()
    exit_on_termination()  # a SIGTERM or SIGHUP stops what the run started, as Ctrl-C does
    configure("warning")
    q = args.quick
    infra = start_infra(with_redis=False)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 2**30}}
    try:
        print("floors...", flush=True)
        results["floor_zmq_ipc"] = floor_zmq(2000 if q else 20000)
        results.update(floor_docker(infra.engine.env(), "pythonruntime", 10 if q else 30, 5 if q else 15))
        with LocalNode(infra.engine.url, node_id="bench-warm", policy="function") as node:
            node.add_runtime()
            print("warm handler...", flush=True)
            results["warm_handler"] = bench_warm(node, 2000 if q else 10000)
            if args.only == "warm":
                print_table([(k, f"p50 {v['p50_ms']:.3f} ms") for k, v in
                             (("floor ZMQ ipc", results["floor_zmq_ipc"]),
                              ("broker->mw->container->broker", results["warm_handler"]["broker_rtt"]),
                              ("client->...->client", results["warm_handler"]))])
                print(f"calls/s sequential {results['warm_handler']['calls_per_s_sequential']:.0f}, pipelined "
                      f"{results['warm_handler']['calls_per_s_pipelined']:.0f}")
                return 0
            print("warm command...", flush=True)
            results["warm_command"] = bench_command(node, 20 if q else 100)
            print("agent RSS...", flush=True)
            results["agent_rss"] = bench_rss(node, 10_000 if q else 100_000)
        print("cold start (preload none)...", flush=True)
        results["cold_none"] = bench_cold(infra.engine.url, 5 if q else 15)
    finally:
        infra.close()
    report(results)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "node.json").write_text(json.dumps(results, indent=2))
    return 0


def report(r: dict[str, Any]) -> None:
    w, c, cold = r["warm_handler"], r["warm_command"], r["cold_none"]
    cold_floor = cold["floor_api_run"]["p50_ms"]
    zmq_p50 = r["floor_zmq_ipc"]["p50_ms"]
    interp = r["interpreter_start"]["p50_ms"]
    run_p50, api_p50 = r["docker_run"]["p50_ms"], r["docker_run_api"]["p50_ms"]
    rows = [
        ("floor: ZMQ round trip (ipc)", f"p50 {zmq_p50:.3f} ms"),
        ("floor: docker exec", f"p50 {r['docker_exec']['p50_ms']:.1f} ms"),
        ("floor: docker run --rm", f"p50 {run_p50:.1f} ms"),
        ("floor: docker run via the API, no removal", f"p50 {api_p50:.1f} ms"),
        ("floor: interpreter start in container", f"p50 {interp:.1f} ms"),
        ("warm handler, broker->miniworker->container->broker", f"p50 {w['broker_rtt']['p50_ms']:.3f} ms  "
                                                               f"p99 {w['broker_rtt']['p99_ms']:.3f} ms"),
        ("warm handler, client->agent->...->client", f"p50 {w['p50_ms']:.3f} ms  p99 {w['p99_ms']:.3f} ms  "
                                    f"= {w['p50_ms'] / zmq_p50:.1f}x ZMQ floor, "
                                    f"{r['docker_exec']['p50_ms'] / w['p50_ms']:.0f}x faster than docker exec"),
        ("warm handler calls/s (one miniworker)", f"sequential {w['calls_per_s_sequential']:.0f}/s  "
                                                   f"pipelined {w['calls_per_s_pipelined']:.0f}/s"),
        ("warm command round trip", f"p50 {c['p50_ms']:.1f} ms  p99 {c['p99_ms']:.1f} ms  "
                                    f"= interpreter start + {c['p50_ms'] - interp:.1f} ms"),
        ("cold start, preload none", f"p50 {cold['p50_ms']:.0f} ms  max {cold['max_ms']:.0f} ms (of {cold['n']})  "
                                     f"= {cold['p50_ms'] / run_p50:.2f}x docker run, "
                                     f"{cold['p50_ms'] / api_p50:.2f}x the API run; "
                                     f"{cold['p50_ms'] / cold_floor:.2f}x the API run taken in turns with the "
                                     f"calls (p50 {cold_floor:.0f} ms)"),
        ("agent RSS over calls", f"{r['agent_rss']['calls']} calls: {r['agent_rss']['rss_before_mb']:.1f} -> "
                                 f"{r['agent_rss']['rss_after_mb']:.1f} MB (growth "
                                 f"{r['agent_rss']['growth_mb']:+.1f} MB)"),
    ]
    print_table(rows)


if __name__ == "__main__":
    sys.exit(main())
