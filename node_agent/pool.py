"""The pool manager: applies the preload policy by starting and stopping miniworkers.

Run after every event and on a timer, it compares what is live with what is wanted:

1. demand first: a function with waiting calls gets miniworkers started (bound to it under ``function``,
   started-ahead runtime containers under ``runtime``, oneshot processes under ``none``), up to its
   ``max_warm`` and the node's capacity; when the node is full, the least recently used idle miniworker
   of another pool makes room (for a function that has miniworkers already, only one idle for
   ``ROOM_IDLE_S``: two functions sharing a full node under load do not take each other's containers between
   calls), and a function that has none while every slot is busy gets the next slot that frees in the
   largest other pool (its first miniworker whose call ends is stopped: ``Broker.yield_from``). Not while the
   function's pool is backing off failed starts (a container stopped for it would only start again). Not when
   the queue will be gone before a new container could help: a short function's queue (see the broker's
   pipelining) that its running miniworkers drain within ``SCALE_UP_AFTER_S`` starts none (a container takes longer
   than that to start, and extra processes on a busy host only take CPU from the ones serving);
2. then the baseline: ``min_warm`` per ready function (``function``), ``runtime_warm`` per runtime
   (``runtime``), ``oneshot_spares`` (``none``);
3. then keep-alive: idle miniworkers above the baseline for longer than their keep-alive are stopped, as
   are idle ones of superseded function versions, and of functions and runtimes no longer known (deleted).

A pool whose miniworkers fail to start is retried with exponential backoff (see the broker).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable

from miniworker.spec import LoadSpec
from node_agent.broker import Broker
from node_agent.config import AgentConfig
from node_agent.functions import FnState, NodeFunction, Registry
from node_agent.miniworkers import LIVE, ONESHOT, MwHandle, MwState, Spawner, generic_key
from shoal.logs import get_logger
from shoal.models import Policy

#: A queue that the running miniworkers would drain sooner than this starts no new miniworker (see above).
SCALE_UP_AFTER_S = 0.1
#: What a call costs a miniworker at least, beyond its run: the broker's round trip.
CALL_OVERHEAD_S = 0.0005
#: An idle miniworker of another pool is stopped for a function that has miniworkers but a backlog only once
#: it has been idle this long (for a function that has none: at once).
ROOM_IDLE_S = 1.0


class PoolManager:
    def __init__(self, config: AgentConfig, registry: Registry, broker: Broker, spawner: Spawner,
                 load_for: Callable[[str], LoadSpec]) -> None:
        self.config = config
        self.registry = registry
        self.broker = broker
        self.spawner = spawner
        self.load_for = load_for
        self.log = get_logger("pool", node_id=config.node_id)
        self.draining = False

    def live(self) -> list[MwHandle]:
        return [h for h in self.broker.mws.values() if h.state in LIVE]

    def _spawn(self, pool_key: str, fn: NodeFunction | None, runtime_name: str | None) -> bool:
        if time.monotonic() < self.broker.spawn_blocked_until.get(pool_key, 0.0):
            return False
        try:
            if pool_key == ONESHOT:
                h = self.spawner.spawn("oneshot", None, None)
            elif fn is not None:
                runtime = self.registry.runtimes[fn.spec.runtime]
                h = self.spawner.spawn("bound", runtime, self.load_for(fn.key))
            else:
                assert runtime_name is not None
                h = self.spawner.spawn("runtime", self.registry.runtimes[runtime_name], None)
        except OSError as exc:  # the process could not be started (resources, an argument the kernel refuses)
            self.log.error("miniworker_spawn_failed", pool=pool_key, error=str(exc))
            self.broker.metrics.mw_lost.inc(reason="spawn_failed")
            self.broker.back_off(pool_key)
            return False
        self.broker.add(h)
        self.log.debug("miniworker_spawned", mw_id=h.mw_id, pool=pool_key, mode=h.mode)
        return True

    def _make_room(self, wanted: str, idle_for: float, now: float) -> bool:
        """Stop the least recently used miniworker of another pool idle for ``idle_for`` at least; True if one
        was stopped."""
        idle = [h for h in self.live()
                if h.state == MwState.IDLE and h.pool_key != wanted and now - h.idle_since >= idle_for]
        if not idle:
            return False
        victim = min(idle, key=lambda h: h.idle_since)
        self.broker.stop(victim)
        return True

    def _claim_next_slot(self, wanted: str, live: list[MwHandle]) -> None:
        """Every slot busy and ``wanted`` has no miniworker: the largest other pool gives up its next slot that
        frees (one claim at a time). Without it, a function with a backlog took each freed miniworker's next
        call and the other function waited as long as that backlog lasted."""
        if self.broker.yield_from:
            return
        sizes = Tally(h.pool_key for h in live if h.state == MwState.BUSY and h.pool_key != wanted)
        if sizes:
            victim = max(sizes, key=lambda pool: sizes[pool])
            self.broker.yield_from[victim] = wanted
            self.log.info("slot_claimed", pool=victim, for_pool=wanted)

    def _drop_stale_claims(self, by_pool: Tally[str]) -> None:
        """A claim whose function has a miniworker now, or no call waiting (cancelled, given back), is dropped:
        a warm container would be stopped for nobody."""
        for victim, wanted in list(self.broker.yield_from.items()):
            if by_pool[wanted] > 0 or not any(self.broker.queues.get(key) for key in self.registry.functions
                                              if wanted in self.broker.candidates(key)):
                del self.broker.yield_from[victim]

    def _drains_soon(self, key: str, pool: str, queued: int, serving: int) -> bool:
        """Whether ``serving`` miniworkers of a short function drain ``queued`` calls before a new one could help:
        within SCALE_UP_AFTER_S, or the time its miniworkers take to start, as measured (a burst of a 3 ms
        function started containers that were ready after it was over, and then held their slots)."""
        run = self.broker.run_s.get(key)
        if run is None or run >= self.config.pipeline_max_run or serving <= 0:
            return False
        starts_in = max(SCALE_UP_AFTER_S, self.broker.start_s.get(pool, 0.0))
        return queued * max(run, CALL_OVERHEAD_S) / serving < starts_in

    def reconcile(self) -> None:
        if self.draining:
            return
        cfg = self.config
        live = self.live()
        by_pool = Tally(h.pool_key for h in live)
        starting = Tally(h.pool_key for h in live if h.state == MwState.STARTING)
        now = time.monotonic()
        # Miniworkers being stopped (or lost) whose process has not exited hold their slots: their containers may
        # still be there (an engine slow to remove them), and a node runs at most ``capacity`` containers. They
        # were not counted: each stop made room for another start, and a slow engine let a node run several
        # times its capacity.
        # So do those gone whose container the agent is still removing (a miniworker killed leaves its container).
        leaving = len(self.broker.mws) - len(live) + len(self.broker.removing - self.broker.mws.keys())
        free = cfg.capacity - len(live) - leaving

        # 1. demand
        oneshot_demand = 0
        self._drop_stale_claims(by_pool)
        # Functions with no miniworker first (a slot freed for one must not go to a busier one), then the one
        # whose oldest call has waited longest.
        waiting = sorted(((key, queue) for key, queue in self.broker.queues.items() if queue),
                         key=lambda item: (by_pool[item[0]] > 0, item[1][0].received))
        for key, queue in waiting:
            fn = self.registry.functions.get(key)
            if fn is None or fn.state != FnState.READY or fn.spec.runtime not in self.registry.runtimes:
                continue
            policy = self.registry.policy_of(fn)
            if policy == Policy.NONE:
                oneshot_demand += len(queue)
                continue
            pool = key if policy == Policy.FUNCTION else generic_key(fn.spec.runtime)
            if now < self.broker.spawn_blocked_until.get(pool, 0.0):
                continue  # backing off failed starts: a container stopped for it now would only start again
            if self._drains_soon(key, pool, len(queue), self.broker.serving(key, now)):
                continue
            need = min(len(queue) - starting[pool], fn.spec.max_warm - by_pool[key])
            for _ in range(max(0, need)):
                if free <= 0:
                    # A full node: an idle miniworker of another pool is stopped, and this one starts once it has
                    # gone (at a later round). While any stop is on its way, no other is made: it frees a slot.
                    none_yet = by_pool[key] == 0
                    if leaving == 0:
                        if self._make_room(pool, 0.0 if none_yet else ROOM_IDLE_S, now):
                            leaving += 1
                        elif none_yet:
                            self._claim_next_slot(pool, live)
                    break
                if not self._spawn(pool, fn if policy == Policy.FUNCTION else None, fn.spec.runtime):
                    break
                free -= 1
                by_pool[pool] += 1
                starting[pool] += 1
        for _ in range(max(0, oneshot_demand - starting[ONESHOT])):
            if free <= 0 or not self._spawn(ONESHOT, None, None):
                break
            free -= 1
            by_pool[ONESHOT] += 1

        # 2. baseline
        latest = self.registry.latest
        for fn in self.registry.functions.values():
            if fn.state != FnState.READY or latest.get(fn.spec.name) != fn.spec.version:
                continue
            if self.registry.policy_of(fn) != Policy.FUNCTION or fn.spec.runtime not in self.registry.runtimes:
                continue
            want = min(fn.spec.max_warm, max(fn.spec.min_warm, cfg.min_warm))
            while by_pool[fn.key] < want and free > 0 and self._spawn(fn.key, fn, fn.spec.runtime):
                by_pool[fn.key] += 1
                free -= 1
        if self.registry.node_policy == Policy.RUNTIME:
            for name in self.registry.runtimes:
                pool = generic_key(name)
                while by_pool[pool] < cfg.runtime_warm and free > 0 and self._spawn(pool, None, name):
                    by_pool[pool] += 1
                    free -= 1
        uses_oneshot = self.registry.node_policy == Policy.NONE or any(
            self.registry.policy_of(fn) == Policy.NONE for fn in self.registry.functions.values())
        if uses_oneshot:
            while by_pool[ONESHOT] < cfg.oneshot_spares and free > 0 and self._spawn(ONESHOT, None, None):
                by_pool[ONESHOT] += 1
                free -= 1

        # 3. keep-alive and superseded versions
        now = time.monotonic()
        for h in live:
            if h.state != MwState.IDLE:
                continue
            if h.function is None:  # a runtime's container started ahead, or a oneshot spare
                if h.mode == "runtime" and h.runtime not in self.registry.runtimes:
                    self.broker.stop(h)  # its runtime was deleted
                    continue
                floor = (cfg.runtime_warm if self.registry.node_policy == Policy.RUNTIME else 0) \
                    if h.mode == "runtime" else (cfg.oneshot_spares if uses_oneshot else 0)
                if by_pool[h.pool_key] > floor and now - h.idle_since > cfg.keepalive:
                    self.broker.stop(h)  # started for a burst, unused since: it would hold a slot for ever
                    by_pool[h.pool_key] -= 1
                continue
            fn = self.registry.functions.get(h.function)
            if fn is None:
                self.broker.stop(h)
                continue
            superseded = latest.get(fn.spec.name, fn.spec.version) != fn.spec.version
            floor = 0 if superseded else max(fn.spec.min_warm, cfg.min_warm if
                                              self.registry.policy_of(fn) == Policy.FUNCTION else 0)
            idle_for = now - h.idle_since
            if (superseded and not self.broker.queues.get(h.function)) or (
                by_pool[h.function] > floor
                and idle_for > (fn.spec.keepalive if fn.spec.keepalive is not None else cfg.keepalive)
            ):
                self.broker.stop(h)
                by_pool[h.function] -= 1
