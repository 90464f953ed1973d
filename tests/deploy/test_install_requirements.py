"""The deployment installs what the package needs: the role's wheelhouse list covers pyproject's dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_install_role_lists_every_runtime_dependency_of_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    role = yaml.safe_load((ROOT / "playbooks/roles/shoal_install/defaults/main.yml").read_text())
    missing = names(project["dependencies"]) - names(role["shoal_install_requirements"])
    assert not missing, f"playbooks/roles/shoal_install/defaults/main.yml lacks {sorted(missing)}"
