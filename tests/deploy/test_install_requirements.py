"""The deployment installs what the package needs: the rollout's pinned list (scripts/deploy-lock) covers
pyproject's dependencies, and each pin satisfies pyproject's range."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "playbooks/roles/shoal_install/files/requirements.lock"


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line!r} is not pinned"
            out[canonicalize_name(req.name)] = spec.version
    return out


def test_the_pinned_list_covers_and_satisfies_every_runtime_dependency_of_the_package() -> None:
    pinned = pins()
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{LOCK.name} lacks {name}: run scripts/deploy-lock"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} is not {req}"
    assert "supervisor" in pinned  # the service manager where systemd is not PID 1
