"""
Clients see pgdoorman as PostgreSQL (issue 7, point 3): simple and extended protocol,
multi-statement queries, COPY both ways, notices, ParameterStatus, LISTEN/NOTIFY, errors,
pgbench.  Each test runs through a transaction-mode pool ("db1") and, where it makes a
difference, a session-mode pool ("db1s") on the same database.
"""

import re
import subprocess
import threading
import time

import psycopg
import psycopg.errors
import pytest

from conftest import PGBENCH, make_config, pool_entry, psql, user_entry

PASSWORD = "scram-secret"
USER = "u_scram"
MODES = ["db1", "db1s"]  # transaction, session


@pytest.fixture(scope="module")
def d(pg, module_pgdoorman):
    users = [user_entry(USER, PASSWORD, 4),
             user_entry("u_md5", pg.password_hash("u_md5"), 4,
                        server_username="u_md5", server_password="md5-secret")]
    cfg = make_config({
        "db1": pool_entry(pg, users, mode="transaction"),
        "db1s": pool_entry(pg, users, mode="session", database="db1"),
        "db2": pool_entry(pg, users, mode="transaction"),
        "db2s": pool_entry(pg, users, mode="session", database="db2"),
    })
    return module_pgdoorman(cfg)


@pytest.fixture
def table(pg, request):
    """A fresh table name in db1, readable and writable by everyone."""
    name = "t_" + re.sub(r"\W", "_", request.node.name).lower()[:50]
    pg.psql('DROP TABLE IF EXISTS "%s"; CREATE TABLE "%s" (id int PRIMARY KEY, txt text); '
            'GRANT ALL ON "%s" TO PUBLIC' % (name, name, name), db="db1")
    return name


def connect(d, db, **kw):
    return d.connect(USER, db, PASSWORD, **kw)


# -- simple protocol ----------------------------------------------------------------------

@pytest.mark.parametrize("db", MODES)
def test_psql_simple_query(d, db):
    out = psql(d, USER, db, PASSWORD, "SELECT 1 AS a, 'x' AS b, NULL::int AS c")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "1|x|\n"


@pytest.mark.parametrize("db", MODES)
def test_multi_statement_query_returns_every_result(d, db):
    with connect(d, db) as conn:
        cur = conn.cursor()
        cur.execute("SELECT 1; SELECT 2, 3; SELECT 'z' UNION ALL SELECT 'y'")
        assert cur.fetchall() == [(1,)]
        assert cur.nextset()
        assert cur.fetchall() == [(2, 3)]
        assert cur.nextset()
        assert cur.fetchall() == [("z",), ("y",)]
        assert not cur.nextset()


def test_psql_multi_statement_prints_each_result(d):
    out = psql(d, USER, "db1", PASSWORD, "SELECT 'first'; SELECT 'second'")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["first", "second"]


@pytest.mark.parametrize("db", MODES)
def test_multi_statement_error_rolls_back_the_implicit_transaction(d, db, table):
    with connect(d, db) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("INSERT INTO %s VALUES (1, 'a'); SELECT 1/0; INSERT INTO %s VALUES "
                         "(2, 'b')" % (table, table))
        assert conn.execute("SELECT count(*) FROM %s" % table).fetchone() == (0,)
        conn.execute("INSERT INTO %s VALUES (3, 'c'); INSERT INTO %s VALUES (4, 'd')"
                     % (table, table))
        assert conn.execute("SELECT count(*) FROM %s" % table).fetchone() == (2,)


@pytest.mark.parametrize("db", MODES)
def test_transaction_block_commit_and_rollback(d, db, table):
    with connect(d, db, autocommit=False) as conn, connect(d, db) as other:
        conn.execute("INSERT INTO %s VALUES (1, 'kept')" % table)
        conn.commit()
        conn.execute("INSERT INTO %s VALUES (2, 'gone')" % table)
        # Not visible to another client before commit.
        assert other.execute("SELECT id FROM %s ORDER BY id" % table).fetchall() == [(1,)]
        conn.rollback()
        assert other.execute("SELECT id FROM %s ORDER BY id" % table).fetchall() == [(1,)]


# -- extended protocol --------------------------------------------------------------------

@pytest.mark.parametrize("db", MODES)
def test_extended_protocol_parameters(d, db):
    with connect(d, db) as conn:
        row = conn.execute("SELECT %s::int + %s::int, %s::text, %s::numeric * 2",
                           [1, 2, "h\u00e9llo", 1.5]).fetchone()
        assert row[0] == 3 and row[1] == "h\u00e9llo" and float(row[2]) == 3.0
        cur = conn.cursor(binary=True)
        cur.execute("SELECT %s::bytea, %s::int8[]", [b"\x00\x01\xff", [1, 2, 3]])
        assert cur.fetchone() == (b"\x00\x01\xff", [1, 2, 3])


@pytest.mark.parametrize("db", MODES)
def test_many_rows_and_big_values(d, db):
    with connect(d, db) as conn:
        rows = conn.execute("SELECT g, repeat('x', 100) FROM generate_series(1, 100000) g"
                            ).fetchall()
        assert len(rows) == 100000 and rows[-1] == (100000, "x" * 100)
        big = conn.execute("SELECT repeat('ab', 5000000)").fetchone()[0]
        assert len(big) == 10000000
        assert conn.execute("SELECT length(%s::text)", ["y" * 3000000]).fetchone() == (3000000,)


@pytest.mark.parametrize("db", MODES)
def test_pipeline_mode(d, db):
    with connect(d, db) as conn:
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 2", [i]) for i in range(200)]
        assert [c.fetchone()[0] for c in curs] == [i * 2 for i in range(200)]


@pytest.mark.parametrize("db", MODES)
def test_executemany(d, db, table):
    with connect(d, db) as conn:
        conn.cursor().executemany("INSERT INTO %s VALUES (%%s, %%s)" % table,
                                  [(i, "r%d" % i) for i in range(500)])
        assert conn.execute("SELECT count(*), max(txt) FROM %s" % table).fetchone() == \
            (500, "r99")


@pytest.mark.parametrize("db", MODES)
def test_server_side_cursor_in_transaction(d, db):
    with connect(d, db) as conn:
        with conn.transaction():
            cur = conn.cursor(name="c1")
            cur.execute("SELECT g FROM generate_series(1, 1000) g")
            assert cur.fetchmany(10) == [(i,) for i in range(1, 11)]
            assert len(cur.fetchall()) == 990
            cur.close()


def test_named_prepared_statements_in_session_mode(d):
    with connect(d, "db1s", prepare_threshold=0) as conn:
        for i in range(6):
            assert conn.execute("SELECT %s::int + 100", [i]).fetchone() == (i + 100,)
        n = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
        assert n >= 1
        conn.execute("PREPARE sq(int) AS SELECT $1 * $1")
        for i in range(3):
            assert conn.execute("EXECUTE sq(%d)" % i).fetchone() == (i * i,)


def test_server_version_reported(d):
    with connect(d, "db1") as conn:
        assert conn.info.parameter_status("server_version").startswith("15")
        assert conn.info.server_version // 10000 == 15


# -- COPY ---------------------------------------------------------------------------------

@pytest.mark.parametrize("db", MODES)
def test_copy_from_stdin_and_to_stdout(d, db, table):
    rows = [(i, "line %d \u00e9" % i) for i in range(50000)]
    with connect(d, db) as conn:
        with conn.cursor().copy("COPY %s (id, txt) FROM STDIN" % table) as copy:
            for row in rows:
                copy.write_row(row)
        assert conn.execute("SELECT count(*) FROM %s" % table).fetchone() == (50000,)
        out = []
        with conn.cursor().copy("COPY (SELECT id, txt FROM %s ORDER BY id) TO STDOUT"
                                % table) as copy:
            copy.set_types(["int4", "text"])
            for row in copy.rows():
                out.append(row)
        assert out == rows
        # and the connection is fine afterwards
        assert conn.execute("SELECT 'after copy'").fetchone() == ("after copy",)


@pytest.mark.parametrize("db", MODES)
def test_copy_error_midway(d, db, table):
    with connect(d, db) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            with conn.cursor().copy("COPY %s FROM STDIN" % table) as copy:
                copy.write("1\tok\n2\tok\nnot-a-number\tbad\n")
                for i in range(3, 2000):
                    copy.write("%d\tmore\n" % i)
        assert conn.execute("SELECT count(*) FROM %s" % table).fetchone() == (0,)


def test_copy_client_abort(d, table):
    # psycopg answers an exception inside the copy block with CopyFail.
    with connect(d, "db1") as conn:
        with pytest.raises(RuntimeError):
            with conn.cursor().copy("COPY %s FROM STDIN" % table) as copy:
                copy.write("1\tx\n")
                raise RuntimeError("client gives up")
        assert conn.execute("SELECT count(*) FROM %s" % table).fetchone() == (0,)


def test_psql_copy(d, table):
    data = "".join("%d\tv%d\n" % (i, i) for i in range(1000))
    out = psql(d, USER, "db1", PASSWORD, None,
               args=["-c", "\\copy %s FROM STDIN" % table], input=data)
    assert out.returncode == 0, out.stderr
    out = psql(d, USER, "db1", PASSWORD, "COPY (SELECT * FROM %s ORDER BY id) TO STDOUT"
               % table)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data


# -- NOTICE, ParameterStatus, NOTIFY ------------------------------------------------------

@pytest.mark.parametrize("db", MODES)
def test_notices_are_relayed(d, db):
    notices = []
    with connect(d, db) as conn:
        conn.add_notice_handler(lambda diag: notices.append((diag.severity_nonlocalized,
                                                             diag.message_primary)))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; "
                     "RAISE WARNING 'careful'; END $$")
        conn.execute("SELECT 1")
    assert ("NOTICE", "hello 42") in notices
    assert ("WARNING", "careful") in notices


def test_psql_shows_notice(d):
    out = psql(d, USER, "db1", PASSWORD, "DO $$ BEGIN RAISE NOTICE 'psql sees %', 'me'; END $$")
    assert out.returncode == 0, out.stderr
    assert "NOTICE:  psql sees me" in out.stderr


@pytest.mark.parametrize("db", MODES)
def test_parameter_status_is_relayed(d, db):
    with connect(d, db) as conn:
        conn.execute("SET application_name = 'ps_test'")
        assert conn.info.parameter_status("application_name") == "ps_test"
        conn.execute("SET TimeZone = 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)


def test_listen_notify_in_session_mode(d):
    with connect(d, "db1s") as listener, connect(d, "db1") as notifier:
        listener.execute("LISTEN core_chan")
        got = []

        def listen():
            for n in listener.notifies(timeout=10, stop_after=2):
                got.append((n.channel, n.payload))

        t = threading.Thread(target=listen, daemon=True)
        t.start()
        time.sleep(0.3)
        notifier.execute("NOTIFY core_chan, 'first'")
        notifier.execute("SELECT pg_notify('core_chan', 'second')")
        t.join(15)
        assert got == [("core_chan", "first"), ("core_chan", "second")]


@pytest.mark.parametrize("db", MODES)
def test_notification_to_self_within_a_query(d, db):
    got = []
    with connect(d, db) as conn:
        conn.add_notify_handler(lambda n: got.append(n.payload))
        conn.execute("LISTEN self_%s; NOTIFY self_%s, 'to me'" % (db, db))
        conn.execute("UNLISTEN *")
    assert got == ["to me"]


# -- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("db", MODES)
def test_syntax_error(d, db):
    with connect(d, db) as conn:
        with pytest.raises(psycopg.errors.SyntaxError) as e:
            conn.execute("SELEC 1")
        assert e.value.sqlstate == "42601"
        assert 'syntax error at or near "SELEC"' in e.value.diag.message_primary
        assert conn.execute("SELECT 'still fine'").fetchone() == ("still fine",)
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table_xyz WHERE id = %s", [1])
        assert conn.execute("SELECT 'fine again'").fetchone() == ("fine again",)


@pytest.mark.parametrize("db", MODES)
def test_failed_transaction_until_rollback(d, db, table):
    with connect(d, db, autocommit=False) as conn:
        conn.execute("INSERT INTO %s VALUES (1, 'a')" % table)
        with pytest.raises(psycopg.errors.UniqueViolation) as e:
            conn.execute("INSERT INTO %s VALUES (1, 'dup')" % table)
        assert e.value.diag.constraint_name == "%s_pkey" % table
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM %s" % table).fetchone() == (0,)
        conn.commit()


def test_psql_error_exit_status_and_text(d):
    out = psql(d, USER, "db1", PASSWORD, "SELECT 1/0")
    assert out.returncode == 1
    assert "ERROR:  division by zero" in out.stderr


def test_raise_exception_fields(d):
    with connect(d, "db1") as conn:
        with pytest.raises(psycopg.errors.RaiseException) as e:
            conn.execute("DO $$ BEGIN RAISE EXCEPTION 'custom %', 7 USING HINT = 'a hint', "
                         "ERRCODE = 'P0001'; END $$")
        assert e.value.diag.message_primary == "custom 7"
        assert e.value.diag.message_hint == "a hint"


# -- pgbench ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench_db(pg):
    subprocess.run([PGBENCH, "-i", "-q", "-s", "1", "-h", pg.socket_dir, "-p", str(pg.port),
                    "-U", pg.superuser, "db2"], check=True, stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT, cwd="/tmp")
    pg.psql("GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC", db="db2")
    return "db2"


def pgbench(d, db, args, timeout=120):
    env = {"PGPASSWORD": PASSWORD, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([PGBENCH, "-n", "-h", d.host, "-p", str(d.port), "-U", USER] + args
                         + [d.aliases.get(db, db)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=env,
                         timeout=timeout, text=True, cwd="/tmp")
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("db, clients, protocol, script", [
    ("db2", 8, "simple", []), ("db2", 8, "extended", []), ("db2", 8, "extended", ["-S"]),
    # session mode: one server per client, so no more clients than pool_size (4)
    ("db2s", 4, "prepared", []),
])
def test_pgbench(d, bench_db, db, clients, protocol, script):
    out = pgbench(d, db, ["-c", str(clients), "-j", "2", "-t", str(800 // clients),
                          "-M", protocol] + script)
    assert out.returncode == 0, out.stdout
    assert "number of transactions actually processed: 800/800" in out.stdout, out.stdout
    m = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert m and m.group(1) == "0", out.stdout
