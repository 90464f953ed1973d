"""The controller's settings: bad values fail loudly; the Redis URL is logged without its password."""

from __future__ import annotations

from pathlib import Path

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


def test_tokens_come_from_env_or_files_and_never_show(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHOAL_API_TOKEN", "api-token-0123456789")
    (tmp_path / "node").write_text("node-token-0123456789\n")
    config = ControllerConfig.from_args(["--node-token-file", str(tmp_path / "node")])
    assert (config.api_token, config.node_token) == ("api-token-0123456789", "node-token-0123456789")
    assert "0123456789" not in repr(config)
    monkeypatch.setenv("SHOAL_API_TOKEN", "short")
    with pytest.raises(ConfigError, match="SHOAL_API_TOKEN must be at least 16"):
        ControllerConfig.from_env()
    with pytest.raises(ConfigError, match="node_token"):
        ControllerConfig(node_token="with spaces in the token")
    with pytest.raises(ConfigError, match="cannot read"):
        ControllerConfig.from_args(["--api-token-file", str(tmp_path / "missing")])
