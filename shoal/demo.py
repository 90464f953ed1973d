"""`make demo`: a local cluster (Redis, Docker engine, controller, 2 agents) runs the seed's dice function.

It registers the runtime and uploads the function through the main seed's own routes, invokes it through
the v1 API (sync), prints the result, then stops everything it started.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from shoal.archive import build_tar_gz
from shoal.devenv.procs import exit_on_termination, ignore_termination
from shoal.devenv.stack import start_infra
from shoal.localcluster import LocalCluster
from shoal.logs import configure

TERMINAL = ("DONE", "FAILED", "TIMEOUT", "CANCELLED")
DICE_DIR = Path(__file__).resolve().parent.parent / "examples" / "runtimes" / "python" / "dice"
SEED_RUNTIME = {"image": "pythonruntime", "path": "/ws", "dependencies": "pip3 install -r requirements.txt",
                "run": "python3 test.py"}


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class DemoError(Exception):
    pass


def expect(answer: tuple[int, Any, dict[str, str]], status: int, what: str) -> Any:
    """The body of an answer that has the status wanted; a DemoError naming ``what`` otherwise."""
    got, body, _ = answer
    if got != status:
        raise DemoError(f"{what} answered {got}: {json.dumps(body) if not isinstance(body, str) else body}")
    return body


def invoke(cluster: LocalCluster) -> tuple[dict[str, Any], float]:
    """One sync call of the dice function; a call still running when the sync wait ends (202) is awaited."""
    t0 = time.perf_counter()
    status, call, _ = cluster.request("POST", "/v1/functions/dice/invoke", {"params": {"roll": "4d6"}})
    if status == 202:
        deadline = time.monotonic() + 600
        while call["status"] not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.2)
            call = expect(cluster.request("GET", f"/v1/calls/{call['id']}"), 200, "GET /v1/calls/ID")
    elif status != 200:
        raise DemoError(f"POST /v1/functions/dice/invoke answered {status}: {json.dumps(call)}")
    if call["status"] != "DONE":
        raise DemoError(f"the call ended {call['status']}: {json.dumps(call, indent=2)}")
    return call, (time.perf_counter() - t0) * 1000


def main() -> int:
    configure("warning")
    exit_on_termination()
    say = lambda text: print(f"shoal demo: {text}", flush=True)  # noqa: E731
    say("starting the Docker engine and the python runtime image (built offline, cached)...")
    infra = start_infra(with_redis=False)
    try:
        # Node ids of this demo's own: an agent removes its node's containers it does not own (another demo's).
        with LocalCluster(infra.engine.url, agents=2, name=f"demo-{secrets.token_hex(2)}") as cluster:
            say(f"controller {cluster.url}, nodes {', '.join(n['node_id'] for n in cluster.get('/v1/nodes'))}")
            body = expect(cluster.request("POST", "/registerRuntime", SEED_RUNTIME), 200, "POST /registerRuntime")
            say(f"POST /registerRuntime -> 200 {body['name']}")
            archive = build_tar_gz({n: (DICE_DIR / n).read_text() for n in ("test.py", "requirements.txt")})
            data, ctype = multipart("module", "python.tar.gz", archive)
            body = expect(cluster.request("POST", "/registerFunction/pythonruntime/dice", data=data,
                                          headers={"Content-Type": ctype}), 200,
                          "POST /registerFunction/pythonruntime/dice")
            say(f"POST /registerFunction/pythonruntime/dice -> 200 (sha256 {body['sha256'][:12]})")
            for attempt in (1, 2, 3):
                call, took = invoke(cluster)
                kind = "cold" if call["cold"] else "warm"
                say(f"dice 4d6 #{attempt} on {call['node']} ({kind}, {took:.0f} ms) -> {call['result']}")
        say("stopped the cluster")
        return 0
    except DemoError as exc:
        say(f"failed: {exc}")
        return 1
    finally:
        ignore_termination()  # a second Ctrl-C must not leave the engine running with no one to stop it
        infra.close()


if __name__ == "__main__":
    sys.exit(main())
