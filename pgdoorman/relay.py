"""
The relay phase of a client connection: its messages on their way to a server.

L{Relay} reads a logged-in client's bytes.  With a server, a L{Scanner} walks the message
headers and hands the few messages that matter to L{Relay._message}: Sync, Query and
FunctionCall each promise one ReadyForQuery, extended-protocol messages after the last Sync
mean the server is mid-pipeline, Terminate means goodbye, and in transaction mode statement
messages are renamed (L{pgdoorman.remap}).  What the server owes is written on its
L{pgdoorman.link.Link}, which decides when it may go back to the pool.  Without a server, a
lone BEGIN is answered here (deferred BEGIN), and so is a PQprepare of statements the pool
knows; anything else waits while the pool finds a server.
"""

from __future__ import annotations

import struct
import time
from typing import Optional

from pgdoorman import listen as _listen
from pgdoorman import params as _params
from pgdoorman import prepared as _prepared
from pgdoorman import sessionstate as _sessionstate
from pgdoorman.link import FORWARD_ENTRY, PROBE_ENTRY, QUERY_ENTRY, SYNC_ENTRY
from pgdoorman.protocol import errors, messages
from pgdoorman.protocol.framing import STOP, WHOLE, FramingError, Scanner

_unpack_len = struct.Struct("!I").unpack_from
_monotonic = time.monotonic

_QUERY = messages.QUERY
_PARSE = messages.PARSE
_BIND = messages.BIND
_DESCRIBE = messages.DESCRIBE
_CLOSE = messages.CLOSE
_SYNC = messages.SYNC
_FUNCTION_CALL = messages.FUNCTION_CALL
_TERMINATE = messages.TERMINATE
_EXECUTE = messages.EXECUTE
#: Valid messages that need nothing from the relay: COPY data from the client.
_PASS = frozenset((messages.COPY_DATA,))
_COPY_DONE = messages.COPY_DONE
_COPY_FAIL = messages.COPY_FAIL
_FLUSH = messages.FLUSH
#: PostgreSQL's PQ_SMALL_MESSAGE_LIMIT: the most it reads of a Flush, Sync, Close, ...
_SMALL_MESSAGE_LIMIT = 10000
#: Every other message is looked at; unknown codes end the client.
_INSPECT = frozenset(range(256)) - _PASS
#: First bytes of a simple query that may be DEALLOCATE, DISCARD, RESET, PREPARE or
#: (EXPLAIN) EXECUTE, or start with a comment (a PREPARE after one is looked for); or LISTEN,
#: DECLARE: session state, L{pgdoorman.sessionstate}.
_SQL_STATEMENT_FIRST = frozenset(b"dDrRlLpPeE \t\r\n\f\v/-")
#: Third and second bytes of SET and CREATE (TEMP): these need a look too (the third byte
#: first, which leaves SELECT, INSERT, UPDATE, DELETE, BEGIN, COMMIT, WITH on the fast path).
_THIRD = frozenset(b"tTeE")
_SECOND = frozenset(b"eErR")
#: And "SELECT pg_advisory_lock(...)", "SELECT set_config(...)": a "_" at data[14] or [15]
#: (95) sends the query to a look (as it does a few other SELECTs, which only cost the look).
#: Queries up to this size are read whole when they need a look (DEALLOCATE and friends);
#: longer ones pass through as they arrive.
_LOOK_LIMIT = 65536
_IN_TRANSACTION_REPLY = messages.ready_for_query(b"T")
_IDLE_REPLY = messages.ready_for_query(b"I")
_EMPTY_QUERY_REPLY = messages.message(b"I") + _IDLE_REPLY
#: First bytes of a simple query that the pooler may answer alone (BEGIN, START TRANSACTION,
#: the ";" check query); COMMIT/ROLLBACK only matter after a deferred BEGIN.
_MAYBE_ALONE = frozenset(b"bBsS;")
_S = frozenset(b"sS")  # of those, START TRANSACTION (and not SELECT) is the one to look at
_B = frozenset(b"bB")
#: First bytes of a simple query that may be a lone LISTEN/UNLISTEN (L{pgdoorman.listen}).
_L = frozenset(b"lLuU")
_LISTEN_WORDS = _listen.WORDS


class Relay:
    """
    A logged-in client's relay (see the module docstring).

    @ivar remap: the client's prepared statements (transaction mode with the cache on).
    @ivar deferred_begin: a lone BEGIN answered without a server, sent ahead of the next query.
    @ivar terminate: the client said Terminate: close once what came before it is sent.
    @ivar fanout: a lone LISTEN/UNLISTEN is answered by the pool's listener
        (L{pgdoorman.listen}; transaction mode with general.listen_fanout).
    """

    def __init__(self, client, transaction_mode: bool, remap, check_query: Optional[bytes]):
        self.client = client
        self.scanner = Scanner(self._message, _INSPECT)
        self.remap = remap
        self.deferred_begin: Optional[bytes] = None
        self.terminate = False
        self.fanout = False
        #: the client's L{pgdoorman.sessionstate.SessionState}, once it needs one.
        self.sstate = None
        #: the last Parse text L{pgdoorman.sessionstate.parse_seen} found harmless.
        self.clean_parse = None
        self._tx = transaction_mode
        #: only an empty check query (";") has an answer we can give without PostgreSQL.
        self._check_query = check_query

    def idle(self) -> bool:
        """Nothing half-read, no deferred BEGIN, no Terminate pending."""
        return (self.scanner.between_messages and self.deferred_begin is None
                and not self.terminate)

    def dataReceived(self, data: bytes) -> None:
        """
        Bytes from a logged-in client: to its server, or queued while the pool finds one.

        Without a server, a lone BEGIN (and the COMMIT/ROLLBACK right after it) is answered
        here, taking no server at all: deferred BEGIN; so is a PQprepare of statements the
        pool knows.
        """
        client = self.client
        if client.server is not None:
            self.process(data)
            return
        if client.waiting:
            client.queue(data)
            return
        if self._tx and self.scanner.between_messages and len(data) > 5:
            first = data[0]
            if first == _QUERY:
                if (self.deferred_begin is not None or data[5] in _MAYBE_ALONE
                        and (data[5] not in _S or data[5:11].lower() == b"start ")) \
                        and len(data) == 1 + _unpack_len(data, 1)[0] and self._answerAlone(data):
                    return
                # LISTEN/NOTIFY fan-out (pgdoorman.listen): a lone LISTEN/UNLISTEN is the
                # pooler's; an UNLISTEN * on its way to a server ends the subscriptions.
                if data[5] in _L and self.fanout and self.deferred_begin is None and \
                        data[5:11].lower() in _LISTEN_WORDS and \
                        len(data) == 1 + _unpack_len(data, 1)[0] and _listen.answer(client, data):
                    return
                if client.listen_channels:
                    _listen.seen_on_the_way(client, data)
            elif self.fanout and (first == _PARSE and data[5] or client.listen_statements
                                  and (first == _BIND or first == _CLOSE)) and \
                    _listen.answer_extended(client, data):
                return  # asyncpg's add_listener (a LISTEN through the extended protocol)
            if first == _PARSE and self.remap is not None and data[5]:  # a named Parse
                found = self.remap.answer_locally(data)
                if found:
                    client.query_count += 1
                    status = b"T" if self.deferred_begin is not None else b"I"
                    client.send(_prepared.PARSE_COMPLETE * found + messages.ready_for_query(status))
                    return
        client.wait_for_server(data)

    def _answerAlone(self, data: bytes) -> bool:
        """Answer a lone BEGIN, or COMMIT/ROLLBACK after one, without a server."""
        client = self.client
        query = data[5:-1]
        if self.deferred_begin is None:
            if query == self._check_query:
                # pooler_check_query (";" by default): health checks never take a server.
                client.send(_EMPTY_QUERY_REPLY)
                return True
            # Cheap look at the first bytes before any regex: most queries are not BEGIN.
            first = query[0] if query else 0
            if not (first in _B or (first in _S and query[:6].lower() == b"start ")):
                return False
            tag = _prepared.begin_tag(query)
            if tag is None:
                return False
            self.deferred_begin = data
            client.send(messages.message(b"C", tag + b"\x00") + _IN_TRANSACTION_REPLY)
            return True
        tag = _prepared.end_tag(query)
        if tag is None:
            return False
        self.deferred_begin = None
        client.send(messages.message(b"C", tag + b"\x00") + _IDLE_REPLY)
        return True

    def process(self, data: bytes, ahead: Optional[bytes] = None) -> None:
        """
        Send the client's bytes on to C{client.server}, rewritten where needed (see
        L{_message}); C{ahead}: bytes of the pooler's own to send first, in the same write.
        """
        client = self.client
        server = client.server
        n = len(data)
        client.client_bytes += n
        link = server.link
        # (A ';' before the last byte of the text: more than one statement, and a SET, PREPARE
        # or LISTEN after the first one is seen only by the look.)
        if n > 7 and data[0] == _QUERY and n == 1 + _unpack_len(data, 1)[0] and \
                data[5] not in _SQL_STATEMENT_FIRST and \
                (data[7] not in _THIRD or data[6] not in _SECOND) and \
                (n < 16 or data[14] != 95 and data[15] != 95) and not link.dirty and \
                self.scanner.between_messages and data.find(b";", 5, n - 2) < 0 and \
                (self.remap is None or not _prepared.may_drop_statements(data)):
            # The common case, one whole simple Query: no scan, nothing to rewrite.
            if not link.pending:
                server.query_start = client.request_at = _monotonic()
            link.pending += 1
            if self._tx:
                link.expect.append(QUERY_ENTRY)
                link.unnamed = None
            client.query_count += 1
            server.send(ahead + data if ahead else data)
            return
        before = link.pending
        try:
            out = self.scanner.feed(data)
        except FramingError as e:
            client.fatal(errors.PgError(errors.PROTOCOL_VIOLATION, str(e)))
            out = None
        if client.closed and not self.terminate:
            # Ended by what it sent (an unknown message type): none of it goes on, but the
            # pooler's own queries already registered on the link do, to keep it true.
            if ahead:
                server.send(ahead)
            return
        if before == 0 and link.pending:
            server.query_start = client.request_at = _monotonic()
        client.query_count += link.pending - before
        if ahead:
            out = ahead + out if out else ahead
        if out:
            server.send(out)
        if self.terminate:
            client.close()

    def _message(self, code: int, data: bytes, pos: int, end: int, n: int):
        """
        One message from the client, for the L{Scanner}: what to send instead (None: as is).

        In transaction mode with prepared statements on, Parse/Bind/Describe/Close are
        rewritten to the server-side statement names (L{pgdoorman.remap}) and every message
        that PostgreSQL answers with ParseComplete, CloseComplete or ReadyForQuery leaves an
        entry on the server's link.
        """
        client = self.client
        link = client.server.link
        if code == _EXECUTE:
            link.dirty = True
            return None
        remap = self.remap
        if code == _SYNC:
            if link.copying:
                return None  # PostgreSQL ignores a Sync during COPY FROM STDIN
            link.pending += 1
            link.dirty = False
            if self._tx:
                link.expect.append(SYNC_ENTRY)
            return None
        if code == _FLUSH:
            # Drivers send Flush after a Sync too; on its own it starts nothing that would
            # keep the server from going back to the pool.  One with a body is PostgreSQL's
            # ERROR "invalid message format" (pq_getmsgend), after which it skips to the
            # client's Sync, as after a failed Execute: passed on as such, so the client sees
            # exactly PostgreSQL's answer (a transaction block aborted with it), and the
            # server stays with the client until that Sync (a client that leaves before it
            # leaves a dirty server, which nobody else is given).
            if end - pos != 5:
                if end - pos - 5 > _SMALL_MESSAGE_LIMIT:
                    # Past PostgreSQL's limit for a Flush it drops the connection at the
                    # header; ending the client here spares the server.
                    client.fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                                "invalid message length"))
                    return STOP
                link.dirty = True
            return None
        if code == _COPY_DONE or code == _COPY_FAIL:
            link.copy_done()
            return None
        if code == _QUERY:
            return self._query(data, pos, end, n, link)
        if code == _PARSE or code == _BIND or code == _DESCRIBE or code == _CLOSE:
            link.dirty = True
            if code == _PARSE and self._tx:
                if end > n:
                    return WHOLE
                refused = _sessionstate.parse_seen(self, data, pos, end, link)
                if refused is not None:
                    return refused
            if remap is None:
                if self._tx and (code == _PARSE or code == _CLOSE):
                    link.expect.append(FORWARD_ENTRY)
                return None
            if end > n:
                return WHOLE
            try:
                if code == _BIND:
                    return remap.bind(data, pos, end, link)
                if code == _PARSE:
                    return remap.parse(data, pos, end, link)
                if code == _DESCRIBE:
                    return remap.describe(data, pos, end, link)
                return remap.close(data, pos, end, link)
            except (ValueError, IndexError):
                # A name without its NUL, a Bind cut short: PostgreSQL would say the same and
                # close the connection.
                client.fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                          "invalid %s message format" % chr(code)))
                return STOP
        if code == _FUNCTION_CALL:
            if self._tx and link.dirty and end > n:
                return WHOLE
            probe = self._probe(link)
            if self._tx:
                link.expect.append(QUERY_ENTRY)
            link.pending += 1
            link.dirty = False
            return probe + data[pos:end] if probe is not None else None
        if code == _TERMINATE:
            self.terminate = True
            return STOP
        # PostgreSQL would end this connection at the message; sent on, it would end a server
        # that may by then belong to another client.
        client.fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                  "invalid frontend message type %d" % code))
        return STOP

    def _probe(self, link) -> Optional[bytes]:
        """
        A Query or FunctionCall sent in the middle of a pipeline is skipped by PostgreSQL if a
        message before it failed: in transaction mode a probe goes first to tell (see
        L{pgdoorman.link.PROBE}); returns its bytes, or None when none is needed.
        """
        if self._tx and link.dirty:
            link.expect.append(PROBE_ENTRY)
            return _prepared.CLOSE_NOTHING
        return None

    def _query(self, data: bytes, pos: int, end: int, n: int, link):
        """A simple Query: counted; DEALLOCATE, DISCARD and RESET are looked at whole."""
        client = self.client
        replacement = None
        if self._tx:
            entry = QUERY_ENTRY
            remap = self.remap
            look = end - pos <= _LOOK_LIMIT
            if end > n and (look or link.dirty):
                return WHOLE
            probe = self._probe(link)
            if look:
                query = data[pos + 5:end - 1]
                replacement = _sessionstate.query_seen(self, query, link)
                if replacement is not None:
                    pass  # refused (session_state_policy): it never reaches the server
                elif not query or query[0] in _SQL_STATEMENT_FIRST:
                    if client.startup_values:
                        replacement = self._reset(link, query)
                    if replacement is None and remap is not None:
                        replacement = remap.sql(query, link, client.server)
                        if remap.entry is not None:
                            entry, remap.entry = remap.entry, None
                elif remap is not None and _prepared.may_touch_statements(query):
                    link.taint("statements dropped by a query pgdoorman does not parse")
            elif remap is not None and (n <= pos + 5 or data[pos + 5] in b"pP"):
                # A PREPARE too long to map whole: its name reaches this server.
                link.taint("a statement prepared by a query too long to look at")
            link.unnamed = None  # a simple query replaces the unnamed statement
            link.expect.append(entry)
            if probe is not None:
                replacement = probe + (replacement or data[pos:end])
        link.pending += 1
        link.dirty = False
        return replacement

    def _reset(self, link, query: bytes) -> Optional[bytes]:
        """
        RESET of a parameter the client set at startup: PostgreSQL would go back to the
        client's startup value, the shared server goes back to its own; so the RESET is
        followed by a query of ours that sets the startup value again, and the client sees
        its ParameterStatus.  DISCARD ALL resets everything too.
        """
        client = self.client
        text = query.decode("utf-8", "replace")
        name = _params.parse_reset(text)
        if name is None:
            if not _prepared.is_discard_all(query):
                return None
            name = "ALL"
        if name == "ALL":
            values = dict(client.startup_values)
        elif name in client.startup_values:
            values = {name: client.startup_values[name]}
        else:
            return None
        server = client.server
        for k in values:
            if k in _params.STARTUP_ONLY:
                server.params[k] = None
        original = messages.query(text)
        if self.remap is not None and _prepared.is_discard_all(query):
            self.remap.sql(query, link, server)
        return original + server.append_internal(_params.sync_sql(values, {}), link.pending + 1)
