"""Where local infrastructure keeps its state (outside the repo, so fresh clones reuse the caches)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    path = Path(os.environ.get("SHOAL_STATE_DIR", "/var/tmp/shoal"))
    path.mkdir(parents=True, exist_ok=True)
    return path
