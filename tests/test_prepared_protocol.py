"""
Prepared statements and the extended protocol in transaction mode, message by message.

Each scenario sends hand-made message sequences (Parse/Bind/Describe/Execute/Close/Flush/Sync,
errors in the middle of pipelines, SQL DEALLOCATE) and records every reply.  The same scenario
runs twice: against PostgreSQL directly, and through pgdoorman with pool_size 1 while a second
client on the same pool uses the same statement names for different queries, so that every
statement must be renamed, re-Parsed and kept apart on the one shared server connection.  The
two transcripts must be identical: the client sees exactly what PostgreSQL would send.
"""

import struct

import pytest

from conftest import same_replies_as_postgresql, RawClient, message, simple_config

pytestmark = pytest.mark.timeout(60)


def cstr(s):
    return s.encode() + b"\x00"


def parse(name, query, types=()):
    return message(b"P", cstr(name) + cstr(query) + struct.pack("!H", len(types))
                   + b"".join(struct.pack("!I", t) for t in types))


def bind(stmt, params=(), portal=""):
    body = cstr(portal) + cstr(stmt) + struct.pack("!H", 0) + struct.pack("!H", len(params))
    for p in params:
        if p is None:
            body += struct.pack("!i", -1)
        else:
            body += struct.pack("!i", len(p)) + p.encode()
    return message(b"B", body + struct.pack("!H", 0))


def execute(portal="", max_rows=0):
    return message(b"E", cstr(portal) + struct.pack("!I", max_rows))


def describe(kind, name):
    return message(b"D", kind + cstr(name))


def close(kind, name):
    return message(b"C", kind + cstr(name))


SYNC = message(b"S")
FLUSH = message(b"H")


def query(sql):
    return message(b"Q", cstr(sql))


def replies(c, ready=1, until=None):
    """
    Read replies until C{ready} ReadyForQuery messages (or, with C{until}, until a message
    of that kind) and return them in a comparable form: errors by severity, SQLSTATE and
    message only.
    """
    out = []
    while True:
        kind, payload = c.recv_msg()
        if kind in (b"E", b"N"):
            fields = {}
            for part in payload.split(b"\x00"):
                if part:
                    fields[chr(part[0])] = part[1:].decode()
            out.append((kind, fields.get("S"), fields.get("C"), fields.get("M")))
        elif kind == b"S":
            continue  # ParameterStatus may differ in timing; parameters have their own tests
        else:
            out.append((kind, payload))
        if until is not None and kind == until:
            return out
        if kind == b"Z":
            ready -= 1
            if ready == 0:
                return out


def scenario_named_roundtrip(a, b):
    t = []
    a.send(parse("s1", "SELECT $1::int + 1", [23]) + SYNC)
    t.append(replies(a))
    b.send(parse("s1", "SELECT 'b:' || $1::text") + SYNC)
    t.append(replies(b))
    for i in range(3):
        a.send(bind("s1", [str(i)]) + execute() + SYNC)
        t.append(replies(a))
        b.send(bind("s1", [str(i)]) + execute() + SYNC)
        t.append(replies(b))
    return t


def scenario_describe(a, b):
    t = []
    a.send(parse("d1", "SELECT $1::int AS x, 'y'::text AS y") + describe(b"S", "d1") + SYNC)
    t.append(replies(a))
    b.send(parse("d1", "SELECT 1 AS other") + SYNC)
    t.append(replies(b))
    a.send(describe(b"S", "d1") + bind("d1", ["5"], portal="p1") + describe(b"P", "p1")
           + execute("p1") + SYNC)
    t.append(replies(a))
    # the unnamed statement and portal
    a.send(parse("", "SELECT 42 AS answer") + describe(b"S", "") + bind("") + describe(b"P", "")
           + execute() + SYNC)
    t.append(replies(a))
    return t


def scenario_duplicate_name(a, b):
    t = []
    a.send(parse("dup", "SELECT 1") + SYNC)
    t.append(replies(a))
    # 42P05, and everything up to Sync is skipped (the Bind/Execute too)
    a.send(parse("dup", "SELECT 2") + bind("dup") + execute() + SYNC)
    t.append(replies(a))
    a.send(bind("dup") + execute() + SYNC)
    t.append(replies(a))
    return t


def scenario_error_mid_pipeline(a, b):
    t = []
    b.send(parse("e1", "SELECT 10 / $1::int") + parse("e2", "SELECT 'second'") + SYNC)
    t.append(replies(b))
    a.send(parse("e1", "SELECT 10 / $1::int") + bind("e1", ["2"]) + execute()
           + bind("e1", ["0"]) + execute()          # division by zero
           + parse("e2", "SELECT 'never'")          # skipped: e2 must not exist afterwards
           + bind("e1", ["5"]) + execute() + SYNC
           + bind("e1", ["5"]) + execute() + SYNC)  # after Sync all is well again
    t.append(replies(a, ready=2))
    a.send(bind("e2") + execute() + SYNC)           # 26000: e2 does not exist for a
    t.append(replies(a))
    a.send(parse("e2", "SELECT 'now'") + bind("e2") + execute() + SYNC)
    t.append(replies(a))
    return t


def scenario_flush_without_sync(a, b):
    t = []
    a.send(parse("f1", "SELECT $1::text AS v") + FLUSH)
    t.append(replies(a, until=b"1"))
    a.send(bind("f1", ["x"]) + FLUSH)
    t.append(replies(a, until=b"2"))
    a.send(execute() + FLUSH)
    t.append(replies(a, until=b"C"))
    a.send(SYNC)
    t.append(replies(a))
    b.send(parse("f1", "SELECT 'b'") + bind("f1") + execute() + SYNC)
    t.append(replies(b))
    a.send(bind("f1", ["again"]) + execute() + SYNC)
    t.append(replies(a))
    return t


def scenario_close_and_reuse(a, b):
    t = []
    a.send(parse("c1", "SELECT 'first'") + bind("c1") + execute() + SYNC)
    t.append(replies(a))
    b.send(parse("c1", "SELECT 'first'") + SYNC)    # same text: shares the server copy
    t.append(replies(b))
    a.send(close(b"S", "c1") + SYNC)
    t.append(replies(a))
    a.send(bind("c1") + execute() + SYNC)           # 26000 for a
    t.append(replies(a))
    b.send(bind("c1") + execute() + SYNC)           # b's copy is untouched
    t.append(replies(b))
    a.send(parse("c1", "SELECT 'second'") + bind("c1") + execute() + SYNC)
    t.append(replies(a))
    a.send(close(b"S", "never-prepared") + close(b"P", "") + SYNC)
    t.append(replies(a))
    return t


def scenario_sql_deallocate(a, b):
    t = []
    a.send(parse("Q1", "SELECT 1") + parse("q2", "SELECT 2") + parse("q3", "SELECT 3") + SYNC)
    t.append(replies(a))
    b.send(parse("q2", "SELECT 2") + SYNC)
    t.append(replies(b))
    a.send(query('DEALLOCATE "Q1"'))
    t.append(replies(a))
    a.send(query("deallocate q2"))
    t.append(replies(a))
    a.send(query("DEALLOCATE nosuch"))
    t.append(replies(a))
    a.send(bind("q2") + execute() + SYNC)           # gone for a
    t.append(replies(a))
    b.send(bind("q2") + execute() + SYNC)           # still there for b
    t.append(replies(b))
    a.send(query("DEALLOCATE ALL"))
    t.append(replies(a))
    a.send(bind("q3") + execute() + SYNC)
    t.append(replies(a))
    b.send(bind("q2") + execute() + SYNC)           # b's statement is re-Parsed on demand
    t.append(replies(b))
    return t


def scenario_transactions(a, b):
    t = []
    a.send(query("BEGIN"))
    t.append(replies(a))
    a.send(query("COMMIT"))
    t.append(replies(a))
    # (with pool_size 1, b can only run while a is outside a transaction)
    b.send(parse("t1", "SELECT 'b'") + bind("t1") + execute() + SYNC)
    t.append(replies(b))
    a.send(query("begin isolation level repeatable read"))
    t.append(replies(a))
    a.send(parse("t1", "SELECT current_setting('transaction_isolation')") + bind("t1")
           + execute() + SYNC)
    t.append(replies(a))
    a.send(bind("t1") + execute() + SYNC)
    t.append(replies(a))
    a.send(query("ROLLBACK"))
    t.append(replies(a))
    b.send(bind("t1") + execute() + SYNC)
    t.append(replies(b))
    a.send(query("START TRANSACTION READ ONLY"))
    t.append(replies(a))
    a.send(query("CREATE TEMP TABLE x (i int)"))
    t.append(replies(a))
    a.send(query("ROLLBACK"))
    t.append(replies(a))
    return t


def scenario_unnamed_across_sync(a, b):
    """pg8000 Parses the unnamed statement, Syncs, and Binds it in the next round."""
    t = []
    a.send(parse("", "SELECT $1::int + 1 AS a") + describe(b"S", "") + SYNC)
    t.append(replies(a))
    b.send(parse("", "SELECT $1::text || $2::text AS b") + describe(b"S", "") + SYNC)
    t.append(replies(b))
    a.send(bind("", ["41"]) + execute() + SYNC)
    t.append(replies(a))
    b.send(bind("", ["x", "y"]) + execute() + SYNC)
    t.append(replies(b))
    a.send(query("SELECT 'simple query in between'"))
    t.append(replies(a))
    b.send(bind("", ["again", "!"]) + execute() + SYNC)
    t.append(replies(b))
    return t


def scenario_prepare_only(a, b):
    """libpq's PQprepare: Parse + Sync, then the statement is used later."""
    t = []
    a.send(parse("p1", "SELECT $1::int * 3 AS tripled") + SYNC)
    t.append(replies(a))
    b.send(query("BEGIN"))
    t.append(replies(b))
    b.send(parse("p1", "SELECT $1::int * 3 AS tripled") + SYNC)  # known: no server needed
    t.append(replies(b))
    b.send(parse("p2", "SELECT 'two'") + SYNC)  # new text: a server parses it
    t.append(replies(b))
    b.send(bind("p1", ["14"]) + describe(b"P", "") + execute() + SYNC)
    t.append(replies(b))
    b.send(query("COMMIT"))
    t.append(replies(b))
    b.send(parse("p1", "SELECT 'dup'") + SYNC)  # 42P05 still comes, in order
    t.append(replies(b))
    a.send(bind("p1", ["2"]) + execute() + SYNC)
    t.append(replies(a))
    return t


SCENARIOS = [scenario_named_roundtrip, scenario_describe, scenario_duplicate_name,
             scenario_error_mid_pipeline, scenario_flush_without_sync, scenario_close_and_reuse,
             scenario_sql_deallocate, scenario_transactions, scenario_unnamed_across_sync,
             scenario_prepare_only]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__[9:])
def test_same_replies_as_postgresql(pg, new_user, pgdoorman, scenario):
    same_replies_as_postgresql(pg, new_user, pgdoorman, scenario)


def test_many_clients_share_statements(pg, new_user, pgdoorman):
    """30 clients, one server: each client's statement names mean its own queries."""
    user, password = new_user()
    d = pgdoorman(simple_config(pg, user, password, pool_size=2))
    clients = [RawClient(d.port).startup(user, "db1", password) for _ in range(30)]
    for i, c in enumerate(clients):
        c.send(parse("mine", "SELECT %d + $1::int" % i) + parse("shared", "SELECT 'same'") + SYNC)
    for c in clients:
        assert [m[0] for m in replies(c)] == [b"1", b"1", b"Z"]
    for rnd in range(3):
        for i, c in enumerate(clients):
            c.send(bind("mine", [str(rnd)]) + execute() + bind("shared") + execute() + SYNC)
        for i, c in enumerate(clients):
            rows = [m[1] for m in replies(c) if m[0] == b"D"]
            assert rows == [struct.pack("!Hi", 1, len(str(i + rnd))) + str(i + rnd).encode(),
                            struct.pack("!Hi", 1, 4) + b"same"]
    for c in clients:
        c.terminate()
    assert pg.count_backends(user) <= 2
