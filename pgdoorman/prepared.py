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


class Statement:
    """One prepared statement: its server-side name and the Parse payload after the name."""

    __slots__ = ("name", "body", "parse", "parsed", "reparse")

    def __init__(self, name: bytes, body: bytes):
        self.name = name
        self.body = body
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

    def __contains__(self, name: bytes) -> bool:
        if name in self.names:
            self.names.move_to_end(name)
            return True
        return False

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
    if name.startswith(b'"'):
        return name[1:-1].replace(b'""', b'"')
    return name.lower()  # unquoted identifiers fold to lower case


def is_discard_all(query: bytes) -> bool:
    return _DISCARD_ALL.match(query) is not None


def may_drop_statements(query: bytes) -> bool:
    """
    A query that may DEALLOCATE or DISCARD prepared statements in a way we do not parse (among
    other statements, in a function): the server's record of its statements is then unknown.

    Runs on every query in transaction mode: a lower() and two find()s cost a tenth of the
    instructions of the equivalent case-blind regex search (callgrind: 5,000 instructions
    per query for the regex), and mean the same, since both fold ASCII only.
    """
    low = query.lower()
    # find(), not "in": bytes.__contains__ first tries its argument as an integer and
    # formats a TypeError for it (2,000 instructions) before it searches.
    return low.find(b"deallocate") >= 0 or low.find(b"discard") >= 0


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


def begin_tag(query: bytes) -> Optional[bytes]:
    """
    The CommandComplete tag of a standalone BEGIN/START TRANSACTION with only valid
    transaction modes, or None for any other query.
    """
    if _BEGIN.match(query) is None:
        return None
    return b"START TRANSACTION" if query.lstrip()[:1] in b"sS" else b"BEGIN"


def end_tag(query: bytes) -> Optional[bytes]:
    """b"COMMIT" or b"ROLLBACK" for a standalone transaction end, else None."""
    if _COMMIT.match(query):
        return b"COMMIT"
    if _ROLLBACK.match(query):
        return b"ROLLBACK"
    return None
