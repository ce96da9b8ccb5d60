"""
Pools of server connections, one per (database, user), shared by every client.

All pool state lives here — which servers are idle, which clients wait, the counters — so the
protocol classes stay thin and the admin console and metrics read one place.  A client asks with
L{Pool.checkout} and gets a server through C{client.serverAssigned(server)}, at once when one is
idle or later, in FIFO order, when one is checked in or connected.  A periodic janitor expires
waiting clients (query_wait_timeout), retires idle and old servers (idle_timeout,
server_lifetime) and keeps min_pool_size connections open.

The operator's controls live here too: L{PoolService.reload} applies a new configuration to
running pools, L{PoolService.pause}/L{PoolService.resume} hold checkouts, and
L{PoolService.reconnect} and L{PoolService.kill} retire server connections.
"""

from __future__ import annotations

import bisect
import os
import time
from collections import deque
from typing import Dict, Iterable, List, Optional, Tuple

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from pgdoorman import coordinator as _coordinator
from pgdoorman import idlecheck
from pgdoorman.auth import query as _auth_query
from pgdoorman.coordinator import Coordinator
from pgdoorman.fallback import Fallback
from pgdoorman.prepared import StatementCache
from pgdoorman.protocol import errors
from pgdoorman.server import connect_server
from pgdoorman.stats import PoolStats, Snapshot

__all__ = ["Pool", "PoolService", "PoolStats"]

#: How often the janitor runs; also the granularity of query_wait_timeout.
JANITOR_INTERVAL = 0.25

#: PgBouncer's stats_period: SHOW STATS averages are over this many seconds.
STATS_PERIOD = 60.0

#: Settings that decide what a server connection is; when one changes on reload, the pool is
#: replaced by a new one and the old one drains (its servers cannot be reused).
_IDENTITY = ("pool_mode", "server_host", "server_port", "server_database", "server_username",
             "server_password", "startup_parameters", "application_name",
             "prepared_statements_cache_size", "server_prepared_statements_cache_size")

_monotonic = time.monotonic
_bisect = bisect.bisect_left


class Pool:
    """
    The server connections for one (database, user) and the clients waiting for them.

    @ivar idle: servers ready for a client; the most recently used at the right end (LIFO
        checkout takes from there, server_round_robin takes the oldest from the left).
    @ivar waiting: clients waiting for a server, oldest first.
    @ivar servers: every logged-in server connection of the pool, idle or not.
    @ivar members: logged-in clients of the pool (for SHOW CLIENTS and the counters).
    @ivar server_params: ParameterStatus values of the first server, told to new clients.
    @ivar scram_client_key: the ClientKey recovered from a client's SCRAM login, which lets the
        pooler log in to a SCRAM server when the config holds only the SCRAM secret.
    @ivar paused: PAUSE is in force: no server is handed to a client until RESUME.
    @ivar draining: the pool was removed (or replaced) by a reload; its clients carry on, no
        new client joins it, and it is closed when the last one leaves.
    """

    log = Logger()

    def __init__(self, service, database: str, user: str, settings):
        self.service = service
        self.database = database
        self.user = user
        self.settings = settings
        self.idle: deque = deque()
        self.waiting: deque = deque()
        self.servers: set = set()
        self.members: set = set()
        self.connecting = 0
        self.server_params: Optional[Dict[str, str]] = None
        self.default_params: Optional[Dict[str, Optional[str]]] = None
        self.scram_client_key: Optional[bytes] = None
        self.last_connect_error: Optional[errors.PgError] = None
        self.stats = PoolStats()
        self.clients = 0
        self.paused = False
        self.draining = False
        self.created = time.time()
        self.transaction_mode = settings.pool_mode == "transaction"
        #: the pool's one copy of each prepared statement text (transaction mode).
        self.statements = StatementCache(settings.prepared_statements_cache_size or 0)
        #: totals at the last two stats periods, for SHOW STATS averages.
        self.older = self.newer = Snapshot()
        #: Patroni-assisted fallback (pgdoorman.fallback), idle unless patroni_api_urls is set.
        self.fallback = Fallback(self)
        #: the database's L{Coordinator} when it sets max_db_connections (PoolService sets it).
        self.coordinator: Optional[Coordinator] = None
        #: servers being checked before a checkout (server_idle_check_timeout, sv_tested).
        self.testing: set = set()
        self.idle_check = service.config.general.server_idle_check_timeout
        #: the connection that LISTENs for the pool's clients (L{pgdoorman.listen.Listener}),
        #: made by the first LISTEN.
        self.listener = None

    # -- clients asking for and giving back servers -----------------------------------------

    def checkout(self, client) -> None:
        """Give C{client} a server now (C{client.serverAssigned}) or queue it."""
        now = _monotonic()
        if self.idle and not self.waiting and not self.paused:
            server = self.idle.popleft() if self.settings.server_round_robin else self.idle.pop()
            if self.idle_check and now - server.last_used > self.idle_check:
                # Idle long enough to be dead: the client waits for the check (idlecheck).
                client.wait_started = now
                self.waiting.append(client)
                idlecheck.check(self, server)
                return
            server.client = client
            server.assigned_at = now
            st = self.stats
            st.server_assignment_count += 1
            st.wait_hist.counts[0] += 1  # waited 0s
            client.serverAssigned(server)
            return
        client.wait_started = now
        self.waiting.append(client)
        self._grow()

    def cancel_wait(self, client) -> None:
        try:
            self.waiting.remove(client)
        except ValueError:
            pass

    def checkin(self, server) -> None:
        """A client is done with C{server}; hand it to the next waiting client or keep it."""
        server.client = None
        if server.cancels:
            # A cancel for the last client's query is on its way: it would land on the
            # next client's (PgBouncer holds such servers back too).
            server.release_after_cancel = True
            return
        now = _monotonic()
        started = server.assigned_at
        if started:
            server.assigned_at = 0.0
            if self.transaction_mode:
                took = now - started
                st = self.stats
                st.xact_time += took
                h = st.xact_hist  # Histogram.observe, in line: once per transaction
                h.counts[_bisect(h.bounds, took)] += 1
                h.sum += took
        if server.closing:
            return
        lifetime = self.settings.server_lifetime
        if (lifetime and now - server.created > lifetime) or server.close_needed \
                or self.draining and not self.clients:
            self._drop(server)
            self._grow()
            return
        if len(self.servers) > self.settings.pool_size:
            # pool_size was lowered by a reload: give back the extra connections as they free up
            self._drop(server)
            return
        if self.waiting and not self.paused:
            client = self.waiting.popleft()
            self._waited(client, now)
            server.client = client
            server.assigned_at = now
            client.serverAssigned(server)
            return
        server.last_used = now
        self.idle.append(server)
        if self.coordinator is not None and self.coordinator.blocked:
            self.coordinator.returned(self)
        if self.paused:
            self.service.pause_progress()

    def _waited(self, client, now: float) -> None:
        w = now - client.wait_started
        st = self.stats
        st.server_assignment_count += 1
        st.wait_count += 1
        st.wait_time += w
        st.wait_hist.observe(w)
        if w > st.max_wait:
            st.max_wait = w

    # -- opening and losing servers ----------------------------------------------------------

    @property
    def size(self) -> int:
        return self.settings.pool_size

    def _grow(self) -> None:
        """Open connections for waiting clients, never beyond pool_size."""
        limit = self.service.config.general.max_concurrent_creates or self.settings.pool_size
        coordinator = self.coordinator
        while (len(self.waiting) > self.connecting + len(self.testing)
               and len(self.servers) + self.connecting < self.settings.pool_size
               and self.connecting < limit):
            if coordinator is not None and not coordinator.acquire(self):
                break  # max_db_connections: the coordinator wakes us (pgdoorman.coordinator)
            if self.service.budget is not None and not self.service.budget.acquire(self):
                break  # worker_threads: the budget broker grants a slot later (budget.py)
            self._connect()

    def _connect(self) -> defer.Deferred:
        self.connecting += 1
        d = self.fallback.connect() or connect_server(self, self.settings)
        d.addCallbacks(self._connected, self._connectFailed)
        return d

    def _connected(self, server) -> None:
        self.connecting -= 1
        self.stats.server_connects += 1
        self.last_connect_error = None
        self.servers.add(server)
        if self.server_params is None:
            self.server_params = dict(server.startup_params)
            self.default_params = dict(server.params)
        self.log.debug("pool {db}/{user}: server {id} connected (backend pid {pid})",
                       db=self.database, user=self.user, id=server.id, pid=server.backend_pid)
        self.checkin(server)
        # max_concurrent_creates may have held back connections for other waiting clients
        # (in session mode no checkin would ever start them).
        self._grow()

    def _connectFailed(self, failure) -> None:
        self.connecting -= 1
        if self.coordinator is not None:
            self.coordinator.released()
        if self.service.budget is not None:
            self.service.budget.release(self)
        self.stats.server_connect_errors += 1
        err = failure.value
        if not isinstance(err, errors.PgError):
            err = errors.PgError(errors.CANNOT_CONNECT_NOW,
                                 "pgdoorman could not connect to the server: %s"
                                 % failure.getErrorMessage())
        self.last_connect_error = err
        self.log.error("pool {db}/{user}: server connection failed: {error}",
                       db=self.database, user=self.user, error=err)
        # Nobody will check a server in: tell the waiting clients now rather than at timeout.
        if not self.servers and not self.connecting:
            waiting, self.waiting = self.waiting, deque()
            for client in waiting:
                client.serverUnavailable(err)

    def _drop(self, server) -> None:
        """Close an idle (or just checked-in) server and forget it."""
        try:
            self.idle.remove(server)
        except ValueError:
            pass
        self._retire(server)
        if self.coordinator is not None:
            self.coordinator.dropping(server)
        server.close()

    def _retire(self, server) -> None:
        if server in self.servers:
            self.servers.discard(server)
            self.stats.server_bytes += server.server_bytes

    def server_lost(self, server) -> None:
        if self.service.budget is not None:
            self.service.budget.lost(self, server)
        self._retire(server)
        try:
            self.idle.remove(server)
        except ValueError:
            pass
        if self.coordinator is not None:
            self.coordinator.lost(server)
        if self.paused:
            self.service.pause_progress()
        self._grow()

    # -- clients joining and leaving -----------------------------------------------------------

    def joined(self, client) -> None:
        self.members.add(client)
        self.stats.client_connect_count += 1

    def left(self, client) -> None:
        """A logged-in client went away: keep its counters in the pool's totals."""
        if client in self.members:
            self.members.discard(client)
            st = self.stats
            st.query_count += client.query_count
            st.client_bytes += client.client_bytes

    # -- housekeeping -------------------------------------------------------------------------

    def janitor(self, now: float) -> None:
        if self.draining and not self.clients:
            self.service.drained(self)
            return
        s = self.settings
        if self.waiting and not self.paused:
            self._grow()  # retry connections that failed while other servers were busy
        timeout = s.query_wait_timeout
        if timeout and not self.paused:
            while self.waiting and now - self.waiting[0].wait_started > timeout:
                client = self.waiting.popleft()
                self.stats.wait_timeouts += 1
                client.serverUnavailable(errors.PgError(
                    errors.PROTOCOL_VIOLATION,
                    "query_wait_timeout: no server connection became free for database "
                    '"%s" user "%s" within %gs (pool_size %d)'
                    % (self.database, self.user, timeout, s.pool_size)))
        keep = 0 if self.draining else s.min_pool_size
        if self.idle and (s.idle_timeout or s.server_lifetime):
            for server in list(self.idle):
                if len(self.servers) <= keep:
                    break
                if (s.idle_timeout and now - server.last_used > s.idle_timeout) or \
                        (s.server_lifetime and now - server.created > s.server_lifetime):
                    self._drop(server)
        coordinator = self.coordinator
        while len(self.servers) + self.connecting < keep:
            if coordinator is not None and not coordinator.try_acquire(self):
                break  # min_pool_size never takes the database's last slots from clients
            if self.service.budget is not None and not self.service.budget.acquire(self):
                break  # worker_threads: the grant opens it (budget.BudgetClient.granted)
            self._connect().addErrback(lambda f: None)

    def close_idle(self) -> None:
        while self.idle:
            self._drop(self.idle[-1])

    def apply_settings(self, settings) -> None:
        """
        New settings from a reload, for the same kind of server connection: a bigger pool
        serves waiting clients now, a smaller one closes idle extra servers now and busy ones
        as they come back.
        """
        self.settings = settings
        extra = len(self.servers) - settings.pool_size
        while extra > 0 and self.idle:
            self._drop(self.idle[0])
            extra -= 1
        if not self.paused:
            while self.waiting and self.idle:
                server = self.idle.pop()
                client = self.waiting.popleft()
                now = _monotonic()
                self._waited(client, now)
                server.client = client
                server.assigned_at = now
                client.serverAssigned(server)
        self._grow()

    def counts(self) -> Tuple[int, int, int]:
        """(active servers, idle servers, waiting clients); servers being tested are neither."""
        return (len(self.servers) - len(self.idle) - len(self.testing), len(self.idle),
                len(self.waiting))

    def active_servers(self) -> int:
        return len(self.servers) - len(self.idle)

    def traffic(self) -> Tuple[int, int, int]:
        """(queries, bytes received from clients, bytes sent to clients) so far."""
        st = self.stats
        queries, received, sent = st.query_count, st.client_bytes, st.server_bytes
        for client in self.members:
            queries += client.query_count
            received += client.client_bytes
        for server in self.servers:
            sent += server.server_bytes
        return queries, received, sent

    def snapshot(self) -> Snapshot:
        """Totals now, in PgBouncer's units (times in microseconds)."""
        st = self.stats
        queries, received, sent = self.traffic()
        statements = self.statements
        xact_us = int(st.xact_time * 1e6)
        return Snapshot(server_assignment_count=st.server_assignment_count,
                        xact_count=st.xact_count, query_count=queries,
                        client_bytes=received, server_bytes=sent,
                        xact_time=xact_us, query_time=int(st.query_time * 1e6),
                        wait_time=int(st.wait_time * 1e6),
                        client_parse_count=(statements.hits + statements.misses
                                            - statements.reparses),
                        server_parse_count=statements.misses, bind_count=statements.binds,
                        client_connect_count=st.client_connect_count)

    def max_wait_now(self, now: Optional[float] = None) -> float:
        """Seconds the oldest waiting client has waited (SHOW POOLS maxwait)."""
        if not self.waiting:
            return 0.0
        return max(0.0, (now or _monotonic()) - self.waiting[0].wait_started)


class _PauseWaiter:
    __slots__ = ("databases", "deferred")

    def __init__(self, databases, deferred):
        self.databases = databases
        self.deferred = deferred


class PoolService(service.Service):
    """
    Holds the configuration, every pool, the registry of cancel keys and the janitor.

    Pools are made on first use of a (database, user) that the configuration knows, or at
    start for users with a min_pool_size.
    """

    log = Logger()

    def __init__(self, config):
        self.config = config
        self.pools: Dict[Tuple[str, str], Pool] = {}
        #: pools removed or replaced by a reload that still have clients.
        self.draining: List[Pool] = []
        self.cancel_keys: Dict[Tuple[int, int], object] = {}
        self.clients: set = set()
        #: during an upgrade, the new process passes cancels for keys it does not know to
        #: the old one (L{pgdoorman.upgrade}); returns True when it did.
        self.forward_cancel = None
        #: worker_threads > 1: the L{pgdoorman.budget.BudgetClient} every new server
        #: connection asks first, and this worker's tag in the cancel keys it gives out
        #: (L{pgdoorman.workers}); None and 0 in a single process.
        self.budget = None
        self.worker_tag = 0
        #: ErrorResponses sent to clients, by SQLSTATE (auth failures, timeouts, ...).
        self.errors: Dict[str, int] = {}
        #: databases paused with PAUSE db; C{paused_all} for a plain PAUSE.
        self.paused_databases: set = set()
        self.paused_all = False
        self._pause_waiters: List[_PauseWaiter] = []
        self.started = time.time()
        self.reloads = 0
        self._ids = 0
        #: one L{Coordinator} per database that sets max_db_connections.
        self.coordinators: Dict[str, Coordinator] = {}
        self._janitor = task.LoopingCall(self._tick)
        self._stats = task.LoopingCall(self._rollStats)
        self._stats_stamp = (_monotonic() - 1.0, _monotonic())

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def get_pool(self, database: str, user: str) -> Optional[Pool]:
        pool = self.pools.get((database, user))
        if pool is None:
            pcfg = self.config.pools.get(database)
            if pcfg is not None and pcfg.user(user) is None:
                # Users looked up by the pool's auth_query (pgdoorman.auth.query).
                return _auth_query.dynamic_pool(self, pcfg, user)
            if pcfg is None:
                return None
            pool = self.pools[(database, user)] = Pool(
                self, database, user, self.config.pool_settings(database, user))
            pool.paused = self.paused_all or database in self.paused_databases
            coordinator = self.coordinators.get(database)
            if coordinator is not None:
                pool.coordinator = coordinator
                coordinator.join(pool)
        return pool

    def all_pools(self) -> List[Pool]:
        """Every pool, live ones first, then the draining ones."""
        return list(self.pools.values()) + list(self.draining)

    def count_error(self, err) -> None:
        """An ErrorResponse went to a client (called by the client side, never per message)."""
        code = getattr(err, "sqlstate", None) or errors.INTERNAL_ERROR
        self.errors[code] = self.errors.get(code, 0) + 1

    # -- cancel keys ---------------------------------------------------------------------------

    def register_client(self, client) -> Tuple[int, int]:
        """Give C{client} a fresh BackendKeyData (pid, secret) of our own."""
        while True:
            pid = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
            if self.worker_tag:
                pid = (pid & 0xFFFFFF) | self.worker_tag  # which worker: pgdoorman.workers
            secret = int.from_bytes(os.urandom(4), "big", signed=True)
            if (pid, secret) not in self.cancel_keys:
                break
        self.cancel_keys[(pid, secret)] = client
        self.clients.add(client)
        pool = getattr(client, "pool", None)
        if pool is not None:
            pool.joined(client)
        return pid, secret

    def adopt_client(self, client, key: Tuple[int, int]) -> Tuple[int, int]:
        """
        Register a client taken over from the previous process (zero-downtime upgrade) under
        the BackendKeyData it already has, so that cancels sent with it reach it here.
        """
        key = (int(key[0]), int(key[1]))
        self.cancel_keys[key] = client
        self.clients.add(client)
        pool = getattr(client, "pool", None)
        if pool is not None:
            pool.joined(client)
        return key

    def unregister_client(self, client) -> None:
        self.clients.discard(client)
        key = getattr(client, "cancel_key", None)
        if key is not None and self.cancel_keys.get(key) is client:
            del self.cancel_keys[key]
        pool = getattr(client, "pool", None)
        if pool is not None:
            pool.left(client)

    def cancel(self, pid: int, secret: int) -> None:
        """A CancelRequest arrived: forward it to the server the client is using now."""
        client = self.cancel_keys.get((pid, secret))
        if client is None:
            if self.forward_cancel is not None and self.forward_cancel(pid, secret):
                return  # the client is still on the previous process (an upgrade)
            self.log.info("cancel request with unknown key ignored")
            return
        server = client.server
        if server is None:
            self.log.debug("cancel request for an idle client ignored")
            return
        server.send_cancel()

    # -- reload ---------------------------------------------------------------------------------

    def reload(self, config) -> Dict[str, List[str]]:
        """
        Apply a new configuration to the running pools; no connected client is dropped.

        Pools whose (database, user) is gone drain: their clients carry on until they leave.
        Pools whose server connection settings changed (host, port, database, server user or
        password, pool_mode, ...) are replaced by a new pool for new clients and the old one
        drains the same way.  Other changes (pool_size, timeouts, min_pool_size) apply in
        place.  Passwords are read from the config at each login, so a changed password
        applies to the next login.  Pools of users looked up by an auth_query are judged
        the same way (L{pgdoorman.auth.query.reload_settings}).

        @return: what changed, as lists of "db/user" under "added", "changed", "replaced" and
            "removed", for the log.
        """
        old = self.config
        self.config = config
        report: Dict[str, List[str]] = {"added": [], "changed": [], "replaced": [],
                                        "removed": []}
        for key, pool in list(self.pools.items()):
            db, user = key
            pcfg = config.pools.get(db)
            if pcfg is not None and pcfg.user(user) is None and \
                    getattr(pool, "auth_query", False):
                # A looked-up user's pool stays unless its settings changed (PgDoorman).
                settings = _auth_query.reload_settings(config, pcfg, pool)
            elif pcfg is None or pcfg.user(user) is None:
                settings = None
            else:
                settings = config.pool_settings(db, user)
            if settings is None:
                report["removed"].append("%s/%s" % key)
                self._startDrain(key, pool)
                continue
            if any(getattr(settings, f) != getattr(pool.settings, f) for f in _IDENTITY):
                report["replaced"].append("%s/%s" % key)
                self._startDrain(key, pool)
                continue
            if settings != pool.settings:
                report["changed"].append("%s/%s" % key)
                pool.apply_settings(settings)
        for name, pcfg in config.pools.items():
            for ucfg in pcfg.users:
                if name not in old.pools or old.pools[name].user(ucfg.username) is None:
                    report["added"].append("%s/%s" % (name, ucfg.username))
        for db in list(self.paused_databases):
            if db not in config.pools:
                self.paused_databases.discard(db)
        for pool in self.all_pools():
            pool.idle_check = config.general.server_idle_check_timeout
        _coordinator.attach(self)
        self._ensureMinPools()
        self.reloads += 1
        self.pause_progress()
        return report

    def _startDrain(self, key, pool: Pool) -> None:
        del self.pools[key]
        pool.draining = True
        pool.close_idle()
        if pool.clients:
            self.draining.append(pool)
            # Clients waiting in the old pool still get servers from it.
            pool._grow()
        else:
            self.drained(pool)

    def drained(self, pool: Pool) -> None:
        """The last client of a draining pool left: close what is left of it."""
        try:
            self.draining.remove(pool)
        except ValueError:
            pass
        pool.close_idle()
        for server in list(pool.servers):
            if server.client is None:
                pool._drop(server)
            else:
                server.close_needed = True
        self.log.info("pool {db}/{user} drained and closed", db=pool.database, user=pool.user)

    # -- pause, resume, reconnect, kill ---------------------------------------------------------

    def _targets(self, database: Optional[str]) -> List[Pool]:
        return [p for p in self.all_pools() if database is None or p.database == database]

    def known_database(self, database: str) -> bool:
        return database in self.config.pools or any(p.database == database
                                                     for p in self.all_pools())

    def pause(self, database: Optional[str] = None) -> defer.Deferred:
        """
        Hold new checkouts (clients wait, they are not refused) for C{database} or all
        databases; the Deferred fires once no server of those pools is in use.
        """
        if database is None:
            self.paused_all = True
        else:
            self.paused_databases.add(database)
        for pool in self._targets(database):
            pool.paused = True
        d = defer.Deferred()
        self._pause_waiters.append(_PauseWaiter(None if database is None else {database}, d))
        self.pause_progress()
        return d

    def is_paused(self, database: Optional[str] = None) -> bool:
        if database is None:
            return self.paused_all
        return self.paused_all or database in self.paused_databases

    def pause_progress(self) -> None:
        """Fire the PAUSE Deferreds whose pools have no server in use any more."""
        if not self._pause_waiters:
            return
        still = []
        ready = []
        for waiter in self._pause_waiters:
            busy = any(p.active_servers() or p.connecting
                       for p in self.all_pools()
                       if waiter.databases is None or p.database in waiter.databases)
            (still if busy else ready).append(waiter)
        self._pause_waiters = still
        for waiter in ready:
            waiter.deferred.callback(None)

    def resume(self, database: Optional[str] = None) -> None:
        if database is None:
            self.paused_all = False
            self.paused_databases.clear()
        else:
            self.paused_databases.discard(database)
        for waiter in list(self._pause_waiters):
            if database is None or (waiter.databases and database in waiter.databases):
                self._pause_waiters.remove(waiter)
                waiter.deferred.errback(errors.PgError(
                    errors.QUERY_CANCELED, "PAUSE interrupted by RESUME", severity="ERROR"))
        for pool in self.all_pools():
            if pool.paused and not self.is_paused(pool.database):
                pool.paused = False
                pool.apply_settings(pool.settings)

    def reconnect(self, database: Optional[str] = None) -> int:
        """
        Close every server connection of C{database} (or all) as soon as it is free; clients
        get fresh ones.  Returns how many servers were marked.
        """
        n = 0
        for pool in self._targets(database):
            for server in list(pool.servers):
                n += 1
                if server in pool.idle:
                    pool._drop(server)
                else:
                    server.close_needed = True
        return n

    def kill(self, database: str) -> int:
        """Drop every client and server of C{database} now, and pause it (PgBouncer's KILL)."""
        self.paused_databases.add(database)
        n = 0
        for pool in self._targets(database):
            pool.paused = True
            for client in set(pool.members) | set(pool.waiting):
                n += 1
                client.fatal(errors.PgError(errors.ADMIN_SHUTDOWN,
                                             "database removed by KILL from the admin console"),
                              "KILL %s" % database)
            pool.close_idle()
            for server in list(pool.servers):
                server.close()
        return n

    # -- lifecycle ---------------------------------------------------------------------------

    def _ensureMinPools(self) -> None:
        # Every configured (database, user) has its pool from the start and after each reload,
        # so SHOW POOLS and /metrics list it with zeros (as PgBouncer does); a new pool opens
        # nothing, the janitor opens its min_pool_size connections.
        for name, pcfg in self.config.pools.items():
            for ucfg in pcfg.users:
                self.get_pool(name, ucfg.username)

    def startService(self):
        service.Service.startService(self)
        _coordinator.attach(self)
        self._ensureMinPools()
        self._janitor.start(JANITOR_INTERVAL, now=True)
        self._stats.start(STATS_PERIOD, now=False)

    def stopService(self):
        service.Service.stopService(self)
        for loop in (self._janitor, self._stats):
            if loop.running:
                loop.stop()
        for pool in self.all_pools():
            pool.close_idle()
            for server in list(pool.servers):
                server.close()

    def _tick(self) -> None:
        now = _monotonic()
        for pool in self.all_pools():
            try:
                pool.janitor(now)
            except Exception:
                self.log.failure("janitor failed for pool {db}/{user}", db=pool.database,
                                 user=pool.user)
        if self.coordinators:
            _coordinator.tick_all(self, now)

    def _rollStats(self) -> None:
        """Every STATS_PERIOD: keep the totals of the last two periods for the averages."""
        self._stats_stamp = (self._stats_stamp[1], _monotonic())
        for pool in self.all_pools():
            pool.older = pool.newer
            pool.newer = pool.snapshot()

    def stats_period(self) -> float:
        """Seconds between the older snapshot and now (the averaging window)."""
        return max(_monotonic() - self._stats_stamp[0], 1e-6)

    def pools_by_database(self) -> Dict[str, List[Pool]]:
        out: Dict[str, List[Pool]] = {}
        for pool in self.all_pools():
            out.setdefault(pool.database, []).append(pool)
        return out

    def server_count(self) -> int:
        return sum(len(p.servers) for p in self.all_pools())

    def iter_servers(self) -> Iterable:
        for pool in self.all_pools():
            for server in pool.servers:
                yield pool, server
