"""Tokens and the node link's CURVE keys (shoal/auth.py), on real ZMQ sockets over loopback TCP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from shoal.auth import (
    CurveKeys,
    HandshakeWatch,
    bearer,
    bearer_ok,
    check_token,
    registration_credential,
    start_authenticator,
    token_from_env,
)
from shoal.errors import ConfigError
from shoal.nodelink import bind_router

TOKEN = "node-token-0123456789abcdef"
WAIT_MS = 30_000  # a bound on waiting for an event that must come, not a timing under test


def test_tokens_must_be_long_printable_and_without_spaces() -> None:
    assert check_token("", "t") == "" and check_token(TOKEN, "t") == TOKEN
    for bad in ("short", "has a space in it here", "tab\tinside-0123456789", "é" * 20):
        with pytest.raises(ConfigError, match="at least 16 printable ASCII"):
            check_token(bad, "t")


def test_a_token_comes_from_the_environment_or_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SHOAL_X_TOKEN", raising=False)
    monkeypatch.delenv("SHOAL_X_TOKEN_FILE", raising=False)
    assert token_from_env("SHOAL_X_TOKEN") == ""
    monkeypatch.setenv("SHOAL_X_TOKEN", TOKEN)
    assert token_from_env("SHOAL_X_TOKEN") == TOKEN
    (tmp_path / "t").write_text(TOKEN + "\n")
    monkeypatch.setenv("SHOAL_X_TOKEN_FILE", str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="not both"):
        token_from_env("SHOAL_X_TOKEN")
    monkeypatch.delenv("SHOAL_X_TOKEN")
    assert token_from_env("SHOAL_X_TOKEN") == TOKEN
    monkeypatch.setenv("SHOAL_X_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read"):
        token_from_env("SHOAL_X_TOKEN")
    (tmp_path / "t").write_text("tiny")
    monkeypatch.setenv("SHOAL_X_TOKEN_FILE", str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="SHOAL_X_TOKEN"):
        token_from_env("SHOAL_X_TOKEN")


def test_bearer_headers_are_checked_whole() -> None:
    assert bearer("") == {} and bearer(TOKEN) == {"Authorization": f"Bearer {TOKEN}"}
    assert bearer_ok(f"Bearer {TOKEN}", TOKEN) and bearer_ok(f"bearer {TOKEN}", TOKEN)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", "Bearer ",
                   f"Bearer {TOKEN.upper()}", "Bearer \udce9\udcff"):  # (bytes not UTF-8, as aiohttp passes them)
        assert not bearer_ok(header, TOKEN), header


def test_curve_keys_are_derived_from_the_token_and_never_printed() -> None:
    keys = CurveKeys.from_token(TOKEN)
    assert keys == CurveKeys.from_token(TOKEN)  # both sides derive the same keys, a restart keeps them
    other = CurveKeys.from_token(TOKEN + "x")
    assert {keys.server_public, keys.client_public}.isdisjoint({other.server_public, other.client_public})
    assert zmq.curve_public(keys.server_secret) == keys.server_public
    assert keys.server_secret.decode() not in repr(keys) and keys.client_secret.decode() not in repr(keys)


def test_the_registration_credential_gives_the_token_away_no_more_than_a_hash() -> None:
    credential = registration_credential(TOKEN)
    assert credential == registration_credential(TOKEN) != registration_credential(TOKEN + "x")
    assert TOKEN not in credential and len(credential) == 64
    assert check_token(credential, "credential") == credential  # a valid bearer value


@pytest.fixture
def server() -> Iterator[tuple[zmq.Socket[Any], str, list[str]]]:
    """A CURVE ROUTER as the controller's hub makes it: ZAP handler first, then the socket and its watch."""
    ctx: zmq.Context[Any] = zmq.Context()
    refused: list[str] = []
    auth = start_authenticator(ctx, CurveKeys.from_token(TOKEN))
    sock = bind_router(ctx, "tcp://127.0.0.1:0", CurveKeys.from_token(TOKEN))
    watch = HandshakeWatch(sock, refused.append)
    yield sock, sock.getsockopt_string(zmq.LAST_ENDPOINT), refused
    watch.close()
    sock.close()
    auth.stop()
    ctx.term()


def dealer(ctx: zmq.Context[Any], url: str, keys: CurveKeys | None, client_of: CurveKeys | None = None) -> Any:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"n1")
    if keys is not None:
        keys.connect(sock)
    if client_of is not None:  # the right server key, but this client key pair
        sock.setsockopt(zmq.CURVE_PUBLICKEY, client_of.client_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, client_of.client_secret)
    monitor = sock.get_monitor_socket()
    sock.connect(url)
    return sock, monitor


def next_handshake_event(monitor: zmq.Socket[Any]) -> int:
    """The first handshake outcome the monitor reports."""
    done = {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_DISCONNECTED}
    while True:
        assert monitor.poll(WAIT_MS), "no handshake event"
        event = int(recv_monitor_message(monitor)["event"])
        if event in done:
            return event


def test_a_node_that_knows_the_token_talks_over_curve(server: tuple[zmq.Socket[Any], str, list[str]]) -> None:
    sock, url, refused = server
    ctx: zmq.Context[Any] = zmq.Context()
    client, monitor = dealer(ctx, url, CurveKeys.from_token(TOKEN))
    try:
        assert next_handshake_event(monitor) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        client.send_multipart([b"HELLO", b"{}"])
        assert sock.poll(WAIT_MS)
        assert sock.recv_multipart() == [b"n1", b"HELLO", b"{}"]
        sock.send_multipart([b"n1", b"WELCOME"])
        assert client.poll(WAIT_MS) and client.recv_multipart() == [b"WELCOME"]
        assert refused == []
    finally:
        client.disable_monitor()
        monitor.close()
        client.close()
        ctx.term()


@pytest.mark.parametrize(("who", "reasons"), [
    ("other token", ("not the node token's (another token?)",)),
    ("right server key, own client key", ("refused by the ZAP handler",)),
    # Both sides see the mechanisms differ in the greetings: whichever hangs up first decides which is reported.
    ("no curve", ("does not use CURVE", "broke the handshake off")),
])
def test_a_peer_without_the_token_cannot_complete_a_handshake(server: tuple[zmq.Socket[Any], str, list[str]],
                                                              who: str, reasons: tuple[str, ...]) -> None:
    sock, url, refused = server
    ctx: zmq.Context[Any] = zmq.Context()
    right, other = CurveKeys.from_token(TOKEN), CurveKeys.from_token("an-other-token-0123456789")
    keys, client_of = {"other token": (other, None), "right server key, own client key": (right, other),
                       "no curve": (None, None)}[who]
    client, monitor = dealer(ctx, url, keys, client_of)
    try:
        client.send_multipart([b"HELLO", b"{}"])  # queued: it is never delivered
        event = next_handshake_event(monitor)
        assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED
        if client_of is not None:  # the server knew it: its ZAP handler said no
            assert event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        # The server's watch reports why (from its own thread: waited for).
        deadline = time.monotonic() + WAIT_MS / 1000
        while not refused:
            assert time.monotonic() < deadline, "the refusal was not reported"
            time.sleep(0.01)
        assert any(reason in refused[0] for reason in reasons), refused[0]
        # The handshake failed: the server received nothing, whatever the peer keeps trying.
        assert sock.poll(0) == 0
    finally:
        client.disable_monitor()
        monitor.close()
        client.close()
        ctx.term()


def test_without_a_zap_handler_nobody_gets_in() -> None:
    """libzmq admits any CURVE client when no ZAP handler answers, unless the domain is enforced: it is."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = bind_router(ctx, "tcp://127.0.0.1:0", CurveKeys.from_token(TOKEN))
    client, monitor = dealer(ctx, sock.getsockopt_string(zmq.LAST_ENDPOINT), CurveKeys.from_token(TOKEN))
    try:
        assert next_handshake_event(monitor) != zmq.EVENT_HANDSHAKE_SUCCEEDED
    finally:
        client.disable_monitor()
        monitor.close()
        client.close()
        sock.close()
        ctx.term()
