"""
Prometheus metrics (issue 4): /metrics on the port from the prometheus section, served by the
pooler's own reactor, with numbers that move as traffic flows.
"""

import re
import urllib.error
import urllib.request

import pytest

from conftest import Background, free_port, simple_config, wait_until

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
