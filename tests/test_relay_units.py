"""
The relay's framing, without sockets: a client and a server connection wired to in-memory
transports, fed bytes in every possible split.  Whatever the chunking, the client must get the
server's bytes unchanged, the server must go back to the pool exactly once (at the
ReadyForQuery that ends the transaction, never in the middle of a reply), and PostgreSQL must
get the client's bytes unchanged.
"""

import pytest
from twisted.internet import defer

from pgdoorman import config as _config
from pgdoorman.client import ClientConnection
from pgdoorman.pool import PoolService
from pgdoorman.protocol import messages as M
from pgdoorman.server import ServerConnection


class Transport:
    """Records writes; the rest of the transport interface as the relay uses it."""

    producer = None
    disconnecting = False

    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(data)

    def loseConnection(self):
        self.disconnecting = True

    def unregisterProducer(self):
        self.producer = None

    def value(self):
        return b"".join(self.written)


def wire(mode="transaction"):
    cfg = _config.loads("""
general: {admin_password: x, log_client_connections: false, log_client_disconnections: false}
pools:
  db: {pool_mode: %s, users: [{username: u, password: p, pool_size: 1}]}
""" % mode)
    service = PoolService(cfg)
    pool = service.get_pool("db", "u")
    server = ServerConnection(pool, pool.settings, defer.Deferred())
    server.transport = Transport()
    server.send = server.transport.write
    server.connected_ok = True
    server.params = {"client_encoding": "UTF8", "TimeZone": "GMT"}
    server.dataReceived = server._relayData
    pool.servers.add(server)
    pool.idle.append(server)
    pool.server_params = {"client_encoding": "UTF8"}
    pool.default_params = dict(server.params)
    client = ClientConnection(service)
    client.transport = Transport()
    client.send = client.transport.write
    client.pool = pool
    client.params = dict(server.params)
    client._joinPool(pool, None)
    client.enter(client.relay)
    return pool, client, server


QUERY = M.query("SELECT 1")
REPLY = (M.message(b"T", b"\x00\x01x\x00" + b"\x00" * 18)
         + M.message(b"D", b"\x00\x01\x00\x00\x00\x011")
         + M.message(b"N", b"SNOTICE\x00C00000\x00Mhello\x00\x00")
         + M.parameter_status("TimeZone", "UTC")
         + M.command_complete("SELECT 1") + M.ready_for_query(b"I"))


def chunks(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, 1000])
def test_reply_in_any_chunks_reaches_the_client_whole_and_releases_once(size):
    pool, client, server = wire()
    released = []
    orig = pool.checkin
    pool.checkin = lambda s: (released.append(s), orig(s))
    for piece in chunks(QUERY, size):
        client.dataReceived(piece)
    assert server.transport.value() == QUERY
    assert client.server is server
    for i, piece in enumerate(chunks(REPLY, size)):
        assert not released, "released before the reply's ReadyForQuery (chunk %d)" % i
        server.dataReceived(piece)
    assert client.transport.value() == REPLY
    assert released == [server]
    assert client.server is None and list(pool.idle) == [server]
    assert client.params["TimeZone"] == "UTC"


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_pipelined_queries_release_after_the_last_reply(size):
    pool, client, server = wire()
    released = []
    orig = pool.checkin
    pool.checkin = lambda s: (released.append(s), orig(s))
    for piece in chunks(QUERY * 3, size):
        client.dataReceived(piece)
    assert server.link.pending == 3
    for n in range(3):
        for piece in chunks(REPLY, size):
            server.dataReceived(piece)
        assert released == ([] if n < 2 else [server])
    assert client.transport.value() == REPLY * 3


def test_flush_without_sync_keeps_the_server():
    pool, client, server = wire()
    parse = M.message(b"P", b"s\x00SELECT 1\x00\x00\x00")
    client.dataReceived(parse + M.message(b"H"))
    server.dataReceived(b"1\x00\x00\x00\x04")
    assert client.server is server  # mid-pipeline: no ReadyForQuery yet
    client.dataReceived(M.SYNC_MESSAGE)
    server.dataReceived(M.ready_for_query(b"I"))
    assert client.server is None


def test_session_mode_keeps_the_server():
    pool, client, server = wire("session")
    client.dataReceived(QUERY)
    server.dataReceived(REPLY)
    assert client.server is server and not pool.idle


def test_in_transaction_keeps_the_server():
    pool, client, server = wire()
    client.dataReceived(M.query("INSERT INTO t VALUES (1)"))
    server.dataReceived(M.command_complete("INSERT 0 1") + M.ready_for_query(b"T"))
    assert client.server is server
    client.dataReceived(M.query("COMMIT"))
    server.dataReceived(M.command_complete("COMMIT") + M.ready_for_query(b"I"))
    assert client.server is None


# -- invariants of the link (issue 13) ---------------------------------------------------------

def bind(stmt_name, portal=b""):
    return M.message(b"B", portal + b"\x00" + stmt_name + b"\x00\x00\x00\x00\x00\x00\x00")


EXECUTE = M.message(b"E", b"\x00\x00\x00\x00\x00")
SYNTAX_ERROR = M.error_response("ERROR", "42601", 'syntax error at or near "DOORMAN_ERROR"')


def test_a_statement_the_client_never_prepared_gets_26000_and_its_name_never_reaches_a_server():
    pool, client, server = wire()
    client.dataReceived(bind(b"_pg3_0") + EXECUTE + M.SYNC_MESSAGE)
    sent = server.transport.value()
    assert b"_pg3_0" not in sent
    server.dataReceived(SYNTAX_ERROR + M.ready_for_query(b"I"))
    reply = client.transport.value()
    assert b"26000" in reply and b'prepared statement "_pg3_0" does not exist' in reply
    assert b"DOORMAN" not in reply
    assert list(pool.idle) == [server] and server.link.settled()


def test_describe_and_close_of_unknown_names_stay_with_pgdoorman():
    pool, client, server = wire()
    client.dataReceived(M.message(b"C", b"Sghost\x00") + M.message(b"D", b"Sghost\x00")
                        + M.SYNC_MESSAGE)
    assert b"ghost" not in server.transport.value()
    # CloseComplete for the Close of nothing, then the failing Parse's error, then Z.
    server.dataReceived(b"3\x00\x00\x00\x04" + SYNTAX_ERROR + M.ready_for_query(b"I"))
    reply = client.transport.value()
    assert reply.startswith(b"3\x00\x00\x00\x04")
    assert b'prepared statement "ghost" does not exist' in reply
    assert server.link.settled()


def test_a_bind_of_the_unnamed_statement_never_uses_another_clients():
    pool, client, server = wire()
    server.link.unnamed = b"SELECT secret\x00\x00\x00"  # someone else's, left on the server
    client.dataReceived(bind(b"") + EXECUTE + M.SYNC_MESSAGE)
    assert server.transport.value().startswith(b"P")  # the failing Parse, not the Bind
    server.dataReceived(SYNTAX_ERROR + M.ready_for_query(b"I"))
    assert b"unnamed prepared statement does not exist" in client.transport.value()


def test_a_commit_after_a_failed_cursor_fetch_is_skipped_until_sync():
    """asyncpg: Bind/Execute/Flush, then a simple COMMIT; the Execute fails."""
    pool, client, server = wire()
    client.dataReceived(M.query("BEGIN; DECLARE c CURSOR FOR SELECT 1"))
    server.dataReceived(M.command_complete("BEGIN") + M.command_complete("DECLARE CURSOR")
                        + M.ready_for_query(b"T"))
    client.dataReceived(bind(b"") + EXECUTE + M.message(b"H"))
    client.dataReceived(M.query("COMMIT"))
    sent = server.transport.value()
    assert sent.endswith(b"C\x00\x00\x00\x12SDOORMAN_NONE\x00" + M.query("COMMIT"))
    # The Bind fails (no unnamed statement: ours); PostgreSQL skips the probe and COMMIT.
    server.dataReceived(SYNTAX_ERROR)
    assert client.server is server and server.link.pending == 0 and server.link.dirty
    client.dataReceived(M.SYNC_MESSAGE)
    server.dataReceived(M.ready_for_query(b"E"))
    assert client.server is server  # still in the failed transaction
    client.dataReceived(M.query("ROLLBACK"))
    server.dataReceived(M.command_complete("ROLLBACK") + M.ready_for_query(b"I"))
    assert client.server is None and list(pool.idle) == [server]


def test_a_commit_after_a_good_fetch_runs_and_releases():
    pool, client, server = wire()
    client.dataReceived(M.query("BEGIN; DECLARE c CURSOR FOR SELECT 1"))
    server.dataReceived(M.command_complete("BEGIN") + M.command_complete("DECLARE CURSOR")
                        + M.ready_for_query(b"T"))
    client.dataReceived(M.message(b"P", b"\x00SELECT 1\x00\x00\x00") + bind(b"") + EXECUTE
                        + M.message(b"H") + M.query("COMMIT"))
    # (The unnamed statement goes as a named one of the pooler's, Closed first.)
    assert b"\x00DOORMAN_" in server.transport.value()
    server.dataReceived(b"3\x00\x00\x00\x04" + b"1\x00\x00\x00\x04" + b"2\x00\x00\x00\x04"
                        + M.command_complete("SELECT 1") + b"3\x00\x00\x00\x04"
                        + M.command_complete("COMMIT") + M.ready_for_query(b"I"))
    reply = client.transport.value()
    assert b"3\x00\x00\x00\x04" not in reply  # the CloseCompletes are ours
    assert b"1\x00\x00\x00\x04" in reply
    assert client.server is None and server.link.settled() and list(pool.idle) == [server]


def test_a_client_gone_mid_pipeline_takes_its_server_with_it():
    pool, client, server = wire()
    client.factory = type("F", (), {"connections": 1})()
    client.dataReceived(M.message(b"P", b"s\x00SELECT 1\x00\x00\x00") + bind(b"s"))
    client.connectionLost()
    assert server.closing and server not in pool.idle and server not in pool.servers
