"""
Patroni-assisted fallback: when a pool's own server refuses connections, open new server
connections on another member of its Patroni cluster until the own server is back.

PgDoorman's C{patroni_api_urls} and C{fallback_*} settings (general, overridable per pool):

  - C{fallback_cooldown} (30s): after the own server refuses a connection (TCP refused or
    timed out, or PostgreSQL says it is starting up / shutting down: SQLSTATE 57P03, 57P01,
    57P02, class 08), the pool stops trying it for this long and connects to a fallback member.
    When the cooldown is over the next new connection tries the own server again.  Login
    errors (wrong password, unknown database, too many connections) do not count: that server
    is alive.
  - C{patroni_api_timeout} (5s): each C{GET /cluster} request; every URL is asked at once
    and the first good answer wins (L{pgdoorman.patroni.cluster.PatroniClient}).
  - C{fallback_connect_timeout} (5s): the whole login on one candidate, and the base of a
    failed candidate's own cooldown (doubling on each further failure, at most 60 s).
  - C{fallback_lifetime} (= C{fallback_cooldown}): the lifetime of a connection opened on a
    fallback member, so those are replaced soon after the own server is back.

Candidates are the members in a serving state without C{noloadbalance}, C{nofailover} or
C{archive} tags, other than the own server itself.  First every C{sync_standby} is tried at
once and the first to log in wins; only when none does are the other members (replicas and
the leader, equally) tried, again at once.  Connections that log in after the winner are
closed.  The winner is remembered for the rest of the cooldown so later connections go there
without asking Patroni; if it fails, it is forgotten and Patroni is asked once more.  Several
connections wanting a target at the same time share one discovery.

All of this runs only when a server connection is being opened: nothing here is on the path
that relays messages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from pgdoorman.patroni.cluster import (
    ClusterState, Member, PatroniClient, SERVING_STATES, role_matches)
from pgdoorman.protocol import errors

__all__ = ["FallbackSettings", "Fallback", "settings_for", "select_candidates",
           "is_down_error", "DEFAULT_COOLDOWN", "DEFAULT_API_TIMEOUT",
           "DEFAULT_CONNECT_TIMEOUT", "MAX_HOST_COOLDOWN"]

DEFAULT_COOLDOWN = 30.0
DEFAULT_API_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 5.0
#: the longest a failing candidate is skipped.
MAX_HOST_COOLDOWN = 60.0

#: SQLSTATEs that mean "this server is not serving now" rather than "it refused us".
_DOWN_STATES = frozenset(["57P03", "57P01", "57P02", "57P04"])

Target = Tuple[str, int, str]  # host, port, Patroni role


@dataclasses.dataclass(frozen=True)
class FallbackSettings:
    urls: Tuple[str, ...]
    cooldown: float = DEFAULT_COOLDOWN
    api_timeout: float = DEFAULT_API_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    lifetime: float = DEFAULT_COOLDOWN


def settings_for(config: Any, pool_name: str) -> Optional[FallbackSettings]:
    """The effective fallback settings of pool C{pool_name}, or C{None} when it has none."""
    general = getattr(config, "general", None)
    pools = getattr(config, "pools", None) or {}
    pool = pools.get(pool_name) if hasattr(pools, "get") else None

    def pick(name: str) -> Any:
        value = getattr(pool, name, None) if pool is not None else None
        return value if value is not None else getattr(general, name, None)

    urls = pick("patroni_api_urls")
    if not urls:
        return None
    cooldown = pick("fallback_cooldown") or DEFAULT_COOLDOWN
    lifetime = pick("fallback_lifetime") or cooldown
    return FallbackSettings(urls=tuple(urls), cooldown=cooldown,
                            api_timeout=pick("patroni_api_timeout") or DEFAULT_API_TIMEOUT,
                            connect_timeout=pick("fallback_connect_timeout")
                            or DEFAULT_CONNECT_TIMEOUT,
                            lifetime=lifetime)


def is_down_error(failure: Failure) -> bool:
    """Whether a failed server connection means the server is down (not that it said no)."""
    err = failure.value
    if isinstance(err, errors.PgError):
        return err.sqlstate in _DOWN_STATES or err.sqlstate.startswith("08")
    return failure.check(ConnectError, ConnectingCancelledError, defer.TimeoutError,
                         ConnectionError, OSError) is not None


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "on", "1")
    return bool(value)


def select_candidates(state: ClusterState, exclude: Sequence[Tuple[str, int]] = (),
                      default_port: int = 5432) -> Tuple[List[Target], List[Target]]:
    """
    (sync standbys, everyone else) that may serve as a fallback, in C{/cluster} order.

    A member qualifies when its state serves queries and it has none of the C{noloadbalance},
    C{nofailover}, C{archive} tags; members at an address in C{exclude} are left out.
    """
    excluded = set(exclude)
    first: List[Target] = []
    rest: List[Target] = []
    for m in state.members:
        if m.state not in SERVING_STATES:
            continue
        if any(_truthy(m.tags.get(t)) for t in ("noloadbalance", "nofailover", "archive")):
            continue
        port = m.port or default_port
        if (m.host, port) in excluded:
            continue
        (first if role_matches(m, "sync") else rest).append((m.host, port, m.role))
    return first, rest


class Fallback:
    """
    The fallback state of one pool: whether its own server is in cooldown, the remembered
    fallback target, failing candidates.  L{connect} replaces C{connect_server(pool,
    pool.settings)} for the pool.

    @ivar down_until: reactor time until which the own server is not tried (0: not down).
    @ivar target: the fallback member new connections go to during the cooldown.
    """

    log = Logger()

    def __init__(self, pool: Any, reactor: Any = None,
                 connect: Optional[Callable[[Any, Any], defer.Deferred]] = None,
                 client_factory: Optional[Callable[[FallbackSettings], Any]] = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor
            reactor = _reactor
        if connect is None:
            from pgdoorman.server import connect_server as connect
        self.pool = pool
        self.reactor = reactor
        self._connect_server = connect
        self._client_factory = client_factory or (
            lambda fs: PatroniClient(reactor, fs.urls, fs.api_timeout))
        self.fs: Optional[FallbackSettings] = None
        self.client: Any = None
        self.down_until = 0.0
        self.target: Optional[Target] = None
        #: (host, port) → (skip until, current cooldown) for candidates that failed.
        self.host_cooldown: Dict[Tuple[str, int], Tuple[float, float]] = {}
        self._discovering: Optional[List[defer.Deferred]] = None
        self.fallback_connections = 0
        self.discoveries = 0

    # -- the pool's entry point ----------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.down_until > self.reactor.seconds()

    def configure(self) -> Optional[FallbackSettings]:
        """Read the current settings (a reload may have changed them)."""
        pool = self.pool
        fs = settings_for(getattr(pool.service, "config", None), pool.settings.pool_name)
        if fs != self.fs:
            self.fs = fs
            self.client = self._client_factory(fs) if fs is not None else None
            if fs is None:
                self.down_until = 0.0
                self.target = None
        return fs

    def connect(self) -> Optional[defer.Deferred]:
        """
        Open one server connection for the pool: its own server, or a fallback member.
        C{None} when the pool has no C{patroni_api_urls}: the caller connects as usual.
        """
        pool = self.pool
        fs = self.configure()
        if fs is None:
            return None
        if self.down_until:
            if self.reactor.seconds() < self.down_until:
                return self._fallback(None)
            self.log.info("pool {db}/{user}: fallback cooldown over, trying {host}:{port} again",
                          db=pool.database, user=pool.user, host=pool.settings.server_host,
                          port=pool.settings.server_port)
            self.down_until = 0.0
            self.target = None
        d = self._connect_server(pool, pool.settings)
        d.addErrback(self._own_failed)
        return d

    # -- the own server -------------------------------------------------------------------------

    def _own_failed(self, failure: Failure) -> Any:
        if self.fs is None or not is_down_error(failure):
            return failure
        pool = self.pool
        if not self.down_until:
            self.log.warn("pool {db}/{user}: server {host}:{port} is down ({error}); new "
                          "connections go to a Patroni fallback for {cooldown}s",
                          db=pool.database, user=pool.user, host=pool.settings.server_host,
                          port=pool.settings.server_port, error=failure.getErrorMessage(),
                          cooldown=self.fs.cooldown)
        self.down_until = self.reactor.seconds() + self.fs.cooldown
        return self._fallback(failure)

    # -- fallback targets -----------------------------------------------------------------------

    def _fallback(self, own: Optional[Failure]) -> defer.Deferred:
        if self.target is not None:
            target = self.target
            d = self._open(target)

            def failed(f: Failure) -> Any:
                self._candidate_failed(target, f)
                if self.target == target:
                    self.target = None
                return self._discover(own)
            d.addErrback(failed)
            return d
        return self._discover(own)

    def _discover(self, own: Optional[Failure]) -> defer.Deferred:
        """Ask Patroni, try the candidates; fires with a logged-in server (or fails)."""
        if self._discovering is not None:
            waiter: defer.Deferred = defer.Deferred()
            self._discovering.append(waiter)
            waiter.addCallback(self._open)
            return waiter
        self._discovering = []
        self.discoveries += 1
        d = self.client.fetch()
        d.addCallback(self._try_candidates)

        def done(result: Any) -> Any:
            waiters, self._discovering = self._discovering or [], None
            if isinstance(result, Failure):
                result = self._give_up(own, result)
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(self.target)
            return result
        d.addBoth(done)
        return d

    def _give_up(self, own: Optional[Failure], why: Failure) -> Failure:
        pool = self.pool
        s = pool.settings
        first = ("pgdoorman could not connect to server %s:%s: %s; "
                 % (s.server_host, s.server_port, own.getErrorMessage()) if own is not None
                 else "server %s:%s is in fallback cooldown; " % (s.server_host, s.server_port))
        return Failure(errors.PgError(errors.CANNOT_CONNECT_NOW,
                                      first + "Patroni fallback failed: " + why.getErrorMessage()))

    def _try_candidates(self, state: ClusterState) -> defer.Deferred:
        pool = self.pool
        s = pool.settings
        now = self.reactor.seconds()
        skip = [(s.server_host, s.server_port)]
        for hp, (until, _) in list(self.host_cooldown.items()):
            if until > now:
                skip.append(hp)
        first, rest = select_candidates(state, skip, default_port=s.server_port)
        self.log.info("pool {db}/{user}: fallback candidates from {source}: sync {first}, "
                      "others {rest}", db=pool.database, user=pool.user, source=state.source,
                      first=_fmt(first), rest=_fmt(rest))
        if not first and not rest:
            return defer.fail(RuntimeError("no eligible member in /cluster (%d members)"
                                           % (len(state.members),)))
        reasons: List[str] = []
        d = self._wave(first, reasons)

        def next_wave(f: Failure) -> defer.Deferred:
            f.trap(_WaveFailed)
            d2 = self._wave(rest, reasons)

            def exhausted(f2: Failure) -> Failure:
                f2.trap(_WaveFailed)
                return Failure(RuntimeError("all fallback candidates failed: "
                                            + "; ".join(reasons)))
            d2.addErrback(exhausted)
            return d2
        d.addErrback(next_wave)
        return d

    def _wave(self, targets: List[Target], reasons: List[str]) -> defer.Deferred:
        """Log in to all C{targets} at once; the first server wins, later ones are closed."""
        result: defer.Deferred = defer.Deferred()
        if not targets:
            result.errback(_WaveFailed())
            return result
        pending = [len(targets)]

        def ok(server: Any, target: Target) -> None:
            pending[0] -= 1
            if result.called:
                server.close()
                return
            self.target = target
            self.host_cooldown.pop(target[:2], None)
            pool = self.pool
            self.log.info("pool {db}/{user}: fallback target is {host}:{port} ({role})",
                          db=pool.database, user=pool.user, host=target[0], port=target[1],
                          role=target[2])
            result.callback(server)

        def failed(f: Failure, target: Target) -> None:
            pending[0] -= 1
            self._candidate_failed(target, f)
            reasons.append("%s:%d (%s): %s" % (target[0], target[1], target[2],
                                                f.getErrorMessage()))
            if not pending[0] and not result.called:
                result.errback(_WaveFailed())

        for target in targets:
            self._open(target, count=False).addCallbacks(
                ok, failed, callbackArgs=(target,), errbackArgs=(target,))
        return result

    def _candidate_failed(self, target: Target, failure: Failure) -> None:
        hp = target[:2]
        base = self.fs.connect_timeout if self.fs is not None else DEFAULT_CONNECT_TIMEOUT
        previous = self.host_cooldown.get(hp)
        span = min(MAX_HOST_COOLDOWN, previous[1] * 2) if previous else base
        self.host_cooldown[hp] = (self.reactor.seconds() + span, span)
        pool = self.pool
        self.log.warn("pool {db}/{user}: fallback candidate {host}:{port} failed ({error}); "
                      "skipped for {span}s", db=pool.database, user=pool.user, host=hp[0],
                      port=hp[1], error=failure.getErrorMessage(), span=span)

    def _open(self, target: Optional[Target], count: bool = True) -> defer.Deferred:
        """Log in to C{target} with the pool's settings; the server gets fallback_lifetime."""
        if target is None:
            return defer.fail(RuntimeError("no fallback target"))
        fs = self.fs or FallbackSettings(urls=())
        settings = dataclasses.replace(self.pool.settings, server_host=target[0],
                                       server_port=target[1],
                                       connect_timeout=fs.connect_timeout)
        d = self._connect_server(self.pool, settings)
        d.addCallback(self._opened, target, fs.lifetime)
        return d

    def _opened(self, server: Any, target: Target, lifetime: float) -> Any:
        self.fallback_connections += 1
        server.fallback_target = target
        if lifetime:
            self.reactor.callLater(lifetime, self._expire, server)
        return server

    def _expire(self, server: Any) -> None:
        """A fallback server reached fallback_lifetime: close it now if idle, else when free."""
        if server.closing:
            return
        pool = self.pool
        if server in pool.idle:
            pool._drop(server)
        else:
            server.close_needed = True


class _WaveFailed(Exception):
    """Every candidate of a wave failed (reasons are collected by the caller)."""


def _fmt(targets: List[Target]) -> str:
    return ", ".join("%s:%d" % t[:2] for t in targets) or "none"


def member_target(m: Member, default_port: int = 5432) -> Target:
    return (m.host, m.port or default_port, m.role)
