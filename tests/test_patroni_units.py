"""
patroni_proxy without sockets or Patroni: reading /cluster (good and malformed), eligibility,
least-connections balancing, which connections an update closes, the /cluster client's race
and timeouts (on a fake Agent and MemoryReactorClock), the relay's first moments, the config
file's errors, and the HTTP API's answers.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from pgdoorman.config import ConfigError
from pgdoorman.patroni import config as pconfig
from pgdoorman.patroni.cluster import (ClusterState, ClusterUnavailable, MalformedCluster, Member,
                                       PatroniClient, ineligible_reason, parse_cluster)
from pgdoorman.patroni.proxy import ClientRelay, ClusterWatcher, PortRouter

# What Debian 12's Patroni 3.0.2 answered in tools/patronicluster.py's cluster.
PATRONI_30 = json.dumps({"members": [
    {"name": "n1", "role": "leader", "state": "running", "api_url": "http://127.0.0.11:8008/patroni",
     "host": "127.0.0.11", "port": 5432, "timeline": 1},
    {"name": "n2", "role": "replica", "state": "running", "api_url": "http://127.0.0.12:8008/patroni",
     "host": "127.0.0.12", "port": 5432, "timeline": 1, "lag": 0},
    {"name": "n3", "role": "sync_standby", "state": "running",
     "api_url": "http://127.0.0.13:8008/patroni", "host": "127.0.0.13", "port": 5432,
     "timeline": 1, "lag": 0}]}).encode()


def member(name="m", role="replica", state="running", lag=0, tags=None, host=None):
    return Member(name=name, host=host or "10.0.0.%d" % (hash(name) % 200 + 1), port=5432,
                  role=role, state=state, lag=lag, tags=tags or {})


def port(roles=("leader",), max_lag=None, name="p", listen="127.0.0.1:7000", host_port=6432):
    h, p = pconfig.parse_address(listen)
    return pconfig.PortConfig(name=name, listen=listen, listen_host=h, listen_port=p,
                              roles=tuple(roles), host_port=host_port, max_lag_in_bytes=max_lag)


# -- reading /cluster --------------------------------------------------------------------------

def test_parse_patroni_30_document():
    state = parse_cluster(PATRONI_30, "http://a")
    assert [m.name for m in state.members] == ["n1", "n2", "n3"]
    assert state.leader.name == "n1"
    assert state.source == "http://a"
    assert [m.name for m in state.by_role("sync")] == ["n3"]
    assert [m.name for m in state.by_role("async")] == ["n2"]
    assert state.members[0].lag is None and state.members[1].lag == 0


def test_parse_lag_unknown_and_missing_optional_fields():
    doc = {"members": [{"name": "a", "host": "h", "role": "replica", "state": "streaming",
                        "lag": "unknown"},
                       {"name": "b", "host": "h2", "role": "replica", "state": "running"}]}
    state = parse_cluster(json.dumps(doc).encode())
    assert state.members[0].lag is None and state.members[1].lag is None
    assert state.members[0].port is None and state.members[0].tags == {}


@pytest.mark.parametrize("body, why", [
    (b"<html>502 Bad Gateway</html>", "not JSON"),
    (b"", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"scope": "x"}', "no \"members\" list"),
    (b'{"members": {"n1": {}}}', "no \"members\" list"),
    (b'{"members": ["n1"]}', "members[0] is not an object"),
    (b'{"members": [{"name": "n1", "role": "leader", "state": "running"}]}',
     "members[0] has no 'host'"),
    (b'{"members": [{"name": "n1", "host": "h", "state": "running"}]}',
     "members[0] has no 'role'"),
    (b'{"members": [{"name": "n1", "host": "h", "role": "leader"}]}',
     "members[0] has no 'state'"),
    (b'{"members": [{"host": "h", "role": "leader", "state": "running"}]}',
     "members[0] has no 'name'"),
    (b'{"members": [{"name": "a", "host": "h", "role": "leader", "state": "running"},'
     b'{"name": "a", "host": "h", "role": "replica", "state": "running"}]}', "listed twice"),
])
def test_parse_malformed(body, why):
    with pytest.raises(MalformedCluster) as e:
        parse_cluster(body)
    assert why in str(e.value)


# -- eligibility -----------------------------------------------------------------------------------

def test_roles():
    leader, sync, replica = (member("l", "leader"), member("s", "sync_standby"),
                             member("r", "replica"))
    assert ineligible_reason(leader, ["leader"]) is None
    assert "role sync_standby" in ineligible_reason(sync, ["leader"])
    assert ineligible_reason(sync, ["sync"]) is None
    assert ineligible_reason(replica, ["sync"]) is not None
    assert ineligible_reason(replica, ["async"]) is None
    assert ineligible_reason(replica, ["sync", "async"]) is None
    assert ineligible_reason(leader, ["sync", "async"]) is not None
    for m in (leader, sync, replica, member("x", "standby_leader")):
        assert ineligible_reason(m, ["any"]) is None


@pytest.mark.parametrize("state, ok", [("running", True), ("streaming", True),
                                       ("starting", False), ("stopping", False),
                                       ("stopped", False), ("crashed", False),
                                       ("start failed", False), ("restarting", False)])
def test_states(state, ok):
    assert (ineligible_reason(member(state=state), ["async"]) is None) is ok


@pytest.mark.parametrize("tags, ok", [({}, True), ({"noloadbalance": False}, True),
                                      ({"noloadbalance": True}, False),
                                      ({"noloadbalance": "true"}, False),
                                      ({"nofailover": True}, True)])
def test_noloadbalance(tags, ok):
    assert (ineligible_reason(member(tags=tags), ["async"]) is None) is ok


def test_lag():
    limit = 1000
    assert ineligible_reason(member(lag=1000), ["async"], limit) is None
    assert "over max_lag_in_bytes" in ineligible_reason(member(lag=1001), ["async"], limit)
    assert "lag unknown" in ineligible_reason(member(lag=None), ["async"], limit)
    # Without a limit, unknown or big lag does not matter.
    assert ineligible_reason(member(lag=None), ["async"]) is None
    assert ineligible_reason(member(lag=10 ** 12), ["async"]) is None
    # The leader has no lag and a limit does not apply to it.
    assert ineligible_reason(member(role="leader", lag=None), ["any"], limit) is None


# -- balancing and updates ---------------------------------------------------------------------

class FakeRelay:
    def __init__(self, backend=None):
        self.backend = backend
        self.closed = False

    def close(self):
        self.closed = True


def test_least_connections_and_round_robin_ties():
    router = PortRouter("c", port(["async"]))
    router.update((member("a"), member("b"), member("c")))
    # Ties rotate: short connections spread too.
    picks = [router.choose()[0] for _ in range(6)]
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"]
    # Held connections: the backend with fewest wins.
    backends = {b[0]: b for b in router.eligible}
    for _ in range(3):
        router.attach(backends["a"], FakeRelay(backends["a"]))
    router.attach(backends["b"], FakeRelay(backends["b"]))
    assert router.choose()[0] == "c"
    router.attach(backends["c"], FakeRelay(backends["c"]))
    assert router.choose()[0] in ("b", "c")
    assert router.choose(exclude=(backends["b"], backends["c"]))[0] == "a"


def test_update_closes_only_members_that_left_and_keeps_counts():
    router = PortRouter("c", port(["sync", "async"], max_lag=100))
    members = (member("l", "leader"), member("s", "sync_standby"), member("r", "replica"))
    router.update(members)
    assert [b[0] for b in router.eligible] == ["s", "r"]
    relays = {}
    for b in router.eligible:
        relays[b[0]] = [FakeRelay(b), FakeRelay(b)]
        for relay in relays[b[0]]:
            router.attach(b, relay)
    # Same topology, new document: nothing closed, counts kept.
    assert router.update(members) == []
    assert router.count() == 4
    # r falls behind: only its connections are returned.
    lagging = (members[0], members[1], member("r", "replica", lag=101))
    stale = router.update(lagging)
    assert sorted(id(r) for r in stale) == sorted(id(r) for r in relays["r"])
    assert router.count() == 2
    assert "over max_lag_in_bytes" in router.reasons["r"]
    # s becomes leader (switchover): s connections close; r is back and gets new ones.
    stale = router.update((member("l", "replica"), member("s", "leader"), member("r")))
    assert sorted(id(r) for r in stale) == sorted(id(r) for r in relays["s"])
    assert [b[0] for b in router.eligible] == ["l", "r"]


def test_member_moving_host_is_a_new_backend():
    router = PortRouter("c", port(["leader"]))
    router.update((member("l", "leader", host="10.0.0.1"),))
    b = router.choose()
    router.attach(b, FakeRelay(b))
    stale = router.update((member("l", "leader", host="10.0.0.9"),))
    assert len(stale) == 1
    assert router.choose()[1] == "10.0.0.9"


def test_nothing_eligible():
    router = PortRouter("c", port(["leader"]))
    assert router.choose() is None
    router.update((member("r"),))
    assert router.choose() is None


# -- the /cluster client ---------------------------------------------------------------------------

class FakeResponse:
    def __init__(self, code, body):
        self.code = code
        self.body = body
        self.length = len(body)
        self.phrase = b"OK" if code == 200 else b"Error"
        self.version = (b"HTTP", 1, 1)

    def deliverBody(self, protocol):
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    """Answers by URL: bytes → 200, (code, bytes), an Exception, or None for never."""

    def __init__(self, answers):
        self.answers = answers
        self.requests = []
        self.cancelled = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        url = uri.decode()
        self.requests.append(url)
        host = url.rsplit("/cluster", 1)[0]
        answer = self.answers[host]
        if answer is None:
            return defer.Deferred(lambda d: self.cancelled.append(host))
        if isinstance(answer, Exception):
            return defer.fail(answer)
        code, body = answer if isinstance(answer, tuple) else (200, answer)
        return defer.succeed(FakeResponse(code, body))


def results(d):
    out = []
    d.addBoth(out.append)
    return out


def test_first_good_answer_wins_over_bad_ones():
    clock = MemoryReactorClock()
    agent = FakeAgent({"http://a": (500, b"oops"), "http://b": b"not json",
                       "http://c": PATRONI_30})
    out = results(PatroniClient(clock, ["http://a", "http://b/", "http://c"], timeout=2,
                                agent=agent).fetch())
    assert isinstance(out[0], ClusterState) and out[0].source == "http://c"
    assert sorted(agent.requests) == ["http://a/cluster", "http://b/cluster", "http://c/cluster"]


def test_a_host_that_never_answers_costs_nothing_when_another_answers():
    clock = MemoryReactorClock()
    agent = FakeAgent({"http://silent": None, "http://good": PATRONI_30})
    out = results(PatroniClient(clock, ["http://silent", "http://good"], timeout=2,
                                agent=agent).fetch())
    assert isinstance(out[0], ClusterState)
    assert agent.cancelled == ["http://silent"]   # the loser's request is cancelled
    assert not clock.getDelayedCalls()            # and its timeout too


def test_all_hosts_bad_reports_each_and_silent_ones_time_out():
    clock = MemoryReactorClock()
    agent = FakeAgent({"http://silent": None, "http://e500": (500, b"{}"),
                       "http://refused": ConnectionRefusedError("refused"),
                       "http://nomembers": b'{"scope": "x"}'})
    out = results(PatroniClient(clock, list(agent.answers), timeout=2, agent=agent).fetch())
    assert out == []                # still waiting for the silent one
    clock.advance(1.9)
    assert out == []
    clock.advance(0.2)
    failure = out[0]
    assert failure.check(ClusterUnavailable)
    errors = failure.value.errors
    assert errors["http://silent"] == "no answer within 2s"
    assert errors["http://e500"] == "HTTP 500"
    assert "refused" in errors["http://refused"]
    assert "members" in errors["http://nomembers"]


# -- the watcher ---------------------------------------------------------------------------------

class FakeClient:
    def __init__(self, reactor, hosts, timeout=None, tls=None):
        self.answers = []

    def fetch(self):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


def cluster_config(ports):
    return pconfig.ClusterConfig(name="main", hosts=("http://a",), ports=ports)


def test_watcher_keeps_routing_on_what_it_knew_and_counts_failovers():
    clock = MemoryReactorClock()
    w = ClusterWatcher(clock, cluster_config({"master": port(["leader"], name="master"),
                                              "replicas": port(["async"], name="replicas",
                                                               listen="127.0.0.1:7001")}),
                       1.0, client_factory=FakeClient)
    good = parse_cluster(PATRONI_30)
    w.client.answers = [good, ClusterUnavailable({"http://a": "HTTP 500"})]
    assert results(w.update()) == [None]
    master = w.routers["master"]
    b = master.choose()
    assert b[0] == "n1"
    relay = FakeRelay(b)
    master.attach(b, relay)
    out = results(w.update())
    assert "HTTP 500" in out[0]
    assert w.update_errors_total == 1 and w.last_error
    assert master.choose()[0] == "n1" and not relay.closed
    # Switchover to n3: the master connection to n1 is closed, the replica port is untouched.
    switched = json.loads(PATRONI_30)
    switched["members"][0]["role"] = "replica"
    switched["members"][2]["role"] = "leader"
    w.client.answers = [parse_cluster(json.dumps(switched).encode())]
    results(w.update())
    assert relay.closed and w.failovers_total == 1 and w.closed_total == 1
    assert master.choose()[0] == "n3"
    status = w.status()
    assert status["ports"]["master"]["members"][2]["eligible"] is True
    assert "role replica" in status["ports"]["master"]["members"][0]["reason"]


def test_watcher_polls_on_its_interval():
    clock = MemoryReactorClock()
    w = ClusterWatcher(clock, cluster_config({"master": port(["leader"], name="master")}), 3.0,
                       client_factory=FakeClient)
    state = parse_cluster(PATRONI_30)
    w.client.answers = [state] * 3
    w.startService()
    assert w.updates_total == 1 and clock.tcpServers[0][0] == 7000
    clock.advance(3)
    clock.advance(3)
    assert w.updates_total == 3
    w.stopService()


def test_relay_closes_at_once_when_nothing_is_eligible():
    clock = MemoryReactorClock()
    w = ClusterWatcher(clock, cluster_config({"master": port(["leader"], name="master")}), 1.0,
                       client_factory=FakeClient)
    relay = ClientRelay(w, "master")
    transport = StringTransport()
    relay.makeConnection(transport)
    assert transport.disconnecting
    assert w.routers["master"].rejected_total == 1
    assert clock.tcpClients == []


def test_relay_buffers_until_connected_then_relays_both_ways():
    clock = MemoryReactorClock()
    w = ClusterWatcher(clock, cluster_config({"master": port(["leader"], name="master")}), 1.0,
                       client_factory=FakeClient)
    w.client.answers = [parse_cluster(PATRONI_30)]
    w.update()
    relay = ClientRelay(w, "master")
    client_side = StringTransport()
    relay.makeConnection(client_side)
    assert client_side.producerState == "paused"
    host, hport, factory = clock.tcpClients[0][:3]
    assert (host, hport) == ("127.0.0.11", 6432)
    relay.dataReceived(b"startup")
    server = factory.buildProtocol(None)
    server_side = StringTransport()
    server.makeConnection(server_side)
    assert server_side.value() == b"startup"
    assert client_side.producerState == "producing"
    assert client_side.producer is server_side and server_side.producer is client_side
    relay.dataReceived(b"more")
    server.dataReceived(b"answer")
    assert server_side.value() == b"startupmore" and client_side.value() == b"answer"
    assert w.routers["master"].count() == 1
    # The member leaves: both sides close.
    gone = json.loads(PATRONI_30)
    gone["members"] = gone["members"][1:]
    w.client.answers = [parse_cluster(json.dumps(gone).encode())]
    w.update()
    assert client_side.disconnecting and server_side.disconnecting
    assert w.routers["master"].count() == 0


# -- config -------------------------------------------------------------------------------------

EXAMPLE = """
cluster_update_interval: 3
listen_address: "127.0.0.1:8009"
clusters:
  main:
    hosts: ["http://10.0.0.1:8008", "http://10.0.0.2:8008/"]
    ports:
      master:   {listen: "0.0.0.0:6432", roles: ["leader"], host_port: 6432}
      replicas: {listen: "0.0.0.0:6433", roles: ["sync", "async"], host_port: 6432,
                 max_lag_in_bytes: 16777216}
"""


def test_config_example():
    c = pconfig.loads(EXAMPLE)
    assert c.cluster_update_interval == 3.0 and (c.listen_host, c.listen_port) == ("127.0.0.1",
                                                                                   8009)
    main = c.clusters["main"]
    assert main.hosts == ("http://10.0.0.1:8008", "http://10.0.0.2:8008")
    assert main.ports["replicas"].roles == ("sync", "async")
    assert main.ports["replicas"].max_lag_in_bytes == 16 * 1024 * 1024
    assert main.ports["master"].max_lag_in_bytes is None
    c = pconfig.loads(EXAMPLE.replace("interval: 3", 'interval: "500ms"')
                      .replace("16777216", '"16MB"'))
    assert c.cluster_update_interval == 0.5
    assert c.clusters["main"].ports["replicas"].max_lag_in_bytes == 16 * 1024 * 1024


@pytest.mark.parametrize("old, new, key, words", [
    ("cluster_update_interval: 3", "cluster_update_intervall: 3", "cluster_update_intervall",
     "did you mean 'cluster_update_interval'"),
    ("cluster_update_interval: 3", "cluster_update_interval: -1",
     "cluster_update_interval", "negative"),
    ('roles: ["leader"]', 'roles: ["master"]', "clusters.main.ports.master.roles[0]",
     'spelled "leader"'),
    ('roles: ["leader"]', "roles: []", "clusters.main.ports.master.roles", "list of roles"),
    ('host_port: 6432}', 'host_port: 99999}', "clusters.main.ports.master.host_port",
     "1..65535"),
    ('"0.0.0.0:6433"', '"0.0.0.0:6432"', "clusters.main.ports.replicas.listen",
     "already used by clusters.main.ports.master.listen"),
    ('"0.0.0.0:6432"', '"6432"', "clusters.main.ports.master.listen", "host:port"),
    ("max_lag_in_bytes: 16777216", 'max_lag_in_bytes: "lots"',
     "clusters.main.ports.replicas.max_lag_in_bytes", "invalid size"),
    ('hosts: ["http://10.0.0.1:8008", "http://10.0.0.2:8008/"]', 'hosts: ["10.0.0.1:8008"]',
     "clusters.main.hosts[0]", "URL"),
    ('hosts: ["http://10.0.0.1:8008", "http://10.0.0.2:8008/"]', "hosts: []",
     "clusters.main.hosts", "list of Patroni REST API URLs"),
    ('hosts: ["http://10.0.0.1:8008", "http://10.0.0.2:8008/"]',
     'hosts: ["http://a:1"]\n    tls: {client_cert: /x}', "clusters.main.tls.client_key",
     "go together"),
    ('listen_address: "127.0.0.1:8009"', 'listen_address: "0.0.0.0:6432"',
     "clusters.main.ports.master.listen", "already used by listen_address"),
])
def test_config_errors_name_the_key(old, new, key, words):
    assert old in EXAMPLE
    with pytest.raises(ConfigError) as e:
        pconfig.loads(EXAMPLE.replace(old, new), "pp.yaml")
    assert e.value.key == key, str(e.value)
    assert words in str(e.value)
    assert str(e.value).startswith("pp.yaml:")


def test_config_needs_clusters():
    with pytest.raises(ConfigError) as e:
        pconfig.loads("listen_address: 127.0.0.1:1\n")
    assert e.value.key == "clusters"


def test_example_file_in_packaging_is_valid():
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "packaging", "patroni_proxy.yaml")
    c = pconfig.load(path)
    assert c.clusters


# -- the HTTP API ----------------------------------------------------------------------------------

def render(resource_root, path):
    from twisted.web.test.requesthelper import DummyRequest
    req = DummyRequest([p.encode() for p in path.strip("/").split("/")] if path != "/"
                       else [b""])
    node = resource_root
    while req.postpath and not getattr(node, "isLeaf", False):
        node = node.getChildWithDefault(req.postpath.pop(0), req)
    body = node.render(req)
    if isinstance(body, bytes):
        req.write(body)
        req.finish()
    return req


def test_api_root_status_metrics_update():
    from twisted.web.server import NOT_DONE_YET  # noqa: F401 - documents the async answer

    from pgdoorman.patroni.api import APIRoot
    from pgdoorman.patroni.service import ProxyService
    clock = MemoryReactorClock()
    cfg = pconfig.loads(EXAMPLE)
    svc = ProxyService(cfg, reactor=clock, handle_sighup=False)
    w = svc.watchers["main"]
    w.client = FakeClient(None, ())
    w.client.answers = [parse_cluster(PATRONI_30, "http://10.0.0.1:8008")]
    root = APIRoot(svc)
    assert b"".join(render(root, "/").written) == b"OK\n"
    req = render(root, "/update_clusters")
    assert b"".join(req.written) == b"OK\n" and req.finished
    status = json.loads(b"".join(render(root, "/status").written))
    main = status["clusters"]["main"]
    assert [m["name"] for m in main["members"]] == ["n1", "n2", "n3"]
    replicas = main["ports"]["replicas"]
    assert [(m["name"], m["eligible"]) for m in replicas["members"]] == [
        ("n1", False), ("n2", True), ("n3", True)]
    assert main["last_update_source"] == "http://10.0.0.1:8008"
    metrics = b"".join(render(root, "/metrics").written).decode()
    assert 'patroni_proxy_cluster_members{cluster="main",role="leader"} 1.0' in metrics
    assert 'patroni_proxy_eligible_members{cluster="main",port="replicas"} 2.0' in metrics
    assert 'patroni_proxy_update_errors_total{cluster="main"} 0.0' in metrics
    w.client.answers = [ClusterUnavailable({"http://10.0.0.1:8008": "HTTP 500"})]
    req = render(root, "/update_clusters")
    assert req.responseCode == 503 and b"HTTP 500" in b"".join(req.written)
    metrics = b"".join(render(root, "/metrics").written).decode()
    assert 'patroni_proxy_update_errors_total{cluster="main"} 1.0' in metrics


def test_failover_counted_across_a_document_without_leader():
    clock = MemoryReactorClock()
    w = ClusterWatcher(clock, cluster_config({"master": port(["leader"], name="master")}), 1.0,
                       client_factory=FakeClient)
    doc = json.loads(PATRONI_30)
    no_leader = json.loads(PATRONI_30)
    no_leader["members"][0]["role"] = "replica"
    new_leader = json.loads(PATRONI_30)
    new_leader["members"][0]["role"] = "replica"
    new_leader["members"][2]["role"] = "leader"
    w.client.answers = [parse_cluster(json.dumps(d).encode())
                        for d in (doc, no_leader, new_leader, new_leader)]
    for _ in range(4):
        w.update()
    assert w.failovers_total == 1 and w.last_leader == "n3"
