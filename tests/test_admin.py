"""
The admin console (issue 4): psql and psycopg against the real process and PostgreSQL.

SHOW POOLS must count exactly what a test sets up (clients holding transactions, clients
waiting), control commands (PAUSE/RESUME/RECONNECT/KILL/SHUTDOWN) must do what they say, and
bad input must get an error without ending the session.
"""

import time

import psycopg
import pytest
from psycopg.rows import dict_row

from conftest import Background, psql, simple_config, wait_until

ADMIN = ("admin", "admin")


def admin(d, db="pgdoorman"):
    """An autocommit psycopg connection to the admin console."""
    return psycopg.connect(d.dsn(ADMIN[0], db, ADMIN[1]), autocommit=True, row_factory=dict_row)


def show(d, what, db="pgdoorman"):
    with admin(d, db) as conn:
        return conn.execute("SHOW %s" % what).fetchall()


def pool_row(d, db, user):
    rows = [r for r in show(d, "POOLS") if r["database"] == db and r["user"] == user]
    assert len(rows) == 1, rows
    return rows[0]


def hold_transaction(d, user, password, db="db1"):
    """A client inside a transaction that holds a server (deferred BEGIN needs a query)."""
    conn = d.connect(user, db, password, autocommit=False)
    conn.execute("SELECT 1")
    return conn


@pytest.fixture
def cfg(pg, new_user):
    user, password = new_user()
    config = simple_config(pg, user, password, pool_size=2,
                           general={"query_wait_timeout": "60s"})
    return user, password, config


def test_show_pools_counts_active_and_waiting_clients(pgdoorman, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    holders = [hold_transaction(d, user, password) for _ in range(2)]
    waiters_conns = [d.connect(user, "db1", password, autocommit=False) for _ in range(3)]
    def run_and_commit(conn):
        conn.execute("SELECT 2")
        conn.commit()

    waiters = [Background(run_and_commit, c) for c in waiters_conns]
    row = wait_until(lambda: (lambda r: r if r["cl_waiting"] == 3 else None)(
        pool_row(d, "db1", user)), message="3 waiting clients")
    assert row["cl_active"] == 2
    assert row["cl_waiting"] == 3
    assert row["sv_active"] == 2
    assert row["sv_idle"] == 0
    assert row["sv_used"] == 0 and row["sv_login"] == 0
    assert row["pool_mode"] == "transaction"
    assert row["pool_size"] == 2
    time.sleep(0.3)
    row = pool_row(d, "db1", user)
    assert row["maxwait"] * 1000000 + row["maxwait_us"] >= 200000  # waited ≥ 0.2s so far
    for c in holders:
        c.commit()
    for w in waiters:
        w.result(10)
    row = wait_until(lambda: (lambda r: r if r["sv_idle"] == 2 else None)(
        pool_row(d, "db1", user)), message="servers back to idle")
    assert (row["cl_active"], row["cl_waiting"], row["sv_active"]) == (5, 0, 0)
    assert row["maxwait"] == 0 and row["maxwait_us"] == 0
    for c in holders + waiters_conns:
        c.close()


def test_show_clients_and_servers(pgdoorman, pg, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    conn = hold_transaction(d, user, password)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    clients = [r for r in show(d, "CLIENTS") if r["user"] == user]
    assert len(clients) == 1
    c = clients[0]
    assert c["type"] == "C" and c["database"] == "db1" and c["state"] == "active"
    assert c["addr"] == "127.0.0.1" and c["link"]
    servers = [r for r in show(d, "SERVERS") if r["database"] == "db1"]
    assert [s["remote_pid"] for s in servers] == [pid]
    assert servers[0]["state"] == "active" and servers[0]["link"] == c["ptr"]
    conn.commit()
    servers = [r for r in show(d, "SERVERS") if r["database"] == "db1"]
    assert servers[0]["state"] == "idle" and not servers[0]["link"]
    assert [r["state"] for r in show(d, "CLIENTS") if r["user"] == user] == ["idle"]
    sockets = show(d, "SOCKETS")
    assert {"cl_active", "sv_idle"} <= {r["state"] for r in sockets}
    # PgBouncer 1.21+'s id column: one number per socket, clients and servers alike, the
    # same one ptr shows in hex, and the same in SHOW SOCKETS.
    c = [r for r in show(d, "CLIENTS") if r["user"] == user][0]
    s = [r for r in show(d, "SERVERS") if r["database"] == "db1"][0]
    assert c["id"] != s["id"] and c["id"] > 0 and s["id"] > 0
    assert c["ptr"] == "0x%x" % c["id"] and s["ptr"] == "0x%x" % s["id"]
    by_id = {r["id"]: r for r in show(d, "SOCKETS")}
    assert by_id[c["id"]]["type"] == "C" and by_id[s["id"]]["type"] == "S"
    conn.close()


def test_stats_parse_counts_are_exact(pgdoorman, pg, cfg):
    """
    total_client_parse_count counts the client's Parses, total_server_parse_count the Parses
    servers got, including the one pgdoorman injects when a client Binds its statement on a
    server that does not hold it yet.
    """
    user, password, config = cfg
    d = pgdoorman(config)
    a = d.connect(user, "db1", password, prepare_threshold=0)
    a.execute("SELECT %s::int + 1", (1,), prepare=True)  # Parse on server 1
    b = hold_transaction(d, user, password)  # takes server 1
    assert a.execute("SELECT %s::int + 1", (2,), prepare=True).fetchone()[0] == 3  # server 2
    b.commit()
    row = [r for r in show(d, "STATS") if r["database"] == "db1"][0]
    assert row["total_client_parse_count"] == 1
    assert row["total_server_parse_count"] == 2
    assert row["total_bind_count"] == 2  # the two executions of the named statement
    a.close()
    b.close()


def test_psql_commands_case_semicolons_and_errors(pgdoorman, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    for sql in ("SHOW POOLS", "show pools;", "Show Pools ;", "SHOW HELP", "SHOW CLIENTS",
                "SHOW SERVERS", "SHOW STATS", "SHOW STATS_TOTALS", "SHOW STATS_AVERAGES",
                "SHOW TOTALS", "SHOW DATABASES", "SHOW USERS", "SHOW CONFIG", "SHOW LISTS",
                "SHOW VERSION", "SHOW PREPARED_STATEMENTS", "SHOW PREPARED_QUERIES",
                "SHOW SOCKETS", "SHOW STATE", "SHOW LOG_LEVEL", "SHOW POOLS_EXTENDED",
                "SHOW CONNECTIONS"):
        out = psql(d, "admin", "pgdoorman", "admin", sql)
        assert out.returncode == 0, (sql, out.stderr)
    out = psql(d, "admin", "pgbouncer", "admin", "SHOW VERSION")
    assert out.returncode == 0 and out.stdout.startswith("pgdoorman"), out
    out = psql(d, "admin", "pgdoorman", "admin", "SHOW HELP")
    assert "SHOW HELP|CONFIG" in out.stderr and "RELOAD" in out.stderr
    # One psql session: an unknown command is an error, the next command still works.
    out = psql(d, "admin", "pgdoorman", "admin", args=["-v", "ON_ERROR_STOP=0"],
               input="SHOW NOTHING;\nFROBNICATE;\nSHOW VERSION;\n")
    assert "invalid command 'SHOW NOTHING'" in out.stderr
    assert "invalid command 'FROBNICATE'" in out.stderr
    assert out.stdout.strip().startswith("pgdoorman")


def test_psycopg_session_goes_on_after_an_error(pgdoorman, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    with admin(d) as conn:
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("SHOW WHATEVER")
        with pytest.raises(psycopg.Error):
            conn.execute("DROP TABLE x")
        assert conn.execute("SHOW VERSION").fetchone()["version"].startswith("pgdoorman")
        # the simple query protocol too, several statements at once
        cur = psycopg.ClientCursor(conn)
        cur.execute("SHOW LISTS; SHOW VERSION")
        assert "databases" in [r["list"] for r in cur.fetchall()]
        assert cur.nextset()
        assert cur.fetchone()["version"].startswith("pgdoorman")


def test_column_names_and_types_follow_pgbouncer(pgdoorman, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    with admin(d) as conn:
        cur = conn.execute("SHOW POOLS")
        names = [c.name for c in cur.description]
        assert names[:17] == [
            "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
            "cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled",
            "sv_idle", "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us",
            "pool_mode", "load_balance_hosts"]
        assert cur.description[2].type_code == 23  # int4
        cur = conn.execute("SHOW STATS")
        names = [c.name for c in cur.description]
        assert names[:6] == ["database", "total_server_assignment_count", "total_xact_count",
                             "total_query_count", "total_received", "total_sent"]
        assert "avg_recv" in names and "avg_wait_time" in names
        assert cur.description[1].type_code == 1700  # numeric
        cur = conn.execute("SHOW STATS_TOTALS")
        assert [c.name for c in cur.description][1:6] == [
            "server_assignment_count", "xact_count", "query_count", "bytes_received",
            "bytes_sent"]
        cur = conn.execute("SHOW DATABASES")
        assert [c.name for c in cur.description][:6] == [
            "name", "host", "port", "database", "force_user", "pool_size"]
        cur = conn.execute("SHOW CONFIG")
        assert [c.name for c in cur.description] == ["key", "value", "default", "changeable"]
        keys = {r["key"]: r for r in cur.fetchall()}
        assert keys["query_wait_timeout"]["value"] == "60s"
        assert keys["admin_password"]["value"] == "********"
        assert keys["port"]["changeable"] == "no"
        cur = conn.execute("SHOW LISTS")
        lists = {r["list"]: r["items"] for r in cur.fetchall()}
        assert lists["databases"] == 1 and lists["users"] == 1


def test_stats_count_transactions_and_queries(pgdoorman, cfg):
    user, password, config = cfg
    d = pgdoorman(config)

    def stats():
        return [r for r in show(d, "STATS") if r["database"] == "db1"]

    with d.connect(user, "db1", password) as conn:
        for _ in range(10):
            conn.execute("SELECT 1")
        with conn.transaction():
            conn.execute("SELECT 1")
            conn.execute("SELECT 2")
    # queries of a client are added to the totals when it leaves, and read live before that
    row = wait_until(lambda: (lambda r: r[0] if r and r[0]["total_xact_count"] >= 11
                              else None)(stats()), message="11 transactions")
    assert row["total_xact_count"] == 11
    assert row["total_query_count"] >= 13  # 10 + BEGIN-carried SELECTs + COMMIT
    assert row["total_received"] > 0 and row["total_sent"] > 0
    assert row["total_xact_time"] > 0
    assert row["total_client_connect_count"] == 1
    assert row["total_server_assignment_count"] >= 11
    clients = [r for r in show(d, "CLIENTS") if r["user"] == user]
    assert clients == []


def test_non_admin_users_are_refused(pgdoorman, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(d.dsn(user, "pgdoorman", password))
    assert "not allowed to use the admin console" in str(e.value)
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(d.dsn("admin", "pgdoorman", "wrong"))
    assert "password authentication failed" in str(e.value)
    # and the failure is counted
    rows = {r["kind"]: r["count"] for r in show(d, "CONNECTIONS")}
    assert rows["auth_failures"] >= 2


def test_pause_waits_for_transactions_and_holds_clients_until_resume(pgdoorman, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    busy = hold_transaction(d, user, password)
    with admin(d) as console:
        pause = Background(console.execute, "PAUSE db1")
        time.sleep(0.5)
        assert not pause.done(), "PAUSE answered while a transaction was running"
        busy.commit()  # the transaction ends: PAUSE completes
        pause.result(10)
        # new work waits (it is not refused), even past query_wait_timeout granularity
        with d.connect(user, "db1", password) as other:
            q = Background(other.execute, "SELECT 42")
            time.sleep(1.0)
            assert not q.done()
            row = pool_row(d, "db1", user)
            assert row["paused"] == 1 and row["cl_waiting"] == 1
            assert [r["paused"] for r in show(d, "DATABASES") if r["name"] == "db1"] == [1]
            console.execute("RESUME db1")
            assert q.result(10).fetchone()[0] == 42
        with pytest.raises(psycopg.Error, match="not paused"):
            console.execute("RESUME db1")
        with pytest.raises(psycopg.Error, match="no such database"):
            console.execute("PAUSE nosuchdb")
        # a plain PAUSE / RESUME (all databases)
        console.execute("PAUSE")
        assert [r["value"] for r in console.execute("SHOW STATE").fetchall()
                if r["key"] == "paused"] == ["yes"]
        console.execute("RESUME")
        assert busy.execute("SELECT 7").fetchone()[0] == 7
    busy.close()


def test_reconnect_replaces_server_connections(pgdoorman, pg, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    with d.connect(user, "db1", password) as conn:
        before = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        with admin(d) as console:
            console.execute("RECONNECT db1")
        wait_until(lambda: before not in [b["pid"] for b in pg.backends(user)],
                   message="old backend closed")
        after = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert after != before


def test_kill_drops_the_database_clients(pgdoorman, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    conn = d.connect(user, "db1", password)
    conn.execute("SELECT 1")
    with admin(d) as console:
        console.execute("KILL db1")
        with pytest.raises(psycopg.Error):
            conn.execute("SELECT 1")
        assert pool_row(d, "db1", user)["paused"] == 1
        console.execute("RESUME db1")
    with d.connect(user, "db1", password) as again:
        assert again.execute("SELECT 3").fetchone()[0] == 3
    conn.close()


def test_set_log_level(pgdoorman, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    with admin(d) as console:
        console.execute("SET log_level = 'debug'")
        assert console.execute("SHOW LOG_LEVEL").fetchone()["log_level"] == "debug"
        console.execute("SET log_level TO info")
        assert console.execute("SHOW LOG_LEVEL").fetchone()["log_level"] == "info"
        with pytest.raises(psycopg.Error):
            console.execute("SET log_level = 'loud'")
        with pytest.raises(psycopg.Error, match="only log_level"):
            console.execute("SET pool_size = 10")


def test_shutdown_lets_transactions_finish_then_exits(pgdoorman, cfg):
    user, password, config = cfg
    d = pgdoorman(config)
    busy = hold_transaction(d, user, password)
    with admin(d) as console:
        console.execute("SHUTDOWN")
    time.sleep(0.5)
    assert d.proc.poll() is None, "exited with a transaction still running"
    assert busy.execute("SELECT 5").fetchone()[0] == 5  # the transaction goes on
    with pytest.raises(psycopg.OperationalError):
        d.connect(user, "db1", password)  # no new clients
    busy.commit()
    assert d.proc.wait(10) == 0
    busy.close()


def test_show_startup_parameters_sources_and_stale_after_reload(pgdoorman, pg, new_user):
    """
    PgDoorman's SHOW STARTUP_PARAMETERS: a row per resolved parameter of each pool, the pool's
    value winning over general's, and the values are what PostgreSQL sessions really get.
    A RELOAD that changes them replaces the pool: the draining one's rows turn stale.
    """
    import os

    import yaml
    user, password = new_user()
    config = simple_config(pg, user, password,
                           general={"startup_parameters": {"statement_timeout": "5s",
                                                           "work_mem": "8MB"}},
                           pool={"startup_parameters": {"work_mem": "64MB"}})
    d = pgdoorman(config)
    rows = [r for r in show(d, "STARTUP_PARAMETERS") if r["user"] == user]
    assert rows == [
        {"user": user, "database": "db1", "parameter": "statement_timeout", "value": "5s",
         "source": "general", "state": "applied"},
        {"user": user, "database": "db1", "parameter": "work_mem", "value": "64MB",
         "source": "pool", "state": "applied"},
    ]
    staying = d.connect(user, "db1", password, autocommit=False)
    assert staying.execute("SHOW work_mem").fetchone()[0] == "64MB"
    assert staying.execute("SHOW statement_timeout").fetchone()[0] == "5s"
    # In a transaction (holding its server) across a RELOAD that changes the pool's value.
    new = dict(config, pools={"db1": dict(config["pools"]["db1"],
                                          startup_parameters={"work_mem": "32MB"})})
    new["general"] = dict(config["general"], host="127.0.0.1", port=d.port)
    with open(d.config_path + ".tmp", "w") as f:
        yaml.safe_dump(new, f, sort_keys=False)
    os.replace(d.config_path + ".tmp", d.config_path)
    with admin(d) as conn:
        conn.execute("RELOAD")
        rows = [r for r in conn.execute("SHOW STARTUP_PARAMETERS").fetchall()
                if r["user"] == user]
    assert sorted((r["parameter"], r["value"], r["source"], r["state"]) for r in rows) == [
        ("statement_timeout", "5s", "general", "applied"),
        ("statement_timeout", "5s", "general", "stale"),
        ("work_mem", "32MB", "pool", "applied"),
        ("work_mem", "64MB", "pool", "stale"),
    ]
    with d.connect(user, "db1", password) as fresh:
        assert fresh.execute("SHOW work_mem").fetchone()[0] == "32MB"
    assert staying.execute("SHOW work_mem").fetchone()[0] == "64MB"
    staying.close()
    wait_until(lambda: all(r["state"] == "applied" for r in show(d, "STARTUP_PARAMETERS")),
               message="the drained pool's rows go with it")


def _stamp(text):
    import calendar
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S UTC"))


def test_show_clients_request_time_is_the_last_request(pgdoorman, pg, cfg):
    """
    PgBouncer's request_time, "when last request was done": it moves with each query (in a
    transaction or out of one) and stays put while the client is idle; connect_time does not.
    """
    user, password, config = cfg
    d = pgdoorman(config)
    with d.connect(user, "db1", password) as conn:
        conn.execute("SELECT 1")
        row = [r for r in show(d, "CLIENTS") if r["user"] == user][0]
        connected = _stamp(row["connect_time"])
        assert abs(_stamp(row["request_time"]) - time.time()) <= 2
        time.sleep(2.2)
        before = time.time()
        conn.execute("SELECT 2")
        row = [r for r in show(d, "CLIENTS") if r["user"] == user][0]
        assert _stamp(row["connect_time"]) == connected
        requested = _stamp(row["request_time"])
        assert requested >= connected + 2 and abs(requested - before) <= 1, row
        time.sleep(2.2)  # idle: nothing moves
        row = [r for r in show(d, "CLIENTS") if r["user"] == user][0]
        assert _stamp(row["request_time"]) == requested
        # Inside a transaction (the server stays with the client) each query counts too.
        with conn.transaction():
            conn.execute("SELECT 3")
            time.sleep(2.2)
            before = time.time()
            conn.execute("SELECT 4")
            row = [r for r in show(d, "CLIENTS") if r["user"] == user][0]
            assert row["state"] == "active"
            assert abs(_stamp(row["request_time"]) - before) <= 1, row
            assert _stamp(row["request_time"]) >= requested + 4
