"""
Transparent prepared statements in transaction mode: the statements themselves.

A client's named statement lives on whichever server connection ran its Parse, yet its next
transaction may land elsewhere.  So the pooler keeps, per client, the client's names and the
statements behind them, and renames each statement on the wire to a server-side name derived
from a hash (xxhash3) of its query text and parameter types: C{DOORMAN_<16 hex digits>}.  Every
client that prepares the same text shares the server-side copy.  Each server connection keeps
an LRU of the names it holds; a Bind or Describe for a statement the server lacks is preceded by
an injected Parse, and what the LRU evicts is Closed on the server.

The replies must reach the client exactly as PostgreSQL would have sent them, in order, even
though the pooler added and changed messages.  Only ParseComplete and CloseComplete replies are
affected, so each server's L{pgdoorman.link.Link} keeps one queue of entries, one per Parse,
Close and Sync-like message sent (L{pgdoorman.remap} writes them): each
ParseComplete/CloseComplete pops one and is forwarded, swallowed or turned into a
ParseComplete; an ErrorResponse drops the entries up to the next Sync, because PostgreSQL
skips those messages after an error.  When the server
already holds a statement the client Parses, the pooler sends a Close of a name nobody has
instead: PostgreSQL answers CloseComplete at exactly the position the ParseComplete belongs,
and the server side rewrites it.  No positions are computed by hand.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict
from typing import Dict, Optional

import xxhash

from pgdoorman.protocol import messages

_uint32 = struct.Struct("!I")

#: Server-side names carry this prefix; the client never sees them (errors are rewritten).
PREFIX = b"DOORMAN_"

PARSE_COMPLETE = b"1\x00\x00\x00\x04"
#: Close of a statement no server has: PostgreSQL answers CloseComplete and does nothing else.
CLOSE_NOTHING = messages.message(b"C", b"S" + PREFIX + b"NONE\x00")
#: A DEALLOCATE that always fails, for a name the client never prepared (its error is replaced).
DEALLOCATE_NOTHING = messages.query('DEALLOCATE "%sNONE"' % PREFIX.decode())
#: A Parse that always fails without creating anything, to make PostgreSQL enter the error
#: state (skip to Sync, abort the implicit transaction) exactly where the client's would.
PARSE_FAILING = messages.message(b"P", PREFIX + b"ERROR\x00DOORMAN_ERROR\x00\x00\x00")


#: A statement body that is not a Parse payload but the tail of an SQL PREPARE with parameter
#: types (type names only PostgreSQL can turn into OIDs): such a statement is created on a
#: server by SQL, never by a Parse.  (A Parse payload cannot start with a NUL: that would be
#: the empty query text, and this key is never sent.)
SQL_KEY = b"\x00PREPARE\x00"


class Statement:
    """
    One prepared statement: its server-side name and the Parse payload after the name.

    @ivar create: for a statement only SQL can create (L{SQL_KEY}), the PREPARE that creates
        it under its server-side name; C{parse} and C{reparse} are then None.
    """

    __slots__ = ("name", "body", "parse", "parsed", "reparse", "create", "sql")

    def __init__(self, name: bytes, body: bytes):
        self.name = name
        self.body = body
        #: for a statement whose text is an SQL EXECUTE, DEALLOCATE or PREPARE of a named
        #: statement (L{sql_statement}): what it names, mapped for each client at each Bind.
        self.sql = None
        if body.startswith(SQL_KEY):
            self.parsed = False
            self.parse = self.reparse = None
            self.create = messages.message(
                b"Q", b'PREPARE "%s" %s\x00' % (name, body[len(SQL_KEY):]))
            return
        self.create = None
        if body and body[0] in _SQL_FIRST:
            self.sql = sql_statement(body)
        #: some server answered a Parse of it with ParseComplete: the text is valid, so a
        #: client's Parse of it can be answered without a server (see ClientConnection).
        self.parsed = False
        #: The whole Parse message under the server-side name, built once.
        self.parse = b"P" + _uint32.pack(len(name) + 1 + len(body) + 4) + name + b"\x00" + body
        #: Close, then Parse: what a server that should not hold it gets.  The Close makes the
        #: Parse succeed even where the server holds the statement after all (a DEALLOCATE
        #: that failed in an aborted transaction), so a record that under-reports costs nothing.
        self.reparse = close_statement(name) + self.parse

    @property
    def query(self) -> str:
        if self.create is not None:
            return self.body[len(SQL_KEY):].decode("utf-8", "replace")
        return self.body[:self.body.index(b"\x00")].decode("utf-8", "replace")


def server_name(body: bytes) -> bytes:
    """The server-side name for a statement: a hash of its query text and parameter types."""
    return b"%s%016x" % (PREFIX, xxhash.xxh3_64_intdigest(body))


class StatementCache:
    """
    The pool's one copy of each statement text, shared by its clients, bounded in size.

    Clients keep references to their own statements, so dropping an entry here only stops
    new clients from sharing that copy; nothing breaks.
    """

    def __init__(self, size: int):
        self.size = size
        self.statements: Dict[bytes, Statement] = {}
        #: client Parses answered from a server that already held the statement.
        self.hits = 0
        #: Parses sent to a server: a client's (first time on that server) or injected.
        self.misses = 0
        #: of the misses, those injected before a Bind/Describe (no client Parse behind them).
        self.reparses = 0
        self.evictions = 0
        #: Binds of named statements sent on (SHOW STATS bind_count, as PgBouncer counts).
        self.binds = 0
        #: anonymous Parses remapped to named statements (hits and misses count them too).
        self.anonymous = 0

    def get(self, body: bytes) -> Statement:
        name = server_name(body)
        stmt = self.statements.get(name)
        if stmt is None:
            stmt = self.statements[name] = Statement(name, body)
            if self.size and len(self.statements) > self.size:
                del self.statements[next(iter(self.statements))]
        return stmt


class ServerStatements:
    """The statements one server connection holds, least recently used first."""

    __slots__ = ("names", "size")

    def __init__(self, size: int):
        self.names: "OrderedDict[bytes, None]" = OrderedDict()
        self.size = size

    def has(self, name: bytes) -> bool:
        """Whether the server holds C{name}, which becomes the most recently used."""
        names = self.names
        if name in names:
            names.move_to_end(name)
            return True
        return False

    #: (the relay calls has(): a Python __contains__ costs a slot dispatch on every Bind)
    __contains__ = has

    def add(self, name: bytes) -> Optional[bytes]:
        """Remember C{name}; return the name evicted to make room, if any."""
        self.names[name] = None
        if self.size and len(self.names) > self.size:
            return self.names.popitem(last=False)[0]
        return None

    def discard(self, name: bytes) -> None:
        self.names.pop(name, None)

    def restore(self, name: bytes) -> None:
        """A Close of C{name} was skipped: the server still holds it, as the oldest entry."""
        if name not in self.names:
            self.names[name] = None
            self.names.move_to_end(name, last=False)

    def clear(self) -> None:
        self.names.clear()


def close_statement(name: bytes) -> bytes:
    return messages.message(b"C", b"S" + name + b"\x00")


def does_not_exist(name: bytes) -> bytes:
    """PostgreSQL's words for a Bind, Describe or DEALLOCATE of a statement it lacks."""
    if not name:
        return messages.error_response("ERROR", "26000",
                                       "unnamed prepared statement does not exist")
    return messages.error_response(
        "ERROR", "26000", 'prepared statement "%s" does not exist'
        % name.decode("utf-8", "replace"))


def already_exists(name: bytes) -> bytes:
    return messages.error_response(
        "ERROR", "42P05", 'prepared statement "%s" already exists'
        % name.decode("utf-8", "replace"))


_DEALLOCATE = re.compile(
    rb'^\s*deallocate\s+(?:prepare\s+)?(all|"(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)\s*;?\s*$',
    re.IGNORECASE)
_DISCARD_ALL = re.compile(rb"^\s*discard\s+all\s*;?\s*$", re.IGNORECASE)


def parse_deallocate(query: bytes):
    """
    For a simple query C{DEALLOCATE [PREPARE] name|ALL} return the client's statement name
    (as it would be stored by a protocol-level Parse) or C{True} for ALL; C{None} otherwise.
    """
    m = _DEALLOCATE.match(query)
    if m is None:
        return None
    name = m.group(1)
    if name.lower() == b"all":
        return True
    return _ident(name)


def is_discard_all(query: bytes) -> bool:
    return _DISCARD_ALL.match(query) is not None


_PREPARES = re.compile(rb"prepare\s", re.IGNORECASE).search


def may_drop_statements(query: bytes) -> bool:
    """
    A query that may DEALLOCATE or DISCARD statements in a way we do not parse (among other
    statements, in a function): the server's record of its statements is then unknown.  This
    runs for every Query on the relay's fast path, which sends a Query of more than one
    statement (a PREPARE after a ';', say) to a look at the whole text anyway.

    A lower() and find()s: a tenth of the instructions of a case-blind regex search
    (callgrind: 5,000 instructions a query for the regex), and the same meaning, since both
    fold ASCII only.  find(), not "in": bytes.__contains__ first tries its argument as an
    integer and formats a TypeError for it (2,000 instructions) before it searches.
    """
    low = query.lower()
    return low.find(b"deallocate") >= 0 or low.find(b"discard") >= 0


def may_touch_statements(query: bytes) -> bool:
    """L{may_drop_statements} for a query looked at anyway: PREPARE anywhere in it."""
    low = query.lower()
    return low.find(b"deallocate") >= 0 or low.find(b"discard") >= 0 or \
        (low.find(b"prepare") >= 0 and _PREPARES(query) is not None)


# -- SQL PREPARE and EXECUTE ------------------------------------------------------------------

#: An SQL identifier, as PostgreSQL's scanner reads one: quoted, or unquoted (folded).
_IDENT = rb'("(?:[^"]|"")+"|[a-z_\x80-\xff][a-z0-9_$\x80-\xff]*)'
_END = rb"(?![a-z0-9_$\x80-\xff])"
_PREPARE = re.compile(
    rb"^\s*prepare\s+" + _IDENT + _END + rb"\s*(\((?:[^()]|\([^()]*\))*\))?\s*as" + _END,
    re.IGNORECASE | re.DOTALL)
_PREPARE_TRANSACTION = re.compile(rb"^\s*prepare\s+transaction\s*'", re.IGNORECASE)
_EXECUTE = re.compile(
    rb"^\s*(?:explain\s*(?:\((?:[^()]|\([^()]*\))*\)\s*|(?:analy[sz]e|verbose)\s+)*)?"
    rb"execute\s+" + _IDENT + _END,
    re.IGNORECASE | re.DOTALL)


def _ident(token: bytes) -> bytes:
    if token.startswith(b'"'):
        return token[1:-1].replace(b'""', b'"')
    return token.lower()  # unquoted identifiers fold to lower case (ASCII only, as PostgreSQL)


def one_statement(text: bytes) -> bool:
    """
    Whether C{text} (the end of a statement) holds no second statement: no ';' outside
    quotes, comments and dollar quotes is followed by anything but blanks and comments.
    """
    if text.find(b";") < 0:
        return True
    i = 0
    n = len(text)
    ended = False
    while i < n:
        c = text[i]
        if c in b" \t\r\n\f":
            i += 1
            continue
        if c == 45 and text[i + 1:i + 2] == b"-":  # -- comment
            j = text.find(b"\n", i)
            i = n if j < 0 else j + 1
            continue
        if c == 47 and text[i + 1:i + 2] == b"*":  # /* comment */, nested
            depth = 1
            i += 2
            while i < n and depth:
                if text[i:i + 2] == b"/*":
                    depth += 1
                    i += 2
                elif text[i:i + 2] == b"*/":
                    depth -= 1
                    i += 2
                else:
                    i += 1
            continue
        if c == 59:  # ;
            ended = True
            i += 1
            continue
        if ended:
            return False
        if c == 39:  # '...', E'...' (backslash escapes) by the letter before it
            escapes = i > 0 and text[i - 1] in b"eE"
            i += 1
            while i < n:
                ch = text[i]
                if escapes and ch == 92:
                    i += 2
                    continue
                i += 1
                if ch == 39:
                    if text[i:i + 1] == b"'":
                        i += 1
                        continue
                    break
            continue
        if c == 34:  # "identifier"
            j = i + 1
            while True:
                j = text.find(b'"', j)
                if j < 0 or text[j + 1:j + 2] != b'"':
                    break
                j += 2
            i = n if j < 0 else j + 1
            continue
        if c == 36:  # $tag$ ... $tag$ (not $1)
            m = _DOLLAR.match(text, i)
            if m is not None:
                j = text.find(m.group(0), m.end())
                i = n if j < 0 else j + len(m.group(0))
                continue
        i += 1
    return True


_DOLLAR = re.compile(rb"\$(?:[a-z_\x80-\xff][a-z0-9_\x80-\xff]*)?\$", re.IGNORECASE)


def parse_prepare(query: bytes):
    """
    For a simple query that is one SQL C{PREPARE name [(types)] AS statement}: (the client's
    name, the (start, end) of the name in C{query}, the statement's body): a Parse payload
    when no types are given (so it is the same statement a Parse of that text is), else an
    L{SQL_KEY} body.  None for anything else.
    """
    m = _PREPARE.match(query)
    if m is None:
        return None
    text = query[m.end():]
    if not one_statement(text):
        return None
    text = text.strip().rstrip(b"; \t\r\n\f")
    if not text or text.find(b"\x00") >= 0:
        return None
    types = m.group(2)
    if types is None:
        body = text + b"\x00\x00\x00"
    else:
        oids = type_oids(types)
        if oids is not None:
            body = text + b"\x00" + struct.pack("!H%dI" % len(oids), len(oids), *oids)
        else:
            body = SQL_KEY + types + b" AS " + text
    return _ident(m.group(1)), m.span(1), body


#: Built-in types by the names SQL PREPARE accepts for them (PREPARE keeps only the type,
#: not its modifiers), so that a PREPARE with parameter types is the same statement as a
#: Parse with these OIDs: any server can be made to hold it by a Parse.
_TYPE_OIDS = {
    b"bool": 16, b"boolean": 16, b"bytea": 17, b"char": 1042, b"name": 19, b"int8": 20,
    b"bigint": 20, b"int2": 21, b"smallint": 21, b"int4": 23, b"int": 23, b"integer": 23,
    b"text": 25, b"oid": 26, b"json": 114, b"xml": 142, b"float4": 700, b"real": 700,
    b"float8": 701, b"double precision": 701, b"money": 790, b"inet": 869, b"cidr": 650,
    b"bpchar": 1042, b"character": 1042, b"varchar": 1043, b"character varying": 1043,
    b"date": 1082, b"time": 1083, b"time without time zone": 1083, b"timestamp": 1114,
    b"timestamp without time zone": 1114, b"timestamptz": 1184,
    b"timestamp with time zone": 1184, b"interval": 1186, b"timetz": 1266,
    b"time with time zone": 1266, b"numeric": 1700, b"decimal": 1700, b"dec": 1700,
    b"uuid": 2950, b"jsonb": 3802, b"regclass": 2205,
}
_ARRAY_OIDS = {16: 1000, 17: 1001, 19: 1003, 20: 1016, 21: 1005, 23: 1007,
               25: 1009, 26: 1028, 114: 199, 142: 143, 700: 1021, 701: 1022, 790: 791,
               869: 1041, 650: 651, 1042: 1014, 1043: 1015, 1082: 1182, 1083: 1183,
               1114: 1115, 1184: 1185, 1186: 1187, 1266: 1270, 1700: 1231, 2950: 2951,
               3802: 3807, 2205: 2210}
_TYPE = re.compile(
    rb"\s*(?:pg_catalog\s*\.\s*)?([a-z][a-z0-9_]*(?:\s+(?:precision|varying|with(?:out)?\s+"
    rb"time\s+zone))?)\s*(\(\s*\d+\s*(?:,\s*\d+\s*)?\))?"
    rb"(?:\s+(with(?:out)?\s+time\s+zone))?\s*((?:\[\s*\d*\s*\]\s*)*)$", re.IGNORECASE)


def type_oids(types: bytes):
    """The OIDs of a PREPARE's parameter types C{(int, text)}, or None unless all built in."""
    inner = types[1:-1]
    if not inner.strip():
        return None  # PREPARE foo () AS ... is a syntax error: let PostgreSQL say so
    oids = []
    depth = 0
    start = 0
    parts = []
    for i, c in enumerate(inner):
        if c == 40:
            depth += 1
        elif c == 41:
            depth -= 1
        elif c == 44 and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    for part in parts:
        m = _TYPE.match(part)
        if m is None:
            return None
        name = b" ".join(m.group(1).lower().split())
        if m.group(3):  # timestamp(3) with time zone
            name += b" " + b" ".join(m.group(3).lower().split())
        oid = _TYPE_OIDS.get(name)
        if oid is None:
            return None
        if m.group(4):
            oid = _ARRAY_OIDS[oid]
        oids.append(oid)
    return oids


def is_prepare_transaction(query: bytes) -> bool:
    return _PREPARE_TRANSACTION.match(query) is not None


_SQL_FIRST = frozenset(b"eEdDpP \t\r\n")


def sql_statement(body: bytes):
    """
    For a Parse payload whose text is one SQL statement that names a prepared statement:
    (kind, the client's name, the span of the name in the text, the text after the name
    through the end of the payload, and for a PREPARE the prepared statement's body); kind is
    b"E" (EXECUTE), b"D" (DEALLOCATE) or b"P" (PREPARE), or b"A" alone for DEALLOCATE ALL and
    DISCARD ALL.  None for anything else.
    """
    nul = body.find(b"\x00")
    text = body[:nul]
    stripped = text.lstrip()
    first = stripped[0] if stripped else 0
    if first == 101 or first == 69:  # e E
        found = parse_execute(text)
        if found is not None:
            return (b"E", found[0], found[1], None)
    elif first == 100 or first == 68:  # d D
        m = _DEALLOCATE.match(text)
        if m is not None:
            if m.group(1).lower() == b"all":
                return (b"A", None, None, None)
            return (b"D", _ident(m.group(1)), m.span(1), None)
        if _DISCARD_ALL.match(text):
            return (b"A", None, None, None)
    elif first == 112 or first == 80:  # p P
        found = parse_prepare(text)
        if found is not None:
            return (b"P", found[0], found[1], found[2])
    return None


def parse_execute(query: bytes):
    """
    For a simple query that is one SQL C{[EXPLAIN ...] EXECUTE name [(arguments)]}: (the
    client's name, the (start, end) of the name in C{query}); None for anything else.
    """
    m = _EXECUTE.match(query)
    if m is None or not one_statement(query[m.end():]):
        return None
    return _ident(m.group(1)), m.span(1)


# -- deferred BEGIN ---------------------------------------------------------------------------

_BEGIN = re.compile(
    rb"^\s*(?:begin(?:\s+(?:work|transaction))?|start\s+transaction)"
    rb"(?:\s*,?\s*(?:isolation\s+level\s+(?:serializable|repeatable\s+read|read\s+committed"
    rb"|read\s+uncommitted)|read\s+(?:write|only)|(?:not\s+)?deferrable))*\s*;?\s*$",
    re.IGNORECASE)
_COMMIT = re.compile(rb"^\s*(?:commit|end)(?:\s+(?:work|transaction))?\s*;?\s*$",
                     re.IGNORECASE)
_ROLLBACK = re.compile(rb"^\s*(?:rollback|abort)(?:\s+(?:work|transaction))?\s*;?\s*$",
                       re.IGNORECASE)


_S = frozenset(b"sS")


def begin_tag(query: bytes) -> Optional[bytes]:
    """
    The CommandComplete tag of a standalone BEGIN/START TRANSACTION with only valid
    transaction modes, or None for any other query.
    """
    if _BEGIN.match(query) is None:
        return None
    return b"START TRANSACTION" if query.lstrip()[0] in _S else b"BEGIN"


def end_tag(query: bytes) -> Optional[bytes]:
    """b"COMMIT" or b"ROLLBACK" for a standalone transaction end, else None."""
    if _COMMIT.match(query):
        return b"COMMIT"
    if _ROLLBACK.match(query):
        return b"ROLLBACK"
    return None
