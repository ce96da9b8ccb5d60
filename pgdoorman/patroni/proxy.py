"""
The proxy: per-port routing policy, the byte relay, and one watcher per Patroni cluster.

  - L{PortRouter} holds one port's policy with no sockets: which members are eligible (from
    the last good C{/cluster}), the connections open to each, least-connections choice.
    L{PortRouter.update} returns the connections to close: those to members that left the
    eligible set, and only those.
  - L{ClientRelay} / L{ServerRelay} are a plain Protocol pair relaying bytes unparsed, with
    TCP_NODELAY and streaming producers registered both ways so that a slow reader pauses the
    other side instead of growing a buffer.
  - L{ClusterWatcher} polls C{/cluster} every C{cluster_update_interval} (and on demand),
    keeps routing on what it knew when an update fails, and owns the port listeners.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pgdoorman.patroni.cluster import (ClusterState, ClusterUnavailable, Member, PatroniClient,
                                       ineligible_reason)
from pgdoorman.patroni.config import ClusterConfig, PortConfig

__all__ = ["Backend", "PortRouter", "ClientRelay", "ServerRelay", "ClusterWatcher",
           "CONNECT_TIMEOUT", "api_timeout"]

#: Seconds to wait for a database host to accept a forwarded connection.
CONNECT_TIMEOUT = 5.0


def api_timeout(interval: float) -> float:
    """The per-request timeout for Patroni's REST API: the update interval, within 1..5 s."""
    return max(1.0, min(5.0, interval))


# A backend is where a port forwards to: the member's name and address.  A member that comes
# back with another host is a different backend.
Backend = Tuple[str, str, int]


class PortRouter:
    """
    One port's routing state.

    @ivar eligible: backends new connections may go to, in member order.
    @ivar reasons: for every member of the last document, C{None} (eligible) or why not.
    @ivar connections: open relays by backend, kept across updates for as long as the
        backend stays eligible.
    """

    log = Logger()

    def __init__(self, cluster: str, config: PortConfig) -> None:
        self.cluster = cluster
        self.config = config
        self.eligible: List[Backend] = []
        self.reasons: Dict[str, Optional[str]] = {}
        self.members: Tuple[Member, ...] = ()
        self.connections: Dict[Backend, Set[Any]] = {}
        self.connections_total: Dict[Backend, int] = {}
        self.rejected_total = 0
        self._turn = itertools.count()

    def backend_of(self, member: Member) -> Backend:
        return (member.name, member.host, self.config.host_port)

    def update(self, members: Tuple[Member, ...], config: Optional[PortConfig] = None
               ) -> List[Any]:
        """
        Take a new member list (and optionally a new port config); return the open relays
        whose backend is no longer eligible, for the caller to close.
        """
        if config is not None:
            self.config = config
        self.members = members
        eligible = []
        reasons = {}
        for m in members:
            reason = ineligible_reason(m, self.config.roles, self.config.max_lag_in_bytes)
            reasons[m.name] = reason
            if reason is None:
                eligible.append(self.backend_of(m))
        self.eligible = eligible
        self.reasons = reasons
        keep = set(eligible)
        stale = []
        for backend in list(self.connections):
            if backend not in keep:
                stale.extend(self.connections.pop(backend))
        return stale

    def choose(self, exclude: Tuple[Backend, ...] = ()) -> Optional[Backend]:
        """
        The eligible backend with the fewest open connections; ties go round-robin so that
        short connections spread too.  C{None} when nothing is eligible.
        """
        candidates = [b for b in self.eligible if b not in exclude]
        if not candidates:
            return None
        fewest = min(len(self.connections.get(b, ())) for b in candidates)
        tied = [b for b in candidates if len(self.connections.get(b, ())) == fewest]
        return tied[next(self._turn) % len(tied)]

    def attach(self, backend: Backend, relay: Any) -> None:
        self.connections.setdefault(backend, set()).add(relay)
        self.connections_total[backend] = self.connections_total.get(backend, 0) + 1

    def detach(self, backend: Backend, relay: Any) -> None:
        relays = self.connections.get(backend)
        if relays is not None:
            relays.discard(relay)
            if not relays and backend not in self.eligible:
                del self.connections[backend]

    def count(self, backend: Optional[Backend] = None) -> int:
        if backend is not None:
            return len(self.connections.get(backend, ()))
        return sum(len(s) for s in self.connections.values())

    def all_relays(self) -> List[Any]:
        return [r for s in self.connections.values() for r in s]


# -- the relay ---------------------------------------------------------------------------------

def _nodelay(transport: Any) -> None:
    try:
        transport.setTcpNoDelay(True)
    except Exception:  # not TCP (tests on StringTransport, Unix sockets)
        pass


class ServerRelay(protocol.Protocol):
    """The database side of one relayed connection."""

    def __init__(self, client: "ClientRelay") -> None:
        self.client = client

    def connectionMade(self) -> None:
        _nodelay(self.transport)
        self.client.server_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.client.server_lost(self)


class ClientRelay(protocol.Protocol):
    """
    The application side of one relayed connection: picks a backend on connect, buffers what
    arrives before the backend answers, then relays both ways.
    """

    log = Logger()

    def __init__(self, watcher: "ClusterWatcher", port_name: str) -> None:
        self.watcher = watcher
        self.port_name = port_name
        self.router: Optional[PortRouter] = None
        self.backend: Optional[Backend] = None
        self.server: Optional[ServerRelay] = None
        self.pending: List[bytes] = []
        self.closed = False
        self.tried: Tuple[Backend, ...] = ()
        self._connecting: Optional[defer.Deferred] = None

    def connectionMade(self) -> None:
        _nodelay(self.transport)
        self.router = self.watcher.routers.get(self.port_name)
        if self.router is None:
            self.transport.abortConnection()
            return
        self.transport.pauseProducing()
        self._connect()

    def _connect(self) -> None:
        router = self.router
        backend = router.choose(exclude=self.tried)
        if backend is None:
            router.rejected_total += 1
            peer = self.transport.getPeer()
            self.log.warn("{cluster}/{port}: no eligible member for client {peer}; closing it"
                          " ({why})", cluster=router.cluster, port=self.port_name,
                          peer="%s:%s" % (getattr(peer, "host", "?"), getattr(peer, "port", "?")),
                          why=("every eligible member refused" if self.tried
                               else "no member is eligible"))
            self.closed = True
            self.transport.loseConnection()
            return
        self.tried += (backend,)
        self.backend = backend
        router.attach(backend, self)
        creator = protocol.ClientCreator(self.watcher.reactor, ServerRelay, self)
        d = creator.connectTCP(backend[1], backend[2], timeout=CONNECT_TIMEOUT)
        self._connecting = d
        d.addErrback(self._connect_failed, backend)

    def _connect_failed(self, failure: Any, backend: Backend) -> None:
        self._connecting = None
        self.router.detach(backend, self)
        if self.closed:
            return
        self.log.warn("{cluster}/{port}: cannot connect to {member} at {host}:{hport}: {err}",
                      cluster=self.router.cluster, port=self.port_name, member=backend[0],
                      host=backend[1], hport=backend[2], err=failure.getErrorMessage())
        self.backend = None
        self._connect()

    def server_connected(self, server: ServerRelay) -> None:
        self._connecting = None
        if self.closed:
            server.transport.abortConnection()
            return
        self.server = server
        if self.pending:
            server.transport.writeSequence(self.pending)
            self.pending = []
        # A slow reader on either side pauses reading on the other.
        server.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(server.transport, True)
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.server is not None:
            self.server.transport.write(data)
        else:
            self.pending.append(data)

    def server_lost(self, server: ServerRelay) -> None:
        if self.server is server:
            self.server = None
        if not self.closed:
            self.closed = True
            self.transport.loseConnection()
        self._forget()

    def connectionLost(self, reason: Any) -> None:
        self.closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self.server is not None:
            self.server.transport.loseConnection()
        self._forget()

    def _forget(self) -> None:
        if self.router is not None and self.backend is not None:
            self.router.detach(self.backend, self)

    def close(self) -> None:
        """Close both sides now: the backend left the eligible set."""
        self.closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self.server is not None:
            self.server.transport.abortConnection()
        self.transport.loseConnection()


class ProxyFactory(protocol.Factory):
    noisy = False

    def __init__(self, watcher: "ClusterWatcher", port_name: str) -> None:
        self.watcher = watcher
        self.port_name = port_name

    def buildProtocol(self, addr: Any) -> ClientRelay:
        p = ClientRelay(self.watcher, self.port_name)
        p.factory = self
        return p


# -- one cluster ---------------------------------------------------------------------------------

class ClusterWatcher(service.Service):
    """
    One Patroni cluster: its poller, its port routers and their listeners.

    @ivar state: the last good L{ClusterState}, or C{None} before the first.
    """

    log = Logger()

    def __init__(self, reactor: Any, config: ClusterConfig, interval: float,
                 client_factory: Optional[Callable[..., PatroniClient]] = None) -> None:
        self.reactor = reactor
        self.config = config
        self.interval = interval
        self.setName(config.name)
        self._client_factory = client_factory or PatroniClient
        self.client = self._make_client()
        self.routers: Dict[str, PortRouter] = {}
        self.listeners: Dict[str, Any] = {}
        for name, port in config.ports.items():
            self.routers[name] = PortRouter(config.name, port)
        self.state: Optional[ClusterState] = None
        self.last_update: Optional[float] = None
        self.last_error: Optional[str] = None
        self.update_errors_total = 0
        self.updates_total = 0
        self.failovers_total = 0
        self.last_leader: Optional[str] = None
        self.closed_total = 0
        self._loop: Optional[LoopingCall] = None
        self._in_flight: Optional[defer.Deferred] = None
        self._waiters: List[defer.Deferred] = []

    def _make_client(self) -> PatroniClient:
        return self._client_factory(self.reactor, self.config.hosts,
                                    timeout=api_timeout(self.interval), tls=self.config.tls)

    # -- service ---------------------------------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        for name in self.routers:
            self._listen(name)
        self._start_loop()

    def _start_loop(self) -> None:
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def _tick(self) -> None:
        self.update()  # errors are handled and logged there; the loop never stops

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        ds = [defer.maybeDeferred(lp.stopListening) for lp in self.listeners.values()]
        self.listeners.clear()
        for router in self.routers.values():
            for relay in router.all_relays():
                relay.close()
        return defer.DeferredList(ds)

    def _listen(self, name: str) -> None:
        port = self.routers[name].config
        self.listeners[name] = self.reactor.listenTCP(
            port.listen_port, ProxyFactory(self, name), backlog=1024,
            interface=port.listen_host)
        self.log.info("{cluster}/{port}: listening on {listen} for roles {roles}",
                      cluster=self.config.name, port=name, listen=port.listen,
                      roles=",".join(port.roles))

    # -- updates -----------------------------------------------------------------------------------

    def update(self) -> defer.Deferred:
        """
        Poll C{/cluster} now (joining a poll already running); fires with C{None} on success
        or with the error text, never fails.
        """
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        if self._in_flight is None:
            self._in_flight = self.client.fetch()
            self._in_flight.addCallbacks(self._got_state, self._update_failed)
            self._in_flight.addBoth(self._update_done)
        return waiter

    def _update_done(self, outcome: Optional[str]) -> None:
        self._in_flight = None
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(outcome)

    def _update_failed(self, failure: Any) -> str:
        self.update_errors_total += 1
        if failure.check(ClusterUnavailable):
            why = str(failure.value)
        else:
            why = failure.getErrorMessage()
            self.log.failure("{cluster}: update failed", failure, cluster=self.config.name)
        if why != self.last_error:
            self.log.warn("{cluster}: keeping the last known topology: {why}",
                          cluster=self.config.name, why=why)
        self.last_error = why
        return why

    def _got_state(self, state: ClusterState) -> None:
        old = self.state
        # A switchover or failover often shows a document with no leader in between: compare
        # with the last leader seen, not the last document's.
        new_leader = state.leader.name if state.leader is not None else None
        if new_leader is not None:
            if self.last_leader is not None and new_leader != self.last_leader:
                self.failovers_total += 1
                self.log.warn("{cluster}: leader changed from {old} to {new}",
                              cluster=self.config.name, old=self.last_leader, new=new_leader)
            self.last_leader = new_leader
        if old is None or _summary(old) != _summary(state):
            self.log.info("{cluster}: members {members} (from {source})",
                          cluster=self.config.name, members=_summary(state),
                          source=state.source)
        self.state = state
        self.last_update = time.time()
        self.last_error = None
        self.updates_total += 1
        self._apply()

    def _apply(self, configs: Optional[Dict[str, PortConfig]] = None) -> None:
        if self.state is None:
            for name, router in self.routers.items():
                if configs and name in configs:
                    router.config = configs[name]
            return
        for name, router in self.routers.items():
            stale = router.update(self.state.members, configs.get(name) if configs else None)
            if stale:
                left = sorted(set(r.backend[0] for r in stale if r.backend))
                self.log.warn("{cluster}/{port}: closing {n} connection(s) to {members}: no "
                              "longer eligible ({why})", cluster=self.config.name, port=name,
                              n=len(stale), members=", ".join(left),
                              why="; ".join("%s: %s" % (m, router.reasons.get(m) or "gone")
                                            for m in left))
                self.closed_total += len(stale)
                for relay in stale:
                    relay.close()

    # -- reload ------------------------------------------------------------------------------------

    def reconfigure(self, config: ClusterConfig, interval: float) -> None:
        """
        Apply a reloaded cluster config: ports added listen, ports removed stop (their
        connections are closed), changed ports re-evaluate eligibility; connections on
        unchanged ports are left alone.
        """
        old = self.config
        self.config = config
        if config.hosts != old.hosts or config.tls != old.tls or interval != self.interval:
            self.interval = interval
            self.client = self._make_client()
            if self._loop is not None and self._loop.running:
                self._loop.stop()
                self._start_loop()
        for name in list(self.routers):
            if name not in config.ports:
                router = self.routers.pop(name)
                listener = self.listeners.pop(name, None)
                if listener is not None:
                    listener.stopListening()
                for relay in router.all_relays():
                    relay.close()
                self.log.info("{cluster}/{port}: removed", cluster=config.name, port=name)
        changed = {}
        for name, port in config.ports.items():
            router = self.routers.get(name)
            if router is None:
                self.routers[name] = PortRouter(config.name, port)
                if self.running:
                    self._listen(name)
                changed[name] = port
                continue
            if router.config != port:
                moved = (router.config.listen_host, router.config.listen_port) != \
                    (port.listen_host, port.listen_port)
                changed[name] = port
                if moved and self.running:
                    listener = self.listeners.pop(name, None)
                    if listener is not None:
                        listener.stopListening()
                    router.config = port
                    self._listen(name)
        if changed:
            self._apply(changed)

    # -- reporting ---------------------------------------------------------------------------------

    def status(self) -> Dict[str, Any]:
        state = self.state
        ports = {}
        for name, router in self.routers.items():
            members = []
            for m in (state.members if state else ()):
                backend = router.backend_of(m)
                members.append({"name": m.name, "host": m.host, "port": router.config.host_port,
                                "eligible": router.reasons.get(m.name, "not evaluated") is None,
                                "reason": router.reasons.get(m.name),
                                "connections": router.count(backend)})
            # Connections still open to backends that are not in the document any more.
            known = set(router.backend_of(m) for m in (state.members if state else ()))
            for backend in router.connections:
                if backend not in known:
                    members.append({"name": backend[0], "host": backend[1], "port": backend[2],
                                    "eligible": False, "reason": "not in the cluster",
                                    "connections": router.count(backend)})
            ports[name] = {"listen": router.config.listen, "roles": list(router.config.roles),
                           "host_port": router.config.host_port,
                           "max_lag_in_bytes": router.config.max_lag_in_bytes,
                           "connections": router.count(), "rejected": router.rejected_total,
                           "members": members}
        return {
            "hosts": list(self.config.hosts),
            "scope": state.scope if state else None,
            "last_update": self.last_update,
            "last_update_source": state.source if state else None,
            "last_error": self.last_error,
            "update_errors": self.update_errors_total,
            "failovers": self.failovers_total,
            "members": [m.as_dict() for m in (state.members if state else ())],
            "ports": ports,
        }


def _summary(state: ClusterState) -> str:
    return ", ".join("%s=%s/%s" % (m.name, m.role, m.state) for m in state.members)
