"""
The pool coordinator: one database's cap on server connections across all its user pools.

PgDoorman's C{max_db_connections} (a C{pools.<name>} key) bounds how many connections to
PostgreSQL all the (database, user) pools of one database hold together.  L{PoolService}
owns one L{Coordinator} per database that sets it; each L{pgdoorman.pool.Pool} of that
database asks it before opening a connection.  When the cap is reached the coordinator does
what PgDoorman's does, in this order:

  1. B{evict}: close one idle connection of another pool of the database, never taking that
     pool below its floor, C{max(min_pool_size, min_guaranteed_pool_size)}, and never one
     younger than C{min_connection_lifetime}; the donor is the pool with the most spare
     connections above its floor, the slower one (higher p95 transaction time) on a tie;
  2. B{wait} for a connection of the database to close or for a peer to return one that can
     then be evicted, up to C{reserve_pool_timeout} (counted from when the pool's oldest
     waiting client started to wait);
  3. B{reserve}: open one of C{reserve_pool_size} connections beyond the cap;
  4. B{exhausted}: the clients that waited that long get
     C{53300 all server connections to database "X" are in use}.

A connection the pool closes stays counted until its socket is gone, so a new backend never
overlaps the one it replaces.  Idle reuse (checkout of an idle server) never comes here: the
coordinator costs something only on the way to a new connection and only at the cap.

The coordinator reads the pools it serves (their C{servers}, C{connecting}, C{idle},
C{waiting}) and closes a donor's server through C{Pool._drop}; it holds only its own
bookkeeping (the closing servers, the blocked pools and the counters), so it can be tested
with plain objects standing in for pools.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from twisted.logger import Logger

from pgdoorman.protocol import errors

__all__ = ["Coordinator", "CoordinatorSettings", "attach", "config_warnings", "tick_all"]

#: A closed server that never reported its end is forgotten after this long (a safety net:
#: the cap must not shrink for good because one connectionLost went missing).
CLOSING_GRACE = 10.0

_monotonic = time.monotonic


@dataclass(frozen=True)
class CoordinatorSettings:
    """
    The coordinator's knobs, from one C{pools.<name>} table (PgDoorman's spelling).

    @ivar max_db_connections: the cap (> 0; no coordinator exists without one).
    @ivar reserve_pool_size: connections allowed beyond the cap after C{reserve_pool_timeout}.
    @ivar reserve_pool_timeout: seconds a client waits at the cap before the reserve is used.
    @ivar min_guaranteed_pool_size: connections of each user never evicted for another.
    @ivar min_connection_lifetime: seconds; younger connections are never evicted.
    """

    max_db_connections: int
    reserve_pool_size: int = 0
    reserve_pool_timeout: float = 3.0
    min_guaranteed_pool_size: int = 0
    min_connection_lifetime: float = 30.0

    @classmethod
    def from_pool_config(cls, pcfg) -> "Optional[CoordinatorSettings]":
        """The settings of a L{pgdoorman.config.PoolConfig}, or None when uncapped."""
        if not pcfg.max_db_connections:
            return None
        return cls(
            max_db_connections=pcfg.max_db_connections,
            reserve_pool_size=pcfg.reserve_pool_size or 0,
            reserve_pool_timeout=(3.0 if pcfg.reserve_pool_timeout is None
                                  else pcfg.reserve_pool_timeout),
            min_guaranteed_pool_size=pcfg.min_guaranteed_pool_size or 0,
            min_connection_lifetime=(30.0 if pcfg.min_connection_lifetime is None
                                     else pcfg.min_connection_lifetime))


def _p95(pool) -> float:
    try:
        return pool.stats.xact_hist.quantile(0.95)
    except Exception:
        return 0.0


class Coordinator:
    """
    The server connection budget of one database, shared by its pools.

    @ivar members: the pools of the database (live and draining), eviction donors.
    @ivar closing: servers closed by a pool and not yet gone, by server, with when.
    @ivar evicting: of those, the ones closed to make room for a pool, by server.
    @ivar blocked: pools at the cap with clients waiting for a new connection, oldest first
        (a dict used as an ordered set); woken when a connection closes or returns idle.
    @ivar evictions: idle connections closed for another pool (SHOW POOL_COORDINATOR).
    @ivar reserve_acquisitions: connections opened beyond the cap from the reserve.
    @ivar exhaustions: clients refused because even the reserve was full.
    """

    log = Logger()

    def __init__(self, database: str, settings: CoordinatorSettings):
        self.database = database
        self.settings = settings
        self.members: List = []
        self.closing: Dict[object, float] = {}
        self.evicting: Dict[object, object] = {}
        self.blocked: Dict[object, None] = {}
        self.evictions = 0
        self.reserve_acquisitions = 0
        self.exhaustions = 0
        self._waking = False

    # -- membership -------------------------------------------------------------------------

    def join(self, pool) -> None:
        if pool not in self.members:
            self.members.append(pool)

    def leave(self, pool) -> None:
        try:
            self.members.remove(pool)
        except ValueError:
            pass
        self.blocked.pop(pool, None)

    def configure(self, settings: CoordinatorSettings) -> None:
        """A reload changed the knobs: a higher cap serves blocked pools now."""
        self.settings = settings
        self._wake()

    # -- the counts ---------------------------------------------------------------------------

    def current(self) -> int:
        """Server connections of the database: logged in, being opened, or still closing."""
        n = len(self.closing)
        for pool in self.members:
            n += len(pool.servers) + pool.connecting
        return n

    def reserve_in_use(self) -> int:
        return max(0, self.current() - self.settings.max_db_connections)

    def floor(self, pool) -> int:
        """The connections of C{pool} eviction never takes: PgDoorman's effective minimum."""
        return max(pool.settings.min_pool_size or 0, self.settings.min_guaranteed_pool_size)

    # -- asking for a connection --------------------------------------------------------------

    def try_acquire(self, pool) -> bool:
        """
        May C{pool} open a connection without evicting anyone or using the reserve?  For
        keeping min_pool_size, which never fights clients for the last slots.
        """
        return self.current() < self.settings.max_db_connections

    def acquire(self, pool, now: Optional[float] = None) -> bool:
        """
        May C{pool} open one more connection for a waiting client now?

        False means not yet: an eviction is under way or nothing can be evicted, and the pool
        is woken (its C{_grow} called) when that may have changed.  Clients that have waited
        C{reserve_pool_timeout} when neither a slot nor the reserve is free are refused here.
        """
        s = self.settings
        current = self.current()
        if current < s.max_db_connections:
            self.blocked.pop(pool, None)
            return True
        if now is None:
            now = _monotonic()
        needed = len(pool.waiting) - pool.connecting - len(getattr(pool, "testing", ()))
        # Slots about to free: evictions made for this pool, and servers closed for their own
        # reasons (idle_timeout, server_lifetime, RECONNECT) that nobody has claimed.
        under_way = sum(1 for p in self.evicting.values() if p is pool)
        under_way += len(self.closing) - len(self.evicting)
        if under_way < needed and self._evict(pool, now):
            # The slot frees when the evicted server is gone (L{lost}).
            self.blocked[pool] = None
            return False
        if under_way > 0:
            self.blocked[pool] = None
            return False
        waited = pool.max_wait_now(now)
        if waited >= s.reserve_pool_timeout:
            if current < s.max_db_connections + s.reserve_pool_size:
                self.reserve_acquisitions += 1
                self.blocked.pop(pool, None)
                self.log.info(
                    "coordinator {db}: reserve connection for user {user} after {waited:.3f}s "
                    "(current {current}, max_db_connections {max}, reserve_pool_size {reserve})",
                    db=self.database, user=pool.user, waited=waited, current=current + 1,
                    max=s.max_db_connections, reserve=s.reserve_pool_size)
                return True
            self._exhaust(pool, now, current)
            if len(pool.waiting) <= pool.connecting:
                self.blocked.pop(pool, None)
                return False
        self.blocked[pool] = None
        return False

    def _evict(self, pool, now: float) -> bool:
        """Close one idle server of another pool to make room for C{pool}."""
        min_age = self.settings.min_connection_lifetime
        best = None
        best_key = None
        for other in self.members:
            if other is pool or not other.idle:
                continue
            spare = len(other.servers) + other.connecting - self.floor(other)
            if spare <= 0:
                continue
            victim = None
            for server in other.idle:  # least recently used first
                if now - server.created >= min_age and server not in self.closing:
                    victim = server
                    break
            if victim is None:
                continue
            key = (spare, _p95(other))
            if best_key is None or key > best_key:
                best, best_key = (other, victim), key
        if best is None:
            return False
        donor, victim = best
        self.evictions += 1
        self.log.debug("coordinator {db}: closing an idle connection of user {donor} for user "
                       "{user} (max_db_connections {max})", db=self.database, donor=donor.user,
                       user=pool.user, max=self.settings.max_db_connections)
        self.evicting[victim] = pool
        donor._drop(victim)
        if victim not in self.closing:  # the donor's hook did not see it: count it here
            self.closing[victim] = now
        return True

    def _exhaust(self, pool, now: float, current: int) -> None:
        """Refuse the clients of C{pool} that waited reserve_pool_timeout for nothing."""
        s = self.settings
        keep = pool.connecting  # the first waiters get the connections being opened
        refused = [c for i, c in enumerate(pool.waiting)
                   if i >= keep and now - c.wait_started >= s.reserve_pool_timeout]
        if not refused:
            return
        self.exhaustions += len(refused)
        self.log.warn("coordinator {db}: exhausted, {n} client(s) of user {user} refused "
                      "(current {current}, max_db_connections {max}, reserve_pool_size "
                      "{reserve})", db=self.database, n=len(refused), user=pool.user,
                      current=current, max=s.max_db_connections, reserve=s.reserve_pool_size)
        for client in refused:
            pool.waiting.remove(client)
            pool.stats.wait_timeouts += 1
            client.serverUnavailable(errors.PgError(
                errors.TOO_MANY_CONNECTIONS,
                'all server connections to database "%s" are in use (max_db_connections %d, '
                "reserve_pool_size %d, waited %gs)"
                % (self.database, s.max_db_connections, s.reserve_pool_size,
                   s.reserve_pool_timeout)))

    # -- what the pools tell us ---------------------------------------------------------------

    def dropping(self, server, now: Optional[float] = None) -> None:
        """A pool is closing C{server}: it counts until its connection is gone."""
        if not server.closing:
            self.closing[server] = _monotonic() if now is None else now

    def lost(self, server) -> None:
        """C{server}'s connection is gone: its slot is free for a blocked pool."""
        self.closing.pop(server, None)
        self.evicting.pop(server, None)
        self.released()

    def released(self) -> None:
        """A slot may have freed (a connection ended or failed to open)."""
        if self.blocked:
            self._wake()

    def returned(self, pool) -> None:
        """A server of C{pool} went idle: blocked peers may now evict it."""
        if self.blocked and not (len(self.blocked) == 1 and pool in self.blocked):
            self._wake()

    def tick(self, now: float) -> None:
        """
        The janitor's beat: forget closed servers that never reported their end, let blocked
        pools re-check (a client may now have waited reserve_pool_timeout), and give back
        reserve connections that sit idle when nobody waits.
        """
        for server, since in list(self.closing.items()):
            if now - since > CLOSING_GRACE:
                self.closing.pop(server, None)
                self.evicting.pop(server, None)
        if self.blocked:
            self._wake()
            return
        if self.reserve_in_use() and not any(p.waiting for p in self.members):
            self._shrink(now)

    def _shrink(self, now: float) -> None:
        """Close one idle connection beyond the cap (a reserve one), idle long enough."""
        min_age = self.settings.min_connection_lifetime
        for pool in self.members:
            if len(pool.servers) <= self.floor(pool):
                continue
            for server in pool.idle:
                if now - server.last_used >= min_age and server not in self.closing:
                    pool._drop(server)
                    if server not in self.closing:
                        self.closing[server] = now
                    return

    def _wake(self) -> None:
        if self._waking:
            return
        self._waking = True
        try:
            for pool in list(self.blocked):
                if pool not in self.blocked:
                    continue
                if not pool.waiting or pool.paused:
                    del self.blocked[pool]
                    continue
                del self.blocked[pool]
                pool._grow()
        finally:
            self._waking = False

    def stats(self) -> Dict[str, int]:
        """SHOW POOL_COORDINATOR's numbers (PgDoorman's columns)."""
        s = self.settings
        return {"max_db_conn": s.max_db_connections, "current": self.current(),
                "reserve_size": s.reserve_pool_size, "reserve_used": self.reserve_in_use(),
                "evictions": self.evictions, "reserve_acq": self.reserve_acquisitions,
                "exhaustions": self.exhaustions}


def attach(service) -> None:
    """
    Give each database of C{service} (a L{pgdoorman.pool.PoolService}) that sets
    max_db_connections its L{Coordinator}, in C{service.coordinators}, and every pool of it
    the same one; at start and after a reload.  A coordinator is kept across reloads, so its
    counters and the closes in flight survive; a database that drops the key loses it.
    """
    by_db = service.pools_by_database()
    config = service.config
    for name in set(service.coordinators) | set(by_db) | set(config.pools):
        pcfg = config.pools.get(name)
        settings = CoordinatorSettings.from_pool_config(pcfg) if pcfg is not None else None
        coordinator = service.coordinators.get(name)
        if settings is None:
            service.coordinators.pop(name, None)
            coordinator = None
        elif coordinator is None:
            coordinator = service.coordinators[name] = Coordinator(name, settings)
        for pool in by_db.get(name, []):
            pool.coordinator = coordinator
            if coordinator is not None:
                coordinator.join(pool)
        if coordinator is not None and coordinator.settings != settings:
            coordinator.configure(settings)


def tick_all(service, now: float) -> None:
    """The janitor's beat for every coordinator of C{service}; drained pools leave."""
    live = set(service.all_pools())
    for coordinator in list(service.coordinators.values()):
        for pool in list(coordinator.members):
            if pool not in live and not pool.servers and not pool.connecting:
                coordinator.leave(pool)  # a drained pool with nothing left
        try:
            coordinator.tick(now)
        except Exception:
            Coordinator.log.failure("coordinator failed for database {db}",
                                    db=coordinator.database)


def config_warnings(config) -> List[tuple]:
    """
    Coordinator settings that load but will not do what their author expects, as (key,
    message) pairs for C{pgdoorman -t} and the startup log.
    """
    out: List[tuple] = []
    wait = config.general.query_wait_timeout
    for name, pcfg in config.pools.items():
        key = "pools.%s" % name
        if not pcfg.max_db_connections:
            for opt in ("reserve_pool_size", "reserve_pool_timeout", "min_guaranteed_pool_size",
                        "min_connection_lifetime"):
                if getattr(pcfg, opt):
                    out.append(("%s.%s" % (key, opt),
                                "has no effect without max_db_connections"))
            continue
        settings = CoordinatorSettings.from_pool_config(pcfg)
        floor = sum(max(settings.min_guaranteed_pool_size, u.min_pool_size or 0)
                    for u in pcfg.users)
        if floor > settings.max_db_connections:
            out.append(("%s.min_guaranteed_pool_size" % key,
                        "the users' guaranteed connections (%d in all) exceed "
                        "max_db_connections (%d): some users cannot get theirs"
                        % (floor, settings.max_db_connections)))
        if wait and wait < settings.reserve_pool_timeout:
            out.append(("%s.reserve_pool_timeout" % key,
                        "is longer than general.query_wait_timeout (%gs): clients give up "
                        "before the reserve is tried" % wait))
    return out
