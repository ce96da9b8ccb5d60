"""
patroni_proxy as one Twisted service: a L{ClusterWatcher} per cluster plus the HTTP API, and
the SIGHUP reload that reconciles them with a re-read file.
"""

from __future__ import annotations

import signal
from typing import Any, Dict, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from pgdoorman.patroni import config as _config
from pgdoorman.patroni.proxy import ClusterWatcher

__all__ = ["ProxyService", "make_service"]


class ProxyService(service.MultiService):
    """
    Everything patroni_proxy runs.

    @ivar watchers: L{ClusterWatcher} by cluster name.
    @ivar handle_sighup: install a SIGHUP handler that calls L{reload} (the console script
        and the twistd plugin both do; tests building the service in-process do not).
    """

    log = Logger()

    def __init__(self, config: _config.ProxyConfig, reactor: Any = None,
                 handle_sighup: bool = True) -> None:
        service.MultiService.__init__(self)
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.handle_sighup = handle_sighup
        self.watchers: Dict[str, ClusterWatcher] = {}
        self.api_port: Any = None
        self.reloads_total = 0
        self.reload_errors_total = 0
        for name, cluster in config.clusters.items():
            self._add_watcher(cluster)

    def _add_watcher(self, cluster: _config.ClusterConfig) -> ClusterWatcher:
        watcher = ClusterWatcher(self.reactor, cluster, self.config.cluster_update_interval)
        self.watchers[cluster.name] = watcher
        watcher.setServiceParent(self)
        return watcher

    def startService(self) -> None:
        self._listen_api()
        service.MultiService.startService(self)
        if self.handle_sighup:
            signal.signal(signal.SIGHUP, self._sighup)

    def stopService(self) -> defer.Deferred:
        ds = [service.MultiService.stopService(self)]
        if self.api_port is not None:
            ds.append(defer.maybeDeferred(self.api_port.stopListening))
            self.api_port = None
        return defer.DeferredList(ds)

    def _listen_api(self) -> None:
        from twisted.web.server import Site

        from pgdoorman.patroni.api import APIRoot
        site = Site(APIRoot(self))
        site.noisy = False
        self.api_port = self.reactor.listenTCP(self.config.listen_port, site,
                                               interface=self.config.listen_host)

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    # -- operations ------------------------------------------------------------------------------

    def update_all(self) -> defer.Deferred:
        """Poll every cluster now; fires with {cluster: None or error text}."""
        names = list(self.watchers)
        d = defer.gatherResults([self.watchers[n].update() for n in names])
        d.addCallback(lambda outcomes: dict(zip(names, outcomes)))
        return d

    def reload(self, new: Optional[_config.ProxyConfig] = None) -> bool:
        """
        Re-read the file (or take C{new}) and apply it; a bad file is logged and the running
        configuration kept.  Returns whether the new configuration was applied.
        """
        if new is None:
            try:
                new = _config.load(self.config.path)
            except _config.ConfigError as e:
                self.reload_errors_total += 1
                self.log.error("reload: keeping the running configuration: {error}", error=str(e))
                return False
        old = self.config
        self.config = new
        for name in list(self.watchers):
            if name not in new.clusters:
                watcher = self.watchers.pop(name)
                watcher.disownServiceParent()
                self.log.info("reload: cluster {cluster} removed", cluster=name)
        for name, cluster in new.clusters.items():
            watcher = self.watchers.get(name)
            if watcher is None:
                self._add_watcher(cluster)
                self.log.info("reload: cluster {cluster} added", cluster=name)
            else:
                watcher.reconfigure(cluster, new.cluster_update_interval)
        if (new.listen_host, new.listen_port) != (old.listen_host, old.listen_port) \
                and self.running:
            if self.api_port is not None:
                self.api_port.stopListening()
            self._listen_api()
        self.reloads_total += 1
        self.log.info("reload: configuration {path} applied", path=new.path)
        return True

    def status(self) -> Dict[str, Any]:
        from pgdoorman import __version__
        return {"version": __version__,
                "cluster_update_interval": self.config.cluster_update_interval,
                "clusters": {name: w.status() for name, w in self.watchers.items()}}


def make_service(config: _config.ProxyConfig, reactor: Any = None,
                 handle_sighup: bool = True) -> ProxyService:
    return ProxyService(config, reactor=reactor, handle_sighup=handle_sighup)
