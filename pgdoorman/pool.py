"""
Pools of server connections, one per (database, user), shared by every client.

All pool state lives here — which servers are idle, which clients wait, the counters — so the
protocol classes stay thin and the admin console and metrics read one place.  A client asks with
L{Pool.checkout} and gets a server through C{client.serverAssigned(server)}, at once when one is
idle or later, in FIFO order, when one is checked in or connected.  A periodic janitor expires
waiting clients (query_wait_timeout), retires idle and old servers (idle_timeout,
server_lifetime) and keeps min_pool_size connections open.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Dict, Optional, Tuple

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from pgdoorman.prepared import StatementCache
from pgdoorman.protocol import errors
from pgdoorman.server import connect_server

#: How often the janitor runs; also the granularity of query_wait_timeout.
JANITOR_INTERVAL = 0.25


class PoolStats:
    """Plain counters, incremented on the hot path, read by SHOW STATS and /metrics."""

    __slots__ = ("xact_count", "query_count", "wait_count", "wait_time", "max_wait",
                 "server_connects", "server_connect_errors", "wait_timeouts")

    def __init__(self):
        self.xact_count = 0
        self.query_count = 0
        self.wait_count = 0
        self.wait_time = 0.0
        self.max_wait = 0.0
        self.server_connects = 0
        self.server_connect_errors = 0
        self.wait_timeouts = 0


class Pool:
    """
    The server connections for one (database, user) and the clients waiting for them.

    @ivar idle: servers ready for a client; the most recently used at the right end (LIFO
        checkout takes from there, server_round_robin takes the oldest from the left).
    @ivar waiting: clients waiting for a server, oldest first.
    @ivar servers: every logged-in server connection of the pool, idle or not.
    @ivar server_params: ParameterStatus values of the first server, told to new clients.
    @ivar scram_client_key: the ClientKey recovered from a client's SCRAM login, which lets the
        pooler log in to a SCRAM server when the config holds only the SCRAM secret.
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
        self.connecting = 0
        self.server_params: Optional[Dict[str, str]] = None
        self.default_params: Optional[Dict[str, Optional[str]]] = None
        self.scram_client_key: Optional[bytes] = None
        self.last_connect_error: Optional[errors.PgError] = None
        self.stats = PoolStats()
        self.clients = 0
        self.transaction_mode = settings.pool_mode == "transaction"
        #: the pool's one copy of each prepared statement text (transaction mode).
        self.statements = StatementCache(settings.prepared_statements_cache_size or 0)

    # -- clients asking for and giving back servers -----------------------------------------

    def checkout(self, client) -> None:
        """Give C{client} a server now (C{client.serverAssigned}) or queue it."""
        if self.idle and not self.waiting:
            server = self.idle.popleft() if self.settings.server_round_robin else self.idle.pop()
            server.client = client
            client.serverAssigned(server)
            return
        client.wait_started = time.monotonic()
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
        if server.closing:
            return
        now = time.monotonic()
        lifetime = self.settings.server_lifetime
        if lifetime and now - server.created > lifetime:
            server.close()
            self._grow()
            return
        if self.waiting:
            client = self.waiting.popleft()
            self._waited(client, now)
            server.client = client
            client.serverAssigned(server)
            return
        server.last_used = now
        self.idle.append(server)

    def _waited(self, client, now: float) -> None:
        w = now - client.wait_started
        st = self.stats
        st.wait_count += 1
        st.wait_time += w
        if w > st.max_wait:
            st.max_wait = w

    # -- opening and losing servers ----------------------------------------------------------

    @property
    def size(self) -> int:
        return self.settings.pool_size

    def _grow(self) -> None:
        """Open connections for waiting clients, never beyond pool_size."""
        while (len(self.waiting) > self.connecting
               and len(self.servers) + self.connecting < self.settings.pool_size):
            self._connect()

    def _connect(self) -> defer.Deferred:
        self.connecting += 1
        d = connect_server(self, self.settings)
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

    def _connectFailed(self, failure) -> None:
        self.connecting -= 1
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

    def server_lost(self, server) -> None:
        self.servers.discard(server)
        try:
            self.idle.remove(server)
        except ValueError:
            pass
        self._grow()

    # -- housekeeping -------------------------------------------------------------------------

    def janitor(self, now: float) -> None:
        s = self.settings
        timeout = s.query_wait_timeout
        if timeout:
            while self.waiting and now - self.waiting[0].wait_started > timeout:
                client = self.waiting.popleft()
                self.stats.wait_timeouts += 1
                client.serverUnavailable(errors.PgError(
                    errors.PROTOCOL_VIOLATION,
                    "query_wait_timeout: no server connection became free for database "
                    '"%s" user "%s" within %gs (pool_size %d)'
                    % (self.database, self.user, timeout, s.pool_size)))
        keep = s.min_pool_size
        if self.idle and (s.idle_timeout or s.server_lifetime):
            for server in list(self.idle):
                if len(self.servers) <= keep:
                    break
                if (s.idle_timeout and now - server.last_used > s.idle_timeout) or \
                        (s.server_lifetime and now - server.created > s.server_lifetime):
                    self.idle.remove(server)
                    self.servers.discard(server)
                    server.close()
        while len(self.servers) + self.connecting < keep:
            self._connect().addErrback(lambda f: None)

    def close_idle(self) -> None:
        while self.idle:
            server = self.idle.pop()
            self.servers.discard(server)
            server.close()

    def counts(self) -> Tuple[int, int, int]:
        """(active servers, idle servers, waiting clients)."""
        return len(self.servers) - len(self.idle), len(self.idle), len(self.waiting)


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
        self.cancel_keys: Dict[Tuple[int, int], object] = {}
        self.clients: set = set()
        self._ids = 0
        self._janitor = task.LoopingCall(self._tick)

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def get_pool(self, database: str, user: str) -> Optional[Pool]:
        pool = self.pools.get((database, user))
        if pool is None:
            pcfg = self.config.pools.get(database)
            if pcfg is None or pcfg.user(user) is None:
                return None
            pool = self.pools[(database, user)] = Pool(
                self, database, user, self.config.pool_settings(database, user))
        return pool

    # -- cancel keys ---------------------------------------------------------------------------

    def register_client(self, client) -> Tuple[int, int]:
        """Give C{client} a fresh BackendKeyData (pid, secret) of our own."""
        while True:
            pid = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
            secret = int.from_bytes(os.urandom(4), "big", signed=True)
            if (pid, secret) not in self.cancel_keys:
                break
        self.cancel_keys[(pid, secret)] = client
        self.clients.add(client)
        return pid, secret

    def unregister_client(self, client) -> None:
        self.clients.discard(client)
        key = getattr(client, "cancel_key", None)
        if key is not None and self.cancel_keys.get(key) is client:
            del self.cancel_keys[key]

    def cancel(self, pid: int, secret: int) -> None:
        """A CancelRequest arrived: forward it to the server the client is using now."""
        client = self.cancel_keys.get((pid, secret))
        if client is None:
            self.log.info("cancel request with unknown key ignored")
            return
        server = client.server
        if server is None:
            self.log.debug("cancel request for an idle client ignored")
            return
        server.send_cancel()

    # -- lifecycle ---------------------------------------------------------------------------

    def startService(self):
        service.Service.startService(self)
        for name, pcfg in self.config.pools.items():
            for ucfg in pcfg.users:
                if self.config.pool_settings(name, ucfg.username).min_pool_size:
                    self.get_pool(name, ucfg.username)
        self._janitor.start(JANITOR_INTERVAL, now=True)

    def stopService(self):
        service.Service.stopService(self)
        if self._janitor.running:
            self._janitor.stop()
        for pool in self.pools.values():
            pool.close_idle()
            for server in list(pool.servers):
                server.close()

    def _tick(self) -> None:
        now = time.monotonic()
        for pool in list(self.pools.values()):
            try:
                pool.janitor(now)
            except Exception:
                self.log.failure("janitor failed for pool {db}/{user}", db=pool.database,
                                 user=pool.user)
