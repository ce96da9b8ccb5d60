"""
Patroni's C{GET /cluster}: fetching it, reading it, and deciding which members may serve a role.

Three layers, each usable alone (patroni_proxy uses all three; pgdoorman's own Patroni-assisted
fallback is meant to use L{PatroniClient} and L{Member} to find a sync standby when its server
refuses connections):

  - L{parse_cluster}: bytes of a C{/cluster} answer → L{ClusterState}, or L{MalformedCluster}
    saying why.  A document with a broken member is rejected as a whole rather than read
    without that member: reading it as "member gone" would close valid connections.
  - L{ineligible_reason}: the policy.  A member serves a port when its role matches, its state
    serves queries (Patroni 3.0 reports replicas as C{running}, newer releases as
    C{streaming}: both count), it has no C{noloadbalance} tag and, for replicas when a limit is
    set, its lag is known and within the limit.  Patroni computes C{lag} from WAL received,
    not replayed, and reports C{"unknown"} (or nothing) when it cannot tell.
  - L{PatroniClient}: asks every configured REST API at once with twisted.web's Agent, each
    request bounded by a timeout (a host that accepts and never answers costs that timeout,
    nothing more); the first good document wins and the other requests are cancelled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["Member", "ClusterState", "MalformedCluster", "ClusterUnavailable", "parse_cluster",
           "role_matches", "ineligible_reason", "PatroniClient", "TLSPolicy", "SERVING_STATES"]

#: Member states that serve queries: C{running} (Patroni ≤ 3.0 for every member, and the
#: leader in later releases) and C{streaming} (replicas in Patroni ≥ 3.0.3).
SERVING_STATES = frozenset(["running", "streaming"])

#: Patroni's role names for each role a port may ask for.
PATRONI_ROLES = {
    "leader": frozenset(["leader"]),
    "sync": frozenset(["sync_standby"]),
    "async": frozenset(["replica"]),
}


class MalformedCluster(ValueError):
    """A C{/cluster} answer that cannot be used; the message says why."""


class ClusterUnavailable(Exception):
    """
    No configured host gave a usable C{/cluster} answer.

    @ivar errors: what went wrong, by host URL.
    """

    def __init__(self, errors: Dict[str, str]) -> None:
        self.errors = dict(errors)
        Exception.__init__(self, "no Patroni REST API answered: " + "; ".join(
            "%s: %s" % item for item in sorted(self.errors.items())))


@dataclass(frozen=True)
class Member:
    """
    One member as C{/cluster} describes it.

    @ivar role: Patroni's role name (C{leader}, C{sync_standby}, C{replica},
        C{standby_leader}, ...).
    @ivar lag: bytes behind the leader, or C{None} when Patroni did not say (the leader) or
        said C{"unknown"}.
    """
    name: str
    host: str
    port: Optional[int]
    role: str
    state: str
    lag: Optional[int] = None
    timeline: Optional[int] = None
    api_url: Optional[str] = None
    tags: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_leader(self) -> bool:
        return self.role == "leader"

    @property
    def noloadbalance(self) -> bool:
        return _truthy(self.tags.get("noloadbalance"))

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "host": self.host, "port": self.port, "role": self.role,
                "state": self.state, "lag": self.lag, "timeline": self.timeline,
                "tags": dict(self.tags)}


@dataclass(frozen=True)
class ClusterState:
    """A usable C{/cluster} answer: its members, and which API gave it."""
    members: Tuple[Member, ...]
    scope: Optional[str] = None
    source: Optional[str] = None

    @property
    def leader(self) -> Optional[Member]:
        for m in self.members:
            if m.is_leader:
                return m
        return None

    def by_role(self, role: str) -> List[Member]:
        return [m for m in self.members if role_matches(m, role)]


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "on", "1")
    return bool(value)


def _optional_int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def parse_cluster(body: bytes, source: Optional[str] = None) -> ClusterState:
    """
    Read the body of a C{GET /cluster} answer.

    Each member needs C{name}, C{host}, C{role} and C{state} (strings); C{port}, C{lag},
    C{timeline}, C{api_url} and C{tags} are optional.  C{lag} that is C{"unknown"}, absent or
    not a number is kept as C{None}.

    @raise MalformedCluster: not JSON, not an object, no C{members} list, or a member without
        the fields above.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedCluster("not JSON: %s" % (e,))
    if not isinstance(doc, dict):
        raise MalformedCluster("not a JSON object")
    raw_members = doc.get("members")
    if not isinstance(raw_members, list):
        raise MalformedCluster("no \"members\" list")
    members = []
    seen = set()
    for i, raw in enumerate(raw_members):
        if not isinstance(raw, dict):
            raise MalformedCluster("members[%d] is not an object" % (i,))
        for key in ("name", "host", "role", "state"):
            if not isinstance(raw.get(key), str) or not raw.get(key):
                raise MalformedCluster("members[%d] has no %r" % (i, key))
        if raw["name"] in seen:
            raise MalformedCluster("member %r is listed twice" % (raw["name"],))
        seen.add(raw["name"])
        tags = raw.get("tags")
        members.append(Member(
            name=raw["name"], host=raw["host"], port=_optional_int(raw.get("port")),
            role=raw["role"], state=raw["state"], lag=_optional_int(raw.get("lag")),
            timeline=_optional_int(raw.get("timeline")),
            api_url=raw.get("api_url") if isinstance(raw.get("api_url"), str) else None,
            tags=dict(tags) if isinstance(tags, dict) else {}))
    scope = doc.get("scope") if isinstance(doc.get("scope"), str) else None
    return ClusterState(members=tuple(members), scope=scope, source=source)


def role_matches(member: Member, role: str) -> bool:
    """Whether C{member} has the port role C{role} (C{leader}, C{sync}, C{async}, C{any})."""
    if role == "any":
        return True
    return member.role in PATRONI_ROLES.get(role, ())


def ineligible_reason(member: Member, roles: Sequence[str],
                      max_lag_in_bytes: Optional[int] = None) -> Optional[str]:
    """
    Why C{member} may not serve a port with C{roles} and C{max_lag_in_bytes}, or C{None} when
    it may.  The reason is for people (it is shown in C{/status} and logs).
    """
    if not any(role_matches(member, r) for r in roles):
        return "role %s is not one of %s" % (member.role, ", ".join(roles))
    if member.state not in SERVING_STATES:
        return "state %s does not serve queries" % (member.state,)
    if member.noloadbalance:
        return "tagged noloadbalance"
    if max_lag_in_bytes is not None and not member.is_leader:
        if member.lag is None:
            return "lag unknown (max_lag_in_bytes is %d)" % (max_lag_in_bytes,)
        if member.lag > max_lag_in_bytes:
            return "lag %d bytes is over max_lag_in_bytes %d" % (member.lag, max_lag_in_bytes)
    return None


# -- fetching ----------------------------------------------------------------------------------

try:
    from twisted.web.iweb import IPolicyForHTTPS
except ImportError:  # pragma: no cover
    IPolicyForHTTPS = None


@implementer(IPolicyForHTTPS)
class TLSPolicy:
    """
    TLS for Patroni REST APIs from a cluster's C{tls} block: a private CA (C{ca_cert}), a client
    certificate (C{client_cert}/C{client_key}, for C{restapi.verify_client}), or no
    verification at all (C{skip_verify}).
    """

    def __init__(self, tls: Any) -> None:
        from twisted.internet import ssl
        self._ssl = ssl
        self.skip_verify = bool(getattr(tls, "skip_verify", False))
        self.trust_root = None
        self.client_certificate = None
        if getattr(tls, "ca_cert", None):
            with open(tls.ca_cert, "rb") as f:
                self.trust_root = ssl.Certificate.loadPEM(f.read())
        if getattr(tls, "client_cert", None):
            with open(tls.client_cert, "rb") as f:
                cert = f.read()
            with open(tls.client_key, "rb") as f:
                key = f.read()
            self.client_certificate = ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        ssl = self._ssl
        if self.skip_verify:
            kw: Dict[str, Any] = {"verify": False}
            if self.client_certificate is not None:
                kw["privateKey"] = self.client_certificate.privateKey.original
                kw["certificate"] = self.client_certificate.original
            return _NoVerifyCreator(ssl.CertificateOptions(**kw))
        kw = {}
        if self.trust_root is not None:
            kw["trustRoot"] = self.trust_root
        if self.client_certificate is not None:
            kw["clientCertificate"] = self.client_certificate
        return ssl.optionsForClientTLS(hostname.decode("ascii"), **kw)


class _NoVerifyCreator:
    """Adapt CertificateOptions (no verification) to IOpenSSLClientConnectionCreator."""

    def __init__(self, options: Any) -> None:
        self._options = options

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        from OpenSSL import SSL
        return SSL.Connection(self._options.getContext(), None)


if IPolicyForHTTPS is not None:
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
    implementer(IOpenSSLClientConnectionCreator)(_NoVerifyCreator)


class PatroniClient:
    """
    Fetch C{/cluster} from the first of several Patroni REST APIs to answer well.

    @param hosts: base URLs such as C{"http://10.0.0.1:8008"}.
    @param timeout: seconds one request may take (connect, headers, body).
    @param tls: a L{pgdoorman.patroni.config.TLSConfig} (or anything with its attributes) for
        https URLs, or C{None} for the system's trust store.
    @param agent: an L{twisted.web.iweb.IAgent} to use instead of a new Agent (tests).
    """

    log = Logger()

    def __init__(self, reactor: Any, hosts: Iterable[str], timeout: float = 2.0,
                 tls: Any = None, agent: Any = None) -> None:
        self.reactor = reactor
        self.hosts = tuple(h.rstrip("/") for h in hosts)
        self.timeout = timeout
        if agent is None:
            from twisted.web.client import Agent, HTTPConnectionPool
            pool = HTTPConnectionPool(reactor, persistent=False)
            pool._factory = _QuietHTTP11ClientFactory  # no log line per poll and host
            kw = {"pool": pool, "connectTimeout": timeout}
            if tls is not None:
                kw["contextFactory"] = TLSPolicy(tls)
            agent = Agent(reactor, **kw)
        self.agent = agent

    def fetch_one(self, host: str) -> defer.Deferred:
        """C{GET host/cluster} → L{ClusterState}; fails with a one-line reason."""
        from twisted.web.http_headers import Headers
        url = host + "/cluster"

        def got_response(response: Any) -> defer.Deferred:
            body = _read_body(response)
            if response.code != 200:
                def bad_code(data: bytes) -> None:
                    raise MalformedCluster("HTTP %d" % (response.code,))
                body.addCallback(bad_code)
                return body
            body.addCallback(parse_cluster, host)
            return body

        d = self.agent.request(b"GET", url.encode("ascii"),
                               Headers({b"Accept": [b"application/json"]}))
        d.addCallback(got_response)
        d.addTimeout(self.timeout, self.reactor)
        return d

    def fetch(self) -> defer.Deferred:
        """
        Ask every host at once; fire with the first L{ClusterState}, or fail with
        L{ClusterUnavailable} once every host has failed.  Requests still running when the
        winner arrives are cancelled.
        """
        result: defer.Deferred = defer.Deferred()
        errors: Dict[str, str] = {}
        pending: Dict[str, defer.Deferred] = {}
        if not self.hosts:
            result.errback(ClusterUnavailable({}))
            return result

        def ok(state: ClusterState, host: str) -> None:
            pending.pop(host, None)
            if result.called:
                return
            result.callback(state)
            for other in list(pending.values()):
                other.cancel()

        def failed(failure: Failure, host: str) -> None:
            pending.pop(host, None)
            if result.called:
                return  # cancelled after a winner, or lost the race: not interesting
            errors[host] = _describe_failure(failure, self.timeout)
            if not pending:
                result.errback(ClusterUnavailable(errors))

        for host in self.hosts:
            d = self.fetch_one(host)
            pending[host] = d
        for host, d in list(pending.items()):
            d.addCallbacks(ok, failed, callbackArgs=(host,), errbackArgs=(host,))
        return result


#: The largest /cluster answer read; Patroni's are a few hundred bytes per member.
MAX_BODY = 1024 * 1024


class _BodyReader(Protocol):
    """
    Collect a response body, like twisted.web.client.readBody but safe to cancel (readBody's
    protocol fires its Deferred a second time when the aborted connection is lost) and
    bounded by L{MAX_BODY}.

    Patroni's REST API (Python's http.server) sends neither Content-Length nor chunks and
    ends the body by closing; Twisted reports that as PotentialDataLoss, which is the normal
    end here.  A truncated document fails JSON parsing anyway.
    """

    def __init__(self, deferred: defer.Deferred) -> None:
        self.deferred = deferred
        self.chunks: List[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_BODY:
            if not self.deferred.called:
                self.deferred.errback(MalformedCluster("answer larger than %d bytes"
                                                       % (MAX_BODY,)))
            self.transport.abortConnection()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss
        if self.deferred.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.deferred.callback(b"".join(self.chunks))
        else:
            self.deferred.errback(reason)


def _read_body(response: Any) -> defer.Deferred:
    protocol: Optional[_BodyReader] = None

    def cancel(d: defer.Deferred) -> None:
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            transport.abortConnection()

    d: defer.Deferred = defer.Deferred(cancel)
    protocol = _BodyReader(d)
    response.deliverBody(protocol)
    return d


try:
    from twisted.web.client import _HTTP11ClientFactory

    class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
        noisy = False
except ImportError:  # pragma: no cover - a Twisted without the private class: stay noisy
    from twisted.web.client import HTTPConnectionPool as _Pool
    _QuietHTTP11ClientFactory = _Pool._factory  # type: ignore[misc]


def _describe_failure(failure: Failure, timeout: float) -> str:
    from twisted.internet.error import TimeoutError as TxTimeoutError
    if failure.check(defer.TimeoutError, TxTimeoutError, defer.CancelledError):
        return "no answer within %gs" % (timeout,)
    if failure.check(MalformedCluster):
        return str(failure.value)
    value = failure.value
    reasons = getattr(value, "reasons", None)  # ResponseFailed and friends wrap failures
    if reasons:
        return "; ".join(_describe_failure(r, timeout) for r in reasons)
    text = str(value) or type(value).__name__
    return "%s: %s" % (type(value).__name__, text) if type(value).__name__ not in text else text
