"""
Prometheus metrics (issue 4): /metrics on the port from the prometheus section, served by the
pooler's own reactor, with numbers that move as traffic flows.
"""

import re
import urllib.error
import urllib.request

import psycopg
import pytest
import yaml
from psycopg.rows import dict_row

from conftest import (Background, free_port, make_config, pool_entry, simple_config,
                      user_entry, wait_until)

from pgdoorman.stats import Histogram


def scrape(port, path="/metrics"):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as r:
        return r.headers.get("Content-Type"), r.read().decode()


def value(text, name, **labels):
    """The sample C{name{labels}} from an exposition text (labels in any order), or None."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == str(v) for k, v in labels.items()):
            return float(m.group(3))
    return None


@pytest.fixture
def metered(pgdoorman, pg, new_user):
    user, password = new_user()
    port = free_port()
    config = simple_config(pg, user, password, pool_size=2,
                           general={"query_wait_timeout": "60s"})
    config["prometheus"] = {"enabled": True, "host": "127.0.0.1", "port": port}
    d = pgdoorman(config)
    wait_until(lambda: _up(port), message="metrics port up")
    return d, port, user, password


def _up(port):
    try:
        scrape(port)
        return True
    except (OSError, urllib.error.URLError):
        return False


def test_metrics_move_with_traffic(metered):
    d, port, user, password = metered
    ctype, before = scrape(port)
    assert ctype.startswith("text/plain")
    assert value(before, "pg_doorman_info", version="0.1.0") == 1
    assert value(before, "process_resident_memory_bytes") > 0
    assert value(before, "pg_doorman_total_memory") > 0
    with d.connect(user, "db1", password) as conn:
        for _ in range(20):
            conn.execute("SELECT 1")
        _, during = scrape(port)
        lv = {"database": "db1", "user": user}
        assert value(during, "pg_doorman_pools_clients", status="idle", **lv) == 1
        assert value(during, "pg_doorman_pools_servers", status="idle", **lv) == 1
        assert value(during, "pg_doorman_pool_size", **lv) == 2
        assert value(during, "pg_doorman_pools_transactions_total", **lv) >= 20
        assert value(during, "pg_doorman_pools_queries_total", **lv) >= 20
        assert value(during, "pg_doorman_pools_bytes_total", direction="received", **lv) > 0
        assert value(during, "pg_doorman_pools_bytes_total", direction="sent", **lv) > 0
        count = value(during, "pg_doorman_pools_transaction_duration_seconds_count", **lv)
        assert count >= 20
        assert value(during, "pg_doorman_pools_transaction_duration_seconds_bucket",
                     le="+Inf", **lv) == count
        assert value(during, "pg_doorman_pools_transactions_percentile",
                     percentile="99", **lv) > 0
        queries = value(during, "pg_doorman_pools_query_duration_seconds_count", **lv)
        assert queries >= 20
        assert value(during, "pg_doorman_pools_query_duration_seconds_bucket",
                     le="+Inf", **lv) == queries
        assert value(during, "pg_doorman_pools_query_duration_seconds_sum", **lv) > 0
        assert value(during, "pg_doorman_pools_queries_percentile",
                     percentile="99", **lv) > 0
        assert value(during, "pg_doorman_connection_count", type="client") == 1
        for _ in range(10):
            conn.execute("SELECT 1")
        _, after = scrape(port)
        assert value(after, "pg_doorman_pools_transactions_total", **lv) >= \
            value(during, "pg_doorman_pools_transactions_total", **lv) + 10
    # the client left: its queries stay in the totals
    _, gone = scrape(port)
    assert value(gone, "pg_doorman_pools_queries_total", **lv) >= 30
    assert value(gone, "pg_doorman_connections_total", type="client") == 1


def test_waiting_clients_and_wait_histogram(metered):
    d, port, user, password = metered
    lv = {"database": "db1", "user": "%s" % user}
    holders = [d.connect(user, "db1", password, autocommit=False) for _ in range(2)]
    for c in holders:
        c.execute("SELECT 1")
    waiter = d.connect(user, "db1", password)
    w = Background(waiter.execute, "SELECT 2")
    wait_until(lambda: value(scrape(port)[1], "pg_doorman_pools_clients", status="waiting",
                             **lv) == 1, message="waiting client in metrics")
    _, text = scrape(port)
    assert value(text, "pg_doorman_pools_servers", status="active", **lv) == 2
    assert value(text, "pg_doorman_pools_maxwait_seconds", **lv) > 0
    holders[0].commit()
    w.result(10)
    _, text = scrape(port)
    # the waiter waited some time: it is counted above the first (100µs) bucket
    assert value(text, "pg_doorman_pools_wait_duration_seconds_count", **lv) >= 3
    assert value(text, "pg_doorman_pools_wait_duration_seconds_bucket", le="0.0001", **lv) < \
        value(text, "pg_doorman_pools_wait_duration_seconds_count", **lv)
    for c in holders + [waiter]:
        c.close()


def test_auth_failures_and_errors_are_counted(metered):
    d, port, user, password = metered
    import psycopg
    with pytest.raises(psycopg.OperationalError):
        d.connect(user, "db1", "wrong")
    _, text = scrape(port)
    assert value(text, "pg_doorman_auth_failures_total") == 1
    assert value(text, "pg_doorman_errors_total", kind="auth", sqlstate="28P01") == 1


def test_status_page(metered):
    d, port, user, password = metered
    with d.connect(user, "db1", password) as conn:
        conn.execute("SELECT 1")
        ctype, page = scrape(port, "/")
    assert ctype.startswith("text/html")
    assert "pgdoorman" in page and "<td>db1</td>" in page and user in page


def test_metrics_off_by_default(pgdoorman, pg, new_user):
    user, password = new_user()
    d = pgdoorman(simple_config(pg, user, password))
    import psycopg
    with psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True) as conn:
        rows = dict((k, v) for k, v, _d, _c in conn.execute("SHOW CONFIG").fetchall())
    assert rows["prometheus.enabled"] == "false"
    assert rows["prometheus.port"] == "9127"


def test_histogram_quantiles():
    h = Histogram((0.001, 0.01, 0.1))
    assert h.quantile(0.5) == 0.0
    for _ in range(90):
        h.observe(0.0005)
    for _ in range(10):
        h.observe(0.05)
    assert h.quantile(0.5) <= 0.001
    assert 0.01 < h.quantile(0.99) <= 0.1
    assert h.cumulative() == [("0.001", 90), ("0.01", 90), ("0.1", 100), ("+Inf", 100)]
    h.observe(5.0)
    assert h.cumulative()[-1] == ("+Inf", 101)
    assert h.count == 101 and abs(h.sum - (0.045 + 0.5 + 5.0)) < 1e-9


def test_dashboard_reads_exported_metrics(metered):
    """Every pg_doorman_* series the Grafana dashboard queries is one /metrics exports."""
    import json
    import os
    d, port, user, password = metered
    with d.connect(user, "db1", password) as conn:
        conn.execute("SELECT 1")
    _, text = scrape(port)
    exported = set(re.findall(r"^([a-z_]+)(?:\{| )", text, re.M))
    for name in re.findall(r"^# TYPE (\w+) \w+$", text, re.M):
        exported.add(name)  # families without samples yet (no errors so far)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "packaging", "grafana", "pgdoorman-dashboard.json")
    with open(path) as f:
        dashboard = f.read()
    json.loads(dashboard)
    wanted = set(re.findall(r"\b((?:pg_doorman|process)_[a-z_]+)", dashboard))
    assert wanted, "no metrics in the dashboard?"
    assert wanted <= exported, sorted(wanted - exported)


def test_configured_pools_listed_before_first_use(pgdoorman, pg, new_user):
    """
    Every configured (database, user) is in SHOW POOLS, SHOW DATABASES and /metrics from the
    start, with zeros, as in PgBouncer; listing them opens no server connection.
    """
    u1, p1 = new_user()
    u2, p2 = new_user()
    port = free_port()
    config = make_config({
        "db1": pool_entry(pg, [user_entry(u1, p1, server_username=u1, server_password=p1),
                               user_entry(u2, p2, server_username=u2, server_password=p2)]),
        "db2": pool_entry(pg, [user_entry(u1, p1, server_username=u1, server_password=p1)],
                          database="db1")})
    config["prometheus"] = {"enabled": True, "host": "127.0.0.1", "port": port}
    d = pgdoorman(config)
    wait_until(lambda: _up(port), message="metrics port up")
    with psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True,
                         row_factory=dict_row) as admin:
        pools = {(r["database"], r["user"]): r for r in admin.execute("SHOW POOLS")}
        assert set(pools) == {("db1", u1), ("db1", u2), ("db2", u1)}
        for row in pools.values():
            assert (row["cl_active"], row["cl_waiting"], row["sv_active"], row["sv_idle"]) \
                == (0, 0, 0, 0)
        stats = {r["database"] for r in admin.execute("SHOW STATS")}
        assert {"db1", "db2"} <= stats
        dbs = {r["name"]: r for r in admin.execute("SHOW DATABASES")}
        assert dbs["db1"]["current_connections"] == 0 and "db2" in dbs
    _, text = scrape(port)
    for db, user in (("db1", u1), ("db1", u2), ("db2", u1)):
        assert value(text, "pg_doorman_pool_size", database=db, user=user) == 2
        assert value(text, "pg_doorman_pools_clients", status="idle", database=db,
                     user=user) == 0
    assert pg.count_backends(u1) == 0 and pg.count_backends(u2) == 0
    # A pool added by a reload is listed at once too.
    u3, p3 = new_user()
    config["pools"]["db3"] = pool_entry(pg, [user_entry(u3, p3, server_username=u3,
                                                        server_password=p3)], database="db1")
    config["general"] = dict(config["general"], host="127.0.0.1", port=d.port)
    with open(d.config_path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    with psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True,
                         row_factory=dict_row) as admin:
        admin.execute("RELOAD")
        assert ("db3", u3) in {(r["database"], r["user"]) for r in admin.execute("SHOW POOLS")}
    assert pg.count_backends(u3) == 0
