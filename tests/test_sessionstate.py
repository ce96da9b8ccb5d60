"""
Session state in transaction mode (issue 16): what a client SETs follows it to whatever server
connection it gets and never reaches another client; statements that create session state
(temporary tables, session advisory locks, LISTEN, cursors WITH HOLD, SET ROLE) pin the
client to its server until the state is gone, or are refused, or ignored, as
session_state_policy says.

Every pool is smaller than its number of clients and hands servers out round robin, so that
consecutive transactions of one client provably land on different server connections (the
tests check the backend pids).  Values are what PostgreSQL itself reports (SHOW).
"""

import asyncio

import psycopg
import psycopg.errors
import pytest

from conftest import free_port, simple_config, wait_until

POOL_SIZE = 2
CLIENTS = 5
OURS = "pg_catalog.current_setting(name) FROM pg_catalog.pg_settings"


def start(pgdoorman, pg, new_user, policy=None, pool_size=POOL_SIZE, metrics_port=None):
    user, password = new_user()
    general = {"server_round_robin": True, "query_wait_timeout": "10s"}
    if policy is not None:
        general["session_state_policy"] = policy
    # Every server open from the start, handed out oldest first: clients move between them.
    config = simple_config(pg, user, password, pool_size=pool_size, general=general,
                           min_pool_size=pool_size)
    if metrics_port is not None:
        config["prometheus"] = {"enabled": True, "host": "127.0.0.1", "port": metrics_port}
    d = pgdoorman(config)
    wait_until(lambda: pg.count_backends(user) == pool_size, message="min_pool_size open")
    return d, user, password


def clients(d, user, password, n=CLIENTS):
    return [d.connect(user, "db1", password) for _ in range(n)]


def show(conn, name):
    return conn.execute("SHOW %s" % name).fetchone()[0]


def backend(conn):
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def admin_clients(d, user):
    with psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True) as admin:
        cur = admin.execute("SHOW CLIENTS")
        names = [c.name for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()
                if dict(zip(names, row)).get("user") == user]


def pinned(d, user):
    return sorted(r["pinned"] for r in admin_clients(d, user) if r["pinned"])


def assert_pinned(d, user, expected):
    """
    SHOW CLIENTS shows C{expected} pinned: the pooler learns what a session holds from a
    query of its own after the client's reply, so the console may lag the client by that
    round trip (a loaded machine makes it longer).
    """
    wait_until(lambda: pinned(d, user) == sorted(expected), timeout=10,
               message="SHOW CLIENTS pinned == %r" % (expected,))


def test_statement_timeout_follows_its_client_and_never_leaks(pgdoorman, pg, new_user):
    d, user, password = start(pgdoorman, pg, new_user)
    conns = clients(d, user, password)
    try:
        default = show(conns[1], "statement_timeout")
        conns[0].execute("SET statement_timeout = '1s'")
        conns[2].execute("SET work_mem = '7MB'")
        pids = set()
        for _ in range(4):
            for i, c in enumerate(conns):
                pids.add(backend(conns[0]))
                assert show(c, "statement_timeout") == ("1s" if i == 0 else default)
                assert show(c, "work_mem") == ("7MB" if i == 2 else "4MB")
        assert len(pids) == POOL_SIZE  # client 0 moved between both servers
        # What the user sees: the timeout cancels client 0's slow query, nobody else's.
        with pytest.raises(psycopg.errors.QueryCanceled):
            conns[0].execute("SELECT pg_sleep(1.5)")
        conns[0].execute("SET statement_timeout = '200ms'")
        for c in conns[1:]:
            c.execute("SELECT pg_sleep(0.3)")
        with pytest.raises(psycopg.errors.QueryCanceled):
            conns[0].execute("SELECT pg_sleep(0.5)")
        conns[0].execute("RESET statement_timeout")
        conns[0].execute("SELECT pg_sleep(0.3)")
        assert [show(c, "statement_timeout") for c in conns] == [default] * CLIENTS
    finally:
        for c in conns:
            c.close()


def test_set_local_and_rolled_back_set_stay_in_their_transaction(pgdoorman, pg, new_user):
    d, user, password = start(pgdoorman, pg, new_user)
    conns = clients(d, user, password)
    a = conns[0]
    try:
        with a.transaction():
            a.execute("SET LOCAL statement_timeout = '5s'")
            assert show(a, "statement_timeout") == "5s"
        assert show(a, "statement_timeout") == "0"
        a.execute("BEGIN")
        a.execute("SET statement_timeout = '6s'")
        a.execute("SET lock_timeout = '3s'")
        assert show(a, "statement_timeout") == "6s"
        a.execute("ROLLBACK")
        assert show(a, "statement_timeout") == "0"
        # A SET in a transaction that fails is undone too.
        a.execute("BEGIN")
        a.execute("SET lock_timeout = '4s'")
        with pytest.raises(psycopg.errors.DivisionByZero):
            a.execute("SELECT 1 / 0")
        a.execute("COMMIT")  # of a failed transaction: a ROLLBACK
        # A SET in a transaction that commits stays.
        a.execute("BEGIN")
        a.execute("SET lock_timeout = '2s'")
        a.execute("COMMIT")
        for _ in range(3):
            for c in conns:
                assert show(c, "lock_timeout") == ("2s" if c is a else "0")
                assert show(c, "statement_timeout") == "0"
    finally:
        for c in conns:
            c.close()


def test_reset_all_and_set_config_and_custom_settings(pgdoorman, pg, new_user):
    d, user, password = start(pgdoorman, pg, new_user)
    conns = clients(d, user, password)
    a, b = conns[0], conns[1]
    try:
        # set_config() in the extended protocol (a parameter makes psycopg Parse/Bind).
        a.execute("SELECT set_config('app.tenant', %s, false)", ("42",))
        a.execute("SELECT set_config('statement_timeout', %s, false)", ("3s",))
        a.execute("SET search_path = pg_catalog, public")
        for _ in range(3):
            for c in conns:
                tenant = c.execute("SELECT current_setting('app.tenant', true)").fetchone()[0]
                # (a backend where it was RESET still knows the name: '')
                assert (tenant == "42") if c is a else (tenant in (None, "")), tenant
                assert show(c, "statement_timeout") == ("3s" if c is a else "0")
                assert show(c, "search_path") == ("pg_catalog, public" if c is a
                                                  else '"$user", public')
        a.execute("RESET ALL")
        for _ in range(3):
            for c in conns:
                assert show(c, "statement_timeout") == "0"
                assert show(c, "search_path") == '"$user", public'
                assert c.execute("SELECT current_setting('app.tenant', true)").fetchone()[0] \
                    in (None, "")
        assert b.execute("SELECT 1").fetchone() == (1,)
    finally:
        for c in conns:
            c.close()


def test_asyncpg_settings_follow_their_client(pgdoorman, pg, new_user):
    asyncpg = pytest.importorskip("asyncpg")
    d, user, password = start(pgdoorman, pg, new_user)

    async def run():
        conns = [await asyncpg.connect(host=d.host, port=d.port, user=user, password=password,
                                       database="db1") for _ in range(CLIENTS)]
        try:
            for i, c in enumerate(conns):
                await c.execute("SET statement_timeout = '%ds'" % (i + 1))
            for _ in range(3):
                for i, c in enumerate(conns):
                    # fetchval: a named prepared statement (Parse/Bind/Execute/Sync).
                    assert await c.fetchval("SHOW statement_timeout") == "%ds" % (i + 1)
            async with conns[0].transaction():
                await conns[0].execute("SET LOCAL statement_timeout = '9s'")
            assert await conns[0].fetchval("SHOW statement_timeout") == "1s"
        finally:
            for c in conns:
                await c.close()

    asyncio.run(run())


def test_settings_in_a_pipeline_follow(pgdoorman, pg, new_user):
    """psycopg's pipeline mode: SET as a Parse among others, one Sync at the end."""
    d, user, password = start(pgdoorman, pg, new_user)
    conns = clients(d, user, password, 3)
    a = conns[0]
    try:
        with a.pipeline():
            a.execute("SELECT 1")
            a.execute("SET idle_in_transaction_session_timeout = '11s'")
            cur = a.execute("SELECT pg_backend_pid()")
        assert cur.fetchone()[0] > 0
        for _ in range(3):
            for c in conns:
                assert show(c, "idle_in_transaction_session_timeout") == (
                    "11s" if c is a else "0")
    finally:
        for conn in conns:
            conn.close()


def test_temp_table_pins_its_creator_until_dropped(pgdoorman, pg, new_user):
    port = free_port()
    d, user, password = start(pgdoorman, pg, new_user, metrics_port=port)
    conns = clients(d, user, password, 3)
    a, b, c = conns
    try:
        a.execute("CREATE TEMP TABLE scratch (x int)")
        a.execute("INSERT INTO scratch VALUES (1), (2)")
        pid = backend(a)
        assert_pinned(d, user, ["temp_table"])
        # The other clients share the one server left, and never see a's table.
        for _ in range(3):
            assert backend(a) == pid
            assert a.execute("SELECT count(*) FROM scratch").fetchone()[0] == 2
            for other in (b, c):
                assert backend(other) != pid
                assert other.execute("SELECT to_regclass('pg_temp.scratch')").fetchone()[0] \
                    is None
        b.execute("CREATE TEMP TABLE scratch (y text)")  # no "already exists"
        assert_pinned(d, user, ["temp_table", "temp_table"])
        b.execute("DROP TABLE scratch")
        assert_pinned(d, user, ["temp_table"])
        from test_metrics import scrape, value
        text = scrape(port)[1]
        assert value(text, "pg_doorman_pools_pinned_clients", user=user,
                     reason="temp_table") == 1
        a.execute("DROP TABLE scratch")
        assert_pinned(d, user, [])
        assert value(scrape(port)[1], "pg_doorman_pools_pinned_clients", user=user,
                     reason="temp_table") == 0
        assert len({backend(a) for _ in range(4)}) == POOL_SIZE  # a moves again
    finally:
        for conn in conns:
            conn.close()


def test_session_advisory_lock_pins_until_unlocked(pgdoorman, pg, new_user):
    d, user, password = start(pgdoorman, pg, new_user)
    conns = clients(d, user, password, 3)
    a, b = conns[0], conns[1]
    try:
        assert a.execute("SELECT pg_advisory_lock(%s)", (16,)).fetchone() is not None
        pid = backend(a)
        assert_pinned(d, user, ["advisory_lock"])
        for _ in range(3):
            assert backend(a) == pid
            # Another client cannot take it: it is really held, by a's session.
            assert b.execute("SELECT pg_try_advisory_lock(%s)", (16,)).fetchone()[0] is False
        # A transaction-level lock pins nothing.
        with b.transaction():
            b.execute("SELECT pg_advisory_xact_lock(%s)", (17,))
        assert_pinned(d, user, ["advisory_lock"])
        assert a.execute("SELECT pg_advisory_unlock(%s)", (16,)).fetchone()[0] is True
        assert_pinned(d, user, [])
        assert b.execute("SELECT pg_try_advisory_lock(%s)", (16,)).fetchone()[0] is True
        b.execute("SELECT pg_advisory_unlock_all()")
        wait_until(lambda: pinned(d, user) == [], message="b unpinned")
    finally:
        for conn in conns:
            conn.close()


def test_simple_query_forms_are_seen(pgdoorman, pg, new_user):
    """What psql and drivers without parameters send: simple Queries, on the fast path."""
    d, user, password = start(pgdoorman, pg, new_user)
    conns = clients(d, user, password, 3)
    a, b = conns[0], conns[1]
    try:
        a.execute("SELECT pg_advisory_lock(21)")
        assert_pinned(d, user, ["advisory_lock"])
        assert b.execute("SELECT pg_try_advisory_lock(21)").fetchone()[0] is False
        a.execute("select pg_advisory_unlock(21)")
        assert_pinned(d, user, [])
        a.execute("SELECT set_config('lock_timeout', '8s', false)")
        a.execute("SELECT pg_catalog.set_config('app.who', 'a', false)")
        for _ in range(3):
            for c in conns:
                assert show(c, "lock_timeout") == ("8s" if c is a else "0")
                assert c.execute("SELECT current_setting('app.who', true)").fetchone()[0] \
                    in (("a",) if c is a else (None, ""))
        a.execute("CREATE TEMPORARY TABLE t1 (x int)")
        assert_pinned(d, user, ["temp_table"])
        a.execute("DROP TABLE t1")
        assert_pinned(d, user, [])
    finally:
        for conn in conns:
            conn.close()


def test_settings_after_the_first_statement_or_a_comment_are_seen(pgdoorman, pg, new_user):
    """
    A SET that is not the first statement of a simple Query, or comes after a comment, follows
    its client too, and a temp table created so pins it (psql -c, scripts, ORMs' comments).
    """
    d, user, password = start(pgdoorman, pg, new_user)
    conns = clients(d, user, password, 3)
    a = conns[0]
    try:
        a.execute("BEGIN; SET statement_timeout = '4s'; COMMIT")
        a.execute("/* app: billing */ SET lock_timeout = '6s'")
        a.execute("-- a comment line\nSET idle_in_transaction_session_timeout = '9s'")
        for _ in range(3):
            for c in conns:
                mine = c is a
                assert show(c, "statement_timeout") == ("4s" if mine else "0")
                assert show(c, "lock_timeout") == ("6s" if mine else "0")
                assert show(c, "idle_in_transaction_session_timeout") == ("9s" if mine else "0")
        a.execute("SELECT 1; CREATE TEMP TABLE t2 (x int)")
        assert_pinned(d, user, ["temp_table"])
        a.execute("DROP TABLE t2")
        assert_pinned(d, user, [])
    finally:
        for conn in conns:
            conn.close()


def test_role_and_cursor_with_hold_pin(pgdoorman, pg, new_user):
    d, user, password = start(pgdoorman, pg, new_user)
    conns = clients(d, user, password, 3)
    a = conns[0]
    try:
        a.execute("BEGIN")
        a.execute("DECLARE cur CURSOR WITH HOLD FOR SELECT generate_series(1, 3)")
        a.execute("COMMIT")
        assert_pinned(d, user, ["cursor_with_hold"])
        pid = backend(a)
        assert a.execute("FETCH 2 FROM cur").fetchall() == [(1,), (2,)]
        assert backend(a) == pid
        a.execute("CLOSE cur")
        assert_pinned(d, user, [])
    finally:
        for conn in conns:
            conn.close()


def test_client_leaving_pinned_leaves_nothing_behind(pgdoorman, pg, new_user):
    d, user, password = start(pgdoorman, pg, new_user, pool_size=1)
    a = d.connect(user, "db1", password)
    a.execute("CREATE TEMP TABLE leftover (x int)")
    a.execute("SET statement_timeout = '9s'")
    a.execute("SELECT pg_advisory_lock(%s)", (5,))
    a.close()
    b = d.connect(user, "db1", password)
    try:
        assert b.execute("SELECT to_regclass('pg_temp.leftover')").fetchone()[0] is None
        assert show(b, "statement_timeout") == "0"
        assert b.execute("SELECT pg_try_advisory_lock(%s)", (5,)).fetchone()[0] is True
    finally:
        b.close()


def test_refuse_policy_gives_an_error_and_the_connection_goes_on(pgdoorman, pg, new_user):
    d, user, password = start(pgdoorman, pg, new_user, policy="refuse")
    conns = clients(d, user, password, 3)
    a = conns[0]
    try:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as e:
            a.execute("CREATE TEMP TABLE t (x int)")
        assert "temporary table" in str(e.value) and "session_state_policy" in str(e.value)
        assert a.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            a.execute("SELECT pg_advisory_lock(%s)", (3,))
        assert a.execute("SELECT 2").fetchone() == (2,)
        # Inside a transaction: the error aborts it, as any error would.
        a.execute("BEGIN")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            a.execute("CREATE TEMPORARY TABLE t (x int)")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            a.execute("SELECT 3")
        a.execute("ROLLBACK")
        assert a.execute("SELECT to_regclass('pg_temp.t')").fetchone() == (None,)
        # A temporary table that ends with its transaction is no session state.
        with a.transaction():
            a.execute("CREATE TEMP TABLE t2 (x int) ON COMMIT DROP")
            a.execute("INSERT INTO t2 VALUES (1)")
        # Settings are no session state: they follow.
        a.execute("SET statement_timeout = '4s'")
        assert [show(c, "statement_timeout") for c in conns] == ["4s", "0", "0"]
        assert_pinned(d, user, [])
    finally:
        for conn in conns:
            conn.close()


def test_ignore_policy_is_pgbouncers(pgdoorman, pg, new_user):
    d, user, password = start(pgdoorman, pg, new_user, policy="ignore", pool_size=1)
    a = d.connect(user, "db1", password)
    b = d.connect(user, "db1", password)
    try:
        a.execute("CREATE TEMP TABLE shared_by_accident (x int)")
        assert_pinned(d, user, [])
        # One server, no pin: b gets it and sees a's table.
        assert b.execute("SELECT to_regclass('pg_temp.shared_by_accident') IS NOT NULL"
                         ).fetchone()[0] is True
        a.execute("SET statement_timeout = '4s'")  # settings still follow
        assert show(b, "statement_timeout") == "0"
        assert show(a, "statement_timeout") == "4s"
    finally:
        a.close()
        b.close()


def test_pool_where_nobody_sets_runs_no_query_of_ours(pgdoorman, pg, new_user):
    d, user, password = start(pgdoorman, pg, new_user)
    conns = clients(d, user, password)

    def last_queries():
        with pg.connect_super() as su:
            return [r[0] for r in su.execute(
                "SELECT query FROM pg_stat_activity WHERE usename = %s", (user,))]

    try:
        for _ in range(3):
            for c in conns:
                c.execute("SELECT 1")
                c.execute("SELECT %s::int", (2,))
                with c.transaction():
                    c.execute("CREATE TABLE IF NOT EXISTS plain (x int)")
                    c.execute("INSERT INTO plain VALUES (1)")
                c.execute("WITH q AS (SELECT 1) SELECT * FROM q")
        queries = last_queries()
        assert queries
        assert not [q for q in queries if OURS in q]
        assert_pinned(d, user, [])
        # The check can fail: after a SET, our question is the server's last query.
        conns[0].execute("SET work_mem = '5MB'")
        wait_until(lambda: any(OURS in q for q in last_queries()),
                   message="the settings query ran")
    finally:
        for c in conns:
            c.close()


def test_set_role_pins_until_reset(pgdoorman, pg, new_user):
    d, user, password = start(pgdoorman, pg, new_user)
    role = user + "_reader"
    pg.psql('CREATE ROLE "%s" NOLOGIN; GRANT "%s" TO "%s"' % (role, role, user))
    conns = clients(d, user, password, 3)
    a = conns[0]
    try:
        a.execute('SET ROLE "%s"' % role)
        assert_pinned(d, user, ["role"])
        for _ in range(3):
            for c in conns:
                assert c.execute("SELECT current_user").fetchone()[0] == (
                    role if c is a else user)
        a.execute("RESET ROLE")
        assert_pinned(d, user, [])
        for _ in range(2):
            for c in conns:
                assert c.execute("SELECT current_user").fetchone()[0] == user
    finally:
        for conn in conns:
            conn.close()


def test_listen_in_a_transaction_pins_and_gets_its_notifications(pgdoorman, pg, new_user):
    d, user, password = start(pgdoorman, pg, new_user)
    conns = clients(d, user, password, 3)
    a, b = conns[0], conns[1]
    try:
        with a.transaction():
            a.execute("LISTEN news")
        assert_pinned(d, user, ["listen"])
        b.execute("NOTIFY news, 'hello'")
        a.execute("SELECT 1")
        assert [n.payload for n in a.notifies(timeout=5, stop_after=1)] == ["hello"]
        assert b.execute("SELECT count(*) FROM pg_listening_channels()").fetchone()[0] == 0
        a.execute("UNLISTEN news")
        assert_pinned(d, user, [])
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.timeout(120)
def test_settings_move_with_their_client_in_an_upgrade(pg, pgdoorman, new_user):
    from test_upgrade import Upgrades, config, tcp_port
    upgrades = Upgrades()
    try:
        user, pw = new_user()
        d = upgrades.follow(pgdoorman(config(pg, user, pw)))
        with d.connect(user, "db1", pw) as conn:
            conn.execute("SET statement_timeout = '7s'")
            conn.execute("SELECT set_config('app.region', 'eu', false)")
            port = tcp_port(conn)
            upgrades.signal(d)
            upgrades.wait_old_gone(d)
            assert tcp_port(conn) == port  # the same connection, now on the new process
            with d.connect(user, "db1", pw) as other:
                for _ in range(3):
                    assert show(conn, "statement_timeout") == "7s"
                    assert conn.execute("SELECT current_setting('app.region', true)"
                                        ).fetchone() == ("eu",)
                    assert show(other, "statement_timeout") == "0"
                    assert other.execute("SELECT current_setting('app.region', true)"
                                         ).fetchone()[0] in (None, "")
    finally:
        upgrades.stop_all()


# -- what the relay flags (no server needed) ----------------------------------------------------

@pytest.mark.parametrize("sql, settings, reasons", [
    ("SET statement_timeout = '1s'", True, ()),
    ("set search_path to a, b", True, ()),
    ("RESET ALL", True, ()),
    ("DISCARD ALL", True, ()),
    ("SELECT set_config('app.x', '1', false)", True, ()),
    ("SET LOCAL statement_timeout = '1s'", None, None),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None, None),
    ("CREATE TEMP TABLE t (x int)", False, ("temp_table",)),
    ("create temporary view v as select 1", False, ("temp_table",)),
    ("SELECT 1 INTO TEMP t", False, ("temp_table",)),
    ("CREATE TABLE pg_temp.t (x int)", False, ("temp_table",)),
    ("CREATE TEMP TABLE t (x int) ON COMMIT DROP", None, None),
    ("LISTEN ch", False, ("listen",)),
    ("BEGIN; LISTEN ch; COMMIT", False, ("listen",)),
    ("SELECT pg_advisory_lock(1)", False, ("advisory_lock",)),
    ("SELECT pg_try_advisory_lock_shared(1)", False, ("advisory_lock",)),
    ("SELECT pg_advisory_xact_lock(1)", None, None),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", False, ("cursor_with_hold",)),
    ("SET ROLE reader", True, ("role",)),
    ("SET SESSION AUTHORIZATION someone", True, ("role",)),
    ("SELECT to_regclass('pg_temp.t')", None, None),
    ("UPDATE t SET x = 1 OFFSET", None, None),
    ("SELECT temp, settings FROM weather", None, None),
])
def test_look_flags_what_may_change_the_session(sql, settings, reasons):
    from pgdoorman.sessionstate import look
    got = look(sql.encode())
    assert got == (None if settings is None else (settings, reasons))


def test_sync_resets_what_only_the_server_holds():
    from pgdoorman.params import sync_sql
    have = {"TimeZone": "UTC", "search_path": None, "work_mem": "8MB", "app.x": "1"}
    want = {"TimeZone": "UTC", "search_path": None, "statement_timeout": "2s"}
    assert sync_sql(want, have, True) == (
        "RESET work_mem;RESET app.x;"
        "SELECT pg_catalog.set_config('statement_timeout', '2s', false)")
    assert sync_sql(want, have) == \
        "SELECT pg_catalog.set_config('statement_timeout', '2s', false)"
