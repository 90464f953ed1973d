from __future__ import annotations

from typing import Any

import pytest

from shoal.errors import ValidationError
from shoal.models import FunctionSpec, Runtime

SHA = "ab" * 32


def test_seed_runtime_without_a_name_is_named_after_its_image() -> None:
    rt = Runtime.from_dict({"image": "pythonruntime", "path": "/ws",
                            "dependencies": "pip3 install -r requirements.txt", "run": "python3 test.py"})
    assert rt.name == "pythonruntime"
    assert rt.path == "/ws"
    assert Runtime.from_dict({"image": "img", "path": "//srv//app/"}).path == "/srv/app"


@pytest.mark.parametrize("image", ["pythonruntime", "pythonruntime:3.11", "localhost:5000/pythonruntime",
                                   "registry.example:5000/team/pythonruntime:1.0",
                                   "pythonruntime@sha256:" + "ab" * 32, "host:5000/pythonruntime:2@sha256:00"])
def test_a_runtime_is_named_after_its_images_name_not_its_registry_tag_or_digest(image: str) -> None:
    assert Runtime.from_dict({"image": image}).name == "pythonruntime"


@pytest.mark.parametrize(
    "data",
    [None, [], {"image": ""}, {"image": 5}, {"image": "a b"}, {"image": "img", "path": "relative"},
     {"image": "img", "path": "/a/../b"}, {"image": "img", "name": "../x"}, {"image": "img", "run": 3},
     # Paths that normalise to the root, hide Shoal's own mounts, or are not plain text.
     {"image": "img", "path": "//"}, {"image": "img", "path": "/shoal"}, {"image": "img", "path": "/tmp/code"},
     {"image": "img", "path": "/opt"}, {"image": "img", "path": "/w\ns"},
     # Commands too long for a miniworker's command line (the kernel's cap per argument is 128 KiB).
     {"image": "img", "run": "x" * 8193}, {"image": "img", "dependencies": "x" * 8193},
     {"image": "img", "path": "/" + "a" * 1024},
     {"image": "img", "name": "echo\n"}],  # a trailing newline used to pass the name check
)
def test_bad_runtimes_are_refused(data: Any) -> None:
    with pytest.raises(ValidationError):
        Runtime.from_dict(data)


def test_function_spec_defaults_and_style() -> None:
    spec = FunctionSpec.from_dict({"name": "dice", "runtime": "pythonruntime", "sha256": SHA, "size": 10})
    assert spec.style == "command" and spec.key == "dice@1"
    handler = FunctionSpec.from_dict({"name": "h", "runtime": "r", "sha256": SHA, "size": 1,
                                      "entrypoint": "main:handler", "preload": "none"})
    assert handler.style == "handler" and handler.preload == "none"


@pytest.mark.parametrize(
    "changes",
    [{"sha256": "xyz"}, {"name": ""}, {"entrypoint": "no-colon"}, {"preload": "sometimes"},
     {"timeout": -1}, {"timeout": True}, {"min_warm": 5, "max_warm": 2}, {"version": 0}, {"size": "1"}],
)
def test_bad_function_specs_are_refused(changes: dict[str, Any]) -> None:
    base = {"name": "f", "runtime": "r", "sha256": SHA, "size": 1}
    with pytest.raises(ValidationError):
        FunctionSpec.from_dict(dict(base, **changes))
