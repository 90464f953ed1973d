"""Shared secrets: the API token (HTTP clients) and the node token (node agents).

* API token: every HTTP route but ``/ping``, ``/version`` and ``/openapi.json`` wants
  ``Authorization: Bearer <token>`` when the controller has one.
* Node token: ``POST /register`` wants it as a bearer token, and the ZMQ link between controller and agents
  runs CURVE (encrypted, authenticated) with keys derived from it. Both sides derive the same keys, so nothing
  but the token is ever distributed, and a restarted controller keeps its keys. The controller's ZAP handler
  lets in only the client key derived from the token: a peer that does not know the token cannot complete a
  handshake, let alone say HELLO as a node.

Either token is off when empty (a local cluster, the seeds' curl examples); a deployment sets both.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from shoal.errors import ConfigError

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
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


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
        """Make ``sock`` (before it binds) a CURVE server."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.server_secret)

    def connect(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` (before it connects) a CURVE client of the server these keys belong to."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.client_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.client_secret)


class _NodeKey:
    """ZAP credentials provider: only the client key derived from the node token gets in."""

    def __init__(self, keys: CurveKeys, on_refused: Callable[[bytes], None]) -> None:
        self.keys = keys
        self.on_refused = on_refused

    def callback(self, domain: str, key: bytes) -> bool:
        ok = hmac.compare_digest(key, self.keys.client_public)
        if not ok:
            self.on_refused(key)
        return ok


def start_authenticator(ctx: zmq.Context[Any], keys: CurveKeys,
                        on_refused: Callable[[bytes], None]) -> ThreadAuthenticator:
    """A ZAP handler on ``ctx`` (start it before a CURVE server socket of ``ctx`` binds); ``stop()`` it before
    the context is terminated. ``on_refused(client_key)`` is called (in its thread) for each refused peer."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", _NodeKey(keys, on_refused))
    return auth
