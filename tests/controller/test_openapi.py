"""The OpenAPI document against what the code takes (no server: the fuzz test runs it against a real cluster)."""

from __future__ import annotations

from typing import Any

from controller.api.openapi import DOCUMENT, UPLOAD_OPTIONS
from controller.service import parse_options


class Recording(dict[str, Any]):
    """The keys a function asks of it."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return default


def test_every_upload_option_the_controller_reads_is_documented_as_a_query_parameter_and_a_form_field() -> None:
    """preload, min_warm, max_warm and keepalive were taken (and sent by the CLI) but not documented."""
    raw = Recording()
    parse_options(raw)
    upload = DOCUMENT["paths"]["/v1/functions/{name}"]["post"]
    documented = {p["name"] for p in upload["parameters"]} - {"runtime"}
    assert documented == raw.asked == {name for name, _, _ in UPLOAD_OPTIONS}
    form = list(upload["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"])
    assert form[0] == "runtime" and set(form) == {"runtime", *raw.asked, "archive", "module"}
    assert form.index("archive") > max(form.index(name) for name in raw.asked)  # fields before the file


def test_every_operation_documents_the_statuses_any_request_can_get() -> None:
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            responses = operation["responses"]
            assert "401" in responses, (path, method)
            if "requestBody" in operation:
                assert "408" in responses, (path, method)
            if not path.startswith("/v1/nodes") and path != "/metrics":
                assert "503" in responses, (path, method)


def test_the_documented_bounds_of_upload_options_are_those_the_controller_enforces() -> None:
    """max_warm was documented from 0 (the controller refuses it below 1), min_warm without its 64, timeout and
    keepalive without bounds."""
    import pytest

    from shoal.models import FunctionSpec, ValidationError

    base = {"name": "f", "runtime": "r", "version": 1, "sha256": "0" * 64, "size": 1, "min_warm": 0, "max_warm": 256}
    documented = {name: schema for name, schema, _ in UPLOAD_OPTIONS}
    bounded = {name for name, schema in documented.items() if schema["type"] in ("integer", "number")}
    assert bounded == {"timeout", "min_warm", "max_warm", "keepalive"}
    for name in sorted(bounded):
        schema = documented[name]
        low, high = schema["minimum"], schema["maximum"]
        for value in (low, high):  # the documented bounds are taken...
            spec = dict(base, **{name: value})
            if name == "max_warm":
                spec["min_warm"] = 0
            FunctionSpec.from_dict(spec)
        step = 1 if schema["type"] == "integer" else 0.001
        for value in (low - step, high + step):  # ...and what is past them is refused
            with pytest.raises(ValidationError):
                FunctionSpec.from_dict(dict(base, **{name: value}))
