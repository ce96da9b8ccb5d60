"""
Hostile clients: what a misbehaving application, or a pod killed at a random moment, does to a
pooler.  Each attack is a function C{attack(ctx)} that logs in with a raw socket
(L{conftest.RawClient}), misbehaves in one particular way and goes away, within a few seconds.
None of them cares what it is answered: the point is what their neighbours on the same pool
see (tests/test_hostile.py runs them beside well-behaved clients).

Everything random comes from C{ctx.rng} (a C{random.Random}), so an attack is reproduced by its
kind and seed; timing between threads is of course not.

The frontend messages are built here from L{pgdoorman.protocol.messages}' framing, so that an
attack can also build them wrong on purpose (lengths, truncation, unknown codes).
"""

import os
import socket
import struct
import time

from conftest import ConnectionClosed, RawClient, ServerError, send_cancel
from pgdoorman.protocol.messages import cstring, message
from pgdoorman.prepared import server_name

#: Rows of the table the attacks lock and update (tests/test_hostile.py creates it).
TABLE = "hostile_rows"
ROWS = 50
#: Upper bound of one attack's run, socket waits included.
ATTACK_SECONDS = 3.0


# -- frontend messages ------------------------------------------------------------------------

def parse(name, sql, types=()):
    return message(b"P", cstring(name) + cstring(sql) + struct.pack("!H", len(types))
                   + b"".join(struct.pack("!I", t) for t in types))


def bind(stmt, params=(), portal="", result_formats=()):
    body = cstring(portal) + cstring(stmt) + struct.pack("!H", 0) + struct.pack("!H", len(params))
    for p in params:
        if p is None:
            body += struct.pack("!i", -1)
        else:
            p = p.encode() if isinstance(p, str) else p
            body += struct.pack("!i", len(p)) + p
    body += struct.pack("!H", len(result_formats)) + b"".join(
        struct.pack("!H", f) for f in result_formats)
    return message(b"B", body)


def execute(portal="", max_rows=0):
    return message(b"E", cstring(portal) + struct.pack("!I", max_rows))


def describe(kind, name):
    return message(b"D", kind + cstring(name))


def close(kind, name):
    return message(b"C", kind + cstring(name))


def query(sql):
    return message(b"Q", cstring(sql))


SYNC = message(b"S")
FLUSH = message(b"H")
TERMINATE = message(b"X")
COPY_DONE = message(b"c")


def copy_data(data):
    return message(b"d", data)


def copy_fail(text):
    return message(b"f", cstring(text))


def function_call(oid, args=()):
    body = struct.pack("!I", oid) + struct.pack("!H", 0) + struct.pack("!H", len(args))
    for a in args:
        body += struct.pack("!i", len(a)) + a
    return message(b"F", body + struct.pack("!H", 0))


def split_frontend(data):
    """Split frontend bytes (after startup) into whole messages."""
    out, pos = [], 0
    while pos + 5 <= len(data):
        length = struct.unpack("!I", data[pos + 1:pos + 5])[0]
        out.append(data[pos:pos + 1 + length])
        pos += 1 + length
    return out


#: The statements the canaries of tests/test_hostile.py prepare (psycopg sends these texts);
#: hostile sessions use the same texts, so that they share the server-side copies.
CANARY_SQL = [
    "SELECT $1::int + 1",
    "SELECT v FROM hostile_canary WHERE id = $1",
    "UPDATE hostile_canary SET v = v + 1 WHERE id = $1 RETURNING v",
]

#: A session shaped like psycopg 3's with prepare_threshold=0 in pipeline mode (built by
#: hand, not recorded): one Parse per new statement named _pg3_N with its parameter types,
#: Describe of it, Bind/Describe portal/Execute, a Sync at the pipeline's end, BEGIN/COMMIT
#: as simple queries, Close of an evicted statement.
PSYCOPG_SESSION = b"".join([
    parse("_pg3_0", "SELECT $1::int + 1", [20]), describe(b"S", "_pg3_0"),
    bind("_pg3_0", ["1"]), describe(b"P", ""), execute(),
    parse("_pg3_1", "SELECT v FROM hostile_canary WHERE id = $1", [20]),
    describe(b"S", "_pg3_1"), bind("_pg3_1", ["1"]), describe(b"P", ""), execute(),
    bind("_pg3_0", ["2"]), describe(b"P", ""), execute(),
    SYNC,
    query("BEGIN"),
    parse("_pg3_2", "UPDATE hostile_canary SET v = v + 1 WHERE id = $1 RETURNING v", [20]),
    describe(b"S", "_pg3_2"), bind("_pg3_2", ["3"]), describe(b"P", ""), execute(),
    SYNC,
    query("COMMIT"),
    bind("_pg3_1", ["4"]), describe(b"P", ""), execute(), SYNC,
    close(b"S", "_pg3_1"), SYNC,
    TERMINATE,
])


#: The sessions replay_mutated picks from: the hand-built one, and whatever
#: L{record_psycopg_session} recorded (tests/test_hostile.py records one per run).
SESSIONS = [PSYCOPG_SESSION]


def record_psycopg_session(host, port, user, password, dbname):
    """
    Run a real psycopg 3 session (prepare_threshold=0: a pipeline, a transaction, plain
    executes) through a relay to C{host}:C{port} and return the frontend bytes it sent
    after authentication: the session as psycopg really sends it, for replay_mutated.
    """
    import threading

    import psycopg

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    sent = []

    def relay():
        client, _ = listener.accept()
        server = socket.create_connection((host, port))

        def pump(src, dst, record):
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    if record:
                        sent.append(data)
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        back = threading.Thread(target=pump, args=(server, client, False), daemon=True)
        back.start()
        pump(client, server, True)
        back.join(5)
        client.close()
        server.close()

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    dsn = "host=127.0.0.1 port=%d user=%s password=%s dbname=%s sslmode=disable" % (
        listener.getsockname()[1], user, password, dbname)
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
        with conn.pipeline():
            conn.execute("SELECT %s::int + 1", [1])
            conn.execute("SELECT v FROM hostile_canary WHERE id = %s", [1])
            conn.execute("SELECT %s::int + 1", [2])
        with conn.transaction():
            conn.execute("UPDATE hostile_canary SET v = v + 1 WHERE id = %s RETURNING v", [3])
        conn.execute("SELECT v FROM hostile_canary WHERE id = %s", [4]).fetchone()
    t.join(10)
    listener.close()
    data = b"".join(sent)
    # The StartupMessage (no type byte), then password messages: keep what follows.
    (length,) = struct.unpack("!I", data[:4])
    msgs = [m for m in split_frontend(data[length:]) if m[:1] != b"p"]
    return b"".join(msgs)


# -- the context of one attack ------------------------------------------------------------------

class Target:
    """Where the attacks go: pgdoorman's port and a pool's user, password and database."""

    def __init__(self, port, user, password, db):
        self.port, self.user, self.password, self.db = port, user, password, db


class Context:
    """One attack's random source, target and deadline, and the sockets it opened."""

    def __init__(self, rng, target, seconds=ATTACK_SECONDS):
        self.rng = rng
        self.target = target
        self.deadline = time.monotonic() + seconds
        self.clients = []

    def left(self):
        return max(0.05, self.deadline - time.monotonic())

    def connect(self, timeout=2.0):
        c = RawClient(self.target.port, timeout=min(timeout, self.left()))
        self.clients.append(c)
        c.startup(self.target.user, self.target.db, self.target.password)
        c.sock.settimeout(min(timeout, self.left()))
        return c

    def raw_socket(self):
        s = socket.create_connection(("127.0.0.1", self.target.port), timeout=self.left())
        self.clients.append(s)
        return s

    def drain(self, c, seconds=None, until_ready=None):
        """Read and discard replies for up to C{seconds} (or until C{until_ready}
        ReadyForQuery messages); returns the message kinds seen."""
        seconds = self.left() if seconds is None else min(seconds, self.left())
        end = time.monotonic() + seconds
        kinds = []
        try:
            while time.monotonic() < end:
                c.sock.settimeout(max(0.01, end - time.monotonic()))
                kind, _ = c.recv_msg()
                kinds.append(kind)
                if kind == b"Z" and until_ready is not None:
                    until_ready -= 1
                    if until_ready <= 0:
                        break
        except (socket.timeout, ConnectionClosed, OSError):
            pass
        return kinds

    def sleep(self, seconds):
        time.sleep(min(seconds, self.left()))

    def leave(self, c):
        """Go away the way a dying process or a careless one does, picked at random."""
        how = self.rng.choice(["close", "close", "reset", "terminate", "half_close"])
        sock = c.sock if isinstance(c, RawClient) else c
        try:
            if how == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif how == "terminate":
                sock.sendall(TERMINATE)
            elif how == "half_close":
                sock.shutdown(socket.SHUT_WR)
                time.sleep(min(0.1, self.left()))
        except OSError:
            pass
        sock.close()

    def close_all(self):
        for c in self.clients:
            try:
                (c.sock if isinstance(c, RawClient) else c).close()
            except OSError:
                pass


def _name(rng):
    """A statement name as drivers spell them (psycopg, asyncpg, pgjdbc, pgx, ours)."""
    return rng.choice(["_pg3_%d" % rng.randint(0, 5), "__asyncpg_stmt_%d__" % rng.randint(1, 5),
                       "S_%d" % rng.randint(1, 5), "stmtcache_%d" % rng.randint(1, 5),
                       "DOORMAN_%016x" % rng.getrandbits(64), "s%d" % rng.randint(0, 3)])


def _sql(rng):
    return rng.choice(CANARY_SQL + ["SELECT 1", "SELECT $1::text", "SELECT pg_sleep(0.05)",
                                    "SELECT * FROM generate_series(1, 100)"])


def _params_for(sql, rng):
    return [str(rng.randint(1, ROWS))] if "$1" in sql else []


# -- the attacks ------------------------------------------------------------------------------

def mid_transaction(ctx):
    """BEGIN, UPDATE taking a row lock, then die (maybe with a query still running)."""
    c = ctx.connect()
    rng = ctx.rng
    row = rng.randint(1, ROWS)
    if rng.random() < 0.5:
        c.query("BEGIN")
        c.query("UPDATE %s SET v = v + 1 WHERE id = %d" % (TABLE, row))
    else:
        c.send(parse("", "BEGIN") + bind("") + execute() + SYNC)
        ctx.drain(c, until_ready=1)
        c.send(parse("", "UPDATE %s SET v = v + 1 WHERE id = $1" % TABLE) + bind("", [str(row)])
               + execute() + SYNC)
        ctx.drain(c, until_ready=1)
    what = rng.choice(["nothing", "sleep", "pending", "pipeline", "error"])
    if what == "sleep":
        ctx.sleep(rng.uniform(0, 0.5))
    elif what == "pending":
        c.send(query("SELECT pg_sleep(%.2f)" % rng.uniform(0.05, 0.5)))
        ctx.sleep(rng.uniform(0, 0.2))
    elif what == "pipeline":
        c.send(parse("", "SELECT v FROM %s WHERE id = $1 FOR UPDATE" % TABLE) + bind("", ["1"])
               + execute())
    elif what == "error":
        try:
            c.query("SELECT 1/0")
        except ServerError:
            pass
    ctx.leave(c)


def mid_pipeline(ctx):
    """Parse/Bind/Execute without Sync (maybe with a Flush and reading some replies), die."""
    c = ctx.connect()
    rng = ctx.rng
    out = b""
    for _ in range(rng.randint(1, 4)):
        name = _name(rng) if rng.random() < 0.7 else ""
        sql = _sql(rng)
        out += parse(name, sql) + bind(name, _params_for(sql, rng)) + execute()
        if rng.random() < 0.3:
            out += SYNC
    if rng.random() < 0.5:
        out += FLUSH
    c.send(out)
    if rng.random() < 0.5:
        ctx.drain(c, rng.uniform(0, 0.3))
    ctx.leave(c)


def mid_result(ctx):
    """A big SELECT, gone while the rows stream (simple or extended protocol)."""
    c = ctx.connect()
    rng = ctx.rng
    sql = "SELECT i, repeat('x', 200) FROM generate_series(1, 300000) i"
    if rng.random() < 0.5:
        c.send(query(sql))
    else:
        c.send(parse("", sql) + bind("") + execute() + SYNC)
    got = 0
    want = rng.randint(0, 200000)
    try:
        while got < want:
            chunk = c.sock.recv(65536)
            if not chunk:
                break
            got += len(chunk)
    except OSError:
        pass
    ctx.leave(c)


def copy_from_abandoned(ctx):
    """COPY FROM STDIN, some rows (maybe a CopyFail, or another message), then die."""
    c = ctx.connect()
    rng = ctx.rng
    if rng.random() < 0.7:
        c.send(query("COPY hostile_sink (v) FROM STDIN"))
    else:
        c.send(parse("", "COPY hostile_sink (v) FROM STDIN") + bind("") + execute() + SYNC)
    ctx.drain(c, 0.2)
    c.send(b"".join(copy_data(b"%d\n" % rng.randint(0, 10 ** 6))
                    for _ in range(rng.randint(0, 50))))
    end = rng.choice(["die", "die", "fail", "query", "sync", "bad_row"])
    if end == "fail":
        c.send(copy_fail("hostile gives up"))
    elif end == "query":
        c.send(query("SELECT 1"))
    elif end == "sync":
        c.send(SYNC + FLUSH)
    elif end == "bad_row":
        c.send(copy_data(b"not a number\n") + COPY_DONE)
    if end != "die":
        ctx.drain(c, rng.uniform(0, 0.3))
    ctx.leave(c)


def copy_to_abandoned(ctx):
    """COPY TO STDOUT of many rows, gone in the middle."""
    c = ctx.connect()
    rng = ctx.rng
    c.send(query("COPY (SELECT i, repeat('y', 100) FROM generate_series(1, 200000) i) TO STDOUT"))
    ctx.drain(c, rng.uniform(0, 0.3))
    ctx.leave(c)


def unknown_message(ctx):
    """A message type PostgreSQL does not know, alone or in the middle of a pipeline."""
    c = ctx.connect()
    rng = ctx.rng
    code = bytes([rng.choice([0, 1, ord("Z"), ord("y"), ord("T"), ord("1"), 0x7F, 0xFF,
                              rng.randint(0, 255)])])
    bogus = message(code, os.urandom(rng.randint(0, 20)))
    if rng.random() < 0.5:
        c.send(bogus)
    else:
        c.send(parse("", "SELECT 1") + bind("") + bogus + execute() + SYNC)
    ctx.drain(c, 0.5)
    ctx.leave(c)


def malformed(ctx):
    """Lengths below 4 or huge, messages cut short, names without their NUL, then die."""
    c = ctx.connect()
    rng = ctx.rng
    kind = rng.choice(["short_len", "huge_len", "truncated", "no_nul", "bind_short",
                       "header_only", "lying_len"])
    if kind == "short_len":
        data = rng.choice([b"Q", b"P", b"S", b"B"]) + struct.pack("!I", rng.randint(0, 3))
    elif kind == "huge_len":
        data = b"Q" + struct.pack("!I", rng.choice([0x3FFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
    elif kind == "truncated":
        whole = parse(_name(rng), _sql(rng)) + bind("") + execute() + SYNC
        data = whole[:rng.randint(1, len(whole) - 1)]
    elif kind == "no_nul":
        body = b"name-without-nul" + b"SELECT 1"
        data = b"P" + struct.pack("!I", len(body) + 4) + body + SYNC
    elif kind == "bind_short":
        data = message(b"B", b"\x00" + cstring(_name(rng)) + b"\x00\x05") + SYNC
    elif kind == "header_only":
        data = b"P\x00\x00"
    else:
        # A length that swallows the Sync after it: the server waits for more.
        body = cstring("") + cstring("SELECT 1") + b"\x00\x00"
        data = b"P" + struct.pack("!I", len(body) + 4 + 5) + body + SYNC
    c.send(data)
    ctx.drain(c, rng.uniform(0, 0.5))
    ctx.leave(c)


def never_parsed(ctx):
    """Bind, Describe, Execute and Close of statements and portals never Parsed."""
    c = ctx.connect()
    rng = ctx.rng
    out = b""
    for _ in range(rng.randint(1, 5)):
        name = _name(rng)
        out += rng.choice([bind(name, ["1"]), describe(b"S", name), describe(b"P", name),
                           execute(name), close(b"S", name), close(b"P", name),
                           bind("", []) + execute()])
        if rng.random() < 0.5:
            out += SYNC
    out += SYNC
    c.send(out)
    ctx.drain(c, 0.5)
    if rng.random() < 0.5:
        c.query("SELECT 1")
    ctx.leave(c)


def duplicate_parse(ctx):
    """Parse the same name twice (in one pipeline, or across Syncs), and use it."""
    c = ctx.connect()
    rng = ctx.rng
    name = _name(rng)
    a, b = _sql(rng), _sql(rng)
    if rng.random() < 0.5:
        c.send(parse(name, a) + parse(name, b) + bind(name, _params_for(b, rng)) + execute()
               + SYNC)
    else:
        c.send(parse(name, a) + SYNC)
        ctx.drain(c, until_ready=1)
        c.send(parse(name, b) + bind(name, _params_for(a, rng)) + execute() + SYNC)
    ctx.drain(c, until_ready=1)
    c.send(bind(name, _params_for(a, rng)) + execute() + SYNC)
    ctx.drain(c, until_ready=1)
    ctx.leave(c)


def error_mid_pipeline(ctx):
    """A failing Parse or Execute in a pipeline, then more Parses, Queries before the Sync."""
    c = ctx.connect()
    rng = ctx.rng
    bad = rng.choice([parse("", "SELEC 1"), parse(_name(rng), "SELECT * FROM no_such_table"),
                      parse("", "SELECT 1/0") + bind("") + execute(),
                      parse("", "SELECT $1::int") + bind("", ["x"])])
    out = b""
    for _ in range(rng.randint(0, 2)):
        sql = _sql(rng)
        out += parse(_name(rng), sql) + bind("", []) + execute()
    out += bad
    for _ in range(rng.randint(1, 4)):
        sql = _sql(rng)
        name = _name(rng)
        out += rng.choice([parse(name, sql), parse(name, sql) + bind(name, _params_for(sql, rng))
                           + execute(), query("SELECT 1"), query("SELECT 2; SELECT 3"),
                           describe(b"S", name), close(b"S", name), FLUSH])
    if rng.random() < 0.8:
        out += SYNC
    c.send(out)
    ctx.drain(c, rng.uniform(0.1, 0.6))
    if rng.random() < 0.5:
        try:
            c.query("SELECT 1")
        except ServerError:
            pass
    ctx.leave(c)


def query_in_error_state(ctx):
    """After an error in the extended protocol, Query messages before the Sync."""
    c = ctx.connect()
    rng = ctx.rng
    c.send(parse("", "SELECT 1/0") + bind("") + execute() + FLUSH)
    ctx.drain(c, 0.2)
    for _ in range(rng.randint(1, 3)):
        c.send(query(rng.choice(["SELECT 1", "BEGIN", "COMMIT", "DEALLOCATE ALL"])))
    if rng.random() < 0.7:
        c.send(SYNC)
    ctx.drain(c, rng.uniform(0.1, 0.5))
    ctx.leave(c)


def flush_only(ctx):
    """Pipelines that end in Flush and never Sync, read or not, then idle or die."""
    c = ctx.connect()
    rng = ctx.rng
    for _ in range(rng.randint(1, 4)):
        name = _name(rng) if rng.random() < 0.5 else ""
        sql = _sql(rng)
        c.send(parse(name, sql) + describe(b"S", name) + bind(name, _params_for(sql, rng))
               + execute() + FLUSH)
        if rng.random() < 0.7:
            ctx.drain(c, 0.2)
    ctx.sleep(rng.uniform(0, 0.5))
    ctx.leave(c)


def sync_storm(ctx):
    """Hundreds of Syncs (and Flushes) in one write, with or without reading the replies."""
    c = ctx.connect()
    rng = ctx.rng
    n = rng.randint(10, 2000)
    c.send(b"".join(rng.choice([SYNC, SYNC, FLUSH]) for _ in range(n)))
    if rng.random() < 0.5:
        ctx.drain(c, 0.5)
    ctx.leave(c)


def replay_mutated(ctx):
    """A real psycopg pipeline session's bytes, with random mutations, cut at a random point."""
    c = ctx.connect()
    rng = ctx.rng
    msgs = split_frontend(rng.choice(SESSIONS))
    for _ in range(rng.randint(0, 4)):
        i = rng.randrange(len(msgs))
        op = rng.choice(["flip", "drop", "dup", "swap", "truncate"])
        m = msgs[i]
        if op == "flip" and len(m) > 5:
            b = bytearray(m)
            b[rng.randrange(5, len(b))] = rng.randint(0, 255)
            msgs[i] = bytes(b)
        elif op == "drop":
            del msgs[i]
        elif op == "dup":
            msgs.insert(i, m)
        elif op == "swap" and i + 1 < len(msgs):
            msgs[i], msgs[i + 1] = msgs[i + 1], msgs[i]
        elif op == "truncate":
            msgs[i] = m[:rng.randint(5, len(m))] if len(m) > 5 else m
        if not msgs:
            break
    data = b"".join(msgs)
    if rng.random() < 0.5:
        data = data[:rng.randint(0, len(data))]
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 400)
        c.send(data[pos:pos + step])
        pos += step
        if rng.random() < 0.3:
            ctx.drain(c, 0.05)
    ctx.drain(c, rng.uniform(0, 0.4))
    ctx.leave(c)


def sql_prepared(ctx):
    """SQL PREPARE/EXECUTE/DEALLOCATE [ALL]/DISCARD ALL, plain, in multi-statement queries,
    in transactions and through the extended protocol."""
    c = ctx.connect()
    rng = ctx.rng
    name = rng.choice(["p1", "_pg3_0", "__asyncpg_stmt_1__", "s1"])
    steps = [
        "PREPARE %s AS SELECT 1" % name,
        "EXECUTE %s" % name,
        "DEALLOCATE %s" % name,
        "DEALLOCATE ALL",
        "DISCARD ALL",
        "DEALLOCATE PREPARE ALL",
        "BEGIN; DEALLOCATE ALL; COMMIT",
        "SELECT 1; DEALLOCATE ALL",
        "DISCARD PLANS",
        "RESET ALL",
    ]
    for _ in range(rng.randint(1, 4)):
        sql = rng.choice(steps)
        try:
            if rng.random() < 0.7:
                c.query(sql)
            else:
                c.send(parse("", sql) + bind("") + execute() + SYNC)
                ctx.drain(c, until_ready=1)
        except ServerError:
            pass
    # And use a statement afterwards, as a client that was not warned would.
    name = "_pg3_0"
    c.send(parse(name, CANARY_SQL[0]) + bind(name, ["1"]) + execute() + SYNC)
    ctx.drain(c, until_ready=1)
    ctx.leave(c)


def sql_prepared_sneaky(ctx):
    """Statements dropped behind the pooler's back: DEALLOCATE ALL/DISCARD ALL where only
    PostgreSQL sees them (inside a multi-statement Query, through the extended protocol)."""
    c = ctx.connect()
    rng = ctx.rng
    sql = rng.choice(["SELECT 1; DEALLOCATE ALL", "DEALLOCATE ALL; SELECT 1",
                      "/* hi */ DEALLOCATE ALL", "DISCARD ALL; SELECT 1"])
    if rng.random() < 0.5:
        try:
            c.query(sql)
        except ServerError:
            pass
    else:
        c.send(parse("", sql.split(";")[-1] if "DEALLOCATE" not in sql.split(";")[-1]
                     else "DEALLOCATE ALL") + bind("") + execute() + SYNC)
        ctx.drain(c, until_ready=1)
    ctx.leave(c)


def prefix_collision(ctx):
    """SQL PREPARE under the pooler's own server-side name of a statement the canaries use:
    only a client that knows pgdoorman's naming does this (not in the default mix)."""
    c = ctx.connect()
    rng = ctx.rng
    sql = rng.choice(CANARY_SQL)
    body = sql.encode() + b"\x00" + struct.pack("!H", 1) + struct.pack("!I", 20)
    name = server_name(body).decode()
    # The same text, or another under that name (a canary using it would get the wrong rows).
    text = sql if rng.random() < 0.5 else "SELECT $1::int8 * 0 - 999"
    try:
        c.query('PREPARE "%s" (int8) AS %s' % (name, text))
    except ServerError:
        pass
    ctx.leave(c)


def sql_prepared_guessing(ctx):
    """SQL EXECUTE, EXPLAIN EXECUTE and DEALLOCATE of the pooler's own server-side names (of
    the canaries' statements), as simple queries and as the text of a statement Parsed by
    the protocol (named or unnamed), and SQL PREPARE/DEALLOCATE as Parse texts: none of it
    may run or drop a statement the client did not prepare."""
    c = ctx.connect()
    rng = ctx.rng
    sql = rng.choice(CANARY_SQL)
    body = sql.encode() + b"\x00" + struct.pack("!H", 1) + struct.pack("!I", 20)
    name = server_name(body).decode()
    row = rng.randint(1, 1000)
    steps = ['EXECUTE "%s"(%d)' % (name, row), 'EXPLAIN ANALYZE EXECUTE "%s"(%d)' % (name, row),
             'DEALLOCATE "%s"' % name, 'DEALLOCATE PREPARE "%s"' % name,
             'PREPARE "%s" (int8) AS SELECT $1 * 0 - 999' % name,
             "PREPARE mine (int8) AS SELECT $1 * 0 - 999", "EXECUTE mine(1)",
             "DEALLOCATE mine", "DEALLOCATE ALL", "DISCARD ALL",
             'EXECUTE "%s"(%d); SELECT 1' % (name, row)]
    for _ in range(rng.randint(1, 6)):
        text = rng.choice(steps)
        try:
            if rng.random() < 0.5 or ";" in text:
                c.query(text)
            else:
                stmt = rng.choice(["", "_pg3_0", "s1"])
                c.send(parse(stmt, text) + bind(stmt) + execute() + SYNC)
                ctx.drain(c, until_ready=1)
        except ServerError:
            pass
    ctx.leave(c)


def cancel_random(ctx):
    """CancelRequests with random keys, and with our own key at a random moment."""
    rng = ctx.rng
    for _ in range(rng.randint(1, 3)):
        try:
            send_cancel(ctx.target.port, rng.getrandbits(31), rng.getrandbits(32))
        except OSError:
            pass
    if rng.random() < 0.5:
        c = ctx.connect()
        c.send(query("SELECT pg_sleep(%.2f)" % rng.uniform(0.05, 0.5)))
        ctx.sleep(rng.uniform(0, 0.4))
        if c.backend_key:
            try:
                send_cancel(ctx.target.port, *c.backend_key)
            except OSError:
                pass
        ctx.drain(c, 0.3)
        ctx.leave(c)


def slow_reader(ctx):
    """A big result read a kilobyte at a time, then gone."""
    s = None
    c = RawClient.__new__(RawClient)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(ctx.left())
    ctx.clients.append(s)
    s.connect(("127.0.0.1", ctx.target.port))
    c.sock, c._buf, c.parameters, c.backend_key = s, b"", {}, None
    c.auth_requests, c.notices = [], []
    c.startup(ctx.target.user, ctx.target.db, ctx.target.password)
    rng = ctx.rng
    c.send(query("SELECT i, repeat('z', 500) FROM generate_series(1, 100000) i"))
    end = time.monotonic() + rng.uniform(0.2, 1.5)
    try:
        while time.monotonic() < end:
            s.settimeout(0.2)
            if not s.recv(1024):
                break
            time.sleep(0.02)
    except OSError:
        pass
    ctx.leave(s)


def startup_then_die(ctx):
    """Die during login: after the StartupMessage, or with a query pipelined behind it."""
    rng = ctx.rng
    s = ctx.raw_socket()
    from conftest import startup_packet
    pkt = startup_packet({"user": ctx.target.user, "database": ctx.target.db})
    tail = rng.choice([b"", query("SELECT 1"), parse("_pg3_0", "SELECT 1") + SYNC])
    data = pkt + tail
    s.sendall(data[:rng.randint(1, len(data))])
    if rng.random() < 0.5:
        try:
            s.settimeout(0.2)
            s.recv(1024)
        except OSError:
            pass
    ctx.leave(s)


def function_call_abuse(ctx):
    """FunctionCall messages (legal, rare) with wrong arguments, mid-pipeline."""
    c = ctx.connect()
    rng = ctx.rng
    out = function_call(rng.choice([1, 1242, 2147483647]), [os.urandom(rng.randint(0, 8))])
    if rng.random() < 0.5:
        out = parse("", "SELECT 1") + bind("") + out + execute() + SYNC
    c.send(out)
    ctx.drain(c, 0.5)
    ctx.leave(c)


def well_formed_then_die(ctx):
    """A correct named-statement session (like a canary's), killed at a random byte."""
    c = ctx.connect()
    rng = ctx.rng
    data = b"".join(m for m in split_frontend(rng.choice(SESSIONS)) if m != TERMINATE)
    cut = rng.randint(0, len(data))
    c.send(data[:cut])
    ctx.drain(c, rng.uniform(0, 0.3))
    ctx.leave(c)


#: The default mix, by name.
ATTACKS = {f.__name__: f for f in [
    mid_transaction, mid_pipeline, mid_result, copy_from_abandoned, copy_to_abandoned,
    unknown_message, malformed, never_parsed, duplicate_parse, error_mid_pipeline,
    query_in_error_state, flush_only, sync_storm, replay_mutated, sql_prepared,
    sql_prepared_sneaky, cancel_random, slow_reader, startup_then_die, function_call_abuse,
    well_formed_then_die, prefix_collision, sql_prepared_guessing,
]}
#: Attacks run only when named in PGDOORMAN_HOSTILE_KINDS.
EXTRA_ATTACKS = {}

#: What an attack may run into without that being the harness's fault.
EXPECTED = (OSError, ConnectionClosed, ServerError, socket.timeout)


def run_one(name, seed, target, seconds=ATTACK_SECONDS):
    """Run attack C{name} with C{seed}; returns None, or the unexpected exception."""
    import random
    fn = ATTACKS.get(name) or EXTRA_ATTACKS[name]
    ctx = Context(random.Random(seed), target, seconds)
    try:
        fn(ctx)
    except EXPECTED:
        pass
    except AssertionError as e:
        # RawClient asserts on replies it does not expect; a hostile client expects nothing.
        return None if "unexpected" in str(e) or "expected" in str(e) else e
    finally:
        ctx.close_all()
    return None
