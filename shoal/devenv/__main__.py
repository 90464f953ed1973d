"""``python -m shoal.devenv up|down|env``: start the local infrastructure once for a whole run.

``up`` starts what is missing (dockerd, redis-server, the runtime image), records what it started in
``<state>/devenv.json`` and prints ``export`` lines for the environment; ``down`` stops exactly what ``up``
started. The test command wraps pytest in them so parallel test workers share one engine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import docker

from shoal.devenv import procs
from shoal.devenv.docker_engine import API_VERSION, release
from shoal.devenv.engine_users import process_lease
from shoal.devenv.paths import state_dir
from shoal.devenv.redis_server import RedisServer, start_redis
from shoal.devenv.runtime_image import IMAGE, ensure_image
from shoal.devenv.sshrig import rig
from shoal.devenv.stack import engine_with_image

T = TypeVar("T")


def record_path() -> Path:
    return state_dir() / "devenv.json"


def up(with_redis: bool, holder: int | None = None) -> dict[str, str]:
    """Start what is missing and record what was started. The private engine is held until ``down`` under a
    lease of its own (exported as ``SHOAL_ENGINE_LEASE``): the process ``holder``'s (the shell of the command
    that will call ``down``: the lease ends with it if it is killed first), or a named one. It stops when its
    last user has left."""
    previous = json.loads(record_path().read_text()) if record_path().exists() else {}
    engine = engine_with_image()
    record: dict[str, object] = {"docker_url": engine.url, "image": IMAGE}
    env = {"DOCKER_HOST": engine.url, "DOCKER_API_VERSION": "1.41", "SHOAL_IMAGE": IMAGE}
    if engine.lease is not None and engine.root is not None:
        engine.keep(process_lease(holder) if holder is not None else f"devenv-up-{secrets.token_hex(6)}")
        record["engine_lease"], record["engine_root"] = engine.lease, str(engine.root)
        env["SHOAL_ENGINE_LEASE"] = str(engine.lease)
    if "redis_dir" in previous:  # one Redis per record: the previous one is not used any more
        RedisServer(port=int(previous["redis_port"]), directory=Path(previous["redis_dir"])).stop(remove=True)
    record["env"] = env
    record_path().write_text(json.dumps(record))  # the engine is on the record before anything else can fail
    if with_redis:
        redis = start_redis()
        record["redis_dir"] = str(redis.directory)
        record["redis_port"] = redis.port
        env["SHOAL_REDIS_URL"] = redis.url
    record["env"] = env
    record_path().write_text(json.dumps(record))
    return env


def down(lease: str | None = None) -> None:
    """Stop what ``up`` started and release its engine lease: ``lease`` (what that ``up`` exported as
    $SHOAL_ENGINE_LEASE: another ``up`` may have written the record since), else the record's."""
    path = record_path()
    record = json.loads(path.read_text()) if path.exists() else {}
    if "redis_dir" in record:
        RedisServer(port=int(record["redis_port"]), directory=Path(record["redis_dir"])).stop(remove=True)
    lease = lease or record.get("engine_lease")
    if lease:
        release(Path(record.get("engine_root") or (state_dir() / "docker").resolve()), lease)
    elif "dockerd" in record:  # a record written before leases
        procs.stop(record["dockerd"], timeout=30)
    if record.get("engine_lease", lease) == lease:  # (another `up` since: its record stays for its `down`)
        path.unlink(missing_ok=True)


def on_stderr(fn: Callable[[], T]) -> T:
    """``fn()`` with file descriptor 1 pointing at stderr: ``up``'s stdout is evaluated by scripts, so nothing
    but its export lines may reach it (a progress line, a child process's output)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        return fn()
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.devenv")
    parser.add_argument("command", choices=["up", "down", "image", "rig-up", "rig-down"])
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--lease", help="down: the engine lease its `up` exported ($SHOAL_ENGINE_LEASE)")
    parser.add_argument("--holder", type=int, metavar="PID",
                        help="up: the engine is held while this process lives (the shell that will run `down`)")
    args = parser.parse_args(argv)
    if args.command == "up":
        if args.holder is not None and procs.start_time(args.holder) is None:
            parser.error(f"--holder {args.holder}: no such process")
        for key, value in on_stderr(lambda: up(with_redis=not args.no_redis, holder=args.holder)).items():
            print(f"export {key}={value}")
    elif args.command == "image":
        # The runtime image in the engine at $DOCKER_HOST: prints present, imported or built.
        client = docker.DockerClient(base_url=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
                                     version=API_VERSION, timeout=300)
        try:
            print(ensure_image(client, os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"), log=False))
        finally:
            client.close()
    elif args.command == "rig-up":
        print(f"export SHOAL_RIG_KEY={rig().start().key}")
    elif args.command == "rig-down":
        rig().stop()
    else:
        down(args.lease)
    return 0


if __name__ == "__main__":
    sys.exit(main())
