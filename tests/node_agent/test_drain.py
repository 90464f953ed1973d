"""The agent's loop takes turns between its sockets: one socket is drained for at most DRAIN_MESSAGES messages
or DRAIN_SECONDS, then the loop polls again and serves the others. An archive's chunks cost about a
millisecond each and arrive as fast as they are acknowledged; bounded by count alone, a 200 MB transfer held
the loop (and a warm call on the node) for its whole length. Chunks are also only kept when read, and written
and hashed between the sockets' turns: a call behind them on the link is handled at once."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from node_agent import agent as agent_module
from node_agent.agent import DRAIN_MESSAGES, DRAIN_SECONDS, Agent
from shoal import protocol
from shoal.protocol import ZMQ_EVENTS, ZMQ_POLLIN, Msg


class Queued:
    """A socket holding ``count`` messages (the two calls drain_socket makes of a ZMQ socket)."""

    def __init__(self, count: int) -> None:
        self.left = count

    def getsockopt(self, option: int) -> int:
        assert option == ZMQ_EVENTS
        return ZMQ_POLLIN if self.left else 0

    def recv_multipart(self, flags: int = 0, copy: bool = True) -> list[bytes]:
        assert self.left
        self.left -= 1
        return [b"frame"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(agent_module.time, "monotonic", clock.monotonic)
    return clock


def test_slow_messages_give_the_loop_back_after_the_time_bound(agent: Agent, clock: Clock) -> None:
    sock = Queued(200)  # an archive's chunks
    handled: list[Any] = []
    per_message = DRAIN_SECONDS / 4

    def handle(frames: list[Any]) -> None:
        handled.append(frames)
        clock.now += per_message

    agent.drain_socket(sock, handle)  # type: ignore[arg-type]
    assert len(handled) == 4 and sock.left == 196
    agent.drain_socket(sock, handle)  # type: ignore[arg-type]  # the next turn goes on where this one stopped
    assert len(handled) == 8 and sock.left == 192


def test_cheap_messages_are_handled_up_to_the_count_bound(agent: Agent, clock: Clock) -> None:
    sock = Queued(DRAIN_MESSAGES + 5)
    handled: list[Any] = []
    agent.drain_socket(sock, handled.append)  # type: ignore[arg-type]
    assert len(handled) == DRAIN_MESSAGES and sock.left == 5
    agent.drain_socket(sock, handled.append)  # type: ignore[arg-type]
    assert sock.left == 0


def test_an_empty_socket_is_left_at_once(agent: Agent, clock: Clock) -> None:
    handled: list[Any] = []
    agent.drain_socket(Queued(0), handled.append)  # type: ignore[arg-type]
    assert handled == []


def test_a_call_behind_archive_chunks_on_the_link_does_not_wait_for_them(agent: Agent,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks are handed to the fetcher's disk thread (here held back: a disk that blocks); the call behind them
    is answered at once, and the chunks are acknowledged only once written."""
    sent: list[tuple[bytes, dict[str, Any]]] = []
    monkeypatch.setattr(agent.link, "send", lambda mtype, header, *payload: sent.append((mtype, header)))
    monkeypatch.setattr(agent.fetcher, "send", agent.link.send)
    jobs: list[tuple[Any, Any]] = []

    class HeldDisk:
        def submit(self, job: Any, done: Any) -> None:
            jobs.append((job, done))

        def close(self) -> None:
            pass

    agent.fetcher.disk.close()
    agent.fetcher.disk = HeldDisk()
    data = b"x" * (3 << 20)
    sha = hashlib.sha256(data).hexdigest()
    agent.fetcher.want(sha, len(data))
    job, done = jobs.pop()
    done(job(), None)  # the partial file opened: the transfer asks for the archive
    assert [(m, h["offset"]) for m, h in sent] == [(Msg.FETCH, 0)]
    sent.clear()
    for n in range(3):
        agent.on_controller_frames(protocol.encode(Msg.CHUNK, {"sha256": sha, "offset": n << 20, "last": n == 2},
                                                   data[n << 20:(n + 1) << 20]))
    agent.on_controller_frames(protocol.encode(Msg.CALL, {"call_id": "c1", "function": "nowhere", "params": 1}))
    assert [(m, h["call_id"], h["status"]) for m, h in sent] == [(Msg.RESULT, "c1", "FAILED")]
    assert len(jobs) == 3  # the chunks wait for the disk
    for job, done in jobs:
        done(job(), None)
    assert [(m, h["offset"]) for m, h in sent[1:]] == [(Msg.FETCH, 1 << 20), (Msg.FETCH, 2 << 20)]
    assert agent.cache.has_blob(sha)
