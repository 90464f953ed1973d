"""`make demo`: a local cluster (Redis, Docker engine, controller, 2 agents) runs the seed's dice function.

It registers the runtime and uploads the function through the main seed's own routes, invokes it through
the v1 API (sync), prints the result, then stops everything it started.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

from shoal.archive import build_tar_gz
from shoal.devenv.stack import start_infra
from shoal.localcluster import LocalCluster
from shoal.logs import configure

DICE_DIR = Path(__file__).resolve().parent.parent / "examples" / "runtimes" / "python" / "dice"
SEED_RUNTIME = {"image": "pythonruntime", "path": "/ws", "dependencies": "pip3 install -r requirements.txt",
                "run": "python3 test.py"}


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def main() -> int:
    configure("warning")
    say = lambda text: print(f"shoal demo: {text}", flush=True)  # noqa: E731
    say("starting the Docker engine and the python runtime image (built offline, cached)...")
    infra = start_infra(with_redis=False)
    try:
        with LocalCluster(infra.engine.url, agents=2, name="demo") as cluster:
            say(f"controller {cluster.url}, nodes {', '.join(n['node_id'] for n in cluster.get('/v1/nodes'))}")
            status, body, _ = cluster.request("POST", "/registerRuntime", SEED_RUNTIME)
            say(f"POST /registerRuntime -> {status} {body['name']}")
            archive = build_tar_gz({n: (DICE_DIR / n).read_text() for n in ("test.py", "requirements.txt")})
            data, ctype = multipart("module", "python.tar.gz", archive)
            status, body, _ = cluster.request("POST", "/registerFunction/pythonruntime/dice", data=data,
                                              headers={"Content-Type": ctype})
            say(f"POST /registerFunction/pythonruntime/dice -> {status} (sha256 {body['sha256'][:12]})")
            for attempt in (1, 2, 3):
                t0 = time.perf_counter()
                status, call, _ = cluster.request("POST", "/v1/functions/dice/invoke",
                                                  {"params": {"roll": "4d6"}})
                took = (time.perf_counter() - t0) * 1000
                if status != 200 or call["status"] != "DONE":
                    say(f"call failed: {json.dumps(call, indent=2)}")
                    return 1
                kind = "cold" if call["cold"] else "warm"
                say(f"dice 4d6 #{attempt} on {call['node']} ({kind}, {took:.0f} ms) -> {call['result']}")
        say("stopped the cluster")
        return 0
    finally:
        infra.close()


if __name__ == "__main__":
    sys.exit(main())
