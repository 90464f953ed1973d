"""Everything a local run needs, started once and stopped in reverse order."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import docker

from shoal.devenv.docker_engine import DockerEngine, ensure_engine
from shoal.devenv.redis_server import RedisServer, start_redis
from shoal.devenv.runtime_image import IMAGE, ensure_image


@dataclass
class Infra:
    engine: DockerEngine
    image: str
    redis: RedisServer | None = None
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    def client(self) -> docker.DockerClient:
        return self.engine.client()

    def close(self) -> None:
        self._stack.close()


def engine_with_image() -> DockerEngine:
    """A Docker engine (started if none answers) that holds the base runtime image."""
    engine = ensure_engine()
    client = engine.client()
    try:
        ensure_image(client, engine.url)
    except BaseException:
        engine.stop()
        raise
    finally:
        client.close()
    return engine


def start_infra(with_redis: bool = True) -> Infra:
    stack = ExitStack()
    try:
        engine = engine_with_image()
        stack.callback(engine.stop)
        redis = None
        if with_redis:
            redis = start_redis()
            stack.callback(redis.stop, remove=True)  # (its data directory too: it is this run's)
    except BaseException:
        stack.close()
        raise
    return Infra(engine=engine, image=IMAGE, redis=redis, _stack=stack)
