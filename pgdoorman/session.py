"""
A client's session state as one plain object that can become bytes and come back.

Everything the pooler must know to carry on serving a client — who it is, which pool it uses,
the parameters it set, its cancel key — lives here rather than in the Protocol, so that a later
process (zero-downtime upgrade) or a worker sharing the pool can rebuild the client from bytes.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, List, Optional, Tuple

#: Bumped when a field changes meaning; L{ClientSession.from_bytes} refuses what it can't read.
#: Version 2 (zero-downtime upgrade) adds the prepared statements, the startup values, the
#: SCRAM ClientKey of the login and the counters; it still reads version 1.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class SessionFormatError(ValueError):
    """The bytes were written by a version of pgdoorman this one cannot read."""


class ClientSession:
    """
    @ivar database: the database name the client asked for (a pool name).
    @ivar user: the user it authenticated as.
    @ivar startup: the startup packet's parameters, as sent.
    @ivar params: tracked session parameters (L{pgdoorman.params}) as the client has them now.
    @ivar cancel_key: the (pid, secret) BackendKeyData the pooler gave the client.
    @ivar startup_values: the tracked parameters as the startup packet set them (what RESET
        returns to).
    @ivar prepared: the client's named prepared statements, client name -> the Parse payload
        after the name (query text, parameter types): enough to re-Parse it on any server.
    @ivar scram_client_key: the ClientKey recovered from the client's SCRAM login, if any (it
        lets the pool log in to a SCRAM server holding only the secret).
    @ivar query_count, client_bytes: the client's counters so far.
    @ivar channels: the channels it LISTENs through its pool's listener (L{pgdoorman.listen}),
        as PostgreSQL names them (bytes); an optional field, so still format version 2.
    @ivar listen_statements: its named statements of one LISTEN/UNLISTEN that never went to a
        server (asyncpg's add_listener): name -> statement text (optional, as C{channels}).
    """

    __slots__ = ("database", "user", "startup", "params", "cancel_key", "peer",
                 "connected_at", "startup_values", "prepared", "scram_client_key",
                 "query_count", "client_bytes", "channels",
                 "listen_statements")

    def __init__(self, database: str = "", user: str = "",
                 startup: Optional[Dict[str, str]] = None,
                 params: Optional[Dict[str, Optional[str]]] = None,
                 cancel_key: Optional[Tuple[int, int]] = None, peer: str = "",
                 connected_at: float = 0.0):
        self.database = database
        self.user = user
        self.startup = startup or {}
        self.params = params or {}
        self.cancel_key = cancel_key
        self.peer = peer
        self.connected_at = connected_at
        self.startup_values: Dict[str, Optional[str]] = {}
        self.prepared: Dict[bytes, bytes] = {}
        self.scram_client_key: Optional[bytes] = None
        self.query_count = 0
        self.client_bytes = 0
        self.channels: List[bytes] = []
        self.listen_statements: Dict[bytes, bytes] = {}

    def to_dict(self) -> Dict[str, Any]:
        return {"version": FORMAT_VERSION, "database": self.database, "user": self.user,
                "startup": self.startup, "params": self.params,
                "cancel_key": list(self.cancel_key) if self.cancel_key else None,
                "peer": self.peer, "connected_at": self.connected_at,
                "startup_values": self.startup_values,
                # Statement names and texts are bytes on the wire (any encoding): base64.
                "prepared": [[_b64(name), _b64(body)] for name, body in self.prepared.items()],
                "scram_client_key": _b64(self.scram_client_key)
                if self.scram_client_key is not None else None,
                "query_count": self.query_count, "client_bytes": self.client_bytes,
                "channels": [_b64(c) for c in self.channels],
                "listen_statements": [[_b64(n), _b64(t)]
                                      for n, t in self.listen_statements.items()]}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> "ClientSession":
        try:
            d = json.loads(data.decode("utf-8"))
        except ValueError as e:
            raise SessionFormatError("client session is not valid: %s" % e)
        version = d.get("version") if isinstance(d, dict) else None
        if version not in READABLE_VERSIONS:
            raise SessionFormatError("client session format %r is not supported (this "
                                     "pgdoorman reads versions %s)" % (
                                         version, ", ".join(map(str, READABLE_VERSIONS))))
        try:
            key = d.get("cancel_key")
            s = cls(d["database"], d["user"], d.get("startup") or {}, d.get("params") or {},
                    (int(key[0]), int(key[1])) if key else None, d.get("peer", ""),
                    d.get("connected_at", 0.0))
            s.startup_values = d.get("startup_values") or {}
            s.prepared = {_unb64(n): _unb64(b) for n, b in d.get("prepared") or ()}
            ck = d.get("scram_client_key")
            s.scram_client_key = _unb64(ck) if ck else None
            s.query_count = int(d.get("query_count") or 0)
            s.client_bytes = int(d.get("client_bytes") or 0)
            s.channels = [_unb64(c) for c in d.get("channels") or ()]
            s.listen_statements = {_unb64(n): _unb64(t)
                                   for n, t in d.get("listen_statements") or ()}
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise SessionFormatError("client session is not valid: %r" % (e,))
        return s
