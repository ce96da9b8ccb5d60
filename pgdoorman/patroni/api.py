"""
patroni_proxy's HTTP API (twisted.web), on C{listen_address}:

  - C{GET /} → C{OK} (a liveness probe).
  - C{GET /update_clusters} → poll every cluster's C{/cluster} now; answers once the polls are
    done: 200 C{OK} when every cluster answered, 503 with the errors otherwise.
  - C{GET /status} → JSON: per cluster, the members (role, state, lag, tags) and per port each
    member's eligibility, the reason when not eligible, and its open connections.
  - C{GET /metrics} → Prometheus text format (prometheus-client), built from the same state at
    scrape time.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.logger import Logger
from twisted.web import resource, server

__all__ = ["APIRoot", "ProxyCollector"]

#: Patroni role names reported by the members-per-role gauge (others are counted as-is).
_ROLES = ("leader", "sync_standby", "replica")


class ProxyCollector:
    """Prometheus metrics read from a L{pgdoorman.patroni.service.ProxyService} on scrape."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Any]:
        members = GaugeMetricFamily("patroni_proxy_cluster_members",
                                    "Members in the last good /cluster answer, by Patroni role",
                                    labels=["cluster", "role"])
        eligible = GaugeMetricFamily("patroni_proxy_eligible_members",
                                     "Members new connections on the port may go to",
                                     labels=["cluster", "port"])
        conns = GaugeMetricFamily("patroni_proxy_connections",
                                  "Open client connections, by port and backend member",
                                  labels=["cluster", "port", "backend"])
        conns_total = CounterMetricFamily("patroni_proxy_connections",
                                          "Client connections forwarded, by port and backend",
                                          labels=["cluster", "port", "backend"])
        rejected = CounterMetricFamily("patroni_proxy_rejected_connections",
                                       "Client connections closed because no member was "
                                       "eligible", labels=["cluster", "port"])
        closed = CounterMetricFamily("patroni_proxy_closed_connections",
                                     "Connections closed because their member left the "
                                     "port's eligible set", labels=["cluster"])
        updates = CounterMetricFamily("patroni_proxy_updates", "Good /cluster answers",
                                      labels=["cluster"])
        errors = CounterMetricFamily("patroni_proxy_update_errors",
                                     "Polls where no host gave a good /cluster answer",
                                     labels=["cluster"])
        failovers = CounterMetricFamily("patroni_proxy_failovers",
                                        "Leader changes seen between two answers",
                                        labels=["cluster"])
        last = GaugeMetricFamily("patroni_proxy_last_update_timestamp_seconds",
                                 "Unix time of the last good /cluster answer",
                                 labels=["cluster"])
        for name, watcher in self.proxy.watchers.items():
            counts = dict((r, 0) for r in _ROLES)
            if watcher.state is not None:
                for m in watcher.state.members:
                    counts[m.role] = counts.get(m.role, 0) + 1
            for role, n in sorted(counts.items()):
                members.add_metric([name, role], n)
            for port_name, router in watcher.routers.items():
                eligible.add_metric([name, port_name], len(router.eligible))
                for backend in set(router.connections) | set(router.eligible):
                    conns.add_metric([name, port_name, backend[0]], router.count(backend))
                for backend, n in router.connections_total.items():
                    conns_total.add_metric([name, port_name, backend[0]], n)
                rejected.add_metric([name, port_name], router.rejected_total)
            closed.add_metric([name], watcher.closed_total)
            updates.add_metric([name], watcher.updates_total)
            errors.add_metric([name], watcher.update_errors_total)
            failovers.add_metric([name], watcher.failovers_total)
            if watcher.last_update is not None:
                last.add_metric([name], watcher.last_update)
        return iter([members, eligible, conns, conns_total, rejected, closed, updates, errors,
                     failovers, last])


class _Leaf(resource.Resource):
    isLeaf = True

    def __init__(self, proxy: Any) -> None:
        resource.Resource.__init__(self)
        self.proxy = proxy


class _Root(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"OK\n"


class _Status(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(self.proxy.status(), indent=2, sort_keys=True).encode() + b"\n"


class _Update(_Leaf):
    log = Logger()

    def render_GET(self, request: Any) -> Any:
        d = self.proxy.update_all()

        def done(outcomes: Any) -> None:
            if request.finished or getattr(request, "_disconnected", False):
                return
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            failed = {k: v for k, v in outcomes.items() if v is not None}
            if failed:
                request.setResponseCode(503)
                request.write("".join("%s: %s\n" % kv for kv in sorted(failed.items()))
                              .encode())
            else:
                request.write(b"OK\n")
            request.finish()

        d.addCallback(done)
        d.addErrback(lambda f: self.log.failure("update_clusters", f))
        return server.NOT_DONE_YET

    render_POST = render_GET


class _Metrics(_Leaf):
    def __init__(self, proxy: Any) -> None:
        _Leaf.__init__(self, proxy)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxyCollector(proxy))

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


def _not_found() -> resource.Resource:
    try:
        from twisted.web.pages import notFound
    except ImportError:  # Twisted before 22.10
        return resource.NoResource()
    return notFound()


class APIRoot(resource.Resource):
    """The resource tree: C{/}, C{/update_clusters}, C{/status}, C{/metrics}."""

    def __init__(self, proxy: Any) -> None:
        resource.Resource.__init__(self)
        self.proxy = proxy
        self._children = {b"": _Root(proxy), b"update_clusters": _Update(proxy),
                          b"status": _Status(proxy), b"metrics": _Metrics(proxy)}

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        child = self._children.get(path)
        if child is None or request.postpath:
            return _not_found()
        return child

    def render_GET(self, request: Any) -> bytes:
        return self._children[b""].render_GET(request)
