"""Miniworker handles (the broker's view of each miniworker) and the spawner that starts them."""

from __future__ import annotations

import enum
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import miniworker
import shoal
from miniworker.spec import LoadSpec, MiniworkerSpec
from node_agent.cache import NodeCache
from node_agent.config import AgentConfig
from node_agent.tickets import Ticket
from shoal.models import Runtime


class MwState(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"
    FAILED = "failed"


LIVE = frozenset({MwState.STARTING, MwState.IDLE, MwState.BUSY})
ONESHOT = "oneshot"


def generic_key(runtime: str) -> str:
    return f"rt:{runtime}"


@dataclass
class MwHandle:
    mw_id: str
    mode: str  # bound | runtime | oneshot
    runtime: str | None
    function: str | None  # the function key it serves, once loaded (bound at start for `bound`)
    proc: subprocess.Popen[bytes]
    state: MwState = MwState.STARTING
    spawned: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    idle_since: float = field(default_factory=time.monotonic)
    container_id: str = ""
    calls_served: int = 0
    ticket: Ticket | None = None
    ahead: Ticket | None = None  # a call it holds to run next (pipelined; not started)
    loading: bool = False  # the current call also starts a container or loads the function
    reason: str = ""
    stopped_at: float = 0.0  # when it was asked to stop, or taken for lost (monotonic)
    killed: bool = False  # SIGKILL sent to its process
    overdue: bool = False  # killed for not exiting in time after its stop: its container is removed by label
    cleanup_asked: bool = False  # its container and directory are (being) removed by the agent (on_lost)
    outdated: bool = False  # its runtime was redefined since it started: it takes no new call, and stops once idle

    @property
    def pool_key(self) -> str:
        if self.function is not None:
            return self.function
        if self.mode == "runtime" and self.runtime is not None:
            return generic_key(self.runtime)
        return ONESHOT


class Spawner:
    """Starts miniworker processes (``python -m miniworker SPEC``)."""

    def __init__(self, config: AgentConfig, cache: NodeCache) -> None:
        self.config = config
        self.cache = cache
        self.src_dirs = {
            "shoal": str(Path(shoal.__file__).resolve().parent),
            "miniworker": str(Path(miniworker.__file__).resolve().parent),
        }

    def spawn(self, mode: str, runtime: Runtime | None, load: LoadSpec | None) -> MwHandle:
        mw_id = f"mw-{secrets.token_hex(4)}"
        cfg = self.config
        spec = MiniworkerSpec(
            mw_id=mw_id, node_id=cfg.node_id, broker_url=cfg.broker_url, docker_url=cfg.docker_url,
            docker_api_version=cfg.docker_api_version, mode=mode,
            image=runtime.image if runtime else "", runtime_path=runtime.path if runtime else "/ws",
            workdir=str(self.cache.mw_dir(mw_id)), src_dirs=self.src_dirs, load=load, limits=cfg.limits,
            heartbeat=cfg.heartbeat, liveness=cfg.liveness, start_timeout=cfg.start_timeout,
            log_level=cfg.log_level,
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "miniworker", spec.to_json()], stdin=subprocess.DEVNULL, close_fds=True,
            # Its own session: a signal to the agent's process group (a terminal's Ctrl-C, a supervisor
            # stopping the group) must not kill miniworkers mid-call; the agent stops them (MW_STOP), and
            # if the agent dies they notice the broker's silence.
            start_new_session=True,
        )
        function = load.key if (load is not None and mode == "bound") else None
        return MwHandle(mw_id=mw_id, mode=mode, runtime=runtime.name if runtime else None,
                        function=function, proc=proc)
