"""
Loading and validating patroni_proxy's configuration file (PgDoorman's format, YAML).

    cluster_update_interval: 3          # seconds between polls of Patroni's /cluster
    listen_address: "127.0.0.1:8009"    # HTTP API (/, /update_clusters, /status, /metrics)
    clusters:
      main:
        hosts: ["http://10.0.0.1:8008", "http://10.0.0.2:8008"]
        tls: {ca_cert: ..., client_cert: ..., client_key: ..., skip_verify: false}  # optional
        ports:
          master:   {listen: "0.0.0.0:6432", roles: ["leader"], host_port: 6432}
          replicas: {listen: "0.0.0.0:6433", roles: ["sync", "async"], host_port: 6432,
                     max_lag_in_bytes: 16777216}

As with pgdoorman's own file, L{load} returns a complete L{ProxyConfig} or raises
L{pgdoorman.config.ConfigError} naming the file, the dotted key and the line; a SIGHUP reload
that meets a bad file keeps the old configuration.

C{cluster_update_interval} is a number of seconds (PgDoorman's unit for this key) or a duration
string such as C{"500ms"}.  C{max_lag_in_bytes} is a number of bytes or a size such as
C{"16MB"}.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from pgdoorman.config import ConfigError, _describe, _dotted, _parse_yaml, parse_duration
from pgdoorman.config import parse_size

__all__ = ["ROLES", "TLSConfig", "PortConfig", "ClusterConfig", "ProxyConfig", "load", "loads",
           "parse_address", "ConfigError"]

#: The roles a port may ask for.  C{sync} is Patroni's C{sync_standby}, C{async} its
#: C{replica}; C{any} is every member.
ROLES = ("leader", "sync", "async", "any")

DEFAULT_UPDATE_INTERVAL = 3.0
DEFAULT_LISTEN_ADDRESS = "127.0.0.1:8009"


@dataclass(frozen=True)
class TLSConfig:
    """How to reach Patroni REST APIs served over HTTPS (the C{tls} block of a cluster)."""
    ca_cert: Optional[str] = None
    client_cert: Optional[str] = None
    client_key: Optional[str] = None
    skip_verify: bool = False


@dataclass(frozen=True)
class PortConfig:
    """One listening port of a cluster and the members it may forward to."""
    name: str
    listen: str
    listen_host: str
    listen_port: int
    roles: Tuple[str, ...]
    host_port: int
    max_lag_in_bytes: Optional[int] = None


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    hosts: Tuple[str, ...]
    ports: Dict[str, PortConfig]
    tls: Optional[TLSConfig] = None


@dataclass
class ProxyConfig:
    path: str
    cluster_update_interval: float
    listen_address: str
    listen_host: str
    listen_port: int
    clusters: Dict[str, ClusterConfig] = field(default_factory=dict)


def parse_address(value: str) -> Tuple[str, int]:
    """
    Split C{"host:port"} (C{"[::1]:6432"} for IPv6) into its parts.

    @raise ValueError: not of that form, or the port is not 1..65535.
    """
    if not isinstance(value, str) or ":" not in value:
        raise ValueError('expected "host:port", got %s' % (_describe(value),))
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError('expected "host:port", got %r (no host)' % (value,))
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError("invalid port %r in %r" % (port_text, value))
    if not 1 <= port <= 65535:
        raise ValueError("port %d in %r is not in 1..65535" % (port, value))
    return host, port


class _Builder:
    def __init__(self, path: str, lines: Dict[Tuple[Any, ...], int]) -> None:
        self.path = path
        self.lines = lines

    def error(self, key_path: Tuple[Any, ...], problem: str) -> ConfigError:
        line = None
        probe = key_path
        while probe and line is None:
            line = self.lines.get(probe)
            probe = probe[:-1]
        return ConfigError(self.path, problem, key=_dotted(key_path) or None, line=line)

    def table(self, data: Any, key_path: Tuple[Any, ...], known: List[str],
              required: Tuple[str, ...] = ()) -> Dict[str, Any]:
        if not isinstance(data, dict):
            raise self.error(key_path, "expected a table, got %s" % (_describe(data),))
        for key in data:
            if not isinstance(key, str):
                raise self.error(key_path, "keys must be strings, got %s" % (_describe(key),))
            if key not in known:
                problem = "unknown key %r" % (key,)
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                if close:
                    problem += " (did you mean %r?)" % (close[0],)
                raise self.error(key_path + (key,), problem)
        for key in required:
            if data.get(key) is None:
                raise self.error(key_path + (key,), "is required")
        return data

    def build(self, data: Any) -> ProxyConfig:
        if data is None:
            data = {}
        top = self.table(data, (), ["cluster_update_interval", "listen_address", "clusters"],
                         required=("clusters",))
        interval_raw = top.get("cluster_update_interval")
        interval = DEFAULT_UPDATE_INTERVAL
        if interval_raw is not None:
            try:
                interval = parse_duration(interval_raw, plain_unit=1.0)
            except ValueError as e:
                raise self.error(("cluster_update_interval",), str(e))
            if interval <= 0:
                raise self.error(("cluster_update_interval",), "must be more than zero")
        listen = top.get("listen_address") or DEFAULT_LISTEN_ADDRESS
        try:
            api_host, api_port = parse_address(listen)
        except ValueError as e:
            raise self.error(("listen_address",), str(e))
        clusters_raw = top["clusters"]
        if not isinstance(clusters_raw, dict) or not clusters_raw:
            raise self.error(("clusters",), "expected a table of clusters by name, got %s"
                             % (_describe(clusters_raw),))
        clusters = {}
        used: Dict[Tuple[str, int], str] = {(api_host, api_port): "listen_address"}
        for name, raw in clusters_raw.items():
            clusters[str(name)] = self.cluster(str(name), raw, used)
        return ProxyConfig(path=self.path, cluster_update_interval=interval,
                           listen_address=listen, listen_host=api_host, listen_port=api_port,
                           clusters=clusters)

    def cluster(self, name: str, raw: Any, used: Dict[Tuple[str, int], str]) -> ClusterConfig:
        kp: Tuple[Any, ...] = ("clusters", name)
        data = self.table(raw, kp, ["hosts", "tls", "ports"], required=("hosts", "ports"))
        hosts = data["hosts"]
        if isinstance(hosts, str):
            hosts = [hosts]
        if not isinstance(hosts, list) or not hosts:
            raise self.error(kp + ("hosts",), "expected a list of Patroni REST API URLs, got %s"
                             % (_describe(hosts),))
        clean = []
        for i, url in enumerate(hosts):
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise self.error(kp + ("hosts", i), 'expected a URL such as '
                                 '"http://10.0.0.1:8008", got %s' % (_describe(url),))
            clean.append(url.rstrip("/"))
        tls = None
        if data.get("tls") is not None:
            t = self.table(data["tls"], kp + ("tls",),
                           ["ca_cert", "client_cert", "client_key", "skip_verify"])
            for key in ("ca_cert", "client_cert", "client_key"):
                if t.get(key) is not None and not isinstance(t[key], str):
                    raise self.error(kp + ("tls", key), "expected a file name, got %s"
                                     % (_describe(t[key]),))
            if t.get("skip_verify") is not None and not isinstance(t["skip_verify"], bool):
                raise self.error(kp + ("tls", "skip_verify"), "expected a boolean (true or "
                                 "false), got %s" % (_describe(t["skip_verify"]),))
            if bool(t.get("client_cert")) != bool(t.get("client_key")):
                missing = "client_key" if t.get("client_cert") else "client_cert"
                raise self.error(kp + ("tls", missing),
                                 "client_cert and client_key go together; set both or neither")
            tls = TLSConfig(t.get("ca_cert"), t.get("client_cert"), t.get("client_key"),
                            bool(t.get("skip_verify", False)))
        ports_raw = data["ports"]
        if not isinstance(ports_raw, dict) or not ports_raw:
            raise self.error(kp + ("ports",), "expected a table of ports by name, got %s"
                             % (_describe(ports_raw),))
        ports = {}
        for port_name, praw in ports_raw.items():
            port = self.port(kp + ("ports", port_name), str(port_name), praw)
            where = _dotted(kp + ("ports", port_name, "listen"))
            if (port.listen_host, port.listen_port) in used:
                raise self.error(kp + ("ports", port_name, "listen"),
                                 "%s is already used by %s"
                                 % (port.listen, used[(port.listen_host, port.listen_port)]))
            used[(port.listen_host, port.listen_port)] = where
            ports[str(port_name)] = port
        return ClusterConfig(name=name, hosts=tuple(clean), ports=ports, tls=tls)

    def port(self, kp: Tuple[Any, ...], name: str, raw: Any) -> PortConfig:
        data = self.table(raw, kp, ["listen", "roles", "host_port", "max_lag_in_bytes"],
                          required=("listen", "roles", "host_port"))
        try:
            host, lport = parse_address(data["listen"])
        except ValueError as e:
            raise self.error(kp + ("listen",), str(e))
        roles = data["roles"]
        if isinstance(roles, str):
            roles = [roles]
        if not isinstance(roles, list) or not roles:
            raise self.error(kp + ("roles",), "expected a list of roles (%s), got %s"
                             % (", ".join(ROLES), _describe(roles)))
        for i, role in enumerate(roles):
            if role not in ROLES:
                problem = "unknown role %s (use %s)" % (_describe(role), ", ".join(ROLES))
                if role in ("master", "primary"):
                    problem += '; the leader role is spelled "leader"'
                elif role in ("replica", "sync_standby"):
                    problem += '; Patroni\'s sync_standby is "sync", its replica "async"'
                raise self.error(kp + ("roles", i), problem)
        host_port = data["host_port"]
        if isinstance(host_port, bool) or not isinstance(host_port, int) \
                or not 1 <= host_port <= 65535:
            raise self.error(kp + ("host_port",), "expected a port number (1..65535), got %s"
                             % (_describe(host_port),))
        max_lag = None
        if data.get("max_lag_in_bytes") is not None:
            try:
                max_lag = parse_size(data["max_lag_in_bytes"])
            except ValueError as e:
                raise self.error(kp + ("max_lag_in_bytes",), str(e))
        return PortConfig(name=name, listen=data["listen"], listen_host=host, listen_port=lport,
                          roles=tuple(dict.fromkeys(roles)), host_port=host_port,
                          max_lag_in_bytes=max_lag)


def loads(text: str, path: str = "<string>") -> ProxyConfig:
    """Parse and validate YAML text; see L{load}."""
    data, lines = _parse_yaml(text, path)
    return _Builder(path, lines).build(data)


def load(path: str) -> ProxyConfig:
    """
    Read and validate the file at C{path}.

    @raise ConfigError: the file cannot be read or is not valid; the message names the key.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, "cannot read the file: %s" % (e.strerror or e,))
    except UnicodeDecodeError as e:
        raise ConfigError(path, "not UTF-8 text: %s" % (e,))
    return loads(text, path)
