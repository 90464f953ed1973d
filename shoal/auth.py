"""Shared secrets: the API token (HTTP clients) and the node token (node agents).

* API token: every HTTP route but ``/ping``, ``/version`` and ``/openapi.json`` wants
  ``Authorization: Bearer <token>`` when the controller has one.
* Node token: never sent anywhere. ``POST /register`` wants a credential derived from it (HMAC: one seen on
  the wire gives away neither the token nor the link's keys, and only buys the ZMQ URL), and the ZMQ link
  between controller and agents runs CURVE (encrypted, authenticated) with keys derived from it. Both sides
  derive the same keys, so nothing but the token is ever distributed, and a restarted controller keeps its
  keys. The controller's ZAP handler lets in only the client key derived from the token (and its socket
  refuses every peer while no handler runs): a peer that does not know the token cannot complete a
  handshake, let alone say HELLO as a node. Refused handshakes are reported by a socket monitor.

Either token is off when empty (a local cluster, the seeds' curl examples); a deployment sets both.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from shoal.errors import ConfigError

ZAP_DOMAIN = "shoal"
FAILED_HANDSHAKES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
MIN_TOKEN_LENGTH = 16
TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: it travels in an HTTP header


def check_token(value: str, what: str) -> str:
    """``value`` if it is a usable token ("" = no token); a ConfigError naming ``what`` otherwise."""
    if value and (len(value) < MIN_TOKEN_LENGTH or not TOKEN_CHARS.fullmatch(value)):
        raise ConfigError(f"{what} must be at least {MIN_TOKEN_LENGTH} printable ASCII characters without spaces")
    return value


def token_from_env(name: str) -> str:
    """The token in ``$NAME``, or in the file ``$NAME_FILE`` names (one line); "" if neither is set."""
    value, path = os.environ.get(name, ""), os.environ.get(name + "_FILE", "")
    if value and path:
        raise ConfigError(f"set {name} or {name}_FILE, not both")
    if path:
        value = read_token_file(Path(path), name + "_FILE")
    return check_token(value, name)


def read_token_file(path: Path, what: str) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc}") from None


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` as a bearer token (compared in constant time)."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    # (Header bytes that are not UTF-8 reach here as surrogates: encoded back as they came, never a match.)
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"),
                                                              token.encode())


def registration_credential(node_token: str) -> str:
    """What an agent presents at ``POST /register`` (a bearer token) in place of the node token itself."""
    return hmac.new(node_token.encode(), b"shoal node registration", hashlib.sha256).hexdigest()


def bearer(token: str) -> dict[str, str]:
    """The request header that presents ``token`` ({} for no token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True)
class CurveKeys:
    """The node link's CURVE keys (Z85), all derived from the node token."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    def __repr__(self) -> str:
        return f"CurveKeys(server_public={self.server_public!r}, client_public={self.client_public!r})"

    @classmethod
    def from_token(cls, token: str) -> CurveKeys:
        def secret(label: bytes) -> bytes:
            return z85.encode(hmac.new(token.encode(), label, hashlib.sha256).digest())

        server, client = secret(b"shoal node link: server"), secret(b"shoal node link: client")
        return cls(zmq.curve_public(server), server, zmq.curve_public(client), client)

    def serve(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` (before it binds) a CURVE server whose peers a ZAP handler must admit (with no handler
        running, none is: libzmq would otherwise let in any client that knows the server's public key)."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.server_secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def connect(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` (before it connects) a CURVE client of the server these keys belong to."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.client_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.client_secret)


class _NodeKey:
    """ZAP credentials provider: only the client key derived from the node token gets in."""

    def __init__(self, keys: CurveKeys) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return hmac.compare_digest(key, self.keys.client_public)


def start_authenticator(ctx: zmq.Context[Any], keys: CurveKeys) -> ThreadAuthenticator:
    """A ZAP handler on ``ctx`` (start it before a CURVE server socket of ``ctx`` binds); ``stop()`` it before
    the context is terminated."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(ZAP_DOMAIN, _NodeKey(keys))
    return auth


def handshake_failure(event: Mapping[str, Any]) -> str:
    """Why a monitor's failed-handshake event failed, in words."""
    value = int(event["value"])
    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "its CURVE key is not the node token's (refused by the ZAP handler)"
    if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "it does not use CURVE (an agent without the node token?)"
    if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return "its CURVE keys are not the node token's (another token?)"
    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        # The peer hung up first: a peer without CURVE sees the mismatch in the greetings too, and may close
        # before this side has said so.
        return f"the peer broke the handshake off ({os.strerror(value)}; one without CURVE does)"
    return f"handshake failed (ZMQ event {int(event['event'])}, value {value})"


class HandshakeWatch:
    """Counts the handshakes a socket failed (a peer without the token: a wrong key pair, or no CURVE at all),
    from the socket's monitor, read in a thread of its own. A peer retries every 100 ms or so: each attempt is
    counted in ``failures``, and ``on_failure(reason)`` (run in that thread) is called for the first, then at
    most once every ``report_every`` seconds."""

    def __init__(self, sock: zmq.Socket[Any], on_failure: Callable[[str], None],
                 report_every: float = 60.0) -> None:
        self.sock = sock
        self.on_failure = on_failure
        self.report_every = report_every
        self.failures = 0
        self._reported_at = -report_every
        self.monitor = sock.get_monitor_socket(FAILED_HANDSHAKES)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="handshake-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.monitor.poll(200):
                continue
            reason = handshake_failure(recv_monitor_message(self.monitor))
            self.failures += 1
            now = time.monotonic()
            if now - self._reported_at >= self.report_every:
                self._reported_at = now
                self.on_failure(reason)

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        self.sock.disable_monitor()
        self.monitor.close()
