"""
Issue 3, acceptance: real drivers' named (server-side) prepared statements through pgdoorman in
transaction mode, with many more clients (30; pgbench 50) than server connections (pool_size
4; pgbench 5), so that a client's statements keep landing on servers that have never seen them.

Each test runs one driver the way its users do, checks every result (the driver programs under
tests/drivers/ check their own and print a JSON summary) and then checks the control that makes
it meaningful: the clients really shared the pool's few server connections (the peak number of
the role's backends in pg_stat_activity, and the distinct pg_backend_pid() the clients saw, are
at most pool_size).

  - psycopg 3: prepare_threshold=0, executemany, pipeline mode, an error in a pipeline,
    execute(prepare=True); plus two small ones: an idle client after a pipeline block (Sync
    then Flush) does not keep its server, and a Parse that PostgreSQL skipped after an error in
    a pipeline is not taken for a prepared statement afterwards
  - asyncpg: its statement cache, prepare(), executemany, a cursor in a transaction
  - SQLAlchemy 2 on asyncpg: Core and ORM
  - pg8000: pg8000.native prepare() (and Close then re-prepare under the same name); and its
    run() with parameters outside transactions (the unnamed statement across three Syncs)
  - node-postgres named queries, postgres.js, pgjdbc prepareThreshold=1 + executeBatch, Go pgx v4
    (statement cache, Prepare, SendBatch): tests/drivers/
  - pgbench -M prepared -c 50 -j 2 with pool_size 5 (TPC-B statements, one transaction each:
    see TPCB_AUTOCOMMIT for why not BEGIN ... END)

What they need is installed by tools/test-deps.sh (make test-deps); a missing tool is a failure,
never a skip.

For checking the harness itself: PGDOORMAN_TEST_DIRECT=1 runs everything against PostgreSQL
directly, PGDOORMAN_DRIVERS_MODE=session through pgdoorman in session mode (with a pool as big
as the number of clients); both skip the sharing control, which only makes sense in transaction
mode.
"""

import asyncio
import importlib
import json
import os
import random
import re
import shutil
import subprocess
import threading
import time

import pytest

from conftest import DIRECT, PGBENCH, Background, BackendSampler, simple_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVERS = os.path.join(REPO, "tests", "drivers")
PGJDBC_JAR = "/usr/share/java/postgresql.jar"
GOPATH = "/usr/share/gocode"

MODE = os.environ.get("PGDOORMAN_DRIVERS_MODE", "transaction")
CLIENTS = 30
POOL_SIZE = 4
DB = "db1"
INSTALL_HINT = "install the driver test dependencies: tools/test-deps.sh (make test-deps)"


# -- helpers ----------------------------------------------------------------------------------

def need_module(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail("Python module %s is missing (%s): %s" % (name, e, INSTALL_HINT))


def need_tool(name):
    path = shutil.which(name)
    if not path:
        pytest.fail("%s is not installed: %s" % (name, INSTALL_HINT))
    return path


def pooled():
    """True when the sharing control applies (transaction mode through pgdoorman)."""
    return MODE == "transaction" and not DIRECT


def start(pgdoorman, pg, user, password, db=DB, clients=CLIENTS, pool_size=POOL_SIZE):
    if MODE != "transaction":
        pool_size = 2 * clients + 5  # session mode: a server per client connection
    return pgdoorman(simple_config(
        pg, user, password, db=db, mode=MODE, pool_size=pool_size,
        general={"query_wait_timeout": "30s", "connect_timeout": "3s",
                 "shutdown_timeout": "2s"}))


def log_tail(d, n=6000):
    text = d.log()
    return text[-n:] if text else "(no pgdoorman log: %s)" % ("direct" if DIRECT else "empty")


def check_errors(errors, d):
    """Fail with the first few client errors and pgdoorman's log."""
    if errors:
        pytest.fail("%d of %d clients failed; first errors:\n  %s\n-- pgdoorman stderr (tail):\n%s"
                    % (len(errors), CLIENTS, "\n  ".join(errors[:8]), log_tail(d)))


def check_shared(peak, pids, d, pool_size=POOL_SIZE, clients=CLIENTS):
    """The control: the clients shared at most pool_size server connections."""
    assert peak >= 1, "no backend of the role was ever seen in pg_stat_activity"
    assert pids, "the clients reported no backend pid"
    if pooled():
        assert clients > pool_size
        assert peak <= pool_size, ("%d backends at once for %d clients: not pooled (pool_size "
                                   "%d)" % (peak, clients, pool_size))
        assert len(pids) <= pool_size, ("%d distinct backends served the clients (pool_size %d)"
                                        % (len(pids), pool_size))


def make_table(pg, name, db=DB):
    pg.psql('DROP TABLE IF EXISTS "%s"; CREATE TABLE "%s" (client int, i int, v int, '
            'PRIMARY KEY (client, i)); GRANT ALL ON "%s" TO PUBLIC' % (name, name, name), db=db)
    return name


def run_threads(fn, clients=CLIENTS, timeout=90):
    """Run C{fn(client_id, barrier)} in C{clients} threads; return the error strings."""
    errors = []
    barrier = threading.Barrier(clients, timeout=60)

    def run(cid):
        try:
            fn(cid, barrier)
        except BaseException as e:  # reported by check_errors
            barrier.abort()
            errors.append("client %d: %s: %s" % (cid, type(e).__name__, e))

    threads = [threading.Thread(target=run, args=(cid,), daemon=True) for cid in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    hung = sum(t.is_alive() for t in threads)
    if hung:
        errors.append("%d clients still running after %ss (a hang?)" % (hung, timeout))
    return errors


def run_async(main, d, timeout=90):
    """asyncio.run(main()) with a time limit that fails with pgdoorman's log."""
    try:
        return asyncio.run(asyncio.wait_for(main(), timeout))
    except asyncio.TimeoutError:
        pytest.fail("the clients ran longer than %ss (a hang?)\n-- pgdoorman stderr (tail):\n%s"
                    % (timeout, log_tail(d)))


def values(rnd):
    return rnd.randint(-1000000, 1000000), rnd.randint(-1000000, 1000000)


# -- psycopg 3 ---------------------------------------------------------------------------------

ADD = "SELECT %s::int + %s::int"
CONCAT = "SELECT %s::text || %s::text"
DIV = "SELECT 1 / %s::int"


def psycopg_pipeline_error(psycopg, conn, cid, i):
    """
    An error in the middle of a pipeline: PostgreSQL skips to the next Sync, so the statement
    after it (and a first-time Parse among them) is not run; before and after, all is well.
    """
    fresh = "SELECT %%s::int + %d" % (cid * 100000 + i)  # first Parse is in the skipped part
    with conn.pipeline() as p:
        before = conn.execute(ADD, (i, 1))
        p.sync()
        raised = False
        # psycopg raises the error as soon as it reads it: in an execute() or in sync()
        try:
            conn.execute(DIV, (0,))
            conn.execute(fresh, (1,))
            conn.execute(ADD, (2, 2))
            p.sync()
        except psycopg.errors.DivisionByZero:
            raised = True
        try:
            p.sync()  # the rest of the aborted part, if the error came before sync()
        except psycopg.errors.PipelineAborted:
            pass
        assert raised, "the pipeline's division by zero did not raise"
        after = conn.execute(ADD, (i, 2))
        fresh_after = conn.execute(fresh, (2,))
    assert before.fetchone() == (i + 1,)
    assert after.fetchone() == (i + 2,)
    assert fresh_after.fetchone() == (cid * 100000 + i + 2,)
    # and outside the pipeline, the connection and its statements keep working
    assert conn.execute(DIV, (1,)).fetchone() == (1,)
    assert conn.execute(fresh, (3,)).fetchone() == (cid * 100000 + i + 3,)


@pytest.mark.timeout(120)
def test_psycopg3_prepared_pipeline(pg, pgdoorman, new_user):
    psycopg = need_module("psycopg")
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    table = make_table(pg, "prep_psycopg")
    iterations = 15
    pids = set()
    dsn = d.dsn(user, DB, pw)

    def client(cid, barrier):
        rnd = random.Random(cid)
        mine = "SELECT %%s::int * 1000 + %d, 'client %d'" % (cid, cid)
        ins = "INSERT INTO %s (client, i, v) VALUES (%%s, %%s, %%s)" % table
        count = ("SELECT count(*)::int, coalesce(sum(v), 0)::int, pg_backend_pid() FROM %s "
                 "WHERE client = %%s" % table)
        n = total = 0
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn, \
                psycopg.connect(dsn, autocommit=True) as conn2:
            barrier.wait()
            for i in range(iterations):
                a, b = values(rnd)
                # a transaction, every statement prepared (prepare_threshold=0)
                with conn.transaction():
                    assert conn.execute(ADD, (a, b)).fetchone() == (a + b,)
                    rows = [(cid, 3 * i + k, a % 1000 + k) for k in range(3)]
                    with conn.cursor() as cur:
                        cur.executemany(ins, rows)
                    n += 3
                    total += sum(r[2] for r in rows)
                    got = conn.execute(count, (cid,)).fetchone()
                    assert got[:2] == (n, total)
                    pids.add(got[2])
                    assert conn.execute(mine, (i,)).fetchone() == (i * 1000 + cid,
                                                                  "client %d" % cid)
                # pipeline mode, autocommit: several prepared queries in flight at once
                with conn.pipeline():
                    c1 = conn.execute(ADD, (b, i))
                    c2 = conn.execute(CONCAT, ("c%d" % cid, "-%d" % i))
                    c3 = conn.execute(mine, (i + 1,))
                    c4 = conn.execute(count, (cid,))
                assert c1.fetchone() == (b + i,)
                assert c2.fetchone() == ("c%d-%d" % (cid, i),)
                assert c3.fetchone() == ((i + 1) * 1000 + cid, "client %d" % cid)
                got = c4.fetchone()
                assert got[:2] == (n, total)
                pids.add(got[2])
                # a transaction in a pipeline
                with conn.pipeline():
                    with conn.transaction():
                        c1 = conn.execute(ADD, (a, i))
                        c2 = conn.execute(count, (cid,))
                assert c1.fetchone() == (a + i,)
                assert c2.fetchone()[:2] == (n, total)
                # prepare=True on a connection that would not prepare on its own
                assert conn2.execute(mine, (i,), prepare=True).fetchone() == (
                    i * 1000 + cid, "client %d" % cid)
                assert conn2.execute(ADD, (a, i), prepare=True).fetchone() == (a + i,)
                if i % 5 == 4:
                    psycopg_pipeline_error(psycopg, conn, cid, i)

    with BackendSampler(pg, user) as sampler:
        errors = run_threads(client)
        peak = sampler.stop()
    check_errors(errors, d)
    assert pg.psql("SELECT count(*), count(DISTINCT client) FROM %s" % table, db=DB).strip() \
        == "%d|%d" % (CLIENTS * iterations * 3, CLIENTS)
    check_shared(peak, pids, d)


@pytest.mark.timeout(60)
def test_psycopg3_pipeline_releases_the_server(pg, pgdoorman, new_user):
    """
    psycopg ends every pipeline block with Sync then Flush: once the Sync is answered the
    server is idle, so an idle client must not keep it (here: pool_size 1, a second client).
    """
    psycopg = need_module("psycopg")
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, clients=2, pool_size=1)
    dsn = d.dsn(user, DB, pw)
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as a:
        with a.pipeline():
            c1 = a.execute(ADD, (1, 2))
            c2 = a.execute(CONCAT, ("a", "b"))
        assert (c1.fetchone(), c2.fetchone()) == ((3,), ("ab",))

        def other():
            with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as b:
                return b.execute(ADD, (3, 4)).fetchone()

        other_client = Background(other)
        try:
            got = other_client.result(timeout=10)
        except Exception as e:
            pytest.fail("a second client got no server while the first sat idle after a "
                        "pipeline block: %s: %s\n-- pgdoorman stderr (tail):\n%s"
                        % (type(e).__name__, e, log_tail(d)))
        assert got == (7,)
        assert a.execute(ADD, (5, 6)).fetchone() == (11,)


@pytest.mark.timeout(90)
def test_psycopg3_statement_skipped_after_pipeline_error_prepares_later(pg, pgdoorman,
                                                                        new_user):
    """
    PostgreSQL skips everything after an error up to the next Sync, a first Parse included:
    that statement does not exist anywhere, so the next Parse of the same text (by this or
    any other client of the pool) must really prepare it.  pool_size 1: one server for all.
    The rounds vary the timing: the error can reach the pooler before or after the skipped
    Parse does.
    """
    slow_div = "SELECT 1 / (%s::int + 0 * length(pg_sleep(0.1)::text))"
    psycopg = need_module("psycopg")
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, clients=2, pool_size=1)
    dsn = d.dsn(user, DB, pw)
    failures = []
    for k in range(18):
        fresh = "SELECT %%s::int + %d" % (1000 + k)
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as a:
            raised = False
            with a.pipeline() as p:
                try:
                    a.execute(slow_div if k % 3 == 2 else DIV, (0,))
                    if k % 3 == 1:
                        time.sleep(0.05)
                    a.execute(fresh, (1,))  # skipped by PostgreSQL
                    p.sync()
                except psycopg.errors.DivisionByZero:
                    raised = True
                try:
                    p.sync()
                except psycopg.errors.PipelineAborted:
                    pass
            assert raised
            try:
                assert a.execute(fresh, (2,)).fetchone() == (1002 + k,)
            except psycopg.Error as e:
                failures.append("same client, round %d: %s" % (k, e))
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as b:
            try:
                assert b.execute(fresh, (3,)).fetchone() == (1003 + k,)
            except psycopg.Error as e:
                failures.append("other client, round %d: %s" % (k, e))
    assert not failures, "%d of 36 failed:\n  %s\n-- pgdoorman stderr (tail):\n%s" % (
        len(failures), "\n  ".join(failures[:6]), log_tail(d))


# -- asyncpg -----------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_asyncpg_statement_cache_prepare_executemany_cursor(pg, pgdoorman, new_user):
    asyncpg = need_module("asyncpg")
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    table = make_table(pg, "prep_asyncpg")
    iterations = 15
    pids = set()
    url = d.url(user, d.aliases.get(DB, DB), pw)

    async def client(conn, cid):
        rnd = random.Random(cid)
        ins = "INSERT INTO %s (client, i, v) VALUES ($1, $2, $3)" % table
        count = ("SELECT count(*)::int, coalesce(sum(v), 0)::int, pg_backend_pid() FROM %s "
                 "WHERE client = $1" % table)
        mine = await conn.prepare("SELECT $1::int * 1000 + %d, 'client %d'" % (cid, cid))
        n = total = 0
        for i in range(iterations):
            a, b = values(rnd)
            async with conn.transaction():
                # the statement cache: the same text again and again
                assert await conn.fetchval("SELECT $1::int + $2::int", a, b) == a + b
                rows = [(cid, 3 * i + k, a % 1000 + k) for k in range(3)]
                await conn.executemany(ins, rows)
                n += 3
                total += sum(r[2] for r in rows)
                got = await conn.fetchrow(count, cid)
                assert (got[0], got[1]) == (n, total)
                pids.add(got[2])
                assert tuple(await mine.fetchrow(i)) == (i * 1000 + cid, "client %d" % cid)
                got = [tuple(r) async for r in conn.cursor(
                    "SELECT g, g * $1::int FROM generate_series(1, $2::int) g", cid, 20,
                    prefetch=6)]
                assert got == [(g, g * cid) for g in range(1, 21)]
            # autocommit: each may land on another server
            assert await conn.fetchval("SELECT $1::int + $2::int", b, i) == b + i
            assert await mine.fetchval(i + 1) == (i + 1) * 1000 + cid
            assert await conn.fetchval("SELECT $1::text || $2::text", "c%d" % cid,
                                       "-%d" % i) == "c%d-%d" % (cid, i)
            if i % 5 == 4:
                try:
                    await conn.fetchval("SELECT 1 / $1::int", 0)
                except asyncpg.DivisionByZeroError:
                    pass
                else:
                    raise AssertionError("division by zero did not raise")
                assert await conn.fetchval("SELECT 1 / $1::int", 1) == 1
                assert await mine.fetchval(i) == i * 1000 + cid

    async def main():
        conns = await asyncio.gather(*[asyncpg.connect(url, timeout=30)
                                       for _ in range(CLIENTS)], return_exceptions=True)
        failed = ["client %d: connect: %s: %s" % (cid, type(c).__name__, c)
                  for cid, c in enumerate(conns) if isinstance(c, BaseException)]
        if failed:
            await asyncio.gather(*[c.close(timeout=5) for c in conns
                                   if not isinstance(c, BaseException)],
                                 return_exceptions=True)
            return failed
        try:
            results = await asyncio.gather(*[client(c, cid) for cid, c in enumerate(conns)],
                                           return_exceptions=True)
        finally:
            await asyncio.gather(*[c.close(timeout=5) for c in conns], return_exceptions=True)
        return ["client %d: %s: %s" % (cid, type(r).__name__, r)
                for cid, r in enumerate(results) if isinstance(r, BaseException)]

    with BackendSampler(pg, user) as sampler:
        errors = run_async(main, d)
        peak = sampler.stop()
    check_errors(errors, d)
    assert pg.psql("SELECT count(*) FROM %s" % table, db=DB).strip() == str(
        CLIENTS * iterations * 3)
    check_shared(peak, pids, d)


# -- SQLAlchemy 2 on asyncpg -------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_sqlalchemy2_asyncpg_core_and_orm(pg, pgdoorman, new_user):
    need_module("asyncpg")
    need_module("greenlet")  # sqlalchemy[asyncio]
    sa = need_module("sqlalchemy")
    assert int(sa.__version__.split(".")[0]) >= 2, "SQLAlchemy %s < 2" % sa.__version__
    from sqlalchemy import (Column, Integer, MetaData, Table, func, insert, literal, select,
                            text)
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from sqlalchemy.orm import DeclarativeBase

    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    table = make_table(pg, "prep_sqlalchemy")
    iterations = 12
    pids = set()

    metadata = MetaData()
    items = Table(table, metadata, Column("client", Integer, primary_key=True),
                  Column("i", Integer, primary_key=True), Column("v", Integer))

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __table__ = items

    url = "postgresql+asyncpg://%s:%s@%s:%d/%s" % (user, pw, d.host, d.port,
                                                   d.aliases.get(DB, DB))

    async def client(engine, Session, cid):
        rnd = random.Random(cid)
        n = total = 0
        for i in range(iterations):
            a, b = values(rnd)
            async with engine.begin() as conn:  # Core
                await conn.execute(insert(items), [{"client": cid, "i": 2 * i, "v": a % 1000}])
                n += 1
                total += a % 1000
                got = (await conn.execute(
                    select(func.count(), func.coalesce(func.sum(items.c.v), 0),
                           func.pg_backend_pid()).where(items.c.client == cid))).one()
                assert (got[0], got[1]) == (n, total)
                pids.add(got[2])
                assert (await conn.execute(select(literal(a, Integer) + literal(b, Integer)))
                        ).scalar_one() == a + b
                assert (await conn.execute(
                    text("SELECT CAST(:x AS integer) * 1000 + %d" % cid), {"x": i})
                ).scalar_one() == i * 1000 + cid
            async with Session() as s, s.begin():  # ORM
                s.add(Item(client=cid, i=2 * i + 1, v=b % 1000))
                await s.flush()
                n += 1
                total += b % 1000
                got = (await s.execute(select(Item).where(Item.client == cid)
                                       .order_by(Item.i))).scalars().all()
                assert [x.i for x in got] == list(range(2 * i + 2))
                assert sum(x.v for x in got) == total

    async def main():
        engine = create_async_engine(url, pool_size=CLIENTS, max_overflow=5, pool_timeout=60,
                                     connect_args={"timeout": 30})
        Session = async_sessionmaker(engine, expire_on_commit=False)
        try:
            results = await asyncio.gather(*[client(engine, Session, cid)
                                             for cid in range(CLIENTS)],
                                           return_exceptions=True)
            opened = engine.pool.checkedin() + engine.pool.checkedout()
        finally:
            await engine.dispose()
        return opened, ["client %d: %s: %s" % (cid, type(r).__name__, r)
                        for cid, r in enumerate(results) if isinstance(r, BaseException)]

    with BackendSampler(pg, user) as sampler:
        opened, errors = run_async(main, d)
        peak = sampler.stop()
    check_errors(errors, d)
    assert opened > POOL_SIZE, "SQLAlchemy opened only %d connections" % opened
    assert pg.psql("SELECT count(*) FROM %s" % table, db=DB).strip() == str(
        CLIENTS * iterations * 2)
    check_shared(peak, pids, d)


# -- pg8000 ------------------------------------------------------------------------------------

def pg8000_connect(native, d, user, pw):
    return native.Connection(user, host=d.host, port=d.port, database=d.aliases.get(DB, DB),
                             password=pw, timeout=60)


@pytest.mark.timeout(120)
def test_pg8000_prepare(pg, pgdoorman, new_user):
    """pg8000.native prepare(): named statements (pg8000_statement_N), Close and re-prepare."""
    need_module("pg8000")
    native = need_module("pg8000.native")
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    table = make_table(pg, "prep_pg8000")
    iterations = 20
    pids = set()

    def client(cid, barrier):
        rnd = random.Random(cid)
        con = pg8000_connect(native, d, user, pw)
        try:
            add = con.prepare("SELECT CAST(:a AS int) + CAST(:b AS int)")
            ins = con.prepare("INSERT INTO %s (client, i, v) VALUES (:c, :i, :v)" % table)
            cnt = con.prepare("SELECT count(*)::int, coalesce(sum(v), 0)::int, pg_backend_pid() "
                              "FROM %s WHERE client = :c" % table)
            mine = con.prepare("SELECT CAST(:x AS int) * 1000 + %d, 'client %d'" % (cid, cid))
            barrier.wait()
            n = total = 0
            for i in range(iterations):
                a, b = values(rnd)
                con.run("START TRANSACTION")  # no parameters: a simple query
                assert add.run(a=a, b=b) == [[a + b]]
                ins.run(c=cid, i=i, v=a % 1000)
                n += 1
                total += a % 1000
                got = cnt.run(c=cid)[0]
                assert got[:2] == [n, total]
                pids.add(got[2])
                assert mine.run(x=i) == [[i * 1000 + cid, "client %d" % cid]]
                # a normal query with parameters (the unnamed statement), in the transaction
                assert con.run("SELECT CAST(:x AS int) * 2", x=i) == [[2 * i]]
                con.run("COMMIT")
                # autocommit
                assert add.run(a=b, b=i) == [[b + i]]
                assert mine.run(x=i + 1) == [[(i + 1) * 1000 + cid, "client %d" % cid]]
                assert con.run("SELECT %d + 1" % i) == [[i + 1]]
                # Close, then the same statement name again with another text
                tmp = con.prepare("SELECT CAST(:x AS int) + %d" % (cid * 1000 + i))
                assert tmp.run(x=1) == [[cid * 1000 + i + 1]]
                tmp.close()
        finally:
            con.close()

    with BackendSampler(pg, user) as sampler:
        errors = run_threads(client)
        peak = sampler.stop()
    check_errors(errors, d)
    assert pg.psql("SELECT count(*) FROM %s" % table, db=DB).strip() == str(
        CLIENTS * iterations)
    check_shared(peak, pids, d)


@pytest.mark.timeout(120)
def test_pg8000_queries_with_parameters_outside_transactions(pg, pgdoorman, new_user):
    """
    pg8000's run(sql, **params) uses the unnamed statement over three round trips, each ended
    by Sync: Parse; Describe; Bind/Execute.  Outside a transaction each may get another server,
    so the pooler has to keep the client's unnamed statement (PgDoorman's anonymous Parse
    cache, client_anonymous_prepared_cache_size) for the driver to work unchanged.
    """
    need_module("pg8000")
    native = need_module("pg8000.native")
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    iterations = 20
    pids = set()

    def client(cid, barrier):
        con = pg8000_connect(native, d, user, pw)
        try:
            barrier.wait()
            for i in range(iterations):
                got = con.run("SELECT CAST(:x AS int) * 1000 + CAST(:c AS int), "
                              "pg_backend_pid()", x=i, c=cid)[0]
                assert got[0] == i * 1000 + cid
                pids.add(got[1])
                assert con.run("SELECT CAST(:t AS text) || '-%d'" % cid, t="c%d" % i) == [
                    ["c%d-%d" % (i, cid)]]
        finally:
            con.close()

    with BackendSampler(pg, user) as sampler:
        errors = run_threads(client)
        peak = sampler.stop()
    check_errors(errors, d)
    check_shared(peak, pids, d)


# -- programs in other languages (tests/drivers/) ----------------------------------------------

def run_program(name, argv, d, pg, user, env=None, timeout=60, cwd=None):
    """Run a driver program; return its JSON summary (the last line of stdout)."""
    with BackendSampler(pg, user) as sampler:
        try:
            out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 timeout=timeout, env=env, cwd=cwd)
        except subprocess.TimeoutExpired as e:
            pytest.fail("%s ran longer than %ss (a hang?); stdout:\n%s\n-- pgdoorman stderr "
                        "(tail):\n%s" % (name, timeout, e.stdout, log_tail(d)))
        peak = sampler.stop()
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    summary = json.loads(lines[-1]) if lines else None
    if out.returncode != 0 or summary is None or summary.get("errors"):
        errors = (summary or {}).get("errors") or []
        pytest.fail("%s exited with %s; %d errors, first:\n  %s\nsummary: %s\nstderr:\n%s\n"
                    "-- pgdoorman stderr (tail):\n%s"
                    % (name, out.returncode,
                       len(errors), "\n  ".join(errors[:8]),
                       json.dumps({k: v for k, v in (summary or {}).items() if k != "errors"}),
                       out.stderr[-3000:], log_tail(d)))
    summary["peak_backends"] = peak
    return summary


def check_summary(summary, iterations, d):
    assert summary["clients"] == CLIENTS
    assert summary["connected"] == CLIENTS
    assert summary["transactions"] == CLIENTS * iterations, summary
    assert summary["queries"] > summary["transactions"]
    check_shared(summary["peak_backends"], range(summary["backend_pids"]), d)


def node_program(name):
    node = need_tool("node")
    base = os.path.join(DRIVERS, "node")
    for module in ("pg", "postgres"):
        if not os.path.isdir(os.path.join(base, "node_modules", module)):
            pytest.fail("npm package %s is missing in tests/drivers/node: %s"
                        % (module, INSTALL_HINT))
    return [node, os.path.join(base, name)]


@pytest.mark.timeout(120)
def test_node_postgres_named_queries(pg, pgdoorman, new_user):
    argv = node_program("pg_named.js")
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    iterations = 30
    summary = run_program("node-postgres", argv + [
        d.url(user, d.aliases.get(DB, DB), pw), str(CLIENTS), str(iterations), "prep_node_pg"],
        d, pg, user)
    check_summary(summary, iterations, d)


@pytest.mark.timeout(120)
def test_postgresjs_prepared_and_begin(pg, pgdoorman, new_user):
    argv = node_program("postgresjs.js")
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    iterations = 30
    summary = run_program("postgres.js", argv + [
        d.url(user, d.aliases.get(DB, DB), pw), str(CLIENTS), str(iterations), "prep_postgresjs"],
        d, pg, user)
    check_summary(summary, iterations, d)


@pytest.fixture(scope="module")
def pgjdbc_classes(tmp_path_factory):
    javac = need_tool("javac")
    need_tool("java")
    if not os.path.exists(PGJDBC_JAR):
        pytest.fail("%s is missing (Debian libpostgresql-jdbc-java): %s"
                    % (PGJDBC_JAR, INSTALL_HINT))
    out = tmp_path_factory.mktemp("java")
    subprocess.run([javac, "-nowarn", "-cp", PGJDBC_JAR, "-d", str(out),
                    os.path.join(DRIVERS, "java", "PgjdbcPrepared.java")],
                   check=True, timeout=120)
    return str(out)


@pytest.mark.timeout(120)
def test_pgjdbc_prepare_threshold_1_and_batch(pg, pgdoorman, new_user, pgjdbc_classes):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    iterations = 25
    url = "jdbc:postgresql://%s:%d/%s?user=%s&password=%s&prepareThreshold=1" % (
        d.host, d.port, d.aliases.get(DB, DB), user, pw)
    summary = run_program("pgjdbc", [
        shutil.which("java"), "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
        "-cp", PGJDBC_JAR + os.pathsep + pgjdbc_classes, "PgjdbcPrepared", url, str(CLIENTS),
        str(iterations), "prep_pgjdbc"], d, pg, user)
    check_summary(summary, iterations, d)


@pytest.fixture(scope="module")
def pgx_binary(tmp_path_factory):
    go = need_tool("go")
    if not os.path.isdir(os.path.join(GOPATH, "src", "github.com", "jackc", "pgx", "v4")):
        pytest.fail("pgx v4 is missing from %s (Debian golang-github-jackc-pgx-v4-dev): %s"
                    % (GOPATH, INSTALL_HINT))
    out = os.path.join(str(tmp_path_factory.mktemp("go")), "pgx_prepared")
    env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOFLAGS="")
    subprocess.run([go, "build", "-o", out, os.path.join(DRIVERS, "go", "pgx_prepared.go")],
                   check=True, timeout=300, env=env, cwd=os.path.join(DRIVERS, "go"))
    return out


@pytest.mark.timeout(120)
def test_pgx_v4_statement_cache_prepare_sendbatch(pg, pgdoorman, new_user, pgx_binary):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    iterations = 30
    summary = run_program("pgx", [pgx_binary, d.url(user, d.aliases.get(DB, DB), pw),
                                  str(CLIENTS), str(iterations), "prep_pgx"], d, pg, user)
    check_summary(summary, iterations, d)


# -- pgbench -M prepared -----------------------------------------------------------------------

BENCH_DB = "db_prep_bench"


@pytest.fixture(scope="module")
def bench_db(pg):
    pg.psql('DROP DATABASE IF EXISTS "%s"' % BENCH_DB)
    pg.create_database(BENCH_DB)
    subprocess.run([PGBENCH, "-i", "-q", "-s", "1", "-h", pg.socket_dir, "-p", str(pg.port),
                    "-U", pg.superuser, BENCH_DB], check=True, stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT, cwd="/tmp", timeout=120)
    pg.psql("GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC", db=BENCH_DB)
    return BENCH_DB


# The built-in TPC-B script through a pool smaller than the client count, with -j 2: pgbench
# prepares each command with a synchronous PQprepare() the first time a client runs it,
# blocking its whole thread, while that thread's other clients sit in open BEGIN ... END
# transactions holding the pool's servers. That deadlocks a pooler that needs a server to answer
# a Parse; pgdoorman answers a Parse of a statement some server already parsed by itself, so it
# must run. The same statements one transaction each are the second variant.
TPCB_AUTOCOMMIT = """\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)
  VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script_kind", ["builtin-tpcb", "tpcb-autocommit"])
def test_pgbench_prepared_50_clients_pool_5(pg, pgdoorman, new_user, bench_db, tmp_path,
                                            script_kind):
    if not os.path.exists(PGBENCH):
        pytest.fail("%s is missing" % PGBENCH)
    clients, pool_size = 50, 5
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, db=bench_db, clients=clients, pool_size=pool_size)
    if script_kind == "builtin-tpcb":
        script_args = []  # pgbench's own tpcb-like script: BEGIN; 3 UPDATEs, SELECT, INSERT; END
    else:
        script = tmp_path / "tpcb-autocommit.sql"
        script.write_text(TPCB_AUTOCOMMIT)
        script_args = ["-f", str(script)]
    env = {"PGPASSWORD": pw, "PATH": "/usr/bin:/bin"}
    with BackendSampler(pg, user) as sampler:
        try:
            out = subprocess.run([PGBENCH, "-n", "-h", d.host, "-p", str(d.port), "-U", user,
                                  "-M", "prepared", "-c", str(clients), "-j", "2", "-T", "10"]
                                 + script_args + [d.aliases.get(bench_db, bench_db)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                 timeout=60, text=True, cwd="/tmp")
        except subprocess.TimeoutExpired as e:
            pytest.fail("pgbench -T 10 still running after 60s (a hang?); output:\n%s\n"
                        "-- pgdoorman stderr (tail):\n%s"
                        % ((e.stdout or b"")[-3000:], log_tail(d)))
        peak = sampler.stop()
    report = "pgbench exit %s:\n%s\n-- pgdoorman stderr (tail):\n%s" % (
        out.returncode, out.stdout[-5000:], log_tail(d))
    assert out.returncode == 0, report
    assert "aborted" not in out.stdout, report
    m = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert m and m.group(1) == "0", report
    m = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    assert m and int(m.group(1)) > 0, report
    m = re.search(r"tps = ([\d.]+)", out.stdout)
    assert m and float(m.group(1)) > 0, report
    check_shared(peak, [None], d, pool_size=pool_size, clients=clients)
