"""
The pool budget shared by worker processes (C{general.worker_threads} > 1).

Each worker keeps its own L{pgdoorman.pool.Pool} objects, but pool_size is a budget over all
workers: before a worker opens a server connection for a (database, user) it holds a slot of
that pool's budget, and it gives the slot back when the connection is gone (or failed to
open).  The L{Broker}, in the supervisor, holds the count per pool; the L{BudgetClient}, in
each worker, is what L{pgdoorman.pool.Pool} calls.

Asking costs a round trip to the supervisor, so it is only done on the way to a I{new}
connection (idle reuse never asks): a pool that has no slot in hand sends one request, stops
growing, and grows again when the grant arrives.  A grant the pool no longer needs (the
waiting client left meanwhile) goes straight back.

Balance: when a request must wait because the budget is spent, the broker asks the other
workers holding slots of that pool to shed one idle connection each (L{BudgetClient.shed});
the freed slot goes to the oldest request.  An idle connection in one worker therefore never
starves clients queued in another, as it would with independent pools (PgBouncer behind
SO_REUSEPORT).  Shedding closes the connection rather than passing its socket: the new one
costs one PostgreSQL login, and nothing about the old server's session (prepared statements,
parameters) has to travel.

Slots count from the grant until the connection is gone, so a new backend never overlaps the
one it replaces and pg_stat_activity never shows more than pool_size backends of the pool.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Callable, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.logger import Logger

__all__ = ["Broker", "BudgetClient", "ACQUIRE", "FREE", "GRANT", "SHED", "NOTHING"]

ACQUIRE = b"A"   # worker -> broker: {"db", "user", "size"}: one slot, please
FREE = b"F"      # worker -> broker: {"db", "user", "n"}: n slots are free again
NOTHING = b"N"   # worker -> broker: {"db", "user"}: asked to shed, had no idle connection
GRANT = b"G"     # broker -> worker: {"db", "user"}: one slot is yours
SHED = b"S"      # broker -> worker: {"db", "user"}: close one idle connection if you can

Key = Tuple[str, str]


def _payload(db: str, user: str, **extra) -> bytes:
    d = {"db": db, "user": user}
    d.update(extra)
    return json.dumps(d).encode("utf-8")


class _Budget:
    """One pool's budget in the broker."""

    __slots__ = ("size", "held", "queue", "shedding")

    def __init__(self, size: int):
        self.size = size
        #: slots held, by worker index.
        self.held: Dict[int, int] = {}
        #: worker indexes with a request waiting, oldest first (one entry per request).
        self.queue: deque = deque()
        #: shed requests sent and not yet answered (by a FREE or a NOTHING).
        self.shedding = 0

    def total(self) -> int:
        return sum(self.held.values())


class Broker:
    """
    The supervisor's side: slots per (database, user) over all workers.

    @param send: C{send(worker_index, kind, payload)} delivers a message to a worker.
    """

    log = Logger()

    def __init__(self, send: Callable[[int, bytes, bytes], None]):
        self.send = send
        self.budgets: Dict[Key, _Budget] = {}
        #: max_db_connections (+ reserve_pool_size) per database that sets it: a cap on the
        #: sum of its pools' slots over all workers.
        self.db_caps: Dict[str, int] = {}

    def _dbFull(self, db: str) -> bool:
        cap = self.db_caps.get(db)
        if not cap:
            return False
        return sum(b.total() for k, b in self.budgets.items() if k[0] == db) >= cap

    def _free(self, key: Key, b: _Budget) -> bool:
        return b.total() < b.size and not self._dbFull(key[0])

    def _budget(self, key: Key, size: Optional[int] = None) -> _Budget:
        b = self.budgets.get(key)
        if b is None:
            b = self.budgets[key] = _Budget(size or 0)
        elif size is not None:
            b.size = size  # the workers read it from the config: a reload changes it
        return b

    def message(self, worker: int, kind: bytes, payload: bytes) -> bool:
        """Handle a budget message from C{worker}; False if it is not one."""
        if kind not in (ACQUIRE, FREE, NOTHING):
            return False
        d = json.loads(payload.decode("utf-8"))
        key = (d["db"], d["user"])
        if kind == ACQUIRE:
            cap = int(d.get("db_cap") or 0)
            if cap:
                self.db_caps[key[0]] = cap
            else:
                self.db_caps.pop(key[0], None)
            self.acquire(worker, key, int(d["size"]))
        elif kind == FREE:
            self.free(worker, key, int(d.get("n", 1)))
        else:
            b = self._budget(key)
            b.shedding = max(0, b.shedding - 1)
        return True

    def acquire(self, worker: int, key: Key, size: int) -> None:
        b = self._budget(key, size)
        if not b.queue and self._free(key, b):
            self._grant(worker, key, b)
            return
        b.queue.append(worker)
        self._askShed(key, b)

    def free(self, worker: int, key: Key, n: int) -> None:
        b = self._budget(key)
        held = b.held.get(worker, 0) - n
        if held > 0:
            b.held[worker] = held
        else:
            if held < 0:
                self.log.warn("budget {db}/{user}: worker {w} freed more slots than it held",
                              db=key[0], user=key[1], w=worker)
            b.held.pop(worker, None)
        b.shedding = max(0, b.shedding - n)
        self._serve(key, b)
        if key[0] in self.db_caps:  # a slot of the database: any of its pools may use it
            for k, other in self.budgets.items():
                if k[0] == key[0] and other.queue:
                    self._serve(k, other)

    def _grant(self, worker: int, key: Key, b: _Budget) -> None:
        b.held[worker] = b.held.get(worker, 0) + 1
        self.send(worker, GRANT, _payload(*key))

    def _serve(self, key: Key, b: _Budget) -> None:
        while b.queue and self._free(key, b):
            self._grant(b.queue.popleft(), key, b)

    def _askShed(self, key: Key, b: _Budget) -> None:
        """Ask workers other than the waiting ones for idle connections, one per request."""
        need = len(b.queue) - b.shedding
        if need <= 0:
            return
        waiting = set(b.queue)
        if b.total() < b.size and self._dbFull(key[0]):
            # The database's cap, not the pool's: other users' idle connections make room
            # (each worker's coordinator keeps its own floors, min_guaranteed_pool_size).
            donors = [(w, k) for k, other in self.budgets.items()
                      if k[0] == key[0] and k != key for w, n in other.held.items() if n > 0]
        else:
            donors = [(w, key) for w, n in sorted(b.held.items(), key=lambda i: -i[1])
                      if n > 0 and w not in waiting]
        for w, k in donors[:need]:
            b.shedding += 1
            self.send(w, SHED, _payload(*k))

    def tick(self) -> None:
        """The supervisor's beat: requests still waiting ask again (servers go idle later)."""
        for key, b in self.budgets.items():
            if b.queue:
                b.shedding = 0
                self._askShed(key, b)

    def worker_gone(self, worker: int) -> None:
        """A worker died or left: its connections are gone with it, its requests too."""
        for key, b in self.budgets.items():
            b.held.pop(worker, None)
            if worker in b.queue:
                b.queue = deque(w for w in b.queue if w != worker)
            self._serve(key, b)

    def rows(self) -> List[tuple]:
        """(database, user, pool_size, held over all workers, waiting requests), for logs."""
        return [(k[0], k[1], b.size, b.total(), len(b.queue))
                for k, b in sorted(self.budgets.items())]


class BudgetClient:
    """
    A worker's side, the C{budget} of its L{pgdoorman.pool.PoolService}.

    @param send: C{send(kind, payload)} to the broker.
    """

    log = Logger()

    def __init__(self, service, send: Callable[[bytes, bytes], None]):
        self.service = service
        self.send = send
        #: granted slots not yet used, by pool key.
        self.credits: Dict[Key, int] = {}
        #: pools with a request out, by key (one request per pool at a time).
        self.asking: Dict[Key, object] = {}

    # -- what Pool calls ------------------------------------------------------------------------

    def acquire(self, pool) -> bool:
        """May C{pool} open a connection now?  If not, a slot is asked for (see module doc)."""
        key = (pool.database, pool.user)
        n = self.credits.get(key, 0)
        if n:
            self.credits[key] = n - 1
            return True
        if key not in self.asking:
            self.asking[key] = pool
            cap = 0
            coordinator = pool.coordinator
            if coordinator is not None:  # max_db_connections holds over all workers too
                cap = (coordinator.settings.max_db_connections
                       + coordinator.settings.reserve_pool_size)
            self.send(ACQUIRE, _payload(key[0], key[1], size=pool.settings.pool_size,
                                        db_cap=cap))
        return False

    def release(self, pool) -> None:
        """A connection of C{pool} never opened: its slot is free."""
        self.send(FREE, _payload(pool.database, pool.user, n=1))

    def lost(self, pool, server) -> None:
        """
        C{server}'s connection is gone: its slot is free.  Pool.server_lost can hear of one
        server twice (a client discards it, then its connection ends): counted once.
        """
        if getattr(server, "budget_freed", False):
            return
        server.budget_freed = True
        self._releaseWhenGone(pool, server.transport, 100)

    def _releaseWhenGone(self, pool, transport, tries: int) -> None:
        # A client that discards a server hears of it before the socket is closed: the slot
        # frees once it is, so that the next backend never overlaps this one.
        if tries and getattr(transport, "connected", 0) \
                and not getattr(transport, "disconnected", 0):
            reactor.callLater(0.02, self._releaseWhenGone, pool, transport, tries - 1)
            return
        self.release(pool)

    # -- what the broker says -------------------------------------------------------------------

    def message(self, kind: bytes, payload: bytes) -> bool:
        if kind not in (GRANT, SHED):
            return False
        d = json.loads(payload.decode("utf-8"))
        key = (d["db"], d["user"])
        if kind == GRANT:
            self.granted(key)
        else:
            self.shed(key)
        return True

    def granted(self, key: Key) -> None:
        pool = self.asking.pop(key, None)
        self.credits[key] = self.credits.get(key, 0) + 1
        if pool is None:
            pool = self.service.pools.get(key)
        if pool is not None:
            pool._grow()
            keep = 0 if pool.draining else pool.settings.min_pool_size
            while self.credits.get(key) and len(pool.servers) + pool.connecting < keep:
                self.credits[key] -= 1
                pool._connect().addErrback(lambda f: None)
        left = self.credits.pop(key, 0)
        if left:
            self.send(FREE, _payload(key[0], key[1], n=left))

    def shed(self, key: Key) -> None:
        """Close one idle connection of the pool unless clients here wait for it."""
        for pool in self._pools(key):
            if pool.idle and not pool.waiting:
                self.log.debug("pool {db}/{user}: closing an idle connection for clients "
                               "waiting in another worker", db=key[0], user=key[1])
                pool._drop(pool.idle[0])  # the least recently used
                return
        self.send(NOTHING, _payload(*key))

    def _pools(self, key: Key) -> List:
        out = [p for p in self.service.draining if (p.database, p.user) == key]
        live = self.service.pools.get(key)
        if live is not None:
            out.append(live)
        return out
