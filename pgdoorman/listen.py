"""
LISTEN/NOTIFY in transaction pooling mode without pinning: one server connection per pool
listens for all of the pool's clients and hands each NotificationResponse to the clients that
asked for its channel.

A client's lone C{LISTEN ch}, C{UNLISTEN ch} or C{UNLISTEN *} (one simple Query holding just
that statement, sent while the client holds no server and has no deferred BEGIN) is answered
by the pooler (L{answer}, called from L{pgdoorman.relay.Relay.dataReceived}).  A LISTEN is
run, as the client wrote it, on the pool's L{Listener} connection, and the client gets
PostgreSQL's own reply (CommandComplete, a NOTICE about a truncated name, or the syntax
error) once that LISTEN completed: a NOTIFY committed after the client's LISTEN returned
reaches it, as in PostgreSQL.  The client's next bytes wait meanwhile.  asyncpg's
extended-protocol LISTEN (a named statement) is answered the same way (L{answer_extended}).
Anything else (a LISTEN inside a transaction block, in a multi-statement query, an unnamed
extended-protocol one) goes to a server as before (L{pgdoorman.sessionstate} pins such
clients).

Differences from PostgreSQL, documented in docs/listen.md:
 - the listener connection is one more server connection per pool that has listening clients,
   outside pool_size and max_db_connections (it never serves a query);
 - pg_listening_channels() run by a client shows its current server's channels (none), not
   the client's;
 - the pid of a NotificationResponse is the notifying PostgreSQL backend's, never the pid of
   the client's BackendKeyData (a client's own NOTIFY comes back with its server's pid);
 - when the listener connection is lost (server restart), the clients keep their connections:
   the listener reconnects, LISTENs every channel again, and each subscribed client gets a
   NOTICE (SQLSTATE 01000) that notifications sent in between may have been lost.

Notifications are written to a client only between its messages: at once when it holds no
server (nothing else writes to it then but whole messages of the pooler's own) or when its
server owes it nothing and is outside a transaction; otherwise they wait in
C{client.notifies} until the server goes back to the pool (as PostgreSQL delivers them only
between transactions).
"""

from __future__ import annotations

import re
import struct
from collections import deque
from typing import Dict, List, Optional

from twisted.internet import reactor
from twisted.logger import Logger

from pgdoorman.protocol import errors, messages
from pgdoorman.protocol.framing import FramingError, MessageBuffer

__all__ = ["Listener", "answer", "parse", "quote"]

#: PostgreSQL's identifier limit: names are cut to NAMEDATALEN - 1 bytes.
NAMEDATALEN = 64

_SPACE = rb"[ \t\n\r\f\v]"
#: One LISTEN/UNLISTEN statement and nothing else (a trailing ";" allowed), as scan.l reads an
#: identifier: unquoted (folded to lower case) or "quoted" ("" inside is one "), or UNLISTEN *.
_STATEMENT = re.compile(
    rb"(listen|unlisten)" + _SPACE + rb"+"
    rb"(?:([A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)|\"((?:[^\"]|\"\")*)\"|(\*))"
    + _SPACE + rb"*(?:;" + _SPACE + rb"*)?\Z", re.I | re.S)

LISTEN = "LISTEN"
UNLISTEN = "UNLISTEN"

_IDLE_REPLY = messages.ready_for_query(b"I")
_UNLISTEN_REPLY = messages.command_complete(UNLISTEN) + _IDLE_REPLY
_NOTIFICATION = ord("A")
_Z = messages.READY_FOR_QUERY
_E = messages.ERROR_RESPONSE
_FORWARD = frozenset((ord("C"), _E, messages.NOTICE_RESPONSE))
_DATA_ROW = ord("D")
_pid = struct.Struct("!i").unpack_from

#: Words PostgreSQL does not take as an unquoted channel name (reserved and type/function
#: name keywords): asked of the server once per listener, see L{Listener.reserved}.
_KEYWORDS_SQL = ("SELECT word FROM pg_catalog.pg_get_keywords() "
                 "WHERE catcode IN ('R', 'T')")

#: Bytes of notifications written to a client and not yet read by it (Twisted's buffer for
#: its socket) beyond which it is closed; notifications held for a client in a transaction,
#: by count.
MAX_UNREAD = 32 * 1024 * 1024
MAX_HELD = 100000

#: Reconnect delays of a lost listener, in seconds (the last one repeats).
RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)


def truncate(name: bytes) -> bytes:
    """Cut a name to NAMEDATALEN - 1 bytes on a UTF-8 character boundary (pg_mbcliplen)."""
    if len(name) < NAMEDATALEN:
        return name
    i = NAMEDATALEN - 1
    while i > 0 and (name[i] & 0xC0) == 0x80:
        i -= 1
    return name[:i]


def parse(query: bytes):
    """
    C{(kind, channel, word)} for a lone LISTEN/UNLISTEN statement, else None.

    C{channel} is the name as PostgreSQL stores it (unquoted names folded to lower case,
    quotes removed, cut to 63 bytes), None for C{UNLISTEN *}; C{word} is the unquoted name
    as written (it may be a keyword PostgreSQL refuses), None when quoted.
    """
    m = _STATEMENT.match(query)
    if m is None:
        return None
    kind = LISTEN if len(m.group(1)) == 6 else UNLISTEN
    word, quoted, star = m.group(2), m.group(3), m.group(4)
    if star is not None:
        if kind == LISTEN:
            return None
        return kind, None, None
    if word is not None:
        return kind, truncate(word.lower()), word  # bytes.lower(): ASCII only, as in UTF-8
    if not quoted:
        return None  # "": PostgreSQL's "zero-length delimited identifier" error
    return kind, truncate(quoted.replace(b'""', b'"')), None


def quote(channel: bytes) -> bytes:
    """The channel as a quoted identifier."""
    return b'"' + channel.replace(b'"', b'""') + b'"'


def answer(client, data: bytes) -> bool:
    """
    Answer C{data} (one whole simple Query of a client holding no server) if it is a lone
    LISTEN/UNLISTEN (see the module docstring); False leaves it to a server.
    """
    parsed = parse(data[5:-1])
    if parsed is None:
        return False
    kind, channel, word = parsed
    pool = client.pool
    listener = pool.listener
    if kind == LISTEN:
        if listener is None:
            listener = pool.listener = Listener(pool)
        client.waiting = True  # what the client sends next waits for this answer
        listener.listen(client, channel, data)
        return True
    if word is not None and (listener is None or listener.reserved is None
                             or word.lower() in listener.reserved):
        return False  # maybe a keyword: PostgreSQL says what it makes of it
    client.query_count += 1
    if listener is not None:
        listener.unlisten(client, channel)
    client.send(_UNLISTEN_REPLY)
    return True


_unpack_len = struct.Struct("!I").unpack_from
_unpack_short = struct.Struct("!H").unpack_from
_PARSE = messages.PARSE
_BIND = messages.BIND
_DESCRIBE = messages.DESCRIBE
_CLOSE = messages.CLOSE
_EXECUTE = messages.EXECUTE
_SYNC = messages.SYNC
_FLUSH = messages.FLUSH
#: The first six bytes, lower-cased, of a LISTEN or UNLISTEN (the relay checks them too).
WORDS = (b"listen", b"unlist")
_PARSE_COMPLETE = messages.message(b"1")
_BIND_COMPLETE = messages.message(b"2")
_CLOSE_COMPLETE = messages.message(b"3")
_NO_PARAMETERS = messages.message(b"t", b"\x00\x00")
_NO_DATA = messages.message(b"n")


def _split(data: bytes):
    """The (code, body start, end) of each whole message in C{data}, None unless all whole."""
    out = []
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < 5:
            return None
        end = pos + 1 + _unpack_len(data, pos + 1)[0]
        if end > n or end < pos + 5:
            return None
        out.append((data[pos], pos + 5, end))
        pos = end
    return out


def _cstr(data: bytes, pos: int, end: int):
    """(string, position after its NUL) or (None, end)."""
    nul = data.find(b"\x00", pos, end)
    if nul < 0:
        return None, end
    return data[pos:nul], nul + 1


def answer_extended(client, data: bytes) -> bool:
    """
    The extended-protocol LISTEN/UNLISTEN of asyncpg's add_listener/remove_listener, answered
    like a lone simple-query one (L{answer}): a named statement whose text is one
    LISTEN/UNLISTEN is kept by the client (C{client.listen_statements}), never Parsed on a
    server, and its Bind/Execute run it on the listener.  Only batches made of nothing but
    Parse of such a statement, Describe, Bind, Execute and Close of one, Flush and Sync are
    answered; anything else (False) goes to a server as usual.
    """
    if client.relay.deferred_begin is not None:
        return False  # inside a transaction block: the server's
    # A look at the first message before any work: most batches are not ours.
    statements = client.listen_statements
    first = data[0]
    n = len(data)
    if first == _PARSE:
        nul = data.find(b"\x00", 5, 5 + 256)
        if nul < 0 or data[nul + 1:nul + 7].lower() not in WORDS:
            return False
    elif first == _BIND:
        nul = data.find(b"\x00", 5, n)
        end = data.find(b"\x00", nul + 1, n)
        if nul < 0 or end < 0 or data[nul + 1:end] not in statements:
            return False
    elif first == _CLOSE:
        end = data.find(b"\x00", 6, n)
        if data[5:6] != b"S" or end < 0 or data[6:end] not in statements:
            return False
    msgs = _split(data)
    if msgs is None:
        return False
    pool = client.pool
    listener = pool.listener
    new = {}
    portal = None
    run = None  # the one LISTEN this batch may Execute: (statement, replies before it)
    out = []
    for i, (code, pos, end) in enumerate(msgs):
        if run is not None and code != _SYNC and code != _FLUSH:
            return False  # only Sync/Flush after the Execute of a LISTEN
        if code == _PARSE:
            name, at = _cstr(data, pos, end)
            text, at = _cstr(data, at, end)
            if not name or text is None or end - at != 2 or data[at:end] != b"\x00\x00" \
                    or text[:6].lower() not in WORDS:
                return False  # unnamed, or with parameter types, or not LISTEN/UNLISTEN
            if name in new or (statements and name in statements) or \
                    (client.remap is not None and name in client.remap.names):
                return False
            parsed = parse(text)
            if parsed is None:
                return False
            kind, channel, word = parsed
            if kind == UNLISTEN and word is not None and (
                    listener is None or listener.reserved is None
                    or word.lower() in listener.reserved):
                return False
            new[name] = (kind, channel, text)
            out.append(_PARSE_COMPLETE)
        elif code == _DESCRIBE:
            what, name = data[pos:pos + 1], data[pos + 1:end - 1]
            if what == b"S" and (name in new or statements and name in statements):
                out.append(_NO_PARAMETERS + _NO_DATA)
            elif what == b"P" and name == b"" and portal is not None:
                out.append(_NO_DATA)
            else:
                return False
        elif code == _BIND:
            name_p, at = _cstr(data, pos, end)
            name, at = _cstr(data, at, end)
            stmt = new.get(name) or (statements.get(name) if statements else None)
            if name_p != b"" or stmt is None or end - at < 6:
                return False  # a named portal: not ours
            at += 2 + 2 * _unpack_short(data, at)[0]  # parameter formats
            if at + 2 > end or _unpack_short(data, at)[0]:
                return False  # LISTEN takes no parameters
            portal = stmt
            out.append(_BIND_COMPLETE)
        elif code == _EXECUTE:
            if portal is None or end - pos != 5 or data[pos]:
                return False  # a named portal
            kind, channel, text = portal
            if kind == LISTEN:
                if run is not None:
                    return False  # one LISTEN a batch
                run = (portal, b"".join(out), i)
                out = []
            else:
                out.append(messages.command_complete(UNLISTEN))
            portal = None
        elif code == _CLOSE:
            what, name = data[pos:pos + 1], data[pos + 1:end - 1]
            if what != b"S" or not (name in new or statements and name in statements):
                return False
            out.append(_CLOSE_COMPLETE)
        elif code == _SYNC:
            if i != len(msgs) - 1:
                return False
            out.append(_IDLE_REPLY)
        elif code != _FLUSH:
            return False
    # The whole batch is ours: now do it, in order.
    if statements is None:
        statements = client.listen_statements = {}
    stop = run[2] if run is not None else len(msgs)
    for code, pos, end in msgs[:stop]:
        if code == _PARSE:
            name = data[pos:data.find(b"\x00", pos, end)]
            statements[name] = new[name]
        elif code == _CLOSE:
            statements.pop(data[pos + 1:end - 1], None)
        elif code == _BIND:
            name_p, at = _cstr(data, pos, end)
            name, at = _cstr(data, at, end)
            portal = statements[name]
        elif code == _EXECUTE and listener is not None:
            listener.unlisten(client, portal[1])
    if run is None:
        client.query_count += 1
        client.send(b"".join(out))
        return True
    if listener is None:
        listener = pool.listener = Listener(pool)
    client.waiting = True
    (kind, channel, text), ahead, _ = run
    listener.listen(client, channel, _query(text), ahead, b"".join(out))
    return True


#: In a query that goes to a server: what ends every LISTEN of the session in PostgreSQL.
_ENDS_ALL = re.compile(rb"\bunlisten" + _SPACE + rb"*\*|\bdiscard" + _SPACE + rb"+all\b",
                       re.I)


def seen_on_the_way(client, data: bytes) -> None:
    """
    A listening client's query goes to a server: an C{UNLISTEN *} or C{DISCARD ALL} in it
    (asyncpg's connection reset, "...; UNLISTEN *; RESET ALL;") ends its subscriptions too,
    as it would end the LISTENs of a PostgreSQL session.
    """
    if _ENDS_ALL.search(data, 5) is not None:
        listener = client.pool.listener
        if listener is not None:
            listener.unlisten(client, None)


def adopt(client, channels, statements) -> None:
    """
    A client handed over by the previous process (zero-downtime upgrade): it listens to
    C{channels} here too, and its LISTEN/UNLISTEN statements are still its own.
    """
    if statements:
        client.listen_statements = {}
        for name, text in statements.items():
            parsed = parse(text)
            if parsed is not None:
                client.listen_statements[name] = (parsed[0], parsed[1], text)
    if channels:
        pool = client.pool
        if pool.listener is None:
            pool.listener = Listener(pool)
        pool.listener.adopt(client, channels)


def deliver(client, message: bytes) -> None:
    """
    Write C{message} (an asynchronous message: NotificationResponse, NoticeResponse) to
    C{client} now if nothing else is being written to it, else keep it for later.
    """
    if client.closed:
        return
    server = client.server
    if server is not None:
        link = server.link
        if link.pending > 0 or link.in_transaction or link.dirty or link.copying or \
                not server._scanner.between_messages:
            if client.notifies is None:
                client.notifies = [message]
            elif len(client.notifies) < MAX_HELD:
                client.notifies.append(message)
            else:
                _unread(client, "%d notifications held during its transaction" % MAX_HELD)
            return
    queued = client.notifies
    if queued:
        client.notifies = None
        message = b"".join(queued) + message
    t = client.transport
    if len(getattr(t, "dataBuffer", b"")) + getattr(t, "_tempDataLen", 0) > MAX_UNREAD:
        _unread(client, "more than %d MB of notifications not read" % (MAX_UNREAD >> 20))
        return
    client.send(message)


def _unread(client, why: str) -> None:
    """
    A client that does not read its notifications (PostgreSQL's own queue is 8 GB, ours is
    this process's memory): it goes, with PostgreSQL's error for a full queue.
    """
    if client.server is not None:
        # Mid-reply: no error message fits in between; the connection just ends.
        client.log.info("client {peer}: closed ({why})", peer=client.peer, why=why)
        client.close()
        return
    client.fatal(errors.PgError("54000", "too many notifications not read by this client"),
                 why)


def flush(client) -> None:
    """The client's server went back to the pool: write the notifications kept for it."""
    queued = client.notifies
    client.notifies = None
    if queued and not client.closed:
        client.send(b"".join(queued))


class _Command:
    """A query on the listener connection and what to do with its replies."""

    __slots__ = ("sql", "done", "client", "channel", "replies", "failed", "rows")

    def __init__(self, sql: bytes, done, client=None, channel: Optional[bytes] = None):
        self.sql = sql
        self.done = done
        self.client = client
        self.channel = channel
        self.replies: List[bytes] = []
        self.failed = False
        self.rows: List[Optional[str]] = []


class _Owner:
    """
    The pool as the listener's L{pgdoorman.server.ServerConnection} sees it: everything is
    the pool's but the news of its loss, which is the listener's (it is not one of the pool's
    servers).
    """

    def __init__(self, pool, listener):
        self._pool = pool
        self._listener = listener

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def server_lost(self, server) -> None:
        self._listener.lost(server)


class Listener:
    """
    One pool's listening server connection and who listens to what.

    @ivar subscribers: channel (bytes, as PostgreSQL names it) -> the clients listening.
    @ivar reserved: the keywords PostgreSQL refuses as an unquoted channel name, once the
        first connection asked for them (an unquoted UNLISTEN goes to a server until then).
    """

    log = Logger()

    def __init__(self, pool):
        self.pool = pool
        self.subscribers: Dict[bytes, set] = {}
        self.reserved: Optional[frozenset] = None
        self.server = None
        #: the server LISTENs these (a LISTEN that completed; UNLISTEN sent).
        self._listening: set = set()
        self._connecting = False
        self._sent: deque = deque()
        self._queued: List[_Command] = []
        self._buffer: Optional[MessageBuffer] = None
        self._retry = None
        self._failures = 0
        self._tell_lost = False

    # -- what clients ask ----------------------------------------------------------------

    def listen(self, client, channel: bytes, query: bytes, ahead: bytes = b"",
               tail: bytes = _IDLE_REPLY) -> None:
        """
        Run the client's LISTEN C{query} (a Query message) on the listener; answer the client
        once it is done (C{ahead}, PostgreSQL's replies, C{tail}) and only then read its next
        bytes.
        """
        def done(cmd, err):
            client.query_count += 1
            if client.closed:
                if err is None and not cmd.failed:
                    self._listening.add(channel)
                self._closeIfUnused()
                return
            client.waiting = False
            if err is not None:
                reply = err.to_bytes()
            else:
                reply = b"".join(cmd.replies)
                if not cmd.failed:
                    self._listening.add(channel)
                    self.subscribers.setdefault(channel, set()).add(client)
                    if client.listen_channels is None:
                        client.listen_channels = set()
                    client.listen_channels.add(channel)
            client.send(ahead + reply + tail)
            client.replay_queued()
            if err is not None or cmd.failed:
                self._closeIfUnused()

        self._submit(_Command(query, done, client, channel))

    def unlisten(self, client, channel: Optional[bytes]) -> None:
        """Stop sending C{client} the notifications of C{channel} (None: of every channel)."""
        mine = client.listen_channels
        if not mine:
            return
        for ch in ([channel] if channel is not None else list(mine)):
            if ch in mine:
                mine.discard(ch)
                self._leave(client, ch)
        self._closeIfUnused()

    def drop(self, client) -> None:
        """A client left (or went to another process): it listens to nothing here any more."""
        mine = client.listen_channels
        client.listen_channels = None
        client.notifies = None
        if mine:
            for ch in mine:
                self._leave(client, ch)
            self._closeIfUnused()

    def adopt(self, client, channels) -> None:
        """
        A client handed over by the previous process (zero-downtime upgrade) listened to
        C{channels} there: it does here too, without a word to it.
        """
        if client.listen_channels is None:
            client.listen_channels = set()
        for ch in channels:
            client.listen_channels.add(ch)
            self.subscribers.setdefault(ch, set()).add(client)
            if ch not in self._listening:
                self._listening.add(ch)
                self._submit(self._listenCommand(ch))

    def _listenCommand(self, channel: bytes) -> _Command:
        return _Command(_query(b"LISTEN " + quote(channel)), None)

    def _leave(self, client, channel: bytes) -> None:
        subs = self.subscribers.get(channel)
        if subs is None:
            return
        subs.discard(client)
        if not subs:
            del self.subscribers[channel]
            if channel in self._listening and not self._listenPending(channel):
                # (With a client's LISTEN of it on its way, the server keeps listening: an
                # UNLISTEN sent now would run after that LISTEN and undo it.)
                self._listening.discard(channel)
                if self.server is not None:
                    self._submit(_Command(_query(b"UNLISTEN " + quote(channel)), None))

    def _listenPending(self, channel: bytes) -> bool:
        for cmd in self._sent:
            if cmd.channel == channel:
                return True
        for cmd in self._queued:
            if cmd.channel == channel:
                return True
        return False

    def _closeIfUnused(self) -> None:
        """Nobody listens any more: the listener connection goes."""
        if self.subscribers or self._queued or self._connecting:
            return
        if any(cmd.client is not None for cmd in self._sent):
            return
        retry, self._retry = self._retry, None
        if retry is not None and retry.active():
            retry.cancel()
        self._tell_lost = False
        self._listening.clear()
        server, self.server = self.server, None
        self._sent.clear()
        if server is not None:
            self.log.debug("pool {db}/{user}: listener connection {id} closed (no listeners)",
                           db=self.pool.database, user=self.pool.user, id=server.id)
            server.close()

    # -- the connection ------------------------------------------------------------------

    def _submit(self, cmd: _Command) -> None:
        server = self.server
        if server is not None:
            self._sent.append(cmd)
            server.send(cmd.sql)
            return
        self._queued.append(cmd)
        if not self._connecting and self._retry is None:
            self._connect()

    def _connect(self) -> None:
        from pgdoorman.server import connect_server  # server imports nothing of ours
        self._connecting = True
        self._retry = None
        pool = self.pool
        d = connect_server(_Owner(pool, self), pool.settings)
        d.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, server) -> None:
        self._connecting = False
        self._failures = 0
        self.server = server
        self._buffer = MessageBuffer()
        server.dataReceived = self._data
        pool = self.pool
        self.log.info("pool {db}/{user}: listener connection {id} up (backend pid {pid})",
                      db=pool.database, user=pool.user, id=server.id, pid=server.backend_pid)
        commands = []
        if self.reserved is None:
            commands.append(_Command(_query(_KEYWORDS_SQL.encode()), self._keywords))
        # After a loss: the channels the clients listen to, before anything else; once they
        # are LISTENed again, the clients hear of the gap.
        for ch in self.subscribers:
            self._listening.add(ch)
            commands.append(self._listenCommand(ch))
        if self._tell_lost and commands:
            commands[-1].done = self._lostNotice
        self._tell_lost = False
        queued, self._queued = self._queued, []
        commands.extend(queued)
        for cmd in commands:
            self._sent.append(cmd)
        server.send(b"".join(cmd.sql for cmd in commands))
        if not commands:
            self._closeIfUnused()

    def _connectFailed(self, failure) -> None:
        self._connecting = False
        err = failure.value
        if not isinstance(err, errors.PgError):
            err = errors.PgError(errors.CANNOT_CONNECT_NOW,
                                 "pgdoorman could not connect to the server: %s"
                                 % failure.getErrorMessage())
        pool = self.pool
        self.log.error("pool {db}/{user}: listener connection failed: {error}",
                       db=pool.database, user=pool.user, error=err)
        self._failAll(self._queued, err)
        self._queued = []
        if self.subscribers:
            self._scheduleRetry()

    def _scheduleRetry(self) -> None:
        delay = RETRY_DELAYS[min(self._failures, len(RETRY_DELAYS) - 1)]
        self._failures += 1
        self._retry = reactor.callLater(delay, self._connect)

    def lost(self, server) -> None:
        """The listener connection is gone (a server restart, a terminated backend)."""
        if server is not self.server:
            return
        self.server = None
        self._buffer = None
        self._listening.clear()
        sent, self._sent = list(self._sent), deque()
        self._failAll(sent, errors.PgError(
            errors.CONNECTION_FAILURE, "the server connection that runs LISTEN was lost",
            severity="ERROR"))
        if self.subscribers:
            pool = self.pool
            self.log.warn("pool {db}/{user}: listener connection {id} lost; reconnecting for "
                          "{n} channels", db=pool.database, user=pool.user, id=server.id,
                          n=len(self.subscribers))
            self._tell_lost = True
            self._scheduleRetry()
        else:
            self._closeIfUnused()

    def _failAll(self, commands, err: errors.PgError) -> None:
        err.severity = "ERROR"
        for cmd in commands:
            if cmd.done is not None:
                cmd.done(cmd, err)

    def _data(self, data: bytes) -> None:
        """Replies to the listener's queries, and the notifications."""
        buf = self._buffer
        if buf is None:
            return
        try:
            msgs = buf.feed(data)
        except FramingError as e:
            self.log.error("listener connection: {error}; closing it", error=e)
            self.server.transport.abortConnection()
            return
        for code, payload in msgs:
            if code == _NOTIFICATION:
                self._notify(payload)
                continue
            sent = self._sent
            if not sent:
                continue  # an asynchronous NOTICE or ParameterStatus
            cmd = sent[0]
            if code == _Z:
                sent.popleft()
                if cmd.done is not None:
                    cmd.done(cmd, None)
            elif code in _FORWARD:
                if code == _E:
                    cmd.failed = True
                    if cmd.client is None:
                        self.log.warn("listener: {sql} failed: {error}", sql=cmd.sql[5:-1],
                                      error=errors.PgError.from_fields(
                                          messages.parse_fields(payload)))
                if cmd.client is not None:
                    cmd.replies.append(messages.message(bytes((code,)), payload))
            elif code == _DATA_ROW:
                cmd.rows.extend(messages.parse_data_row(payload))

    def _keywords(self, cmd: _Command, err) -> None:
        if err is None and not cmd.failed:
            self.reserved = frozenset(w.encode() for w in cmd.rows if w)

    def _notify(self, payload: bytes) -> None:
        end = payload.find(b"\x00", 4)
        subs = self.subscribers.get(payload[4:end])
        if not subs:
            return
        message = messages.message(b"A", payload)
        for client in list(subs):
            deliver(client, message)

    def _lostNotice(self, cmd: _Command, err) -> None:
        if err is not None:
            return
        notice = messages.notice_response(
            "WARNING", "01000",
            "pgdoorman's LISTEN connection to the server was lost and is back: "
            "notifications sent meanwhile may have been lost")
        clients = set()
        for subs in self.subscribers.values():
            clients.update(subs)
        for client in clients:
            deliver(client, notice)


def _query(sql: bytes) -> bytes:
    return b"Q" + struct.pack("!I", len(sql) + 5) + sql + b"\x00"
