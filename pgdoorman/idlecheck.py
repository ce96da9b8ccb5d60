"""
server_idle_check_timeout: a server connection idle for longer than this is checked with
pooler_check_query before a client gets it, and replaced when it does not answer.

PostgreSQL can lose a backend without the pooler seeing the socket close at once: a restart
behind a proxy or load balancer, a firewall that forgets the flow, a server-side idle timeout
whose FIN was dropped.  A client handed such a connection would send its query into the void.
L{check} runs the check query (C{;} by default: PostgreSQL answers EmptyQueryResponse and
ReadyForQuery, so the check costs one round trip) while the client waits in the pool's queue;
the connection then goes back through L{pgdoorman.pool.Pool.checkin}, which hands it to the
oldest waiting client.  A connection that fails the check, or gives no answer within the
pool's connect_timeout, is closed, and the pool opens a new one for the waiting client.
"""

from __future__ import annotations

import time

from twisted.logger import Logger

__all__ = ["check"]

log = Logger(namespace="pgdoorman.idlecheck")

#: Deadline for the answer when the pool has no connect_timeout.
DEFAULT_DEADLINE = 3.0


def check(pool, server, reactor=None) -> None:
    """
    Check C{server} (just taken from C{pool}'s idle list; a client waits in C{pool.waiting})
    and give it back to the pool when it answers, or close it when it does not.
    """
    if reactor is None:
        from twisted.internet import reactor  # the one running (pgdoorman.reactor's)
    pool.testing.add(server)
    query = pool.service.config.general.pooler_check_query or ";"
    started = time.monotonic()
    deadline = pool.settings.connect_timeout or DEFAULT_DEADLINE
    state = {"expired": False}

    def expire():
        state["expired"] = True
        log.warn("pool {db}/{user}: server {id} (backend pid {pid}) idle for {idle:.1f}s did "
                 "not answer the check query within {deadline}s; closing it",
                 db=pool.database, user=pool.user, id=server.id, pid=server.backend_pid,
                 idle=started - server.last_used, deadline=deadline)
        transport = server.transport
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()

    timer = reactor.callLater(deadline, expire)

    def done(error):
        if timer.active():
            timer.cancel()
        pool.testing.discard(server)
        if server.closing or state["expired"]:
            # Dead: Pool.server_lost forgets it and opens a new connection for the waiter.
            if not state["expired"]:
                log.info("pool {db}/{user}: server {id} (backend pid {pid}) was dead when "
                         "checked after {idle:.1f}s idle; replacing it", db=pool.database,
                         user=pool.user, id=server.id, pid=server.backend_pid,
                         idle=started - server.last_used)
            if server in pool.servers:  # not heard of yet: make sure it goes
                pool._drop(server)
            _serve_waiting(pool)
            pool._grow()
            return
        if error is not None:
            log.warn("pool {db}/{user}: check query {query!r} failed on server {id}: {error}",
                     db=pool.database, user=pool.user, query=query, id=server.id,
                     error=error)
        pool.checkin(server)

    d = server.run_internal(query)
    d.addCallback(done)
    d.addErrback(lambda f: log.failure("idle check failed", f))


def _serve_waiting(pool) -> None:
    """
    A check failed: the waiting clients it held may be served by the pool's other idle
    servers (checked too when they are stale) rather than wait for a new connection.
    """
    while pool.idle and not pool.paused \
            and len(pool.waiting) > len(pool.testing) + pool.connecting:
        server = pool.idle.pop()
        if pool.idle_check and time.monotonic() - server.last_used > pool.idle_check:
            check(pool, server)
        else:
            pool.checkin(server)  # hands it to the oldest waiting client
