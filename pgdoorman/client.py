"""
The client side: one application connection to the pooler.

L{ClientConnection} reads the startup packet (answering SSLRequest, GSSENCRequest and
CancelRequest), authenticates the client against the configuration (md5 or SCRAM-SHA-256),
tells it the server's parameters and its own cancel key, and then relays its messages to a
server connection from the pool.  In the relay it reads only message headers: Sync, Query and
FunctionCall each promise one ReadyForQuery, extended-protocol messages after the last Sync
mean the server is mid-pipeline, and Terminate means goodbye.  Those few facts are all the
server side needs to know when a transaction-mode server may go back to the pool.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Dict, List, Optional

from twisted.internet import protocol, reactor
from twisted.logger import Logger

from pgdoorman import params as _params
from pgdoorman import sockopts
from pgdoorman import prepared as _prepared
from pgdoorman import tls as _tls
from pgdoorman.auth import hba as _hba
from pgdoorman.auth import jwt as _jwt
from pgdoorman.auth import md5 as _md5
from pgdoorman.auth import pam as _pam
from pgdoorman.auth import query as _auth_query
from pgdoorman.auth import scram as _scram
from pgdoorman.protocol import errors, messages
from pgdoorman.sendnow import make_sender
from pgdoorman.session import ClientSession

_uint32 = struct.Struct("!I")
_unpack_len = _uint32.unpack_from
_monotonic = time.monotonic
_int32 = struct.Struct("!i")

# Frontend codes by what they mean for the server's state.
_SYNCS = frozenset((messages.SYNC, messages.QUERY, messages.FUNCTION_CALL))
# Flush is not among them: drivers (psycopg's pipeline) send it after a Sync too, and on its
# own it starts nothing on the server that would keep it from going back to the pool.
_EXTENDED = frozenset((messages.PARSE, messages.BIND, messages.EXECUTE, messages.DESCRIBE,
                       messages.CLOSE))
_TERMINATE = messages.TERMINATE
# Valid messages that need nothing from the scan: COPY data from the client, and Flush.
_COPY = frozenset((messages.COPY_DATA, messages.COPY_DONE, messages.COPY_FAIL, messages.FLUSH))
_QUERY = messages.QUERY
_PARSE = messages.PARSE
_BIND = messages.BIND
_CLOSE = messages.CLOSE
_STATEMENT_MESSAGES = frozenset((messages.PARSE, messages.BIND, messages.DESCRIBE,
                                 messages.CLOSE))
_KIND_STATEMENT = ord("S")
#: First bytes of a simple query that may be DEALLOCATE or DISCARD.
_SQL_STATEMENT_FIRST = frozenset(b"dDrR \t\r\n")
_IN_TRANSACTION_REPLY = messages.ready_for_query(b"T")
_IDLE_REPLY = messages.ready_for_query(b"I")
_EMPTY_QUERY_REPLY = messages.message(b"I") + _IDLE_REPLY
#: First bytes of a simple query that the pooler may answer alone (BEGIN, START TRANSACTION,
#: the ";" check query); COMMIT/ROLLBACK only matter after a deferred BEGIN.
_MAYBE_ALONE = frozenset(b"bBsS;")

#: Virtual databases of the admin console.
ADMIN_DATABASES = ("pgdoorman", "pgbouncer")

#: Time allowed from TCP connect to a logged-in client (PostgreSQL's authentication_timeout),
#: when the config has no general.client_login_timeout.
LOGIN_TIMEOUT = 60.0

#: Bytes a client may queue while it waits for a server before we stop reading from it.
MAX_QUEUED = 1024 * 1024

#: PostgreSQL refuses any message over 1 GB (MaxAllocSize); so do we, before it reaches a server.
MAX_MESSAGE = 0x3FFFFFFF

_scram_secrets: Dict[str, _scram.ScramSecret] = {}


def _scram_secret(password: str) -> _scram.ScramSecret:
    """
    The SCRAM secret for a configured password; derived once per plaintext password, since
    4096 rounds of PBKDF2 per login would be the most expensive thing the pooler does.
    """
    secret = _scram_secrets.get(password)
    if secret is None:
        if password.startswith("SCRAM-SHA-256$"):
            secret = _scram.parse_scram_secret(password)
        else:
            secret = _scram.secret_from_password(password)
        _scram_secrets[password] = secret
    return secret


class ClientConnection(protocol.Protocol):
    """
    One client.  Its session state is in C{self.session}; C{self.server} is the server
    connection it holds right now, if any.
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
        self._buf = b""
        self._head = b""
        self._remain = 0
        self._dirty = False
        self._queued: List[bytes] = []
        self._queued_len = 0
        self._waiting = False
        self._login_pending = False
        self._wanted: Dict[str, str] = {}
        self._auth = None
        self._closed = False
        self._login_timer = None
        self._paused = False
        self._terminate = False
        self.pool_key_hint = None
        #: the client asked for TLS and got it (SSLRequest answered 'S').
        self.tls = False
        #: the peer's IP address (for pg_hba), None for a Unix socket.
        self.peer_host: Optional[str] = None
        #: the pg_hba rule that let this client in, if rules are configured.
        self._hba_rule: Optional[_hba.Rule] = None
        #: client statement name -> L{prepared.Statement}, in transaction mode.
        self.prepared: Dict[bytes, _prepared.Statement] = {}
        #: the Parse body of the client's unnamed statement (transaction mode).
        self._unnamed: Optional[bytes] = None
        #: a lone BEGIN answered without a server, sent ahead of the next query.
        self._deferred_begin: Optional[bytes] = None
        #: the client's tracked parameters as its startup packet set them: what RESET
        #: returns to (a server's RESET would return to the server's own startup values).
        self.startup_values: Dict[str, Optional[str]] = {}
        #: transaction mode with prepared statements: statement messages are rewritten.
        self._ps = False
        self._tx = False
        self._check_query: Optional[bytes] = None
        #: Sync/Query/FunctionCall messages and bytes received from this client, for the stats.
        self.query_count = 0
        self.client_bytes = 0
        #: set before connectionMade to take over a client from the previous process
        #: (zero-downtime upgrade, L{pgdoorman.upgrade}) instead of reading a startup packet.
        self.adopting: Optional[ClientSession] = None
        #: handed to the next process: its connection closes here without a goodbye.
        self.migrated = False

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self):
        if self.adopting is not None:
            self._adopt(self.adopting)
            return
        t = self.transport
        sockopts.apply(t, self.service.config.general)
        peer = t.getPeer()
        self.peer = "%s:%s" % (peer.host, peer.port) if hasattr(peer, "port") else str(
            getattr(peer, "name", "unix"))
        self.peer_host = getattr(peer, "host", None)
        self.session.peer = self.peer
        self.session.connected_at = time.time()
        self.send = make_sender(t, self._backlog)
        self.dataReceived = self._startupData
        general = self.service.config.general
        # From TCP connect to logged in, TLS handshake included: a slow (slowloris) client
        # cannot hold a connection slot longer than this.
        timeout = getattr(general, "client_login_timeout", LOGIN_TIMEOUT)
        if timeout:
            self._login_timer = reactor.callLater(timeout, self._loginTimeout, timeout)
        if general.max_connections and self.factory.connections > general.max_connections:
            self._fatal(errors.PgError(errors.TOO_MANY_CONNECTIONS,
                                       "sorry, too many clients already"),
                        "max_connections (%d) reached" % general.max_connections)

    def _fatal(self, err: errors.PgError, why: Optional[str] = None) -> None:
        """Send an error to the client and close; log it once."""
        if self._closed:
            return
        self.service.count_error(err)
        self.log.info("client {peer} ({user}@{db}): {error}{why}", peer=self.peer,
                      user=self.session.user or "-", db=self.session.database or "-",
                      error=err, why=" (%s)" % why if why else "")
        self._closed = True
        self.dataReceived = self._ignore
        self.transport.write(err.to_bytes())
        self.transport.loseConnection()

    def _ignore(self, data: bytes) -> None:
        pass

    def _loginTimeout(self, timeout: float = LOGIN_TIMEOUT):
        self._login_timer = None
        self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                   "login not completed within %gs" % timeout),
                    "client_login_timeout")

    # -- startup packet ----------------------------------------------------------------------

    def _startupData(self, data: bytes) -> None:
        buf = self._buf + data
        while len(buf) >= 4:
            (length,) = _int32.unpack_from(buf)
            if length < 8 or length > messages.MAX_STARTUP_PACKET:
                self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                           "invalid length of startup packet"),
                            "length %d" % length)
                return
            if len(buf) < length:
                break
            packet, buf = buf[:length], buf[length:]
            (code,) = _int32.unpack_from(packet, 4)
            if code == messages.SSL_REQUEST_CODE:
                if self.tls or length != 8 or buf:
                    # Bytes behind an SSLRequest would be read in the clear although the
                    # client meant them to be encrypted (PostgreSQL refuses them too,
                    # CVE-2021-23214); a second SSLRequest inside TLS is nonsense.
                    self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                               "received unencrypted data after SSL request"
                                               if buf else "invalid SSL request"))
                    return
                mode, factory = _tls.client_tls.for_config(self.service.config.general)
                if factory is None:
                    self.transport.write(b"N")
                    continue
                self.transport.write(b"S")  # goes out in the clear, ahead of the handshake
                self.transport.startTLS(factory)
                self.tls = True
                # The transport keeps its type under startTLS: sendnow's direct socket send
                # would bypass the TLS layer, so this client writes through Twisted.
                self.send = self.transport.write
                continue
            if code == messages.GSSENC_REQUEST_CODE:
                # GSSAPI encryption is not offered: 'N' and the client goes on (or asks
                # for TLS next, as libpq does).
                self.transport.write(b"N")
                continue
            if code == messages.CANCEL_REQUEST_CODE:
                if length == 16:
                    pid, secret = struct.unpack_from("!ii", packet, 8)
                    self.service.cancel(pid, secret)
                self._closed = True
                self.transport.loseConnection()
                return
            self._buf = b""
            self._startup(code, packet[8:], buf)
            return
        self._buf = buf

    def _startup(self, version: int, payload: bytes, rest: bytes) -> None:
        major, minor = version >> 16, version & 0xFFFF
        if major != 3:
            self._fatal(errors.PgError(
                errors.FEATURE_NOT_SUPPORTED,
                "unsupported frontend protocol %d.%d: server supports 3.0 to 3.0"
                % (major, minor)))
            return
        try:
            startup = messages.parse_startup_params(payload)
        except ValueError as e:
            self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION, str(e)))
            return
        if minor > 0 or any(k.startswith("_pq_.") for k in startup):
            # A newer libpq asks for 3.x or protocol options: say we speak 3.0 with none.
            self.transport.write(messages.negotiate_protocol_version(
                0, [k for k in startup if k.startswith("_pq_.")]))
            for k in [k for k in startup if k.startswith("_pq_.")]:
                del startup[k]
        user = startup.get("user")
        if not user:
            self._fatal(errors.PgError(errors.INVALID_AUTHORIZATION,
                                       "no PostgreSQL user name specified in startup packet"))
            return
        if startup.get("replication", "false").lower() not in ("false", "0", "off", "no"):
            self._fatal(errors.PgError(errors.FEATURE_NOT_SUPPORTED,
                                       "replication connections are not supported by "
                                       "pgdoorman"))
            return
        database = startup.get("database") or user
        s = self.session
        s.user, s.database, s.startup = user, database, startup
        if self.service.config.general.log_client_connections:
            self.log.info("client {peer} connecting as {user} to {db}{tls}", peer=self.peer,
                          user=user, db=database, tls=" over TLS" if self.tls else "")
        if not self._accessAllowed(user, database):
            return
        if database in ADMIN_DATABASES:
            general = self.service.config.general
            if user != general.admin_username:
                self._fatal(errors.PgError(
                    errors.INVALID_AUTHORIZATION,
                    'user "%s" is not allowed to use the admin console "%s" (only the user set '
                    "in general.admin_username is)" % (user, database)), "not the admin user")
                return
            self._startAuth(general.admin_password)  # then _authenticated hands over to admin
            if rest:
                self.dataReceived(rest)
            return
        pcfg = self.service.config.pools.get(database)
        if pcfg is None:
            self._fatal(errors.PgError(errors.INVALID_CATALOG_NAME,
                                       'database "%s" does not exist' % database),
                        "no pool of that name in the config")
            return
        ucfg = pcfg.user(user)
        if ucfg is None and pcfg.auth_query is not None:
            # Not listed: the pool's auth_query looks the user up, then calls _startAuth.
            _auth_query.start_login(self, pcfg, user, rest)
            return
        if ucfg is None:
            self._fatal(errors.PgError(errors.INVALID_PASSWORD,
                                       'password authentication failed for user "%s"' % user),
                        'no user "%s" in pool "%s"' % (user, database))
            return
        self._startAuth(ucfg.password, ucfg.auth_pam_service)
        if rest:
            self.dataReceived(rest)

    # -- authentication ----------------------------------------------------------------------

    def _accessAllowed(self, user: str, database: str) -> bool:
        """
        tls_mode and pg_hba/hba say whether this client may try to log in at all; the rule
        that matched (kept in C{_hba_rule}) picks the method.  Refusals use PostgreSQL's
        words (28000).
        """
        general = self.service.config.general
        mode = _tls.client_mode(general)
        if mode in ("require", "verify-full") and not self.tls:
            self._fatal(errors.PgError(
                errors.INVALID_AUTHORIZATION,
                "TLS required: pgdoorman accepts only encrypted connections",
                hint="Connect with sslmode=require (general.tls_mode is %s)." % mode),
                "client did not ask for TLS")
            return False
        try:
            rules = _hba.rules_for(general)
        except (_hba.HbaError, ValueError) as e:
            self._fatal(errors.PgError(errors.INVALID_AUTHORIZATION,
                                       "pgdoorman's access rules cannot be read"), str(e))
            return False
        if rules is None:
            return True
        host = self.peer_host
        rule = rules.match(self.tls, host, database, user)
        if rule is None or rule.method == "reject":
            self._fatal(errors.PgError(errors.INVALID_AUTHORIZATION,
                                       _hba.refusal(rule, host or "[local]", user, database,
                                                    self.tls)),
                        "no matching pg_hba rule" if rule is None
                        else "pg_hba line %d rejects" % rule.lineno)
            return False
        self._hba_rule = rule
        return True

    def _startAuth(self, password: Optional[str], pam_service: Optional[str] = None) -> None:
        """
        Ask for the credential the rule and the user's config call for: nothing (trust),
        a client certificate (cert), a cleartext password (password, pam, jwt), md5 or
        SCRAM-SHA-256 (by the configured secret, as PostgreSQL picks for md5 rules).
        """
        self.dataReceived = self._authData
        rule = self._hba_rule
        method = rule.method if rule is not None else _hba.ANY
        user = self.session.user
        failed = errors.PgError(errors.INVALID_PASSWORD,
                                'password authentication failed for user "%s"' % user)
        if method == "trust":
            self._authenticated()
            return
        if method == "cert":
            name = _tls.peer_certificate_subject(self.transport) if self.tls else None
            if name is not None and name == user:
                self._authenticated()
            else:
                self._fatal(errors.PgError(
                    errors.INVALID_AUTHORIZATION,
                    'certificate authentication failed for user "%s"' % user),
                    "client certificate CN %r" % (name,))
            return
        if method != _hba.ANY and method not in _hba.SUPPORTED:
            self._fatal(errors.PgError(
                errors.INVALID_AUTHORIZATION,
                'authentication method "%s" is not supported by pgdoorman' % method),
                "pg_hba line %d" % rule.lineno)
            return
        if method == "pam" and not pam_service:
            pam_service = rule.options.get("pamservice") or _pam.DEFAULT_SERVICE
        if pam_service:
            # PAM wins over a static password (PgDoorman's dispatch order).
            self._auth = ("pam", pam_service, 0)
            self.transport.write(messages.authentication(messages.AUTH_CLEARTEXT))
            return
        if password is None:
            if method == _hba.ANY:
                self._authenticated()
            else:
                self._fatal(failed, "pg_hba asks for %s and the user has no password" % method)
            return
        if _jwt.is_jwt_password(password):
            self._auth = ("jwt", password, 0)
            self.transport.write(messages.authentication(messages.AUTH_CLEARTEXT))
            return
        if method == "jwt":
            self._fatal(failed, "pg_hba asks for jwt and the user's password is not "
                                "jwt-pkey-fpath:")
            return
        if method == "password":
            self._auth = ("password", password, 0)
            self.transport.write(messages.authentication(messages.AUTH_CLEARTEXT))
            return
        if _md5.is_md5_hash(password):
            if method == "scram-sha-256":
                self._fatal(failed, "pg_hba asks for scram-sha-256 and the user's password "
                                    "is an md5 hash")
                return
            salt = os.urandom(4)
            self._auth = ("md5", password, salt)
            self.transport.write(messages.authentication_md5(salt))
        else:
            try:
                server = _scram.ScramServer(_scram_secret(password),
                                            user=self.session.user)
            except ValueError as e:
                self._fatal(errors.PgError(errors.INVALID_PASSWORD,
                                           'password authentication failed for user "%s"'
                                           % self.session.user), "bad secret in config: %s" % e)
                return
            self._auth = ("scram", server, 0)
            self.transport.write(messages.authentication_sasl([_scram.MECHANISM]))

    def _authData(self, data: bytes) -> None:
        try:
            msgs, self._buf = messages.split_messages(self._buf + data)
        except ValueError as e:
            self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION, str(e)))
            return
        if len(self._buf) > 65536:
            self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                       "authentication message too long"))
            return
        for i, (code, payload) in enumerate(msgs):
            if self._auth is not None and self._auth[0] == "waiting":
                # A PAM check is running: keep what follows for after it.
                rest = b"".join(messages.message(bytes([c]), p) for c, p in msgs[i:])
                self._buf = rest + self._buf
                return
            if self.dataReceived != self._authData:
                # Authenticated: anything after the last auth message is the next phase's.
                rest = b"".join(messages.message(bytes([c]), p) for c, p in msgs[i:])
                self._buf, buf = b"", self._buf
                self.dataReceived(rest + buf)
                return
            if code != messages.PASSWORD:
                self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                           "expected password response, got message type %r"
                                           % chr(code)))
                return
            self._authMessage(payload)
        if self.dataReceived != self._authData and self._buf:
            buf, self._buf = self._buf, b""
            self.dataReceived(buf)

    def _authMessage(self, payload: bytes) -> None:
        kind, state, step = self._auth
        user = self.session.user
        failed = errors.PgError(errors.INVALID_PASSWORD,
                                'password authentication failed for user "%s"' % user)
        if kind == "md5":
            if _md5.md5_verify(state, user, step, payload):
                self._authenticated()
            else:
                self._fatal(failed, "wrong password (md5)")
            return
        if kind in ("password", "jwt", "pam"):
            self._cleartextPassword(kind, state, payload, failed)
            return
        try:
            if step == 0:
                mechanism, first = messages.parse_sasl_initial_response(payload)
                if mechanism != _scram.MECHANISM:
                    self._fatal(errors.PgError(
                        errors.PROTOCOL_VIOLATION,
                        "client selected an invalid SASL authentication mechanism"))
                    return
                self.transport.write(messages.authentication_sasl_continue(
                    state.handle_client_first(first)))
                self._auth = (kind, state, 1)
            else:
                final = state.handle_client_final(payload)
                self.pool_key_hint = state.client_key
                self.transport.write(messages.authentication_sasl_final(final))
                self._authenticated()
        except _scram.AuthFailed:
            self._fatal(failed, "wrong password (scram)")
        except (_scram.ScramError, ValueError) as e:
            self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                       getattr(e, "message", str(e))))

    def _cleartextPassword(self, kind: str, state: str, payload: bytes,
                           failed: errors.PgError) -> None:
        """A PasswordMessage for the password, jwt and pam methods; never logged."""
        user = self.session.user
        if not payload.endswith(b"\x00") or b"\x00" in payload[:-1]:
            self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION, "invalid password packet"))
            return
        try:
            given = payload[:-1].decode("utf-8")
        except UnicodeDecodeError:
            self._fatal(failed, "password is not UTF-8 (%s)" % kind)
            return
        if not given:
            self._fatal(failed, "empty password (%s)" % kind)
            return
        if kind == "jwt":
            why = _jwt.verify(state, user, given)
            if why is None:
                self._authenticated()
            else:
                self._fatal(failed, "JWT rejected: %s" % why)
            return
        if kind == "password":
            ok, client_key = _hba.password_matches(state, user, given)
            if ok:
                self.pool_key_hint = client_key
                self._authenticated()
            else:
                self._fatal(failed, "wrong password (password)")
            return
        self._auth = ("waiting", None, 0)

        def checked(result):
            if self._closed:
                return
            ok, reason = result
            self._auth = None
            if not ok:
                self._fatal(failed, "PAM service %r refused: %s" % (state, reason))
                return
            self._authenticated()
            if self._buf and not self._closed:
                buf, self._buf = self._buf, b""
                self.dataReceived(buf)

        def broken(failure):
            self._fatal(failed, "PAM error: %s" % failure.getErrorMessage())

        _pam.authenticate_deferred(state, user, given).addCallbacks(checked, broken)

    def _authenticated(self) -> None:
        """The client proved who it is: join the pool and learn the server's parameters."""
        s = self.session
        self.transport.write(messages.authentication_ok())
        if s.database in ADMIN_DATABASES:
            from pgdoorman.admin import AdminSession
            AdminSession(self)
            return
        self.dataReceived = self._queueData
        pool = self.service.get_pool(s.database, s.user)
        self._joinPool(pool, self.pool_key_hint)
        wanted: Dict[str, str] = {}
        startup = dict(s.startup)
        startup.update(_params.parse_options(startup.get("options", "")))
        for name, value in startup.items():
            canonical = _params.CANONICAL.get(name.lower())
            if canonical is not None:
                wanted[canonical] = value
        self._wanted = wanted
        if pool.default_params is None or self._needsServerForParams():
            self._login_pending = True
            self._waiting = True
            pool.checkout(self)
        else:
            self.params = self._paramsFromDefaults()
            self.startup_values = {k: self.params[k] for k in wanted}
            self._finishLogin()

    def _joinPool(self, pool, scram_client_key: Optional[bytes]) -> None:
        """
        Become one of C{pool}'s clients, after a login or when adopted from an older process:
        the pool's mode decides how the relay treats this client.
        """
        self.pool = pool
        if scram_client_key is not None and pool.scram_client_key is None:
            pool.scram_client_key = scram_client_key
        pool.clients += 1
        self._tx = pool.transaction_mode
        self._ps = self._tx and bool(pool.settings.prepared_statements_cache_size)
        general = self.service.config.general
        # Only an empty check query (";") has an answer we can give without PostgreSQL.
        check = general.pooler_check_query.strip().rstrip(";").strip()
        self._check_query = None if check else general.pooler_check_query.encode("utf-8")

    def _needsServerForParams(self) -> bool:
        """
        A reported parameter whose value differs from the pool's default must be SET on a
        server once, so that we learn PostgreSQL's spelling of it ("utf8" is "UTF8").
        """
        defaults = self.pool.default_params
        for name, value in self._wanted.items():
            if name in _params.REPORTED:
                have = defaults.get(name)
                if have is None or have.lower() != value.lower():
                    return True
        return False

    def _paramsFromDefaults(self) -> Dict[str, Optional[str]]:
        p = dict(self.pool.default_params)
        for name, value in self._wanted.items():
            if name in _params.STARTUP_ONLY:
                p[name] = value
        return p

    def _loginWithServer(self, server) -> None:
        """Learn the server's spelling of the client's startup parameters, then go on."""
        self.params = self._paramsFromDefaults()
        sql = _params.sync_sql({k: v for k, v in self._wanted.items()
                                if k in _params.STARTUP_ONLY or
                                (server.params.get(k) or "").lower() != v.lower()},
                               server.params)

        def done(err):
            if self._closed:
                self._giveBack(server)
                return
            if err is not None:
                self._giveBack(server)
                err.severity = "FATAL"
                self._fatal(err, "startup parameter rejected by the server")
                return
            for k in self._wanted:
                if k in _params.REPORTED:
                    self.params[k] = server.params.get(k)
            for k in _params.STARTUP_ONLY:
                server.params[k] = self.params[k]
            self.startup_values = {k: self.params[k] for k in self._wanted}
            self._login_pending = False
            if self.pool.transaction_mode:
                self._giveBack(server)
            self._finishLogin()

        if sql:
            server.run_internal(sql).addCallback(done)
        else:
            done(None)

    def _finishLogin(self) -> None:
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
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None
        self.transport.write(b"".join(out))
        self.dataReceived = self._relayData
        if self._queued:
            queued = b"".join(self._queued)
            self._queued = []
            self._queued_len = 0
            self._relayData(queued)

    def _queueData(self, data: bytes) -> None:
        """Bytes that arrive before login is complete (a pipelining client) wait their turn."""
        self._queued.append(data)
        self._queued_len += len(data)
        if self._queued_len > MAX_QUEUED:
            self._pauseReading()

    # -- the relay ---------------------------------------------------------------------------

    def _relayData(self, data: bytes) -> None:
        """
        Bytes from a logged-in client: to its server, or queued while the pool finds one.

        Without a server, a lone BEGIN (and the COMMIT/ROLLBACK right after it) is answered
        here, taking no server at all: deferred BEGIN.
        """
        if self.server is not None:
            self._process(data)
            return
        if self._waiting:
            self._queued.append(data)
            self._queued_len += len(data)
            if self._queued_len > MAX_QUEUED:
                self._pauseReading()
            return
        if self._tx and len(data) > 5 and data[0] == _QUERY and \
                (data[5] in _MAYBE_ALONE or self._deferred_begin is not None) \
                and not self._head and not self._remain and \
                len(data) == 1 + _unpack_len(data, 1)[0] and self._answerAlone(data):
            return
        if self._ps and data[0] == _PARSE and not self._head and not self._remain and \
                self._answerParses(data):
            return
        self._queued.append(data)
        self._queued_len = len(data)
        self._waiting = True
        self.pool.checkout(self)

    def _answerParses(self, data: bytes) -> bool:
        """
        Named Parses and a Sync, nothing else (libpq's PQprepare), of statements that some
        server has already parsed: remember them and answer ParseComplete and ReadyForQuery
        without a server; they are Parsed on a server before their first Bind, as always.
        Without this, pgbench -M prepared deadlocks on a small pool: PQprepare blocks its
        thread while the thread's other clients hold every server inside BEGIN...END.
        """
        n = len(data)
        pos = 0
        found = []
        names = set()
        known = self.pool.statements.statements
        while True:
            if n - pos < 5:
                return False
            code = data[pos]
            end = pos + 1 + _unpack_len(data, pos + 1)[0]
            if end > n or end < pos + 5:
                return False
            if code == messages.SYNC:
                if end != n or not found:
                    return False
                break
            if code != _PARSE:
                return False
            nul = data.find(b"\x00", pos + 5, end)
            if nul <= pos + 5:
                return False  # the unnamed statement, or malformed: the usual path
            name = data[pos + 5:nul]
            if name in self.prepared or name in names:
                return False  # 42P05: PostgreSQL must say it, in order
            stmt = known.get(_prepared.server_name(data[nul + 1:end]))
            if stmt is None or not stmt.parsed:
                return False
            names.add(name)
            found.append((name, stmt))
            pos = end
        for name, stmt in found:
            self.prepared[name] = stmt
        self.pool.statements.hits += len(found)
        self.query_count += 1
        status = b"T" if self._deferred_begin is not None else b"I"
        self.send(_prepared.PARSE_COMPLETE * len(found) + messages.ready_for_query(status))
        return True

    def _answerAlone(self, data: bytes) -> bool:
        """Answer a lone BEGIN, or COMMIT/ROLLBACK after one, without a server."""
        query = data[5:-1]
        if self._deferred_begin is None:
            if query == self._check_query:
                # pooler_check_query (";" by default): health checks never take a server.
                self.send(_EMPTY_QUERY_REPLY)
                return True
            # Cheap look at the first bytes before any regex: most queries are not BEGIN.
            first = query[:1]
            if not (first in b"bB" or (first in b"sS" and query[:6].lower() == b"start ")):
                return False
            tag = _prepared.begin_tag(query)
            if tag is None:
                return False
            self._deferred_begin = data
            self.send(messages.message(b"C", tag + b"\x00") + _IN_TRANSACTION_REPLY)
            return True
        tag = _prepared.end_tag(query)
        if tag is None:
            return False
        self._deferred_begin = None
        self.send(messages.message(b"C", tag + b"\x00") + _IDLE_REPLY)
        return True

    def _process(self, data: bytes, out: Optional[list] = None) -> None:
        """
        Scan message headers and send the bytes on in bulk to C{self.server}.

        In transaction mode with prepared statements on, Parse/Bind/Describe/Close are
        rewritten to the server-side statement names (L{pgdoorman.prepared}) and every message
        that PostgreSQL answers with ParseComplete, CloseComplete or ReadyForQuery leaves an
        entry on the server's C{expect} queue.
        """
        server = self.server
        n = len(data)
        self.client_bytes += n
        if out is None and n > 5 and not self._head and not self._remain and \
                data[0] == _QUERY and n == 1 + _unpack_len(data, 1)[0] and \
                data[5] not in _SQL_STATEMENT_FIRST:
            # The common case, one whole simple Query: no loop, nothing to rewrite.
            if not server.pending:
                server.query_start = _monotonic()
            server.pending += 1
            server.dirty = self._dirty = False
            if self._ps:
                server.expect.append(_prepared.SYNC_ENTRY)
                server.unnamed = None
            self.query_count += 1
            server.send(data)
            return
        if self._head:
            data = self._head + data
            self._head = b""
            n = len(data)
        pos = self._remain
        syncs = 0
        dirty = self._dirty
        ps = self._ps
        tx = self._tx
        expect = server.expect
        start = 0
        while pos < n:
            if n - pos < 5:
                self._head = data[pos:]
                n = pos
                break
            code = data[pos]
            length = _unpack_len(data, pos + 1)[0]
            if length < 4 or length > MAX_MESSAGE:
                self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                           "invalid message length %d" % length))
                return
            end = pos + 1 + length
            if code in _SYNCS:
                syncs += 1
                dirty = False
                if tx:
                    if code == _QUERY:
                        server.unnamed = None  # a simple query replaces the unnamed statement
                    if code == _QUERY and (pos + 5 >= n or
                                           data[pos + 5] in _SQL_STATEMENT_FIRST):
                        # Its text may be DEALLOCATE/DISCARD/RESET: wait for all of it (or,
                        # with only the header here, for its first letter).
                        if end > n:
                            self._head = data[pos:]
                            n = pos
                            syncs -= 1
                            break
                        replacement = self._statementQuery(server, data[pos + 5:end - 1],
                                                           expect, syncs - 1)
                        if replacement is not None:
                            if out is None:
                                out = []
                            if pos > start:
                                out.append(data[start:pos])
                            out.append(replacement)
                            start = end
                    if ps:
                        expect.append(_prepared.SYNC_ENTRY)
            elif code in _EXTENDED:
                dirty = True
                if ps and code in _STATEMENT_MESSAGES:
                    if end > n:
                        self._head = data[pos:]
                        n = pos
                        break
                    try:
                        replacement = self._rewrite(code, data, pos, end, server, expect)
                    except (ValueError, IndexError):
                        # A name without its NUL, a Bind cut short: PostgreSQL would say
                        # the same and close the connection.
                        self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                                   "invalid %s message format" % chr(code)))
                        return
                    if replacement is not None:
                        if out is None:
                            out = []
                        if pos > start:
                            out.append(data[start:pos])
                        out.append(replacement)
                        start = end
            elif code == _TERMINATE:
                n = pos
                self._head = b""
                self._terminate = True
                break
            elif code not in _COPY:
                # PostgreSQL would end this connection at the message; sent on, it would end a
                # server that may by then belong to another client.
                self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                           "invalid frontend message type %d" % code))
                return
            pos = end
        self._remain = pos - n if pos > n else 0
        self._dirty = dirty
        if syncs and not server.pending:
            server.query_start = _monotonic()
        server.pending += syncs
        self.query_count += syncs
        server.dirty = dirty
        if out:
            if start < n:
                out.append(data[start:n])
            server.send(b"".join(out))
        elif n:
            server.send(data if n == len(data) else data[:n])
        if self._terminate:
            self._closed = True
            self.transport.loseConnection()

    def _rewrite(self, code: int, data: bytes, pos: int, end: int, server, expect):
        """
        Rename statements in one Parse/Bind/Describe/Close; None means send it unchanged.
        """
        if code == _PARSE:
            nul = data.index(b"\x00", pos + 5, end)
            if nul == pos + 5:
                # The unnamed statement goes as is; remember it, in case the client Binds it
                # after a Sync, when its server may have gone to another client meanwhile.
                expect.append(_prepared.FORWARD_ENTRY)
                self._unnamed = server.unnamed = data[nul + 1:end]
                return None
            name = data[pos + 5:nul]
            if name in self.prepared:
                # PostgreSQL: 42P05, and the rest of the pipeline is skipped up to Sync.
                expect.append((_prepared.FAKE_ERROR, _prepared.already_exists(name)))
                return _prepared.PARSE_FAILING
            stmt = self.pool.statements.get(data[nul + 1:end])
            self.prepared[name] = stmt
            if stmt.name in server.statements:
                self.pool.statements.hits += 1
                expect.append((_prepared.AS_PARSE, self, name, stmt.name))
                return _prepared.CLOSE_NOTHING
            self.pool.statements.misses += 1
            prefix = self._remember(server, stmt, expect)
            expect.append((_prepared.PARSED, self, name, stmt.name, stmt))
            return prefix + stmt.parse if prefix else stmt.parse
        if code == _BIND:
            s_start = data.index(b"\x00", pos + 5, end) + 1
            if data[s_start] == 0:
                # The unnamed statement: as is, if this server holds the client's.
                return self._ensureUnnamed(server, expect, data[pos:end])
            s_end = data.index(b"\x00", s_start, end)
            stmt = self.prepared.get(data[s_start:s_end])
            if stmt is None:
                return None  # unknown to us: PostgreSQL reports it in its own words
            prefix = self._ensure(server, stmt, expect)
            payload = data[pos + 5:s_start] + stmt.name + data[s_end:end]
            bind = b"B" + _uint32.pack(len(payload) + 4) + payload
            return prefix + bind if prefix else bind
        kind = data[pos + 5]
        if code == _CLOSE:
            expect.append(_prepared.FORWARD_ENTRY)
            if kind == _KIND_STATEMENT:
                # Forget the client's name; the server's copy stays for others.  PostgreSQL
                # answers a Close of a name it does not have with CloseComplete too.
                self.prepared.pop(data[pos + 6:end - 1], None)
            return None
        # Describe
        if kind != _KIND_STATEMENT:
            return None
        if end - pos == 7:
            return self._ensureUnnamed(server, expect, data[pos:end])
        stmt = self.prepared.get(data[pos + 6:end - 1])
        if stmt is None:
            return None
        prefix = self._ensure(server, stmt, expect)
        describe = messages.message(b"D", b"S" + stmt.name + b"\x00")
        return prefix + describe if prefix else describe

    def _ensureUnnamed(self, server, expect, message: bytes) -> Optional[bytes]:
        """
        Bind/Describe of the unnamed statement: when this server does not hold the client's
        (its Parse went to another server before a Sync, as pg8000 does), Parse it again
        first and swallow the ParseComplete.
        """
        body = self._unnamed
        if server.unnamed is body or body is None:
            return None
        server.unnamed = body
        expect.append((_prepared.SWALLOW, None))
        return b"P" + _uint32.pack(len(body) + 5) + b"\x00" + body + message

    def _ensure(self, server, stmt, expect) -> bytes:
        """Bytes to put first so that C{server} holds C{stmt}: an injected Parse, or nothing."""
        if stmt.name in server.statements:
            return b""
        self.pool.statements.misses += 1
        prefix = self._remember(server, stmt, expect)
        expect.append((_prepared.SWALLOW, stmt.name, stmt))
        return prefix + stmt.parse if prefix else stmt.parse

    def _remember(self, server, stmt, expect) -> bytes:
        """Note that C{server} will hold C{stmt}; Close what the LRU evicts to make room."""
        evicted = server.statements.add(stmt.name)
        if evicted is None:
            return b""
        self.pool.statements.evictions += 1
        expect.append((_prepared.SWALLOW, None))
        return _prepared.close_statement(evicted)

    def _statementQuery(self, server, query: bytes, expect, syncs: int) -> Optional[bytes]:
        """
        SQL DEALLOCATE and DISCARD ALL act on the client's own statement names; RESET returns
        to the client's startup values.  Returns the bytes to send instead of the Query, or
        None to send it as is.  C{syncs}: the client's Sync/Query messages before this one
        that the server has not answered yet.
        """
        if self.startup_values:
            replacement = self._reset(server, query, syncs)
            if replacement is not None:
                return replacement
        target = _prepared.parse_deallocate(query)
        if target is True or (target is None and _prepared.is_discard_all(query)):
            # Sent as is, it drops every statement on this server: forget them all.
            self.prepared.clear()
            server.statements.clear()
            if target is None and self.startup_values:
                return self._reset(server, b"RESET ALL", syncs, messages.query(
                    query.decode("utf-8", "replace")))
            return None
        if target is None:
            return None
        stmt = self.prepared.pop(target, None)
        if stmt is None:
            return None  # PostgreSQL says it does not exist, in its own words
        # Deallocate the server's copy under its own name (it will be re-Parsed on demand):
        # the client sees the same CommandComplete and ReadyForQuery as without a pooler.
        prefix = self._ensure(server, stmt, expect)
        server.statements.discard(stmt.name)
        return prefix + messages.query('DEALLOCATE "%s"' % stmt.name.decode())

    def _reset(self, server, query: bytes, syncs: int, original: Optional[bytes] = None
               ) -> Optional[bytes]:
        """
        RESET of a parameter the client set at startup: PostgreSQL would go back to the
        client's startup value, the shared server goes back to its own; so the RESET is
        followed by a query of ours that sets the startup value again, and the client sees
        its ParameterStatus.
        """
        name = _params.parse_reset(query.decode("utf-8", "replace"))
        if name is None:
            return None
        if name == "ALL":
            values = dict(self.startup_values)
        elif name in self.startup_values:
            values = {name: self.startup_values[name]}
        else:
            return None
        for k in values:
            if k in _params.STARTUP_ONLY:
                server.params[k] = None
        sql = _params.sync_sql(values, {})
        if original is None:
            original = messages.query(query.decode("utf-8", "replace"))
        return original + server.append_internal(sql, server.pending + syncs + 1)

    def serverAssigned(self, server) -> None:
        """
        The pool gives us C{server}: bring its parameters in line, replay a deferred BEGIN,
        then send what we queued, all in one write.
        """
        self._waiting = False
        if self._closed:
            self._giveBack(server)
            return
        self.server = server
        if self._login_pending:
            self._loginWithServer(server)
            return
        out = None
        if self.params != server.params:
            out = [server.prepend_internal(_params.sync_sql(self.params, server.params))]
            server.params.update(self.params)
        if self._deferred_begin is not None:
            if out is None:
                out = []
            out.append(server.prepend_internal_message(self._deferred_begin))
            self._deferred_begin = None
        queued = self._queued
        self._queued = []
        self._queued_len = 0
        self._process(queued[0] if len(queued) == 1 else b"".join(queued), out)
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def serverReleasable(self, server) -> None:
        """The server answered everything we sent and is idle outside a transaction."""
        pool = self.pool
        pool.stats.xact_count += 1
        if pool.transaction_mode and not self._login_pending and self.server is server:
            self.server = None
            if self.transport.producer is not None:
                self.transport.unregisterProducer()
            if server.transport.producer is not None:
                server.transport.unregisterProducer()
            pool.checkin(server)

    def serverUnavailable(self, err: errors.PgError) -> None:
        """No server could be had (connect failed, query_wait_timeout)."""
        self._waiting = False
        err.severity = "FATAL"
        self._fatal(err)

    def serverLost(self, server) -> None:
        """Our server went away while we held it."""
        self.server = None
        self._fatal(errors.PgError(
            errors.CONNECTION_FAILURE,
            "server connection lost: the PostgreSQL server closed the connection "
            "unexpectedly while serving this client",
            hint="pgdoorman closed this client because its transaction or session on the "
                 "server is gone; reconnect and retry."),
            "server %d lost" % server.id)

    def _giveBack(self, server) -> None:
        """Return a server to the pool after this client, cleaning up what it left."""
        if server.client is not self and server.client is not None:
            return
        if self.server is server:
            self.server = None
        server.detach_producer()
        if server.closing:
            return
        if server.pending or server.dirty or self._remain:
            # Replies are still on their way or a message is half sent: nobody else can use
            # this connection safely.
            server.close()
            self.pool.server_lost(server)
            return
        resets = []
        if server.in_transaction:
            resets.append("ROLLBACK")
        if not self.pool.transaction_mode and self.pool.settings.cleanup_server_connections:
            resets.append("DISCARD ALL")
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
            server.in_transaction = False
            for k in _params.STARTUP_ONLY:
                server.params[k] = None
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
        self._closed = True
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self.factory.connections -= 1
        self.service.unregister_client(self)
        pool = self.pool
        if pool is not None:
            pool.clients -= 1
            if self._waiting:
                pool.cancel_wait(self)
            server = self.server
            if server is not None:
                self._giveBack(server)
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
        return (self.dataReceived == self._relayData and not self._closed
                and self.server is None and not self._waiting and not self._login_pending
                and self._deferred_begin is None and not self._head and not self._remain
                and not self._queued and not self._buf and not self.tls and not self._paused
                and not self._terminate and self.cancel_key is not None
                and t is not None and not getattr(t, "dataBuffer", b"")
                and not getattr(t, "_tempDataLen", 0) and t.producer is None)

    def export_state(self) -> ClientSession:
        """The session with everything another process needs to carry on serving the client."""
        s = self.session
        s.params = dict(self.params)
        s.cancel_key = self.cancel_key
        s.startup_values = dict(self.startup_values)
        s.prepared = {name: stmt.body for name, stmt in self.prepared.items()}
        s.scram_client_key = self.pool_key_hint
        s.query_count = self.query_count
        s.client_bytes = self.client_bytes
        return s

    def _adopt(self, s: ClientSession) -> None:
        """
        Carry on serving a client the previous process logged in (C{connectionMade} of an
        adopted socket): same pool, parameters, prepared statements and BackendKeyData; the
        next bytes on the socket are the client's next message.
        """
        self.adopting = None
        t = self.transport
        sockopts.apply(t, self.service.config.general)
        peer = t.getPeer()
        self.peer = "%s:%s" % (peer.host, peer.port) if hasattr(peer, "port") else str(
            getattr(peer, "name", "unix"))
        self.peer_host = getattr(peer, "host", None)
        s.peer = self.peer
        self.session = s
        self.send = make_sender(t, self._backlog)
        pool = self.service.get_pool(s.database, s.user)
        if pool is None or s.cancel_key is None:
            self.dataReceived = self._ignore
            self._fatal(errors.PgError(
                errors.ADMIN_SHUTDOWN,
                'database "%s" or user "%s" is no longer in the configuration'
                % (s.database, s.user)), "not in the new process's configuration")
            return
        self.pool_key_hint = s.scram_client_key
        self._joinPool(pool, s.scram_client_key)
        self.params = dict(s.params)
        s.params = self.params
        self.startup_values = dict(s.startup_values)
        statements = pool.statements
        self.prepared = {name: statements.get(body) for name, body in s.prepared.items()}
        self.query_count = s.query_count
        self.client_bytes = s.client_bytes
        self.cancel_key = self.service.adopt_client(self, s.cancel_key)
        self.dataReceived = self._relayData


class ClientFactory(protocol.Factory):
    """Accepts clients on the listening port and counts them for max_connections."""

    noisy = False

    def __init__(self, service):
        self.service = service
        self.connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        p = ClientConnection(self.service)
        p.factory = self
        return p
