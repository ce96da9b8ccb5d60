"""
twistd plugin for patroni_proxy: C{twistd [-n] patroni_proxy -c FILE}.

Lives in twisted/plugins without an __init__.py, as Twisted's plugin system requires; the real
work is in L{pgdoorman.patroni.tap}.
"""

from twisted.application.service import ServiceMaker

patroni_proxy = ServiceMaker("patroni_proxy", "pgdoorman.patroni.tap",
                             "Role-aware TCP proxy in front of a Patroni cluster",
                             "patroni_proxy")
