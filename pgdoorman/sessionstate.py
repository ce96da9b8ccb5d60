"""
Session state in transaction mode: settings that follow their client, and statements that
pin a client to its server.

A client's consecutive transactions run on different server connections.  What it SETs
must go with it and must never reach the next client of the server it leaves; what it
creates for its whole session (a temporary table, a LISTEN, a session advisory lock, a cursor
WITH HOLD, SET ROLE) lives on one server connection only.

The pooler learns about both from PostgreSQL itself, never from parsing SQL alone: the relay
only spots queries and Parses that may change session state (L{look}: a few regexes, on the
slow path only) and marks the client.  When such a client's server would go back to the pool
(ReadyForQuery, idle), one query of the pooler's own (L{SETTINGS_SQL}, with L{PIN_SQL} in
front while pinning is possible) asks the server what the session now holds; it runs outside
any transaction, so errors, ROLLBACK, SET LOCAL, RESET ALL, DISCARD ALL and set_config() need
no special case.  The settings found go into the client's tracked parameters (C{client.params},
exported with its L{pgdoorman.session.ClientSession}) and the server's, so the parameter sync
that runs when a server is handed to a client (L{pgdoorman.params.sync_sql}) RESETs what the
previous client left and SETs what this one has.  Session state found keeps the server with
its client (pinned, as in session mode) and is checked again after each of its transactions,
until it is gone.

Clients that never send such statements cost nothing: no state object, no query, no check.
The per-pool C{session_state_policy} chooses what happens to statements that create session
state: C{pin} (default), C{refuse} (an error to the client, before the statement reaches a
server) or C{ignore} (PgBouncer's behaviour: the state stays on whichever server, for whoever
gets it next).
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional, Tuple

from twisted.logger import Logger

from pgdoorman import link as _link
from pgdoorman import params as _params
from pgdoorman.prepared import DEALLOCATE_NOTHING, PARSE_FAILING
from pgdoorman.protocol import errors, messages

log = Logger()

POLICIES = ("pin", "refuse", "ignore")
DEFAULT_POLICY = "pin"

#: Why a client is pinned (SHOW CLIENTS, the metrics' reason label).
TEMP_TABLE = "temp_table"
LISTEN = "listen"
ADVISORY_LOCK = "advisory_lock"
CURSOR_WITH_HOLD = "cursor_with_hold"
ROLE = "role"
REASONS = (TEMP_TABLE, LISTEN, ADVISORY_LOCK, CURSOR_WITH_HOLD, ROLE)

#: Parameters that are not followed here: PostgreSQL reports them (ParameterStatus keeps the
#: client's and the server's values, see L{pgdoorman.params}), or they pin (role).
_NOT_FOLLOWED = _params.REPORTED + ("role", "session_authorization")
#: The session's own settings, as PostgreSQL has them now.
SETTINGS_SQL = ("SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings "
                "WHERE source = 'session' AND name NOT IN (%s)"
                % ", ".join(_params.quote_literal(n) for n in _NOT_FOLLOWED))
#: Custom settings ("app.tenant") are not in pg_settings: those the client named are asked
#: for by name (%s: their names as an array); the empty string counts as not set.
CUSTOM_SQL = (" UNION ALL SELECT n, v FROM (SELECT n, pg_catalog.current_setting(n, true) v"
              " FROM pg_catalog.unnest(ARRAY[%s]::text[]) n) c WHERE v <> ''")
#: One row: does the session hold each kind of state in L{REASONS}?  (%s: the login user.)
PIN_SQL = ("SELECT EXISTS (SELECT FROM pg_catalog.pg_class"
           " WHERE relnamespace = pg_catalog.pg_my_temp_schema()),"
           " EXISTS (SELECT FROM pg_catalog.pg_listening_channels()),"
           " EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype = 'advisory'"
           " AND pid = pg_catalog.pg_backend_pid()),"
           " EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable),"
           " session_user <> %s OR current_user <> %s")
#: What a setting's name must look like to be RESET by name (pg_settings names always do).
_NAME = re.compile(r"^[a-z_][a-z0-9_$]*(?:\.[a-z_][a-z0-9_$]*)?$")

# -- spotting statements ------------------------------------------------------------------

#: The start of a statement: the text's, or after a ';', blanks and comments skipped.
_START = rb"(?:^|;)(?:\s|--[^\n]*(?:\n|$)|/\*[\s\S]*?\*/)*"
_SETTINGS = re.compile(_START + rb"(?:reset|discard|set(?!\s+(?:local|transaction)\b))\b"
                       rb"|\bset_config\s*\(", re.IGNORECASE)
_PIN = (
    (TEMP_TABLE, re.compile(
        rb"\bcreate\s+(?:or\s+replace\s+)?(?:(?:global|local)\s+)?(?:temp|temporary)\s"
        rb"|\bcreate\s+(?:unlogged\s+)?(?:table|view|sequence)\s+(?:if\s+not\s+exists\s+)?"
        rb"pg_temp\s*\.|\binto\s+(?:temp|temporary)\s", re.IGNORECASE)),
    (LISTEN, re.compile(_START + rb"listen\b", re.IGNORECASE)),
    (ADVISORY_LOCK, re.compile(rb"\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(",
                               re.IGNORECASE)),
    (CURSOR_WITH_HOLD, re.compile(rb"\bwith\s+hold\b", re.IGNORECASE)),
    (ROLE, re.compile(_START + rb"set\s+(?:session\s+)?(?:role|session\s+authorization)\b",
                      re.IGNORECASE)),
)

#: A temporary table that lives for its transaction only: no session state.
_ON_COMMIT_DROP = re.compile(rb"\bon\s+commit\s+drop\b", re.IGNORECASE)


def look(query: bytes) -> Optional[Tuple[bool, Tuple[str, ...]]]:
    """
    Whether the SQL text C{query} may change the session's settings, and which kinds of
    session state it may create; None when it can do neither (the usual answer).  May err on
    the side of yes: what the session really holds is asked from PostgreSQL afterwards.
    """
    # A cheap filter before the regexes: words without which no statement of interest can
    # be ("set" covers RESET, set_config, SET ROLE and SET SESSION AUTHORIZATION; "temp"
    # covers TEMPORARY and pg_temp).  find(), not "in": bytes.__contains__ formats a
    # TypeError (it first tries its argument as an integer) before it searches, some 2,000
    # instructions a word on every Parse.
    find = query.lower().find
    if find(b"set") < 0 and find(b"temp") < 0 and find(b"discard") < 0 and \
            find(b"listen") < 0 and find(b"advisory") < 0 and find(b"hold") < 0:
        return None
    settings = _SETTINGS.search(query) is not None
    reasons = tuple(reason for reason, regex in _PIN if regex.search(query) is not None
                    and (reason != TEMP_TABLE or _ON_COMMIT_DROP.search(query) is None))
    if not settings and not reasons:
        return None
    return settings, reasons


_CUSTOM = re.compile(rb"\bset_config\s*\(\s*'([a-z_][a-z0-9_$]*\.[a-z_][a-z0-9_$]*)'"
                     rb"|" + _START + rb"set\s+(?:session\s+)?"
                     rb"([a-z_][a-z0-9_$]*\.[a-z_][a-z0-9_$]*)\b", re.IGNORECASE)


def custom_names(query: bytes) -> List[str]:
    """The custom settings (with a dot) that C{query} may SET by name."""
    return [(a or b).decode("ascii").lower() for a, b in _CUSTOM.findall(query)]


def is_listen(query: bytes) -> bool:
    """A LISTEN among the statements of C{query} (also for L{pgdoorman.listen})."""
    return _PIN[1][1].search(query) is not None


# -- the relay's side ----------------------------------------------------------------------

def query_seen(relay, query: bytes, link) -> Optional[bytes]:
    """
    A simple Query in transaction mode (the relay's slow path): note what it may change.
    Returns the Query to send instead when the policy refuses it, else None.
    """
    hit = look(query)
    if hit is None:
        return None
    if _noted(relay, hit, query):
        return None
    link.expect.append(_link.Entry(_link.QUERY_ERROR, reply=_refusal(relay, hit[1])))
    return DEALLOCATE_NOTHING


def parse_seen(relay, data: bytes, pos: int, end: int, link) -> Optional[bytes]:
    """Like L{query_seen} for a Parse (the whole message is C{data[pos:end]})."""
    nul = data.find(b"\x00", pos + 5, end)
    if nul < 0:
        return None  # malformed: the relay says so
    text_end = data.find(b"\x00", nul + 1, end)
    query = data[nul + 1:text_end if text_end >= 0 else end]
    if query == relay.clean_parse:
        return None  # the text this client Parses every time (an unnamed statement), seen clean
    hit = look(query)
    if hit is None:
        relay.clean_parse = query
        return None
    if _noted(relay, hit, query):
        return None
    link.expect.append(_link.Entry(_link.FAKE_ERROR, reply=_refusal(relay, hit[1])))
    return PARSE_FAILING


def _noted(relay, hit, query: bytes) -> bool:
    """Mark the client for a look at its session; False when the policy refuses the query."""
    settings, reasons = hit
    client = relay.client
    policy = getattr(client.pool.settings, "session_state_policy", DEFAULT_POLICY)
    if reasons:
        if policy == "refuse":
            return False
        if policy == "ignore":
            reasons = ()
    if not settings and not reasons:
        return True
    state = relay.sstate
    if state is None:
        state = relay.sstate = SessionState(client)
    state.note(settings, bool(reasons))
    if settings and b"." in query:
        state.custom.update(custom_names(query))
    return True


def _refusal(relay, reasons: Tuple[str, ...]) -> bytes:
    client = relay.client
    err = errors.PgError(
        errors.FEATURE_NOT_SUPPORTED,
        "pgdoorman: %s would create session state, which this pool refuses in transaction "
        "mode" % _describe(reasons), severity="ERROR",
        hint="session_state_policy is refuse for pool %s; use session mode, or set "
             "session_state_policy to pin" % client.pool.database)
    client.service.count_error(err)
    log.info("client {peer} ({user}@{db}): statement refused ({why}, session_state_policy "
             "refuse)", peer=client.peer, user=client.session.user,
             db=client.session.database, why=", ".join(reasons))
    return err.to_bytes()


_DESCRIPTIONS = {TEMP_TABLE: "a temporary table", LISTEN: "LISTEN",
                 ADVISORY_LOCK: "a session advisory lock", CURSOR_WITH_HOLD: "a cursor WITH HOLD",
                 ROLE: "SET ROLE / SET SESSION AUTHORIZATION"}


def _describe(reasons: Tuple[str, ...]) -> str:
    return " or ".join(_DESCRIPTIONS[r] for r in reasons)


# -- one client's session ------------------------------------------------------------------

class SessionState:
    """
    What the pooler knows of one client's session beyond its tracked parameters; made for the
    first statement that L{look} flags, so clients that send none have none.

    While it has something to ask, it stands in for the client's C{serverReleasable} (an
    instance attribute, so that nothing is looked at for other clients): the server goes back
    to the pool only after the answer, and not at all while the client is pinned.

    @ivar asking: settings may have changed since the last answer.
    @ivar suspect: session state may have been created since the last answer.
    @ivar pinned: the kinds of session state (L{REASONS}) the last answer found.
    @ivar busy: the question is on the wire.
    """

    __slots__ = ("client", "asking", "suspect", "pinned", "busy", "custom")

    def __init__(self, client):
        self.client = client
        self.asking = False
        self.suspect = False
        self.pinned: Tuple[str, ...] = ()
        self.busy = False
        #: custom settings the client may have set (see L{CUSTOM_SQL}).
        self.custom = set(n for n in client.params if "." in n)

    def note(self, settings: bool, suspect: bool) -> None:
        if settings:
            self.asking = True
        if suspect:
            self.suspect = True
        client = self.client
        if "serverReleasable" not in client.__dict__:
            client.serverReleasable = self.serverReleasable

    @property
    def uncertain(self) -> bool:
        """The server may hold session state or settings that nobody has looked at."""
        return self.asking or self.suspect or self.busy or bool(self.pinned)

    def serverReleasable(self, server) -> None:
        """The client's server answered everything and is idle: ask first, or let it go."""
        client = self.client
        if self.busy:
            return
        if self.asking or self.suspect or self.pinned:
            if client.server is server and client.relay.scanner.between_messages \
                    and not client.closed:
                self._ask(server)
            return  # (mid-message: the next ReadyForQuery comes back here)
        del client.serverReleasable
        type(client).serverReleasable(client, server)

    def _ask(self, server) -> None:
        self.busy = True
        pin = self.suspect or bool(self.pinned)
        self.asking = self.suspect = False
        sql = SETTINGS_SQL
        if self.custom:
            sql += CUSTOM_SQL % ", ".join(_params.quote_literal(n) for n in sorted(self.custom))
        if pin:
            user = _params.quote_literal(server.settings.server_username)
            sql = PIN_SQL % (user, user) + ";" + sql
        rows: List[bytes] = []
        server.run_internal(sql, rows).addCallback(self._answer, server, rows, pin)

    def _answer(self, err, server, rows: List[bytes], pin: bool) -> None:
        self.busy = False
        client = self.client
        link = server.link
        if err is not None:
            # What the session holds is unknown: nobody else may have this server.
            link.taint("session state query failed: %s" % (err,))
            self.pinned = ()
        else:
            values = [messages.parse_data_row(row) for row in rows]
            if pin and values:
                flags = values.pop(0)
                self.pinned = tuple(r for r, f in zip(REASONS, flags) if f == "t")
            found = {}
            for row in values:
                name, value = row[0], row[1]
                if name is not None and value is not None and _NAME.match(name):
                    found[name] = value
            follow(client.params, found)
            follow(server.params, found)
        if client.server is not server or client.closed or link.pending or link.dirty \
                or link.in_transaction or link.internal:
            return  # the client sent more meanwhile: its next ReadyForQuery decides
        if self.pinned:
            client.pool.stats.xact_count += 1
            return
        # Back to the pool once this read of the server's bytes is done (server._relayData),
        # by way of serverReleasable as for any release.
        server._release = True

    def reasons(self) -> str:
        return ",".join(self.pinned)


def follow(params: Dict[str, Optional[str]], found: Dict[str, str]) -> None:
    """
    Make the tracked parameters C{params} say what the session holds: C{found}, the answer to
    L{SETTINGS_SQL}.  Reported parameters are left to ParameterStatus.
    """
    for name in [n for n in params if n not in _params.TRACKED and n not in found]:
        del params[name]
    for name in _params.STARTUP_ONLY:
        params[name] = found.get(name)
    for name, value in found.items():
        params[name] = value


def forget(params: Dict[str, Optional[str]]) -> None:
    """After DISCARD ALL / RESET ALL: the server holds none of the followed settings."""
    for name in [n for n in params if n not in _params.TRACKED]:
        del params[name]
    for name in _params.STARTUP_ONLY:
        params[name] = None


def cleanup_sql(client) -> Optional[str]:
    """
    What a server must run before anyone else gets it when its client leaves while holding
    it with session state or settings not looked at (None: nothing).
    """
    relay = client.relay
    state = relay.sstate if relay is not None else None
    if state is None or not state.uncertain:
        return None
    return "DISCARD ALL"


# -- what the admin console and the metrics show -------------------------------------------

def pinned_reasons(client) -> Optional[str]:
    """SHOW CLIENTS' pinned column: why the client holds its server, or None."""
    relay = client.relay
    state = relay.sstate if relay is not None else None
    if state is None or not state.pinned:
        return None
    return state.reasons()


def metrics(pools) -> Iterator:
    """pg_doorman_pools_pinned_clients{database, user, reason}."""
    from prometheus_client.core import GaugeMetricFamily
    g = GaugeMetricFamily("pg_doorman_pools_pinned_clients",
                          "Clients pinned to their server by session state in transaction "
                          "mode, by reason", labels=["database", "user", "reason"])
    for pool in pools.all_pools():
        if not pool.transaction_mode:
            continue
        counts = dict.fromkeys(REASONS, 0)
        for client in pool.members:
            relay = client.relay
            state = relay.sstate if relay is not None else None
            if state is not None:
                for reason in state.pinned:
                    counts[reason] += 1
        for reason, n in counts.items():
            g.add_metric([pool.database, pool.user, reason], n)
    yield g
