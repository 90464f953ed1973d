"""The controller's settings: bad values fail loudly; the Redis URL is logged without its password."""

from __future__ import annotations

import pytest

from controller.config import ControllerConfig
from shoal.errors import ConfigError


def test_the_redis_url_is_logged_without_its_password() -> None:
    assert ControllerConfig(redis_url="redis://:p%40ss@10.0.0.5:6390/0").redis_url_redacted == \
        "redis://:***@10.0.0.5:6390/0"
    assert ControllerConfig(redis_url="redis://user:secret@db/2").redis_url_redacted == "redis://user:***@db/2"
    assert ControllerConfig(redis_url="redis://127.0.0.1:6379/0").redis_url_redacted == "redis://127.0.0.1:6379/0"


def test_bad_values_fail_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="placement"):
        ControllerConfig(placement="random")
    with pytest.raises(ConfigError, match="redis_url"):
        ControllerConfig(redis_url="http://127.0.0.1:6379")
    monkeypatch.setenv("SHOAL_PORT", "seventy")
    with pytest.raises(ConfigError):
        ControllerConfig.from_env()
