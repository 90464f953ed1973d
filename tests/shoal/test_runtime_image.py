"""The runtime image's offline build and its cache, with stand-ins for mmdebstrap, the docker CLI and the engine
(the real build runs in every session's infrastructure: tests/conftest.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from docker.errors import ImageNotFound

from shoal.devenv import runtime_image
from shoal.devenv.runtime_image import LABEL, SEED_ALIAS, ImageBuildError, ensure_image, recipe_hash


class StandInImage:
    def __init__(self, tags: list[str]) -> None:
        self.labels = {LABEL: recipe_hash()}
        self.tags = tags

    def tag(self, name: str) -> None:
        self.tags.append(f"{name}:latest")


class StandInEngine:
    """An engine whose image exists once the stand-in `docker import` has run (it touches ``imported``)."""

    def __init__(self, imported: Path) -> None:
        self.imported = imported
        self.tags: list[str] = []
        self.images = self

    def get(self, name: str) -> StandInImage:
        if not self.imported.exists():
            raise ImageNotFound(name)
        return StandInImage(self.tags)


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bin directory first on PATH, a state directory of this test's own; returns the bin directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SHOAL_STATE_DIR", str(tmp_path / "state"))
    return bin_dir


def script(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def docker_cli(bin_dir: Path, imported: Path, code: int = 0) -> None:
    script(bin_dir / "docker", f'echo "$@" >> {bin_dir}/docker.calls\n'
                               + (f"touch {imported}\n" if code == 0 else "echo refused >&2\n") + f"exit {code}\n")


def test_runs_at_once_build_and_import_the_image_once(tools: Path, tmp_path: Path) -> None:
    """`make demo` and `make test` started together on a fresh machine both ran mmdebstrap into the same file
    (it truncates its target as it starts): a mixed tarball was cached and imported for good."""
    imported = tmp_path / "imported"
    # The last argument is the output: written in two halves, slowly, as a build would.
    script(tools / "mmdebstrap", f'echo run >> {tools}/mmdebstrap.calls\nout="${{@: -1}}"\n'
                                 'echo first > "$out"; sleep 0.5; echo second >> "$out"\n')
    docker_cli(tools, imported)
    engine = StandInEngine(imported)
    hows: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            hows.append(ensure_image(engine, "unix:///x.sock", log=False))
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and sorted(hows) == ["built", "present", "present"]
    assert (tools / "mmdebstrap.calls").read_text() == "run\n"
    assert (tools / "docker.calls").read_text().count("import") == 1
    cache = tmp_path / "state" / "images"
    assert (cache / f"python-bookworm-{recipe_hash()}.tar").read_text() == "first\nsecond\n"
    assert [p.name for p in cache.iterdir() if "partial" in p.name] == []
    assert f"{SEED_ALIAS}:latest" in engine.tags


def test_a_build_cut_short_stops_mmdebstrap_and_what_it_started_and_leaves_no_partial_file(
        tools: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A timeout (or Ctrl-C, or a SIGTERM of the run) SIGKILLed mmdebstrap only: its forked children, which hold
    its mounts, went on building on their own, and the partial tarball stayed."""
    monkeypatch.setattr(runtime_image, "BUILD_TIMEOUT", 1.0)
    monkeypatch.setattr(runtime_image, "STOP_GRACE", 5.0)
    child_pid = tmp_path / "child.pid"
    script(tools / "mmdebstrap", f'out="${{@: -1}}"\necho partial > "$out"\n'
                                 f'sleep 60 & echo $! > {child_pid}\nwait\n')
    docker_cli(tools, tmp_path / "imported")
    with pytest.raises(ImageBuildError, match="did not finish within 1 s"):
        ensure_image(StandInEngine(tmp_path / "imported"), "unix:///x.sock", log=False)
    child = int(child_pid.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "zombie" not in Path(f"/proc/{child}/status").read_text().lower():
        assert time.monotonic() < deadline, "mmdebstrap's child still runs"
        time.sleep(0.05)
    assert list((tmp_path / "state" / "images").glob("*.tar")) == []


def test_a_tarball_the_engine_refuses_is_not_kept(tools: Path, tmp_path: Path) -> None:
    """A cached tarball `docker import` failed on made every later run fail the same way, until it was removed
    by hand."""
    imported = tmp_path / "imported"
    script(tools / "mmdebstrap", 'echo built > "${@: -1}"\n')
    docker_cli(tools, imported, code=1)
    engine: Any = StandInEngine(imported)
    with pytest.raises(ImageBuildError, match="refused"):
        ensure_image(engine, "unix:///x.sock", log=False)
    assert list((tmp_path / "state" / "images").glob("*.tar")) == []
    docker_cli(tools, imported)  # the engine takes it now: built again, imported
    assert ensure_image(engine, "unix:///x.sock", log=False) == "built"
    assert ensure_image(engine, "unix:///x.sock", log=False) == "present"


def test_mmdebstrap_goes_through_the_proxy_apt_is_configured_with(tools: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """mmdebstrap's apt reads a configuration of its own: on a machine that reaches Debian's archive only through
    a proxy, the build failed."""
    (tmp_path / "apt.conf").write_text('Acquire::http::Proxy "http://127.0.0.1:3142";\n')
    monkeypatch.setenv("APT_CONFIG", str(tmp_path / "apt.conf"))
    script(tools / "mmdebstrap", f'printf "%s\\n" "$@" > {tools}/mmdebstrap.args\necho built > "${{@: -1}}"\n')
    docker_cli(tools, tmp_path / "imported")
    assert ensure_image(StandInEngine(tmp_path / "imported"), "unix:///x.sock", log=False) == "built"
    assert '--aptopt=Acquire::http::Proxy "http://127.0.0.1:3142"' in (tools / "mmdebstrap.args").read_text()


def test_a_good_tarball_is_kept_when_the_engine_fails_for_a_reason_of_its_own(tools: Path, tmp_path: Path) -> None:
    """An engine restarting or out of disk refused a tarball that was fine: it was removed, and the next run had to
    build it again from the mirror."""
    script(tools / "mmdebstrap", 'tar -cf "${@: -1}" -T /dev/null\n')  # a (small) tar that reads to its end
    docker_cli(tools, tmp_path / "imported", code=1)
    with pytest.raises(ImageBuildError, match="docker import failed: refused"):
        ensure_image(StandInEngine(tmp_path / "imported"), "unix:///x.sock", log=False)
    assert len(list((tmp_path / "state" / "images").glob("*.tar"))) == 1
