"""
PAM (python-pam against a PAM service file of the tests' own, pam_unix and a test system
user), JWT (RS256 tokens made here with PyJWT) and SCRAM ClientKey pass-through, through the
real process.
"""

import os
import subprocess
import time

import pytest

from conftest import RawClient, ServerError, make_config, pool_entry, psql, user_entry

PAM_USER = "pgdtest_pam"
PAM_PASSWORD = "Pam-Secret-81!"


def _run(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def pam_services():
    """Service files /etc/pam.d/pgdoorman-test-{unix,deny} and a system user; removed after."""
    if os.geteuid() != 0:
        pytest.skip("PAM tests create a system user and /etc/pam.d files: they need root")
    pytest.importorskip("pam")
    created_user = subprocess.run(["id", PAM_USER], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).returncode != 0
    if created_user:
        _run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", PAM_USER)
    subprocess.run(["chpasswd"], input=("%s:%s\n" % (PAM_USER, PAM_PASSWORD)).encode(),
                   check=True)
    tag = "pgdoorman-test-%d" % os.getpid()
    files = {"unix": "auth required pam_unix.so\naccount required pam_unix.so\n",
             "deny": "auth required pam_deny.so\naccount required pam_deny.so\n"}
    names = {}
    for kind, text in files.items():
        names[kind] = "%s-%s" % (tag, kind)
        with open("/etc/pam.d/" + names[kind], "w") as f:
            f.write(text)
    yield names
    for name in names.values():
        os.unlink("/etc/pam.d/" + name)
    if created_user:
        subprocess.run(["userdel", PAM_USER], check=False)


def pam_config(pg, name, password, service, general=None):
    # The pool user is the system user PAM knows; PostgreSQL is reached as a real role.
    return make_config({"db1": pool_entry(pg, [user_entry(
        PAM_USER, "placeholder-not-used", 2, auth_pam_service=service,
        server_username=name, server_password=password)])}, **(general or {}))


@pytest.mark.timeout(60)
def test_pam_accepts_the_system_password_and_rejects_others(pg, pgdoorman, pam_services):
    name, password = pg.new_user()
    d = pgdoorman(pam_config(pg, name, password, pam_services["unix"]))
    r = psql(d, PAM_USER, "db1", PAM_PASSWORD, "SELECT current_user")
    assert r.returncode == 0 and r.stdout.strip() == name, r.stderr
    c = RawClient(d.port).startup(PAM_USER, "db1", PAM_PASSWORD)
    assert c.auth_requests == [3]  # cleartext, as PostgreSQL's pam method
    c.terminate()
    with pytest.raises(ServerError) as info:
        RawClient(d.port, timeout=15).startup(PAM_USER, "db1", "Not-The-Pam-Secret")
    assert info.value.sqlstate == "28P01"
    # The config's placeholder password does not open the door either: PAM wins.
    with pytest.raises(ServerError):
        RawClient(d.port, timeout=15).startup(PAM_USER, "db1", "placeholder-not-used")
    # A PAM check in progress does not block other clients (it runs in a thread).
    assert psql(d, PAM_USER, "db1", PAM_PASSWORD, "SELECT 1").returncode == 0
    log = d.log()
    assert "PAM service" in log and "Not-The-Pam-Secret" not in log and PAM_PASSWORD not in log


def test_pam_deny_service_and_hba_pam_method(pg, pgdoorman, pam_services):
    name, password = pg.new_user()
    d = pgdoorman(pam_config(pg, name, password, pam_services["deny"]))
    with pytest.raises(ServerError) as info:
        RawClient(d.port).startup(PAM_USER, "db1", PAM_PASSWORD)
    assert info.value.sqlstate == "28P01"
    # pg_hba's pam method with pamservice= for a user without auth_pam_service.
    cfg = make_config({"db1": pool_entry(pg, [user_entry(
        PAM_USER, "placeholder", 2, server_username=name, server_password=password)])},
        pg_hba="host all all 127.0.0.1/32 pam pamservice=%s\n" % pam_services["unix"])
    d = pgdoorman(cfg)
    r = psql(d, PAM_USER, "db1", PAM_PASSWORD, "SELECT 1")
    assert r.returncode == 0, r.stderr
    r = psql(d, PAM_USER, "db1", "placeholder", "SELECT 1")
    assert r.returncode != 0 and "password authentication failed" in r.stderr


# -- JWT ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jwt_keys(tmp_path_factory):
    pytest.importorskip("jwt")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    d = tmp_path_factory.mktemp("jwt")
    keys = {}
    for name in ("good", "other"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        path = d / ("%s.pub.pem" % name)
        path.write_bytes(pub)
        keys[name] = (key, str(path), pub)
    return keys


def token(key, claims, algorithm="RS256"):
    import jwt
    return jwt.encode(claims, key, algorithm=algorithm)


def test_jwt_tokens(pg, pgdoorman, jwt_keys):
    import psycopg
    name, password = pg.new_user()
    priv, pub_path, pub_pem = jwt_keys["good"]
    cfg = make_config({"db1": pool_entry(pg, [user_entry(
        "billing-service", "jwt-pkey-fpath:" + pub_path, 2,
        server_username=name, server_password=password)])})
    d = pgdoorman(cfg)
    now = int(time.time())
    good = token(priv, {"preferred_username": "billing-service", "iat": now, "exp": now + 300})
    with d.connect("billing-service", "db1", good) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (name,)
    r = psql(d, "billing-service", "db1", good, "SELECT 1")
    assert r.returncode == 0, r.stderr
    bad = {
        "expired": token(priv, {"preferred_username": "billing-service", "exp": now - 10}),
        "not yet": token(priv, {"preferred_username": "billing-service", "exp": now + 300,
                                "nbf": now + 120}),
        "no exp": token(priv, {"preferred_username": "billing-service"}),
        "wrong subject": token(priv, {"preferred_username": "someone-else", "exp": now + 300}),
        "wrong key": token(jwt_keys["other"][0], {"preferred_username": "billing-service",
                                                  "exp": now + 300}),
        "malformed": "eyJhbGciOiJSUzI1NiJ9.not-a-token",
        "garbage": "x" * 5000,
    }
    import base64
    import hashlib
    import hmac
    import json

    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    # HS256 signed with the public key as the HMAC secret (algorithm confusion).
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"preferred_username": "billing-service", "exp": now + 300}).encode())
    sig = b64(hmac.new(pub_pem, ("%s.%s" % (head, body)).encode(), hashlib.sha256).digest())
    bad["hs256 confusion"] = "%s.%s.%s" % (head, body, sig)
    bad["alg none"] = "%s.%s." % (b64(b'{"alg":"none","typ":"JWT"}'), body)
    for why, tok in bad.items():
        with pytest.raises(psycopg.OperationalError) as info:
            d.connect("billing-service", "db1", tok)
        assert "password authentication failed" in str(info.value), why
    log = d.log()
    assert "JWT rejected: token expired" in log
    assert good not in log and bad["wrong key"] not in log
    assert d.alive()


def test_jwt_hba_method_needs_a_jwt_user(pg, pgdoorman, jwt_keys):
    name, password = pg.new_user()
    cfg = make_config({"db1": pool_entry(pg, [user_entry(name, password, 2,
                                                         server_username=name,
                                                         server_password=password)])},
                      pg_hba="host all all 127.0.0.1/32 jwt\n")
    d = pgdoorman(cfg)
    with pytest.raises(ServerError) as info:
        RawClient(d.port).startup(name, "db1", password)
    assert info.value.sqlstate == "28P01"


# -- SCRAM ClientKey pass-through ----------------------------------------------------------

def test_scram_client_key_pass_through(pg, pgdoorman):
    """
    Only PostgreSQL's SCRAM secret in the config, no server_password: pgdoorman logs in to
    PostgreSQL with the ClientKey recovered from the client's own SCRAM proof.
    """
    import psycopg
    name, password = pg.new_user("scram-sha-256")
    secret = pg.password_hash(name)
    assert secret.startswith("SCRAM-SHA-256$")
    cfg = make_config({"db1": pool_entry(pg, [user_entry(name, secret, 2)])})
    d = pgdoorman(cfg)
    with d.connect(name, "db1", password) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (name,)
    assert pg.count_backends(name, "db1") >= 1
    with pytest.raises(psycopg.OperationalError) as info:
        d.connect(name, "db1", "wrong-password")
    assert "password authentication failed" in str(info.value)
    # A second client of the same pool reuses the servers (and the key) without trouble.
    with d.connect(name, "db1", password) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)
