from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal import protocol
from shoal.protocol import (
    MAX_JSON_DEPTH,
    DepthError,
    Msg,
    ProtocolError,
    RunnerStream,
    loads_bounded,
    nested_deeper_than,
    pack_runner,
    text_nested_deeper_than,
)


def test_round_trip_keeps_header_and_payload() -> None:
    frames = protocol.encode(Msg.CHUNK, {"sha256": "a" * 64, "offset": 0, "last": True}, b"\x00bytes")
    msg = protocol.decode(frames)
    assert msg.type == Msg.CHUNK
    assert msg.header["offset"] == 0
    assert msg.payload == [b"\x00bytes"]


@pytest.mark.parametrize(
    ("frames", "needle"),
    [
        ([b"CALL"], "at least 2 frames"),
        ([b"NOPE", b"{}"], "unknown message type"),
        ([b"CALL", b"not json"], "not JSON"),
        ([b"CALL", b"\xff\xfe"], "not JSON"),
        ([b"CALL", b"[1, 2]"], "must be a JSON object"),
        ([b"CALL", b'{"call_id": "x"}'], "missing field 'function'"),
        ([b"CALL", b'{"call_id": 5, "function": "f", "params": null}'], "'call_id' must be str"),
        ([b"FETCH", b'{"sha256": "x", "offset": true, "credit": 1}'], "'offset' must be int"),
        ([b"FETCH", b'{"sha256": "x", "offset": 0, "credit": -8}'], "'credit' must not be negative"),
        ([b"CHUNK", b'{"sha256": "x", "offset": -1, "last": false}', b"data"], "'offset' must not be negative"),
        ([b"HB", b"{}", b"unexpected"], "unexpected payload"),
        ([b"FGONE", b'{"name": "f"}'], "missing field 'up_to'"),
        ([b"FGONE", b'{"name": "f", "up_to": -1}'], "'up_to' must not be negative"),
        ([b"FGONE", b'{"name": 3, "up_to": 1}'], "'name' must be str"),
        ([b"RGONE", b'{"name": null}'], "'name' must be str"),
        # Nested past what every process can decode and encode again: refused before anyone has to.
        ([b"CALL", b'{"call_id": "x", "function": "f", "params": ' + b"[" * 200 + b"]" * 200 + b"}"], "deeper"),
        ([b"CALL", b"[" * 100_000 + b"]" * 100_000], "deeper than 200 levels"),
    ],
)
def test_garbage_is_one_clear_protocol_error(frames: list[bytes], needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        protocol.decode(frames)


def test_json_depth_is_bounded_and_only_walked_when_the_brackets_allow_it() -> None:
    at_limit = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert json.dumps(loads_bounded(at_limit)) == at_limit.decode()
    with pytest.raises(DepthError):
        loads_bounded(b"[" + at_limit + b"]")
    wide = json.dumps({"k": [[i] for i in range(5000)], "s": "[[[[" * 100}).encode()  # many brackets, shallow
    assert len(loads_bounded(wide)["k"]) == 5000
    with pytest.raises(ValueError, match="Expecting value"):
        loads_bounded(b"[1,]")


def test_a_lone_surrogate_is_refused_in_strict_parsing_and_encoded_escaped_anywhere() -> None:
    with pytest.raises(ValueError, match="lone UTF-16 surrogate"):
        loads_bounded(b'{"k": ["ok", {"\\uDC80": 1}]}', strict=True)
    assert loads_bounded(b'"\\ud83d\\ude00"', strict=True) == "\U0001f600"  # a pair is one character
    assert protocol.dumps({"s": "\ud800"}) == b'{"s":"\\ud800"}'  # orjson refuses it; the fallback escapes it
    assert protocol.decode(protocol.encode(Msg.RESULT, {"call_id": "c", "status": "DONE", "result": "\udcff"})
                           ).header["result"] == "\udcff"


@pytest.mark.parametrize(("raw", "needle"), [(b'{"p": NaN}', "NaN is not JSON"), (b"[-Infinity]", "-Infinity is not"),
                                             (b"[1e999]", "1e999 is out of range"), (b"[-2E400]", "out of range")])
def test_strict_parsing_refuses_what_json_has_not(raw: bytes, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        loads_bounded(raw, strict=True)
    assert loads_bounded(b"[1.5, -2e10, 1E3]", strict=True) == [1.5, -2e10, 1000.0]


def test_encode_refuses_a_malformed_outgoing_message() -> None:
    with pytest.raises(ProtocolError):
        protocol.encode(Msg.RESULT, {"call_id": "c"})


def test_runner_stream_reassembles_split_and_joined_messages() -> None:
    a = pack_runner(Msg.R_CALL, {"call_id": "1", "params": {"x": [1, 2]}})
    b = pack_runner(Msg.R_RESULT, {"call_id": "1", "ok": True, "result": "é"})
    stream = RunnerStream()
    data = a + b
    out = []
    for i in range(0, len(data), 7):
        out += stream.feed(data[i : i + 7])
    assert [m.type for m in out] == [Msg.R_CALL, Msg.R_RESULT]
    assert out[1].header["result"] == "é"


def test_runner_stream_refuses_oversized_and_malformed() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        RunnerStream().feed((protocol.MAX_RUNNER_MESSAGE + 1).to_bytes(4, "big"))
    body = b"RCALL" + json.dumps({"call_id": 1}).encode()
    with pytest.raises(ProtocolError, match="separator"):
        RunnerStream().feed(len(body).to_bytes(4, "big") + body)
    deep = Msg.R_RESULT + b'\0{"call_id": "1", "ok": true, "result": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(ProtocolError, match="deeper than"):
        RunnerStream().feed(len(deep).to_bytes(4, "big") + deep)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\u00e9\n', max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(alphabet='[]{}"\\k', max_size=4), children, max_size=4),
    max_leaves=40,
)


@given(value=st.lists(json_values, max_size=3) | st.dictionaries(st.text(max_size=3), json_values, max_size=3),
       limit=st.integers(min_value=1, max_value=6))
def test_the_depth_read_from_the_text_is_the_depth_of_the_value(value: Any, limit: int) -> None:
    raw = json.dumps(value, ensure_ascii=False).encode()
    assert text_nested_deeper_than(raw, limit) == nested_deeper_than(value, limit)


def test_the_depth_of_a_deep_or_wide_document_is_read_from_its_text() -> None:
    assert text_nested_deeper_than(b"[" * 201 + b"]" * 201, 200)
    assert not text_nested_deeper_than(b"[" * 200 + b"]" * 200, 200)
    assert not text_nested_deeper_than(b'["' + b"[" * 500 + b'\\"[["]', 200)  # brackets in a string do not nest
    wide = b"[" + b",".join([b"[" * 199 + b"]" * 199] * 4000) + b"]"  # 1.6 MB: walking its value took ~0.7 s
    assert not text_nested_deeper_than(wide, 200) and text_nested_deeper_than(wide, 199)


def test_a_runner_stream_refuses_a_message_over_its_limit_by_its_length_alone() -> None:
    """The miniworker takes no more than a result may be: refused on the length prefix, before the body is read
    (its memory stays bounded whatever the runner's process sends)."""
    message = protocol.pack_runner(Msg.R_RESULT, {"call_id": "c1", "ok": True, "result": "x" * 100})
    stream = protocol.RunnerStream(limit=len(message) - 5)
    with pytest.raises(protocol.MessageTooLarge) as raised:
        stream.feed(message[:4])  # the prefix only
    assert raised.value.size == len(message) - 4
    assert [m.header["result"] for m in protocol.RunnerStream(limit=len(message) - 4).feed(message)] == ["x" * 100]



def test_json_that_is_not_utf8_is_refused() -> None:
    """json.loads takes UTF-16 and UTF-32 as well: the depth and surrogate checks, made on the bytes as UTF-8, saw no
    bracket and no escape there, and a body nested 976 deep went in (a 500 where it was stored)."""
    deep = '{"params": ["\\"", ' + "[" * 300 + "]" * 300 + "]}"
    for encoding in ("utf-16-le", "utf-16", "utf-32"):
        with pytest.raises(ValueError):
            loads_bounded(deep.encode(encoding), strict=True)
    with pytest.raises(ValueError):
        loads_bounded('{"a": "\\ud800"}'.encode("utf-16-le"), strict=True)
    assert loads_bounded('{"a": "é"}'.encode()) == {"a": "é"}
    assert loads_bounded(b'\xef\xbb\xbf{"a": 1}', strict=True) == {"a": 1}  # a UTF-8 byte order mark, as before
