"""
The first phases of a client connection: the startup packet, authentication, joining a pool.

Each phase is an object with a C{dataReceived}; L{pgdoorman.client.ClientConnection.enter}
makes it the one that reads.  L{Startup} answers SSLRequest, GSSENCRequest and CancelRequest
and reads the StartupMessage; L{Authentication} asks for and checks the credential that the
pg_hba rule and the user's configured secret call for (trust, cert, cleartext, md5,
SCRAM-SHA-256, PAM, JWT) and then hands the client to its pool
(L{pgdoorman.client.ClientConnection.authenticated}); L{Joining} learns the parameters the
client will see.  Refusals use PostgreSQL's words.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from typing import Dict, Optional

from twisted.internet import reactor
from twisted.logger import Logger

from pgdoorman import params as _params
from pgdoorman import tls as _tls
from pgdoorman import tlslimit as _tlslimit
from pgdoorman.auth import hba as _hba
from pgdoorman.auth import jwt as _jwt
from pgdoorman.auth import md5 as _md5
from pgdoorman.auth import pam as _pam
from pgdoorman.auth import query as _auth_query
from pgdoorman.auth import scram as _scram
from pgdoorman.protocol import errors, messages
from pgdoorman.protocol.framing import FramingError, MessageBuffer

_int32 = struct.Struct("!i")

#: Virtual databases of the admin console.
ADMIN_DATABASES = ("pgdoorman", "pgbouncer")

#: Authentication messages are small; a client may not make us hold more of one than this.
MAX_AUTH_MESSAGE = 65536

#: How many derived SCRAM secrets L{scram_secret} keeps.  The config holds a handful of
#: passwords, but auth_query brings one secret per looked-up user (and a new one whenever a
#: password changes): the cache keeps the most recently used, so it cannot grow without end.
SCRAM_SECRET_CACHE_SIZE = 4096

_scram_secrets: "OrderedDict[str, _scram.ScramSecret]" = OrderedDict()


def scram_secret(password: str) -> _scram.ScramSecret:
    """
    The SCRAM secret for a configured password; derived once per plaintext password, since
    4096 rounds of PBKDF2 per login would be the most expensive thing the pooler does.  An
    LRU of L{SCRAM_SECRET_CACHE_SIZE} entries.
    """
    cache = _scram_secrets
    secret = cache.get(password)
    if secret is not None:
        cache.move_to_end(password)
        return secret
    if password.startswith("SCRAM-SHA-256$"):
        secret = _scram.parse_scram_secret(password)
    else:
        secret = _scram.secret_from_password(password)
    cache[password] = secret
    while len(cache) > SCRAM_SECRET_CACHE_SIZE:
        cache.popitem(last=False)
    return secret


def _failed(user: str) -> errors.PgError:
    return errors.PgError(errors.INVALID_PASSWORD,
                          'password authentication failed for user "%s"' % user)


class Startup:
    """Reads startup-phase packets (they have no message code) up to the StartupMessage."""

    log = Logger()

    def __init__(self, client):
        self.client = client
        self._buf = bytearray()

    def dataReceived(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        client = self.client
        while len(buf) >= 4:
            (length,) = _int32.unpack_from(buf)
            if length < 8 or length > messages.MAX_STARTUP_PACKET:
                client.fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                            "invalid length of startup packet"),
                             "length %d" % length)
                return
            if len(buf) < length:
                return
            packet = bytes(buf[:length])
            del buf[:length]
            (code,) = _int32.unpack_from(packet, 4)
            if code == messages.SSL_REQUEST_CODE:
                if client.tls or length != 8 or buf:
                    # Bytes behind an SSLRequest would be read in the clear although the
                    # client meant them to be encrypted (PostgreSQL refuses them too,
                    # CVE-2021-23214); a second SSLRequest inside TLS is nonsense.
                    client.fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                                "received unencrypted data after SSL request"
                                                if buf else "invalid SSL request"))
                    return
                mode, factory = _tls.client_tls.for_config(client.service.config.general)
                if factory is None or client.peer_host is None:
                    # No TLS on a Unix socket, as PostgreSQL and PgBouncer answer: the
                    # kernel is the transport, and libpq never asks there anyway.
                    client.transport.write(b"N")
                    continue
                wait = _tlslimit.limiter.delay(
                    client.service.config.general.tls_rate_limit_per_second)
                if wait:
                    # Over tls_rate_limit_per_second: answer (and handshake) in turn; the
                    # client sends nothing until it has our 'S' (buf is empty here).
                    reactor.callLater(wait, client.start_tls, factory)
                    return
                client.start_tls(factory)
                continue
            if code == messages.GSSENC_REQUEST_CODE:
                # GSSAPI encryption is not offered: 'N' and the client goes on (or asks for
                # TLS next, as libpq does).
                client.transport.write(b"N")
                continue
            if code == messages.CANCEL_REQUEST_CODE:
                if length == 16:
                    pid, secret = struct.unpack_from("!ii", packet, 8)
                    client.service.cancel(pid, secret)
                client.close()
                return
            rest = bytes(buf)
            buf.clear()
            self._startup(code, packet[8:], rest)
            return

    def _startup(self, version: int, payload: bytes, rest: bytes) -> None:
        client = self.client
        major, minor = version >> 16, version & 0xFFFF
        if major != 3:
            client.fatal(errors.PgError(
                errors.FEATURE_NOT_SUPPORTED,
                "unsupported frontend protocol %d.%d: server supports 3.0 to 3.0"
                % (major, minor)))
            return
        try:
            startup = messages.parse_startup_params(payload)
        except ValueError as e:
            client.fatal(errors.PgError(errors.PROTOCOL_VIOLATION, str(e)))
            return
        options = [k for k in startup if k.startswith("_pq_.")]
        if minor > 0 or options:
            # A newer libpq asks for 3.x or protocol options: say we speak 3.0 with none.
            client.transport.write(messages.negotiate_protocol_version(0, options))
            for k in options:
                del startup[k]
        user = startup.get("user")
        if not user:
            client.fatal(errors.PgError(errors.INVALID_AUTHORIZATION,
                                        "no PostgreSQL user name specified in startup packet"))
            return
        if startup.get("replication", "false").lower() not in ("false", "0", "off", "no"):
            client.fatal(errors.PgError(errors.FEATURE_NOT_SUPPORTED,
                                        "replication connections are not supported by "
                                        "pgdoorman"))
            return
        database = startup.get("database") or user
        s = client.session
        s.user, s.database, s.startup = user, database, startup
        general = client.service.config.general
        if general.log_client_connections:
            self.log.info("client {peer} connecting as {user} to {db}{tls}", peer=client.peer,
                          user=user, db=database, tls=" over TLS" if client.tls else "")
        rule = self._accessRule(user, database)
        if rule is False:
            return
        if database in ADMIN_DATABASES:
            if user != general.admin_username:
                client.fatal(errors.PgError(
                    errors.INVALID_AUTHORIZATION,
                    'user "%s" is not allowed to use the admin console "%s" (only the user set '
                    "in general.admin_username is)" % (user, database)), "not the admin user")
                return
            password, pam_service = general.admin_password, None
        else:
            pcfg = client.service.config.pools.get(database)
            if pcfg is None:
                client.fatal(errors.PgError(errors.INVALID_CATALOG_NAME,
                                            'database "%s" does not exist' % database),
                             "no pool of that name in the config")
                return
            ucfg = pcfg.user(user)
            if ucfg is None and pcfg.auth_query is not None:
                # Not listed: the pool's auth_query looks the user up, then authenticates.
                lookup = _auth_query.LookingUp(client, pcfg, user, rule, rest)
                client.enter(lookup)
                lookup.start()
                return
            if ucfg is None:
                client.fatal(_failed(user), 'no user "%s" in pool "%s"' % (user, database))
                return
            password, pam_service = ucfg.password, ucfg.auth_pam_service
        auth = Authentication(client, rule, password, pam_service)
        client.enter(auth)
        auth.start()
        if rest and not client.closed:
            client.dataReceived(rest)

    def _accessRule(self, user: str, database: str):
        """
        tls_mode and pg_hba/hba say whether this client may try to log in at all; the rule
        that matched picks the method (None: no rules configured, False: refused).
        """
        client = self.client
        general = client.service.config.general
        mode = _tls.client_mode(general)
        # Unix-socket clients are exempt (PgBouncer: "require SSL except on unix socket");
        # pg_hba ``local`` rules decide for them, as in PostgreSQL.
        if mode in ("require", "verify-full") and not client.tls and \
                client.peer_host is not None:
            client.fatal(errors.PgError(
                errors.INVALID_AUTHORIZATION,
                "TLS required: pgdoorman accepts only encrypted connections",
                hint="Connect with sslmode=require (general.tls_mode is %s)." % mode),
                "client did not ask for TLS")
            return False
        try:
            rules = _hba.rules_for(general)
        except (_hba.HbaError, ValueError) as e:
            client.fatal(errors.PgError(errors.INVALID_AUTHORIZATION,
                                        "pgdoorman's access rules cannot be read"), str(e))
            return False
        if rules is None:
            return None
        host = client.peer_host
        rule = rules.match(client.tls, host, database, user)
        if rule is None or rule.method == "reject":
            client.fatal(errors.PgError(errors.INVALID_AUTHORIZATION,
                                        _hba.refusal(rule, host or "[local]", user, database,
                                                     client.tls)),
                         "no matching pg_hba rule" if rule is None
                         else "pg_hba line %d rejects" % rule.lineno)
            return False
        return rule


class Authentication:
    """
    Asks for the credential the rule and the user's config call for: nothing (trust), a
    client certificate (cert), a cleartext password (password, pam, jwt), md5 or
    SCRAM-SHA-256 (by the configured secret, as PostgreSQL picks for md5 rules).
    """

    log = Logger()

    def __init__(self, client, rule, password: Optional[str], pam_service: Optional[str],
                 outcome=None):
        self.client = client
        #: told None on success or the error on failure (auth_query's counters).
        self._outcome = outcome
        self._messages = MessageBuffer(MAX_AUTH_MESSAGE)
        #: (method, state, step) of the exchange under way; ("waiting", ...) during PAM.
        self._auth = None
        self._done = False
        self._feeding = False
        self._credentials = (rule, password, pam_service)

    def start(self) -> None:
        """Once this is the client's phase: ask for the credential (or let it in)."""
        self._start(*self._credentials)

    def _fatal(self, err: errors.PgError, why: Optional[str] = None) -> None:
        if self._outcome is not None and not self.client.closed:
            self._outcome(err)
        self.client.fatal(err, why)

    def _succeed(self, scram_client_key: Optional[bytes] = None) -> None:
        self._done = True
        client = self.client
        if self._outcome is not None:
            self._outcome(None)
        client.authenticated(scram_client_key)
        if not self._feeding:
            self._handOn()

    def _handOn(self) -> None:
        """Bytes after the last authentication message belong to the next phase."""
        rest = self._messages.take()
        if rest and not self.client.closed:
            self.client.dataReceived(rest)

    def _start(self, rule, password: Optional[str], pam_service: Optional[str]) -> None:
        client = self.client
        method = rule.method if rule is not None else _hba.ANY
        user = client.session.user
        failed = _failed(user)
        write = client.send  # (at once when Twisted holds nothing back: one syscall, no turn)
        if method == "trust":
            self._succeed()
            return
        if method == "cert":
            name = _tls.peer_certificate_subject(client.transport) if client.tls else None
            if name is not None and name == user:
                self._succeed()
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
            write(messages.authentication(messages.AUTH_CLEARTEXT))
            return
        if password is None:
            if method == _hba.ANY:
                self._succeed()
            else:
                self._fatal(failed, "pg_hba asks for %s and the user has no password" % method)
            return
        if _jwt.is_jwt_password(password):
            self._auth = ("jwt", password, 0)
            write(messages.authentication(messages.AUTH_CLEARTEXT))
            return
        if method == "jwt":
            self._fatal(failed, "pg_hba asks for jwt and the user's password is not "
                                 "jwt-pkey-fpath:")
            return
        if method == "password":
            self._auth = ("password", password, 0)
            write(messages.authentication(messages.AUTH_CLEARTEXT))
            return
        if _md5.is_md5_hash(password):
            if method == "scram-sha-256":
                self._fatal(failed, "pg_hba asks for scram-sha-256 and the user's password "
                                     "is an md5 hash")
                return
            salt = os.urandom(4)
            self._auth = ("md5", password, salt)
            write(messages.authentication_md5(salt))
            return
        try:
            server = _scram.ScramServer(scram_secret(password), user=user)
        except ValueError as e:
            self._fatal(failed, "bad secret in config: %s" % e)
            return
        self._auth = ("scram", server, 0)
        write(messages.authentication_sasl([_scram.MECHANISM]))

    def dataReceived(self, data: bytes) -> None:
        client = self.client
        try:
            msgs = self._messages.feed(data)
        except FramingError as e:
            self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                        "authentication message too long"
                                        if "too long" in str(e) else str(e)))
            return
        self._feeding = True
        try:
            for i, (code, payload) in enumerate(msgs):
                if self._done or (self._auth is not None and self._auth[0] == "waiting"):
                    # Logged in, or a PAM check is running: what follows is for later.
                    self._messages.push_back(msgs[i:])
                    break
                if client.closed:
                    return
                if code != messages.PASSWORD:
                    self._fatal(errors.PgError(
                        errors.PROTOCOL_VIOLATION,
                        "expected password response, got message type %r" % chr(code)))
                    return
                self._message(payload)
        finally:
            self._feeding = False
        if self._done:
            self._handOn()

    def _message(self, payload: bytes) -> None:
        client = self.client
        if self._auth is None:
            self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                        "unexpected password response"))
            return
        kind, state, step = self._auth
        user = client.session.user
        failed = _failed(user)
        if kind == "md5":
            if _md5.md5_verify(state, user, step, payload):
                self._succeed()
            else:
                self._fatal(failed, "wrong password (md5)")
            return
        if kind in ("password", "jwt", "pam"):
            self._cleartext(kind, state, payload, failed)
            return
        try:
            if step == 0:
                mechanism, first = messages.parse_sasl_initial_response(payload)
                if mechanism != _scram.MECHANISM:
                    self._fatal(errors.PgError(
                        errors.PROTOCOL_VIOLATION,
                        "client selected an invalid SASL authentication mechanism"))
                    return
                client.send(messages.authentication_sasl_continue(
                    state.handle_client_first(first)))
                self._auth = (kind, state, 1)
            else:
                final = state.handle_client_final(payload)
                client.send(messages.authentication_sasl_final(final))
                self._succeed(state.client_key)
        except _scram.AuthFailed:
            self._fatal(failed, "wrong password (scram)")
        except (_scram.ScramError, ValueError) as e:
            self._fatal(errors.PgError(errors.PROTOCOL_VIOLATION,
                                        getattr(e, "message", str(e))))

    def _cleartext(self, kind: str, state: str, payload: bytes,
                   failed: errors.PgError) -> None:
        """A PasswordMessage for the password, jwt and pam methods; never logged."""
        client = self.client
        user = client.session.user
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
                self._succeed()
            else:
                self._fatal(failed, "JWT rejected: %s" % why)
            return
        if kind == "password":
            ok, client_key = _hba.password_matches(state, user, given)
            if ok:
                self._succeed(client_key)
            else:
                self._fatal(failed, "wrong password (password)")
            return
        self._auth = ("waiting", None, 0)

        def checked(result):
            if client.closed:
                return
            ok, reason = result
            self._auth = None
            if not ok:
                self._fatal(failed, "PAM service %r refused: %s" % (state, reason))
                return
            self._succeed()

        def broken(failure):
            self._fatal(failed, "PAM error: %s" % failure.getErrorMessage())

        _pam.authenticate_deferred(state, user, given).addCallbacks(checked, broken)


class Joining:
    """
    Logged in, not yet told the server's parameters.  A startup parameter whose value
    differs from the pool's defaults is SET on a server once, so that we learn PostgreSQL's
    spelling of it ("utf8" is "UTF8"); bytes the client sends meanwhile wait.
    """

    def __init__(self, client):
        self.client = client
        self.dataReceived = client.queue
        wanted: Dict[str, str] = {}
        startup = dict(client.session.startup)
        startup.update(_params.parse_options(startup.get("options", "")))
        for name, value in startup.items():
            canonical = _params.CANONICAL.get(name.lower())
            if canonical is not None:
                wanted[canonical] = value
        self.wanted = wanted

    def start(self) -> None:
        client = self.client
        pool = client.pool
        if pool.default_params is None or self._needsServer():
            client.waiting = True
            pool.checkout(client)
        else:
            client.params = self._fromDefaults()
            client.startup_values = {k: client.params[k] for k in self.wanted}
            client.logged_in()

    def _needsServer(self) -> bool:
        defaults = self.client.pool.default_params
        for name, value in self.wanted.items():
            if name in _params.REPORTED:
                have = defaults.get(name)
                if have is None or have.lower() != value.lower():
                    return True
        return False

    def _fromDefaults(self) -> Dict[str, Optional[str]]:
        p = dict(self.client.pool.default_params)
        for name, value in self.wanted.items():
            if name in _params.STARTUP_ONLY:
                p[name] = value
        return p

    def serverAssigned(self, server) -> None:
        """Learn the server's spelling of the client's startup parameters, then go on."""
        client = self.client
        client.params = self._fromDefaults()
        wanted = self.wanted
        sql = _params.sync_sql({k: v for k, v in wanted.items()
                                if k in _params.STARTUP_ONLY or
                                (server.params.get(k) or "").lower() != v.lower()},
                               server.params)

        def done(err):
            if client.closed:
                client.give_back(server)
                return
            if err is not None:
                client.give_back(server)
                err.severity = "FATAL"
                client.fatal(err, "startup parameter rejected by the server")
                return
            for k in wanted:
                if k in _params.REPORTED:
                    client.params[k] = server.params.get(k)
            for k in _params.STARTUP_ONLY:
                server.params[k] = client.params[k]
            client.startup_values = {k: client.params[k] for k in wanted}
            if client.pool.transaction_mode:
                client.give_back(server)
            client.logged_in()

        if sql:
            server.run_internal(sql).addCallback(done)
        else:
            done(None)
