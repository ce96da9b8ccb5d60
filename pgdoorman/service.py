"""
Putting the pooler together: the pool service and the listening port under one MultiService.

twistd (through the plugin) and the C{pgdoorman} command both build the same service here, so
the two ways of running behave the same.
"""

from __future__ import annotations

from twisted.application import internet, service

from pgdoorman.client import ClientFactory
from pgdoorman.pool import PoolService


class PgDoormanService(service.MultiService):
    """
    The whole pooler.  C{pools} holds the shared pools; C{factory} accepts clients.
    """

    def __init__(self, config):
        service.MultiService.__init__(self)
        self.config = config
        self.pools = PoolService(config)
        self.pools.setServiceParent(self)
        self.factory = ClientFactory(self.pools)
        g = config.general
        self.listener = internet.TCPServer(g.port, self.factory, backlog=g.backlog or 1024,
                                           interface=g.host)
        self.listener.setServiceParent(self)


def make_service(config) -> PgDoormanService:
    return PgDoormanService(config)
