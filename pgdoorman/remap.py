"""
Statement names on the wire, client side: what a client's Parse, Bind, Describe and Close
become on whichever server runs its transaction (see L{pgdoorman.prepared} for why).

One L{Remapper} per client holds the client's names; every message it rewrites leaves the
L{pgdoorman.link.Entry} that the server side needs on the server's L{pgdoorman.link.Link}.
The rule this module keeps: no name a client chose ever reaches a server.  A statement the
client never prepared gets PostgreSQL's own 26000 error from a Parse that fails on purpose in
the same place, so that PostgreSQL skips the rest of the pipeline exactly as it would have.
"""

from __future__ import annotations

import struct
from typing import Dict, Optional

from pgdoorman import link as _link
from pgdoorman.link import Entry
from pgdoorman.prepared import (CLOSE_NOTHING, DEALLOCATE_NOTHING, PARSE_FAILING, Statement,
                                StatementCache, already_exists, close_statement,
                                does_not_exist, is_discard_all, may_drop_statements,
                                parse_deallocate, server_name)
from pgdoorman.protocol import messages

_uint32 = struct.Struct("!I")
_unpack_len = _uint32.unpack_from
_KIND_STATEMENT = ord("S")
_FAILED = ord("E")
_PARSE = messages.PARSE
_SYNC = messages.SYNC
_SYNC_ENTRY = _link.SYNC_ENTRY
_FORWARD_ENTRY = _link.FORWARD_ENTRY
_SWALLOW_ENTRY = _link.SWALLOW_ENTRY


class Remapper:
    """
    One client's prepared statements (transaction mode).

    @ivar names: the client's statement name -> L{Statement}.
    @ivar unnamed: the Parse body of the client's unnamed statement, if it has one.
    """

    __slots__ = ("names", "unnamed", "cache")

    def __init__(self, cache: StatementCache):
        self.names: Dict[bytes, Statement] = {}
        self.unnamed: Optional[bytes] = None
        self.cache = cache

    # -- one message each; None means: send it unchanged --------------------------------------

    def parse(self, data: bytes, pos: int, end: int, link) -> Optional[bytes]:
        nul = data.index(b"\x00", pos + 5, end)
        expect = link.expect
        if may_drop_statements(data[nul + 1:end]):
            # DEALLOCATE/DISCARD as a prepared statement: once it runs, this server's record
            # of its statements can no longer be trusted.
            link.taint("statements dropped by a statement pgdoorman does not parse")
        if nul == pos + 5:
            # The unnamed statement goes as is; remember it, in case the client Binds it after
            # a Sync, when its server may have gone to another client meanwhile.
            expect.append(_link.UNNAMED_PARSE_ENTRY)
            self.unnamed = link.unnamed = data[nul + 1:end]
            return None
        name = data[pos + 5:nul]
        names = self.names
        if name in names:
            # PostgreSQL: 42P05, and the rest of the pipeline is skipped up to Sync.
            expect.append(Entry(_link.FAKE_ERROR, reply=already_exists(name)))
            return PARSE_FAILING
        cache = self.cache
        stmt = cache.get(data[nul + 1:end])
        names[name] = stmt
        if link.status != _FAILED and stmt.name in link.statements:
            # (In a failed transaction PostgreSQL refuses a Parse, 25P02, but not a Close:
            # then the real Parse goes, to fail as it would.)
            cache.hits += 1
            expect.append(Entry(_link.AS_PARSE, names, name, stmt))
            return CLOSE_NOTHING
        cache.misses += 1
        prefix = self._remember(link, stmt)
        expect.append(_SWALLOW_ENTRY)
        expect.append(Entry(_link.PARSED, names, name, stmt))
        return prefix + stmt.reparse if prefix else stmt.reparse

    def bind(self, data: bytes, pos: int, end: int, link) -> Optional[bytes]:
        s_start = data.index(b"\x00", pos + 5, end) + 1
        if data[s_start] == 0:
            return self._unnamedFirst(link, data[pos:end])
        s_end = data.index(b"\x00", s_start, end)
        stmt = self.names.get(data[s_start:s_end])
        if stmt is None:
            return self._unknown(link, data[s_start:s_end])
        self.cache.binds += 1
        prefix = self._ensure(link, stmt)
        payload = data[pos + 5:s_start] + stmt.name + data[s_end:end]
        bind = b"B" + _uint32.pack(len(payload) + 4) + payload
        return prefix + bind if prefix else bind

    def describe(self, data: bytes, pos: int, end: int, link) -> Optional[bytes]:
        if data[pos + 5] != _KIND_STATEMENT:
            return None  # a portal: it lives and dies inside this transaction
        if end - pos == 7:
            return self._unnamedFirst(link, data[pos:end])
        name = data[pos + 6:end - 1]
        stmt = self.names.get(name)
        if stmt is None:
            return self._unknown(link, name)
        prefix = self._ensure(link, stmt)
        describe = b"D" + _uint32.pack(len(stmt.name) + 6) + b"S" + stmt.name + b"\x00"
        return prefix + describe if prefix else describe

    def close(self, data: bytes, pos: int, end: int, link) -> Optional[bytes]:
        if data[pos + 5] != _KIND_STATEMENT:
            link.expect.append(_FORWARD_ENTRY)
            return None
        # Forget the client's name; the server's copy stays for others.  PostgreSQL answers
        # a Close of a name it does not have with CloseComplete too, and so does ours.  If
        # PostgreSQL skips the Close (an error before it), the name is the client's again.
        name = data[pos + 6:end - 1]
        if not name:
            link.expect.append(_FORWARD_ENTRY)
            self.unnamed = None
            return None
        stmt = self.names.pop(name, None)
        if stmt is None:
            link.expect.append(_FORWARD_ENTRY)
        else:
            link.expect.append(Entry(_link.CLOSE_NAME, self.names, name, stmt))
        return CLOSE_NOTHING

    # -- helpers -------------------------------------------------------------------------------

    def _unknown(self, link, name: bytes) -> bytes:
        """A statement this client never prepared: PostgreSQL's error, from PostgreSQL's place."""
        link.expect.append(Entry(_link.FAKE_ERROR, reply=does_not_exist(name)))
        return PARSE_FAILING

    def _unnamedFirst(self, link, message: bytes) -> Optional[bytes]:
        """
        Bind/Describe of the unnamed statement: when this server does not hold the client's
        (its Parse went to another server before a Sync, as pg8000 does), Parse it again first
        and swallow the ParseComplete.  A client that has none gets PostgreSQL's 26000, never
        another client's unnamed statement.
        """
        body = self.unnamed
        if body is None:
            return self._unknown(link, b"")
        if link.unnamed is body:
            return None
        link.unnamed = body
        link.expect.append(_link.UNNAMED_ENTRY)
        return b"P" + _uint32.pack(len(body) + 5) + b"\x00" + body + message

    def _ensure(self, link, stmt: Statement) -> bytes:
        """Bytes to put first so that the server holds C{stmt}: an injected Parse, or nothing."""
        if stmt.name in link.statements:
            return b""
        cache = self.cache
        cache.misses += 1
        cache.reparses += 1
        prefix = self._remember(link, stmt)
        expect = link.expect
        expect.append(_SWALLOW_ENTRY)
        expect.append(Entry(_link.INJECTED, stmt=stmt))
        return prefix + stmt.reparse if prefix else stmt.reparse

    def _remember(self, link, stmt: Statement) -> bytes:
        """Note that the server will hold C{stmt}; Close what the LRU evicts to make room."""
        evicted = link.statements.add(stmt.name)
        if evicted is None:
            return b""
        self.cache.evictions += 1
        link.expect.append(Entry(_link.CLOSED, name=evicted))
        return close_statement(evicted)

    # -- SQL that speaks of statements -----------------------------------------------------------

    def sql(self, query: bytes, link) -> Optional[bytes]:
        """
        SQL DEALLOCATE and DISCARD ALL act on the client's own names.  Returns the Query to
        send instead, or None to send it as is.
        """
        target = parse_deallocate(query)
        if target is None and not is_discard_all(query):
            if may_drop_statements(query):
                # DEALLOCATE or DISCARD in a form we do not parse: this server's record of
                # its statements can no longer be trusted.
                link.taint("statements dropped by a query pgdoorman does not parse")
            return None
        if target is True or (target is None and is_discard_all(query)):
            # Sent as is, it drops every statement on this server: forget them all.
            self.names.clear()
            self.unnamed = None
            link.statements.clear()
            return None
        stmt = self.names.pop(target, None)
        if stmt is None:
            # PostgreSQL's 26000 for the client's name, from a DEALLOCATE that fails the same
            # way; the name itself never reaches a server.
            link.expect.append(Entry(_link.QUERY_ERROR, reply=does_not_exist(target)))
            return DEALLOCATE_NOTHING
        # Deallocate the server's copy under its own name (it is re-Parsed on demand): the
        # client sees the same CommandComplete and ReadyForQuery as without a pooler.
        prefix = self._ensure(link, stmt)
        link.statements.discard(stmt.name)
        return prefix + messages.query('DEALLOCATE "%s"' % stmt.name.decode())

    def answer_locally(self, data: bytes) -> int:
        """
        Named Parses and a Sync, nothing else (libpq's PQprepare), of statements that some
        server has already parsed: remember them, and return how many, so the caller answers
        ParseComplete and ReadyForQuery without a server (0: not such a batch).  They are
        Parsed on a server before their first Bind, as always.  Without this, pgbench
        -M prepared deadlocks on a small pool: PQprepare blocks its thread while the thread's
        other clients hold every server inside BEGIN...END.
        """
        n = len(data)
        pos = 0
        found = []
        names = self.names
        known = self.cache.statements
        while True:
            if n - pos < 5:
                return 0
            code = data[pos]
            end = pos + 1 + _unpack_len(data, pos + 1)[0]
            if end > n or end < pos + 5:
                return 0
            if code == _SYNC:
                if end != n or not found:
                    return 0
                break
            if code != _PARSE:
                return 0
            nul = data.find(b"\x00", pos + 5, end)
            if nul <= pos + 5:
                return 0  # the unnamed statement, or malformed: the usual path
            name = data[pos + 5:nul]
            if name in names or any(name == f[0] for f in found):
                return 0  # 42P05: PostgreSQL must say it, in order
            stmt = known.get(server_name(data[nul + 1:end]))
            if stmt is None or not stmt.parsed:
                return 0
            found.append((name, stmt))
            pos = end
        for name, stmt in found:
            names[name] = stmt
        self.cache.hits += len(found)
        return len(found)

    # -- handing a client to another process ---------------------------------------------------

    def export(self) -> Dict[bytes, bytes]:
        return {name: stmt.body for name, stmt in self.names.items()}

    def adopt(self, statements: Dict[bytes, bytes]) -> None:
        self.names = {name: self.cache.get(body) for name, body in statements.items()}
