"""``shoal``: the command line for a Shoal cluster.

    shoal runtime create --image pythonruntime --run "python3 test.py" [--name N] [--path /ws] [--dependencies CMD]
    shoal function upload dice ./examples/runtimes/python/dice --runtime pythonruntime [--entrypoint mod:fn]
    shoal invoke dice --params '{"roll": "4d6"}' [--async] [--timeout S]
    shoal invoke dice --batch params.jsonl     (one JSON params per line; all accepted, none awaited)
    shoal calls list [--function F] [--status S] | calls get ID | calls wait ID | calls cancel ID
    shoal nodes list | nodes get ID
    shoal up [--agents 2] [--port 3000] | shoal status | shoal down
    shoal deploy -i inventory/example [site|upgrade|teardown] [-- ansible-playbook args]

Every command takes ``--url`` (default ``$SHOAL_URL`` or http://127.0.0.1:3000) and ``--json`` (machine
output); without ``--json`` it prints tables and shows progress for uploads and long waits. A controller
with an API token wants it in ``$SHOAL_API_TOKEN`` (or in the file ``$SHOAL_API_TOKEN_FILE`` names).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from shoal import httpclient
from shoal.auth import bearer, token_from_env
from shoal.devenv import procs
from shoal.devenv.paths import state_dir
from shoal.errors import ConfigError

TERMINAL = ("DONE", "FAILED", "TIMEOUT", "CANCELLED")
console = Console(stderr=False)
errors = Console(stderr=True)


class CliError(Exception):
    pass


def q(name: str) -> str:
    """A name or id as one path segment (a space or a slash in it must not change the route)."""
    return urllib.parse.quote(name, safe="")


def parse_json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise CliError(f"{what}: the answer is not JSON: {raw[:200].decode('utf-8', 'replace')!r}") from None


class Client:
    def __init__(self, url: str, token: str = "") -> None:
        self.url = url.rstrip("/")
        self.auth = bearer(token)  # the controller's API token ($SHOAL_API_TOKEN or the file $SHOAL_API_TOKEN_FILE)

    def request(self, method: str, path: str, body: Any = None, data: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 300) -> Any:
        hdrs = {**self.auth, **(headers or {})}
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        try:
            req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
            with httpclient.urlopen(req, timeout=timeout) as resp:  # (redirects not followed)
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:
            raw = err.read()
            if 300 <= err.code < 400:
                raise self._redirected(f"{method} {path}", err.code, err.headers.get("Location")) from None
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", "replace")[:500]
            raise CliError(f"{method} {path}: HTTP {err.code}: {message}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:  # unreachable, not HTTP, a bad URL
            raise CliError(f"cannot reach the controller at {self.url}: {exc}") from None
        if status == 204 or not raw:
            return None
        return parse_json(raw, f"{method} {path}")

    def _redirected(self, what: str, code: int, location: str | None) -> CliError:
        return CliError(f"{what}: HTTP {code}: the controller's URL {self.url} redirects to {location!r}; give the "
                        "address it ends at (--url or $SHOAL_URL): redirects are not followed, they would carry "
                        "the API token elsewhere")

    def upload(self, path: str, archive: bytes, show: bool) -> Any:
        """Stream an archive with a progress bar."""
        try:
            parsed = urllib.parse.urlsplit(self.url)
            if parsed.scheme not in ("http", "https"):
                raise ValueError(f"the URL must start with http:// or https://, not {self.url!r}")
            kind = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
            conn = kind(parsed.hostname or "127.0.0.1", parsed.port, timeout=600)
            conn.putrequest("POST", parsed.path.rstrip("/") + path)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(len(archive)))
            for name, value in self.auth.items():
                conn.putheader(name, value)
            conn.endheaders()
            with Progress(TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          console=errors, disable=not show, transient=True) as progress:
                task = progress.add_task("upload", total=len(archive))
                view = memoryview(archive)
                for start in range(0, len(archive), 1 << 20):
                    chunk = view[start:start + (1 << 20)]
                    conn.send(chunk)
                    progress.update(task, advance=len(chunk))
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise CliError(f"cannot upload to the controller at {self.url}: {exc}") from None
        if 300 <= resp.status < 400:
            raise self._redirected("upload", resp.status, resp.getheader("Location"))
        if resp.status >= 400:
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", "replace")[:500]
            raise CliError(f"upload: HTTP {resp.status}: {message}")
        return parse_json(raw, "upload")


def archive_of(path: Path) -> bytes:
    """A directory becomes a tar.gz of its files; a file is taken as the archive itself."""
    try:
        if path.is_file():
            return path.read_bytes()
        if not path.is_dir():
            raise CliError(f"{path} is neither a directory nor an archive file")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for file in sorted(path.rglob("*")):
                if file.is_file() and "__pycache__" not in file.parts:
                    tf.add(file, arcname=str(file.relative_to(path)))
        return buf.getvalue()
    except OSError as exc:  # unreadable, or a file gone while the directory was read
        raise CliError(f"cannot read {exc.filename or path}: {exc.strerror or exc}") from None


def show(args: argparse.Namespace, data: Any, columns: list[str] | None = None, title: str = "") -> None:
    if args.json or columns is None:
        print(json.dumps(data, indent=None if args.json else 2))
        return
    rows = data if isinstance(data, list) else [data]
    table = Table(title=title or None)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[_cell(row.get(col)) for col in columns])
    console.print(table)


def _cell(value: Any) -> Text:
    """A table cell shown as it is (a plain string would be read as rich markup: ``[/x]`` in a result failed)."""
    if value is None:
        return Text("")
    if isinstance(value, dict | list):
        text = json.dumps(value)
        return Text(text if len(text) <= 60 else text[:57] + "...")
    return Text(str(value))


# ---- commands ------------------------------------------------------------------------------------
def cmd_runtime(args: argparse.Namespace, c: Client) -> None:
    if args.action == "create":
        body = {k: v for k, v in {"name": args.name, "image": args.image, "path": args.path,
                                  "dependencies": args.dependencies, "run": args.run}.items() if v is not None}
        show(args, c.request("POST", "/v1/runtimes", body), ["name", "image", "path", "dependencies", "run"])
    elif args.action == "list":
        show(args, c.request("GET", "/v1/runtimes"), ["name", "image", "path", "dependencies", "run"], "runtimes")
    elif args.action == "get":
        show(args, c.request("GET", f"/v1/runtimes/{q(args.name)}"), ["name", "image", "path", "dependencies", "run"])
    elif args.action == "delete":
        c.request("DELETE", f"/v1/runtimes/{q(args.name)}")
        show(args, {"deleted": args.name})


def cmd_function(args: argparse.Namespace, c: Client) -> None:
    cols = ["name", "version", "runtime", "entrypoint", "size", "sha256"]
    if args.action == "upload":
        query = {"runtime": args.runtime}
        for key in ("entrypoint", "timeout", "preload", "min_warm", "max_warm", "keepalive"):
            value = getattr(args, key, None)
            if value is not None:
                query[key] = str(value)
        data = archive_of(Path(args.path))
        record = c.upload(f"/v1/functions/{q(args.name)}?{urllib.parse.urlencode(query)}", data, not args.json)
        show(args, record, cols)
    elif args.action == "list":
        show(args, c.request("GET", "/v1/functions"), cols, "functions")
    elif args.action == "get":
        show(args, c.request("GET", f"/v1/functions/{q(args.name)}"), [*cols, "versions", "nodes"])
    elif args.action == "delete":
        c.request("DELETE", f"/v1/functions/{q(args.name)}")
        show(args, {"deleted": args.name})


CALL_COLS = ["id", "function", "version", "status", "node", "result", "error"]


def wait_for(c: Client, call_id: str, human: bool, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=errors, disable=not human,
                  transient=True) as progress:
        task = progress.add_task(f"call {call_id[:12]}: waiting")
        while True:
            call = c.request("GET", f"/v1/calls/{q(call_id)}")
            if not isinstance(call, dict) or not isinstance(call.get("status"), str):
                raise CliError(f"GET /v1/calls/{q(call_id)}: the answer is not a call: {str(call)[:200]!r}")
            progress.update(task, description=f"call {call_id[:12]}: {call['status']}")
            if call["status"] in TERMINAL:
                return call
            if time.monotonic() > deadline:
                raise CliError(f"call {call_id} still {call['status']} after {timeout:g} s")
            time.sleep(0.1)


BATCH_MAX = 1000  # calls per invoke-batch request (the controller's bound)
PAGE_MAX = 1000  # calls per page of GET /v1/calls (the controller's bound)


def read_params_lines(path: str) -> list[Any]:
    """One JSON value per line (blank lines skipped); ``-`` is stdin."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:  # not UTF-8
        raise CliError(f"cannot read {path}: {exc}") from None
    params: list[Any] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                params.append(json.loads(line))
            except ValueError as exc:
                raise CliError(f"{path}:{number}: not JSON ({exc})") from None
    if not params:
        raise CliError(f"{path}: no params (one JSON value per line)")
    return params


def cmd_invoke_batch(args: argparse.Namespace, c: Client) -> None:
    if args.params is not None or args.async_:
        raise CliError("--batch reads each call's params from its file and does not wait: no --params/--async")
    params = read_params_lines(args.batch)
    accepted: list[dict[str, Any]] = []
    for start in range(0, len(params), BATCH_MAX):
        body: dict[str, Any] = {"calls": [{"params": p} for p in params[start:start + BATCH_MAX]]}
        if args.timeout is not None:
            body["timeout"] = args.timeout
        try:
            accepted += c.request("POST", f"/v1/functions/{q(args.name)}/invoke-batch", body)["calls"]
        except CliError as exc:
            if not accepted:
                raise
            # The earlier requests' calls are queued and will run: say which, so that a rerun does not repeat them.
            show(args, accepted, ["id", "status", "location"], f"{len(accepted)} calls accepted")
            raise CliError(f"only the first {len(accepted)} of {len(params)} calls were accepted (listed): {exc}") \
                from None
    show(args, accepted, ["id", "status", "location"], f"{len(accepted)} calls accepted")


def cmd_invoke(args: argparse.Namespace, c: Client) -> None:
    if args.batch is not None:
        cmd_invoke_batch(args, c)
        return
    try:
        params = json.loads(args.params) if args.params is not None else None
    except ValueError as exc:
        raise CliError(f"--params must be JSON: {exc}") from None
    body: dict[str, Any] = {"params": params}
    if args.timeout is not None:
        body["timeout"] = args.timeout
    if args.async_:
        show(args, c.request("POST", f"/v1/functions/{q(args.name)}/invoke-async", body))
        return
    answer = c.request("POST", f"/v1/functions/{q(args.name)}/invoke", body)
    if answer.get("status") not in TERMINAL:
        answer = wait_for(c, answer["id"], not args.json, 86400)
    show(args, answer, CALL_COLS)
    if answer["status"] != "DONE":
        sys.exit(1)


def cmd_calls(args: argparse.Namespace, c: Client) -> None:
    if args.action == "list":
        query = {k: v for k, v in {"function": args.function, "status": args.status,
                                   "limit": args.limit}.items() if v is not None}
        wanted = 50 if args.limit is None else int(args.limit)
        if wanted < 1:
            raise CliError("--limit must be at least 1")
        calls: list[dict[str, Any]] = []
        while True:  # a status filter that matches few gives short pages: follow them up to the limit
            query["limit"] = min(PAGE_MAX, wanted - len(calls))
            page = c.request("GET", f"/v1/calls?{urllib.parse.urlencode(query)}")
            calls += page["calls"]
            if len(calls) >= wanted or page["next_cursor"] is None:
                break
            query["cursor"] = page["next_cursor"]
        listing = {"calls": calls, "next_cursor": page["next_cursor"]}
        show(args, listing if args.json else calls, CALL_COLS, "calls")
    elif args.action == "get":
        show(args, c.request("GET", f"/v1/calls/{q(args.id)}"))
    elif args.action == "wait":
        call = wait_for(c, args.id, not args.json, args.timeout)
        show(args, call, CALL_COLS)
        if call["status"] != "DONE":
            sys.exit(1)  # as `invoke` does: a script can tell a failed call
    elif args.action == "cancel":
        show(args, c.request("POST", f"/v1/calls/{q(args.id)}/cancel"))


def cmd_nodes(args: argparse.Namespace, c: Client) -> None:
    cols = ["node_id", "state", "capacity", "inflight", "done", "functions_ready", "status_url"]
    if args.action == "list":
        show(args, c.request("GET", "/v1/nodes"), cols, "nodes")
    else:
        show(args, c.request("GET", f"/v1/nodes/{q(args.id)}"))


# ---- local cluster -------------------------------------------------------------------------------
def cluster_record() -> Path:
    return state_dir() / "cluster.json"


def cmd_up(args: argparse.Namespace, c: Client) -> None:
    from shoal.devenv.docker_engine import EngineError
    from shoal.devenv.engine_users import process_lease
    from shoal.devenv.redis_server import RedisStartError
    from shoal.devenv.runtime_image import ImageBuildError
    from shoal.devenv.stack import engine_with_image
    from shoal.localcluster import ClusterError, LocalCluster

    if cluster_record().exists():
        record = json.loads(cluster_record().read_text())
        if any(procs.alive(p) for p in recorded_processes(record)):
            raise CliError(f"a local cluster is already up (see {cluster_record()}); run `shoal down` first")
        stop_recorded(record)  # none of its processes runs any more (a crash, a reboot): clear what is left
    try:  # tokens from the environment protect the local cluster as they would a deployed one
        api_token, node_token = token_from_env("SHOAL_API_TOKEN"), token_from_env("SHOAL_NODE_TOKEN")
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    base = state_dir() / "cluster"
    try:
        engine = engine_with_image()
    except (EngineError, ImageBuildError) as exc:
        raise CliError(f"cannot start the Docker engine or its runtime image: {exc}") from None
    base.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(engine.url, agents=args.agents, policy=args.policy, port=args.port, name=args.name,
                           base=base, log_level="warning", detach=True, api_token=api_token,
                           node_token=node_token)
    try:
        cluster.start()
    except BaseException as exc:
        cluster.stop()
        engine.stop()
        if isinstance(exc, ClusterError | RedisStartError | OSError):
            raise CliError(f"the local cluster did not start: {exc} (logs in {base})") from None
        raise
    record = cluster.describe()
    if engine.lease is not None and engine.root is not None:
        # The private engine: held while the controller runs (released by `shoal down`, or with the controller).
        engine.keep(process_lease(int(record["controller"]["pid"])))
        record["engine_lease"], record["engine_root"] = engine.lease, str(engine.root)
    cluster_record().write_text(json.dumps(record))
    show(args, record)


def recorded_processes(record: dict[str, Any]) -> list[dict[str, int]]:
    return [*record["agents"].values(), record["controller"], *([record["dockerd"]] if "dockerd" in record else [])]


def stop_recorded(record: dict[str, Any]) -> None:
    """Stop what ``shoal up`` recorded, each process only if it is still the one started (pids are reused)."""
    from shoal.devenv.redis_server import RedisServer

    for process in [*record["agents"].values(), record["controller"]]:
        procs.stop(process)
    RedisServer(port=int(record["redis_port"]), directory=Path(record["redis_dir"])).stop(remove=True)
    if "engine_lease" in record:
        from shoal.devenv.docker_engine import release

        release(Path(record["engine_root"]), record["engine_lease"])  # stopped if nothing else uses it
    elif "dockerd" in record:  # a record written before leases
        procs.stop(record["dockerd"])
    cluster_record().unlink(missing_ok=True)


def cmd_down(args: argparse.Namespace, c: Client) -> None:
    path = cluster_record()
    if not path.exists():
        show(args, {"down": "nothing was up"})
        return
    record = json.loads(path.read_text())
    stop_recorded(record)
    show(args, {"down": record["url"]})


def cmd_status(args: argparse.Namespace, c: Client) -> None:
    if not cluster_record().exists():
        raise CliError("no local cluster is up (`shoal up` starts one)")
    record = json.loads(cluster_record().read_text())
    client = Client(record["url"])
    client.auth = c.auth  # the token the cluster was started with ($SHOAL_API_TOKEN), as every other command
    health = client.request("GET", "/v1/health")
    nodes = client.request("GET", "/v1/nodes")
    if args.json:
        show(args, {"cluster": record, "health": health, "nodes": nodes})
        return
    console.print(f"controller {record['url']}  queued {health['queued']}  active {health['active']}", markup=False)
    show(args, nodes, ["node_id", "state", "capacity", "inflight", "done", "functions_ready"], "nodes")


# ---- deployment ----------------------------------------------------------------------------------
PLAYBOOKS = {"site": "site.yml", "upgrade": "upgrade.yml", "teardown": "teardown.yml"}


def playbooks_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "playbooks"
    if not (here / "site.yml").is_file():
        raise CliError(f"no playbooks next to this installation ({here}); run from a Shoal checkout")
    return here


def cmd_deploy(args: argparse.Namespace, c: Client) -> None:
    """`ansible-playbook -i INVENTORY playbooks/<action>.yml`, with the project's ansible.cfg."""
    import shutil

    book = playbooks_dir()
    exe = shutil.which("ansible-playbook", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if exe is None:
        raise CliError("ansible-playbook is not installed: pip install ansible-core (or -e '.[deploy]')")
    if not Path(args.inventory).exists():
        raise CliError(f"no inventory at {args.inventory}")
    env = dict(os.environ, ANSIBLE_CONFIG=str(book / "ansible.cfg"))
    rest = list(args.rest)  # [ACTION] [-- ANSIBLE ARGS...]; argparse would take an option after -- for the action
    action = rest.pop(0) if rest[:1] and rest[0] in PLAYBOOKS else "site"
    if rest[:1] == ["--"]:
        rest.pop(0)
    elif rest:
        raise CliError(f"deploy: expected {' | '.join(sorted(PLAYBOOKS))}, then -- and ansible-playbook's "
                       f"arguments; got {rest[0]!r}")
    cmd = [exe, "-i", args.inventory, str(book / PLAYBOOKS[action]), *rest]
    sys.stdout.flush()
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise CliError(f"ansible-playbook exited with {code}")


# ---- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Shoal: functions as a service.")
    parser.add_argument("--url", default=os.environ.get("SHOAL_URL", "http://127.0.0.1:3000"))
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    rt = sub.add_parser("runtime", help="runtimes").add_subparsers(dest="action", required=True)
    create = rt.add_parser("create")
    create.add_argument("--image", required=True)
    create.add_argument("--name")
    create.add_argument("--path")
    create.add_argument("--dependencies")
    create.add_argument("--run")
    rt.add_parser("list")
    for action in ("get", "delete"):
        rt.add_parser(action).add_argument("name")

    fn = sub.add_parser("function", help="functions").add_subparsers(dest="action", required=True)
    upload = fn.add_parser("upload")
    upload.add_argument("name")
    upload.add_argument("path", help="a directory (packed as tar.gz) or a zip/tar.gz archive")
    upload.add_argument("--runtime", required=True)
    upload.add_argument("--entrypoint", help="module:function for handler style")
    upload.add_argument("--timeout", type=float)
    upload.add_argument("--preload", choices=["none", "runtime", "function"])
    upload.add_argument("--min-warm", dest="min_warm", type=int)
    upload.add_argument("--max-warm", dest="max_warm", type=int)
    upload.add_argument("--keepalive", type=float)
    fn.add_parser("list")
    for action in ("get", "delete"):
        fn.add_parser(action).add_argument("name")

    inv = sub.add_parser("invoke", help="invoke a function")
    inv.add_argument("name")
    inv.add_argument("--params", help="JSON")
    inv.add_argument("--timeout", type=float)
    inv.add_argument("--async", dest="async_", action="store_true")
    inv.add_argument("--batch", metavar="FILE",
                     help="many calls without waiting: one JSON params per line ('-': stdin)")

    calls = sub.add_parser("calls", help="calls").add_subparsers(dest="action", required=True)
    lst = calls.add_parser("list")
    lst.add_argument("--function")
    lst.add_argument("--status")
    lst.add_argument("--limit", type=int)
    for action in ("get", "cancel"):
        calls.add_parser(action).add_argument("id")
    wait = calls.add_parser("wait")
    wait.add_argument("id")
    wait.add_argument("--timeout", type=float, default=3600)

    nodes = sub.add_parser("nodes", help="nodes").add_subparsers(dest="action", required=True)
    nodes.add_parser("list")
    nodes.add_parser("get").add_argument("id")

    up = sub.add_parser("up", help="start a local cluster (Redis, Docker engine, controller, agents)")
    up.add_argument("--agents", type=int, default=2)
    up.add_argument("--port", type=int, default=3000)
    up.add_argument("--policy", choices=["none", "runtime", "function"], default="function")
    up.add_argument("--name", default="node", help="node ids are NAME-1..N (an agent removes its node's containers at "
                    "start: two clusters on one Docker engine need different names)")
    sub.add_parser("down", help="stop the local cluster")
    deploy = sub.add_parser("deploy", help="roll a cluster out with Ansible (wraps ansible-playbook)")
    deploy.add_argument("-i", "--inventory", required=True, help="an Ansible inventory (see inventory/)")
    deploy.add_argument("rest", nargs=argparse.REMAINDER, metavar="[ACTION] [-- ANSIBLE_ARGS]",
                        help="site (default: roll out, idempotent), upgrade (rolling, one node at a time) or "
                        "teardown; anything after -- goes to ansible-playbook")
    sub.add_parser("status", help="the local cluster's state")
    for leaf in _leaves(parser):  # `shoal nodes list --json` as well as `shoal --json nodes list`
        if leaf is not parser:
            leaf.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    return parser


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that end a command line (those with no subcommands of their own)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for a in subs for child in dict.fromkeys(a.choices.values()) for leaf in _leaves(child)]


COMMANDS = {"runtime": cmd_runtime, "function": cmd_function, "invoke": cmd_invoke, "calls": cmd_calls,
            "nodes": cmd_nodes, "up": cmd_up, "down": cmd_down, "status": cmd_status, "deploy": cmd_deploy}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            token = token_from_env("SHOAL_API_TOKEN")
        except ConfigError as exc:
            raise CliError(str(exc)) from None
        COMMANDS[args.command](args, Client(args.url, token))
    except CliError as exc:
        # One line, whatever the terminal's width, and the message as written (no rich markup in it).
        errors.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        errors.print("interrupted")  # a call being waited for goes on: `shoal calls wait ID` picks it up again
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
