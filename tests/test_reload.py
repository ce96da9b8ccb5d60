"""
Reload (issue 4): SIGHUP and the admin console's RELOAD re-read the config file and change the
running pools without dropping a connected client; an invalid file changes nothing.
"""

import os
import signal
import time

import psycopg
import pytest
import yaml
from psycopg.rows import dict_row

from conftest import (Background, make_config, pool_entry, psql, simple_config, user_entry,
                      wait_until)


def admin(d):
    return psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True,
                           row_factory=dict_row)


def pools(d):
    with admin(d) as conn:
        return {(r["database"], r["user"]): r for r in conn.execute("SHOW POOLS").fetchall()}


def rewrite(d, config):
    """Write C{config} over the running process's file (keeping its port)."""
    config = dict(config)
    config["general"] = dict(config["general"], host="127.0.0.1", port=d.port)
    with open(d.config_path + ".tmp", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    os.replace(d.config_path + ".tmp", d.config_path)


def reload_with(d, how):
    if how == "sighup":
        d.proc.send_signal(signal.SIGHUP)
    else:
        with admin(d) as conn:
            conn.execute("RELOAD")


@pytest.mark.parametrize("how", ["sighup", "reload"])
def test_reload_grows_pool_size_without_dropping_clients(pgdoorman, pg, new_user, how):
    user, password = new_user()
    config = simple_config(pg, user, password, pool_size=2,
                           general={"query_wait_timeout": "60s"})
    d = pgdoorman(config)
    idle_client = d.connect(user, "db1", password)
    idle_client.execute("SELECT 1")
    in_tx = d.connect(user, "db1", password, autocommit=False)
    in_tx.execute("CREATE TEMP TABLE t (x int)")  # holds a server, inside a transaction
    holders = [in_tx, d.connect(user, "db1", password, autocommit=False)]
    holders[1].execute("SELECT 1")
    extra = [d.connect(user, "db1", password, autocommit=False) for _ in range(2)]
    waiting = [Background(c.execute, "SELECT 2") for c in extra]
    wait_until(lambda: pools(d)[("db1", user)]["cl_waiting"] == 2, message="2 waiting")

    config["pools"]["db1"]["users"][0]["pool_size"] = 4
    rewrite(d, config)
    reload_with(d, how)
    # the two waiting clients get the new servers without anybody committing
    for w in waiting:
        w.result(15)
    row = pools(d)[("db1", user)]
    assert row["pool_size"] == 4 and row["sv_active"] == 4 and row["cl_waiting"] == 0
    # nobody was dropped: the transaction with its temp table is still there
    in_tx.execute("INSERT INTO t VALUES (1)")
    assert in_tx.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    for c in holders + extra:
        c.commit()
    assert idle_client.execute("SELECT 3").fetchone()[0] == 3
    for c in holders + extra:
        c.close()
    idle_client.close()
    assert pg.count_backends(user) <= 4
    assert "reloaded" in d.log()


def test_reload_shrinks_pool_size(pgdoorman, pg, new_user):
    user, password = new_user()
    config = simple_config(pg, user, password, pool_size=4)
    d = pgdoorman(config)
    conns = [d.connect(user, "db1", password, autocommit=False) for _ in range(4)]
    for c in conns:
        c.execute("SELECT 1")
    assert pg.count_backends(user) == 4
    conns[0].commit()
    conns[1].commit()
    config["pools"]["db1"]["users"][0]["pool_size"] = 1
    rewrite(d, config)
    reload_with(d, "reload")
    # idle extras are closed at once, busy ones when their transaction ends
    wait_until(lambda: pg.count_backends(user) == 2, message="idle servers closed")
    assert conns[2].execute("SELECT 5").fetchone()[0] == 5
    conns[2].commit()
    conns[3].commit()
    wait_until(lambda: pg.count_backends(user) == 1, message="down to pool_size 1")
    for c in conns:
        assert c.execute("SELECT 6").fetchone()[0] == 6
        c.commit()
        c.close()


def test_invalid_config_keeps_running_config(pgdoorman, pg, new_user):
    user, password = new_user()
    config = simple_config(pg, user, password, pool_size=2)
    d = pgdoorman(config)
    with open(d.config_path, "a") as f:
        f.write("\n  this is: [not valid\n")
    with admin(d) as conn:
        with pytest.raises(psycopg.Error) as e:
            conn.execute("RELOAD")
        assert e.value.sqlstate == "F0000"
        assert "RELOAD failed" in str(e.value)
        assert conn.execute("SHOW VERSION").fetchone()  # the session goes on
    d.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert d.alive()
    with d.connect(user, "db1", password) as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
    assert "keeping the running configuration" in d.log()


@pytest.mark.parametrize("how", ["sighup", "reload"])
def test_invalid_key_is_named_and_nothing_changes(pgdoorman, pg, new_user, how):
    """
    A file that parses but has a wrong value is refused as a whole: the admin client (RELOAD)
    or the log (SIGHUP) gets the file, line and key, and pool_size stays what it was even
    though the same file also changed it.
    """
    user, password = new_user()
    config = simple_config(pg, user, password, pool_size=2)
    d = pgdoorman(config)
    bad = simple_config(pg, user, password, pool_size=5)
    bad["pools"]["db1"]["users"][0]["min_pool_size"] = "lots"
    rewrite(d, bad)
    with open(d.config_path) as f:
        line = [n for n, text in enumerate(f, 1) if "min_pool_size" in text][0]
    expected = ["pgdoorman.yaml:%d" % line, "pools.db1.users[0].min_pool_size"]
    if how == "reload":
        with admin(d) as conn:
            with pytest.raises(psycopg.Error) as e:
                conn.execute("RELOAD")
            assert e.value.sqlstate == "F0000"
            for part in expected:
                assert part in e.value.diag.message_primary
    else:
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "keeping the running configuration" in d.log(),
                   message="reload failure logged")
        failed = [ln for ln in d.log().splitlines() if "keeping the running" in ln][0]
        for part in expected:
            assert part in failed
    assert d.alive()
    with admin(d) as conn:
        row = [r for r in conn.execute("SHOW DATABASES").fetchall() if r["name"] == "db1"][0]
    assert row["pool_size"] == 2
    with d.connect(user, "db1", password) as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_reload_refuses_missing_tls_files(pgdoorman, pg, new_user, tmp_path):
    """What `pgdoorman -t` checks beyond parsing (TLS files) also stops a RELOAD."""
    user, password = new_user()
    config = simple_config(pg, user, password, pool_size=2)
    d = pgdoorman(config)
    bad = dict(config, general=dict(config["general"],
                                    tls_certificate=str(tmp_path / "missing.crt"),
                                    tls_private_key=str(tmp_path / "missing.key")))
    rewrite(d, bad)
    with admin(d) as conn:
        with pytest.raises(psycopg.Error) as e:
            conn.execute("RELOAD")
        message = e.value.diag.message_primary
        assert "general.tls_certificate" in message and "missing.crt" in message
    # The running configuration (no TLS) is still the one in use.
    with psycopg.connect(d.dsn(user, "db1", password, sslmode="disable")) as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_pools_added_and_removed_and_passwords_changed(pgdoorman, pg, new_user):
    u1, p1 = new_user()
    u2, p2 = new_user()
    config = make_config({"db1": pool_entry(pg, [user_entry(u1, p1, server_username=u1,
                                                            server_password=p1)])})
    d = pgdoorman(config)
    staying = d.connect(u1, "db1", p1, autocommit=False)
    staying.execute("SELECT 1")  # in a transaction when its pool is removed
    with pytest.raises(psycopg.OperationalError):
        d.connect(u2, "db2", p2)
    new = make_config({"db2": pool_entry(pg, [user_entry(u2, "new-password",
                                                         server_username=u2,
                                                         server_password=p2)])})
    rewrite(d, new)
    reload_with(d, "reload")
    # the new pool, with the new client password
    with d.connect(u2, "db2", "new-password") as c:
        assert c.execute("SELECT current_database()").fetchone()[0] == "db2"
    with pytest.raises(psycopg.OperationalError):
        d.connect(u2, "db2", p2)
    # the removed pool: no new clients, the connected one carries on until it leaves
    with pytest.raises(psycopg.OperationalError):
        d.connect(u1, "db1", p1)
    assert staying.execute("SELECT 2").fetchone()[0] == 2
    staying.commit()
    assert staying.execute("SELECT 3").fetchone()[0] == 3
    staying.commit()
    row = pools(d)[("db1", u1)]
    assert row["draining"] == 1
    staying.close()
    wait_until(lambda: ("db1", u1) not in pools(d), message="drained pool gone")
    wait_until(lambda: pg.count_backends(u1) == 0, message="drained pool's servers closed")


def test_psql_reload_command(pgdoorman, pg, new_user):
    user, password = new_user()
    d = pgdoorman(simple_config(pg, user, password))
    out = psql(d, "admin", "pgdoorman", "admin", "RELOAD;")
    assert out.returncode == 0, out.stderr
