"""
twistd plugin for pgdoorman: C{twistd [-n] pgdoorman -c FILE}.

Lives in twisted/plugins without an __init__.py, as Twisted's plugin system requires; the real
work is in L{pgdoorman.tap}.
"""

from twisted.application.service import ServiceMaker

pgdoorman = ServiceMaker("pgdoorman", "pgdoorman.tap",
                         "PostgreSQL connection pooler (PgDoorman/PgBouncer compatible)",
                         "pgdoorman")
