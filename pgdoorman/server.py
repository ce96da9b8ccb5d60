"""
The server side: one connection from the pooler to PostgreSQL.

L{ServerConnection} logs in (md5, SCRAM-SHA-256 or cleartext), learns the server's parameters
and cancel key, and then relays the server's replies to whichever client holds it.  On the way
it reads only the 5-byte headers, to find where each ReadyForQuery is: that is the moment a
transaction-mode server goes back to the pool.  Queries the pooler runs itself (parameter
synchronisation, the session reset) are written ahead of the client's bytes and their replies
are swallowed here, so they cost no extra round trip.
"""

from __future__ import annotations

import bisect
import os
import struct
import time
from typing import Dict, Optional

from twisted.internet import defer, protocol, reactor
from twisted.logger import Logger
from twisted.python.failure import Failure

from pgdoorman import params as _params
from pgdoorman import sockopts
from pgdoorman import tls as _tls
from pgdoorman.auth import md5 as _md5
from pgdoorman.auth import scram as _scram
from pgdoorman.link import Link
from pgdoorman.protocol import errors, messages
from pgdoorman.protocol.framing import WHOLE, FramingError, MessageBuffer, Scanner
from pgdoorman.sendnow import make_sender

_monotonic = time.monotonic
_bisect = bisect.bisect_left

_Z = messages.READY_FOR_QUERY
_S = messages.PARAMETER_STATUS
_E = messages.ERROR_RESPONSE
_D = ord("D")  # DataRow
_IDLE = ord("I")

#: Messages the relay must read (they are all tiny): ReadyForQuery, ParameterStatus,
#: ErrorResponse, ParseComplete, CloseComplete, CopyInResponse.  Everything else passes
#: through unread.
_G = ord("G")
_INSPECT = frozenset((_Z, _S, _E, ord("1"), ord("3"), _G))
#: While the replies of a query of the pooler's own arrive: every message (they are dropped).
_EVERYTHING = frozenset(range(256))


class ServerConnection(protocol.Protocol):
    """
    One logged-in connection to PostgreSQL, owned by a L{pgdoorman.pool.Pool}.

    @ivar params: the tracked session parameters as this server has them now (see
        L{pgdoorman.params}); compared with a client's on checkout.
    @ivar startup_params: every ParameterStatus the server sent at login, for new clients.
    @ivar link: what this connection owes its client and what it holds (L{Link}); the relay
        state lives there and nowhere else.

    """

    log = Logger()

    def __init__(self, pool, settings, ready: defer.Deferred):
        self.pool = pool
        self.settings = settings
        self._ready = ready
        self.client = None
        self.params: Dict[str, Optional[str]] = {}
        self.startup_params: Dict[str, str] = {}
        self.backend_pid = 0
        self.backend_secret = 0
        self.id = pool.service.next_id()
        self.created = time.monotonic()
        self.last_used = self.created
        #: when the query being answered was sent (or the previous reply came, in a pipeline).
        self.query_start = 0.0
        self.closing = False
        self.connected_ok = False
        self.tls = False
        self.transactions = 0
        #: bytes relayed from PostgreSQL to clients (read by the pool's stats, never reset).
        self.server_bytes = 0
        #: when the current client got this server (pool checkout), 0.0 when idle.
        self.assigned_at = 0.0
        #: RECONNECT or a reload asked to close this server when its client is done.
        self.close_needed = False
        self.link = Link(settings.server_prepared_statements_cache_size or 0,
                         track=settings.pool_mode == "transaction")
        self._scanner = Scanner(self._reply, _INSPECT)
        #: cancel requests sent for this server and not yet through: until they are, it goes
        #: to nobody else (the cancel would land on the next client's query).
        self.cancels = 0
        self.release_after_cancel = False
        self._messages = MessageBuffer()
        self._release = False
        self._scram: Optional[_scram.ScramClient] = None
        self._login_error: Optional[errors.PgError] = None
        self.send = None
        self.peer = ""

    # -- connecting and logging in ---------------------------------------------------------

    def connectionMade(self):
        t = self.transport
        sockopts.apply(t, self.pool.service.config.general)
        peer = t.getPeer()
        self.peer = getattr(peer, "host", None) or str(getattr(peer, "name", ""))
        self.send = make_sender(t, self._backlog)
        if getattr(getattr(self, "factory", None), "tls", None) is not None:
            # PostgreSQL docs 55.2.10 "SSL Session Encryption": ask, then wait for one byte.
            self.dataReceived = self._sslAnswer
            t.write(_SSL_REQUEST)
            return
        self._sendStartup()

    def _sendStartup(self) -> None:
        s = self.settings
        startup = {"user": s.server_username, "database": s.server_database}
        if s.application_name:
            startup["application_name"] = s.application_name
        startup.update(s.startup_parameters or {})
        self.dataReceived = self._loginData
        self.transport.write(messages.startup_message(startup))

    def _sslAnswer(self, data: bytes) -> None:
        """PostgreSQL's one-byte answer to our SSLRequest: 'S' (TLS now) or 'N'."""
        f = self.factory
        answer = data[:1]
        if answer == b"S":
            if len(data) > 1:
                # Bytes after 'S' came in the clear: someone in the middle (CVE-2021-23222).
                self._failLogin(errors.PgError(
                    errors.PROTOCOL_VIOLATION,
                    "server sent unencrypted data after its TLS answer"))
                return
            self.transport.startTLS(f.tls)
            self.tls = True
            # startTLS keeps the transport's type: sendnow's direct socket send would bypass
            # the TLS layer, so TLS servers are written through Twisted.
            self.send = self.transport.write
            self._sendStartup()
        elif answer == b"N":
            if f.tls_mode in ("require", "verify-ca", "verify-full"):
                self._failLogin(errors.PgError(
                    errors.CANNOT_CONNECT_NOW,
                    "server %s does not support TLS and server_tls_mode is %s"
                    % (self.peer, f.tls_mode)))
                return
            self._sendStartup()
            if len(data) > 1:
                self._loginData(data[1:])
        else:
            # An ErrorResponse from a server too old for SSLRequest, or garbage.
            self._failLogin(errors.PgError(
                errors.PROTOCOL_VIOLATION,
                "server answered the TLS request with %r" % (answer,)))

    def _loginData(self, data: bytes) -> None:
        try:
            for code, payload in self._messages.feed(data):
                if self._loginMessage(code, payload):
                    return
        except FramingError as e:
            self._failLogin(errors.PgError(errors.PROTOCOL_VIOLATION,
                                           "server sent an invalid message: %s" % e))
        except errors.PgError as e:
            self._failLogin(e)
        except Exception as e:
            self.log.failure("server {peer}: unexpected reply during login", peer=self.peer)
            self._failLogin(errors.PgError(errors.PROTOCOL_VIOLATION,
                                           "unexpected reply from server during login: %s" % e))

    def _loginMessage(self, code: int, payload: bytes) -> bool:
        """Handle one message during login; True when login is over (either way)."""
        if code == messages.AUTHENTICATION:
            self._authenticate(payload)
        elif code == messages.PARAMETER_STATUS:
            name, value = messages.parse_parameter_status(payload)
            self.startup_params[name] = value
        elif code == messages.BACKEND_KEY_DATA:
            self.backend_pid, self.backend_secret = struct.unpack("!ii", payload[:8])
        elif code == _Z:
            self.params = _params.from_server(self.startup_params)
            self.connected_ok = True
            self.dataReceived = self._relayData
            rest = self._messages.take()
            self._messages = None
            if rest:
                self._relayData(rest)
            d, self._ready = self._ready, None
            d.callback(self)
            return True
        elif code == _E:
            self._failLogin(self._loginFailure(messages.parse_fields(payload)))
            return True
        # NoticeResponse and NegotiateProtocolVersion during login need nothing from us.
        return False

    def _authenticate(self, payload: bytes) -> None:
        (kind,) = struct.unpack_from("!i", payload)
        s = self.settings
        if kind == messages.AUTH_OK:
            return
        secret = s.server_password
        if kind == messages.AUTH_MD5:
            if secret is None and s.client_password and _is_md5(s.client_password):
                # The md5 hash is all md5 authentication needs (PgBouncer does the same).
                secret = s.client_password
            if secret is None or _is_scram(secret):
                raise self._noPassword("md5")
            self.transport.write(messages.password_message(
                _md5.md5_response(secret, s.server_username, payload[4:8]) + b"\x00"))
        elif kind == messages.AUTH_SASL:
            mechanisms = messages.parse_sasl_mechanisms(payload[4:])
            if _scram.MECHANISM not in mechanisms:
                raise errors.PgError(errors.FEATURE_NOT_SUPPORTED,
                                     "server offers no supported SASL mechanism: %s"
                                     % ", ".join(mechanisms))
            client_key = None
            if secret is None or _is_md5(secret) or _is_scram(secret):
                client_key = self.pool.scram_client_key
                if client_key is None:
                    raise self._noPassword("SCRAM-SHA-256")
                secret = None
            self._scram = _scram.ScramClient(password=secret, client_key=client_key)
            self.transport.write(messages.sasl_initial_response(
                _scram.MECHANISM, self._scram.client_first()))
        elif kind == messages.AUTH_SASL_CONTINUE:
            self.transport.write(messages.password_message(
                self._scram.handle_server_first(payload[4:])))
        elif kind == messages.AUTH_SASL_FINAL:
            self._scram.handle_server_final(payload[4:])
        elif kind == messages.AUTH_CLEARTEXT:
            if secret is None or _is_md5(secret) or _is_scram(secret):
                raise self._noPassword("cleartext password")
            self.transport.write(messages.password_message(secret.encode("utf-8") + b"\x00"))
        else:
            raise errors.PgError(errors.FEATURE_NOT_SUPPORTED,
                                 "server asks for an unsupported authentication method (%d)"
                                 % kind)

    def _noPassword(self, method: str) -> errors.PgError:
        s = self.settings
        return errors.PgError(
            errors.INVALID_PASSWORD,
            'pgdoorman cannot log in to PostgreSQL as "%s": the server asks for %s '
            "authentication and the config has no usable password for it"
            % (s.server_username, method),
            hint="The user's password in the config is a hash (md5 or SCRAM), which only "
                 "serves to check clients: set server_username and server_password for "
                 "this user in pools.%s.users." % self.pool.database)

    def _loginFailure(self, fields: Dict[str, str]) -> errors.PgError:
        err = errors.PgError.from_fields(fields)
        s = self.settings
        if err.sqlstate == errors.INVALID_PASSWORD and s.server_password is None:
            err.hint = ("The user's password in the config is a hash and was used to log in "
                        "to PostgreSQL; set server_username and server_password for this user "
                        "in pools.%s.users." % self.pool.database)
        err.text = "server login failed: " + err.text
        return err

    def _failLogin(self, err: errors.PgError) -> None:
        self._login_error = err
        d, self._ready = self._ready, None
        if d is not None:
            d.errback(err)
        self.closing = True
        self.transport.loseConnection()

    # -- the relay ------------------------------------------------------------------------

    @property
    def statements(self):
        """The statements this server holds (SHOW SERVERS, metrics)."""
        return self.link.statements

    def _relayData(self, data: bytes) -> None:
        """
        Forward the server's bytes to the client; the L{Scanner} hands the few messages that
        matter (L{_INSPECT}) to L{_reply}, the rest passes through in bulk.
        """
        self.server_bytes += len(data)
        try:
            out = self._scanner.feed(data)
        except FramingError as e:
            self.log.error("server {id}: {error}; closing it", id=self.id, error=e)
            self.link.taint(str(e))
            self.transport.abortConnection()
            return
        client = self.client
        if client is not None:
            if out:
                client.send(out)
            if self._release:
                self._release = False
                client.serverReleasable(self)
        else:
            self._release = False

    def _reply(self, code: int, data: bytes, pos: int, end: int, n: int):
        """One inspected message from PostgreSQL (see L{Scanner}): what to pass on."""
        if end > n:
            return WHOLE
        link = self.link
        internal = link.internal
        if internal and internal[0].start_at <= link.replies:
            return self._internalReply(code, data, pos, end, link)
        if code == _Z:
            link.ready()
            status = link.status = data[pos + 5]
            link.in_transaction = status != _IDLE
            # Query latency: from the query's send (or the previous reply, in a pipeline) to
            # its ReadyForQuery; one clock read per query.
            now = _monotonic()
            took = now - self.query_start
            self.query_start = now
            st = self.pool.stats
            st.query_time += took
            h = st.query_hist  # Histogram.observe, in line: once per query
            h.counts[_bisect(h.bounds, took)] += 1
            h.sum += took
            if internal:
                if internal[0].start_at <= link.replies:
                    self._scanner.inspect = _EVERYTHING
            elif link.pending <= 0 and not link.in_transaction and not link.dirty:
                self._release = True
            return None
        if code == _S:
            self._parameterStatus(data, pos, end, self.client)
            return None
        if code == _G:
            link.copy_in()
            return None
        if code == _E:
            if link.track:
                # (With nothing queued, the error is an extended-protocol message's: Bind,
                # Execute and Describe have no entries.  PostgreSQL now skips to a Sync.)
                client = self.client
                return link.error(data[pos:end], client.remap.names
                                  if client is not None and client.remap is not None else None)
            return None
        return link.complete()

    def _internalReply(self, code: int, data: bytes, pos: int, end: int, link: Link):
        """A reply to a query of the pooler's own: dropped, but for reported parameters."""
        internal = link.internal
        entry = internal[0]
        if code == _Z:
            internal.popleft()
            self._internalDone(entry)
            if not internal or internal[0].start_at > link.replies:
                self._scanner.inspect = _INSPECT
            # An internal query after the client's last reply (RESET) is what the release
            # waited for; one ahead of the client's (or with no client: login, session
            # reset) is followed by more, or by nothing.
            if entry.report and not internal and link.pending <= 0 and \
                    not link.in_transaction and not link.dirty and self.client is not None:
                self._release = True
        elif code == _E:
            entry.error = errors.PgError.from_fields(messages.parse_fields(data[pos + 5:end]))
        elif code == _S:
            self._parameterStatus(data, pos, end, self.client if entry.report else None)
            if entry.report:
                return None
        elif code == _D and entry.rows is not None:
            entry.rows.append(data[pos + 5:end])
        return b""

    def _parameterStatus(self, data: bytes, pos: int, end: int, client) -> None:
        name, value = messages.parse_parameter_status(data[pos + 5:end])
        if name in self.params:
            self.params[name] = value
            if client is not None:
                client.params[name] = value

    def _internalDone(self, entry) -> None:
        if entry.error is not None:
            self.log.warn("server {id}: pooler's own query failed: {error}", id=self.id,
                          error=entry.error)
        if entry.deferred is not None:
            entry.deferred.callback(entry.error)

    def _internal(self, deferred=None, after: int = 0, report: bool = False,
                  rows=None) -> None:
        link = self.link
        link.add_internal(deferred, after, report, rows)
        if link.internal[0].start_at <= link.replies:
            self._scanner.inspect = _EVERYTHING

    def prepend_internal(self, sql: str) -> bytes:
        """
        Register an internal query whose replies will be swallowed and return its bytes.

        The caller writes them ahead of the client's own messages, in the same send.
        """
        self._internal()
        return messages.query(sql)

    def prepend_internal_message(self, message: bytes, deferred=None) -> bytes:
        """
        Like L{prepend_internal} for ready-made messages ending in a Query or Sync (a deferred
        BEGIN, a statement created); C{deferred} fires with None or the error.
        """
        self._internal(deferred)
        return message

    def append_internal(self, sql: str, after: int) -> bytes:
        """
        Register an internal query that goes after C{after} more of the client's
        Sync/Query messages, whose ParameterStatus replies the client does see.
        """
        link = self.link
        self._internal(None, after - link.pending, report=True)
        return messages.query(sql)

    def run_internal(self, sql: str, rows=None) -> defer.Deferred:
        """
        Run a query of the pooler's own; fires with None or the L{errors.PgError}.  The
        payloads of its DataRows go to the list C{rows}, if given.
        """
        d = defer.Deferred()
        self._internal(d, rows=rows)
        self.send(messages.query(sql))
        return d

    def _backlog(self) -> None:
        """PostgreSQL reads slower than the client writes (COPY FROM): pause the client."""
        client = self.client
        if client is not None and self.transport.producer is None:
            self.transport.registerProducer(client.transport, True)

    def detach_producer(self) -> None:
        if self.transport.producer is not None:
            self.transport.unregisterProducer()

    # -- cancel and teardown ----------------------------------------------------------------

    def send_cancel(self) -> None:
        """Ask PostgreSQL to cancel what this connection runs, over a new connection."""
        s = self.settings
        f = protocol.ClientFactory()
        f.noisy = False
        payload = messages.cancel_request(self.backend_pid, self.backend_secret)
        server_factory = getattr(self, "factory", None)
        tls = getattr(server_factory, "tls", None) if self.tls else None
        strict = getattr(server_factory, "tls_mode", None) in ("require", "verify-ca",
                                                               "verify-full")
        log, peer = self.log, self.peer

        class _Cancel(protocol.Protocol):
            def connectionMade(self):
                if tls is None:
                    self.transport.write(payload)
                else:
                    # This server was reached over TLS: so is its CancelRequest (PostgreSQL
                    # reads one after an SSLRequest, as libpq 17's PQcancelCreate sends it).
                    self.transport.write(_SSL_REQUEST)

            def dataReceived(self, data):
                if tls is None:
                    return
                answer = data[:1]
                if answer == b"S" and len(data) == 1:
                    self.transport.startTLS(tls)
                    self.transport.write(payload)
                elif answer == b"N" and not strict:
                    self.transport.write(payload)
                else:
                    log.warn("server {peer}: cancel request not sent, TLS answer {answer!r}",
                             peer=peer, answer=data[:16])
                    self.transport.loseConnection()
                self.dataReceived = lambda data: None

        server = self
        self.cancels += 1

        def delivered(*ignored):
            # PostgreSQL has signalled the backend once it closes the cancel connection (or
            # the cancel never got through): the server may go to another client now.
            if f.done:
                return
            f.done = True
            server.cancel_delivered()

        class _Tracked(_Cancel):
            def connectionLost(self, reason=None):
                delivered()

        f.done = False
        f.protocol = _Tracked
        f.clientConnectionFailed = delivered
        connect(s.server_host, s.server_port, f, s.connect_timeout)

    def cancel_delivered(self) -> None:
        """A cancel sent for this server is through; a release that waited for it goes on."""
        self.cancels -= 1
        if not self.cancels and self.release_after_cancel:
            self.release_after_cancel = False
            if self.client is None and not self.closing:
                self.pool.checkin(self)

    def close(self) -> None:
        """Terminate politely; the pool hears of it through connectionLost."""
        if self.closing:
            return
        self.closing = True
        if self.connected_ok:
            self.transport.write(messages.TERMINATE_MESSAGE)
        self.transport.loseConnection()

    def connectionLost(self, reason=protocol.connectionDone):
        self.closing = True
        if self._ready is not None:
            d, self._ready = self._ready, None
            d.errback(errors.PgError(errors.CONNECTION_FAILURE,
                                     "server closed the connection during login"))
        self.link.lost(errors.PgError(errors.CONNECTION_FAILURE, "server connection lost"))
        if self.connected_ok:
            self.pool.server_lost(self)
            client = self.client
            if client is not None:
                self.client = None
                client.serverLost(self)


class ServerConnectionFactory(protocol.ClientFactory):
    """Makes one L{ServerConnection}; its Deferred fires when the login is done."""

    noisy = False

    def __init__(self, pool, settings):
        self.pool = pool
        self.settings = settings
        self.ready = defer.Deferred()

    def buildProtocol(self, addr):
        p = ServerConnection(self.pool, self.settings, self.ready)
        p.factory = self
        return p

    def clientConnectionFailed(self, connector, reason):
        if not self.ready.called:
            s = self.settings
            self.ready.errback(errors.PgError(
                errors.CANNOT_CONNECT_NOW,
                "pgdoorman could not connect to server %s:%s: %s"
                % (s.server_host, s.server_port, reason.getErrorMessage())))


def connect(host: str, port: int, factory, timeout: Optional[float]):
    """Connect over TCP, or over a Unix socket when C{host} is a directory (as libpq does)."""
    if host.startswith("/"):
        return reactor.connectUNIX(os.path.join(host, ".s.PGSQL.%d" % port), factory,
                                   timeout=timeout or 30)
    return reactor.connectTCP(host, port, factory, timeout=timeout or 30)


def connect_server(pool, settings) -> defer.Deferred:
    """
    Open and log in one server connection; fires with the L{ServerConnection}.

    The whole login, not only the TCP connect, must finish within connect_timeout.  With
    server_tls_mode C{allow} (as libpq's sslmode=allow), a plaintext login that PostgreSQL
    refuses with 28000 (its pg_hba wants TLS) is tried once more over TLS.
    """
    try:
        mode, tls = _server_tls(pool, settings)
    except (_tls.TLSConfigError, OSError) as e:
        return defer.fail(_tlsSetupError(settings, e))
    d = defer.Deferred()
    current = []  # the connector of the attempt under way

    def attempt(tls_factory):
        f = ServerConnectionFactory(pool, settings)
        f.tls_mode, f.tls = mode, tls_factory
        current[:] = [connect(settings.server_host, settings.server_port, f,
                              settings.connect_timeout)]
        return f.ready

    def retry(failure):
        err = failure.value
        if (mode != "allow" or tls is not None or d.called or settings.server_host.startswith("/")
                or not isinstance(err, errors.PgError)
                or err.sqlstate != errors.INVALID_AUTHORIZATION):
            return failure
        try:
            retry_tls = _server_tls_factory(pool, settings)
        except (_tls.TLSConfigError, OSError) as e:
            raise _tlsSetupError(settings, e)
        ServerConnection.log.info(
            "server {host}:{port} refused a plaintext login ({error}); retrying with TLS "
            "(server_tls_mode allow)", host=settings.server_host, port=settings.server_port,
            error=err.text)
        return attempt(retry_tls)

    def deliver(result):
        if d.called:
            if isinstance(result, ServerConnection):
                result.close()
        elif isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)

    first = attempt(tls)
    first.addErrback(retry)
    first.addBoth(deliver)
    timeout = settings.connect_timeout
    if timeout:
        def expire():
            if not d.called:
                current[0].disconnect()
                if not d.called:
                    d.errback(errors.PgError(
                        errors.CANNOT_CONNECT_NOW,
                        "pgdoorman could not log in to server %s:%s within connect_timeout "
                        "(%gs)" % (settings.server_host, settings.server_port, timeout)))
        call = reactor.callLater(timeout, expire)

        def done(result):
            if call.active():
                call.cancel()
            return result
        d.addBoth(done)
    return d


def _tlsSetupError(settings, e) -> errors.PgError:
    return errors.PgError(errors.CANNOT_CONNECT_NOW,
                          "pgdoorman cannot set up TLS to server %s:%s: %s"
                          % (settings.server_host, settings.server_port, e))


_SSL_REQUEST = struct.pack("!ii", 8, messages.SSL_REQUEST_CODE)


def _server_tls(pool, settings):
    """
    (server_tls_mode, context factory or None) for a new server connection.  C{disable}
    and C{allow} connect in the clear (C{allow} retries over TLS after a pg_hba refusal,
    see L{connect_server}), as do Unix sockets.
    """
    mode = _server_tls_settings(pool, settings)["server_tls_mode"] or "disable"
    if mode in ("disable", "allow") or settings.server_host.startswith("/"):
        return mode, None
    return mode, _server_tls_factory(pool, settings)


def _server_tls_settings(pool, settings):
    config = pool.service.config
    return _tls.server_settings(config.general, config.pools.get(settings.pool_name))


def _server_tls_factory(pool, settings):
    """The TLS context factory for this server (C{allow}'s retry checks no certificate)."""
    return _tls.server_tls.factory(pool.service.config.general,
                                   _server_tls_settings(pool, settings), settings.server_host)


def _is_md5(s: str) -> bool:
    return len(s) == 35 and s.startswith("md5")


def _is_scram(s: str) -> bool:
    return s.startswith("SCRAM-SHA-256$")
