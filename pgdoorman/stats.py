"""
Statistics the pools keep for SHOW STATS and /metrics, at the cost of a few integer increments.

Nothing here runs per message.  L{Histogram} is observed once per query (at its
ReadyForQuery), once per transaction (its duration) and once per checkout (the wait for a
server); it is a list of ints and a bisect, and is turned
into a Prometheus histogram or percentiles only when someone asks (a scrape, SHOW POOLS).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import List, Sequence, Tuple

#: Bucket upper bounds in seconds, from 100µs (a pooled SELECT 1 on loopback) to a minute.
LATENCY_BUCKETS: Tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """
    Counts of observations per bucket (C{counts[i]}: values <= C{bounds[i]}; the last count is
    the +Inf bucket) and their sum.  Counts are per bucket, not cumulative.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS):
        self.bounds = tuple(bounds)
        self.counts: List[int] = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> List[Tuple[str, int]]:
        """Prometheus buckets: (le, cumulative count), ending with +Inf."""
        out = []
        total = 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            out.append((_le(bound), total))
        total += self.counts[-1]
        out.append(("+Inf", total))
        return out

    def quantile(self, q: float) -> float:
        """
        Estimate the C{q} quantile (0..1) in seconds by linear interpolation inside the
        bucket it falls in, as Prometheus' histogram_quantile does; 0.0 with no observations.
        """
        total = self.count
        if not total:
            return 0.0
        rank = q * total
        seen = 0
        lower = 0.0
        for i, n in enumerate(self.counts):
            upper = self.bounds[i] if i < len(self.bounds) else self.bounds[-1]
            if n and seen + n >= rank:
                if i >= len(self.bounds):
                    return self.bounds[-1]
                return lower + (upper - lower) * ((rank - seen) / n)
            seen += n
            lower = upper
        return self.bounds[-1]

    def merge(self, other: "Histogram") -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum


def _le(bound: float) -> str:
    return repr(float(bound))


class PoolStats:
    """
    Counters of one pool, the numbers behind PgBouncer's SHOW STATS.

    Per-transaction figures are kept here directly; the per-message ones (queries, bytes)
    are counted as plain ints on each client and server connection and added in here when
    the connection goes away (see L{pgdoorman.pool.Pool.traffic}), so the relay touches
    nothing but its own attributes.

    Times are in seconds (floats); SHOW STATS shows them in microseconds as PgBouncer does.
    """

    __slots__ = ("xact_count", "query_count", "wait_count", "wait_time", "max_wait",
                 "server_connects", "server_connect_errors", "wait_timeouts",
                 "server_assignment_count", "xact_time", "client_connect_count",
                 "client_bytes", "server_bytes", "xact_hist", "wait_hist", "query_time",
                 "query_hist")

    def __init__(self):
        self.xact_count = 0
        #: queries of connections that have gone away (live ones are added on read).
        self.query_count = 0
        self.wait_count = 0
        self.wait_time = 0.0
        self.max_wait = 0.0
        self.server_connects = 0
        self.server_connect_errors = 0
        self.wait_timeouts = 0
        self.server_assignment_count = 0
        self.xact_time = 0.0
        self.client_connect_count = 0
        #: bytes received from clients / sent to clients, of connections that have gone away.
        self.client_bytes = 0
        self.server_bytes = 0
        self.xact_hist = Histogram()
        self.wait_hist = Histogram()
        #: from a query's send (or the previous reply, in a pipeline) to its ReadyForQuery.
        self.query_time = 0.0
        self.query_hist = Histogram()


#: Fields of a L{Snapshot}, in PgBouncer's SHOW STATS order.
SNAPSHOT_FIELDS = ("server_assignment_count", "xact_count", "query_count", "client_bytes",
                   "server_bytes", "xact_time", "query_time", "wait_time",
                   "client_parse_count", "server_parse_count", "bind_count",
                   "client_connect_count")


class Snapshot:
    """The totals of one pool (or a sum of pools) at one moment, for averages over time."""

    __slots__ = SNAPSHOT_FIELDS

    def __init__(self, **values):
        for name in SNAPSHOT_FIELDS:
            setattr(self, name, values.get(name, 0))

    def add(self, other: "Snapshot") -> "Snapshot":
        for name in SNAPSHOT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def averages(self, older: "Snapshot", seconds: float) -> "Snapshot":
        """
        PgBouncer's averages: counts and bytes per second over the period, times per
        transaction, query or assignment (in the same unit as the totals).
        """
        avg = Snapshot()
        if seconds <= 0:
            return avg
        d = {name: getattr(self, name) - getattr(older, name) for name in SNAPSHOT_FIELDS}
        for name in ("server_assignment_count", "xact_count", "query_count", "client_bytes",
                     "server_bytes", "client_parse_count", "server_parse_count", "bind_count",
                     "client_connect_count"):
            setattr(avg, name, d[name] / seconds)
        if d["xact_count"] > 0:
            avg.xact_time = d["xact_time"] / d["xact_count"]
        if d["query_count"] > 0:
            avg.query_time = d["query_time"] / d["query_count"]
        if d["server_assignment_count"] > 0:
            avg.wait_time = d["wait_time"] / d["server_assignment_count"]
        return avg
