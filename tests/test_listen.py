"""
LISTEN/NOTIFY in transaction mode without pinning (issue 16, pgdoorman.listen): a lone LISTEN
is answered by the pooler once the pool's listener connection LISTENs the channel, and the
notifications reach exactly the clients that asked, between their messages, through real
PostgreSQL and real drivers.
"""

import json
import os
import shutil
import subprocess
import threading
import time

import psycopg
import pytest

from conftest import REPO, Background, RawClient, message, simple_config, wait_until


def start(pgdoorman, pg, user, pw, pool_size=2, **kw):
    return pgdoorman(simple_config(pg, user, pw, pool_size=pool_size, **kw))


def notifies(conn, timeout, count=None):
    """(channel, payload, pid) of the notifications C{conn} gets within C{timeout}."""
    got = []
    for n in conn.notifies(timeout=timeout, stop_after=count):
        got.append((n.channel, n.payload, n.pid))
    return got


def listener_backends(pg, user):
    """
    Backends of C{user} whose last query was one LISTEN/UNLISTEN statement: pgdoorman's
    listener connections (a client's LISTEN in transaction mode never reaches a server).
    """
    with pg.connect_super() as c:
        return c.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s "
            r"AND query ~* '^\s*(un)?listen\s+[^;]*;?\s*$'", [user]).fetchall()


def direct(pg, user):
    return psycopg.connect(host=pg.host, port=pg.port, user=user, dbname="db1",
                           password=pg.passwords[user], autocommit=True)


PYPY = os.path.join(REPO, ".venv-pypy", "bin", "python")


@pytest.mark.parametrize("python", [pytest.param(None, id="cpython"),
                                    pytest.param(PYPY, id="pypy")])
def test_notifications_reach_exactly_the_subscribed_clients(pg, pgdoorman, new_user, python):
    """
    pool_size 2, six clients running transactions, three listening on different channels
    (one quoted, mixed case): NOTIFY from a pooled client and from a direct connection reach
    exactly the subscribed clients with their payloads; the pool never uses more than its two
    servers plus the one listener.  On CPython and PyPy.
    """
    if python is not None and not os.path.exists(python):
        pytest.fail("%s is missing (tools/test-deps.sh creates .venv-pypy)" % python)
    user, pw = new_user()
    d = pgdoorman(simple_config(pg, user, pw, pool_size=2),
                  argv=[python, "-m", "pgdoorman", "{config}"] if python else None)
    listeners = [d.connect(user, "db1", pw) for _ in range(3)]
    listeners[0].execute("LISTEN alpha")
    listeners[1].execute("LISTEN Beta")           # folded: beta
    listeners[2].execute('LISTEN "Gamma Ray"')    # quoted: kept as is
    stop = threading.Event()
    errors = []

    def work():
        try:
            with d.connect(user, "db1", pw) as c:
                while not stop.is_set():
                    with c.transaction():
                        c.execute("SELECT pg_sleep(0.005)")
                        c.execute("SELECT 1")
        except Exception as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(6)]
    for t in workers:
        t.start()
    try:
        notifier = d.connect(user, "db1", pw)
        notifier.execute("NOTIFY alpha, 'from pooled client'")
        notifier.execute("SELECT pg_notify('beta', 'b1')")
        with direct(pg, user) as dc:
            direct_pid = dc.info.backend_pid
            dc.execute("NOTIFY \"Gamma Ray\", 'g1'")
            dc.execute("NOTIFY \"Beta\", 'not for beta'")  # another channel: "Beta" != beta
            dc.execute("NOTIFY gamma, 'nobody'")
            dc.execute("NOTIFY alpha, 'a2'")
        got = [notifies(c, 3.0) for c in listeners]
        assert [(ch, p) for ch, p, _ in got[0]] == [("alpha", "from pooled client"),
                                                      ("alpha", "a2")]
        assert got[0][1][2] == direct_pid  # the notifying backend's pid
        assert [(ch, p) for ch, p, _ in got[1]] == [("beta", "b1")]
        assert [(ch, p) for ch, p, _ in got[2]] == [("Gamma Ray", "g1")]
        # The listening clients still run queries and transactions normally.
        for c in listeners:
            with c.transaction():
                assert c.execute("SELECT 42").fetchone() == (42,)
        assert pg.count_backends(user) <= 3
        notifier.close()
    finally:
        stop.set()
        for t in workers:
            t.join(10)
        for c in listeners:
            c.close()
    assert not errors


def test_unlisten_stops_delivery(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    a = d.connect(user, "db1", pw)
    b = d.connect(user, "db1", pw)
    a.execute("LISTEN one")
    a.execute("LISTEN two")
    b.execute("LISTEN one")
    with direct(pg, user) as dc:
        dc.execute("NOTIFY one, 'x'")
        assert [p for _, p, _ in notifies(a, 2.0, 1)] == ["x"]
        assert [p for _, p, _ in notifies(b, 2.0, 1)] == ["x"]
        a.execute("UNLISTEN one")
        dc.execute("NOTIFY one, 'y'")
        dc.execute("NOTIFY two, 'z'")
        assert [(ch, p) for ch, p, _ in notifies(a, 1.5)] == [("two", "z")]
        assert [p for _, p, _ in notifies(b, 1.5)] == ["y"]
        a.execute("UNLISTEN *")
        b.execute("unlisten ONE;")
        dc.execute("NOTIFY one, 'w'")
        dc.execute("NOTIFY two, 'w'")
        assert notifies(a, 1.0) == []
        assert notifies(b, 1.0) == []
    # Nobody listens any more: the listener connection is gone.
    wait_until(lambda: not listener_backends(pg, user), 5, message="listener closed")
    a.close()
    b.close()


def test_disconnect_unsubscribes_and_closes_the_listener(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    a = d.connect(user, "db1", pw)
    b = d.connect(user, "db1", pw)
    a.execute("LISTEN gone")
    b.execute("LISTEN stays")
    assert len(listener_backends(pg, user)) == 1
    a.close()
    with direct(pg, user) as dc:
        dc.execute("NOTIFY gone, '1'")
        dc.execute("NOTIFY stays, '2'")
    assert [p for _, p, _ in notifies(b, 2.0, 1)] == ["2"]
    assert len(listener_backends(pg, user)) == 1
    b.close()
    wait_until(lambda: not listener_backends(pg, user), 5, message="listener closed")
    assert "Traceback" not in d.log()


def test_listening_costs_no_pool_server(pg, pgdoorman, new_user):
    """
    pool_size 1: a client that LISTENs holds no server, so another client can keep the only
    server in a transaction while the listener still LISTENs and gets its notifications.
    """
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=1)
    holder = d.connect(user, "db1", pw)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")  # the only server is now this client's
    listener = d.connect(user, "db1", pw)
    listener.execute("LISTEN busy")  # answered without a pool server
    with direct(pg, user) as dc:
        dc.execute("NOTIFY busy, 'while the pool is in use'")
    assert [p for _, p, _ in notifies(listener, 3.0, 1)] == ["while the pool is in use"]
    holder.execute("COMMIT")
    # Its NOTIFY goes through the pool like any statement and comes back to itself.
    listener.execute("NOTIFY busy, 'self'")
    assert [p for _, p, _ in notifies(listener, 3.0, 1)] == ["self"]
    holder.close()
    listener.close()


def test_names_fold_and_errors_are_postgresqls(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    c = d.connect(user, "db1", pw)
    with pytest.raises(psycopg.errors.SyntaxError):
        c.execute("LISTEN select")  # a reserved word: PostgreSQL's own error
    long = "L" * 70
    c.execute("LISTEN " + long)  # cut to 63 bytes, folded
    c.execute('LISTEN "ÄÖ"')
    assert c.execute("SELECT 1").fetchone() == (1,)
    with direct(pg, user) as dc:
        dc.execute("NOTIFY " + "l" * 63 + ", 'long'")
        dc.execute("""NOTIFY "ÄÖ", 'utf8'""")
        dc.execute("""NOTIFY "äö", 'other'""")
    assert [(ch, p) for ch, p, _ in notifies(c, 2.0)] == [("l" * 63, "long"), ("ÄÖ", "utf8")]
    c.close()


def test_notifications_wait_for_the_end_of_a_transaction(pg, pgdoorman, new_user):
    """A listener in a transaction gets notifications after it, as from PostgreSQL."""
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    c = d.connect(user, "db1", pw)
    c.execute("LISTEN tx")
    c.execute("BEGIN")
    c.execute("SELECT 1")
    with direct(pg, user) as dc:
        dc.execute("NOTIFY tx, 'during'")
    time.sleep(0.5)
    assert c.execute("SELECT 2").fetchone() == (2,)
    assert notifies(c, 0.3) == []  # held while the transaction is open
    c.execute("COMMIT")
    assert [p for _, p, _ in notifies(c, 2.0, 1)] == ["during"]
    c.close()


def _read_until_ready(raw):
    """The codes of the messages up to ReadyForQuery."""
    codes = []
    while True:
        kind, payload = raw.recv_msg()
        codes.append(kind)
        if kind == b"Z":
            return codes


@pytest.mark.timeout(120)
def test_notifications_are_never_inside_another_reply(pg, pgdoorman, new_user):
    """
    A raw client runs big SELECTs (replies of many network reads) while notifications fly:
    every NotificationResponse arrives between replies, none inside a reply, none is lost.
    """
    user, pw = new_user("password")
    d = start(pgdoorman, pg, user, pw)
    raw = RawClient(d.port)
    raw.startup(user, "db1", pw)
    raw.send(message(b"Q", b"LISTEN flood\x00"))
    assert _read_until_ready(raw) == [b"C", b"Z"]
    sent = 300
    done = threading.Event()

    def fire():
        with direct(pg, user) as dc:
            for i in range(sent):
                dc.execute("SELECT pg_notify('flood', %s)", [str(i)])
                time.sleep(0.003)
        done.set()

    bg = Background(fire)
    received = []
    inside = 0
    queries = 0
    while not done.is_set() or queries < 3:
        raw.send(message(b"Q", b"SELECT repeat('x', 200) FROM generate_series(1, 20000)\x00"))
        in_reply = False  # from the reply's first message (RowDescription) to its Z
        rows = 0
        while True:
            kind, payload = raw.recv_msg()
            if kind != b"A":
                in_reply = True
            if kind == b"A":
                if in_reply:
                    inside += 1
                received.append(payload[4:].split(b"\x00")[1].decode())
            elif kind == b"D":
                rows += 1
            elif kind == b"Z":
                break
        assert rows == 20000
        queries += 1
    bg.result(60)
    raw.sock.settimeout(0.3)
    deadline = time.monotonic() + 5
    while len(received) < sent and time.monotonic() < deadline:
        try:
            kind, payload = raw.recv_msg()
        except OSError:
            continue
        if kind == b"A":
            received.append(payload[4:].split(b"\x00")[1].decode())
    assert inside == 0
    assert received == [str(i) for i in range(sent)]
    raw.close()


def test_session_mode_is_unchanged(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, mode="session")
    c = d.connect(user, "db1", pw)
    c.execute("LISTEN sess")
    # The client's own server LISTENs, as without a pooler.
    assert c.execute("SELECT pg_listening_channels()").fetchall() == [("sess",)]
    assert pg.count_backends(user) == 1  # no listener connection of pgdoorman's
    with direct(pg, user) as dc:
        dc.execute("NOTIFY sess, 's'")
    assert [p for _, p, _ in notifies(c, 2.0, 1)] == ["s"]
    c.close()


def test_listen_fanout_off_sends_listen_to_the_server(pg, pgdoorman, new_user):
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, general={"listen_fanout": False})
    c = d.connect(user, "db1", pw)
    c.execute("LISTEN off")
    # The server it ran on LISTENs (the old behaviour); no listener connection of ours.
    assert c.execute("SELECT pg_listening_channels()").fetchall() == [("off",)]
    c.close()


def test_listener_comes_back_after_its_backend_dies(pg, pgdoorman, new_user):
    """
    The listener's backend is terminated: the clients keep their connections, get a NOTICE
    that notifications may have been lost, and get the next ones.
    """
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    c = d.connect(user, "db1", pw)
    seen = []
    c.add_notice_handler(lambda diag: seen.append(diag.message_primary))
    c.execute("LISTEN phoenix")
    (pid,), = listener_backends(pg, user)
    with pg.connect_super() as su:
        su.execute("SELECT pg_terminate_backend(%s)", [pid])

    def relistened():
        rows = listener_backends(pg, user)
        return rows and rows[0][0] != pid
    wait_until(relistened, 10, message="listener back")
    with direct(pg, user) as dc:
        dc.execute("NOTIFY phoenix, 'again'")
    assert [p for _, p, _ in notifies(c, 3.0, 1)] == ["again"]
    assert any("lost" in m for m in seen), seen
    assert c.execute("SELECT 1").fetchone() == (1,)
    c.close()


NODE_SCRIPT = r"""
const { Client } = require('pg');
(async () => {
  const [url, notifyUrl] = process.argv.slice(2);
  const c = new Client({ connectionString: url });
  await c.connect();
  const got = [];
  c.on('notification', (n) => got.push([n.channel, n.payload]));
  await c.query('LISTEN node_ch');
  const other = new Client({ connectionString: notifyUrl });
  await other.connect();
  await other.query("NOTIFY node_ch, 'hello node'");
  await other.query("NOTIFY node_other, 'not mine'");
  await other.end();
  for (let i = 0; i < 50 && got.length < 1; i++) await new Promise(r => setTimeout(r, 50));
  const r = await c.query('SELECT 1 AS one');
  await c.query('UNLISTEN node_ch');
  console.log(JSON.stringify({ got, one: r.rows[0].one }));
  await c.end();
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_node_postgres_gets_notifications(pg, pgdoorman, new_user, tmp_path):
    node = shutil.which("node")
    modules = os.path.join(REPO, "tests", "drivers", "node", "node_modules")
    if node is None or not os.path.isdir(os.path.join(modules, "pg")):
        pytest.skip("node-postgres not installed (tools/test-deps.sh)")
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)
    script = tmp_path / "listen.js"
    script.write_text(NODE_SCRIPT)
    env = dict(os.environ, NODE_PATH=modules)
    out = subprocess.run([node, str(script), d.url(user, "db1", pw),
                          "postgresql://%s:%s@%s:%d/db1" % (user, pg.passwords[user], pg.host,
                                                            pg.port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=60,
                         text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {"got": [["node_ch", "hello node"]], "one": 1}
    wait_until(lambda: not listener_backends(pg, user), 5, message="listener closed")


@pytest.mark.timeout(120)
def test_channels_move_with_the_client_in_an_upgrade(pg, pgdoorman, new_user):
    """
    Zero-downtime upgrade: an idle listening client goes to the new process with its channels;
    the new process's listener LISTENs them, the old one's is gone.
    """
    from test_upgrade import Upgrades, config
    upgrades = Upgrades()
    try:
        user, pw = new_user()
        d = upgrades.follow(pgdoorman(config(pg, user, pw)))
        c = d.connect(user, "db1", pw)
        c.execute("LISTEN moving")
        c.execute('LISTEN "Also Moving"')
        (old_listener,), = listener_backends(pg, user)
        upgrades.signal(d)
        upgrades.wait_old_gone(d)
        assert "1 clients handed over" in d.log()

        def new_listener():
            rows = listener_backends(pg, user)
            return len(rows) == 1 and rows[0][0] != old_listener and \
                pg.count_backends(user) <= 2
        # The new listener runs its LISTENs at once; with nobody asking, by the first NOTIFY.
        wait_until(new_listener, 10, message="the new process's listener")
        with direct(pg, user) as dc:
            dc.execute("NOTIFY moving, 'after'")
            dc.execute("NOTIFY \"Also Moving\", 'too'")
            dc.execute("NOTIFY other, 'no'")
        assert [(ch, p) for ch, p, _ in notifies(c, 3.0)] == [("moving", "after"),
                                                                ("Also Moving", "too")]
        c.execute("UNLISTEN moving")
        with direct(pg, user) as dc:
            dc.execute("NOTIFY moving, 'gone'")
            dc.execute("NOTIFY \"Also Moving\", 'still'")
        assert [p for _, p, _ in notifies(c, 2.0)] == ["still"]
        c.close()
    finally:
        upgrades.stop_all()


@pytest.mark.timeout(120)
def test_asyncpg_add_listener_and_remove_listener(pg, pgdoorman, new_user):
    """
    asyncpg LISTENs through the extended protocol (a named statement): pool_size 1 with the
    only server held in another client's transaction, its add_listener still returns, gets
    the notifications, and remove_listener stops them.
    """
    import asyncio

    import asyncpg
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw, pool_size=1)
    holder = d.connect(user, "db1", pw)

    async def run():
        conn = await asyncpg.connect(d.url(user, "db1", pw))
        got = []
        ev = asyncio.Event()

        def cb(connection, pid, channel, payload):
            got.append((channel, payload))
            ev.set()
        assert await conn.fetchval("SELECT 1") == 1
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # the pool's only server is taken
        await asyncio.wait_for(conn.add_listener("Async Chan", cb), 5)
        await asyncio.wait_for(conn.add_listener("second", cb), 5)
        with direct(pg, user) as dc:
            dc.execute("NOTIFY \"Async Chan\", 'a1'")
            dc.execute("NOTIFY second, 's1'")
            dc.execute("NOTIFY \"async chan\", 'not mine'")
        for _ in range(50):
            if len(got) >= 2:
                break
            await asyncio.sleep(0.05)
        assert got == [("Async Chan", "a1"), ("second", "s1")]
        await asyncio.wait_for(conn.remove_listener("Async Chan", cb), 5)
        holder.execute("COMMIT")
        # Its statements run on the pool's server as usual.
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        got.clear()
        with direct(pg, user) as dc:
            dc.execute("NOTIFY \"Async Chan\", 'a2'")
            dc.execute("NOTIFY second, 's2'")
        await asyncio.sleep(0.8)
        assert got == [("second", "s2")]
        # Listening again reuses its cached statement (Bind/Execute only).
        await conn.add_listener("Async Chan", cb)
        got.clear()
        with direct(pg, user) as dc:
            dc.execute("NOTIFY \"Async Chan\", 'a3'")
        await asyncio.sleep(0.8)
        assert got == [("Async Chan", "a3")]
        await conn.close()

    asyncio.run(run())
    holder.close()
    wait_until(lambda: not listener_backends(pg, user), 5, message="listener closed")


@pytest.mark.timeout(120)
def test_asyncpg_listener_moves_in_an_upgrade(pg, pgdoorman, new_user):
    """asyncpg's channels and its LISTEN/UNLISTEN statements go to the new process."""
    import asyncio

    import asyncpg
    from test_upgrade import Upgrades, config
    upgrades = Upgrades()
    user, pw = new_user()
    try:
        d = upgrades.follow(pgdoorman(config(pg, user, pw)))

        async def run():
            conn = await asyncpg.connect(d.url(user, "db1", pw))
            got = []

            def cb(c, pid, ch, p):
                got.append(p)
            # LISTEN "up" and UNLISTEN "up" both become cached named statements.
            await conn.add_listener("up", cb)
            await conn.remove_listener("up", cb)
            await conn.add_listener("up", cb)
            await asyncio.sleep(0.3)
            await asyncio.get_running_loop().run_in_executor(None, upgrades.signal, d)
            await asyncio.get_running_loop().run_in_executor(None, upgrades.wait_old_gone, d)
            with direct(pg, user) as dc:
                dc.execute("NOTIFY up, 'new process'")
            for _ in range(60):
                if got:
                    break
                await asyncio.sleep(0.05)
            assert got == ["new process"]
            # remove_listener Binds the UNLISTEN statement it Parsed on the old process.
            await asyncio.wait_for(conn.remove_listener("up", cb), 5)
            with direct(pg, user) as dc:
                dc.execute("NOTIFY up, 'after unlisten'")
            await asyncio.sleep(0.8)
            assert got == ["new process"]
            assert await conn.fetchval("SELECT 2") == 2
            await conn.close()

        asyncio.run(run())
        assert "1 clients handed over" in d.log()
    finally:
        upgrades.stop_all()


@pytest.mark.timeout(120)
def test_postgres_down_and_restarted(own_pg, pgdoorman):
    """
    PostgreSQL restarts: the listening client keeps its connection, is told, and gets the
    notifications after; a LISTEN while PostgreSQL is down gets an error (not a hang) and
    the client carries on once it is back.
    """
    pg = own_pg()
    user, pw = pg.new_user()
    d = start(pgdoorman, pg, user, pw)
    c = d.connect(user, "db1", pw)
    seen = []
    c.add_notice_handler(lambda diag: seen.append(diag.message_primary))
    c.execute("LISTEN survive")
    pg.stop("fast")
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        c.execute("LISTEN while_down")
    assert time.monotonic() - t0 < 20
    pg.start()
    wait_until(lambda: listener_backends(pg, user), 20, message="listener back")
    with direct(pg, user) as dc:
        dc.execute("NOTIFY survive, 'back'")
        dc.execute("NOTIFY while_down, 'never listened'")
    assert [p for _, p, _ in notifies(c, 3.0)] == ["back"]
    assert any("lost" in m for m in seen), seen
    c.execute("LISTEN while_down")
    with direct(pg, user) as dc:
        dc.execute("NOTIFY while_down, 'now'")
    assert [p for _, p, _ in notifies(c, 3.0, 1)] == ["now"]
    c.close()
    assert "Traceback" not in d.log()


@pytest.mark.timeout(120)
def test_a_client_that_never_reads_is_closed_and_costs_others_nothing(pg, pgdoorman, new_user):
    """
    A listening client that never reads: once 32 MB of notifications wait for it, it is closed
    with an error; another listener of the channel gets every notification.
    """
    user, pw = new_user("password")
    d = start(pgdoorman, pg, user, pw)
    raw = RawClient(d.port)
    raw.startup(user, "db1", pw)
    raw.send(message(b"Q", b"LISTEN big\x00"))
    assert _read_until_ready(raw) == [b"C", b"Z"]
    reader = d.connect(user, "db1", pw)
    reader.execute("LISTEN big")
    n = 6000
    with direct(pg, user) as dc:
        dc.execute("SELECT pg_notify('big', repeat('x', 7900) || i) "
                   "FROM generate_series(1, %s) i" % n)
    got = notifies(reader, 20.0, n)
    assert len(got) == n and got[-1][1].endswith(str(n))
    # The non-reader's connection ends with PostgreSQL's "program limit exceeded" error.
    kinds, last = [], None
    try:
        while True:
            kind, payload = raw.recv_msg()
            kinds.append(kind)
            last = (kind, payload)
    except Exception:
        pass
    assert last is not None and last[0] == b"E", kinds[-3:]
    assert b"54000" in last[1]
    assert set(kinds[:-1]) == {b"A"}
    assert reader.execute("SELECT 1").fetchone() == (1,)
    assert "too many notifications" in d.log() or "notifications not read" in d.log()
    reader.close()


def test_statement_parsing_follows_postgresql_names():
    from pgdoorman.listen import parse, quote
    assert parse(b"LISTEN Foo") == ("LISTEN", b"foo", b"Foo")
    assert parse(b'listen "Foo""Bar" ;  ') == ("LISTEN", b'Foo"Bar', None)
    assert parse(b"UNLISTEN *") == ("UNLISTEN", None, None)
    assert parse(b"unlisten\tx_1$;") == ("UNLISTEN", b"x_1$", b"x_1$")
    # Not a lone statement of one name: left to the server.
    for q in (b"LISTEN *", b"LISTEN a; SELECT 1", b'LISTEN ""', b"LISTEN 1a", b"LISTENa",
              b"LISTEN a b", b"/* c */ LISTEN a", b"LISTEN U&\"a\""):
        assert parse(q) is None, q
    # Cut to 63 bytes, never inside a UTF-8 character.
    assert parse(b"LISTEN " + b"a" * 70)[1] == b"a" * 63
    name = ("é" * 40).encode()
    assert parse(b'LISTEN "' + name + b'"')[1] == ("é" * 31).encode()
    assert quote(b'a"b') == b'"a""b"'


def test_session_bytes_carry_channels_and_listen_statements():
    from pgdoorman.session import ClientSession
    s = ClientSession("db1", "alice", cancel_key=(1, 2))
    s.channels = [b"a", b"\xc3\xa9 \"x\""]
    s.listen_statements = {b"__asyncpg_stmt_1__": b'LISTEN "a"'}
    t = ClientSession.from_bytes(s.to_bytes())
    assert t.channels == s.channels and t.listen_statements == s.listen_statements
    # A session from a process without the fields reads as listening to nothing.
    v2 = b'{"version":2,"database":"d","user":"u","startup":{},"params":{},"cancel_key":[1,2]}'
    assert ClientSession.from_bytes(v2).channels == []


@pytest.mark.timeout(120)
def test_asyncpg_pool_release_resets_the_listeners(pg, pgdoorman, new_user):
    """
    asyncpg's pool resets a released connection with "...; UNLISTEN *; RESET ALL;": its
    subscriptions end with it, as on PostgreSQL, and the listener connection goes.
    """
    import asyncio

    import asyncpg
    user, pw = new_user()
    d = start(pgdoorman, pg, user, pw)

    async def run():
        pool = await asyncpg.create_pool(d.url(user, "db1", pw), min_size=1, max_size=1)
        got = []
        async with pool.acquire() as conn:
            await conn.add_listener("pooled", lambda c, pid, ch, p: got.append(p))
            with direct(pg, user) as dc:
                dc.execute("NOTIFY pooled, 'while acquired'")
            for _ in range(40):
                if got:
                    break
                await asyncio.sleep(0.05)
            assert got == ["while acquired"]
            assert len(listener_backends(pg, user)) == 1
        await asyncio.sleep(0.3)
        assert listener_backends(pg, user) == []
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT 7") == 7
        await pool.close()

    asyncio.run(run())
