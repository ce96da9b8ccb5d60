"""
The state of one server connection's conversation: what it owes and what it holds.

A L{Link} belongs to one L{pgdoorman.server.ServerConnection} for its whole life.  The client
that holds the server writes to it (through L{pgdoorman.prepared.Remapper}) what it sent that
PostgreSQL will answer; the server side reads it to route each reply.  Nobody else keeps any of
this, so there is one place that can be wrong, and one place that says so: when the replies stop
matching what was sent (a client that sends a Query in the middle of a failed pipeline, a reply
nobody asked for), the link is marked L{Link.tainted} and the server is closed instead of being
given to anyone else.  Its record of the statements the server holds could no longer be trusted.

Entries of L{Link.expect}, one per message that PostgreSQL answers with ParseComplete,
CloseComplete or ReadyForQuery while prepared statements are remapped:

  - L{SYNC}: a Sync: its ReadyForQuery.
  - L{QUERY}: a Query or FunctionCall: its ReadyForQuery, unless PostgreSQL skips it (it
    does, when an extended-protocol message before it failed and no Sync came between).
    One with C{names} and C{stmt} is an SQL PREPARE: if it fails or is skipped, the client's
    name and this server's copy are forgotten; one with C{stmt} only an SQL EXECUTE, whose
    errors speak of the client's C{name}.
  - L{PROBE}: a Close of nothing that the pooler puts ahead of a Query sent in the middle of
    a pipeline: its CloseComplete says that no error came before, so the Query will run; an
    error before it means both are skipped.
  - L{QUERY_ERROR}: like L{FAKE_ERROR} for a simple Query that fails on purpose (a DEALLOCATE
    of a name the client never prepared, an EXECUTE of one, a PREPARE of a name the client
    has): replaced, and nothing is skipped.  Only PostgreSQL's own 26000 is replaced: another
    error that comes first (25P02 in a failed transaction) is what PostgreSQL would say.
  - L{CLOSE_NAME}: the client's Close of one of its statements (sent as a Close of nothing):
    forwarded; if PostgreSQL skips it, the client still has the statement.
  - L{COPY_END}: not a reply: where the client ended a COPY (CopyDone or CopyFail).  Syncs
    that reach PostgreSQL during COPY FROM STDIN are ignored (docs 55.2.6), so at the
    CopyInResponse the Sync entries up to this marker are dropped.
  - L{FORWARD}: a Close of the client's, or its unnamed Parse: the reply goes to the client.
  - L{PARSED}: the client's Parse, sent under the server-side name.
  - L{AS_PARSE}: a Close of a name no server has, standing in for the client's Parse of a
    statement this server already holds: its CloseComplete becomes the ParseComplete.
  - L{INJECTED}: a Parse the pooler added so that this server holds a statement: swallowed.
  - L{CLOSED}: a Close the pooler added for a statement the LRU evicted: swallowed.
  - L{UNNAMED}: the client's unnamed statement, Parsed again on this server: swallowed.
  - L{SWALLOW}: the Close the pooler sends ahead of each Parse of its own: swallowed.
  - L{FAKE_ERROR}: a Parse that fails on purpose where PostgreSQL would have failed the
    client's message (its name already exists, or it names a statement the client never
    prepared): the server's error is replaced by the one PostgreSQL would have sent.

After an ErrorResponse to an extended-protocol message PostgreSQL skips every message up to
the next Sync, Queries included (docs 55.2.3, "Extended Query"), so the entries up to the next
L{SYNC} are dropped and whatever they were going to create is undone.  An error to a Query
skips nothing: it is told apart by the entry at the head of the queue, a L{QUERY}.  Entries are
kept for every server in transaction mode, whether statements are remapped or not (then the
client's Parse and Close have L{FORWARD} entries).
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Dict, Optional

from pgdoorman.prepared import PREFIX, ServerStatements, Statement

_uint32 = struct.Struct("!I")

SYNC = 1
FORWARD = 2
PARSED = 3
AS_PARSE = 4
INJECTED = 5
CLOSED = 6
UNNAMED = 7
FAKE_ERROR = 8
UNNAMED_PARSE = 9
SWALLOW = 10
QUERY = 11
PROBE = 12
QUERY_ERROR = 13
COPY_END = 14
CLOSE_NAME = 15

PARSE_COMPLETE = b"1\x00\x00\x00\x04"


class Entry:
    """
    One reply owed.  C{names} and C{name}: the client's statement map and the client's name
    (to undo a Parse that never happened); C{stmt}: the statement concerned; C{reply}: the
    error to send instead of the server's (L{FAKE_ERROR}).
    """

    __slots__ = ("kind", "names", "name", "stmt", "reply")

    def __init__(self, kind: int, names: Optional[Dict[bytes, Statement]] = None,
                 name: Optional[bytes] = None, stmt: Optional[Statement] = None,
                 reply: Optional[bytes] = None):
        self.kind = kind
        self.names = names
        self.name = name
        self.stmt = stmt
        self.reply = reply

    def __repr__(self) -> str:
        return "<Entry %s %r>" % (_KIND_NAMES.get(self.kind, self.kind), self.name)


_KIND_NAMES = {SYNC: "SYNC", FORWARD: "FORWARD", PARSED: "PARSED", AS_PARSE: "AS_PARSE",
               INJECTED: "INJECTED", CLOSED: "CLOSED", UNNAMED: "UNNAMED",
               FAKE_ERROR: "FAKE_ERROR", UNNAMED_PARSE: "UNNAMED_PARSE", SWALLOW: "SWALLOW",
               QUERY: "QUERY", PROBE: "PROBE", QUERY_ERROR: "QUERY_ERROR",
               COPY_END: "COPY_END", CLOSE_NAME: "CLOSE_NAME"}

#: Shared entries that carry nothing of their own.
SYNC_ENTRY = Entry(SYNC)
FORWARD_ENTRY = Entry(FORWARD)
UNNAMED_ENTRY = Entry(UNNAMED)
UNNAMED_PARSE_ENTRY = Entry(UNNAMED_PARSE)
SWALLOW_ENTRY = Entry(SWALLOW)
QUERY_ENTRY = Entry(QUERY)
PROBE_ENTRY = Entry(PROBE)
COPY_END_ENTRY = Entry(COPY_END)


class Internal:
    """
    A query the pooler put on the wire itself; its replies never reach a client, except its
    ParameterStatus messages when C{report} is set (the client must learn the values).

    @ivar start_at: how many of the client's ReadyForQuery messages come before this query's
        replies (0 for a query written ahead of the client's own).
    @ivar rows: where its DataRow payloads go, when the pooler wants the answer.
    """

    __slots__ = ("deferred", "error", "start_at", "report", "rows")

    def __init__(self, deferred, start_at: int = 0, report: bool = False, rows=None):
        self.deferred = deferred
        self.error = None
        self.start_at = start_at
        self.report = report
        self.rows = rows


class Link:
    """
    What one server connection owes its current client and what it holds for everyone.

    @ivar pending: Sync/Query/FunctionCall messages sent that PostgreSQL has not answered with
        ReadyForQuery yet.
    @ivar dirty: extended-protocol messages were sent after the last Sync: the server is in the
        middle of something even if its last ReadyForQuery said idle.
    @ivar in_transaction: the last ReadyForQuery said 'T' or 'E'.
    @ivar expect: the L{Entry} queue (only while statements are remapped).
    @ivar statements: the statements this server holds, by server-side name (an LRU).
    @ivar unnamed: the Parse body of the unnamed statement this server holds (the very bytes
        object a client sent, so identity tells whose), None when it holds none of ours.
    @ivar replies: ReadyForQuery messages of clients' seen so far; orders internal queries.
    @ivar internal: queries of the pooler's own whose replies are still to come.
    @ivar tainted: the replies stopped matching what was sent; this server must be closed
        when its client is done with it.
    """

    __slots__ = ("pending", "dirty", "in_transaction", "expect", "statements", "unnamed",
                 "replies", "internal", "tainted", "track", "status", "copying", "copy_open",
                 "skipping")

    def __init__(self, cache_size: int, track: bool = False):
        #: transaction mode: every message that PostgreSQL answers with ReadyForQuery,
        #: ParseComplete or CloseComplete has an entry, so that the server goes back to the
        #: pool knowing what it owes.
        self.track = track
        self.pending = 0
        self.dirty = False
        self.in_transaction = False
        self.expect: deque = deque()
        self.statements = ServerStatements(cache_size)
        self.unnamed: Optional[bytes] = None
        self.replies = 0
        self.internal: deque = deque()
        self.tainted: Optional[str] = None
        #: the status byte of the last ReadyForQuery (I, T or E).
        self.status = 73
        #: PostgreSQL is in COPY FROM STDIN: it ignores the client's Syncs until CopyDone.
        self.copying = False
        #: a COPY FROM STDIN began and no ReadyForQuery came since: after a CopyDone of a COPY
        #: run by Execute, PostgreSQL still waits for a Sync, its implicit transaction open
        #: (a server left so would commit the rows with its next client's query).
        self.copy_open = False
        #: an error put PostgreSQL in skip-to-Sync before the client sent its Sync: what the
        #: client sends until then gets no replies, only the Sync its ReadyForQuery.
        self.skipping = False

    # -- what the server may be given to someone else with ------------------------------------

    def settled(self) -> bool:
        """Every reply is in and nothing is half done: the next client may have this server."""
        return (not self.pending and not self.dirty and not self.expect and not self.internal
                and self.tainted is None and not self.copying and not self.copy_open)

    def taint(self, why: str) -> None:
        if self.tainted is None:
            self.tainted = why

    # -- COPY FROM STDIN --------------------------------------------------------------------

    def copy_in(self) -> None:
        """
        A CopyInResponse: the Syncs the client sent after the COPY started, up to its
        CopyDone/CopyFail, are ignored by PostgreSQL and get no ReadyForQuery.
        """
        self.copy_open = True
        if not self.track:
            return
        expect = self.expect
        keep = []
        if expect and expect[0].kind == QUERY:
            keep.append(expect.popleft())  # COPY by a simple Query: that Query's own entry
        while expect:
            entry = expect[0]
            if entry.kind == COPY_END:
                expect.popleft()
                break
            if entry.kind != SYNC:
                self.taint("%r sent during COPY FROM STDIN" % (entry,))
                break
            expect.popleft()
            self.pending -= 1
        else:
            self.copying = True
        expect.extendleft(reversed(keep))

    def copy_done(self) -> None:
        """The client sent CopyDone or CopyFail."""
        if self.copying:
            self.copying = False
        elif self.track:
            self.expect.append(COPY_END_ENTRY)

    # -- replies ---------------------------------------------------------------------------

    def ready(self) -> None:
        """A ReadyForQuery for a client's Sync/Query/FunctionCall."""
        expect = self.expect
        if expect:
            kind = expect[0].kind
            while kind == COPY_END:  # a CopyDone outside any COPY: PostgreSQL ignores it
                expect.popleft()
                kind = expect[0].kind if expect else SYNC
            if kind != SYNC and kind != QUERY:
                if not self.skipping:
                    # Messages before this Sync got no reply, yet no error came: they never
                    # reached PostgreSQL as we think.
                    self.taint("ReadyForQuery before the replies to %r" % (list(expect)[:4],))
                self.skipped()
            if expect:
                expect.popleft()
        self.skipping = False
        self.copy_open = False
        if self.pending <= 0:
            self.taint("ReadyForQuery nobody asked for")
        else:
            self.pending -= 1
        self.replies += 1

    def complete(self) -> Optional[bytes]:
        """
        A ParseComplete or CloseComplete: the bytes to send instead of it (b"" swallows), or
        None to pass it on.
        """
        expect = self.expect
        if not expect:
            if self.track:
                self.taint("ParseComplete/CloseComplete nobody asked for")
            return None
        entry = expect[0]
        kind = entry.kind
        while kind == COPY_END:
            expect.popleft()
            if not expect:
                return self.complete()
            entry = expect[0]
            kind = entry.kind
        if kind == SYNC or kind == QUERY or kind == FAKE_ERROR or kind == QUERY_ERROR:
            self.taint("ParseComplete/CloseComplete where %r was expected" % (entry,))
            return None
        expect.popleft()
        if kind == PARSED:
            entry.stmt.parsed = True
            return None
        if kind == INJECTED:
            entry.stmt.parsed = True
            return b""
        if kind == AS_PARSE:
            return PARSE_COMPLETE
        if kind == SWALLOW or kind == CLOSED or kind == UNNAMED or kind == PROBE:
            return b""
        return None  # FORWARD, UNNAMED_PARSE, CLOSE_NAME

    def error(self, message: bytes, names: Optional[Dict[bytes, Statement]]) -> Optional[bytes]:
        """
        An ErrorResponse (the whole message) while entries are queued: PostgreSQL now skips
        to the next Sync.  Returns the bytes to send instead, or None to send it as is.

        @param names: the current client's statement map, to speak of its names, never ours.
        """
        expect = self.expect
        replace = None
        while expect and expect[0].kind == COPY_END:
            expect.popleft()
        if names and PREFIX in message:
            # Speak of the client's names (before the skip below forgets the failed ones).
            body = message[5:]
            for cname, stmt in names.items():
                if stmt.name in body:
                    body = body.replace(stmt.name, cname)
            replace = b"E" + _uint32.pack(len(body) + 4) + body
        if expect:
            entry = expect[0]
            kind = entry.kind
            if kind == QUERY_ERROR:
                expect.popleft()
                if b"C26000\x00" in message:
                    # (Not another error PostgreSQL gives first, as in a failed transaction.)
                    replace = entry.reply
            elif kind == QUERY:
                stmt = entry.stmt
                if stmt is not None:
                    if entry.names is not None:
                        self._unprepare(entry)
                    else:
                        # An SQL EXECUTE: its statement's name, whatever the client's map
                        # says now (a PREPARE before it in the same pipeline failed).
                        body = (replace or message)[5:].replace(stmt.name, entry.name)
                        replace = b"E" + _uint32.pack(len(body) + 4) + body
            else:
                if kind == FAKE_ERROR:
                    replace = expect[0].reply
                self.skipped()
        elif self.track:
            # An extended-protocol message failed and its Sync is not sent yet.
            self.dirty = True
            self.skipping = True
        return replace

    def skipped(self) -> None:
        """
        Drop the entries up to the next Sync, undoing what their messages were to create: the
        client's name (L{PARSED}, L{AS_PARSE}) and this server's copy (L{PARSED},
        L{INJECTED}); a skipped Close of an evicted statement leaves it on the server; a
        skipped Query gets no ReadyForQuery.  Until a Sync is sent the server stays in that
        state, so it is dirty.
        """
        expect = self.expect
        while expect and expect[0].kind != SYNC:
            entry = expect.popleft()
            kind = entry.kind
            if kind == QUERY:
                self.pending -= 1
                if entry.names is not None and entry.stmt is not None:
                    self._unprepare(entry)
            elif kind == CLOSE_NAME:
                if entry.name not in entry.names:
                    entry.names[entry.name] = entry.stmt
            elif kind == PARSED or kind == AS_PARSE:
                names = entry.names
                if names is not None and names.get(entry.name) is entry.stmt:
                    del names[entry.name]
                if kind == PARSED:
                    self.statements.discard(entry.stmt.name)
            elif kind == INJECTED:
                self.statements.discard(entry.stmt.name)
            elif kind == CLOSED:
                self.statements.restore(entry.name)
            elif kind == UNNAMED or kind == UNNAMED_PARSE:
                self.unnamed = None
        if not expect:
            self.dirty = True
            self.skipping = True

    def _unprepare(self, entry: Entry) -> None:
        """An SQL PREPARE (a L{QUERY} entry with a statement) failed or was skipped."""
        names = entry.names
        if names.get(entry.name) is entry.stmt:
            del names[entry.name]
        self.statements.discard(entry.stmt.name)
        entry.stmt = None

    # -- the pooler's own queries -----------------------------------------------------------

    def add_internal(self, deferred=None, after: int = 0, report: bool = False,
                     rows=None) -> Internal:
        """
        Register a query of the pooler's own that goes after C{after} more of the client's
        ReadyForQuery-producing messages (0: ahead of everything not yet answered).
        """
        entry = Internal(deferred, self.replies + self.pending + after, report, rows)
        self.internal.append(entry)
        self.unnamed = None  # a simple query replaces the unnamed statement
        return entry

    def lost(self, err) -> None:
        """The connection is gone: fail the pooler's own queries still waiting."""
        internal, self.internal = self.internal, deque()
        for entry in internal:
            if entry.deferred is not None:
                entry.deferred.callback(err)
        self.expect.clear()
