"""
A client's session state as one plain object that can become bytes and come back.

Everything the pooler must know to carry on serving a client — who it is, which pool it uses,
the parameters it set, its cancel key — lives here rather than in the Protocol, so that a later
process (zero-downtime upgrade) or a worker sharing the pool can rebuild the client from bytes.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

#: Bumped when a field changes meaning; L{ClientSession.from_bytes} refuses what it can't read.
FORMAT_VERSION = 1


class SessionFormatError(ValueError):
    """The bytes were written by a version of pgdoorman this one cannot read."""


class ClientSession:
    """
    @ivar database: the database name the client asked for (a pool name).
    @ivar user: the user it authenticated as.
    @ivar startup: the startup packet's parameters, as sent.
    @ivar params: tracked session parameters (L{pgdoorman.params}) as the client has them now.
    @ivar cancel_key: the (pid, secret) BackendKeyData the pooler gave the client.
    """

    __slots__ = ("database", "user", "startup", "params", "cancel_key", "peer",
                 "connected_at")

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

    def to_dict(self) -> Dict[str, Any]:
        return {"version": FORMAT_VERSION, "database": self.database, "user": self.user,
                "startup": self.startup, "params": self.params,
                "cancel_key": list(self.cancel_key) if self.cancel_key else None,
                "peer": self.peer, "connected_at": self.connected_at}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> "ClientSession":
        try:
            d = json.loads(data.decode("utf-8"))
        except ValueError as e:
            raise SessionFormatError("client session is not valid: %s" % e)
        version = d.get("version") if isinstance(d, dict) else None
        if version != FORMAT_VERSION:
            raise SessionFormatError("client session format %r is not supported (this "
                                     "pgdoorman reads version %d)" % (version, FORMAT_VERSION))
        key = d.get("cancel_key")
        return cls(d["database"], d["user"], d.get("startup") or {}, d.get("params") or {},
                   tuple(key) if key else None, d.get("peer", ""), d.get("connected_at", 0.0))
