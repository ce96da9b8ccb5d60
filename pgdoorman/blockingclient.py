"""
A small blocking PostgreSQL client: startup, authentication, simple Query, rows as text.

C{pgdoorman generate} reads a handful of catalog rows once; this is enough for that without a
driver, so generate works after a plain C{pip install .}.  It speaks the same protocol code as
the pooler (L{pgdoorman.protocol.messages}) and logs in with the same authentication code
(L{pgdoorman.auth.md5}, L{pgdoorman.auth.scram}): cleartext, md5 and SCRAM-SHA-256.

Connection parameters follow libpq's rules where generate needs them: unset values come from
C{PGHOST}, C{PGPORT}, C{PGUSER}, C{PGPASSWORD}, C{PGDATABASE} and the password file
(C{PGPASSFILE} or C{~/.pgpass}); a host that starts with C{/} is a Unix socket directory;
C{sslmode} is C{disable}, C{prefer} or C{require} (no certificate checks, as libpq's
C{require}).  It is not a driver: no extended protocol, no COPY, no type conversion.
"""

from __future__ import annotations

import getpass
import os
import socket
import ssl
import struct
from typing import Dict, List, Optional, Tuple

from pgdoorman.auth.md5 import md5_response
from pgdoorman.auth.scram import ScramClient, ScramError
from pgdoorman.protocol import messages as m

__all__ = ["Connection", "ConnectError", "QueryError", "connect"]

_int32 = struct.Struct("!i")

#: Where libpq (as Debian builds it) looks for the server's socket when no host is given.
DEFAULT_SOCKET_DIRS = ("/var/run/postgresql", "/tmp")


class ConnectError(Exception):
    """Could not connect or log in; the message reads like libpq's."""


class QueryError(Exception):
    """The server answered a query with an ErrorResponse."""

    def __init__(self, fields: Dict[str, str]) -> None:
        self.fields = fields
        self.sqlstate = fields.get("C", "")
        Exception.__init__(self, "%s:  %s" % (fields.get("S", "ERROR"), fields.get("M", "")))


def _default_host(port: int) -> str:
    for directory in DEFAULT_SOCKET_DIRS:
        if os.path.exists(os.path.join(directory, ".s.PGSQL.%d" % port)):
            return directory
    return "localhost"


def _pgpass_field(field: str, value: str) -> bool:
    return field == "*" or field == value


def _split_pgpass(line: str) -> List[str]:
    """The five ':'-separated fields of a password file line, with libpq's backslash escapes."""
    fields, current, escaped = [], [], False
    for ch in line:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":" and len(fields) < 4:
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
    fields.append("".join(current))
    return fields


def password_from_file(host: str, port: int, database: str, user: str,
                       path: Optional[str] = None) -> Optional[str]:
    """The password for these parameters from the password file, as libpq finds it."""
    path = path or os.environ.get("PGPASSFILE") or os.path.expanduser("~/.pgpass")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    # libpq matches "localhost" for connections over the default Unix socket too.
    hosts = {host, "localhost"} if host.startswith("/") else {host}
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = _split_pgpass(line)
        if len(fields) != 5:
            continue
        h, p, d, u, password = fields
        if (h == "*" or h in hosts) and _pgpass_field(p, str(port)) \
                and _pgpass_field(d, database) and _pgpass_field(u, user):
            return password
    return None


class Connection:
    """
    One logged-in connection.  C{query(sql)} returns the rows of the last result as lists of
    text (C{None} for NULL); C{parameters} holds the server's ParameterStatus values.

    @ivar host: the host or socket directory connected to.
    @ivar port: the port.
    """

    def __init__(self, sock: socket.socket, host: str, port: int) -> None:
        self._sock = sock
        self._buf = b""
        self.host = host
        self.port = port
        self.parameters: Dict[str, str] = {}
        self.backend_key: Optional[Tuple[int, int]] = None

    # -- framing -------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectError("server closed the connection unexpectedly")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _message(self) -> Tuple[int, bytes]:
        header = self._read(5)
        code = header[0]
        (length,) = _int32.unpack_from(header, 1)
        if length < 4:
            raise ConnectError("invalid message length %d from the server" % length)
        return code, self._read(length - 4)

    # -- login ---------------------------------------------------------------------------------

    def _login(self, user: str, database: str, password: Optional[str],
               params: Dict[str, str]) -> None:
        startup = {"user": user, "database": database}
        startup.update(params)
        self._send(m.startup_message(startup))
        scram: Optional[ScramClient] = None
        while True:
            code, payload = self._message()
            if code == m.ERROR_RESPONSE:
                fields = m.parse_fields(payload)
                raise ConnectError("%s:  %s" % (fields.get("S", "FATAL"),
                                                   fields.get("M", "")))
            if code == m.AUTHENTICATION:
                (kind,) = _int32.unpack_from(payload, 0)
                data = payload[4:]
                if kind == m.AUTH_OK:
                    continue
                if kind in (m.AUTH_CLEARTEXT, m.AUTH_MD5, m.AUTH_SASL) and password is None:
                    raise ConnectError("fe_sendauth: no password supplied")
                if kind == m.AUTH_CLEARTEXT:
                    self._send(m.password_message(m.cstring(password)))
                elif kind == m.AUTH_MD5:
                    self._send(m.password_message(
                        md5_response(password, user, data[:4]) + b"\x00"))
                elif kind == m.AUTH_SASL:
                    mechanisms = m.parse_sasl_mechanisms(data)
                    if "SCRAM-SHA-256" not in mechanisms:
                        raise ConnectError("none of the server's SASL authentication "
                                              "mechanisms are supported: %s"
                                              % ", ".join(mechanisms))
                    scram = ScramClient(password=password)
                    self._send(m.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
                elif kind == m.AUTH_SASL_CONTINUE and scram is not None:
                    try:
                        self._send(m.password_message(scram.handle_server_first(data)))
                    except ScramError as e:
                        raise ConnectError(str(e))
                elif kind == m.AUTH_SASL_FINAL and scram is not None:
                    try:
                        scram.handle_server_final(data)
                    except ScramError as e:
                        raise ConnectError(str(e))
                else:
                    raise ConnectError("authentication method %d is not supported" % kind)
            elif code == m.PARAMETER_STATUS:
                name, value = m.parse_parameter_status(payload)
                self.parameters[name] = value
            elif code == m.BACKEND_KEY_DATA:
                self.backend_key = struct.unpack("!ii", payload[:8])
            elif code == m.READY_FOR_QUERY:
                return
            elif code in (m.NOTICE_RESPONSE, m.NEGOTIATE_PROTOCOL_VERSION):
                continue
            else:
                raise ConnectError("unexpected message %r during login" % chr(code))

    # -- queries -------------------------------------------------------------------------------

    def query(self, sql: str) -> List[List[Optional[str]]]:
        """
        Run C{sql} (simple Query) and return the rows of its last result.

        @raise QueryError: the server answered with an error (the connection stays usable).
        """
        self._send(m.query(sql))
        rows: List[List[Optional[str]]] = []
        error: Optional[Dict[str, str]] = None
        while True:
            code, payload = self._message()
            if code == ord("T"):
                rows = []
            elif code == ord("D"):
                rows.append(m.parse_data_row(payload))
            elif code == m.ERROR_RESPONSE:
                error = m.parse_fields(payload)
            elif code == m.PARAMETER_STATUS:
                name, value = m.parse_parameter_status(payload)
                self.parameters[name] = value
            elif code == m.READY_FOR_QUERY:
                if error is not None:
                    raise QueryError(error)
                return rows
            # CommandComplete, EmptyQueryResponse, NoticeResponse: nothing to keep.

    def close(self) -> None:
        try:
            self._send(m.TERMINATE_MESSAGE)
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(host: str, port: int, timeout: float) -> socket.socket:
    if host.startswith("/"):
        path = os.path.join(host, ".s.PGSQL.%d" % port)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise ConnectError('connection to server on socket "%s" failed: %s'
                                  % (path, e.strerror or e))
        return sock
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ConnectError('connection to server at "%s", port %d failed: %s'
                              % (host, port, e.strerror or e))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _start_tls(sock: socket.socket, host: str, sslmode: str) -> socket.socket:
    """Ask for TLS (SSLRequest); returns the socket to use."""
    sock.sendall(struct.pack("!ii", 8, m.SSL_REQUEST_CODE))
    answer = sock.recv(1)
    if answer == b"S":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # libpq's sslmode=require checks nothing either
        try:
            return ctx.wrap_socket(sock, server_hostname=None if _is_ip(host) else host)
        except (ssl.SSLError, OSError) as e:
            sock.close()
            raise ConnectError("SSL error: %s" % (e,))
    if answer == b"N":
        if sslmode == "require":
            sock.close()
            raise ConnectError("server does not support SSL, but SSL was required")
        return sock
    sock.close()
    raise ConnectError("received invalid response to SSL negotiation: %r" % (answer,))


def _is_ip(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False


def connect(host: Optional[str] = None, port: Optional[int] = None,
            user: Optional[str] = None, password: Optional[str] = None,
            dbname: Optional[str] = None, sslmode: str = "prefer",
            connect_timeout: float = 10.0, application_name: Optional[str] = None
            ) -> Connection:
    """
    Connect and log in, filling unset parameters as libpq does.

    @raise ConnectError: cannot reach the server, TLS refused with C{sslmode="require"},
        or the server refused the login (its message).
    """
    env = os.environ
    port = int(port or env.get("PGPORT") or 5432)
    host = host or env.get("PGHOST") or _default_host(port)
    user = user or env.get("PGUSER") or getpass.getuser()
    dbname = dbname or env.get("PGDATABASE") or user
    if password is None:
        password = env.get("PGPASSWORD") or None
    if password is None:
        password = password_from_file(host, port, dbname, user)
    sslmode = sslmode or env.get("PGSSLMODE") or "prefer"
    sock = _open(host, port, connect_timeout)
    try:
        # As libpq: no TLS over a Unix socket, whatever sslmode says.
        if not host.startswith("/") and sslmode != "disable":
            sock = _start_tls(sock, host, sslmode)
        conn = Connection(sock, host, port)
        params = {"application_name": application_name} if application_name else {}
        conn._login(user, dbname, password, params)
    except ConnectError:
        sock.close()
        raise
    except OSError as e:
        sock.close()
        raise ConnectError("connection to server failed: %s" % (e.strerror or e,))
    return conn
