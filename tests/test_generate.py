"""
pgdoorman generate (issue 8): a config from a live cluster that starts pgdoorman and lets each
user log in with its real password; the --reference config and the docs page from the option
table.
"""

import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, doorman_env, psql, run_check, USERS

from pgdoorman import config as _config
from pgdoorman.generate import reference_markdown, reference_yaml


def generate(args, env_extra=None, timeout=60):
    env = doorman_env()
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-m", "pgdoorman", "generate"] + list(args),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         timeout=timeout, text=True)
    return out.returncode, out.stdout, out.stderr


def for_test(text):
    """The generated text, listening on the test's free port on loopback."""
    return (text.replace('host: "0.0.0.0"', 'host: "127.0.0.1"')
            .replace("port: 6432", "port: @PORT@"))


@pytest.fixture(scope="module")
def extra_users(pg):
    """Fresh md5 and SCRAM users, a role without a password, a database without connections."""
    users = [pg.new_user("md5", prefix="gen"), pg.new_user("scram-sha-256", prefix="gen")]
    pg.psql("DROP ROLE IF EXISTS gen_nopass; CREATE ROLE gen_nopass LOGIN")
    pg.psql("DROP DATABASE IF EXISTS gen_closed")
    pg.create_database("gen_closed")
    pg.psql("ALTER DATABASE gen_closed ALLOW_CONNECTIONS false")
    return users


def test_generate_then_log_in_as_each_user(pg, pgdoorman, tmp_path, extra_users):
    out_file = str(tmp_path / "generated.yaml")
    status, _, err = generate(["--host", pg.host, "-p", str(pg.port), "-u", pg.superuser,
                               "--pool-size", "3", "--output", out_file])
    assert status == 0, err
    assert os.stat(out_file).st_mode & 0o077 == 0  # holds password hashes
    text = open(out_file).read()
    data = yaml.safe_load(text)
    assert {"db1", "db2", "postgres"} <= set(data["pools"]), data["pools"].keys()
    assert "template0" not in data["pools"] and "template1" not in data["pools"]
    assert "gen_closed" not in data["pools"]
    assert data["pools"]["db1"]["pool_mode"] == "transaction"
    users = {u["username"]: u for u in data["pools"]["db1"]["users"]}
    assert users["u_md5"]["password"] == pg.password_hash("u_md5")
    assert users["u_scram"]["password"].startswith("SCRAM-SHA-256$")
    assert all(u["pool_size"] == 3 for u in users.values())
    # Roles without a password are named in a comment, not in the pools.
    assert "gen_nopass" not in users and "postgres" not in users
    comment = [line for line in text.splitlines() if "no password" in line]
    assert comment and "gen_nopass" in text.split("pools:")[0], text[:2000]

    status, out = run_check(out_file)
    assert status == 0, out
    d = pgdoorman(for_test(text))
    logins = [("u_md5", USERS["u_md5"][0]), ("u_scram", USERS["u_scram"][0])] + extra_users
    for user, password in logins:
        for db in ("db1", "db2"):
            r = psql(d, user, db, password, "SELECT current_user || '@' || current_database()")
            assert r.returncode == 0, (user, db, r.stderr, d.log()[-2000:])
            assert r.stdout.strip() == "%s@%s" % (user, db)
        bad = psql(d, user, "db1", password + "x", "SELECT 1")
        assert bad.returncode != 0 and "password authentication failed" in bad.stderr


def test_generate_cleartext_server_user_is_told_what_to_add(pg, pgdoorman, tmp_path,
                                                            extra_users):
    # u_plain is stored as SCRAM but pg_hba asks it for a cleartext password: the hash alone
    # cannot answer that, and the generated file's header says to add server_password.
    status, text, err = generate(["--host", pg.host, "-p", str(pg.port), "-u", pg.superuser])
    assert status == 0, err
    assert "server_password" in text.split("general:")[0]
    d = pgdoorman(for_test(text))
    r = psql(d, "u_plain", "db1", USERS["u_plain"][0], "SELECT 1")
    assert r.returncode != 0
    assert "server_password" in r.stderr or "server_username" in r.stderr, r.stderr


def test_generate_toml_session_mode(pg, pgdoorman, tmp_path, extra_users):
    out_file = str(tmp_path / "generated.toml")
    status, _, err = generate(["--host", pg.host, "--port", str(pg.port), "--user",
                               pg.superuser, "-d", "db1", "-s", "--pool-size", "7",
                               "--no-comments", "--output", out_file])
    assert status == 0, err
    text = open(out_file).read()
    assert "#" not in text.replace("SCRAM-SHA-256$", "")
    cfg = _config.load(out_file)
    settings = cfg.pool_settings("db2", "u_scram")
    assert settings.pool_mode == "session" and settings.pool_size == 7
    d = pgdoorman(text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"')
                  .replace("port = 6432", "port = @PORT@"), name="generated.toml")
    r = psql(d, "u_scram", "db2", USERS["u_scram"][0], "SELECT 5")
    assert r.returncode == 0 and r.stdout.strip() == "5", r.stderr


def test_generate_password_from_environment_and_ssl_flag(pg, extra_users):
    # A superuser with a password, over TCP with scram (no trust): PGPASSWORD is used.
    pg.psql("DROP ROLE IF EXISTS gen_admin")
    pg.create_user("gen_admin", "gen-admin-pw", superuser=True)
    status, text, err = generate(["--host", pg.host, "-p", str(pg.port), "-u", "gen_admin"],
                                 env_extra={"PGPASSWORD": "gen-admin-pw"})
    assert status == 0, err
    status, text, err = generate(["--host", pg.host, "-p", str(pg.port), "-u", "gen_admin",
                                  "--password", "wrong"], env_extra={"PGPASSWORD": ""})
    assert status == 1 and "cannot connect" in err and "Traceback" not in err, err
    # The test cluster has no TLS: --ssl is refused by the server, and said so.
    status, _, err = generate(["--host", pg.host, "-p", str(pg.port), "-u", pg.superuser,
                               "--ssl"])
    assert status == 1 and "SSL" in err, err


def test_generate_needs_a_superuser(pg, extra_users):
    user, password = extra_users[1]
    status, _, err = generate(["--host", pg.host, "-p", str(pg.port), "-u", user,
                               "--password", password, "-d", "db1"])
    assert status == 1, err
    assert "superuser" in err and "pg_authid" in err and user in err, err


def test_generate_unreachable_server():
    from pgcluster import free_port
    status, _, err = generate(["--host", "127.0.0.1", "-p", str(free_port()), "-u", "x"])
    assert status == 1 and "cannot connect" in err and "Traceback" not in err, err


# -- the reference ---------------------------------------------------------------------------

def test_reference_lists_every_option_and_passes_check(tmp_path):
    status, text, err = generate(["--reference"])
    assert status == 0, err
    for opt in _config.OPTIONS:
        assert "%s:" % opt.name in text, opt.name
    filled = text.replace("CHANGE_ME_user", "app").replace("CHANGE_ME_password", "secret") \
        .replace("CHANGE_ME", "admin-secret")
    path = tmp_path / "reference.yaml"
    path.write_text(filled)
    status, out = run_check(str(path))
    assert status == 0, out
    assert "not implemented" not in out  # every unimplemented option is commented out
    cfg = _config.load(str(path))
    assert cfg.general.admin_password == "admin-secret"
    assert cfg.pools["mydb"].users[0].username == "app"
    # Uncommenting any "#name: default" line keeps the file loadable with the same value.
    general = _config.load(str(path)).general
    assert general.connect_timeout == 3.0 and general.port == 6432


def test_reference_defaults_match_the_loader(tmp_path):
    # Uncomment every general option that has a default: the loaded values are the defaults.
    text = reference_yaml(comments=False)
    lines = []
    in_general = False
    for line in text.splitlines():
        if line == "general:":
            in_general = True
        elif line and not line.startswith(" "):
            in_general = False
        if in_general and line.startswith("  #") and not line.rstrip().endswith(":"):
            line = "  " + line[3:]
        lines.append(line)
    path = tmp_path / "uncommented.yaml"
    path.write_text("\n".join(lines).replace("CHANGE_ME", "x"))
    uncommented = _config.load(str(path)).general
    baseline = _config.load(write_reference(tmp_path)).general
    assert uncommented == baseline


def write_reference(tmp_path):
    path = tmp_path / "reference-plain.yaml"
    path.write_text(reference_yaml().replace("CHANGE_ME", "x"))
    return str(path)


def test_reference_no_comments():
    import re
    text = reference_yaml(comments=False)
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert comments, text
    # Only commented-out options are left, no prose.
    assert all(re.match(r"^\s*#\s*[a-z_]+:", line) for line in comments), comments


def test_docs_page_is_generated_from_the_table():
    with open(os.path.join(REPO, "docs", "configuration.md")) as f:
        committed = f.read()
    assert committed == reference_markdown(), "docs/configuration.md is stale: run make docs"
    for opt in _config.OPTIONS:
        assert "| `%s` |" % opt.name in committed


def test_reference_markdown_needs_reference():
    status, _, err = generate(["--markdown"])
    assert status == 2 and "--reference" in err


# -- without a driver ------------------------------------------------------------------------

#: A sitecustomize that makes every PostgreSQL driver unimportable, as after a plain
#: `pip install .`, and reports at exit which driver modules were loaded anyway.
NO_DRIVERS = '''
import atexit, sys

_DRIVERS = ("psycopg", "psycopg2", "psycopg_binary", "psycopg_c", "asyncpg", "pg8000")


class _NoDrivers:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _DRIVERS:
            raise ImportError("no module named %r (blocked by the test)" % name)
        return None


sys.meta_path.insert(0, _NoDrivers())


@atexit.register
def _report():
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in _DRIVERS)
    sys.stderr.write("drivers loaded: %r\\n" % (loaded,))
'''


@pytest.fixture
def no_drivers(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_DRIVERS)
    env = {"PYTHONPATH": os.pathsep.join([str(site), REPO])}
    check = subprocess.run([sys.executable, "-c", "import psycopg"], env=dict(
        doorman_env(), **env), stderr=subprocess.PIPE, text=True)
    assert check.returncode != 0 and "blocked by the test" in check.stderr
    return env


def test_generate_without_psycopg(pg, pgdoorman, tmp_path, extra_users, no_drivers):
    """
    generate logs in with its own client (md5, cleartext and SCRAM superusers; the password
    from the command line, PGPASSWORD or a password file; trust over the Unix socket) and the
    config it writes works, with no driver importable.
    """
    pg.psql("DROP ROLE IF EXISTS gen_md5admin; DROP ROLE IF EXISTS gen_plainadmin; "
            "DROP ROLE IF EXISTS gen_scramadmin")
    pg.create_user("gen_md5admin", "md5-admin-pw", method="md5", superuser=True)
    pg.psql("GRANT md5users TO gen_md5admin")
    pg.create_user("gen_plainadmin", "plain-admin-pw", superuser=True)
    pg.psql("GRANT plainusers TO gen_plainadmin")
    pg.create_user("gen_scramadmin", "scram:admin-pw", superuser=True)
    passfile = tmp_path / "pgpass"
    passfile.write_text("# comment\nelsewhere:*:*:*:nope\n127.0.0.1:%d:*:gen_scramadmin:"
                        "scram\\:admin-pw\n" % pg.port)
    passfile.chmod(0o600)
    tcp = ["--host", pg.host, "-p", str(pg.port)]
    runs = [
        (tcp + ["-u", "gen_md5admin", "--password", "md5-admin-pw"], {}),
        (tcp + ["-u", "gen_plainadmin"], {"PGPASSWORD": "plain-admin-pw"}),
        (tcp + ["-u", "gen_scramadmin"], {"PGPASSFILE": str(passfile)}),
        (["--host", pg.socket_dir, "-p", str(pg.port), "-u", pg.superuser], {}),
    ]
    outputs = []
    for args, env in runs:
        status, text, err = generate(args, env_extra=dict(no_drivers, **env))
        assert status == 0, (args, err)
        assert "drivers loaded: []" in err, err
        outputs.append(text)
    data = yaml.safe_load(outputs[0])
    users = {u["username"]: u for u in data["pools"]["db1"]["users"]}
    assert users["u_md5"]["password"] == pg.password_hash("u_md5")
    assert users["u_scram"]["password"] == pg.password_hash("u_scram")
    assert "PostgreSQL 15" in outputs[0].split("general:")[0]
    d = pgdoorman(for_test(outputs[2]))
    for user, password in [("u_md5", USERS["u_md5"][0]), ("u_scram", USERS["u_scram"][0])]:
        r = psql(d, user, "db2", password, "SELECT current_user")
        assert r.returncode == 0 and r.stdout.strip() == user, r.stderr
    # Wrong password and an unreachable server: the server's own message, no traceback.
    status, _, err = generate(tcp + ["-u", "gen_md5admin", "--password", "wrong"],
                              env_extra=dict(no_drivers, PGPASSWORD=""))
    assert status == 1 and 'password authentication failed for user "gen_md5admin"' in err
    assert "Traceback" not in err, err
    status, _, err = generate(tcp + ["-u", "gen_scramadmin"],
                              env_extra=dict(no_drivers, PGPASSWORD="",
                                             PGPASSFILE=str(tmp_path / "none")))
    assert status == 1 and "no password supplied" in err, err
