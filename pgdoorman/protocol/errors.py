"""
SQLSTATE codes the pooler itself reports, and an exception that carries one.

Clients and their drivers branch on SQLSTATE (psycopg maps them to exception classes), so the
pooler uses PostgreSQL's own code for each condition PostgreSQL also has.
See https://www.postgresql.org/docs/15/errcodes-appendix.html
"""

from __future__ import annotations

from typing import Dict, Optional

from pgdoorman.protocol import messages

PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
CANNOT_CONNECT_NOW = "57P03"
ADMIN_SHUTDOWN = "57P01"
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"
INVALID_CATALOG_NAME = "3D000"
FEATURE_NOT_SUPPORTED = "0A000"
TOO_MANY_CONNECTIONS = "53300"
QUERY_CANCELED = "57014"
INTERNAL_ERROR = "XX000"


class PgError(Exception):
    """
    An error in PostgreSQL's terms: severity, SQLSTATE, message and optional detail and hint.

    Raised for conditions the pooler reports to a client, and built from a server's
    ErrorResponse when a server connection fails, so that the client sees the server's words.
    """

    def __init__(self, sqlstate: str, text: str, severity: str = "FATAL",
                 detail: Optional[str] = None, hint: Optional[str] = None):
        Exception.__init__(self, text)
        self.sqlstate = sqlstate
        self.text = text
        self.severity = severity
        self.detail = detail
        self.hint = hint

    @classmethod
    def from_fields(cls, fields: Dict[str, str]) -> "PgError":
        return cls(fields.get("C", INTERNAL_ERROR), fields.get("M", "unknown error"),
                   fields.get("V", fields.get("S", "ERROR")), fields.get("D"), fields.get("H"))

    def to_bytes(self) -> bytes:
        return messages.error_response(self.severity, self.sqlstate, self.text,
                                       self.detail, self.hint)

    def __str__(self) -> str:
        return "%s %s: %s" % (self.severity, self.sqlstate, self.text)
