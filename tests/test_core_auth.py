"""
Authentication (issue 7, point 5): clients to pgdoorman with md5 or SCRAM-SHA-256 depending on
how the password is stored in the config; pgdoorman to PostgreSQL with md5, SCRAM-SHA-256 or
cleartext; server_username/server_password; wrong passwords give PostgreSQL's error.
"""

import time

import psycopg
import pytest

from conftest import (Background, RawClient, ServerError, make_config, md5_secret, pool_entry,
                      psql, simple_config, user_entry)

SASL, MD5 = 10, 5


def config_password(pg, user, kind):
    """The password as the config holds it: the md5 hash, the SCRAM secret, or plaintext."""
    if kind == "plain":
        return pg.passwords[user]
    if kind == "md5":
        return md5_secret(user, pg.passwords[user])
    if kind == "scram":
        secret = pg.password_hash(user)
        assert secret.startswith("SCRAM-SHA-256$")
        return secret
    raise ValueError(kind)


@pytest.mark.parametrize("kind, method", [("md5", MD5), ("scram", SASL), ("plain", SASL)])
def test_client_auth_method_follows_the_stored_password(pg, pgdoorman, kind, method):
    user = "u_md5" if kind == "md5" else "u_scram"
    pw = pg.passwords[user]
    d = pgdoorman(simple_config(pg, user, config_password(pg, user, kind)))
    c = RawClient(d.port).startup(user, "db1", pw)
    try:
        assert c.auth_requests == [method]
        if method == SASL:
            assert "SCRAM-SHA-256" in c.sasl_mechanisms
        assert c.query("SELECT current_user") == [(user,)]
    finally:
        c.terminate()
    # and a real client logs in too
    with d.connect(user, "db1", pw) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)
    out = psql(d, user, "db1", pw, "SELECT 'psql in'")
    assert out.returncode == 0 and out.stdout.strip() == "psql in", out.stderr


@pytest.mark.parametrize("kind", ["md5", "scram", "plain"])
def test_wrong_password(pg, pgdoorman, kind):
    user = "u_md5" if kind == "md5" else "u_scram"
    d = pgdoorman(simple_config(pg, user, config_password(pg, user, kind)))
    message = 'password authentication failed for user "%s"' % user
    with d.connect(user, "db1", pg.passwords[user]) as bystander:
        bystander.execute("BEGIN")
        c = RawClient(d.port)
        with pytest.raises(ServerError) as e:
            c.startup(user, "db1", "not the password")
        assert e.value.sqlstate == "28P01"
        assert e.value.fields.get("S") == "FATAL"
        assert e.value.message == message
        assert c.closed_within(5)
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(d.dsn(user, "db1", "still wrong"))
        assert message in str(e.value)
        out = psql(d, user, "db1", "wrong again", "SELECT 1")
        assert out.returncode == 2 and message in out.stderr, out.stderr
        # Nothing else was affected.
        assert bystander.execute("SELECT 'bystander'").fetchone() == ("bystander",)
        bystander.execute("COMMIT")
    with d.connect(user, "db1", pg.passwords[user]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_wrong_password_does_not_stall_others(pg, pgdoorman):
    user, pw = "u_scram", "scram-secret"
    d = pgdoorman(simple_config(pg, user, pw, pool_size=2))
    bad = [Background(lambda: RawClient(d.port).startup(user, "db1", "bad")) for _ in range(20)]
    t0 = time.monotonic()
    for _ in range(5):
        with d.connect(user, "db1", pw) as conn:
            conn.execute("SELECT 1")
    assert time.monotonic() - t0 < 10
    for b in bad:
        assert isinstance(b.error(15), ServerError)


@pytest.mark.parametrize("server_user", ["u_md5", "u_scram", "u_plain"],
                         ids=["md5", "scram", "cleartext"])
def test_server_auth_methods(pg, pgdoorman, server_user):
    # PostgreSQL asks pgdoorman for md5 (u_md5), SCRAM (u_scram) or a cleartext password
    # (u_plain; see pg_hba in conftest).
    cfg = make_config({"db1": pool_entry(pg, [user_entry(
        "front", "front-pw", 2, server_username=server_user,
        server_password=pg.passwords[server_user])])})
    d = pgdoorman(cfg)
    with d.connect("front", "db1", "front-pw") as conn:
        assert conn.execute("SELECT current_user, session_user").fetchone() == \
            (server_user, server_user)
    backends = pg.backends(server_user, "db1")
    assert len(backends) >= 1


def test_client_name_differs_from_server_name(pg, pgdoorman):
    cfg = make_config({"db1": pool_entry(pg, [
        user_entry("alice", md5_secret("alice", "alice-pw"), 1,
                   server_username="u_scram", server_password="scram-secret"),
        user_entry("bob", "bob-pw", 1,
                   server_username="u_scram", server_password="scram-secret")])})
    d = pgdoorman(cfg)
    with d.connect("alice", "db1", "alice-pw") as a, d.connect("bob", "db1", "bob-pw") as b:
        assert a.execute("SELECT current_user").fetchone() == ("u_scram",)
        assert b.execute("SELECT current_user").fetchone() == ("u_scram",)
    # alice's own password is not bob's
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(d.dsn("alice", "db1", "bob-pw"))
    assert 'password authentication failed for user "alice"' in str(e.value)


def test_md5_hash_only_user_logs_in_to_an_md5_server(pg, pgdoorman):
    # No server_username/server_password: the md5 hash is all pgdoorman knows, and it is
    # enough to answer PostgreSQL's md5 challenge for the same user.
    cfg = make_config({"db1": pool_entry(pg, [user_entry(
        "u_md5", config_password(pg, "u_md5", "md5"), 2)])})
    d = pgdoorman(cfg)
    with d.connect("u_md5", "db1", "md5-secret") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("u_md5",)


def test_plaintext_only_user_logs_in_to_postgres_with_it(pg, pgdoorman):
    cfg = make_config({"db1": pool_entry(pg, [user_entry("u_scram", "scram-secret", 2)])})
    d = pgdoorman(cfg)
    with d.connect("u_scram", "db1", "scram-secret") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("u_scram",)
    cfg = make_config({"db1": pool_entry(pg, [user_entry("u_plain", "plain-secret", 2)])})
    d = pgdoorman(cfg)
    with d.connect("u_plain", "db1", "plain-secret") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("u_plain",)


def test_scram_secret_without_server_password_says_what_is_missing(pg, pgdoorman):
    # The seed README's "#1 setup issue": a hash in `password` and no server credentials.
    # Either pgdoorman manages (as PgBouncer does with the client's SCRAM keys), or the
    # client gets an error - quickly, and naming server_password in what it or the log says.
    cfg = make_config({"db1": pool_entry(pg, [user_entry(
        "u_scram", config_password(pg, "u_scram", "scram"), 2)])})
    d = pgdoorman(cfg)
    t0 = time.monotonic()
    try:
        with d.connect("u_scram", "db1", "scram-secret") as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("u_scram",)
    except psycopg.Error as e:
        assert time.monotonic() - t0 < 10
        assert "server_password" in str(e) + d.log(), (str(e), d.log())


def test_wrong_server_password_is_an_error_not_a_hang(pg, pgdoorman):
    cfg = make_config({"db1": pool_entry(pg, [user_entry(
        "front", "front-pw", 2, server_username="u_scram", server_password="wrong")])},
        connect_timeout="3s", query_wait_timeout="3s")
    d = pgdoorman(cfg)
    t0 = time.monotonic()
    with pytest.raises(psycopg.Error) as e:
        with d.connect("front", "db1", "front-pw") as conn:
            conn.execute("SELECT 1")
    assert time.monotonic() - t0 < 10
    assert str(e.value).strip()
    assert d.alive()


def test_unknown_user_on_a_known_database(pg, pgdoorman):
    d = pgdoorman(simple_config(pg, "u_scram", "scram-secret"))
    c = RawClient(d.port)
    with pytest.raises(ServerError) as e:
        c.startup("nobody_here", "db1", "whatever")
    assert e.value.sqlstate in ("28P01", "28000"), e.value.fields
    assert e.value.fields.get("S") == "FATAL"
    assert c.closed_within(5)
    with d.connect("u_scram", "db1", "scram-secret") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
