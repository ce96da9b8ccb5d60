"""
Encoding and decoding of protocol messages.

Only what the pooler itself produces or must look inside is here: relayed traffic stays bytes.
Every regular message is a one-byte code, an int32 length that counts itself but not the code,
and a payload.  Startup-phase packets (StartupMessage, SSLRequest, CancelRequest) have no code.
"""

from __future__ import annotations

import struct
from typing import Dict, Iterable, List, Optional, Tuple

_int32 = struct.Struct("!i")
_uint32 = struct.Struct("!I")
_header = struct.Struct("!cI")

PROTOCOL_VERSION = 196608  # 3.0
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

#: PostgreSQL's own limit on a startup packet (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10000

# Backend message codes, as ints so they compare with bytes[i] without allocation.
AUTHENTICATION = ord("R")
PARAMETER_STATUS = ord("S")
BACKEND_KEY_DATA = ord("K")
READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
NEGOTIATE_PROTOCOL_VERSION = ord("v")

# Frontend message codes.
QUERY = ord("Q")
PARSE = ord("P")
BIND = ord("B")
EXECUTE = ord("E")
DESCRIBE = ord("D")
CLOSE = ord("C")
FLUSH = ord("H")
SYNC = ord("S")
TERMINATE = ord("X")
FUNCTION_CALL = ord("F")
PASSWORD = ord("p")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")

# Authentication request subtypes.
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

TERMINATE_MESSAGE = b"X\x00\x00\x00\x04"
SYNC_MESSAGE = b"S\x00\x00\x00\x04"


def message(code: bytes, payload: bytes = b"") -> bytes:
    """Frame one regular message."""
    return code + _uint32.pack(len(payload) + 4) + payload


def cstring(s: str) -> bytes:
    return s.encode("utf-8") + b"\x00"


# -- backend messages the pooler sends to clients ---------------------------------------------

def authentication(kind: int, data: bytes = b"") -> bytes:
    return message(b"R", _int32.pack(kind) + data)


def authentication_ok() -> bytes:
    return authentication(AUTH_OK)


def authentication_md5(salt: bytes) -> bytes:
    return authentication(AUTH_MD5, salt)


def authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    return authentication(AUTH_SASL, b"".join(cstring(m) for m in mechanisms) + b"\x00")


def authentication_sasl_continue(data: bytes) -> bytes:
    return authentication(AUTH_SASL_CONTINUE, data)


def authentication_sasl_final(data: bytes) -> bytes:
    return authentication(AUTH_SASL_FINAL, data)


#: (name, value) -> ParameterStatus bytes: every login sends a dozen, nearly always the same.
_parameter_status: dict = {}


def parameter_status(name: str, value: str) -> bytes:
    key = (name, value)
    m = _parameter_status.get(key)
    if m is None:
        m = message(b"S", cstring(name) + cstring(value))
        if len(_parameter_status) >= 4096:  # values a client SETs are not kept forever
            _parameter_status.clear()
        _parameter_status[key] = m
    return m


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", _int32.pack(pid) + _int32.pack(secret))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def command_complete(tag: str) -> bytes:
    return message(b"C", cstring(tag))


def negotiate_protocol_version(minor: int, unrecognized: List[str]) -> bytes:
    return message(b"v", _int32.pack(minor) + _int32.pack(len(unrecognized))
                   + b"".join(cstring(o) for o in unrecognized))


def _fields(severity: str, sqlstate: str, text: str, detail: Optional[str],
            hint: Optional[str]) -> bytes:
    out = [b"S", cstring(severity), b"V", cstring(severity), b"C", cstring(sqlstate),
           b"M", cstring(text)]
    if detail:
        out += [b"D", cstring(detail)]
    if hint:
        out += [b"H", cstring(hint)]
    out.append(b"\x00")
    return b"".join(out)


def error_response(severity: str, sqlstate: str, text: str, detail: Optional[str] = None,
                   hint: Optional[str] = None) -> bytes:
    return message(b"E", _fields(severity, sqlstate, text, detail, hint))


def notice_response(severity: str, sqlstate: str, text: str, detail: Optional[str] = None,
                    hint: Optional[str] = None) -> bytes:
    return message(b"N", _fields(severity, sqlstate, text, detail, hint))


def parse_fields(payload: bytes) -> Dict[str, str]:
    """Decode the fields of an ErrorResponse or NoticeResponse payload, keyed by field code."""
    fields = {}
    for part in payload.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


# -- frontend messages the pooler sends to servers --------------------------------------------

def startup_message(params: Dict[str, str]) -> bytes:
    body = _int32.pack(PROTOCOL_VERSION) + b"".join(
        cstring(k) + cstring(v) for k, v in params.items()) + b"\x00"
    return _int32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, pid, secret)


def query(sql: str) -> bytes:
    return message(b"Q", cstring(sql))


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstring(mechanism) + _int32.pack(len(data)) + data)


# -- decoders ---------------------------------------------------------------------------------

def parse_startup_params(payload: bytes) -> Dict[str, str]:
    """
    Decode the name/value pairs of a StartupMessage (the payload after the version).

    @raise ValueError: when the list is not NUL-terminated pairs.
    """
    parts = payload.split(b"\x00")
    # A well-formed list ends with an empty name and then the end of the packet: "...\0\0".
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ValueError("invalid startup packet layout: expected terminator as last byte")
    parts = parts[:-2]
    if len(parts) % 2:
        raise ValueError("invalid startup packet layout: a parameter has no value")
    params = {}
    for i in range(0, len(parts), 2):
        params[parts[i].decode("utf-8", "replace")] = parts[i + 1].decode("utf-8", "replace")
    return params


def parse_parameter_status(payload: bytes) -> Tuple[str, str]:
    name, value = payload.split(b"\x00")[:2]
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parse_sasl_mechanisms(data: bytes) -> List[str]:
    return [m.decode() for m in data.split(b"\x00") if m]


def parse_sasl_initial_response(payload: bytes) -> Tuple[str, bytes]:
    """Split a SASLInitialResponse payload into mechanism name and client-first-message."""
    nul = payload.index(b"\x00")
    mechanism = payload[:nul].decode("ascii", "replace")
    (length,) = _int32.unpack_from(payload, nul + 1)
    data = payload[nul + 5:]
    if length == -1:
        data = b""
    elif length != len(data):
        raise ValueError("malformed SASLInitialResponse")
    return mechanism, data


def parse_row_description(payload: bytes) -> List[str]:
    """The column names of a RowDescription."""
    (n,) = struct.unpack_from("!h", payload)
    pos, names = 2, []
    for _ in range(n):
        end = payload.index(b"\x00", pos)
        names.append(payload[pos:end].decode("utf-8", "replace"))
        pos = end + 1 + 18  # table oid, attnum, type oid, typlen, typmod, format
    return names


def parse_data_row(payload: bytes) -> List[Optional[str]]:
    """A DataRow's values as text (None for NULL), for the few queries the pooler runs."""
    (count,) = struct.unpack_from("!h", payload)
    pos = 2
    row: List[Optional[str]] = []
    for _ in range(count):
        (length,) = _int32.unpack_from(payload, pos)
        pos += 4
        if length < 0:
            row.append(None)
        else:
            row.append(payload[pos:pos + length].decode("utf-8", "replace"))
            pos += length
    return row


def split_messages(buf: bytes) -> Tuple[List[Tuple[int, bytes]], bytes]:
    """
    Split a buffer into complete (code, payload) messages and the incomplete rest.

    For the low-volume phases (startup, authentication); the relay never builds message lists.
    """
    out = []
    pos = 0
    n = len(buf)
    while n - pos >= 5:
        (length,) = _uint32.unpack_from(buf, pos + 1)
        if length < 4:
            raise ValueError("invalid message length %d" % length)
        end = pos + 1 + length
        if end > n:
            break
        out.append((buf[pos], buf[pos + 5:end]))
        pos = end
    return out, buf[pos:]
