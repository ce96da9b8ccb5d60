"""
PostgreSQL's md5 password authentication (AuthenticationMD5Password).

PostgreSQL stores C{"md5" + hex(md5(password + user))} and challenges with a 4-byte salt; the
client answers C{"md5" + hex(md5(hex(md5(password + user)) + salt))}.  Only the stored hash enters
the answer, never the plaintext, which is why a pooler that knows just the hash can still log in
to a server (PgBouncer's C{auth_query} relies on this).

See U{https://www.postgresql.org/docs/15/protocol-flow.html#id-1.10.6.7.3} and
U{https://www.postgresql.org/docs/15/auth-password.html}.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["md5_hash", "md5_response", "md5_verify", "is_md5_hash"]

_HEX = frozenset("0123456789abcdef")


def is_md5_hash(secret: str) -> bool:
    """
    Whether C{secret} is a stored md5 hash rather than a plaintext password.

    The same test as PostgreSQL's C{get_password_type()}: "md5" followed by 32 lowercase hex
    digits.  A plaintext password of exactly that shape is indistinguishable, there as here.
    """
    return len(secret) == 35 and secret.startswith("md5") and set(secret[3:]) <= _HEX


def md5_hash(password: str, user: str) -> str:
    """The md5 secret PostgreSQL stores in C{pg_authid.rolpassword} for C{user}."""
    return "md5" + hashlib.md5((password + user).encode("utf-8")).hexdigest()


def md5_response(secret: str, user: str, salt: bytes) -> bytes:
    """
    The PasswordMessage payload answering AuthenticationMD5Password, without the trailing NUL.

    @param secret: the plaintext password, or an already-stored md5 hash (then used as is).
    @param salt: the 4 salt bytes of the server's challenge.
    """
    stored = secret if is_md5_hash(secret) else md5_hash(secret, user)
    return b"md5" + hashlib.md5(stored[3:].encode("ascii") + salt).hexdigest().encode("ascii")


def md5_verify(stored: str, user: str, salt: bytes, response: bytes) -> bool:
    """
    Whether a client's answer to our md5 challenge is right.

    @param stored: the user's md5 hash or plaintext password.
    @param response: the PasswordMessage payload; a trailing NUL (the C string terminator some
        framers leave on) is ignored.
    The comparison takes the same time wherever the first difference is, so that the timing
    does not leak how much of a guess was right.
    """
    if response.endswith(b"\0"):
        response = response[:-1]
    return hmac.compare_digest(md5_response(stored, user, salt), response)
