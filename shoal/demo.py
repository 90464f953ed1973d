"""`make demo`: start what is needed, run the seed's dice function on a local node, print its result."""

from __future__ import annotations

import json
import sys
import time

from shoal.devenv.stack import start_infra
from shoal.localnode import LocalNode
from shoal.logs import configure

DICE_DIR = "examples/runtimes/python/dice"


def main() -> int:
    configure("warning")
    print("shoal demo: starting the Docker engine and the python runtime image (built offline, cached)...")
    infra = start_infra(with_redis=False)
    try:
        with LocalNode(infra.engine.url, node_id="demo-node", policy="function") as node:
            print(f"shoal demo: node agent up (status {node.status_url}); registering runtime 'pythonruntime'")
            node.add_runtime()
            files = {name: open(f"{DICE_DIR}/{name}").read() for name in ("test.py", "requirements.txt")}
            state = node.deploy("dice", files)
            if state.get("state") != "ready":
                print(f"shoal demo: the function could not be prepared: {state}", file=sys.stderr)
                return 1
            print('shoal demo: invoking dice with {"roll": "4d6"}')
            for attempt in range(2):
                t0 = time.perf_counter()
                result = node.call("dice", {"roll": "4d6"})
                took = (time.perf_counter() - t0) * 1000
                if result["status"] != "DONE":
                    print(f"shoal demo: call failed: {json.dumps(result, indent=2)}", file=sys.stderr)
                    return 1
                kind = "cold" if result["cold"] else "warm"
                print(f"shoal demo: call {attempt + 1} ({kind}, {took:.0f} ms): result {result['result']}")
        return 0
    finally:
        infra.close()


if __name__ == "__main__":
    sys.exit(main())
