"""
server_username without server_password (issue 15, PgDoorman 3.10 parity): the forced server
user logs in by trust, with the md5 hash the config holds, or with the ClientKey of the
client's own SCRAM login; when none of them works the client hears why, quickly.

PostgreSQL here has a trust rule for one role (u_trusted) besides the md5 and SCRAM users of
the shared cluster layout (conftest._make_cluster).
"""

import time

import psycopg
import pytest

from conftest import _make_cluster, make_config, md5_secret, pool_entry, run_check, \
    user_entry, write_config


@pytest.fixture(scope="module")
def hba_pg():
    cluster = _make_cluster(hba_extra=["host all u_trusted 127.0.0.1/32 trust"])
    cluster.create_user("u_trusted", "never-asked")
    cluster.psql("SELECT pg_reload_conf()")
    yield cluster
    cluster.destroy()


def forced(pg, password, server_user, **general):
    """Client user "front" with C{password} in the config, forced to C{server_user}."""
    return make_config({"db1": pool_entry(pg, [user_entry(
        "front", password, 2, server_username=server_user)])}, **general)


def test_config_with_server_username_alone_is_valid(hba_pg, tmp_path):
    path = write_config(tmp_path, forced(hba_pg, md5_secret("front", "front-pw"), "u_trusted"))
    status, out = run_check(path)
    assert status == 0, out
    assert "must be set together" not in out and "valid" in out, out


def test_forced_user_logs_in_by_trust(hba_pg, pgdoorman):
    d = pgdoorman(forced(hba_pg, md5_secret("front", "front-pw"), "u_trusted"))
    with d.connect("front", "db1", "front-pw") as conn:
        assert conn.execute("SELECT current_user, session_user").fetchone() == \
            ("u_trusted", "u_trusted")
    assert hba_pg.count_backends("u_trusted", "db1") >= 1


def test_forced_user_logs_in_with_the_md5_hash(hba_pg, pgdoorman):
    # pgdoorman trusts this client; PostgreSQL asks for md5 and the hash answers it.
    cfg = forced(hba_pg, hba_pg.password_hash("u_md5"), "u_md5",
                 pg_hba={"content": "host all front 127.0.0.1/32 trust\n"})
    assert cfg["pools"]["db1"]["users"][0]["password"].startswith("md5")
    d = pgdoorman(cfg)
    with d.connect("front", "db1", None) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("u_md5",)


def test_forced_user_logs_in_with_the_clients_scram_keys(hba_pg, pgdoorman):
    # The config holds u_scram's SCRAM secret; a client that proves it knows the password
    # gives pgdoorman the ClientKey, which logs in to PostgreSQL as u_scram.
    secret = hba_pg.password_hash("u_scram")
    assert secret.startswith("SCRAM-SHA-256$")
    d = pgdoorman(forced(hba_pg, secret, "u_scram"))
    with d.connect("front", "db1", "scram-secret") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("u_scram",)
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(d.dsn("front", "db1", "not-it"))
    assert 'password authentication failed for user "front"' in str(e.value)


def test_when_nothing_works_the_error_says_what_is_missing(hba_pg, pgdoorman):
    # An md5 hash for the client, a SCRAM server user: no hash, no ClientKey, no password.
    d = pgdoorman(forced(hba_pg, md5_secret("front", "front-pw"), "u_scram",
                         connect_timeout="3s", query_wait_timeout="3s"))
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as e:
        with d.connect("front", "db1", "front-pw") as conn:
            conn.execute("SELECT 1")
    assert time.monotonic() - t0 < 10
    text = str(e.value)
    assert 'cannot log in to PostgreSQL as "u_scram"' in text, text
    assert "server_password" in text + d.log()
    assert d.alive()
