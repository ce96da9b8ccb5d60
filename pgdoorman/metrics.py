"""
Prometheus metrics on HTTP C{/metrics} (port 9127 by default), in the pooler's own reactor.

Nothing Prometheus-related runs while traffic flows: the pools count in plain ints and bucket
lists (L{pgdoorman.stats}), and L{PoolCollector} turns them into metric families only when
Prometheus scrapes.  Metric names and labels are PgDoorman's (C{pg_doorman_*}, labels
C{database} and C{user}, C{status} for client and server states) so its dashboards work.

The same small web server answers C{/} with an HTML status page of the pools.
"""

from __future__ import annotations

import html
import os
import time
from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from twisted.application import internet
from twisted.logger import Logger
from twisted.web import resource, server

from pgdoorman import __version__
from pgdoorman import sessionstate as _sessionstate
from pgdoorman.protocol import errors

__all__ = ["PoolCollector", "make_registry", "make_metrics_service", "MetricsResource"]

_PERCENTILES = (("50", 0.5), ("90", 0.9), ("95", 0.95), ("99", 0.99))

#: SQLSTATE classes reported by pg_doorman_errors_total{kind}.
_ERROR_KINDS = {
    errors.INVALID_PASSWORD: "auth", errors.INVALID_AUTHORIZATION: "auth",
    errors.TOO_MANY_CONNECTIONS: "too_many_clients", errors.CONNECTION_FAILURE: "server_lost",
    errors.CANNOT_CONNECT_NOW: "server_unavailable", errors.PROTOCOL_VIOLATION: "protocol",
    errors.INVALID_CATALOG_NAME: "unknown_database", errors.ADMIN_SHUTDOWN: "admin",
}


def _labels(pool):
    return [pool.database, pool.user]


class PoolCollector:
    """A custom collector over a L{pgdoorman.pool.PoolService}; read on scrape only."""

    def __init__(self, pools):
        self.pools = pools

    def describe(self):
        return []

    def collect(self) -> Iterator:
        pools = self.pools.all_pools()
        du = ["database", "user"]
        clients = GaugeMetricFamily("pg_doorman_pools_clients",
                                    "Clients in each pool by status (active: holds a server; "
                                    "idle: logged in, between transactions; waiting: queued "
                                    "for a server)", labels=du + ["status"])
        servers = GaugeMetricFamily("pg_doorman_pools_servers",
                                    "Server connections in each pool by status (active, idle, "
                                    "login)", labels=du + ["status"])
        size = GaugeMetricFamily("pg_doorman_pool_size", "Configured pool_size", labels=du)
        paused = GaugeMetricFamily("pg_doorman_pools_paused", "1 while the pool is paused",
                                   labels=du)
        maxwait = GaugeMetricFamily("pg_doorman_pools_maxwait_seconds",
                                    "How long the oldest waiting client has waited",
                                    labels=du)
        avg_wait = GaugeMetricFamily("pg_doorman_pools_avg_wait_time",
                                     "Average wait for a server, in milliseconds (a running "
                                     "mean; prefer pg_doorman_pools_wait_duration_seconds)",
                                     labels=du)
        xacts = CounterMetricFamily("pg_doorman_pools_transactions",
                                    "Transactions served", labels=du)
        queries = CounterMetricFamily("pg_doorman_pools_queries",
                                      "Queries (Query, Sync and FunctionCall messages) served",
                                      labels=du)
        xact_time = GaugeMetricFamily("pg_doorman_pools_transactions_total_time",
                                      "Time spent in transactions, in milliseconds",
                                      labels=du)
        nbytes = CounterMetricFamily("pg_doorman_pools_bytes",
                                     "Bytes received from clients and sent to clients",
                                     labels=du + ["direction"])
        xact_hist = HistogramMetricFamily("pg_doorman_pools_transaction_duration_seconds",
                                          "Transaction duration (server checkout to release, "
                                          "transaction mode)", labels=du)
        query_hist = HistogramMetricFamily("pg_doorman_pools_query_duration_seconds",
                                           "Query duration (sent to ReadyForQuery; in a "
                                           "pipeline, from the previous reply)", labels=du)
        query_pct = GaugeMetricFamily("pg_doorman_pools_queries_percentile",
                                      "Query duration percentiles in milliseconds "
                                      "(estimated from the histogram)",
                                      labels=du + ["percentile"])
        wait_hist = HistogramMetricFamily("pg_doorman_pools_wait_duration_seconds",
                                          "Time clients waited for a server", labels=du)
        xact_pct = GaugeMetricFamily("pg_doorman_pools_transactions_percentile",
                                     "Transaction duration percentiles in milliseconds "
                                     "(estimated from the histogram)",
                                     labels=du + ["percentile"])
        wait_pct = GaugeMetricFamily("pg_doorman_pools_wait_time_percentile",
                                     "Wait-for-server percentiles in milliseconds",
                                     labels=du + ["percentile"])
        hits = CounterMetricFamily("pg_doorman_servers_prepared_hits",
                                   "Prepared statements found on the server already", labels=du)
        misses = CounterMetricFamily("pg_doorman_servers_prepared_misses",
                                     "Prepared statements that had to be Parsed on the server",
                                     labels=du)
        evictions = CounterMetricFamily("pg_doorman_servers_prepared_evictions",
                                        "Prepared statements evicted from the pool cache",
                                        labels=du)
        cached = GaugeMetricFamily("pg_doorman_pool_prepared_cache_entries",
                                   "Prepared statements in the pool's cache", labels=du)
        connects = CounterMetricFamily("pg_doorman_servers_connects",
                                       "Server connections opened", labels=du)
        connect_errors = CounterMetricFamily("pg_doorman_servers_connect_errors",
                                             "Server connections that failed to open or log "
                                             "in", labels=du)
        timeouts = CounterMetricFamily("pg_doorman_pools_wait_timeouts",
                                       "Clients dropped by query_wait_timeout", labels=du)
        now = time.monotonic()
        for pool in pools:
            lv = _labels(pool)
            active_servers, idle_servers, waiting = pool.counts()
            with_server = sum(1 for c in pool.members if c.server is not None)
            clients.add_metric(lv + ["active"], with_server)
            clients.add_metric(lv + ["waiting"], waiting)
            clients.add_metric(lv + ["idle"], max(0, pool.clients - waiting - with_server))
            servers.add_metric(lv + ["active"], active_servers)
            servers.add_metric(lv + ["idle"], idle_servers)
            servers.add_metric(lv + ["login"], pool.connecting)
            size.add_metric(lv, pool.settings.pool_size)
            paused.add_metric(lv, 1 if pool.paused else 0)
            maxwait.add_metric(lv, pool.max_wait_now(now))
            st = pool.stats
            avg_wait.add_metric(lv, (st.wait_time / st.server_assignment_count * 1000.0)
                                if st.server_assignment_count else 0.0)
            q, received, sent = pool.traffic()
            xacts.add_metric(lv, st.xact_count)
            queries.add_metric(lv, q)
            xact_time.add_metric(lv, st.xact_time * 1000.0)
            nbytes.add_metric(lv + ["received"], received)
            nbytes.add_metric(lv + ["sent"], sent)
            xact_hist.add_metric(lv, st.xact_hist.cumulative(), st.xact_hist.sum)
            wait_hist.add_metric(lv, st.wait_hist.cumulative(), st.wait_hist.sum)
            query_hist.add_metric(lv, st.query_hist.cumulative(), st.query_hist.sum)
            for name, q_ in _PERCENTILES:
                query_pct.add_metric(lv + [name], st.query_hist.quantile(q_) * 1000.0)
                xact_pct.add_metric(lv + [name], st.xact_hist.quantile(q_) * 1000.0)
                wait_pct.add_metric(lv + [name], st.wait_hist.quantile(q_) * 1000.0)
            ps = pool.statements
            hits.add_metric(lv, ps.hits)
            misses.add_metric(lv, ps.misses)
            evictions.add_metric(lv, ps.evictions)
            cached.add_metric(lv, len(ps.statements))
            connects.add_metric(lv, st.server_connects)
            connect_errors.add_metric(lv, st.server_connect_errors)
            timeouts.add_metric(lv, st.wait_timeouts)
        yield from (clients, servers, size, paused, maxwait, avg_wait, xacts, queries, xact_time,
                    nbytes, xact_hist, wait_hist, xact_pct, wait_pct, query_hist, query_pct,
                    hits, misses, evictions,
                    cached, connects, connect_errors, timeouts)

        yield from _sessionstate.metrics(self.pools)
        if self.pools.coordinators:
            yield from _coordinator_metrics(self.pools.coordinators)

        conn = GaugeMetricFamily("pg_doorman_connection_count",
                                 "Open connections by type", labels=["type"])
        conn.add_metric(["client"], len(self.pools.clients))
        conn.add_metric(["server"], self.pools.server_count())
        yield conn
        total = CounterMetricFamily("pg_doorman_connections",
                                    "Connections made since start, by type", labels=["type"])
        total.add_metric(["client"], sum(p.stats.client_connect_count for p in pools))
        total.add_metric(["server"], sum(p.stats.server_connects for p in pools))
        yield total
        errs = CounterMetricFamily("pg_doorman_errors",
                                   "Errors sent to clients, by kind and SQLSTATE",
                                   labels=["kind", "sqlstate"])
        auth = 0
        for code, n in sorted(self.pools.errors.items()):
            kind = _ERROR_KINDS.get(code, "other")
            if kind == "auth":
                auth += n
            errs.add_metric([kind, code], n)
        yield errs
        yield CounterMetricFamily("pg_doorman_auth_failures", "Failed client logins",
                                  value=auth)
        yield GaugeMetricFamily("pg_doorman_total_memory", "Resident memory in bytes",
                                value=_rss())
        yield GaugeMetricFamily("pg_doorman_paused",
                                "1 while the whole pooler is paused (PAUSE)",
                                value=1 if self.pools.paused_all else 0)
        yield CounterMetricFamily("pg_doorman_reloads", "Configuration reloads applied",
                                  value=self.pools.reloads)
        yield from _auth_query_families(self.pools)
        info = GaugeMetricFamily("pg_doorman_info", "pgdoorman version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def _auth_query_families(pools) -> Iterator:
    """PgDoorman's auth_query families (gauges by type/result and database), when configured."""
    from pgdoorman.auth import query as _auth_query
    queries = _auth_query.all_queries(pools)
    if not queries:
        return
    cache = GaugeMetricFamily("pg_doorman_auth_query_cache",
                              "Auth query cache metrics by type and database",
                              labels=["type", "database"])
    auth = GaugeMetricFamily("pg_doorman_auth_query_auth",
                             "Auth query authentication outcomes by result and database",
                             labels=["result", "database"])
    executor = GaugeMetricFamily("pg_doorman_auth_query_executor",
                                 "Auth query executor metrics by type and database",
                                 labels=["type", "database"])
    dynamic = GaugeMetricFamily("pg_doorman_auth_query_dynamic_pools",
                                "Auth query dynamic pool metrics by type and database",
                                labels=["type", "database"])
    for aq in queries:
        db = aq.pool_name
        for kind, value in (("entries", len(aq.entries)), ("hits", aq.cache_hits),
                            ("misses", aq.cache_misses), ("refetches", aq.cache_refetches),
                            ("rate_limited", aq.rate_limited)):
            cache.add_metric([kind, db], value)
        auth.add_metric(["success", db], aq.auth_success)
        auth.add_metric(["failure", db], aq.auth_failure)
        executor.add_metric(["queries", db], aq.executor_queries)
        executor.add_metric(["errors", db], aq.executor_errors)
        for kind, value in (("current", aq.dynamic_pools()), ("created", aq.pools_created),
                            ("destroyed", aq.pools_destroyed)):
            dynamic.add_metric([kind, db], value)
    yield from (cache, auth, executor, dynamic)


def _coordinator_metrics(coordinators) -> Iterator:
    """PgDoorman's pg_doorman_pool_coordinator gauges and _total counters, per database."""
    gauges = GaugeMetricFamily("pg_doorman_pool_coordinator",
                               "Pool coordinator state (max_db_connections), by type",
                               labels=["database", "type"])
    counters = CounterMetricFamily("pg_doorman_pool_coordinator",
                                   "Pool coordinator events since start, by type",
                                   labels=["database", "type"])
    for name, coordinator in sorted(coordinators.items()):
        st = coordinator.stats()
        gauges.add_metric([name, "connections"], st["current"])
        gauges.add_metric([name, "reserve_in_use"], st["reserve_used"])
        gauges.add_metric([name, "max_connections"], st["max_db_conn"])
        gauges.add_metric([name, "reserve_pool_size"], st["reserve_size"])
        counters.add_metric([name, "evictions"], st["evictions"])
        counters.add_metric([name, "reserve_acquisitions"], st["reserve_acq"])
        counters.add_metric([name, "exhaustions"], st["exhaustions"])
    yield gauges
    yield counters


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def make_registry(pools) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(pools))
    try:
        ProcessCollector(registry=registry)
    except Exception:  # pragma: no cover - no /proc
        pass
    return registry


class MetricsResource(resource.Resource):
    """C{GET /metrics}: the text exposition format, generated in the reactor thread."""

    isLeaf = True
    log = Logger()

    def __init__(self, registry):
        resource.Resource.__init__(self)
        self.registry = registry

    def render_GET(self, request):
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class StatusPage(resource.Resource):
    """C{GET /}: a small HTML page of the pools, for a look without Grafana."""

    isLeaf = True

    def __init__(self, pools):
        resource.Resource.__init__(self)
        self.pools = pools

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return render_status(self.pools).encode("utf-8")


def render_status(pools) -> str:
    now = time.monotonic()
    rows = []
    for pool in pools.all_pools():
        active, idle, waiting = pool.counts()
        st = pool.stats
        q, received, sent = pool.traffic()
        hist = st.xact_hist
        load = active / pool.settings.pool_size if pool.settings.pool_size else 0
        state = "paused" if pool.paused else ("draining" if pool.draining else "running")
        rows.append(
            "<tr><td>%s</td><td>%s</td><td>%s</td><td>%d</td><td class='%s'>%d</td>"
            "<td>%d</td><td>%d</td><td><div class='bar'><div style='width:%d%%'></div></div>"
            "%d / %d</td><td>%.1f</td><td>%d</td><td>%d</td><td>%.2f</td><td>%.2f</td>"
            "<td>%.2f</td><td>%s</td><td>%s</td></tr>" % (
                html.escape(pool.database), html.escape(pool.user), pool.settings.pool_mode,
                pool.clients - waiting, "warn" if waiting else "", waiting, active, idle,
                min(100, int(load * 100)), len(pool.servers), pool.settings.pool_size,
                pool.max_wait_now(now) * 1000, st.xact_count, q,
                hist.quantile(0.5) * 1000, hist.quantile(0.95) * 1000,
                hist.quantile(0.99) * 1000, _bytes(received + sent), state))
    uptime = time.time() - pools.started
    return _PAGE % {
        "version": __version__, "uptime": "%dh %02dm %02ds" % (uptime // 3600,
                                                               uptime % 3600 // 60, uptime % 60),
        "clients": len(pools.clients), "servers": pools.server_count(),
        "errors": sum(pools.errors.values()),
        "paused": "yes" if pools.paused_all else "no",
        "rows": "\n".join(rows) or "<tr><td colspan='16'>no pools in use yet</td></tr>"}


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return "%d %s" % (n, unit)
        n //= 1024
    return "%d TB" % n


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>pgdoorman status</title>
<style>
body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .3em 0; }
.cards { display: flex; gap: 1em; margin: 1em 0; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em; }
.card b { display: block; font-size: 1.6em; }
table { border-collapse: collapse; background: #fff; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: right; }
th { background: #eef; }
td:nth-child(-n+3), th:nth-child(-n+3) { text-align: left; }
.warn { background: #fdd; font-weight: bold; }
.bar { display: inline-block; width: 60px; height: 8px; background: #eee; margin-right: 4px; }
.bar div { height: 8px; background: #47a; }
small { color: #666; }
</style></head><body>
<h1>pgdoorman %(version)s</h1>
<small>uptime %(uptime)s &middot; <a href="/metrics">/metrics</a> &middot;
refreshes every 5s</small>
<div class="cards">
<div class="card">clients<b>%(clients)s</b></div>
<div class="card">server connections<b>%(servers)s</b></div>
<div class="card">errors sent<b>%(errors)s</b></div>
<div class="card">paused<b>%(paused)s</b></div>
</div>
<table>
<tr><th>database</th><th>user</th><th>mode</th><th>cl_active</th><th>cl_waiting</th>
<th>sv_active</th><th>sv_idle</th><th>servers / pool_size</th><th>maxwait ms</th>
<th>transactions</th><th>queries</th><th>xact p50 ms</th><th>p95 ms</th><th>p99 ms</th>
<th>traffic</th><th>state</th></tr>
%(rows)s
</table>
</body></html>
"""


def make_site(pools) -> server.Site:
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(make_registry(pools)))
    status = StatusPage(pools)
    root.putChild(b"", status)
    root.putChild(b"status", status)
    site = server.Site(root)
    site.noisy = False
    site.displayTracebacks = False
    return site


def make_metrics_service(pools, prometheus_config) -> internet.TCPServer:
    """The /metrics listener, a child service of the pooler (same reactor, no threads)."""
    return internet.TCPServer(prometheus_config.port, make_site(pools),
                              interface=prometheus_config.host)
