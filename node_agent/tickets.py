"""A call while it is on this node."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Ticket:
    call_id: str
    key: str  # function name@version
    params: Any
    timeout: float
    received: float = field(default_factory=time.monotonic)
    attempts: int = 0
    mw_id: str | None = None
    dispatched: float = 0.0
    started_at: float = 0.0  # wall clock, when a miniworker took it
    state_sent: bool = False  # RUNNING was reported to the controller
    queued: bool = False  # waited in the node's queue for a miniworker
    cold_wait: bool = False  # waited for a miniworker to start
    ahead: bool = False  # held by a busy miniworker to run next (pipelined), not started yet
    cancelling: bool = False  # cancelled while held: the miniworker is asked to drop it, not answered yet
