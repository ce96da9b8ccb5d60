"""
Authentication for both sides of the pooler, one small module per method.

Each module is pure computation (no sockets, no Twisted) so that the client-facing and
server-facing protocols only frame messages and call in here, and so that every method can be
tested alone.
"""
