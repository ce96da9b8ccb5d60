"""
The client side: one application connection to the pooler.

L{ClientConnection} is the Protocol.  Its phases are objects that take turns reading
(L{ClientConnection.enter}): L{pgdoorman.login.Startup} and L{pgdoorman.login.Authentication},
then the admin console (L{pgdoorman.admin.AdminSession}) or L{pgdoorman.relay.Relay}.  The
connection itself holds what every phase shares (the session, the pool, the server it holds,
the bytes waiting for a server) and speaks to the pool: checkout, release, a server lost.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

from twisted.internet import protocol, reactor
from twisted.logger import Logger

from pgdoorman import listen as _listen
from pgdoorman import params as _params
from pgdoorman import sessionstate as _sessionstate
from pgdoorman import sockopts
from pgdoorman.login import ADMIN_DATABASES, Joining, Startup
from pgdoorman.protocol import errors, messages
from pgdoorman.relay import Relay
from pgdoorman.remap import Remapper
from pgdoorman.sendnow import make_sender
from pgdoorman.session import ClientSession

__all__ = ["ADMIN_DATABASES", "ClientConnection", "ClientFactory"]

#: Time allowed from TCP connect to a logged-in client (PostgreSQL's authentication_timeout),
#: when the config has no general.client_login_timeout.
LOGIN_TIMEOUT = 60.0

#: Bytes a client may queue while it waits for a server before we stop reading from it.
MAX_QUEUED = 1024 * 1024


class _Closed:
    """The phase after the end: whatever still arrives is dropped."""

    @staticmethod
    def dataReceived(data: bytes) -> None:
        pass


class ClientConnection(protocol.Protocol):
    """
    One client.  Its session state is in C{self.session}; C{self.server} is the server
    connection it holds right now, if any.

    @ivar waiting: it is in its pool's queue for a server.
    @ivar closed: it is gone or going; nothing more is sent to it.
    @ivar remap: its prepared statements (transaction mode with the cache on), else None.
    @ivar relay: its relay phase, once it joined a pool.
    """

    log = Logger()

    def __init__(self, service):
        self.service = service
        self.session = ClientSession()
        self.pool = None
        self.server = None
        self.params: Dict[str, Optional[str]] = {}
        self.cancel_key = None
        self.wait_started = 0.0
        self.id = service.next_id()
        self.send = None
        self.peer = ""
        self.phase = None
        self.waiting = False
        self.closed = False
        self.remap: Optional[Remapper] = None
        self.relay: Optional[Relay] = None
        #: the client asked for TLS and got it (SSLRequest answered 'S').
        self.tls = False
        #: the peer's IP address (for pg_hba), None for a Unix socket.
        self.peer_host: Optional[str] = None
        #: the client's tracked parameters as its startup packet set them: what RESET
        #: returns to (a server's RESET would return to the server's own startup values).
        self.startup_values: Dict[str, Optional[str]] = {}
        #: the SCRAM ClientKey of this client's login, which lets the pool log in to SCRAM
        #: servers whose secret is all the config holds.
        self.scram_client_key: Optional[bytes] = None
        #: Sync/Query/FunctionCall messages and bytes received from this client, for the stats.
        self.query_count = 0
        self.client_bytes = 0
        #: time.monotonic() of the client's last request that went to a server (SHOW
        #: CLIENTS request_time): the relay's query-start stamp, shared, so no clock read
        #: of its own; 0.0 before the first one.
        self.request_at = 0.0
        #: set before connectionMade to take over a client from the previous process
        #: (zero-downtime upgrade, L{pgdoorman.upgrade}) instead of reading a startup packet.
        self.adopting: Optional[ClientSession] = None
        #: handed to the next process: its connection closes here without a goodbye.
        self.migrated = False
        #: channels it LISTENs through the pool's listener (L{pgdoorman.listen}), and the
        #: notifications waiting for its server to go back to the pool.
        self.listen_channels: Optional[set] = None
        self.notifies: Optional[List[bytes]] = None
        #: its named statements of one LISTEN/UNLISTEN, kept here and never Parsed on a
        #: server (asyncpg's add_listener): name -> (kind, channel, text).
        self.listen_statements: Optional[dict] = None
        self._queued: List[bytes] = []
        self._queued_len = 0
        self._login_timer = None
        self._paused = False

    # -- phases ----------------------------------------------------------------------------

    def enter(self, phase) -> None:
        """
        Make C{phase} the reader of this connection's bytes.  Its C{dataReceived} becomes
        ours directly (no call in between on the relay's path).
        """
        self.phase = phase
        self.dataReceived = phase.dataReceived

    def connectionMade(self):
        if self.adopting is not None:
            self._adopt(self.adopting)
            return
        self._setPeer()
        self.session.connected_at = time.time()
        self.enter(Startup(self))
        general = self.service.config.general
        # From TCP connect to logged in, TLS handshake included: a slow (slowloris) client
        # cannot hold a connection slot longer than this.
        timeout = getattr(general, "client_login_timeout", LOGIN_TIMEOUT)
        if timeout:
            self._login_timer = reactor.callLater(timeout, self._loginTimeout, timeout)
        if general.max_connections and self.factory.connections > general.max_connections:
            self.fatal(errors.PgError(errors.TOO_MANY_CONNECTIONS,
                                      "sorry, too many clients already"),
                       "max_connections (%d) reached" % general.max_connections)

    def _setPeer(self) -> None:
        t = self.transport
        sockopts.apply(t, self.service.config.general)
        peer = t.getPeer()
        self.peer = "%s:%s" % (peer.host, peer.port) if hasattr(peer, "port") else str(
            getattr(peer, "name", "unix"))
        self.peer_host = getattr(peer, "host", None)
        self.session.peer = self.peer
        self.send = make_sender(t, self._backlog)

    def start_tls(self, factory) -> None:
        """Answer an SSLRequest with 'S' and switch the connection to TLS."""
        t = self.transport
        if self.closed or t.disconnected:
            return
        t.write(b"S")  # goes out in the clear, ahead of the handshake
        t.startTLS(factory)
        self.tls = True
        # The transport keeps its type under startTLS: sendnow's direct socket send would
        # bypass the TLS layer, so this client writes through Twisted.
        self.send = t.write

    def fatal(self, err: errors.PgError, why: Optional[str] = None) -> None:
        """Send an error to the client and close; log it once."""
        if self.closed:
            return
        self.service.count_error(err)
        self.log.info("client {peer} ({user}@{db}): {error}{why}", peer=self.peer,
                      user=self.session.user or "-", db=self.session.database or "-",
                      error=err, why=" (%s)" % why if why else "")
        self.closed = True
        self.enter(_Closed)
        self.transport.write(err.to_bytes())
        self.transport.loseConnection()

    def close(self) -> None:
        """Close without a word (CancelRequest connections, Terminate)."""
        self.closed = True
        self.enter(_Closed)
        self.transport.loseConnection()

    def login_done(self) -> None:
        """The login is over (relay or admin console): the login timeout no longer applies."""
        timer, self._login_timer = self._login_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _loginTimeout(self, timeout: float = LOGIN_TIMEOUT):
        self._login_timer = None
        self.fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                  "login not completed within %gs" % timeout),
                   "client_login_timeout")

    # -- after authentication ------------------------------------------------------------------

    def authenticated(self, scram_client_key: Optional[bytes] = None) -> None:
        """The client proved who it is: the admin console, or join the pool."""
        s = self.session
        self.scram_client_key = scram_client_key
        self.send(messages.authentication_ok())
        if s.database in ADMIN_DATABASES:
            self.factory.admin_session(self)
            return
        pool = self.service.get_pool(s.database, s.user)
        self._joinPool(pool, scram_client_key)
        self.enter(Joining(self))
        self.phase.start()

    def _joinPool(self, pool, scram_client_key: Optional[bytes]) -> None:
        """
        Become one of C{pool}'s clients, after a login or when adopted from an older process:
        the pool's mode decides how the relay treats this client.
        """
        self.pool = pool
        if scram_client_key is not None and pool.scram_client_key is None:
            pool.scram_client_key = scram_client_key
        pool.clients += 1
        general = self.service.config.general
        if pool.transaction_mode and pool.settings.prepared_statements_cache_size:
            self.remap = Remapper(pool.statements, general.client_anonymous_prepared_cache_size)
        check = general.pooler_check_query.strip().rstrip(";").strip()
        self.relay = Relay(self, pool.transaction_mode, self.remap,
                           None if check else general.pooler_check_query.encode("utf-8"))
        self.relay.fanout = pool.transaction_mode and general.listen_fanout

    def logged_in(self) -> None:
        """Parameters known: tell the client, register its cancel key, start the relay."""
        s = self.session
        pool = self.pool
        out = []
        for name, value in pool.server_params.items():
            if name in self.params and self.params[name] is not None:
                value = self.params[name]
            out.append(messages.parameter_status(name, value))
        self.cancel_key = s.cancel_key = self.service.register_client(self)
        s.params = self.params
        out.append(messages.backend_key_data(*self.cancel_key))
        out.append(messages.ready_for_query(b"I"))
        self.login_done()
        self.send(b"".join(out))
        self.enter(self.relay)
        if self._queued:
            queued = b"".join(self._queued)
            self._queued = []
            self._queued_len = 0
            self.relay.dataReceived(queued)

    def wait_for_server(self, data: bytes) -> None:
        """C{data} needs a server: queue it and ask the pool for one."""
        self._queued.append(data)
        self._queued_len = len(data)
        self.waiting = True
        self.pool.checkout(self)

    def replay_queued(self) -> None:
        """
        The pooler answered a query itself after a wait (a LISTEN, L{pgdoorman.listen}):
        what the client sent meanwhile is read now.
        """
        self.waiting = False
        queued = self._queued
        self._queued = []
        self._queued_len = 0
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if queued:
            self.relay.dataReceived(b"".join(queued))

    def queue(self, data: bytes) -> None:
        """Bytes that arrive while no server can take them wait their turn, up to a limit."""
        self._queued.append(data)
        self._queued_len += len(data)
        if self._queued_len > MAX_QUEUED:
            self._pauseReading()

    # -- the relay ---------------------------------------------------------------------------

    # -- the pool's side -----------------------------------------------------------------------

    def serverAssigned(self, server) -> None:
        """
        The pool gives us C{server}: bring its parameters in line, replay a deferred BEGIN,
        then send what we queued, all in one write.
        """
        self.waiting = False
        if self.closed:
            self.give_back(server)
            return
        self.server = server
        if isinstance(self.phase, Joining):
            self.phase.serverAssigned(server)
            return
        ahead = None
        if self.params != server.params:
            ahead = server.prepend_internal(_params.sync_sql(self.params, server.params, True))
            server.params.clear()
            server.params.update(self.params)
        relay = self.relay
        if relay.deferred_begin is not None:
            begin = server.prepend_internal_message(relay.deferred_begin)
            ahead = ahead + begin if ahead else begin
            relay.deferred_begin = None
        queued = self._queued
        self._queued = []
        self._queued_len = 0
        relay.process(queued[0] if len(queued) == 1 else b"".join(queued), ahead)
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def serverReleasable(self, server) -> None:
        """The server answered everything we sent and is idle outside a transaction."""
        pool = self.pool
        pool.stats.xact_count += 1
        if pool.transaction_mode and not isinstance(self.phase, Joining) and \
                self.server is server \
                and self.relay.scanner.between_messages:
            self.server = None
            if self.transport.producer is not None:
                self.transport.unregisterProducer()
            server.detach_producer()
            if server.link.settled():
                pool.checkin(server)
            else:
                self._discard(server)
            if self.notifies is not None:
                _listen.flush(self)

    def serverUnavailable(self, err: errors.PgError) -> None:
        """No server could be had (connect failed, query_wait_timeout)."""
        self.waiting = False
        err.severity = "FATAL"
        self.fatal(err)

    def serverLost(self, server) -> None:
        """Our server went away while we held it."""
        self.server = None
        self.fatal(errors.PgError(
            errors.CONNECTION_FAILURE,
            "server connection lost: the PostgreSQL server closed the connection "
            "unexpectedly while serving this client",
            hint="pgdoorman closed this client because its transaction or session on the "
                 "server is gone; reconnect and retry."),
            "server %d lost" % server.id)

    def _discard(self, server) -> None:
        """Close a server nobody else may have (its replies or statements are not known)."""
        why = server.link.tainted or "replies still owed"
        self.log.info("server {id}: closed after client {peer} ({why})", id=server.id,
                      peer=self.peer, why=why)
        if server.client is self:
            server.client = None
        server.close()
        self.pool.server_lost(server)

    def give_back(self, server) -> None:
        """Return a server to the pool after this client, cleaning up what it left."""
        if server.client is not self and server.client is not None:
            return
        if self.server is server:
            self.server = None
        server.detach_producer()
        if server.closing:
            return
        link = server.link
        if not link.settled() or \
                (self.relay is not None and not self.relay.scanner.between_messages):
            # Replies are still on their way, a message is half sent or the record of the
            # server's state is in doubt: nobody else can use this connection safely.
            self._discard(server)
            return
        resets = []
        if link.in_transaction:
            resets.append("ROLLBACK")
        if not self.pool.transaction_mode and self.pool.settings.cleanup_server_connections:
            resets.append("DISCARD ALL")
        elif self.pool.transaction_mode and _sessionstate.cleanup_sql(self):
            resets.append(_sessionstate.cleanup_sql(self))  # it left pinned, or SET unasked
        if not resets:
            self.pool.checkin(server)
            return
        server.client = self  # keep it out of the pool until the reset is done
        pool = self.pool

        def reset(err, remaining):
            if err is not None or server.closing:
                server.close()
                pool.server_lost(server)
                return
            if remaining:
                server.run_internal(remaining[0]).addCallback(reset, remaining[1:])
                return
            link.in_transaction = False
            for k in _params.STARTUP_ONLY:
                server.params[k] = None
            if "DISCARD ALL" in resets:
                _sessionstate.forget(server.params)
                link.statements.clear()
                link.unnamed = None
            if not link.settled():
                self._discard(server)
                return
            pool.checkin(server)

        server.run_internal(resets[0]).addCallback(reset, resets[1:])

    # -- flow control ------------------------------------------------------------------------

    def _backlog(self) -> None:
        """The client reads slower than the server sends: pause the server until it drains."""
        server = self.server
        if server is not None and self.transport.producer is None:
            self.transport.registerProducer(server.transport, True)

    def _pauseReading(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    # -- teardown ----------------------------------------------------------------------------

    def connectionLost(self, reason=protocol.connectionDone):
        self.closed = True
        self.enter(_Closed)
        self.login_done()
        self.factory.connections -= 1
        self.service.unregister_client(self)
        pool = self.pool
        if pool is not None:
            pool.clients -= 1
            if self.waiting:
                pool.cancel_wait(self)
            server = self.server
            if server is not None:
                self.give_back(server)
            if self.listen_channels is not None and pool.listener is not None:
                pool.listener.drop(self)
        if self.service.config.general.log_client_disconnections and self.session.user \
                and not self.migrated:
            self.log.info("client {peer} ({user}@{db}) disconnected", peer=self.peer,
                          user=self.session.user, db=self.session.database)

    # -- zero-downtime upgrade (pgdoorman.upgrade) ---------------------------------------------

    def idle_for_migration(self) -> bool:
        """
        True when this client can be handed to another process right now: logged in to a pool,
        holding no server (so not in a transaction, no COPY, no session-mode server), no
        deferred BEGIN, nothing half-read or queued, nothing left to write, and not TLS (the
        TLS state lives in this process's OpenSSL objects).  Checked between reactor turns,
        so what Twisted has read has been processed.
        """
        t = self.transport
        return (self.relay is not None and self.phase is self.relay and not self.closed
                and self.server is None and not self.waiting
                and self.relay.idle()
                and not self._queued and not self.tls and not self._paused
                and self.cancel_key is not None
                and t is not None and not getattr(t, "dataBuffer", b"")
                and not getattr(t, "_tempDataLen", 0) and t.producer is None)

    def export_state(self) -> ClientSession:
        """The session with everything another process needs to carry on serving the client."""
        s = self.session
        s.params = dict(self.params)
        s.cancel_key = self.cancel_key
        s.startup_values = dict(self.startup_values)
        s.prepared = self.remap.export() if self.remap is not None else {}
        s.scram_client_key = self.scram_client_key
        s.query_count = self.query_count
        s.client_bytes = self.client_bytes
        s.channels = sorted(self.listen_channels) if self.listen_channels else []
        s.listen_statements = {name: st[2] for name, st in self.listen_statements.items()} \
            if self.listen_statements else {}
        return s

    def _adopt(self, s: ClientSession) -> None:
        """
        Carry on serving a client the previous process logged in (C{connectionMade} of an
        adopted socket): same pool, parameters, prepared statements and BackendKeyData; the
        next bytes on the socket are the client's next message.
        """
        self.adopting = None
        self.session = s
        self._setPeer()
        pool = self.service.get_pool(s.database, s.user)
        if pool is None or s.cancel_key is None:
            self.fatal(errors.PgError(
                errors.ADMIN_SHUTDOWN,
                'database "%s" or user "%s" is no longer in the configuration'
                % (s.database, s.user)), "not in the new process's configuration")
            return
        self.scram_client_key = s.scram_client_key
        self._joinPool(pool, s.scram_client_key)
        self.params = dict(s.params)
        s.params = self.params
        self.startup_values = dict(s.startup_values)
        if self.remap is not None:
            self.remap.adopt(s.prepared)
        self.query_count = s.query_count
        self.client_bytes = s.client_bytes
        self.cancel_key = self.service.adopt_client(self, s.cancel_key)
        if self.relay.fanout:
            _listen.adopt(self, s.channels, s.listen_statements)
        self.enter(self.relay)


class ClientFactory(protocol.Factory):
    """
    Accepts clients on the listening port and counts them for max_connections.

    @param admin_session: what an admin console login becomes (L{pgdoorman.admin.AdminSession},
        given by the service: the client side does not import the console).
    """

    noisy = False

    def __init__(self, service, admin_session=None):
        self.service = service
        self.admin_session = admin_session
        self.connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        p = ClientConnection(self.service)
        p.factory = self
        return p
