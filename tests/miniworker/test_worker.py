"""The miniworker's exit code tells its agent whether its container may be left behind (the agent then removes
it by label). The engine's refusal is stood in for: a real engine cannot be made to refuse on cue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import zmq

from miniworker.errors import ContainerError
from miniworker.spec import MiniworkerSpec
from miniworker.worker import EXIT_CONTAINER_LEFT, Miniworker
from shoal import protocol
from shoal.protocol import Msg


def broker_and_spec(tmp_path: Path, mw_id: str, **fields: Any) -> tuple[zmq.Context[Any], zmq.Socket[Any],
                                                                          MiniworkerSpec]:
    """A broker's ROUTER on ipc, and a oneshot miniworker's spec pointing at it (its engine is nowhere)."""
    ctx: zmq.Context[Any] = zmq.Context()
    broker = ctx.socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    url = f"ipc://{tmp_path}/broker.ipc"
    broker.bind(url)
    spec = MiniworkerSpec(mw_id=mw_id, node_id="n", broker_url=url, docker_url=f"unix://{tmp_path}/none.sock",
                          docker_api_version="1.41", mode="oneshot", image="x", runtime_path="/ws",
                          workdir=str(tmp_path / "mw"), src_dirs={}, **fields)
    return ctx, broker, spec


def refuse() -> None:
    raise ContainerError("cannot remove container 0123456789ab: engine refused")


@pytest.mark.parametrize(("remove", "code"), [(lambda: None, 0), (refuse, EXIT_CONTAINER_LEFT)])
def test_a_container_the_miniworker_could_not_remove_is_its_exit_code(tmp_path: Path, remove: Any, code: int) -> None:
    ctx, broker, spec = broker_and_spec(tmp_path, "mw-t")
    mw = Miniworker(spec)
    try:
        mw.container.remove = remove  # type: ignore[method-assign]
        mw.stopping = True  # told to stop as soon as it is ready
        assert mw.run() == code
        assert broker.poll(5000)
        _, *frames = broker.recv_multipart()
        assert protocol.decode(frames).type == Msg.MW_READY
    finally:
        mw.container.close()
        broker.close()
        ctx.term()


@pytest.mark.parametrize("engine", ["restarting", "container gone"])
def test_the_wait_for_a_gone_runners_container_neither_hammers_the_engine_nor_goes_silent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    """The engine refusing at once used to be asked again at once, for 10 s; the wait says MW_HEARTBEAT every
    heartbeat, so the broker does not take the miniworker for lost (and run its call again)."""
    import requests
    from docker.errors import NotFound

    from miniworker import worker as worker_module

    monkeypatch.setattr(worker_module, "RUNNER_EXIT_WAIT", 0.5)
    ctx, broker, spec = broker_and_spec(tmp_path, "mw-w", heartbeat=0.1)
    mw = Miniworker(spec)
    asked: list[float] = []

    def wait(container_id: str, timeout: float) -> None:
        asked.append(timeout)
        if engine == "container gone":
            raise NotFound("no such container")
        raise requests.ConnectionError("connection refused")

    try:
        mw.container.id = "c" * 64
        mw.container.api.wait = wait
        mw._wait_for_exit()
        if engine == "container gone":
            assert len(asked) == 1
        else:
            # At most one ask per heartbeat over the 0.5 s (it was as often as the engine answered), a heartbeat
            # between each two.
            assert 2 <= len(asked) <= 6
            heartbeats = 0
            while broker.poll(1000):
                _, *frames = broker.recv_multipart()
                heartbeats += protocol.decode(frames).type == Msg.MW_HEARTBEAT
                if heartbeats == len(asked) - 1:
                    break
            assert heartbeats == len(asked) - 1
    finally:
        mw.container.id = None
        mw.container.close()
        broker.close()
        ctx.term()
