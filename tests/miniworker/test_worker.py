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


def refuse() -> None:
    raise ContainerError("cannot remove container 0123456789ab: engine refused")


@pytest.mark.parametrize(("remove", "code"), [(lambda: None, 0), (refuse, EXIT_CONTAINER_LEFT)])
def test_a_container_the_miniworker_could_not_remove_is_its_exit_code(tmp_path: Path, remove: Any, code: int) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    broker = ctx.socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    url = f"ipc://{tmp_path}/broker.ipc"
    broker.bind(url)
    spec = MiniworkerSpec(mw_id="mw-t", node_id="n", broker_url=url, docker_url=f"unix://{tmp_path}/none.sock",
                          docker_api_version="1.41", mode="oneshot", image="x", runtime_path="/ws",
                          workdir=str(tmp_path / "mw"), src_dirs={})
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
