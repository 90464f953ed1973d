from __future__ import annotations

import sys

import uvloop
from aiohttp import web

from controller.app import create_app
from controller.config import ControllerConfig
from shoal.logs import configure


def main(argv: list[str] | None = None) -> int:
    config = ControllerConfig.from_args(argv)
    configure(config.log_level)
    web.run_app(create_app(config), host=config.host, port=config.port, print=None,
                access_log=None, shutdown_timeout=5, loop=uvloop.new_event_loop())
    return 0


if __name__ == "__main__":
    sys.exit(main())
