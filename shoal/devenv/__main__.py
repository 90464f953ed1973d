"""``python -m shoal.devenv up|down|env``: start the local infrastructure once for a whole run.

``up`` starts what is missing (dockerd, redis-server, the runtime image), records what it started in a record
of its own, ``<state>/devenv/<id>.json``, and prints ``export`` lines for the environment; ``down`` stops
exactly what that ``up`` started. The test command wraps pytest in them so parallel test workers share one engine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import docker

from shoal.devenv import procs
from shoal.devenv.docker_engine import API_VERSION, release
from shoal.devenv.engine_users import EngineUsers, is_lease, process_lease
from shoal.devenv.paths import state_dir
from shoal.devenv.redis_server import RedisServer, start_redis
from shoal.devenv.runtime_image import IMAGE, ensure_image
from shoal.devenv.sshrig import rig
from shoal.devenv.stack import engine_with_image

T = TypeVar("T")


_RECORD_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def legacy_record_path() -> Path:
    """The one record of earlier versions (every ``up`` wrote over it)."""
    return state_dir() / "devenv.json"


def record_path(rid: str) -> Path:
    """The record of one ``up`` (its id: its engine lease, else a name of its own)."""
    if not _RECORD_ID.fullmatch(rid):
        raise ValueError(f"not a devenv record id: {rid!r}")
    return state_dir() / "devenv" / f"{rid}.json"


def read_record(path: Path) -> dict[str, Any]:
    """A record; one damaged (a run killed as it wrote an older version's) is taken as absent, with a warning."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        print(f"shoal.devenv: ignoring the unreadable record {path}: {exc}", file=sys.stderr)
        return {}
    return record if isinstance(record, dict) else {}


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Whole or not at all: written beside, then renamed over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(record))
    os.replace(part, path)


def stop_recorded_redis(record: dict[str, Any]) -> None:
    if "redis_dir" in record:
        RedisServer(port=int(record["redis_port"]), directory=Path(record["redis_dir"])).stop(remove=True)


def sweep_dead_records() -> None:
    """Records of ``up``s whose engine lease is gone (the shell that held it was killed before its ``down``):
    their Redis is stopped and the record removed. A record without a lease (the system engine's) stays for
    its ``down``."""
    for path in [*sorted((state_dir() / "devenv").glob("*.json")), legacy_record_path()]:
        record = read_record(path)
        lease, root = record.get("engine_lease"), record.get("engine_root")
        if not lease or not root:
            continue
        with EngineUsers(Path(root)).locked() as users:
            if lease in users.live():
                continue
        stop_recorded_redis(record)
        path.unlink(missing_ok=True)


def up(with_redis: bool, holder: int | None = None) -> dict[str, str]:
    """Start what is missing and record what was started, in a record of this ``up``'s own (exported as
    ``SHOAL_DEVENV_ID``: another ``up`` meanwhile, say ``make test`` beside a developer's, keeps its own). The
    private engine is held until ``down`` under a lease of its own (exported as ``SHOAL_ENGINE_LEASE``): the
    process ``holder``'s (the shell of the command that will call ``down``: the lease ends with it if it is
    killed first), or a named one. It stops when its last user has left."""
    sweep_dead_records()
    engine = engine_with_image()
    record: dict[str, Any] = {"docker_url": engine.url, "image": IMAGE}
    env = {"DOCKER_HOST": engine.url, "DOCKER_API_VERSION": "1.41", "SHOAL_IMAGE": IMAGE}
    rid = f"devenv-{secrets.token_hex(6)}"
    if engine.lease is not None and engine.root is not None:
        engine.keep(process_lease(holder) if holder is not None else f"devenv-up-{secrets.token_hex(6)}")
        record["engine_lease"], record["engine_root"] = engine.lease, str(engine.root)
        env["SHOAL_ENGINE_LEASE"] = rid = str(engine.lease)
    env["SHOAL_DEVENV_ID"] = rid
    path = record_path(rid)
    try:
        record["env"] = env
        write_record(path, record)  # the engine is on the record before anything else can fail
        if with_redis:
            redis = start_redis()
            record["redis_dir"] = str(redis.directory)
            record["redis_port"] = redis.port
            env["SHOAL_REDIS_URL"] = redis.url
        record["env"] = env
        write_record(path, record)
    except BaseException:  # (a SIGTERM too: see main) no export line is printed, so no `down` would come
        down(rid)
        raise
    return env


def down(lease: str | None = None) -> None:
    """Stop what one ``up`` started and release its engine lease: the ``up`` whose record is ``lease`` (what it
    exported as $SHOAL_ENGINE_LEASE), else $SHOAL_DEVENV_ID (what it exported), else the one record of an older
    version (also when it holds ``lease``: an ``up`` made before records were its own)."""
    rid = lease or os.environ.get("SHOAL_DEVENV_ID", "")
    path = legacy_record_path() if not rid else record_path(rid) if _RECORD_ID.fullmatch(rid) else None
    record = read_record(path) if path is not None else {}  # (a name that is no record id: nothing recorded)
    if not record and lease and read_record(legacy_record_path()).get("engine_lease") == lease:
        path = legacy_record_path()
        record = read_record(path)
    stop_recorded_redis(record)
    # (only a lease is released: an `up` on the system engine holds none, and its id is no lease)
    held = record.get("engine_lease") or (lease if lease and is_lease(lease) else None)
    if held:
        release(Path(record.get("engine_root") or (state_dir() / "docker").resolve()), held)
    elif "dockerd" in record:  # a record written before leases
        procs.stop(record["dockerd"], timeout=30)
    if path is not None:
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
    procs.exit_on_termination()  # a SIGTERM or SIGHUP midway (a CI cancel) stops what was started, as Ctrl-C does
    if args.command == "up":
        if args.holder is not None and procs.start_time(args.holder) is None:
            parser.error(f"--holder {args.holder}: no such process")
        for key, value in on_stderr(lambda: up(with_redis=not args.no_redis, holder=args.holder)).items():
            print(f"export {key}={shlex.quote(value)}")  # (evaluated by a shell: a state directory with a space)
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
