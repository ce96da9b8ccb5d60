"""
C{auth_query}: users not listed in a pool's C{users} are looked up in PostgreSQL.

A client that logs in as a user the pool does not list is held while the pool's query
(C{SELECT usename, passwd FROM pg_shadow WHERE usename = $1}) runs with the user name as its
parameter, over a few connections of their own made as C{auth_query.user}.  The md5 hash or
SCRAM secret it returns checks the client exactly as a configured password would.  Then:

  - passthrough mode (no C{server_user}): the user gets a pool of its own whose servers log
    in as the user itself, with the md5 hash or the ClientKey of the client's SCRAM login;
  - dedicated mode (C{server_user} set): every looked-up user shares one pool that logs in
    as C{server_user}/C{server_password}.

Found secrets are cached for C{cache_ttl}, unknown users for C{cache_failure_ttl}, so that
neither a busy user nor someone guessing names costs a query per login.  A failed login of a
cached user re-fetches its secret (at most once per C{min_interval}) in case the password
changed in PostgreSQL; a RELOAD empties the caches.  C{SHOW AUTH_QUERY} reads L{AuthQuery}'s
counters (PgDoorman's columns).

Unlike its neighbours this module talks to the network: the lookup connections are ordinary
L{pgdoorman.server.ServerConnection}s (same login, TLS and timeouts as the pools'), whose relay
hands the replies to a L{_Lookup} instead of a client.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from collections import deque
from typing import Dict, List, Optional

from twisted.internet import defer, reactor
from twisted.logger import Logger

from pgdoorman.auth import md5 as _md5
from pgdoorman.protocol import errors, messages

__all__ = ["AuthQuery", "AuthQueryError", "for_pool", "LookingUp", "dynamic_pool",
           "reload_settings", "all_queries", "SHOW_COLUMNS"]

#: PostgreSQL's NAMEDATALEN - 1: a longer name cannot be a role, so it is refused without a
#: query and without a cache entry (which would let anyone fill memory).
MAX_USERNAME_LEN = 63

#: Columns of SHOW AUTH_QUERY, as PgDoorman names them.
SHOW_COLUMNS = [("database", "s"), ("cache_entries", "i"), ("cache_hits", "q"),
                ("cache_misses", "q"), ("cache_refetches", "q"), ("rate_limited", "q"),
                ("auth_success", "q"), ("auth_failure", "q"), ("executor_queries", "q"),
                ("executor_errors", "q"), ("dynamic_pools", "i")]

_monotonic = time.monotonic
_int16 = struct.Struct("!h")
_int32 = struct.Struct("!i")

log = Logger(namespace="pgdoorman.auth.query")


class AuthQueryError(Exception):
    """The lookup could not be made (connection, SQL or result shape); the text says why."""


class _Entry:
    __slots__ = ("secret", "fetched_at", "refetched_at")

    def __init__(self, secret: Optional[str], now: float):
        #: the md5 hash or SCRAM secret; None caches "no such user".
        self.secret = secret
        self.fetched_at = now
        self.refetched_at: Optional[float] = None


# -- one query on one lookup connection ------------------------------------------------------

def _lookup_messages(query: str, username: str) -> bytes:
    """
    Parse, Bind (the user name as the text parameter $1), Describe, Execute, Sync: the
    extended protocol, so that the name is never spliced into SQL (PostgreSQL docs 55.2.3).
    """
    value = username.encode("utf-8")
    parse = messages.cstring("") + messages.cstring(query) + _int16.pack(0)
    bind = (messages.cstring("") + messages.cstring("") + _int16.pack(0) + _int16.pack(1)
            + _int32.pack(len(value)) + value + _int16.pack(0))
    return (messages.message(b"P", parse) + messages.message(b"B", bind)
            + messages.message(b"D", b"P" + messages.cstring(""))
            + messages.message(b"E", messages.cstring("") + _int32.pack(0))
            + messages.SYNC_MESSAGE)


def _secret_column(names: List[str]) -> int:
    """
    Which column holds the secret: one named passwd or password, else the second of two
    (PgBouncer's C{usename, passwd}), else the only one.
    """
    for i, name in enumerate(names):
        if name.lower() in ("passwd", "password"):
            return i
    return 1 if len(names) == 2 else len(names) - 1


class _Lookup:
    """
    Stands where a client would for a lookup connection's relay: gets the reply bytes
    (C{send}), hears when the server is free again (C{serverReleasable}) or lost.
    """

    def __init__(self, server, deferred: defer.Deferred):
        self.server = server
        self.deferred = deferred
        self.params: Dict[str, Optional[str]] = {}
        self._buf = b""
        self._names: List[str] = []
        self._rows: List[List[Optional[str]]] = []
        self._error: Optional[errors.PgError] = None
        self._done = False

    def send(self, data: bytes) -> None:
        msgs, self._buf = messages.split_messages(self._buf + data)
        for code, payload in msgs:
            if code == ord("T"):
                self._names = messages.parse_row_description(payload)
            elif code == ord("D"):
                self._rows.append(messages.parse_data_row(payload))
            elif code == messages.ERROR_RESPONSE:
                self._error = errors.PgError.from_fields(messages.parse_fields(payload))
            elif code == messages.READY_FOR_QUERY:
                self._done = True

    def serverReleasable(self, server) -> None:
        server.client = None
        if self._done:
            self._finish(server)

    def serverLost(self, server) -> None:
        self._fire(AuthQueryError("lookup connection lost"), None)

    def _finish(self, server) -> None:
        if self._error is not None:
            self._fire(AuthQueryError("query failed: %s" % self._error.text), server)
            return
        rows = self._rows
        if len(rows) > 1:
            self._fire(AuthQueryError("query returned %d rows, expected 0 or 1" % len(rows)),
                       server)
            return
        if not rows:
            self._fire(None, server)
            return
        row = rows[0]
        if not row:
            self._fire(AuthQueryError("query returned no columns"), server)
            return
        self._fire(row[_secret_column(self._names) if self._names else len(row) - 1], server)

    def _fire(self, result, server) -> None:
        if not self.deferred.called:
            self.deferred.callback((result, server))


# -- the per-pool lookup service ---------------------------------------------------------------

class AuthQuery:
    """
    The lookups, cache and counters of one pool's C{auth_query}.

    @ivar entries: user name -> L{_Entry}, positive and negative.
    """

    log = log

    def __init__(self, service, pool_name: str, config):
        self.service = service
        self.pool_name = pool_name
        self.config = config
        self.reloads = service.reloads
        self.entries: Dict[str, _Entry] = {}
        self._pending: Dict[str, List[defer.Deferred]] = {}
        self._idle: List = []
        #: lookup connections open or being opened, and those being opened.
        self._open = 0
        self._connecting = 0
        self._queue: deque = deque()
        self._pool = None
        self.cache_hits = self.cache_misses = self.cache_refetches = 0
        self.rate_limited = self.auth_success = self.auth_failure = 0
        self.executor_queries = self.executor_errors = 0
        self.pools_created = self.pools_destroyed = 0

    # -- the cache ---------------------------------------------------------------------------

    def lookup(self, username: str) -> defer.Deferred:
        """
        The user's secret (None: no such user), from the cache or a query.  Concurrent logins
        of one user wait for the same query.  Fails with L{AuthQueryError}.
        """
        if len(username.encode("utf-8")) > MAX_USERNAME_LEN:
            self.cache_misses += 1
            return defer.succeed(None)
        now = _monotonic()
        entry = self.entries.get(username)
        if entry is not None:
            ttl = self.config.cache_ttl if entry.secret is not None \
                else self.config.cache_failure_ttl
            if now - entry.fetched_at < ttl:
                self.cache_hits += 1
                return defer.succeed(entry.secret)
        self.cache_misses += 1
        return self._fetch(username)

    def _fetch(self, username: str, refetch: bool = False) -> defer.Deferred:
        d = defer.Deferred()
        waiters = self._pending.get(username)
        if waiters is not None:
            waiters.append(d)
            return d
        self._pending[username] = [d]

        def store(secret):
            if secret == "":
                secret = None
            entry = self.entries[username] = _Entry(secret, _monotonic())
            if refetch:
                entry.refetched_at = entry.fetched_at
            self.log.debug("auth_query {db}: user {user} {found}", db=self.pool_name,
                           user=username, found="found" if secret is not None else "not found")
            self._refreshPools(username, secret)
            return secret

        def deliver(secret):
            for waiter in self._pending.pop(username, []):
                waiter.callback(secret)

        def fail(failure):
            # Errors are not cached: the next login asks again.
            for waiter in self._pending.pop(username, []):
                waiter.errback(failure)

        self._run(username).addCallback(store).addCallbacks(deliver, fail)
        return d

    def login_failed(self, username: str) -> None:
        """
        A looked-up user gave a wrong password: perhaps PostgreSQL has a new one, so fetch it
        again for the next login, but not more often than min_interval.
        """
        self.auth_failure += 1
        entry = self.entries.get(username)
        if entry is None or entry.secret is None or username in self._pending:
            return
        last = entry.refetched_at
        if last is not None and _monotonic() - last < self.config.min_interval:
            self.rate_limited += 1
            return
        self.cache_refetches += 1
        self._fetch(username, refetch=True).addErrback(lambda f: None)

    def clear(self) -> None:
        self.entries.clear()

    def _refreshPools(self, username: str, secret: Optional[str]) -> None:
        """A passthrough pool keeps logging in with the secret it was made with: update it."""
        if self.config.server_user is not None:
            return
        pool = self.service.pools.get((self.pool_name, username))
        if pool is None or pool.settings.client_password == secret:
            return
        if secret is None:
            return  # the role is gone: its pool drains away with its clients
        old = pool.settings.client_password
        pool.settings = _with_secret(pool.settings, secret)
        if old is not None:
            pool.scram_client_key = None  # a new password: the next SCRAM login brings its key

    # -- the lookup connections ----------------------------------------------------------------

    def _run(self, username: str) -> defer.Deferred:
        """Run the query for C{username} on a free lookup connection (at most C{workers})."""
        d = defer.Deferred()
        self._queue.append((username, d))
        self._dispatch()
        d.addErrback(self._failed, username)
        return d

    def _failed(self, failure, username: str):
        self.executor_errors += 1
        err = failure.value
        self.log.error("auth_query {db}: lookup of user {user} failed: {error}",
                       db=self.pool_name, user=username,
                       error=getattr(err, "text", None) or failure.getErrorMessage())
        if not isinstance(err, AuthQueryError):
            raise AuthQueryError(getattr(err, "text", None) or failure.getErrorMessage())
        return failure

    def _dispatch(self) -> None:
        while self._queue and self._idle:
            username, d = self._queue.popleft()
            self._send(self._idle.pop(), username, d)
        while self._queue and self._open < self.config.workers \
                and len(self._queue) > self._connecting:
            self._connect()

    def _settings(self):
        """The lookup connections' PoolSettings: as the pool's, but as auth_query.user."""
        config = self.service.config
        pcfg = config.pools[self.pool_name]
        aq = self.config
        base = config.pool_settings(self.pool_name, aq.user)
        password = aq.password or None
        hashed = password is not None and (_md5.is_md5_hash(password)
                                           or password.startswith("SCRAM-SHA-256$"))
        return dataclasses.replace(
            base, username=aq.user, pool_size=aq.workers, min_pool_size=0,
            server_username=aq.user, server_password=None if hashed else password,
            client_password=password,
            server_database=aq.database or pcfg.server_database,
            application_name="pgdoorman auth_query", startup_parameters={},
            startup_parameter_sources={},
            prepared_statements_cache_size=0, server_prepared_statements_cache_size=0)

    def _connect(self) -> None:
        from pgdoorman.pool import Pool
        from pgdoorman.server import connect_server
        settings = self._settings()
        if self._pool is None or self._pool.settings != settings:
            self._pool = Pool(self.service, self.pool_name, self.config.user, settings)
        self._open += 1
        self._connecting += 1

        def connected(server):
            self._connecting -= 1
            self.log.info("auth_query {db}: lookup connection to {host}:{port}/{dbname} as "
                          "{user} open", db=self.pool_name, host=settings.server_host,
                          port=settings.server_port, dbname=settings.server_database,
                          user=settings.server_username)
            self._idle.append(server)
            self._dispatch()

        def failed(failure):
            self._connecting -= 1
            self._open -= 1
            err = failure.value
            text = getattr(err, "text", None) or failure.getErrorMessage()
            # Nothing else will come to serve the queue: fail what waits, now.
            if not self._open:
                queued, self._queue = self._queue, deque()
                for _, d in queued:
                    d.errback(AuthQueryError("cannot connect as %s: %s"
                                             % (settings.server_username, text)))

        connect_server(self._pool, settings).addCallbacks(connected, failed)

    def _send(self, server, username: str, d: defer.Deferred) -> None:
        if server.closing:
            self._open -= 1
            self._queue.appendleft((username, d))
            self._dispatch()
            return
        self.executor_queries += 1
        done = defer.Deferred()
        lookup = _Lookup(server, done)
        server.client = lookup
        # The lookup's messages go out as they are, not through a client's relay: only the
        # ReadyForQuery count is kept.
        server.link.track = False
        server.link.pending = 1
        server.query_start = _monotonic()
        timeout = self._pool.settings.connect_timeout or 5.0
        timer = reactor.callLater(max(timeout, 5.0), lookup._fire,
                                  AuthQueryError("query did not answer within %gs"
                                                 % max(timeout, 5.0)), None)

        def finished(outcome):
            if timer.active():
                timer.cancel()
            result, back = outcome
            if back is not None and not back.closing:
                self._idle.append(back)
            else:
                self._open -= 1
                if server.client is lookup:
                    server.client = None
                server.close()
            self._dispatch()
            if isinstance(result, Exception):
                d.errback(result)
            else:
                d.callback(result)

        done.addCallback(finished)
        server.send(_lookup_messages(self.config.query, username))

    def close(self) -> None:
        """Close the idle lookup connections (a reload replaced this auth_query)."""
        idle, self._idle = self._idle, []
        for server in idle:
            self._open -= 1
            server.close()

    # -- for SHOW AUTH_QUERY and /metrics -----------------------------------------------------

    def dynamic_pools(self) -> int:
        return sum(1 for p in self.service.pools.values()
                   if p.database == self.pool_name and getattr(p, "auth_query", False))

    def row(self) -> list:
        return [self.pool_name, len(self.entries), self.cache_hits, self.cache_misses,
                self.cache_refetches, self.rate_limited, self.auth_success, self.auth_failure,
                self.executor_queries, self.executor_errors, self.dynamic_pools()]


def _registry(service) -> Dict[str, AuthQuery]:
    reg = getattr(service, "_auth_queries", None)
    if reg is None:
        reg = service._auth_queries = {}
    return reg


def for_pool(service, pcfg) -> AuthQuery:
    """
    The L{AuthQuery} of pool C{pcfg}; a RELOAD empties its cache, a changed C{auth_query}
    table gets new lookup connections (the counters carry on).
    """
    reg = _registry(service)
    for name in [n for n, q in reg.items() if q.reloads != service.reloads
                 and getattr(service.config.pools.get(n), "auth_query", None) is None]:
        reg.pop(name).close()  # the pool or its auth_query is gone from the config
    aq = reg.get(pcfg.name)
    if aq is None:
        aq = reg[pcfg.name] = AuthQuery(service, pcfg.name, pcfg.auth_query)
    elif aq.reloads != service.reloads:
        aq.reloads = service.reloads
        aq.clear()
        if aq.config != pcfg.auth_query:
            aq.close()
            aq.config = pcfg.auth_query
            aq._pool = None
    return aq


def all_queries(service) -> List[AuthQuery]:
    """The L{AuthQuery} of every pool with an auth_query, in config order."""
    return [for_pool(service, pcfg) for pcfg in service.config.pools.values()
            if pcfg.auth_query is not None]


# -- the hooks: the client's login, the pool service's get_pool ------------------------------

class LookingUp:
    """
    The login phase of a client whose user pool C{pcfg} does not list: look the user up,
    then authenticate it with the secret found (L{pgdoorman.login.Authentication}), or
    refuse it in PostgreSQL's words.  What the client sends meanwhile waits.
    """

    def __init__(self, client, pcfg, user: str, rule, rest: bytes):
        self.client = client
        self._held = [rest] if rest else []
        self.dataReceived = self._held.append
        self._aq = for_pool(client.service, pcfg)
        self._pcfg, self._user, self._rule = pcfg, user, rule

    def start(self) -> None:
        """Once this is the client's phase: the answer may be in the cache already."""
        self._aq.lookup(self._user).addCallbacks(self._found, self._broken)

    def _found(self, secret) -> None:
        from pgdoorman.login import Authentication
        client, aq, user = self.client, self._aq, self._user
        if client.closed:
            return
        if secret is None:
            aq.auth_failure += 1
            client.fatal(errors.PgError(
                errors.INVALID_PASSWORD, 'password authentication failed for user "%s"' % user),
                "auth_query found no user %r in pool %r" % (user, self._pcfg.name))
            return

        def outcome(err):
            if err is None:
                aq.auth_success += 1
            elif err.sqlstate == errors.INVALID_PASSWORD:
                aq.login_failed(user)  # a wrong password: perhaps PostgreSQL has a new one

        auth = Authentication(client, self._rule, secret, None, outcome)
        client.enter(auth)
        auth.start()
        data = b"".join(self._held)
        if data and not client.closed:
            client.dataReceived(data)

    def _broken(self, failure) -> None:
        client = self.client
        if client.closed:
            return
        client.fatal(errors.PgError(
            errors.CONNECTION_FAILURE,
            'pgdoorman could not look up user "%s" (auth_query failed; the pgdoorman log '
            "says why)" % self._user),
            "auth_query: %s" % failure.getErrorMessage())


def _with_secret(settings, secret: str):
    """
    A passthrough pool's settings with the user's looked-up secret: an md5 hash or SCRAM
    secret serves the server login as the config's would; a plaintext one (a custom table
    may hold those) is the server password itself, as for a plaintext configured password.
    """
    from pgdoorman.config import password_kind
    plain = password_kind(secret) == "plain"
    return dataclasses.replace(settings, client_password=secret,
                               server_password=secret if plain else None)


def reload_settings(config, pcfg, pool):
    """
    The settings a looked-up user's C{pool} has under a reloaded C{config} whose pool
    C{pcfg} does not list the user, or None when the pool has no place in it any more (the
    auth_query is gone, or dedicated mode now shares server_user's pool).  A passthrough
    pool keeps the secret it logs in with: the config does not hold it, the lookup did.
    The reload compares these with the pool's own as for a configured user: a pool whose
    server connections are the same stays, with its servers and clients, instead of
    draining.
    """
    aq = pcfg.auth_query
    if aq is None:
        return None
    if aq.server_user is not None and pool.user != aq.server_user:
        return None
    settings = config.pool_settings(pcfg.name, pool.user)
    secret = pool.settings.client_password
    if aq.server_user is None and secret is not None:
        settings = _with_secret(settings, secret)
    return settings


def _forget_unused_pools(service) -> None:
    """
    Looked-up users come and go: a pool of theirs with no client and no server left (its
    servers closed by idle_timeout or server_lifetime) is dropped when another such pool is
    made, so that their number stays that of the users seen lately.
    """
    for key, pool in list(service.pools.items()):
        if getattr(pool, "auth_query", False) and not pool.clients and not pool.servers \
                and not pool.connecting and not pool.waiting and not pool.members:
            del service.pools[key]
            pcfg = service.config.pools.get(pool.database)
            if pcfg is not None and pcfg.auth_query is not None:
                for_pool(service, pcfg).pools_destroyed += 1


def dynamic_pool(service, pcfg, user: str):
    """
    The pool for C{user}, a user of C{pcfg} known through its auth_query (None if it is not
    one): its own (passthrough) or the pool of server_user shared by all (dedicated).
    """
    if pcfg.auth_query is None:
        return None
    aq = for_pool(service, pcfg)
    entry = aq.entries.get(user)
    if entry is not None and entry.secret is None:
        return None
    server_user = pcfg.auth_query.server_user
    if entry is None and server_user is None:
        # A client the previous process logged in (zero-downtime upgrade): its pool is
        # made now, and learns the secret when this lookup answers.
        aq.lookup(user).addErrback(lambda f: None)
    from pgdoorman.pool import Pool
    owner = server_user or user
    key = (pcfg.name, owner)
    pool = service.pools.get(key)
    if pool is None:
        _forget_unused_pools(service)
        settings = service.config.pool_settings(pcfg.name, owner)
        if server_user is None and entry is not None:
            settings = _with_secret(settings, entry.secret)
        pool = service.pools[key] = Pool(service, pcfg.name, owner, settings)
        pool.auth_query = True
        aq.pools_created += 1
        pool.paused = service.paused_all or pcfg.name in service.paused_databases
        log.info("auth_query {db}: new pool for {user} ({mode})", db=pcfg.name, user=owner,
                 mode="dedicated" if server_user else "passthrough")
    return pool
