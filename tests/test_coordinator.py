"""
Unit tests of L{pgdoorman.coordinator}: the max_db_connections policy on plain objects that
stand in for pools (no sockets, no clock but the one the test turns), and the config checks
of its keys.  The behaviour against a real PostgreSQL is in test_pool_coordinator.py.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest

from pgdoorman import config
from pgdoorman.cli import check
from pgdoorman.config import ConfigError, loads
from pgdoorman.coordinator import Coordinator, CoordinatorSettings, config_warnings
from pgdoorman.protocol import errors


class Server:
    def __init__(self, created=0.0, last_used=0.0):
        self.created = created
        self.last_used = last_used
        self.closing = False


class Client:
    def __init__(self, wait_started):
        self.wait_started = wait_started
        self.refused = None

    def serverUnavailable(self, err):
        self.refused = err


class Hist:
    def __init__(self, p95):
        self.p95 = p95

    def quantile(self, q):
        return self.p95


class FakePool:
    """What the coordinator reads of a pgdoorman.pool.Pool, and its _grow loop."""

    def __init__(self, coord, clock, user, servers=0, idle=0, pool_size=10, min_pool_size=0,
                 created=0.0, p95=0.0):
        self.coord = coord
        self.clock = clock
        self.user = user
        self.servers = set()
        self.idle = deque()
        self.waiting = deque()
        self.connecting = 0
        self.paused = False
        self.pool_size = pool_size
        self.settings = SimpleNamespace(min_pool_size=min_pool_size)
        self.stats = SimpleNamespace(xact_hist=Hist(p95), wait_timeouts=0)
        self.dropped = []
        for i in range(servers):
            s = Server(created=created)
            self.servers.add(s)
            if i < idle:
                self.idle.append(s)
        coord.join(self)

    def max_wait_now(self, now):
        return now - self.waiting[0].wait_started if self.waiting else 0.0

    def wait(self, n=1, since=None):
        for _ in range(n):
            self.waiting.append(Client(self.clock.now if since is None else since))
        self._grow()

    def _grow(self):
        while (len(self.waiting) > self.connecting
               and len(self.servers) + self.connecting < self.pool_size):
            if not self.coord.acquire(self, self.clock.now):
                break
            self.connecting += 1

    def _drop(self, server):
        self.idle.remove(server)
        self.servers.discard(server)
        self.dropped.append(server)
        self.coord.dropping(server, self.clock.now)
        server.closing = True


@pytest.fixture
def clock():
    return SimpleNamespace(now=1000.0)


def make(max_db=4, **kw):
    kw.setdefault("reserve_pool_timeout", 3.0)
    kw.setdefault("min_connection_lifetime", 30.0)
    return Coordinator("db", CoordinatorSettings(max_db_connections=max_db, **kw))


def test_below_the_cap_every_pool_may_open(clock):
    coord = make(4)
    a = FakePool(coord, clock, "a", servers=2)
    b = FakePool(coord, clock, "b")
    b.wait(2)
    assert b.connecting == 2
    assert coord.current() == 4
    assert not coord.blocked
    a.wait(1)
    assert a.connecting == 0  # at the cap, nothing idle to evict
    assert a in coord.blocked


def test_at_the_cap_an_old_idle_server_of_another_user_is_evicted(clock):
    coord = make(4)
    a = FakePool(coord, clock, "a", servers=4, idle=4, created=clock.now - 60)
    b = FakePool(coord, clock, "b")
    b.wait(1)
    # The slot is not free until the evicted server is gone: no overlap of backends.
    assert len(a.dropped) == 1
    assert coord.evictions == 1
    assert b.connecting == 0
    assert coord.current() == 4
    coord.lost(a.dropped[0])
    assert b.connecting == 1
    assert coord.current() == 4
    assert not coord.blocked


def test_one_eviction_per_waiting_client(clock):
    coord = make(4)
    a = FakePool(coord, clock, "a", servers=4, idle=4, created=clock.now - 60)
    b = FakePool(coord, clock, "b")
    b.wait(1)
    b._grow()
    coord.tick(clock.now)
    assert len(a.dropped) == 1
    b.wait(1)
    assert len(a.dropped) == 2


def test_a_server_closing_for_its_own_reasons_is_waited_for_not_evicted_around(clock):
    coord = make(4)
    a = FakePool(coord, clock, "a", servers=3, idle=1, created=clock.now - 60)
    c = FakePool(coord, clock, "c", servers=1, idle=1, created=clock.now - 60)
    old = a.idle[0]
    a._drop(old)  # server_lifetime: a closes one of its own; its slot frees in a moment
    a.wait(1)
    assert c.dropped == [] and coord.evictions == 0
    assert a.connecting == 0
    coord.lost(old)
    assert a.connecting == 1


def test_min_guaranteed_pool_size_is_never_evicted(clock):
    coord = make(4, min_guaranteed_pool_size=3)
    a = FakePool(coord, clock, "a", servers=4, idle=4, created=clock.now - 60)
    b = FakePool(coord, clock, "b")
    b.wait(2)
    assert len(a.dropped) == 1  # 4 -> 3, the guaranteed floor
    for s in a.dropped:
        coord.lost(s)
    assert b.connecting == 1
    b._grow()
    assert len(a.dropped) == 1
    assert len(a.servers) == 3
    assert b in coord.blocked


def test_min_pool_size_is_a_floor_too(clock):
    coord = make(4, min_guaranteed_pool_size=1)
    a = FakePool(coord, clock, "a", servers=4, idle=4, min_pool_size=4,
                 created=clock.now - 60)
    assert coord.floor(a) == 4
    b = FakePool(coord, clock, "b")
    b.wait(1)
    assert a.dropped == []


def test_young_connections_are_not_evicted(clock):
    coord = make(4, min_connection_lifetime=30.0)
    a = FakePool(coord, clock, "a", servers=4, idle=4, created=clock.now - 10)
    b = FakePool(coord, clock, "b")
    b.wait(1)
    assert a.dropped == []
    clock.now += 25
    coord.tick(clock.now)  # wakes the blocked pool, which tries again
    assert len(a.dropped) == 1


def test_busy_servers_are_not_evicted(clock):
    coord = make(4)
    a = FakePool(coord, clock, "a", servers=4, idle=0, created=clock.now - 60)
    b = FakePool(coord, clock, "b")
    b.wait(1)
    assert a.dropped == []


def test_donor_is_the_pool_with_most_spare_then_the_slower(clock):
    coord = make(6)
    old = clock.now - 60
    fast = FakePool(coord, clock, "fast", servers=3, idle=3, created=old, p95=0.001)
    slow = FakePool(coord, clock, "slow", servers=3, idle=3, created=old, p95=0.5)
    b = FakePool(coord, clock, "b")
    b.wait(1)
    assert slow.dropped and not fast.dropped  # equal spare: the slower pool yields
    coord.lost(slow.dropped[0])
    b.wait(1)
    assert len(fast.dropped) == 1  # fast now has more spare (3 against 2)


def test_a_returned_connection_wakes_blocked_peers(clock):
    coord = make(2)
    a = FakePool(coord, clock, "a", servers=2, idle=0, created=clock.now - 60)
    b = FakePool(coord, clock, "b")
    b.wait(1)
    assert b in coord.blocked and a.dropped == []
    a.idle.append(next(iter(a.servers)))  # a's client is done with it
    coord.returned(a)
    assert len(a.dropped) == 1


def test_reserve_only_after_reserve_pool_timeout(clock):
    coord = make(2, reserve_pool_size=1, reserve_pool_timeout=1.0)
    FakePool(coord, clock, "a", servers=2, idle=0)
    b = FakePool(coord, clock, "b")
    b.wait(1)
    assert b.connecting == 0
    clock.now += 0.5
    coord.tick(clock.now)
    assert b.connecting == 0
    clock.now += 0.6
    coord.tick(clock.now)
    assert b.connecting == 1
    assert coord.reserve_acquisitions == 1
    assert coord.current() == 3
    assert coord.reserve_in_use() == 1


def test_exhausted_clients_are_refused_after_reserve_pool_timeout(clock):
    coord = make(2, reserve_pool_size=1, reserve_pool_timeout=1.0)
    FakePool(coord, clock, "a", servers=3, idle=0)  # the reserve is already in use
    b = FakePool(coord, clock, "b")
    b.wait(2)
    first, second = list(b.waiting)
    clock.now += 1.5
    coord.tick(clock.now)
    assert coord.exhaustions == 2
    assert not b.waiting
    for client in (first, second):
        assert client.refused.sqlstate == errors.TOO_MANY_CONNECTIONS
        assert 'all server connections to database "db" are in use' in str(client.refused)
    assert b not in coord.blocked


def test_no_reserve_means_refused_after_the_wait(clock):
    coord = make(1, reserve_pool_timeout=0.5)
    FakePool(coord, clock, "a", servers=1, idle=0)
    b = FakePool(coord, clock, "b")
    b.wait(1)
    client = b.waiting[0]
    clock.now += 0.4
    coord.tick(clock.now)
    assert client.refused is None
    clock.now += 0.2
    coord.tick(clock.now)
    assert client.refused is not None


def test_min_pool_size_fill_never_takes_the_last_slots(clock):
    coord = make(2)
    a = FakePool(coord, clock, "a", servers=2, idle=2, created=clock.now - 60)
    b = FakePool(coord, clock, "b")
    assert not coord.try_acquire(b)
    assert a.dropped == []
    a._drop(next(iter(a.idle)))
    assert not coord.try_acquire(b)  # still closing
    coord.lost(a.dropped[0])
    assert coord.try_acquire(b)


def test_idle_reserve_connections_are_given_back(clock):
    coord = make(2, reserve_pool_size=1, min_connection_lifetime=5.0)
    a = FakePool(coord, clock, "a", servers=3, idle=1)
    next(iter(a.idle)).last_used = clock.now - 1
    coord.tick(clock.now)
    assert a.dropped == []
    clock.now += 5
    coord.tick(clock.now)
    assert len(a.dropped) == 1
    coord.lost(a.dropped[0])
    assert coord.reserve_in_use() == 0


def test_a_closed_server_that_never_reports_is_forgotten(clock):
    coord = make(1)
    a = FakePool(coord, clock, "a", servers=1, idle=1)
    a._drop(a.idle[0])
    assert coord.current() == 1
    clock.now += 60
    coord.tick(clock.now)
    assert coord.current() == 0


def test_a_bigger_cap_on_reload_serves_blocked_pools(clock):
    coord = make(1)
    FakePool(coord, clock, "a", servers=1, idle=0)
    b = FakePool(coord, clock, "b")
    b.wait(1)
    assert b.connecting == 0
    coord.configure(CoordinatorSettings(max_db_connections=2))
    assert b.connecting == 1


# -- configuration ------------------------------------------------------------------------

BASE = """\
general:
  admin_password: x
  query_wait_timeout: 5s
pools:
  db:
%s
    users:
      - {username: a, password: a, pool_size: 4}
      - {username: b, password: b, pool_size: 2%s}
"""


def conf(pool="", user=""):
    return loads(BASE % (pool, user))


def test_coordinator_keys_load_and_are_implemented():
    cfg = conf("    max_db_connections: 4\n    reserve_pool_size: 1\n"
               "    reserve_pool_timeout: 500ms\n    min_guaranteed_pool_size: 1\n"
               "    min_connection_lifetime: 2s")
    s = CoordinatorSettings.from_pool_config(cfg.pools["db"])
    assert s == CoordinatorSettings(4, 1, 0.5, 1, 2.0)
    assert cfg.unimplemented_keys() == []
    opts = config.options("pool")
    for key in ("max_db_connections", "reserve_pool_size", "reserve_pool_timeout",
                "min_guaranteed_pool_size", "min_connection_lifetime"):
        assert opts[key].implemented
    assert config.options("general")["server_idle_check_timeout"].implemented


def test_defaults_follow_pgdoorman():
    s = CoordinatorSettings.from_pool_config(conf("    max_db_connections: 4").pools["db"])
    assert (s.reserve_pool_size, s.reserve_pool_timeout, s.min_guaranteed_pool_size,
            s.min_connection_lifetime) == (0, 3.0, 0, 30.0)
    assert CoordinatorSettings.from_pool_config(conf().pools["db"]) is None


def test_min_guaranteed_larger_than_a_pool_size_is_refused():
    with pytest.raises(ConfigError) as e:
        conf("    max_db_connections: 4\n    min_guaranteed_pool_size: 3")
    assert "min_guaranteed_pool_size (3) cannot be larger than the pool_size (2) of user 'b'" \
        in str(e.value)
    assert "pools.db.min_guaranteed_pool_size" in str(e.value)


def test_min_pool_size_larger_than_the_cap_is_refused():
    with pytest.raises(ConfigError) as e:
        conf("    max_db_connections: 1", ", min_pool_size: 2")
    assert "max_db_connections (1)" in str(e.value)


def test_warnings_for_settings_that_do_nothing(capsys):
    cfg = conf("    reserve_pool_size: 2")
    assert config_warnings(cfg) == [("pools.db.reserve_pool_size",
                                     "has no effect without max_db_connections")]
    cfg = conf("    max_db_connections: 1\n    min_guaranteed_pool_size: 1\n"
               "    reserve_pool_timeout: 10s")
    keys = [k for k, _ in config_warnings(cfg)]
    assert keys == ["pools.db.min_guaranteed_pool_size", "pools.db.reserve_pool_timeout"]
    assert check(cfg) == 0
    err = capsys.readouterr().err
    assert "not implemented" not in err
    assert "exceed max_db_connections (1)" in err


def test_the_pool_service_gives_each_capped_database_one_coordinator():
    from pgdoorman.coordinator import attach
    from pgdoorman.pool import PoolService

    capped = conf("    max_db_connections: 4")
    service = PoolService(capped)
    attach(service)
    a, b = service.get_pool("db", "a"), service.get_pool("db", "b")
    coord = service.coordinators["db"]
    assert a.coordinator is coord and b.coordinator is coord
    assert coord.members == [a, b]
    service.reload(conf("    max_db_connections: 6"))
    assert service.coordinators["db"] is coord  # kept: counters survive a reload
    assert coord.settings.max_db_connections == 6
    service.reload(conf())
    assert service.coordinators == {}
    assert a.coordinator is None and b.coordinator is None
