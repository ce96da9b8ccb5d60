"""
SQL-level PREPARE / EXECUTE / DEALLOCATE in transaction mode (issue 16).

PostgreSQL keeps one namespace of prepared statements per session, for SQL PREPARE and the
protocol's Parse alike.  Through pgdoorman each client must keep its own, although its
transactions run on servers shared with clients that use the same names for other queries.
As in test_prepared_protocol, each scenario runs against PostgreSQL directly and through
pgdoorman with pool_size 1 (two clients, one server), and the transcripts must be identical.
"""

import re
import threading

import pytest

from conftest import same_replies_as_postgresql, RawClient, simple_config
from test_prepared_protocol import SYNC, bind, close, describe, execute, parse, query, replies

pytestmark = pytest.mark.timeout(90)


def q(c, sql):
    c.send(query(sql))
    return replies(c)


def scenario_same_name_other_text(a, b):
    t = []
    t.append(q(a, "PREPARE foo AS SELECT 'a' AS who"))
    t.append(q(b, "PREPARE foo AS SELECT 'b' AS who, 2 AS n"))   # 42P05 if names were shared
    t.append(q(a, "EXECUTE foo"))
    t.append(q(b, "EXECUTE foo"))
    t.append(q(a, "PREPARE foo AS SELECT 'again'"))               # 42P05: a has it
    t.append(q(a, "prepare FOO as select 'case folds'"))          # the same name: 42P05
    t.append(q(a, 'PREPARE "FOO" AS SELECT \'quoted\''))           # another name
    t.append(q(a, 'EXECUTE "FOO"'))
    t.append(q(a, "EXECUTE nosuch"))                              # 26000
    t.append(q(a, "EXECUTE nosuch(1, 2)"))
    t.append(q(a, "DEALLOCATE foo"))
    t.append(q(a, "EXECUTE foo"))                                 # gone for a
    t.append(q(b, "EXECUTE foo"))                                 # still there for b
    t.append(q(b, "DEALLOCATE ALL"))                              # b's names only
    t.append(q(b, "EXECUTE foo"))
    t.append(q(a, 'EXECUTE "FOO"'))                               # a's: re-created
    t.append(q(a, "PREPARE foo AS SELECT 'new'"))
    t.append(q(a, "EXECUTE foo;"))
    t.append(q(b, "DISCARD ALL"))
    t.append(q(a, "EXECUTE foo"))
    return t


def scenario_parameters_and_types(a, b):
    t = []
    t.append(q(a, "PREPARE t (int, text) AS SELECT $1 + 1 AS n, $2 || '!' AS s"))
    t.append(q(b, "PREPARE t (text) AS SELECT upper($1) AS b"))
    t.append(q(a, "EXECUTE t (41, 'x')"))
    t.append(q(b, "EXECUTE t('y')"))
    t.append(q(a, "EXECUTE t(1)"))                                # wrong number: 42601
    t.append(q(a, "PREPARE u AS SELECT $1 AS untyped"))
    t.append(q(a, "EXECUTE u('text it is')"))
    t.append(q(a, "EXPLAIN (COSTS OFF) EXECUTE t(1, 'a')"))
    t.append(q(b, "DEALLOCATE ALL"))                              # drops a's copies too
    t.append(q(a, "EXECUTE t(2, ';')"))                           # re-created by SQL
    t.append(q(a, "EXECUTE u(2)"))                                # re-created by a Parse
    t.append(q(b, "DEALLOCATE ALL"))
    a.send(query("EXECUTE t(3, 'z')") + query("EXECUTE u(3)") + query("EXECUTE t(4, '')"))
    t.append(replies(a, ready=3))                                 # pipelined re-creations
    a.send(query("PREPARE v AS SELEC") + query("EXECUTE v"))     # the name, not ours
    t.append(replies(a, ready=2))
    a.send(bind("t", ["5", "p"]) + execute() + SYNC)             # typed, by the protocol
    t.append(replies(a))
    t.append(q(a, "PREPARE bad AS SELEC 1"))                      # 42601, no name
    t.append(q(a, "EXECUTE bad"))
    t.append(q(a, "PREPARE bad AS SELECT 'good now'"))
    t.append(q(a, "EXECUTE bad"))
    return t


def scenario_transactions(a, b):
    t = []
    t.append(q(a, "BEGIN"))
    t.append(q(a, "PREPARE x AS SELECT 'survives rollback'"))
    t.append(q(a, "ROLLBACK"))
    t.append(q(b, "PREPARE x AS SELECT 'b x'"))
    t.append(q(a, "EXECUTE x"))
    t.append(q(a, "BEGIN"))
    t.append(q(a, "SELECT 1/0"))
    t.append(q(a, "PREPARE y AS SELECT 1"))                       # 25P02, not created
    t.append(q(a, "EXECUTE x"))                                   # 25P02
    t.append(q(a, "EXECUTE nosuch"))                              # 25P02 comes first
    t.append(q(a, "PREPARE x AS SELECT 2"))                       # 25P02 comes first
    t.append(q(a, "ROLLBACK"))
    t.append(q(a, "EXECUTE y"))                                   # 26000
    t.append(q(a, "BEGIN"))
    t.append(q(a, "EXECUTE nosuch"))                              # 26000, aborts
    t.append(q(a, "SELECT 1"))
    t.append(q(a, "ROLLBACK"))
    t.append(q(b, "EXECUTE x"))
    return t


def scenario_mixed_with_protocol(a, b):
    """SQL PREPARE and the protocol's Parse share the client's one namespace."""
    t = []
    a.send(parse("m1", "SELECT 10 + $1::int AS ten") + SYNC)
    t.append(replies(a))
    b.send(parse("m1", "SELECT 'b m1'") + SYNC)
    t.append(replies(b))
    t.append(q(a, "EXECUTE m1(5)"))
    t.append(q(b, "EXECUTE m1"))
    t.append(q(a, "PREPARE m1 AS SELECT 1"))                      # 42P05: Parse made it
    t.append(q(a, "PREPARE s1 AS SELECT $1::int * 2 AS doubled"))
    a.send(bind("s1", ["21"]) + execute() + SYNC)
    t.append(replies(a))
    a.send(describe(b"S", "s1") + SYNC)
    t.append(replies(a))
    a.send(parse("s1", "SELECT 'dup'") + SYNC)                   # 42P05: PREPARE made it
    t.append(replies(a))
    a.send(close(b"S", "s1") + SYNC)
    t.append(replies(a))
    t.append(q(a, "EXECUTE s1(1)"))                               # 26000
    t.append(q(a, "DEALLOCATE m1"))
    a.send(bind("m1", ["1"]) + execute() + SYNC)                  # 26000
    t.append(replies(a))
    # A Query in the middle of a pipeline (no Sync before it).
    a.send(parse("p2", "SELECT 'p2'") + query("PREPARE s2 AS SELECT 's2'"))
    t.append(replies(a))
    a.send(bind("p2") + execute() + query("EXECUTE s2") + SYNC)
    t.append(replies(a, ready=2))
    return t


SCENARIOS = [scenario_same_name_other_text, scenario_parameters_and_types,
             scenario_transactions, scenario_mixed_with_protocol]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__[9:])
def test_same_replies_as_postgresql(pg, new_user, pgdoorman, scenario):
    same_replies_as_postgresql(pg, new_user, pgdoorman, scenario)


# -- real drivers ------------------------------------------------------------------------------

def sql_loop(conn, cid, rounds, errors, deallocate_all=True):
    """
    PREPARE one name for another text each round, EXECUTE it, DEALLOCATE it (or everything:
    not with psycopg's prepare_threshold 5, where a simple DEALLOCATE ALL drops the statements
    psycopg prepared, which it then uses: an error with PostgreSQL alone too).
    """
    import psycopg
    i = step = None
    try:
        for i in range(rounds):
            step = "PREPARE"
            conn.execute("PREPARE foo (int) AS SELECT %d AS cid, %d + $1 AS n" % (cid, i))
            row = conn.execute("EXECUTE foo(%d)" % cid).fetchone()
            if row != (cid, i + cid):
                errors.append("client %d round %d: EXECUTE gave %r" % (cid, i, row))
            step = "PREPARE twice"
            try:
                conn.execute("PREPARE foo AS SELECT 'twice'")
                errors.append("client %d: PREPARE twice succeeded" % cid)
            except psycopg.errors.DuplicatePreparedStatement:
                pass
            step = "DEALLOCATE"
            if i % 3 == 0 and deallocate_all:
                conn.execute("PREPARE bar AS SELECT %d" % cid)
                conn.execute("DEALLOCATE ALL")
                try:
                    conn.execute("EXECUTE bar")
                    errors.append("client %d: bar outlived DEALLOCATE ALL" % cid)
                except psycopg.errors.InvalidSqlStatementName:
                    pass
            else:
                conn.execute("DEALLOCATE foo")
            try:
                conn.execute("EXECUTE foo(1)")
                errors.append("client %d: foo outlived its DEALLOCATE" % cid)
            except psycopg.errors.InvalidSqlStatementName as e:
                if str(e).strip() != 'prepared statement "foo" does not exist':
                    errors.append("client %d: %s" % (cid, e))
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append("client %d round %s at %s: %r" % (cid, i, step, e))


@pytest.mark.parametrize("threshold", [None, 0, 5], ids=["simple", "threshold0", "threshold5"])
def test_psycopg_six_clients_two_servers(pg, new_user, pgdoorman, threshold):
    """
    6 psycopg clients on pool_size 2 PREPARE the same name for their own texts, EXECUTE,
    DEALLOCATE, in loops.  With prepare_threshold set, psycopg itself prepares "EXECUTE foo"
    and the like as protocol-level statements.
    """
    import psycopg
    user, password = new_user()
    everything = threshold != 5
    errors = []
    # The control: the same loop, with PostgreSQL alone.
    with psycopg.connect(host="127.0.0.1", port=pg.port, user=user, password=password,
                         dbname="db1", autocommit=True, prepare_threshold=threshold) as conn:
        sql_loop(conn, 0, 20, errors, everything)
    assert not errors
    d = pgdoorman(simple_config(pg, user, password, pool_size=2))
    conns = [d.connect(user, "db1", password, autocommit=True, prepare_threshold=threshold)
             for _ in range(6)]
    threads = [threading.Thread(target=sql_loop, args=(c, i, 20, errors, everything))
               for i, c in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in conns:
        c.close()
    assert not errors, "\n".join(errors[:10]) + "\n" + d.log()[-3000:]
    assert pg.count_backends(user) <= 2


def test_asyncpg_sql_prepare_and_protocol(pg, new_user, pgdoorman):
    """asyncpg runs everything as protocol-level statements; SQL EXECUTE of them too."""
    import asyncio

    import asyncpg
    user, password = new_user()
    d = pgdoorman(simple_config(pg, user, password, pool_size=1))

    async def one(cid):
        conn = await asyncpg.connect(host="127.0.0.1", port=d.port, user=user,
                                     password=password, database="db1")
        try:
            for i in range(10):
                await conn.execute("PREPARE foo AS SELECT %d * 100 + %d" % (cid, i))
                assert await conn.fetchval("EXECUTE foo") == cid * 100 + i
                with pytest.raises(asyncpg.exceptions.DuplicatePreparedStatementError):
                    await conn.execute("PREPARE foo AS SELECT 1")
                await conn.execute("DEALLOCATE foo")
                with pytest.raises(asyncpg.exceptions.InvalidSQLStatementNameError):
                    await conn.fetchval("EXECUTE foo")
            stmt = await conn.prepare("SELECT $1::int + %d" % cid)
            assert await stmt.fetchval(1) == cid + 1
        finally:
            await conn.close()

    async def main():
        await asyncio.gather(*[one(i) for i in range(4)])

    asyncio.run(asyncio.wait_for(main(), 60))


def test_upgrade_carries_sql_prepared_names(pg, pgdoorman, new_user):
    """The zero-downtime upgrade hands the client's SQL-prepared names to the new process."""
    import psycopg

    from test_upgrade import Upgrades, config
    upgrades = Upgrades()
    try:
        user, pw = new_user()
        d = upgrades.follow(pgdoorman(config(pg, user, pw)))
        with d.connect(user, "db1", pw, autocommit=True, prepare_threshold=None) as conn, \
                d.connect(user, "db1", pw, autocommit=True, prepare_threshold=None) as other:
            conn.execute("PREPARE typed (int, text) AS SELECT $1 * 2, $2 || '!'")
            conn.execute("PREPARE plain AS SELECT 'plain'")
            other.execute("PREPARE plain AS SELECT 'other'")
            upgrades.signal(d)
            upgrades.wait_old_gone(d)
            assert conn.execute("EXECUTE typed(21, 'a')").fetchone() == (42, "a!")
            assert conn.execute("EXECUTE plain").fetchone() == ("plain",)
            assert other.execute("EXECUTE plain").fetchone() == ("other",)
            with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
                conn.execute("PREPARE typed AS SELECT 1")
            conn.execute("DEALLOCATE plain")
            with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                conn.execute("EXECUTE plain")
            assert other.execute("EXECUTE plain").fetchone() == ("other",)
        assert re.search(r"2 clients handed over", d.log()), d.log()[-3000:]
    finally:
        upgrades.stop_all()


@pytest.mark.parametrize("sql", [
    "SELECT 1; PREPARE foo AS SELECT 'mine'",
    "/* a comment */ PREPARE foo AS SELECT 'mine'",
    "-- a comment\nprepare foo as select 'mine'",
    "SELECT 1; pRePaRe foo AS SELECT 'mine'",
])
def test_an_unmapped_prepare_never_serves_another_client(pg, new_user, pgdoorman, sql):
    """
    A PREPARE pgdoorman does not map (among other statements, after a comment) creates the
    client's own name on the server: that server must go to nobody else (it is closed), or
    another client's unmapped EXECUTE would run the first client's statement.
    """
    from conftest import ServerError
    user, password = new_user()
    d = pgdoorman(simple_config(pg, user, password, pool_size=1))
    a = RawClient(d.port).startup(user, "db1", password)
    b = RawClient(d.port).startup(user, "db1", password)
    a.query(sql)
    with pytest.raises(ServerError) as e:
        b.query("SELECT 1; EXECUTE foo")
    assert e.value.fields["C"] == "26000"
    assert "closed after client" in d.log()
    a.terminate()
    b.terminate()
