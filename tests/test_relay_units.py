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
    client.dataReceived = client.relay
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
