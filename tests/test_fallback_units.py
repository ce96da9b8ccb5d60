"""
The Patroni-assisted fallback policy (pgdoorman/fallback.py) on canned /cluster documents,
with a MemoryReactorClock, a fake Patroni client and a fake connect_server: when the own
server counts as down, the cooldown, which member is chosen, fallback_lifetime.
"""

import dataclasses
import json
from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from pgdoorman import fallback
from pgdoorman.config import loads
from pgdoorman.patroni.cluster import ClusterUnavailable, parse_cluster
from pgdoorman.protocol import errors

OWN = ("127.0.0.11", 5432)


def doc(*members):
    return parse_cluster(json.dumps({"members": [
        dict(name=n, host=h, port=5432, role=r, state=s, **extra)
        for n, h, r, s, extra in members]}).encode(), "http://api")


CLUSTER = doc(("n1", "127.0.0.11", "replica", "stopped", {}),
              ("n2", "127.0.0.12", "leader", "running", {}),
              ("n3", "127.0.0.13", "sync_standby", "streaming", {}),
              ("n4", "127.0.0.14", "replica", "streaming", {}))


@dataclasses.dataclass(frozen=True)
class Settings:
    pool_name: str = "db"
    server_host: str = OWN[0]
    server_port: int = OWN[1]
    connect_timeout: float = 3.0


class FakeServer:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.closing = False
        self.close_needed = False

    def close(self):
        self.closing = True


class FakeClient:
    def __init__(self):
        self.fetches = []

    def fetch(self):
        d = defer.Deferred()
        self.fetches.append(d)
        return d


class Harness:
    def __init__(self, general=None, pool=None):
        g = dict(patroni_api_urls=["http://a:8008", "http://b:8008"], patroni_api_timeout=None,
                 fallback_cooldown=10.0, fallback_connect_timeout=2.0, fallback_lifetime=None)
        g.update(general or {})
        pool_cfg = SimpleNamespace(**{k: None for k in g})
        for k, v in (pool or {}).items():
            setattr(pool_cfg, k, v)
        self.config = SimpleNamespace(general=SimpleNamespace(**g), pools={"db": pool_cfg})
        self.pool = SimpleNamespace(service=SimpleNamespace(config=self.config),
                                    settings=Settings(), database="db", user="u", idle=[],
                                    dropped=[])
        self.pool._drop = self.pool.dropped.append
        self.clock = Clock()
        self.client = FakeClient()
        self.attempts = []  # (host, port, connect_timeout, deferred)
        self.fb = fallback.Fallback(self.pool, reactor=self.clock, connect=self.connect,
                                    client_factory=lambda fs: self.client)

    def connect(self, pool, settings):
        d = defer.Deferred()
        self.attempts.append((settings.server_host, settings.server_port,
                              settings.connect_timeout, d))
        return d

    def last(self, host):
        for a in reversed(self.attempts):
            if a[0] == host:
                return a[3]
        raise AssertionError("no attempt on %s: %r" % (host, self.attempts))

    def hosts(self):
        return [a[0] for a in self.attempts]

    def ok(self, host):
        server = FakeServer(host, 5432)
        self.last(host).callback(server)
        return server

    def refuse(self, host):
        self.last(host).errback(errors.PgError(
            errors.CANNOT_CONNECT_NOW, "pgdoorman could not connect to server: refused"))


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "deferred has not fired"
    return out[0]


# -- settings -------------------------------------------------------------------------------------

def test_settings_disabled_without_urls():
    h = Harness(general={"patroni_api_urls": None})
    assert fallback.settings_for(h.config, "db") is None
    assert h.fb.connect() is None  # the pool connects as before


def test_settings_defaults_and_pool_override():
    h = Harness(general={"fallback_cooldown": None, "fallback_connect_timeout": None},
                pool={"fallback_lifetime": 7.0, "patroni_api_urls": ["http://p:8008"]})
    fs = fallback.settings_for(h.config, "db")
    assert fs.urls == ("http://p:8008",)
    assert (fs.cooldown, fs.api_timeout, fs.connect_timeout, fs.lifetime) == (30.0, 5.0, 5.0, 7.0)
    h2 = Harness(general={"fallback_cooldown": 12.0})
    assert fallback.settings_for(h2.config, "db").lifetime == 12.0  # defaults to the cooldown


def test_settings_from_real_config():
    cfg = loads("general:\n  admin_password: x\n  patroni_api_urls: ['http://a:8008']\n"
                "  fallback_cooldown: 20s\n  patroni_api_timeout: 1500\n"
                "pools:\n  db:\n    fallback_lifetime: 4s\n"
                "    users: [{username: u, password: p}]\n")
    assert cfg.unimplemented_keys() == []
    fs = fallback.settings_for(cfg, "db")
    assert fs == fallback.FallbackSettings(urls=("http://a:8008",), cooldown=20.0,
                                           api_timeout=1.5, connect_timeout=5.0, lifetime=4.0)


# -- what counts as down --------------------------------------------------------------------------

@pytest.mark.parametrize("err, down", [
    (errors.PgError("57P03", "the database system is starting up"), True),
    (errors.PgError("57P01", "terminating connection due to administrator command"), True),
    (errors.PgError("08006", "connection failure"), True),
    (ConnectionRefusedError(), True),
    (errors.PgError("28P01", "password authentication failed"), False),
    (errors.PgError("3D000", "database does not exist"), False),
    (errors.PgError("53300", "too many connections"), False),
])
def test_is_down_error(err, down):
    assert fallback.is_down_error(Failure(err)) is down


def test_login_error_does_not_ask_patroni():
    h = Harness()
    d = h.fb.connect()
    h.last(OWN[0]).errback(errors.PgError("28P01", "password authentication failed"))
    f = result_of(d)
    assert isinstance(f, Failure) and f.value.sqlstate == "28P01"
    assert h.client.fetches == [] and not h.fb.active


# -- choosing a member ----------------------------------------------------------------------------

def test_candidates_order_and_filters():
    state = doc(("a", "10.0.0.1", "leader", "running", {}),
                ("b", "10.0.0.2", "replica", "streaming", {}),
                ("c", "10.0.0.3", "sync_standby", "streaming", {}),
                ("d", "10.0.0.4", "replica", "stopped", {}),
                ("e", "10.0.0.5", "replica", "streaming", {"tags": {"noloadbalance": True}}),
                ("f", "10.0.0.6", "replica", "streaming", {"tags": {"nofailover": "true"}}),
                ("g", "10.0.0.7", "replica", "streaming", {"tags": {"archive": True}}),
                ("h", "10.0.0.8", "replica", "running", {}))
    first, rest = fallback.select_candidates(state, exclude=[("10.0.0.8", 5432)])
    assert first == [("10.0.0.3", 5432, "sync_standby")]
    assert rest == [("10.0.0.1", 5432, "leader"), ("10.0.0.2", 5432, "replica")]


def test_refused_goes_to_sync_standby_then_cooldown_then_own_again():
    h = Harness()
    d = h.fb.connect()
    assert h.hosts() == [OWN[0]]
    h.refuse(OWN[0])
    assert h.fb.active and len(h.client.fetches) == 1
    h.client.fetches[0].callback(CLUSTER)
    # only the sync standby in the first wave, with fallback_connect_timeout
    assert h.hosts() == [OWN[0], "127.0.0.13"]
    assert h.attempts[-1][2] == 2.0
    server = h.ok("127.0.0.13")
    assert result_of(d) is server and server.fallback_target == ("127.0.0.13", 5432,
                                                                "sync_standby")
    # during the cooldown: straight to the remembered target, no Patroni request
    h.clock.advance(5)
    d2 = h.fb.connect()
    assert h.hosts()[-1] == "127.0.0.13" and len(h.client.fetches) == 1
    h.ok("127.0.0.13")
    assert isinstance(result_of(d2), FakeServer)
    # after the cooldown: the own server again
    h.clock.advance(5.1)
    d3 = h.fb.connect()
    assert h.hosts()[-1] == OWN[0]
    own = h.ok(OWN[0])
    assert result_of(d3) is own and not hasattr(own, "fallback_target")
    assert not h.fb.active and h.fb.target is None


def test_second_wave_when_sync_fails_and_failed_host_skipped():
    h = Harness()
    d = h.fb.connect()
    h.refuse(OWN[0])
    h.client.fetches[0].callback(CLUSTER)
    h.refuse("127.0.0.13")
    # the others at once: the leader and the streaming replica (n1 is stopped)
    assert sorted(h.hosts()[2:]) == ["127.0.0.12", "127.0.0.14"]
    replica = h.ok("127.0.0.14")
    leader_late = h.ok("127.0.0.12")
    assert result_of(d) is replica
    assert leader_late.closing  # lost the race: closed
    assert h.fb.target == ("127.0.0.14", 5432, "replica")
    # the remembered target fails: forget it, ask Patroni again, skip the failed sync standby
    d2 = h.fb.connect()
    h.refuse("127.0.0.14")
    assert len(h.client.fetches) == 2
    h.client.fetches[1].callback(CLUSTER)
    assert h.hosts()[-1] == "127.0.0.12"  # sync (2s skip) and replica (just failed) skipped
    leader = h.ok("127.0.0.12")
    assert result_of(d2) is leader
    assert h.fb.host_cooldown[("127.0.0.14", 5432)][1] == 2.0


def test_candidate_skip_doubles():
    h = Harness()
    h.fb.configure()
    t = ("127.0.0.13", 5432, "sync_standby")
    for span in (2.0, 4.0, 8.0):
        h.fb._candidate_failed(t, Failure(RuntimeError("x")))
        assert h.fb.host_cooldown[t[:2]][1] == span
    for _ in range(10):
        h.fb._candidate_failed(t, Failure(RuntimeError("x")))
    assert h.fb.host_cooldown[t[:2]][1] == fallback.MAX_HOST_COOLDOWN


def test_concurrent_connections_share_one_discovery():
    h = Harness()
    ds = [h.fb.connect() for _ in range(3)]
    for a in list(h.attempts):
        a[3].errback(errors.PgError(errors.CANNOT_CONNECT_NOW, "refused"))
    assert len(h.client.fetches) == 1
    h.client.fetches[0].callback(CLUSTER)
    h.ok("127.0.0.13")  # the discovery's own login
    assert [a[0] for a in h.attempts[3:]] == ["127.0.0.13"] * 3
    for a in h.attempts[4:]:
        a[3].callback(FakeServer(a[0], a[1]))
    assert all(isinstance(result_of(d), FakeServer) for d in ds)


def test_patroni_unavailable_fails_with_both_reasons():
    h = Harness()
    d = h.fb.connect()
    h.refuse(OWN[0])
    h.client.fetches[0].errback(ClusterUnavailable({"http://a:8008": "connection refused"}))
    f = result_of(d)
    assert isinstance(f, Failure) and f.value.sqlstate == errors.CANNOT_CONNECT_NOW
    assert "refused" in str(f.value) and "Patroni fallback failed" in str(f.value)
    # still in cooldown: the next connection asks Patroni again without trying the own server
    d2 = h.fb.connect()
    assert h.hosts() == [OWN[0]] and len(h.client.fetches) == 2
    h.client.fetches[1].callback(doc(("n1", "127.0.0.11", "replica", "stopped", {})))
    f2 = result_of(d2)
    assert isinstance(f2, Failure) and "no eligible member" in str(f2.value)


def test_fallback_lifetime_retires_servers():
    h = Harness(general={"fallback_lifetime": 3.0})
    d = h.fb.connect()
    h.refuse(OWN[0])
    h.client.fetches[0].callback(CLUSTER)
    idle = h.ok("127.0.0.13")
    result_of(d)
    d2 = h.fb.connect()
    busy = h.ok("127.0.0.13")
    result_of(d2)
    h.pool.idle.append(idle)
    h.clock.advance(2.9)
    assert h.pool.dropped == [] and not busy.close_needed
    h.clock.advance(0.2)
    assert h.pool.dropped == [idle]   # idle: closed now
    assert busy.close_needed          # busy: closed when its client is done


def test_reload_removing_urls_resets_state():
    h = Harness()
    d = h.fb.connect()
    h.refuse(OWN[0])
    h.client.fetches[0].callback(CLUSTER)
    h.ok("127.0.0.13")
    result_of(d)
    assert h.fb.active
    h.config.general.patroni_api_urls = None
    assert h.fb.connect() is None
    assert not h.fb.active and h.fb.target is None
