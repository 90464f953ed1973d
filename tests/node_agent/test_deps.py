from __future__ import annotations

from pathlib import Path

import pytest

from node_agent.deps import WheelhouseResolver, parse_requirements
from node_agent.errors import DependencyError


def test_plain_requirements_are_accepted() -> None:
    text = "# comment\ndice==4.0.0\nrequests[socks]>=2,<3 ; python_version >= '3.8'  # trailing\n\n"
    assert parse_requirements(text) == ["dice==4.0.0", "requests[socks]>=2,<3 ; python_version >= '3.8'"]


@pytest.mark.parametrize(
    "line",
    ["-e .", "--index-url http://evil.example/simple", "-r other.txt", "pkg @ https://evil.example/p.whl",
     "./local/path", "/abs/path.whl", "git+https://example.com/x.git"],
)
def test_options_urls_and_paths_are_refused(line: str) -> None:
    with pytest.raises(DependencyError, match="not a plain requirement"):
        parse_requirements(line)


def test_no_requirements_gives_an_empty_cached_wheelhouse(tmp_path: Path) -> None:
    resolver = WheelhouseResolver(tmp_path / "wheels")
    code = tmp_path / "code"
    code.mkdir()
    first = resolver.resolve(code)
    assert first == resolver.resolve(code)
    assert sorted(p.name for p in first.iterdir()) == [".complete"]


def test_a_requirement_naming_an_environment_variable_is_refused() -> None:
    """pip expands ${VAR} in a requirements file from its environment (the agent's): `six==${HOME}` put the host's
    value in the error message any API client could read."""
    for line in ("six==${HOME}", "six ; platform_release == '${PIP_INDEX_URL}'", "x$y"):
        with pytest.raises(DependencyError, match="environment variable"):
            parse_requirements(line)


def test_a_requirements_file_larger_than_the_bound_is_refused_unread(tmp_path: Path) -> None:
    """It was read whole and split: 50 MB of newlines took 466 MB of the agent's memory."""
    from node_agent.deps import REQUIREMENTS_MAX

    code = tmp_path / "code"
    code.mkdir()
    with open(code / "requirements.txt", "wb") as f:
        f.truncate(REQUIREMENTS_MAX + 1)  # (sparse: nothing is written)
    with pytest.raises(DependencyError, match=f"at most {REQUIREMENTS_MAX}"):
        WheelhouseResolver(tmp_path / "wheels").resolve(code)
