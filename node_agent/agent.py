"""The node agent: one event loop over the controller link, the broker socket and a wake-up pipe.

Everything stateful (registry, broker, pool, fetches) is touched only by this loop, so nothing needs a
lock. Slow work runs elsewhere and comes back as a callable through the wake-up pipe: extracting archives
and resolving dependencies in a thread pool, containers in the miniworker processes, HTTP status in its own
thread (which asks the loop for snapshots).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import docker
import psutil
import requests
import zmq
from docker.errors import DockerException, NotFound

from miniworker.container import LABEL_MW, LABEL_NODE
from miniworker.spec import LoadSpec
from node_agent.broker import Broker
from node_agent.cache import NodeCache, remove_path
from node_agent.config import AgentConfig
from node_agent.deps import REQUIREMENTS, WheelhouseResolver
from node_agent.errors import AgentError, AgentStopping, ControllerUnreachable
from node_agent.fetcher import ArchiveFetcher, ThreadDisk
from node_agent.functions import FnState, NodeFunction, Registry
from node_agent.link import ControllerLink
from node_agent.metrics import AgentMetrics
from node_agent.miniworkers import LIVE, MwHandle, MwState, Spawner
from node_agent.pool import PoolManager
from node_agent.status import StatusServer
from node_agent.tickets import Ticket
from shoal import __version__, httpclient, protocol
from shoal.auth import bearer, registration_credential
from shoal.errors import ConfigError, ShoalError, ValidationError
from shoal.fstree import TreeError, remove_tree
from shoal.logs import configure, get_logger
from shoal.models import REJECTED, FunctionSpec, Runtime
from shoal.protocol import Message, Msg, ProtocolError, zmq_readable

TICK = 0.05
DRAIN_MESSAGES = 1000  # handled from one socket before the loop looks at the others again
DRAIN_SECONDS = 0.002  # ... or once this long has passed
#: A function version whose preparation failed in a way that may pass (its archive's transfer, the package
#: index, the disk) is prepared again after this many seconds, doubling up to PREPARE_RETRY_MAX, at most
#: PREPARE_RETRIES times; a hostile or corrupt archive is not tried again.
PREPARE_RETRY_FIRST = 15.0
PREPARE_RETRY_MAX = 600.0
PREPARE_RETRIES = 8
#: Seconds after the first WELCOME before the cache is collected once (see Agent.collect_after).
STARTUP_COLLECT_DELAY = 60.0
ENGINE_ERRORS = (DockerException, requests.RequestException)


RETIRE_CHECK_EVERY = 30.0  # seconds between looks for superseded function versions to drop (see retire_unused)
REREGISTER_AFTER = 60.0  # seconds unwelcomed before an agent started with an http:// controller registers again
ENGINE_CHECK_EVERY = 5.0  # seconds between pings of the Docker engine
ENGINE_PING_LATE = 10.0  # a ping unanswered this long: the engine counts as unreachable (/readyz 503)


class Agent:
    def __init__(self, config: AgentConfig, register_url: str = "") -> None:
        self.config = config
        self.log = get_logger("agent", node_id=config.node_id)
        self.register_url = register_url  # the http:// controller registered with, if any (see check_registration)
        self.reregistering = False
        self.registered_at = time.monotonic()
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.cache = NodeCache(config.node_dir)
        self.registry = Registry(config.policy, runtimes=self.cache.load_runtimes())
        self.metrics = AgentMetrics()
        self.docker = docker.DockerClient(base_url=config.docker_url, version=config.docker_api_version,
                                          timeout=60)
        self.link = ControllerLink(config, self.ctx, self.hello)
        self.broker = Broker(config, self.registry, self.metrics, self.ctx, self.on_outcome,
                             self.load_for, self.on_lost, self.on_dispatch)
        self.broker.on_load_failures = self.on_load_failures
        self.broker.on_start_failures = self.on_start_failures
        self.spawner = Spawner(config, self.cache)
        self.pool = PoolManager(config, self.registry, self.broker, self.spawner, self.load_for)
        self.fetcher = ArchiveFetcher(self.cache, self.link.send, self.on_archive, ThreadDisk(self.post))
        self.resolver = WheelhouseResolver(self.cache.root / "wheels")
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="agent-work")
        # Removing what a lost miniworker left: its slot is held until it is done, so it does not queue behind the
        # preparations (pip, extraction) that can hold every thread of the other pool for minutes.
        self.cleanups = ThreadPoolExecutor(max_workers=2, thread_name_prefix="agent-cleanup")
        self.inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.status = StatusServer(config.status_host, config.status_port, self.ask)
        self.engine_ok = True
        self.ping_started = 0.0  # when the engine ping in flight was sent (0: none)
        self.draining = False
        self.last_seq: int | None = None  # the sequence number in the last controller message (see send_status)
        self.collect_due = False  # a function was forgotten: the cache has files to collect
        # Once, a while after the first WELCOME (the controller has sent every function by then): what the cache
        # kept of functions deleted while this agent was not running (no FGONE names them) is collected.
        self.collect_after: float | None = None
        self.gone_waiting = False  # deleted functions wait to be forgotten (calls of them are still here)
        self.preparing = 0  # preparations (extraction, dependencies) running in the pool
        self.drain_deadline = 0.0
        self.stopping = False
        self.asks: dict[Future[Any], str] = {}  # status requests not answered yet (see ask)
        self.asks_lock = threading.Lock()
        self.process = psutil.Process()
        self.started = time.time()

    # ---- cross-thread plumbing -----------------------------------------------------------------
    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the agent's loop (callable from any thread)."""
        self.inbox.put(fn)
        try:
            os.write(self.wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the loop will drain the inbox

    def run_in_pool(self, work: Callable[[], Any], done: Callable[[Any, BaseException | None], None],
                    executor: ThreadPoolExecutor | None = None) -> None:
        def finished(fut: Future[Any]) -> None:
            exc = fut.exception()
            self.post(lambda: done(None if exc else fut.result(), exc))

        (executor or self.executor).submit(work).add_done_callback(finished)

    def ask(self, what: str) -> Future[Any]:
        """A snapshot from the loop, for the status server's thread. Once the loop has ended, asks are answered
        here (or by shutdown, for those it left in the inbox): not ready, stopping."""
        fut: Future[Any] = Future()
        with self.asks_lock:
            self.asks[fut] = what  # before reading `stopping`: shutdown answers it if this thread does not

        def answer() -> None:
            with self.asks_lock:
                if self.asks.pop(fut, None) is None or not fut.set_running_or_notify_cancel():
                    return  # answered as stopping, or the asker gave up (setting it would raise, on the loop)
            try:
                fut.set_result(self.snapshot(what))
            except Exception as exc:  # noqa: BLE001 - handed to the status server, which logs it and answers 503
                fut.set_exception(exc)

        if self.stopping:
            self.answer_stopped(fut)
        else:
            self.post(answer)
        return fut

    def stop_answering(self) -> None:
        """The loop has ended (also by an exception): asks left in its inbox, and those to come, are answered
        as stopping, not left to time out."""
        self.stopping = True
        for fut in list(self.asks):
            self.answer_stopped(fut)

    def answer_stopped(self, fut: Future[Any]) -> None:
        with self.asks_lock:
            what = self.asks.pop(fut, None)
            if what is None or not fut.set_running_or_notify_cancel():
                return  # answered already, or the asker gave up
        if what == "ready":
            fut.set_result({"ready": False, "controller": False, "draining": self.draining, "docker": self.engine_ok,
                            "stopping": True})
        else:
            fut.set_exception(AgentStopping(f"node {self.config.node_id} is stopping"))

    # ---- lifecycle -----------------------------------------------------------------------------
    def remove_orphans(self) -> int:
        """Remove containers a previous run of this node left behind."""
        try:
            removed = self.remove_containers(LABEL_NODE, self.config.node_id)
        except ENGINE_ERRORS as exc:
            self.log.error("orphan_cleanup_failed", error=str(exc))
            removed = 0
        try:
            self.cache.clear_mw_dirs()
        except TreeError as exc:  # (a function made it so; the agent runs on, and its miniworkers get new ids)
            self.log.error("miniworker_dirs_not_cleared", error=str(exc))
        return removed

    def remove_containers(self, label: str, value: str) -> int:
        """Force-remove the containers labelled ``label=value``; one listing call (the SDK's ``containers.list``
        inspects each one, and fails if one is removed meanwhile), and one already gone is not an error."""
        removed = 0
        for c in self.docker.api.containers(all=True, filters={"label": f"{label}={value}"}):
            try:
                self.docker.api.remove_container(c["Id"], force=True)
                removed += 1
            except NotFound:
                continue  # its miniworker removed it meanwhile
        return removed

    def sweep_orphans(self) -> None:
        """Remove this node's containers that no live miniworker owns: one whose miniworker could not remove
        it (the engine refused, or the process was killed) and whose later cleanup failed too. The listing
        runs in the pool; the owners are checked on the loop afterwards, where a miniworker's handle lives
        from its spawn (before its container exists) until its process has exited."""
        node_id = self.config.node_id

        def listing() -> list[tuple[str, str]]:
            found = self.docker.api.containers(all=True, filters={"label": f"{LABEL_NODE}={node_id}"})
            return [(c["Id"], (c.get("Labels") or {}).get(LABEL_MW, "")) for c in found]

        def listed(found: Any, exc: BaseException | None) -> None:
            if exc is not None:
                self.log.warning("orphan_sweep_failed", error=str(exc))
                return
            orphans = [(cid, mw_id) for cid, mw_id in found if mw_id not in self.broker.mws]
            if orphans:
                self.run_in_pool(lambda: self.remove_orphan_containers(orphans), swept)

        def swept(removed: Any, exc: BaseException | None) -> None:
            if exc is not None:
                self.log.warning("orphan_sweep_failed", error=str(exc))
            elif removed:
                self.log.warning("orphan_containers_removed", count=removed)
                self.metrics.orphans_removed.inc(float(removed))

        self.run_in_pool(listing, listed)

    def remove_orphan_containers(self, orphans: list[tuple[str, str]]) -> int:
        removed = 0
        for cid, mw_id in orphans:
            try:
                self.docker.api.remove_container(cid, force=True)
                removed += 1
            except NotFound:
                pass  # its miniworker or a lost miniworker's cleanup removed it meanwhile
            if mw_id:
                remove_tree(self.cache.mw_dir(mw_id))
        return removed

    def run(self) -> int:
        orphans = self.remove_orphans()
        swept = self.cache.sweep()
        port = self.status.start()
        self.log.info("agent_started", controller=self.config.controller, policy=self.config.policy.value,
                      status=f"http://{self.config.status_host}:{port}", orphans_removed=orphans,
                      leftovers_removed=swept)
        self.link.say_hello()
        poller = zmq.Poller()
        poller.register(self.link.sock, zmq.POLLIN)
        poller.register(self.broker.sock, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        next_tick = 0.0
        next_engine_check = 0.0
        next_status = 0.0
        next_orphan_sweep = time.monotonic() + self.config.orphan_sweep
        next_retire = 0.0
        try:
            while not self.stopping:
                wait = int(max(0.0, next_tick - time.monotonic()) * 1000) + 1
                events = dict(poller.poll(wait))
                if self.broker.sock in events:
                    self.drain_socket(self.broker.sock, self.broker.on_frames)
                if self.link.sock in events:
                    # Zero-copy frames: archive chunks go from ZMQ's buffer to the file and the hash.
                    self.drain_socket(self.link.sock, self.on_controller_frames, copy=False)
                if self.wake_r in events:
                    self.drain_inbox()
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK
                    self.broker.tick(now)
                    self.fetcher.tick(now, self.link.welcomed)
                    self.retry_failed(now)
                    self.forget_gone()
                    self.collect_if_due(now)
                    self.link.tick(now)
                    self.check_registration(now)
                    self.pool.reconcile()
                    self.update_gauges()
                    if self.draining:
                        self.check_drained(now)
                    if now >= next_status and self.link.welcomed:
                        next_status = now + self.config.heartbeat
                        self.send_status()
                    if now >= next_orphan_sweep:
                        next_orphan_sweep = now + self.config.orphan_sweep
                        self.sweep_orphans()
                    if now >= next_retire:
                        next_retire = now + min(RETIRE_CHECK_EVERY, self.config.retire_after)
                        self.retire_unused(now)
                    if now >= next_engine_check:
                        next_engine_check = now + ENGINE_CHECK_EVERY
                        self.check_engine(now)
        finally:
            self.shutdown()
        return 0

    def drain_socket(self, sock: zmq.Socket[Any], handle: Callable[[list[Any]], None], copy: bool = True) -> None:
        """Handle what ``sock`` holds, within bounds (``DRAIN_MESSAGES``, ``DRAIN_SECONDS``), so that one busy
        socket cannot starve the other: an archive's chunks come in as fast as they are acknowledged, and bounded
        by count alone a whole transfer ran before the broker's next message (a warm call on the node waited
        240 ms behind a 200 MB fetch, when chunks were written and hashed here; the fetcher's disk thread does
        that now)."""
        deadline = time.monotonic() + DRAIN_SECONDS
        for _ in range(DRAIN_MESSAGES):
            if not zmq_readable(sock):
                return
            handle(sock.recv_multipart(zmq.NOBLOCK, copy=copy))
            if time.monotonic() >= deadline:
                return

    def drain_inbox(self) -> None:
        """Run the callables other threads posted. One that raises is logged with its traceback and the next
        runs: a bug in one completion (a pool job's, a status ask's) must not end the agent and its calls."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass  # pipe emptied
        while True:
            try:
                fn = self.inbox.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except Exception as exc:
                self.log.error("inbox_callback_failed", callback=getattr(fn, "__qualname__", repr(fn)),
                               error=repr(exc), exc_info=True)

    def request_stop(self, *_: Any) -> None:
        """SIGTERM / SIGINT: stop taking work, finish what is here (with a deadline), then exit."""
        self.post(self.start_drain)

    def start_drain(self) -> None:
        if self.draining:
            return
        self.log.info("draining", running=len(self.broker.running),
                      queued=sum(len(q) for q in self.broker.queues.values()))
        self.draining = True
        self.pool.draining = True
        self.broker.draining = True
        # Calls not started here yet go back to the controller, which places them on other nodes now.
        for key in list(self.broker.queues):
            self.broker.fail_queued(key, {"type": "Draining", "message": f"node {self.config.node_id} is draining"},
                                    status=REJECTED)
        self.drain_deadline = time.monotonic() + self.config.drain_timeout
        self.send_status()

    def check_registration(self, now: float) -> None:
        """An agent started with an http:// controller that has not been welcomed for ``REREGISTER_AFTER``
        seconds registers again: the controller may have come back on another ZMQ address (a new advertised
        address, port or host), which the agent would otherwise try for ever. Off the loop (an HTTP request)."""
        if not self.register_url or self.link.welcomed or self.reregistering \
                or now - max(self.link.silent_since, self.registered_at) < REREGISTER_AFTER:
            return
        self.reregistering = True
        config = self.config.with_(controller=self.register_url)

        def registered(answer: AgentConfig | None, error: BaseException | None) -> None:
            self.reregistering = False
            self.registered_at = time.monotonic()
            if error is not None:
                self.log.warning("registration_failed", url=self.register_url, error=str(error))
            elif answer is not None and answer.controller != self.link.url and not self.link.welcomed:
                self.link.reconnect(answer.controller)
                self.link.say_hello()

        self.run_in_pool(lambda: register_over_http(config, attempts=1), registered)

    def check_drained(self, now: float) -> None:
        busy = self.broker.running or any(self.broker.queues.values())
        if busy and now < self.drain_deadline:
            return
        if self.broker.running:
            given = self.broker.give_back_running(
                f"node {self.config.node_id} stopped at its drain timeout ({self.config.drain_timeout:g} s) while "
                "the call ran; it is placed again")
            self.log.warning("drain_timed_out", calls_given_back=given)
        for h in list(self.broker.mws.values()):
            self.broker.stop(h, give_back=True)
        self.stopping = True

    def shutdown(self) -> None:
        self.stop_answering()
        deadline = time.monotonic() + 15
        for h in list(self.broker.mws.values()):
            self.broker.stop(h)
        for h in list(self.broker.mws.values()):
            try:
                h.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                h.proc.kill()
        self.remove_orphans()
        self.status.stop()
        self.broker.close()
        self.link.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.cleanups.shutdown(wait=False, cancel_futures=True)
        self.fetcher.close()
        self.ctx.term()
        self.log.info("agent_stopped")

    # ---- controller messages -------------------------------------------------------------------
    def on_controller_frames(self, frames: list[Any]) -> None:
        try:
            msg = protocol.decode(frames)
            handler = self._handlers.get(msg.type)
            if handler is None:
                raise ProtocolError(f"{msg.name} is not a controller-to-node message")
            self.link.on_message(msg)
            seq = msg.header.get("seq")
            if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
                self.check_sequence(msg.type, seq)
                self.last_seq = seq  # see send_status (a WELCOME's handler sends one)
            handler(self, msg)
        except (ProtocolError, ValidationError) as exc:
            self.log.error("protocol_error", source="controller", error=str(exc))
            self.metrics.protocol_errors.inc(socket="controller")

    def check_sequence(self, mtype: bytes, seq: int) -> None:
        """Say HELLO again if a numbered message from the controller (a call, a runtime, a function) never came:
        one carries the number after the last one received, a heartbeat the last one sent. A reset connection
        loses what was on its way, and ZMQ reconnects underneath without a word; the HELLO makes the controller
        send every runtime and function again and place again the calls this node does not hold."""
        if self.last_seq is None or mtype == Msg.WELCOME or seq <= self.last_seq:
            return  # (a lower number: a restarted controller, which asks for a HELLO itself)
        expected = self.last_seq if mtype == Msg.HEARTBEAT else self.last_seq + 1
        if seq > expected:
            self.log.warning("controller_messages_lost", last=self.last_seq, got=seq, message=mtype.decode())
            self.metrics.messages_lost.inc()
            self.link.say_hello()

    def on_welcome(self, msg: Message) -> None:
        if msg.header.get("hello"):  # a restarted controller does not know us yet
            self.link.say_hello()
            return
        if self.collect_after is None:
            self.collect_after = time.monotonic() + STARTUP_COLLECT_DELAY
        limit = msg.header.get("max_archive_bytes")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            # The controller's bound on uploads: an archive it took must not be refused here (a node left at the
            # default refused every archive between that and a raised controller limit).
            self.cache.limits = dataclasses.replace(self.cache.limits, max_archive_bytes=limit)
        self.fetcher.resume_all()
        self.send_status()

    def send_status(self) -> None:
        """Warm pools and load, for the controller's placement (sent every heartbeat), and the calls held here
        with the sequence number of the controller's last message: the controller places again a call it sent
        before that number that this node neither holds nor answered (dropped on the way, or its result was)."""
        warm: dict[str, int] = {}
        for h in self.broker.mws.values():
            # Started and loaded only: one still starting is a cold start (warm-first placement counts these).
            if h.function is not None and h.state in (MwState.IDLE, MwState.BUSY):
                warm[h.function] = warm.get(h.function, 0) + 1
        status: dict[str, Any] = {"node_id": self.config.node_id, "draining": self.draining, "warm": warm,
                                  "running": len(self.broker.running),
                                  "queued": sum(len(q) for q in self.broker.queues.values())}
        if self.last_seq is not None:
            status.update(seq=self.last_seq, calls=list(self.broker.held()))
        self.link.send(Msg.STATUS, status)

    def on_runtime(self, msg: Message) -> None:
        runtime = Runtime.from_dict(msg.header)
        previous = self.registry.runtimes.get(runtime.name)
        self.registry.runtimes[runtime.name] = runtime
        try:
            self.cache.save_runtime(runtime)
        except OSError as exc:  # kept in memory all the same: only a restart before the controller re-sends it
            self.log.error("runtime_not_cached", runtime=runtime.name, error=str(exc))
        if previous is not None and previous != runtime:  # (sent again unchanged at every HELLO: nothing to do)
            self.broker.runtime_changed(runtime.name)
            self.pool.reconcile()

    def on_function(self, msg: Message) -> None:
        spec = FunctionSpec.from_dict(msg.header)
        fn = self.registry.add_function(spec)
        if fn.state == FnState.READY:
            self.report_function(fn)
        elif fn.state == FnState.FETCHING:
            self.fetcher.want(spec.sha256, spec.size)

    def on_archive(self, sha: str, error: str | None) -> None:
        for fn in self.registry.by_sha(sha):
            if fn.state != FnState.FETCHING:
                continue
            if error is not None:
                self.function_failed(fn, error, transient=True)
            else:
                fn.state = FnState.PREPARING
                self.preparing += 1
                self.run_in_pool(partial(self.prepare, fn), partial(self.prepared, fn))

    def prepare(self, fn: NodeFunction) -> tuple[Any, Any]:
        code = self.cache.code_dir(fn.spec.sha256)
        return code, self.resolver.resolve(code)

    def prepared(self, fn: NodeFunction, result: Any, exc: BaseException | None) -> None:
        self.preparing -= 1
        if self.registry.functions.get(fn.key) is not fn:
            self.collect_due = True  # forgotten meanwhile (deleted): what was made for it is collected
            return
        if exc is not None:
            if not isinstance(exc, ShoalError | OSError):
                # Unexpected (a defect here or in a library on a strange archive): the function fails with it,
                # the agent and its other functions go on.
                self.log.error("function_prepare_crashed", function=fn.key, error=repr(exc),
                               exc_info=(type(exc), exc, exc.__traceback__))
                self.function_failed(fn, f"{type(exc).__name__}: {exc}")
                return
            self.function_failed(fn, str(exc), transient=not isinstance(exc, ValidationError))
            return
        fn.code_dir, fn.wheels_dir = result
        fn.state = FnState.READY
        fn.retries = 0  # its passing failures start counting anew (they used to add up over the node's life)
        self.log.info("function_ready", function=fn.key)
        self.report_function(fn)
        self.broker.pump()
        self.pool.reconcile()

    def function_failed(self, fn: NodeFunction, error: str, transient: bool = False) -> None:
        fn.state, fn.error = FnState.FAILED, error
        if transient and fn.retries < PREPARE_RETRIES:
            delay = min(PREPARE_RETRY_FIRST * 2 ** fn.retries, PREPARE_RETRY_MAX)
            fn.retries += 1
            fn.retry_at = time.monotonic() + delay
            fn.error = f"{error} (preparing it again in {delay:g} s)"
        self.log.warning("function_failed", function=fn.key, error=fn.error)
        self.report_function(fn)  # (before the calls: the controller places them knowing this node failed it)
        # Calls waiting here: a failure that may pass gives them back (another node may run them; the controller
        # fails them if none can); one that will not fails them.
        self.broker.fail_queued(fn.key, {"type": "FunctionUnavailable", "message": error},
                                status=REJECTED if transient else "FAILED")

    def retry_failed(self, now: float) -> None:
        """Prepare again the function versions whose failure may have passed (see PREPARE_RETRY_FIRST)."""
        for fn in list(self.registry.functions.values()):
            if fn.state == FnState.FAILED and fn.retry_at and now >= fn.retry_at:
                fn.retry_at = 0.0
                fn.state, fn.error = FnState.FETCHING, ""
                self.log.info("function_prepare_retry", function=fn.key, attempt=fn.retries)
                self.fetcher.want(fn.spec.sha256, fn.spec.size)

    def report_function(self, fn: NodeFunction) -> None:
        self.link.send(Msg.FUNCTION_STATE, {"name": fn.spec.name, "version": fn.spec.version,
                                            "state": fn.state.value, "error": fn.error})

    def on_call(self, msg: Message) -> None:
        h = msg.header
        call_id = h["call_id"]
        version = h.get("version")
        ticket = Ticket(call_id=call_id, key="", params=h["params"], timeout=0.0)
        if call_id in self.broker.running or any(t.call_id == call_id for t in self.broker.queues.get(
                f"{h['function']}@{version or self.registry.latest.get(h['function'], 0)}", ())):
            return  # a duplicate delivery: the call is already here (answering it REJECTED would run it twice)
        if self.draining:
            self.reply(ticket, REJECTED, {"type": "Draining", "message": "node is draining"})
            return
        fn = self.registry.resolve(h["function"], version if isinstance(version, int) else None)
        if fn is None:
            if isinstance(version, int) and version < self.registry.latest.get(h["function"], 0):
                # An older version dropped here (see retire_unused), on its way as the controller heard: it
                # places the call again, and sends the version back to a node if none has it.
                self.reply(ticket, REJECTED, {"type": "VersionRetired",
                                              "message": f"{h['function']}@{version} is no longer on this node"})
                return
            self.reply(ticket, "FAILED", {"type": "UnknownFunction",
                                          "message": f"function {h['function']!r} is not on this node"})
            return
        fn.last_used = ticket.received
        if fn.state == FnState.FAILED:
            # A failure that may pass (prepared again later): given back, as the calls waiting here were when it
            # failed; this CALL crossed that report, and the controller, which knows by now, places it on a node that
            # can run it (or fails it if none can). One that will not pass fails it.
            self.reply(ticket, REJECTED if fn.retry_at else "FAILED",
                       {"type": "FunctionUnavailable", "message": fn.error})
            return
        if fn.spec.runtime not in self.registry.runtimes:
            self.reply(ticket, "FAILED", {"type": "UnknownRuntime",
                                          "message": f"runtime {fn.spec.runtime!r} is not on this node"})
            return
        timeout = h.get("timeout")
        ticket.key = fn.key
        if isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 < timeout <= 86400:
            ticket.timeout = float(timeout)
        else:
            ticket.timeout = fn.spec.timeout
        self.broker.submit(ticket)

    def on_cancel(self, msg: Message) -> None:
        self.broker.cancel(msg.header["call_id"])

    def on_chunk(self, msg: Message) -> None:
        self.fetcher.receive(msg.header, msg.payload)

    def on_fetch_error(self, msg: Message) -> None:
        self.fetcher.on_error(msg.header)

    def on_function_gone(self, msg: Message) -> None:
        """The function was deleted on the controller (which has no call of it left): forget its versions up to
        ``up_to`` (a later upload of the name has a higher version), each once no call of it is here."""
        name, up_to = msg.header["name"], msg.header["up_to"]
        for fn in [f for f in self.registry.functions.values() if f.spec.name == name and f.spec.version <= up_to]:
            fn.gone = True
            self.gone_waiting = True
        self.forget_gone()

    def forget_gone(self) -> None:
        """Forget the deleted function versions no call here needs any more: their miniworkers are stopped, and
        their archive, code and dependencies collected."""
        if not self.gone_waiting:
            return
        busy = self.keys_in_use(miniworkers=False)
        gone = [f for f in self.registry.functions.values() if f.gone]
        self.gone_waiting = any(f.key in busy for f in gone)
        for fn in [f for f in gone if f.key not in busy]:
            self.forget(fn)
            self.log.info("function_forgotten", function=fn.key)
        if self.collect_due:
            self.pool.reconcile()  # stops the idle miniworkers of what is no longer known

    def keys_in_use(self, miniworkers: bool) -> set[str]:
        """The function versions with calls here (running, held or queued), and, with ``miniworkers``, those a
        live miniworker serves."""
        keys = {t.key for t in self.broker.running.values()} | {k for k, q in self.broker.queues.items() if q}
        if miniworkers:
            keys |= {h.function for h in self.broker.mws.values() if h.function is not None}
        return keys

    def forget(self, fn: NodeFunction) -> None:
        """Drop a function version here; its files are collected once nothing refers to them."""
        self.registry.forget(fn)
        self.broker.forget(fn.key)
        self.metrics.registry.drop("function", fn.key)  # its series (about 20 per version) grew without end
        if not self.registry.by_sha(fn.spec.sha256):
            self.fetcher.cancel(fn.spec.sha256)
        self.collect_due = True

    def on_load_failures(self, key: str, reason: str) -> None:
        """A function that would not load in several miniworkers in a row: failed here (reported, no container
        started for it again) until the controller sends it anew (at a HELLO, or a new version)."""
        fn = self.registry.functions.get(key)
        if fn is not None and fn.state == FnState.READY:
            self.function_failed(fn, f"it does not load: {reason}")

    def on_start_failures(self, key: str, reason: str) -> None:
        """Its miniworkers fail to start here (see Broker.start_failed): failed for a while, its calls given back."""
        fn = self.registry.functions.get(key)
        if fn is not None and fn.state == FnState.READY:
            self.function_failed(fn, reason, transient=True)

    def retire_unused(self, now: float) -> None:
        """Drop the superseded function versions unused for ``retire_after`` (no call of them here, no
        miniworker): their archive, code and dependencies are collected, and the controller is told (FSTATE
        ``retired``); it sends a version back if a call of it is to run here again. Without it a node kept
        every version ever deployed."""
        busy = self.keys_in_use(miniworkers=True)
        latest = self.registry.latest
        for fn in list(self.registry.functions.values()):
            unused = now - fn.last_used >= self.config.retire_after
            if (fn.gone or latest.get(fn.spec.name) == fn.spec.version or fn.key in busy or not unused
                    or fn.state not in (FnState.READY, FnState.FAILED)):
                continue
            self.forget(fn)
            self.link.send(Msg.FUNCTION_STATE, {"name": fn.spec.name, "version": fn.spec.version, "state": "retired",
                                                "error": ""})
            self.log.info("function_retired", function=fn.key, unused_s=round(now - fn.last_used))

    def on_runtime_gone(self, msg: Message) -> None:
        name = msg.header["name"]
        if self.registry.runtimes.pop(name, None) is None:
            return
        try:
            self.cache.forget_runtime(name)
        except OSError as exc:
            self.log.error("runtime_not_uncached", runtime=name, error=str(exc))
        self.log.info("runtime_forgotten", runtime=name)
        for key in list(self.broker.queues):  # (calls of a deleted function using it may still wait here)
            fn = self.registry.functions.get(key)
            if fn is not None and fn.spec.runtime == name:
                self.broker.fail_queued(key, {"type": "UnknownRuntime", "message": f"runtime {name!r} was deleted"})
        self.pool.reconcile()

    def collect_if_due(self, now: float) -> None:
        if self.collect_after and now >= self.collect_after:
            self.collect_after = 0.0
            self.collect_due = True
        if self.collect_due:
            self.collect()

    def collect(self) -> None:
        """Move aside the archives, code and wheelhouses nothing refers to any more (then remove them in the
        pool). Not while a function is being prepared (what it makes is not referred to until it is ready), nor
        while a miniworker still runs a forgotten function's code."""
        functions = self.registry.functions.values()
        if self.preparing:
            return  # what a preparation makes is referred to only once it is done
        if any(h.function is not None and h.function not in self.registry.functions for h in self.broker.mws.values()):
            return
        self.collect_due = False
        shas = {fn.spec.sha256 for fn in functions} | set(self.fetcher.transfers)
        wheels = {fn.wheels_dir.name for fn in functions if fn.wheels_dir is not None}
        try:
            moved = self.cache.collect(shas, wheels)
        except OSError as exc:
            self.log.error("cache_collect_failed", error=str(exc))
            return
        if moved:
            self.log.info("cache_collected", entries=len(moved))

            def remove() -> None:
                for path in moved:
                    remove_path(path)

            def removed(_: Any, exc: BaseException | None) -> None:
                if exc is not None:
                    self.log.error("cache_remove_failed", error=str(exc))

            self.run_in_pool(remove, removed)

    def on_drain(self, msg: Message) -> None:
        self.start_drain()

    def on_heartbeat(self, msg: Message) -> None:
        pass  # the link noted that the controller is alive

    _handlers: dict[bytes, Callable[[Agent, Message], None]] = {
        Msg.WELCOME: on_welcome,
        Msg.HEARTBEAT: on_heartbeat,
        Msg.RUNTIME: on_runtime,
        Msg.FUNCTION: on_function,
        Msg.CALL: on_call,
        Msg.CANCEL: on_cancel,
        Msg.CHUNK: on_chunk,
        Msg.FETCH_ERROR: on_fetch_error,
        Msg.DRAIN: on_drain,
        Msg.FUNCTION_GONE: on_function_gone,
        Msg.RUNTIME_GONE: on_runtime_gone,
    }

    # ---- broker callbacks ----------------------------------------------------------------------
    def load_for(self, key: str) -> LoadSpec:
        fn = self.registry.functions[key]
        runtime = self.registry.runtimes[fn.spec.runtime]
        if fn.code_dir is None or fn.wheels_dir is None:
            raise AgentError(f"function {key} is not prepared")
        # The runtime's dependency command runs only for functions that ship requirements.
        has_requirements = (fn.code_dir / REQUIREMENTS).is_file()
        return LoadSpec(key=key, image=runtime.image, path=runtime.path, code_dir=str(fn.code_dir),
                        wheels_dir=str(fn.wheels_dir), style=fn.spec.style, entrypoint=fn.spec.entrypoint,
                        dependencies=runtime.dependencies if has_requirements else "", run=runtime.run)

    def on_dispatch(self, ticket: Ticket) -> None:
        ticket.state_sent = True
        self.link.send(Msg.CALL_STATE, {"call_id": ticket.call_id, "state": "RUNNING",
                                        "node_id": self.config.node_id, "at": ticket.started_at})

    def reply(self, ticket: Ticket, status: str, error: dict[str, Any]) -> None:
        self.on_outcome(ticket, {"status": status, "error": error})

    def on_outcome(self, ticket: Ticket, header: dict[str, Any]) -> None:
        status = header["status"]
        now = time.monotonic()
        out: dict[str, Any] = {
            "call_id": ticket.call_id, "status": status, "node_id": self.config.node_id,
            "function": ticket.key, "attempts": ticket.attempts + 1,
            "cold": bool(header.get("cold")) or ticket.cold_wait,
            "mw_id": ticket.mw_id,
            "container_id": header.get("container_id", ""),
            "started_at": ticket.started_at or None,
            "timings": dict(header.get("timings") or {}, node_s=now - ticket.received,
                            queued_s=(ticket.dispatched or now) - ticket.received,
                            broker_rtt_s=now - ticket.dispatched if ticket.dispatched else None),
        }
        for name in ("result", "error", "logs", "ran"):
            if name in header:
                out[name] = header[name]
        self.link.send(Msg.RESULT, out)
        if status != REJECTED and ticket.key:
            fn_name = ticket.key
            self.metrics.calls.inc(function=fn_name, outcome=status)
            self.metrics.duration.observe(now - ticket.received, function=fn_name)
            if out["cold"]:
                self.metrics.cold_starts.inc(function=fn_name)
            fn = self.registry.functions.get(ticket.key)
            if fn is not None:
                fn.calls_served += 1

    def on_lost(self, h: MwHandle) -> None:
        """A miniworker went away without cleaning up: remove its container and directory."""
        mw_id = h.mw_id

        def cleanup() -> int:
            removed = self.remove_containers(LABEL_MW, mw_id)
            remove_tree(self.cache.mw_dir(mw_id))
            return removed

        def done(removed: Any, exc: BaseException | None) -> None:
            if exc is not None:
                self.log.error("container_cleanup_failed", mw_id=mw_id, error=str(exc))
            self.broker.cleaned(mw_id)  # (failed: the orphan sweep removes it later; its slot is not held for ever)
            self.pool.reconcile()

        self.run_in_pool(cleanup, done, self.cleanups)

    def check_engine(self, now: float) -> None:
        """Ping the Docker engine, one ping at a time: an engine that stops answering is not ready once a ping
        is overdue (ENGINE_PING_LATE), not when the client's 60 s timeout ends it, and pings do not pile up in
        the pool the archive, dependency and cleanup work share."""
        if self.ping_started:
            if now - self.ping_started > ENGINE_PING_LATE and self.engine_ok:
                self.log.warning("docker_engine_unreachable", error=f"no answer to a ping in {ENGINE_PING_LATE:g} s")
                self.engine_ok = False
            return
        self.ping_started = now
        self.run_in_pool(self.docker.ping, self.on_engine_check)

    def on_engine_check(self, result: Any, exc: BaseException | None) -> None:
        self.ping_started = 0.0
        ok = exc is None and bool(result)
        if ok != self.engine_ok:
            self.log.warning("docker_engine_" + ("back" if ok else "unreachable"), error=str(exc or ""))
        self.engine_ok = ok

    # ---- status ----------------------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        return {
            "v": protocol.PROTOCOL_VERSION, "node_id": self.config.node_id, "capacity": self.config.capacity,
            "queue_limit": self.config.queue_limit, "policy": self.config.policy.value, "version": __version__,
            "heartbeat": self.config.heartbeat, "liveness": self.config.liveness,  # (how long we may be silent)
            "status_url": f"http://{self.config.status_host}:{self.status.port}",
            "runtimes": sorted(self.registry.runtimes),
            "functions": [fn.key for fn in self.registry.functions.values() if fn.state == FnState.READY],
            # Every call this node holds, running or waiting in its queues: the controller keeps them here and
            # places again only what is missing (a call left out would run a second time elsewhere).
            "running": sorted(self.broker.held()),
        }

    def update_gauges(self) -> None:
        pool: dict[tuple[tuple[str, str], ...], float] = {}
        for h in self.broker.mws.values():
            key = (("pool", h.pool_key), ("state", h.state.value))
            pool[key] = pool.get(key, 0) + 1
        self.metrics.pool.replace(pool)
        self.metrics.queue.replace({(("function", k),): float(len(q)) for k, q in self.broker.queues.items()})

    def snapshot(self, what: str) -> Any:
        if what == "metrics":
            self.update_gauges()
            return self.metrics.render()
        ready = self.link.welcomed and not self.draining and self.engine_ok
        if what == "ready":
            return {"ready": ready, "controller": self.link.welcomed, "draining": self.draining,
                    "docker": self.engine_ok}
        now = time.monotonic()
        disk = psutil.disk_usage(str(self.cache.root))
        mem = psutil.virtual_memory()
        return {
            "node_id": self.config.node_id, "version": __version__, "policy": self.config.policy.value,
            "ready": ready, "controller": {"url": self.config.controller, "connected": self.link.welcomed},
            "draining": self.draining, "docker": self.engine_ok, "uptime_s": time.time() - self.started,
            "capacity": self.config.capacity,
            "runtimes": {name: rt.to_dict() for name, rt in sorted(self.registry.runtimes.items())},
            "functions": [
                {"key": fn.key, "name": fn.spec.name, "version": fn.spec.version, "runtime": fn.spec.runtime,
                 "sha256": fn.spec.sha256, "state": fn.state.value, "error": fn.error,
                 "policy": self.registry.policy_of(fn).value, "style": fn.spec.style,
                 "calls_served": fn.calls_served, "queued": len(self.broker.queues.get(fn.key, ()))}
                for fn in self.registry.functions.values()
            ],
            "miniworkers": [
                {"id": h.mw_id, "state": h.state.value, "mode": h.mode, "pool": h.pool_key,
                 "function": h.function, "runtime": h.runtime, "container_id": h.container_id,
                 "calls_served": h.calls_served, "pid": h.proc.pid,
                 "call_id": h.ticket.call_id if h.ticket else None,
                 "next_call_id": h.ahead.call_id if h.ahead else None,
                 "idle_s": round(now - h.idle_since, 3) if h.state.value == "idle" else None,
                 "reason": h.reason or None}
                for h in self.broker.mws.values()
            ],
            "live_miniworkers": sum(1 for h in self.broker.mws.values() if h.state in LIVE),
            "queues": {k: len(q) for k, q in self.broker.queues.items() if q},
            "running": len(self.broker.running),
            "archives_fetching": len(self.fetcher.transfers),
            "archive_transfers": list(self.fetcher.completed),
            "system": {
                "cpu_percent": psutil.cpu_percent(interval=None), "cpus": psutil.cpu_count(),
                "load": list(os.getloadavg()),
                "memory": {"total": mem.total, "available": mem.available, "percent": mem.percent},
                "disk": {"path": str(self.cache.root), "total": disk.total, "free": disk.free,
                         "percent": disk.percent},
                "agent_rss": self.process.memory_info().rss,
            },
        }


def register_over_http(config: AgentConfig, attempts: int = 60) -> AgentConfig:
    """``--controller http://...``: POST /register (the forwarder seed's route) for the ZMQ URL to use.

    A controller that is not up yet is asked again (backoff); one that refuses the node token, or whose link
    security differs from ours (a CURVE handshake between them would fail in silence), is an error at once."""
    url = config.controller.rstrip("/") + "/register"
    body = json.dumps({"endpoint_id": config.node_id}).encode()
    log = get_logger("agent", node_id=config.node_id)
    # Not the token itself: a credential derived from it (plain HTTP must not carry the link's secret).
    credential = registration_credential(config.node_token) if config.node_token else ""
    headers = {"Content-Type": "application/json", **bearer(credential)}
    for attempt in range(attempts):
        request = urllib.request.Request(url, data=body, headers=headers)
        try:
            with httpclient.urlopen(request, timeout=10) as resp:  # (a redirect would carry the credential)
                answer = json.loads(resp.read())
            task_url = answer["task_url"]
            if not isinstance(task_url, str) or not task_url.startswith("tcp://"):
                raise ValueError(f"the controller answered a task_url that is not tcp://...: {task_url!r:.80}")
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                raise AgentError(f"{url} redirects to {exc.headers.get('Location')!r} ({exc.code}); give the "
                                 "controller's own address (--controller): redirects are not followed") from None
            if exc.code in (401, 403):
                raise AgentError(f"{url} refused this node ({exc.code}): "
                                 + ("the node token (SHOAL_NODE_TOKEN) is not the controller's" if config.node_token
                                    else "the controller wants a node token (SHOAL_NODE_TOKEN)")) from None
            log.warning("registration_failed", url=url, attempt=attempt + 1, error=str(exc))
        except (OSError, ValueError, KeyError, TypeError) as exc:  # (TypeError: an answer that is not an object)
            log.warning("registration_failed", url=url, attempt=attempt + 1, error=str(exc))
        else:
            if bool(answer.get("curve")) != bool(config.node_token):
                raise AgentError(f"{url}: the controller {'has' if answer.get('curve') else 'has no'} node token "
                                 f"and this node {'has' if config.node_token else 'has no'} SHOAL_NODE_TOKEN; "
                                 f"both or neither")
            log.info("registered_over_http", controller=config.controller, task_url=task_url,
                     curve=bool(config.node_token))
            return config.with_(controller=task_url)
        time.sleep(min(5.0, 0.25 * 2**attempt))
    raise ControllerUnreachable(f"could not register with {url} after {attempts} attempts")


def main(argv: list[str] | None = None) -> int:
    try:
        config = AgentConfig.from_args(argv)
    except ConfigError as exc:
        print(f"shoal-agent: {exc}", file=sys.stderr)
        return 2
    for name in ("SHOAL_NODE_TOKEN", "SHOAL_NODE_TOKEN_FILE"):  # read: miniworkers need not inherit it
        os.environ.pop(name, None)
    configure(config.log_level)
    register_url = ""
    if config.controller.startswith(("http://", "https://")):
        register_url = config.controller
        try:
            config = register_over_http(config)
        except AgentError as exc:
            get_logger("agent", node_id=config.node_id).error("not_registered", error=str(exc))
            # 2: refused, or misconfigured (a service manager does not restart it); 1: the controller never answered
            return 1 if isinstance(exc, ControllerUnreachable) else 2
    agent = Agent(config, register_url)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    return agent.run()
