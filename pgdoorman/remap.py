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
from collections import OrderedDict
from typing import Dict, Optional

from pgdoorman import link as _link
from pgdoorman.link import Entry
from twisted.internet.defer import Deferred

from pgdoorman.prepared import (CLOSE_NOTHING, DEALLOCATE_NOTHING, PARSE_FAILING, PREFIX,
                                Statement,
                                StatementCache, already_exists, close_statement,
                                does_not_exist, is_discard_all, is_prepare_transaction,
                                may_touch_statements, parse_deallocate, parse_execute,
                                parse_prepare, server_name, sql_statement)
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
_SYNC_MESSAGE = messages.message(b"S")


class Remapper:
    """
    One client's prepared statements (transaction mode).

    @ivar names: the client's statement name -> L{Statement}.
    @ivar anonymous: the client's most recent anonymous Parses (Parse body -> L{Statement}),
        least recently used first, at most C{anonymous_size} (0: no bound).  The client's
        unnamed statement itself is C{names[b""]}.
    @ivar entry: the L{Entry} that the Query just mapped by L{sql} needs instead of the
        plain one (an SQL PREPARE, undone if it fails), for the relay to take.
    """

    __slots__ = ("names", "cache", "entry", "anonymous", "anonymous_size")

    def __init__(self, cache: StatementCache, anonymous_size: int = 256):
        self.names: Dict[bytes, Statement] = {}
        self.cache = cache
        self.anonymous: "OrderedDict[bytes, Statement]" = OrderedDict()
        self.anonymous_size = anonymous_size
        self.entry: Optional[Entry] = None

    # -- one message each; None means: send it unchanged --------------------------------------

    def parse(self, data: bytes, pos: int, end: int, link) -> Optional[bytes]:
        nul = data.index(b"\x00", pos + 5, end)
        expect = link.expect
        body = data[nul + 1:end]
        if may_touch_statements(body) and sql_statement(body) is None:
            # DEALLOCATE/DISCARD/PREPARE as a prepared statement, not one that is mapped at
            # its Bind: once it runs, this server's record of its statements can no longer be
            # trusted.
            link.taint("statements dropped by a statement pgdoorman does not parse")
        names = self.names
        cache = self.cache
        if nul == pos + 5:
            # The unnamed statement (anonymous Parse, PgDoorman's
            # client_anonymous_prepared_cache_size): a named statement on the server like any
            # other, so that a server that has parsed the text does not parse it again, and
            # the client may Bind it after a Sync on whichever server it gets then.  It
            # replaces the client's unnamed statement (no 42P05), as in PostgreSQL.
            name = b""
            anonymous = self.anonymous
            stmt = anonymous.get(body)
            if stmt is None:
                stmt = anonymous[body] = cache.get(body)
                if self.anonymous_size and len(anonymous) > self.anonymous_size:
                    anonymous.popitem(last=False)
            else:
                anonymous.move_to_end(body)
            cache.anonymous += 1
        else:
            name = data[pos + 5:nul]
            if name in names:
                # PostgreSQL: 42P05, and the rest of the pipeline is skipped up to Sync.
                expect.append(Entry(_link.FAKE_ERROR, reply=already_exists(name)))
                return PARSE_FAILING
            stmt = cache.get(body)
        names[name] = stmt
        if link.status != _FAILED and link.statements.has(stmt.name):
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
        s_end = data.index(b"\x00", s_start, end)
        stmt = self.names.get(data[s_start:s_end])
        if stmt is None:
            return self._unknown(link, data[s_start:s_end])
        if s_end != s_start:
            self.cache.binds += 1
        if stmt.sql is not None:
            prefix, stmt = self._mapSQL(link, stmt, True)
            if stmt is None:
                return prefix
        else:
            prefix = self._ensure(link, stmt)
        payload = data[pos + 5:s_start] + stmt.name + data[s_end:end]
        bind = b"B" + _uint32.pack(len(payload) + 4) + payload
        return prefix + bind if prefix else bind

    def describe(self, data: bytes, pos: int, end: int, link) -> Optional[bytes]:
        if data[pos + 5] != _KIND_STATEMENT:
            return None  # a portal: it lives and dies inside this transaction
        name = data[pos + 6:end - 1]
        stmt = self.names.get(name)
        if stmt is None:
            return self._unknown(link, name)
        if stmt.sql is not None:
            prefix, stmt = self._mapSQL(link, stmt, False)
            if stmt is None:
                return prefix
        else:
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
        stmt = self.names.pop(name, None)
        if stmt is None:
            link.expect.append(_FORWARD_ENTRY)
        else:
            link.expect.append(Entry(_link.CLOSE_NAME, self.names, name, stmt))
        return CLOSE_NOTHING

    # -- statements whose text is SQL PREPARE, EXECUTE or DEALLOCATE ----------------------------

    def _mapSQL(self, link, stmt: Statement, bind: bool):
        """
        A statement whose text names one of the client's statements (a driver that prepares
        "EXECUTE foo", as psycopg does after prepare_threshold runs): what it names is the
        client's, now.  Returns the bytes to send first and the statement to Bind or Describe
        instead: the same text under the server-side name of the client's statement.  The
        effect of a DEALLOCATE or PREPARE on the client's names is taken at its Bind (C{bind};
        a Describe changes nothing).  The server also holds C{stmt} itself as Parsed, unused
        but where the client's name is missing (PostgreSQL's error is then the client's).
        """
        kind, cname, span, inner = stmt.sql
        names = self.names
        if kind == b"A":
            first = self._ensure(link, stmt)
            if bind:  # it drops every statement on this server, and the client's
                names.clear()
                link.statements.clear()
            return first, stmt
        start, end = span
        target = names.get(cname)
        first = b""
        if kind == b"P" and not bind:
            return self._ensure(link, stmt), stmt  # a PREPARE has no result to describe
        if kind == b"P" and target is None:
            # The PREPARE creates the statement under its server-side name, on this server.
            target = self.cache.get(inner)
            names[cname] = target
            first = self._remember(link, target) + close_statement(target.name)
            link.expect.append(_SWALLOW_ENTRY)
        elif target is None:
            if not cname.startswith(PREFIX):
                # The client's own name: PostgreSQL says it does not exist.
                return self._ensure(link, stmt), stmt
            server = b"DOORMAN_NONE"
        elif kind == b"P":
            # 42P05, from the Bind rather than the Execute (a PREPARE under the statement's
            # server-side name could only fail, but not on a server whose record were wrong).
            link.expect.append(Entry(_link.FAKE_ERROR, reply=already_exists(cname)))
            return PARSE_FAILING, None
        else:
            # EXECUTE and DEALLOCATE need the server to hold it.
            first = self._ensure(link, target)
            if kind == b"D" and bind:
                del names[cname]
                link.statements.discard(target.name)
        if target is not None:
            server = target.name
        body = stmt.body
        nul = body.index(b"\x00")
        mapped = self.cache.get(body[:start] + b'"' + server + b'"' + body[end:nul]
                                + body[nul:])
        return first + self._ensure(link, mapped), mapped

    # -- helpers -------------------------------------------------------------------------------

    def _unknown(self, link, name: bytes) -> bytes:
        """A statement this client never prepared: PostgreSQL's error, from PostgreSQL's place."""
        link.expect.append(Entry(_link.FAKE_ERROR, reply=does_not_exist(name)))
        return PARSE_FAILING

    def _ensure(self, link, stmt: Statement) -> bytes:
        """Bytes to put first so that the server holds C{stmt}: an injected Parse, or nothing."""
        if link.statements.has(stmt.name) or stmt.parse is None:
            # (A statement SQL PREPAREd with parameter types cannot be Parsed: in the middle
            # of a pipeline on a server that lacks it, its Bind gets PostgreSQL's 26000.)
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

    def sql(self, query: bytes, link, server=None) -> Optional[bytes]:
        """
        SQL PREPARE, EXECUTE and DEALLOCATE name the client's statements (the same namespace
        as the protocol's Parse and Bind) and DISCARD ALL drops them: each is mapped to the
        server-side names.  Returns the Query to send instead, or None to send it as is.
        (C{server}: the server the query goes to, for the queries of the pooler's own that
        create a statement it lacks first.)
        """
        stripped = query.lstrip()
        first = stripped[0] if stripped else 0
        if first == 112 or first == 80:  # p P (ints: "bytes in bytes" costs a TypeError)
            return self._prepare(query, link, server)
        if first == 101 or first == 69:  # e E
            return self._execute(query, link, server)
        target = parse_deallocate(query)
        if target is None and not is_discard_all(query):
            if may_touch_statements(query):
                # DEALLOCATE or DISCARD in a form we do not parse: this server's record of
                # its statements can no longer be trusted.
                link.taint("statements dropped by a query pgdoorman does not parse")
            return None
        if target is True or (target is None and is_discard_all(query)):
            # Sent as is, it drops every statement on this server: forget them all.
            self.names.clear()
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
        prefix = self._ensureForQuery(link, server, stmt)
        link.statements.discard(stmt.name)
        return prefix + messages.query('DEALLOCATE "%s"' % stmt.name.decode())

    def _prepare(self, query: bytes, link, server) -> Optional[bytes]:
        """
        SQL PREPARE: the client's name becomes the statement's server-side name, in the
        client's own query text (so PostgreSQL says what it would, errors included).  A Close
        of the pooler's own goes first, so that it succeeds on a server that already holds
        the statement for someone else.
        """
        found = parse_prepare(query)
        if found is None:
            if may_touch_statements(query) and not is_prepare_transaction(query):
                # A PREPARE we do not map (among other statements): a name the client chose
                # reaches this server, which must then go to nobody else.
                link.taint("a statement prepared under a client's name by a query pgdoorman "
                           "does not parse")
            return None
        name, (start, end), body = found
        names = self.names
        if name in names:
            link.expect.append(Entry(_link.QUERY_ERROR, reply=already_exists(name)))
            return DEALLOCATE_NOTHING
        stmt = self.cache.get(body)
        names[name] = stmt
        self.cache.misses += 1
        evicted = link.statements.add(stmt.name)
        closes = close_statement(stmt.name)
        if evicted is not None:
            self.cache.evictions += 1
            closes += close_statement(evicted)
        if link.dirty:
            # In the middle of a pipeline the Closes go in it (a Sync would end it), and an
            # error before them skips them with the PREPARE.
            link.expect.append(_SWALLOW_ENTRY)
            if evicted is not None:
                link.expect.append(Entry(_link.CLOSED, name=evicted))
        else:
            closes = server.prepend_internal_message(closes + _SYNC_MESSAGE)
        # The Query's entry undoes the name if PostgreSQL refuses the PREPARE.
        self.entry = Entry(_link.QUERY, names, name, stmt)
        return (closes + b"Q" + _uint32.pack(len(query) - (end - start) + len(stmt.name) + 7)
                + query[:start] + b'"' + stmt.name + b'"' + query[end:] + b"\x00")

    def _execute(self, query: bytes, link, server) -> Optional[bytes]:
        """
        SQL EXECUTE (and EXPLAIN EXECUTE) of one of the client's statements, under its
        server-side name; one the client never prepared gets PostgreSQL's 26000.
        """
        found = parse_execute(query)
        if found is None:
            return None  # not an EXECUTE of a statement (or among other statements)
        name, (start, end) = found
        stmt = self.names.get(name)
        if stmt is None:
            link.expect.append(Entry(_link.QUERY_ERROR, reply=does_not_exist(name)))
            return DEALLOCATE_NOTHING
        if may_touch_statements(query[end:]):
            link.taint("statements dropped by a query pgdoorman does not parse")
        prefix = self._ensureForQuery(link, server, stmt)
        self.entry = Entry(_link.QUERY, None, name, stmt)
        return (prefix + b"Q" + _uint32.pack(len(query) - (end - start) + len(stmt.name) + 7)
                + query[:start] + b'"' + stmt.name + b'"' + query[end:] + b"\x00")

    def _ensureForQuery(self, link, server, stmt: Statement) -> bytes:
        """
        Bytes to put ahead of a simple Query so that the server holds C{stmt}.  Between
        pipelines, a Parse and Sync (or the SQL PREPARE) of the pooler's own whose replies are
        swallowed: its failure cannot make PostgreSQL skip the client's Query.  In the middle of
        a pipeline, the injected Parse of L{_ensure}, whose error skips what the client's own
        messages would.  In a failed transaction nothing: PostgreSQL refuses the Query itself.
        """
        statements = link.statements
        if stmt.name in statements or server is None:
            return b""
        if link.dirty:
            return self._ensure(link, stmt) if stmt.parse is not None else b""
        if link.status == _FAILED:
            return b""
        cache = self.cache
        cache.misses += 1
        cache.reparses += 1
        out = b""
        evicted = statements.add(stmt.name)
        if evicted is not None:
            cache.evictions += 1
            out = close_statement(evicted)
        name = stmt.name

        def created(err):
            # (42P05: the server held it after all, which is what was wanted.)
            if err is not None and err.sqlstate != "42P05":
                statements.discard(name)

        d = Deferred()
        d.addCallback(created)
        if stmt.parse is not None:
            return server.prepend_internal_message(out + stmt.reparse + _SYNC_MESSAGE, d)
        if out:
            out = server.prepend_internal_message(out + _SYNC_MESSAGE)
        return out + server.prepend_internal_message(stmt.create, d)

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
