from __future__ import annotations

import sys

import uvloop

from controller.app import create_app
from controller.config import ControllerConfig
from shoal import httpserver
from shoal.errors import ConfigError
from shoal.logs import configure


def main(argv: list[str] | None = None) -> int:
    try:
        config = ControllerConfig.from_args(argv)
    except ConfigError as exc:
        print(f"shoal-controller: {exc}", file=sys.stderr)
        return 2
    configure(config.log_level)
    httpserver.run(create_app(config), config.host, config.port, loop=uvloop.new_event_loop(), shutdown_timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
