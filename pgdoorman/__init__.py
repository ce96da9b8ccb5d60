"""
pgdoorman: a PostgreSQL connection pooler on Twisted, a drop-in for PgDoorman and PgBouncer.
"""

__version__ = "0.1.0"
