"""
pg_hba rules (PgDoorman's pg_hba option, pg_hba.conf syntax) and the legacy hba list: the rule
parser and matcher on their own, then the real process with psql, psycopg and a raw client.
"""

import pytest

from conftest import (RawClient, ServerError, make_config, pool_entry, psql, user_entry)
from pgdoorman.auth import hba


# -- rules without sockets ------------------------------------------------------------------

def rules(text):
    return hba.Rules(hba.parse(text))


def test_first_matching_rule_wins():
    r = rules("host all bob 127.0.0.1/32 reject\n"
              "host all all 127.0.0.0/8 trust\n"
              "host all bob 127.0.0.1/32 trust\n")
    assert r.match(False, "127.0.0.1", "db", "bob").method == "reject"
    assert r.match(False, "127.0.0.1", "db", "alice").method == "trust"
    assert r.match(False, "10.0.0.1", "db", "alice") is None


def test_types_addresses_and_names():
    r = rules('# comment\n'
              'hostssl  db1,db2 "Quoted User" 10.0.0.0 255.0.0.0 scram-sha-256\n'
              'hostnossl all   all  ::1/128 md5   # trailing comment\n'
              'host     sameuser all 192.168.1.0/24 password\n'
              'host     all /^app_ 0.0.0.0/0 pam pamservice=mine\n'
              'local    all all trust\n')
    assert r.match(True, "10.1.2.3", "db2", "Quoted User").lineno == 2
    assert r.match(False, "10.1.2.3", "db2", "Quoted User") is None  # hostssl needs TLS
    assert r.match(False, "::1", "x", "y").method == "md5"
    assert r.match(True, "::1", "x", "y") is None  # hostnossl
    assert r.match(False, "::ffff:192.168.1.7", "ann", "ann").method == "password"
    assert r.match(False, "192.168.1.7", "other", "ann") is None
    rule = r.match(False, "8.8.8.8", "db", "app_x")
    assert rule.method == "pam" and rule.options == {"pamservice": "mine"}
    assert r.match(False, None, "db", "anyone").kind == "local"


@pytest.mark.parametrize("line", [
    "hosts all all 0.0.0.0/0 trust",
    "host all all 0.0.0.0/0",
    "host all all 300.0.0.1/32 trust",
    "host all all 0.0.0.0/0 magic",
    "local all trust",
])
def test_bad_lines_are_reported_with_their_number(line):
    with pytest.raises(hba.HbaError) as info:
        hba.parse("host all all 127.0.0.1/32 trust\n" + line)
    assert info.value.lineno == 2


def test_password_method_checks_every_secret_kind():
    from pgdoorman.auth import scram
    secret = str(scram.make_scram_secret("pw") if hasattr(scram, "make_scram_secret")
                 else scram.secret_from_password("pw"))
    assert hba.password_matches(secret, "u", "pw")[0]
    assert hba.password_matches(secret, "u", "pw")[1] is not None  # ClientKey for the server
    assert not hba.password_matches(secret, "u", "nope")[0]
    import hashlib
    md5 = "md5" + hashlib.md5(b"pwu").hexdigest()
    assert hba.password_matches(md5, "u", "pw")[0]
    assert not hba.password_matches(md5, "u", "pw2")[0]
    assert hba.password_matches("plain", "u", "plain")[0]
    assert not hba.password_matches("plain", "u", "plain ")[0]


def test_refusal_texts_are_postgresqls():
    assert hba.refusal(None, "10.0.0.1", "u", "d", False) == \
        'no pg_hba.conf entry for host "10.0.0.1", user "u", database "d", no encryption'
    rule = hba.parse("host all all 0.0.0.0/0 reject")[0]
    assert hba.refusal(rule, "10.0.0.1", "u", "d", True) == \
        'pg_hba.conf rejects connection for host "10.0.0.1", user "u", database "d", ' \
        'SSL encryption'


# -- the real process -----------------------------------------------------------------------

@pytest.fixture
def users(pg):
    return {k: pg.new_user() for k in ("blocked", "trusted", "scram", "pw", "md5")}


def config_with(pg, users, general):
    entries = []
    for role, (name, password) in users.items():
        configured = password
        if role == "pw":
            configured = pg.password_hash(name)  # a SCRAM secret: 'password' checks it
        if role == "md5":
            import hashlib
            configured = "md5" + hashlib.md5((password + name).encode()).hexdigest()
        entries.append(user_entry(name, configured, 2, server_username=name,
                                  server_password=password))
    return make_config({"db1": pool_entry(pg, entries), "db2": pool_entry(pg, list(entries))},
                       **general)


def refused(d, user, db, password):
    c = RawClient(d.port)
    try:
        with pytest.raises(ServerError) as info:
            c.startup(user, db, password)
        return info.value
    finally:
        c.close()


def test_pg_hba_inline_rules(pg, pgdoorman, users):
    u = {k: v[0] for k, v in users.items()}
    text = "\n".join([
        "host all %s 127.0.0.1/32 reject" % u["blocked"],
        "host all %s 127.0.0.1/32 trust" % u["trusted"],
        "hostssl all all 0.0.0.0/0 trust",            # never for a plaintext client
        "host db1 %s 127.0.0.1/32 password" % u["pw"],
        "host db1 %s 127.0.0.1/32 scram-sha-256" % u["md5"],  # md5 secret cannot do SCRAM
        "host db1 all 127.0.0.1/32 scram-sha-256",
        "host db2 %s 127.0.0.1/32 md5" % u["scram"],
    ])
    d = pgdoorman(config_with(pg, users, {"pg_hba": text}))
    err = refused(d, u["blocked"], "db1", users["blocked"][1])
    assert err.sqlstate == "28000"
    assert err.message == ('pg_hba.conf rejects connection for host "127.0.0.1", user "%s", '
                           'database "db1", no encryption' % u["blocked"])
    # trust: any password (none is asked for).
    c = RawClient(d.port).startup(u["trusted"], "db1", "not-the-password")
    assert c.auth_requests == [] and c.query("SELECT current_user") == [(u["trusted"],)]
    c.terminate()
    # password: a cleartext request, checked against the SCRAM secret.
    c = RawClient(d.port).startup(u["pw"], "db1", users["pw"][1])
    assert c.auth_requests == [3] and c.query("SELECT 1") == [("1",)]
    c.terminate()
    assert refused(d, u["pw"], "db1", "Wr0ng-Secret-XYZ").sqlstate == "28P01"
    # scram-sha-256 for a user whose secret is an md5 hash: refused, as PostgreSQL does.
    assert refused(d, u["md5"], "db1", users["md5"][1]).sqlstate == "28P01"
    r = psql(d, u["scram"], "db1", users["scram"][1], "SELECT 1")
    assert r.returncode == 0, r.stderr
    # md5 rule for a SCRAM secret: SCRAM, as PostgreSQL picks.
    c = RawClient(d.port).startup(u["scram"], "db2", users["scram"][1])
    assert c.auth_requests == [10]
    c.terminate()
    # No rule for this user in db2.
    err = refused(d, u["pw"], "db2", users["pw"][1])
    assert err.sqlstate == "28000"
    assert err.message == ('no pg_hba.conf entry for host "127.0.0.1", user "%s", '
                           'database "db2", no encryption' % u["pw"])
    # Failures are logged with peer and user, never with the password.
    log = d.log()
    assert "no matching pg_hba rule" in log and "127.0.0.1:" in log
    assert 'client 127.0.0.1' in log and u["pw"] in log
    assert "Wr0ng-Secret-XYZ" not in log and users["pw"][1] not in log


def test_pg_hba_from_file_and_reload(pg, pgdoorman, users, tmp_path):
    import signal
    from conftest import wait_until
    u = {k: v[0] for k, v in users.items()}
    path = tmp_path / "hba.conf"
    path.write_text("host all %s 127.0.0.1/32 reject\nhost all all 127.0.0.1/32 md5\n"
                    % u["scram"])
    d = pgdoorman(config_with(pg, users, {"pg_hba": {"path": str(path)}}))
    assert refused(d, u["scram"], "db1", users["scram"][1]).sqlstate == "28000"
    path.write_text("host all all 127.0.0.1/32 md5\n")
    d.proc.send_signal(signal.SIGHUP)

    def allowed():
        try:
            RawClient(d.port).startup(u["scram"], "db1", users["scram"][1]).terminate()
            return True
        except ServerError:
            return False
    wait_until(allowed, message="new pg_hba rules applied")


@pytest.mark.parametrize("networks, ok", [(["10.0.0.0/8"], False),
                                          (["10.0.0.0/8", "127.0.0.0/8"], True),
                                          (["::1/128"], False)])
def test_legacy_hba_list(pg, pgdoorman, users, networks, ok):
    d = pgdoorman(config_with(pg, users, {"hba": networks}))
    name, password = users["scram"]
    if ok:
        RawClient(d.port).startup(name, "db1", password).terminate()
    else:
        err = refused(d, name, "db1", password)
        assert err.sqlstate == "28000" and "no pg_hba.conf entry" in err.message


def test_admin_console_is_subject_to_pg_hba(pg, pgdoorman, users):
    d = pgdoorman(config_with(pg, users, {"pg_hba": "host pgdoorman all 0.0.0.0/0 reject\n"
                                                    "host all all 0.0.0.0/0 md5\n"}))
    assert refused(d, "admin", "pgdoorman", "admin").sqlstate == "28000"
