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
