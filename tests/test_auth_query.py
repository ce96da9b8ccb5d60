"""
auth_query (issue 15, PgDoorman parity): users a pool does not list are looked up in
PostgreSQL with the pool's query, over connections of their own as auth_query.user.

The lookups are counted where PostgreSQL itself writes them down: the lookup role has
log_statement = 'all', so each query it runs is a line of the cluster's log with the user
name as its parameter.  SHOW AUTH_QUERY's counters are checked against the same events.
"""

import os
import re
import time

import psycopg
import pytest
from psycopg.rows import dict_row

from conftest import (Background, RawClient, ServerError, _make_cluster, free_port,
                      make_config, pool_entry, run_check, user_entry, wait_until, write_config)
from test_metrics import scrape, value
from test_upgrade import upgrades as upgrades_fixture

upgrades = upgrades_fixture  # the fixture, shared with the upgrade tests

SASL, MD5 = 10, 5
LOOKUP = "SELECT usename, passwd FROM doorman_lookup($1)"


@pytest.fixture(scope="module")
def aq_pg():
    """A cluster with a lookup role that may read secrets only through a function."""
    pg = _make_cluster()
    pg.create_user("lookup", "lookup-pw")
    pg.psql("ALTER ROLE lookup SET log_statement = 'all'")
    pg.psql("""
        CREATE FUNCTION doorman_lookup(uname text) RETURNS TABLE(usename name, passwd text)
        LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
        AS $$ SELECT usename, passwd FROM pg_shadow WHERE usename = uname $$;
        REVOKE ALL ON FUNCTION doorman_lookup(text) FROM public;
        GRANT EXECUTE ON FUNCTION doorman_lookup(text) TO lookup;
        """, db="db1")
    yield pg
    pg.destroy()


def lookups(pg, user):
    """How many times PostgreSQL's log shows the lookup query run for C{user}."""
    with open(os.path.join(pg.base_dir, "postgres.log"), errors="replace") as f:
        text = f.read()
    return len(re.findall(r"parameters: \$1 = '%s'" % re.escape(user), text))


def aq_config(pg, users=(), **auth_query):
    aq = {"query": LOOKUP, "user": "lookup", "password": "lookup-pw",
          "cache_ttl": "1h", "cache_failure_ttl": "30s"}
    aq.update(auth_query)
    pool = pool_entry(pg, list(users), auth_query=aq)
    return make_config({"db1": pool}, connect_timeout="3s", query_wait_timeout="5s")


def show(d, what):
    with psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True,
                         row_factory=dict_row) as conn:
        return conn.execute("SHOW %s" % what).fetchall()


def auth_query_row(d):
    rows = show(d, "AUTH_QUERY")
    assert [r["database"] for r in rows] == ["db1"], rows
    return rows[0]


def test_md5_and_scram_users_are_found_by_the_query(aq_pg, pgdoorman):
    md5_user, md5_pw = aq_pg.new_user("md5", prefix="aq")
    scram_user, scram_pw = aq_pg.new_user("scram-sha-256", prefix="aq")
    d = pgdoorman(aq_config(aq_pg, min_interval="30s"))
    for user, pw, method in ((md5_user, md5_pw, MD5), (scram_user, scram_pw, SASL)):
        c = RawClient(d.port).startup(user, "db1", pw)
        try:
            # The stored secret picks the method, as for a configured password.
            assert c.auth_requests == [method]
            assert c.query("SELECT current_user") == [(user,)]
        finally:
            c.terminate()
        with d.connect(user, "db1", pw) as conn:
            assert conn.execute("SELECT session_user").fetchone() == (user,)
        assert lookups(aq_pg, user) == 1
        # A wrong password re-fetches the secret once (PostgreSQL may have a new one), then
        # not again within min_interval.
        for _ in range(2):
            with pytest.raises(psycopg.OperationalError) as e:
                psycopg.connect(d.dsn(user, "db1", "wrong"))
            assert 'password authentication failed for user "%s"' % user in str(e.value)
        wait_until(lambda: lookups(aq_pg, user) == 2, message="one re-fetch")
    row = auth_query_row(d)
    assert (row["cache_refetches"], row["rate_limited"]) == (2, 2), row
    assert (row["auth_success"], row["auth_failure"]) == (4, 4), row
    assert lookups(aq_pg, md5_user) == 2 and lookups(aq_pg, scram_user) == 2


def test_unknown_user_is_refused_and_the_refusal_is_cached(aq_pg, pgdoorman):
    d = pgdoorman(aq_config(aq_pg, cache_failure_ttl="4s"))
    for _ in range(5):
        c = RawClient(d.port)
        with pytest.raises(ServerError) as e:
            c.startup("aq_nobody", "db1", "whatever")
        assert e.value.sqlstate == "28P01"
        assert e.value.fields.get("S") == "FATAL"
        assert e.value.message == 'password authentication failed for user "aq_nobody"'
        assert c.closed_within(5)
    assert lookups(aq_pg, "aq_nobody") == 1
    row = auth_query_row(d)
    assert (row["executor_queries"], row["cache_misses"], row["cache_hits"]) == (1, 1, 4), row
    assert row["auth_failure"] == 5 and row["auth_success"] == 0, row
    time.sleep(4.2)  # cache_failure_ttl
    with pytest.raises(ServerError):
        RawClient(d.port).startup("aq_nobody", "db1", "whatever")
    assert lookups(aq_pg, "aq_nobody") == 2
    assert auth_query_row(d)["executor_queries"] == 2


def test_found_secret_is_cached_and_a_new_password_counts_after_cache_ttl(aq_pg, pgdoorman):
    user, old = aq_pg.new_user("md5", prefix="aq")
    ttl = 8.0
    d = pgdoorman(aq_config(aq_pg, cache_ttl="%gs" % ttl))
    before = time.monotonic()  # the lookup comes after this
    for i in range(3):
        with d.connect(user, "db1", old) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (user,)
        if i == 0:
            after = time.monotonic()  # and before this
    assert lookups(aq_pg, user) == 1
    row = auth_query_row(d)
    assert (row["cache_hits"], row["cache_misses"], row["auth_success"]) == (2, 1, 3), row
    aq_pg.psql("SET password_encryption = 'md5'; ALTER ROLE \"%s\" PASSWORD 'new-pw'" % user)
    # Within cache_ttl the secret pgdoorman fetched still stands.
    with d.connect(user, "db1", old) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert time.monotonic() - before < ttl, "too slow to observe the cache"
    assert lookups(aq_pg, user) == 1
    time.sleep(max(0.0, ttl + 0.3 - (time.monotonic() - after)))
    with d.connect(user, "db1", "new-pw") as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)
    assert lookups(aq_pg, user) == 2
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(d.dsn(user, "db1", old))
    assert "password authentication failed" in str(e.value)


def test_passthrough_pools_log_in_as_each_user(aq_pg, pgdoorman):
    a, a_pw = aq_pg.new_user("md5", prefix="aq")
    b, b_pw = aq_pg.new_user("scram-sha-256", prefix="aq")
    d = pgdoorman(aq_config(aq_pg, pool_size=3))
    with d.connect(a, "db1", a_pw) as ca, d.connect(b, "db1", b_pw) as cb:
        ca.execute("SELECT 1")
        cb.execute("SELECT 1")
        pools = {(r["database"], r["user"]): r for r in show(d, "POOLS")}
        assert ("db1", a) in pools and ("db1", b) in pools, pools
        assert pools[("db1", a)]["pool_size"] == 3
        assert aq_pg.count_backends(a, "db1") == 1
        assert aq_pg.count_backends(b, "db1") == 1
    assert auth_query_row(d)["dynamic_pools"] == 2


def test_dedicated_mode_shares_one_pool_as_server_user(aq_pg, pgdoorman):
    a, a_pw = aq_pg.new_user("md5", prefix="aq")
    b, b_pw = aq_pg.new_user("scram-sha-256", prefix="aq")
    server_user, server_pw = aq_pg.new_user("scram-sha-256", prefix="aqsrv")
    d = pgdoorman(aq_config(aq_pg, server_user=server_user, server_password=server_pw,
                            pool_size=1))
    for user, pw in ((a, a_pw), (b, b_pw)):
        with d.connect(user, "db1", pw) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (server_user,)
    users = [r["user"] for r in show(d, "POOLS") if r["database"] == "db1"]
    assert users == [server_user], users
    assert aq_pg.count_backends(a) == 0 and aq_pg.count_backends(b) == 0
    assert aq_pg.count_backends(server_user, "db1") == 1


def test_listed_users_do_not_go_through_the_query(aq_pg, pgdoorman):
    cfg = aq_config(aq_pg, users=[user_entry("u_scram", "scram-secret")])
    d = pgdoorman(cfg)
    with d.connect("u_scram", "db1", "scram-secret") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("u_scram",)
    assert lookups(aq_pg, "u_scram") == 0
    assert auth_query_row(d)["executor_queries"] == 0


@pytest.mark.parametrize("broken", ["query", "password"])
def test_failed_lookup_is_a_clear_error_and_logged(aq_pg, pgdoorman, broken):
    user, pw = aq_pg.new_user("md5", prefix="aq")
    kw = ({"query": "SELECT passwd FROM no_such_table WHERE usename = $1"}
          if broken == "query" else {"password": "not-the-password"})
    d = pgdoorman(aq_config(aq_pg, **kw))
    c = RawClient(d.port)
    t0 = time.monotonic()
    with pytest.raises(ServerError) as e:
        c.startup(user, "db1", pw)
    assert time.monotonic() - t0 < 10
    assert e.value.sqlstate == "08006"
    assert 'could not look up user "%s"' % user in e.value.message
    assert "no_such_table" not in e.value.message  # the details are for the operator
    why = "no_such_table" if broken == "query" else "password authentication failed"
    wait_until(lambda: why in d.log(), message="the log says why")
    assert "auth_query" in d.log()
    assert auth_query_row(d)["executor_errors"] >= 1
    # A static user of another pool is not affected.
    assert d.alive()


def test_check_no_longer_calls_auth_query_unimplemented(aq_pg, tmp_path):
    status, out = run_check(write_config(tmp_path, aq_config(aq_pg)))
    assert status == 0, out
    assert "not implemented" not in out, out


@pytest.mark.timeout(120)
def test_looked_up_clients_move_with_a_zero_downtime_upgrade(aq_pg, pgdoorman, upgrades):
    md5_user, md5_pw = aq_pg.new_user("md5", prefix="aq")
    scram_user, scram_pw = aq_pg.new_user("scram-sha-256", prefix="aq")
    cfg = aq_config(aq_pg)
    cfg["general"]["shutdown_timeout"] = "20s"
    d = upgrades.follow(pgdoorman(cfg))
    with d.connect(md5_user, "db1", md5_pw) as a, d.connect(scram_user, "db1", scram_pw) as b:
        assert a.execute("SELECT 1").fetchone() == (1,)
        assert b.execute("SELECT 1").fetchone() == (1,)
        pids = {a.info.backend_pid, b.info.backend_pid}
        upgrades.signal(d)
        upgrades.wait_old_gone(d)
        assert {a.info.backend_pid, b.info.backend_pid} == pids  # the same client sessions
        # The new process opens new server connections, as each user, for them.
        assert a.execute("SELECT current_user").fetchone() == (md5_user,)
        assert b.execute("SELECT current_user").fetchone() == (scram_user,)
    assert "2 clients handed over" in d.log()


def test_concurrent_logins_share_one_lookup_and_workers_cap_connections(aq_pg, pgdoorman):
    same, same_pw = aq_pg.new_user("scram-sha-256", prefix="aq")
    others = [aq_pg.new_user("md5", prefix="aq") for _ in range(5)]
    d = pgdoorman(aq_config(aq_pg, workers=2, pool_size=8))

    def login(user, pw):
        with d.connect(user, "db1", pw) as conn:
            return conn.execute("SELECT current_user").fetchone()[0]

    logins = [Background(login, same, same_pw) for _ in range(8)]
    logins += [Background(login, user, pw) for user, pw in others]
    assert sorted(b.result(30) for b in logins) == sorted([same] * 8 + [u for u, _ in others])
    assert lookups(aq_pg, same) == 1  # one query answered the eight logins
    assert all(lookups(aq_pg, user) == 1 for user, _ in others)
    assert auth_query_row(d)["executor_queries"] == 6
    # At most `workers` lookup connections, kept open for the next lookups.
    assert 1 <= aq_pg.count_backends("lookup", "db1") <= 2


def test_pools_of_users_gone_idle_are_forgotten(aq_pg, pgdoorman):
    a, a_pw = aq_pg.new_user("md5", prefix="aq")
    b, b_pw = aq_pg.new_user("md5", prefix="aq")
    cfg = aq_config(aq_pg)
    cfg["general"]["idle_timeout"] = "1s"
    port = free_port()
    cfg["prometheus"] = {"enabled": True, "host": "127.0.0.1", "port": port}
    d = pgdoorman(cfg)
    with d.connect(a, "db1", a_pw) as conn:
        conn.execute("SELECT 1")
    assert [r["user"] for r in show(d, "POOLS")] == [a]
    wait_until(lambda: aq_pg.count_backends(a, "db1") == 0, timeout=10,
               message="idle_timeout closing the server")
    with d.connect(b, "db1", b_pw) as conn:
        conn.execute("SELECT 1")
        assert [r["user"] for r in show(d, "POOLS")] == [b]
    # and the first user comes back to a pool of its own again
    with d.connect(a, "db1", a_pw) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (a,)
    # PgDoorman's metric families tell the same story.
    _, text = scrape(port)
    dyn = "pg_doorman_auth_query_dynamic_pools"
    assert value(text, dyn, type="created", database="db1") == 3
    assert value(text, dyn, type="destroyed", database="db1") >= 1
    assert value(text, dyn, type="current", database="db1") <= 2
    assert value(text, "pg_doorman_auth_query_auth", result="success", database="db1") == 3
    assert value(text, "pg_doorman_auth_query_executor", type="queries", database="db1") == 2
    assert value(text, "pg_doorman_auth_query_cache", type="hits", database="db1") == 1


def test_reload_empties_the_cache_and_keeps_connected_clients(aq_pg, pgdoorman):
    user, pw = aq_pg.new_user("scram-sha-256", prefix="aq")
    d = pgdoorman(aq_config(aq_pg))
    with d.connect(user, "db1", pw) as conn:
        conn.execute("SELECT 1")
        with psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True) as adm:
            adm.execute("RELOAD")
        assert conn.execute("SELECT current_user").fetchone() == (user,)
        with d.connect(user, "db1", pw) as again:
            assert again.execute("SELECT current_user").fetchone() == (user,)
    assert lookups(aq_pg, user) == 2
    assert auth_query_row(d)["cache_entries"] == 1


def _rewrite(d, config):
    import yaml
    config = dict(config, general=dict(config["general"], host="127.0.0.1", port=d.port))
    with open(d.config_path + ".tmp", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    os.replace(d.config_path + ".tmp", d.config_path)


def _reload(d):
    with psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True) as adm:
        adm.execute("RELOAD")


def _pools_of(d, user):
    return [r for r in show(d, "POOLS") if r["database"] == "db1" and r["user"] == user]


def test_reload_keeps_looked_up_users_pools(aq_pg, pgdoorman):
    """
    As PgDoorman: a RELOAD keeps a looked-up user's pool (its servers and its clients) when
    its settings did not change, and applies a new pool_size in place; only a change of what
    a server connection is (here application_name) replaces it.
    """
    user, pw = aq_pg.new_user("scram-sha-256", prefix="aq")
    cfg = aq_config(aq_pg, pool_size=2)
    d = pgdoorman(cfg)
    conn = d.connect(user, "db1", pw, autocommit=False)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # in a transaction
    _reload(d)
    rows = _pools_of(d, user)
    assert len(rows) == 1 and rows[0]["draining"] == 0 and rows[0]["sv_active"] == 1, rows
    assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
    conn.commit()
    with d.connect(user, "db1", pw) as again:  # a new login: the same pool, the same server
        assert again.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
    assert aq_pg.count_backends(user, "db1") == 1
    # A new auth_query.pool_size applies in place.
    cfg["pools"]["db1"]["auth_query"]["pool_size"] = 3
    _rewrite(d, cfg)
    _reload(d)
    rows = _pools_of(d, user)
    assert len(rows) == 1 and rows[0]["pool_size"] == 3 and rows[0]["draining"] == 0, rows
    assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
    conn.commit()
    # A new application_name is another kind of server connection: the pool is replaced,
    # the connected client carries on in the old one until it leaves.
    conn.execute("SELECT 1")
    cfg["pools"]["db1"]["application_name"] = "after-reload"
    _rewrite(d, cfg)
    _reload(d)
    assert [r["draining"] for r in _pools_of(d, user)] == [1]
    assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
    conn.commit()
    with d.connect(user, "db1", pw) as fresh:  # the next login makes the new pool
        assert fresh.execute("SHOW application_name").fetchone()[0] == "after-reload"
        assert fresh.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
    assert sorted(r["draining"] for r in _pools_of(d, user)) == [0, 1]
    conn.close()
    wait_until(lambda: [r["draining"] for r in _pools_of(d, user)] == [0],
               message="the replaced pool drains")


def test_reload_keeps_the_dedicated_pool_and_drains_when_auth_query_goes(aq_pg, pgdoorman):
    a, a_pw = aq_pg.new_user("md5", prefix="aq")
    server_user, server_pw = aq_pg.new_user("scram-sha-256", prefix="aqsrv")
    cfg = aq_config(aq_pg, server_user=server_user, server_password=server_pw, pool_size=1)
    d = pgdoorman(cfg)
    conn = d.connect(a, "db1", a_pw, autocommit=False)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    _reload(d)
    assert [r["draining"] for r in _pools_of(d, server_user)] == [0]
    assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
    conn.commit()
    # Without its auth_query the pool has no place in the config: it drains.
    del cfg["pools"]["db1"]["auth_query"]
    cfg["pools"]["db1"]["users"] = [user_entry("someone", "pw")]
    _rewrite(d, cfg)
    _reload(d)
    assert [r["draining"] for r in _pools_of(d, server_user)] == [1]
    assert conn.execute("SELECT 1").fetchone()[0] == 1
    conn.close()
    wait_until(lambda: not _pools_of(d, server_user), message="the pool drains")


def test_custom_table_with_one_password_column(aq_pg, pgdoorman):
    # Not pg_shadow: a table of the application's own, whose only column is "password"
    # and holds a plaintext password; the server login then uses it as is.
    user, pw = aq_pg.new_user("scram-sha-256", prefix="aq")
    aq_pg.psql("CREATE TABLE IF NOT EXISTS app_logins (name text PRIMARY KEY, secret text);"
               "GRANT SELECT ON app_logins TO lookup;"
               "INSERT INTO app_logins VALUES ('%s', '%s')" % (user, pw), db="db1")
    d = pgdoorman(aq_config(aq_pg, query="SELECT secret AS password FROM app_logins "
                                         "WHERE name = $1"))
    c = RawClient(d.port).startup(user, "db1", pw)
    try:
        assert c.auth_requests == [SASL]
        assert c.query("SELECT current_user") == [(user,)]
    finally:
        c.terminate()
    with pytest.raises(ServerError) as e:
        RawClient(d.port).startup(user, "db1", "wrong")
    assert e.value.sqlstate == "28P01"
