"""
The admin console: C{psql -p 6432 -U admin pgdoorman} (or C{pgbouncer}, as an alias).

After the admin user has logged in (L{pgdoorman.client.ClientConnection} checks the password
from C{general.admin_password}), the connection is handed to an L{AdminSession}, which speaks
the simple query protocol and enough of the extended one for drivers (psycopg 3, asyncpg) to
run a command: Parse, Bind, Describe, Execute and Sync, without parameters.

Commands and their columns follow PgBouncer's C{admin.c} where PgBouncer has the command, so
that existing scripts and exporters work; pgdoorman's extra columns come after PgBouncer's.
Each command is a method C{show_<name>} or C{cmd_<name>} of L{AdminConsole}, returning a
L{Result} (or a Deferred of one, for PAUSE and SHUTDOWN, which wait) or raising L{AdminError}.
"""

from __future__ import annotations

import re
import struct
import time
from collections import deque
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet import defer
from twisted.logger import Logger

from pgdoorman import __version__, logs
from pgdoorman import sessionstate as _sessionstate
from pgdoorman.protocol import errors, messages
from pgdoorman.protocol.framing import FramingError, MessageBuffer

#: An admin command is small; a client may not make the console hold more of one than this.
ADMIN_MESSAGE_LIMIT = 1024 * 1024

__all__ = ["AdminSession", "AdminConsole", "AdminError", "Result", "parse_command"]

_uint32 = struct.Struct("!I")
_int16 = struct.Struct("!h")

#: Column types by PgBouncer's letters: (type OID, type length).  Times ("T") are text.
_TYPES = {
    "s": (25, -1),     # text
    "i": (23, 4),      # int4
    "q": (20, 8),      # int8
    "N": (1700, -1),   # numeric
    "T": (25, -1),     # a timestamp, as text
}

SYNTAX_ERROR = "42601"
OBJECT_NOT_FOUND = "42704"
CONFIG_FILE_ERROR = "F0000"
OBJECT_IN_USE = "55006"

#: Parameters some drivers SET or SHOW at connect; answered without doing anything, as PgBouncer
#: does, so that those drivers can open an admin connection.
_FAKE_PARAMS = {
    "client_encoding": "UTF8",
    "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on",
    "datestyle": "ISO",
    "timezone": "GMT",
    "extra_float_digits": "2",
    "application_name": "",
}

_WORD = r'("(?:[^"]|"")+"|[0-9a-zA-Z_.\-]+)'
_CMD = re.compile(r"^\s*([A-Za-z_]+)(?:\s+" + _WORD + r")?\s*;?\s*$", re.S)
_SET = re.compile(r"^\s*set\s+" + _WORD + r"\s*(?:=|\s+to\s+)\s*('(?:[^']|'')*'|"
                  r"[0-9a-zA-Z_.\-]+)\s*;?\s*$", re.I | re.S)

_HELP = """
\tSHOW HELP|CONFIG|DATABASES|POOLS|POOLS_EXTENDED|CLIENTS|SERVERS|USERS|VERSION
\tSHOW SOCKETS|LISTS|STATE|LOG_LEVEL|CONNECTIONS
\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS
	SHOW PREPARED_STATEMENTS|PREPARED_QUERIES|AUTH_QUERY|POOL_COORDINATOR
	SHOW STARTUP_PARAMETERS
\tSET log_level = 'info'
\tRELOAD
\tPAUSE [<db>]
\tRESUME [<db>]
\tRECONNECT [<db>]
\tKILL <db>
\tSHUTDOWN
\tUPGRADE"""


class AdminError(Exception):
    """A command failed; the session sends an ErrorResponse and goes on."""

    def __init__(self, text: str, sqlstate: str = SYNTAX_ERROR):
        Exception.__init__(self, text)
        self.text = text
        self.sqlstate = sqlstate

    def to_bytes(self) -> bytes:
        return messages.error_response("ERROR", self.sqlstate, self.text)


class Result:
    """
    What a command answers: C{columns} as (name, type letter) pairs and C{rows} (or no
    columns at all), the CommandComplete C{tag} and NoticeResponses to send first.
    """

    def __init__(self, tag: str, columns: Optional[Sequence[Tuple[str, str]]] = None,
                 rows: Sequence[Sequence[Any]] = (), notices: Sequence[bytes] = ()):
        self.tag = tag
        self.columns = list(columns) if columns is not None else None
        self.rows = list(rows)
        self.notices = list(notices)

    def dicts(self) -> List[Dict[str, Any]]:
        """Rows as dicts (for tests and the status page)."""
        names = [c[0] for c in self.columns or ()]
        return [dict(zip(names, row)) for row in self.rows]

    # -- wire format --------------------------------------------------------------------------

    def row_description(self) -> bytes:
        if self.columns is None:
            return messages.message(b"n")  # NoData
        out = [_int16.pack(len(self.columns))]
        for name, kind in self.columns:
            oid, size = _TYPES[kind]
            out.append(messages.cstring(name) + struct.pack("!IhIhih", 0, 0, oid, size, -1, 0))
        return messages.message(b"T", b"".join(out))

    def data_rows(self) -> bytes:
        if self.columns is None:
            return b""
        kinds = [c[1] for c in self.columns]
        out = []
        for row in self.rows:
            parts = [_int16.pack(len(row))]
            for kind, value in zip(kinds, row):
                if value is None:
                    parts.append(b"\xff\xff\xff\xff")
                    continue
                text = _format(kind, value).encode("utf-8")
                parts.append(_uint32.pack(len(text)) + text)
            out.append(messages.message(b"D", b"".join(parts)))
        return b"".join(out)

    def complete(self) -> bytes:
        tag = self.tag
        return messages.command_complete(tag)

    def to_bytes(self, describe: bool = True) -> bytes:
        head = b"".join(self.notices)
        if describe and self.columns is not None:
            head += self.row_description()
        return head + self.data_rows() + self.complete()


def _format(kind: str, value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if kind in ("i", "q"):
        return str(int(value))
    if kind == "N":
        if isinstance(value, float):
            return str(int(round(value)))
        return str(value)
    if kind == "T" and isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
    return str(value)


def _notice(text: str, detail: Optional[str] = None) -> bytes:
    return messages.notice_response("NOTICE", "00000", text, detail)


def parse_command(query: str) -> Tuple[str, str, Optional[str]]:
    """
    Split one admin statement into (verb, argument, value) with the verb lower-cased:
    C{"SHOW pools;"} is C{("show", "pools", None)}, C{"SET log_level = 'debug'"} is
    C{("set", "log_level", "debug")}.

    @raise AdminError: it is not a command the console could understand.
    """
    m = _SET.match(query)
    if m is not None:
        value = m.group(2)
        if value.startswith("'"):
            value = value[1:-1].replace("''", "'")
        return "set", _unquote(m.group(1)).lower(), value
    m = _CMD.match(query)
    if m is None:
        raise AdminError("invalid command '%s', use SHOW HELP;" % query.strip())
    arg = _unquote(m.group(2)) if m.group(2) else ""
    return m.group(1).lower(), arg, None


def _unquote(word: str) -> str:
    if word.startswith('"'):
        return word[1:-1].replace('""', '"')
    return word


def split_statements(sql: str) -> List[str]:
    """Statements of one simple Query (admin commands never contain semicolons themselves)."""
    return [part for part in (p.strip() for p in sql.split(";")) if part]


_PG_SOCKET_COLUMNS = [
    ("type", "s"), ("user", "s"), ("database", "s"), ("replication", "s"), ("state", "s"),
    ("addr", "s"), ("port", "i"), ("local_addr", "s"), ("local_port", "i"),
    ("connect_time", "T"), ("request_time", "T"), ("wait", "i"), ("wait_us", "i"),
    ("close_needed", "i"), ("ptr", "s"), ("link", "s"), ("remote_pid", "i"), ("tls", "s"),
    ("application_name", "s"), ("prepared_statements", "i"), ("id", "q"),
]
_PG_SOCKET_DEBUG = [("recv_pos", "i"), ("pkt_pos", "i"), ("pkt_remain", "i"),
                    ("send_pos", "i"), ("send_remain", "i"), ("pkt_avail", "i"),
                    ("send_avail", "i")]

_STATS_NAMES = ("server_assignment_count", "xact_count", "query_count", "received", "sent",
                "xact_time", "query_time", "wait_time", "client_parse_count",
                "server_parse_count", "bind_count", "client_connect_count")

#: general keys that need a restart (PgBouncer's "changeable = no").
_RESTART_KEYS = {"host", "port", "backlog", "unix_socket_dir", "unix_socket_mode",
                 "tls_certificate", "tls_private_key", "tls_ca_cert", "tls_mode",
                 "worker_threads", "daemon_pid_file", "syslog_prog_name"}


def _addr(address) -> Tuple[str, int]:
    host = getattr(address, "host", None)
    if host is None:
        return str(getattr(address, "name", "") or "unix"), 0
    return host, getattr(address, "port", 0)


def _us(seconds: float) -> Tuple[int, int]:
    us = int(seconds * 1e6)
    return us // 1000000, us % 1000000


def _wall(monotonic_stamp: float) -> float:
    """A time.monotonic() stamp as wall-clock seconds."""
    return time.time() - (time.monotonic() - monotonic_stamp)


class AdminConsole:
    """
    The commands, over the running pooler: C{pools} is the L{pgdoorman.pool.PoolService},
    whose parent (the whole service) does RELOAD and SHUTDOWN.
    """

    log = Logger()

    def __init__(self, pools):
        self.pools = pools

    @property
    def top(self):
        return self.pools.parent

    # -- dispatch -------------------------------------------------------------------------------

    def run(self, statement: str) -> defer.Deferred:
        """Run one statement; fires with a L{Result} or fails with L{AdminError}."""
        return defer.maybeDeferred(self._run, statement)

    def _run(self, statement: str):
        verb, arg, value = parse_command(statement)
        if verb == "set":
            return self.cmd_set(arg, value)
        if verb in ("show", "select"):
            if not arg:
                raise AdminError("invalid command '%s', use SHOW HELP;" % statement.strip())
            name = arg.lower()
            if name in _FAKE_PARAMS:
                return Result("SHOW", [(name, "s")], [(_FAKE_PARAMS[name],)])
            method = getattr(self, "show_" + name, None)
            if method is None:
                raise AdminError("invalid command '%s', use SHOW HELP;" % statement.strip())
            if getattr(self.top, "worker", None) is not None:
                from pgdoorman import workers
                if name in workers.GATHERED:
                    return workers.gather_show(self, name)  # every worker's rows
            return method()
        method = getattr(self, "cmd_" + verb, None)
        if method is None:
            raise AdminError("invalid command '%s', use SHOW HELP;" % statement.strip())
        return method(arg)

    # -- SHOW ---------------------------------------------------------------------------------

    def show_help(self) -> Result:
        return Result("SHOW", notices=[_notice("Console usage", _HELP)])

    def show_version(self) -> Result:
        return Result("SHOW", [("version", "s")], [("pgdoorman %s" % __version__,)])

    def _pool_row(self, pool, now: float) -> list:
        active, idle, waiting = pool.counts()
        maxwait, maxwait_us = _us(pool.max_wait_now(now))
        hist = pool.stats.xact_hist
        return [pool.database, pool.user,
                pool.clients - waiting, waiting, 0, 0,
                active, 0, 0, idle, 0, len(pool.testing), pool.connecting,
                maxwait, maxwait_us, pool.settings.pool_mode, None,
                # pgdoorman's own
                pool.settings.pool_size, pool.paused, pool.draining,
                int(hist.quantile(0.5) * 1e6), int(hist.quantile(0.95) * 1e6),
                int(hist.quantile(0.99) * 1e6)]

    _POOL_COLUMNS = [
        ("database", "s"), ("user", "s"), ("cl_active", "i"), ("cl_waiting", "i"),
        ("cl_active_cancel_req", "i"), ("cl_waiting_cancel_req", "i"), ("sv_active", "i"),
        ("sv_active_cancel", "i"), ("sv_being_canceled", "i"), ("sv_idle", "i"),
        ("sv_used", "i"), ("sv_tested", "i"), ("sv_login", "i"), ("maxwait", "i"),
        ("maxwait_us", "i"), ("pool_mode", "s"), ("load_balance_hosts", "s"),
        ("pool_size", "i"), ("paused", "i"), ("draining", "i"),
        ("xact_p50_us", "q"), ("xact_p95_us", "q"), ("xact_p99_us", "q"),
    ]

    def show_pools(self) -> Result:
        now = time.monotonic()
        rows = [self._pool_row(p, now) for p in self.pools.all_pools()]
        return Result("SHOW", self._POOL_COLUMNS, rows)

    def show_pool_coordinator(self) -> Result:
        """
        PgDoorman's SHOW POOL_COORDINATOR: one row per database with max_db_connections.
        """
        rows = []
        for name, coordinator in sorted(self.pools.coordinators.items()):
            st = coordinator.stats()
            rows.append([name, st["max_db_conn"], st["current"], st["reserve_size"],
                         st["reserve_used"], st["evictions"], st["reserve_acq"],
                         st["exhaustions"]])
        return Result("SHOW", [
            ("database", "s"), ("max_db_conn", "i"), ("current", "i"), ("reserve_size", "i"),
            ("reserve_used", "i"), ("evictions", "q"), ("reserve_acq", "q"),
            ("exhaustions", "q")], rows)

    def show_pools_extended(self) -> Result:
        now = time.monotonic()
        rows = []
        for pool in self.pools.all_pools():
            queries, received, sent = pool.traffic()
            st = pool.stats
            avg_wait = st.wait_time / st.server_assignment_count \
                if st.server_assignment_count else 0.0
            ps = pool.statements
            rows.append(self._pool_row(pool, now) + [
                received, sent, int(avg_wait * 1e6), int(pool.stats.wait_hist.quantile(0.99) *
                                                         1e6),
                st.xact_count, queries, len(ps.statements), ps.hits, ps.misses, ps.evictions])
        return Result("SHOW", self._POOL_COLUMNS + [
            ("bytes_received", "q"), ("bytes_sent", "q"), ("avg_wait_us", "q"),
            ("wait_p99_us", "q"), ("xact_count", "q"), ("query_count", "q"),
            ("prepared_statements", "i"), ("prepared_hits", "q"), ("prepared_misses", "q"),
            ("prepared_evictions", "q")], rows)

    def _client_row(self, pool, client, state: str, now: float, debug: bool) -> list:
        t = client.transport
        addr, port = _addr(t.getPeer())
        laddr, lport = _addr(t.getHost())
        waited = now - client.wait_started if client.waiting and client.wait_started else 0.0
        wait, wait_us = _us(waited)
        server = client.server
        params = client.params or {}
        connected = getattr(client.session, "connected_at", 0.0) or time.time()
        # PgBouncer's "when last request was done": a waiting client's request is the one it
        # waits with; otherwise the relay's stamp of the last request sent to a server
        # (requests answered without a server, such as a deferred BEGIN, do not move it).
        if client.waiting and client.wait_started:
            requested = _wall(client.wait_started)
        else:
            at = getattr(client, "request_at", 0.0)
            requested = max(_wall(at), connected) if at else connected
        row = ["C", client.session.user, pool.database, "none", state, addr, port, laddr,
               lport, connected, requested, wait, wait_us, 0, "0x%x" % client.id,
               "0x%x" % server.id if server is not None else "", 0,
               _tls_info(t) if client.tls else "",
               params.get("application_name") or "",
               len(client.remap.names) if client.remap is not None else 0, client.id]
        if debug:
            row += [0, 0, 0, 0, 0, 0, _buffered(t)]
        return row

    def _server_row(self, pool, server, state: str, debug: bool) -> list:
        t = server.transport
        addr, port = _addr(t.getPeer())
        laddr, lport = _addr(t.getHost())
        client = server.client
        row = ["S", pool.settings.server_username, pool.database, "none", state, addr, port,
               laddr, lport, _wall(server.created), _wall(server.last_used), 0, 0,
               int(bool(server.close_needed)), "0x%x" % server.id,
               "0x%x" % client.id if client is not None else "", server.backend_pid,
               _tls_info(t) if server.tls else "",
               (server.params or {}).get("application_name") or "",
               len(server.statements.names), server.id]
        if debug:
            row += [0, 0, 0, 0, 0, 0, _buffered(t)]
        return row

    def _clients(self, debug: bool = False) -> List[list]:
        now = time.monotonic()
        rows = []
        for pool in self.pools.all_pools():
            for client in sorted(pool.members, key=lambda c: c.id):
                if client.waiting:
                    state = "cl_waiting" if debug else "waiting"
                elif client.server is not None:
                    state = "cl_active" if debug else "active"
                else:
                    state = "cl_active" if debug else "idle"
                rows.append(self._client_row(pool, client, state, now, debug)
                            + ([] if debug else [client.query_count, client.client_bytes,
                                                 _sessionstate.pinned_reasons(client)]))
        return rows

    def _servers(self, debug: bool = False) -> List[list]:
        rows = []
        for pool in self.pools.all_pools():
            idle = set(pool.idle)
            for server in sorted(pool.servers, key=lambda s: s.id):
                if server in idle:
                    state = "sv_idle" if debug else "idle"
                else:
                    state = "sv_active" if debug else "active"
                rows.append(self._server_row(pool, server, state, debug)
                            + ([] if debug else [server.server_bytes]))
        return rows

    def show_clients(self) -> Result:
        return Result("SHOW", _PG_SOCKET_COLUMNS + [("query_count", "q"),
                                                    ("bytes_received", "q"),
                                                    ("pinned", "s")], self._clients())

    def show_servers(self) -> Result:
        return Result("SHOW", _PG_SOCKET_COLUMNS + [("bytes_sent", "q")], self._servers())

    def show_sockets(self) -> Result:
        return Result("SHOW", _PG_SOCKET_COLUMNS + _PG_SOCKET_DEBUG,
                      self._clients(True) + self._servers(True))

    show_active_sockets = show_sockets

    def show_databases(self) -> Result:
        cfg = self.pools.config
        by_db = self.pools.pools_by_database()
        rows = []
        for name, pcfg in cfg.pools.items():
            settings = [cfg.pool_settings(name, u.username) for u in pcfg.users]
            pools = by_db.get(name, [])
            lifetime = settings[0].server_lifetime if settings else cfg.general.server_lifetime
            rows.append([name, pcfg.server_host, pcfg.server_port, pcfg.server_database, None,
                         sum(s.pool_size for s in settings),
                         sum(s.min_pool_size for s in settings),
                         pcfg.reserve_pool_size or 0, int(lifetime or 0), pcfg.pool_mode, None,
                         pcfg.max_db_connections or 0, sum(len(p.servers) for p in pools), 0,
                         sum(p.clients for p in pools), self.pools.is_paused(name), 0])
        return Result("SHOW", [
            ("name", "s"), ("host", "s"), ("port", "i"), ("database", "s"),
            ("force_user", "s"), ("pool_size", "i"), ("min_pool_size", "i"),
            ("reserve_pool_size", "i"), ("server_lifetime", "i"), ("pool_mode", "s"),
            ("load_balance_hosts", "s"), ("max_connections", "i"),
            ("current_connections", "i"), ("max_client_connections", "i"),
            ("current_client_connections", "i"), ("paused", "i"), ("disabled", "i")], rows)

    def show_users(self) -> Result:
        cfg = self.pools.config
        users: Dict[str, List] = {}
        for name, pcfg in cfg.pools.items():
            for ucfg in pcfg.users:
                users.setdefault(ucfg.username, []).append(cfg.pool_settings(name,
                                                                             ucfg.username))
        rows = []
        for user, settings in users.items():
            pools = [p for p in self.pools.all_pools() if p.user == user]
            sizes = {s.pool_size for s in settings}
            modes = {s.pool_mode for s in settings}
            rows.append([user, str(sizes.pop()) if len(sizes) == 1 else "", "",
                         modes.pop() if len(modes) == 1 else None, 0,
                         sum(len(p.servers) for p in pools), 0, sum(p.clients for p in pools)])
        return Result("SHOW", [
            ("name", "s"), ("pool_size", "s"), ("reserve_pool_size", "s"), ("pool_mode", "s"),
            ("max_user_connections", "i"), ("current_connections", "i"),
            ("max_user_client_connections", "i"), ("current_client_connections", "i")], rows)

    def show_config(self) -> Result:
        from pgdoorman import config as _config
        cfg = self.pools.config
        rows = []
        for opt in _config.OPTIONS:
            if opt.alias_of is not None or opt.section not in ("general", "prometheus"):
                continue
            section = cfg.general if opt.section == "general" else cfg.prometheus
            key = opt.name if opt.section == "general" else "prometheus." + opt.name
            value = getattr(section, opt.name, None)
            if "password" in opt.name and value:
                value = "********"
            rows.append([key, _config_text(opt, value),
                         "" if opt.default is None else _config_text(opt, opt.default, raw=True),
                         "no" if opt.name in _RESTART_KEYS or opt.section == "prometheus"
                         else "yes"])
        return Result("SHOW", [("key", "s"), ("value", "s"), ("default", "s"),
                               ("changeable", "s")], rows)

    def show_lists(self) -> Result:
        cfg = self.pools.config
        users = {u.username for p in cfg.pools.values() for u in p.users}
        logged_in = len(self.pools.clients)
        return Result("SHOW", [("list", "s"), ("items", "i")], [
            ("databases", len(cfg.pools)), ("users", len(users)), ("peers", 0),
            ("pools", len(self.pools.all_pools())), ("peer_pools", 0), ("free_clients", 0),
            ("used_clients", logged_in), ("login_clients", _login_clients(self.pools)),
            ("free_servers", 0), ("used_servers", self.pools.server_count()),
            ("dns_names", 0), ("dns_zones", 0), ("dns_queries", 0), ("dns_pending", 0)])

    def show_state(self) -> Result:
        paused = self.pools.paused_all
        return Result("SHOW", [("key", "s"), ("value", "s")], [
            ("active", "no" if paused else "yes"), ("paused", "yes" if paused else "no"),
            ("suspended", "yes" if getattr(self.top, "suspended", False) else "no")])

    def _stats_rows(self):
        """Per database: (name, totals Snapshot, averages Snapshot)."""
        from pgdoorman.stats import Snapshot
        period = self.pools.stats_period()
        out = []
        for db, pools in self.pools.pools_by_database().items():
            total, older = Snapshot(), Snapshot()
            for pool in pools:
                total.add(pool.snapshot())
                older.add(pool.older)
            out.append((db, total, total.averages(older, period), pools))
        return out

    def show_stats(self) -> Result:
        rows = []
        for db, total, avg, pools in self._stats_rows():
            hist = _merged(p.stats.xact_hist for p in pools)
            rows.append([db] + _snap(total) + _snap(avg) +
                        [int(hist.quantile(q) * 1e6) for q in (0.5, 0.95, 0.99)])
        columns = [("database", "s")]
        columns += [("total_" + n, "N") for n in _STATS_NAMES]
        columns += [("avg_" + n.replace("received", "recv"), "N") for n in _STATS_NAMES]
        columns += [("xact_p50_us", "q"), ("xact_p95_us", "q"), ("xact_p99_us", "q")]
        return Result("SHOW", columns, rows)

    def show_stats_totals(self) -> Result:
        rows = [[db] + _snap(total) for db, total, _avg, _p in self._stats_rows()]
        return Result("SHOW", [("database", "s")] + [(_totals_name(n), "N")
                                                     for n in _STATS_NAMES], rows)

    def show_stats_averages(self) -> Result:
        rows = [[db] + _snap(avg) for db, _total, avg, _p in self._stats_rows()]
        names = [_totals_name(n) for n in _STATS_NAMES]
        names = [("avg_" + n) if n in ("client_parse_count", "server_parse_count", "bind_count")
                 else n for n in names]
        return Result("SHOW", [("database", "s")] + [(n, "N") for n in names], rows)

    def show_totals(self) -> Result:
        from pgdoorman.stats import Snapshot
        total, avg = Snapshot(), Snapshot()
        for _db, t, a, _p in self._stats_rows():
            total.add(t)
            avg.add(a)
        fields = ["server_assignment_count", "xact_count", "query_count", "client_bytes",
                  "server_bytes", "xact_time", "query_time", "wait_time", "client_parse_count",
                  "server_parse_count", "bind_count", "client_connect_count"]
        rows = [("total_" + f, getattr(total, f)) for f in fields]
        rows += [("avg_" + f, getattr(avg, f)) for f in fields]
        return Result("SHOW", [("name", "s"), ("value", "N")], rows)

    def show_prepared_statements(self) -> Result:
        rows = []
        for pool in self.pools.all_pools():
            ps = pool.statements
            held = sum(len(s.statements.names) for s in pool.servers)
            rows.append([pool.database, pool.user, len(ps.statements), ps.hits, ps.misses,
                         ps.evictions, held, pool.settings.prepared_statements_cache_size,
                         pool.settings.server_prepared_statements_cache_size])
        return Result("SHOW", [
            ("database", "s"), ("user", "s"), ("statements", "i"), ("hits", "q"),
            ("misses", "q"), ("evictions", "q"), ("server_statements", "i"),
            ("cache_size", "i"), ("server_cache_size", "i")], rows)

    def show_prepared_queries(self) -> Result:
        rows = []
        for pool in self.pools.all_pools():
            for name, stmt in pool.statements.statements.items():
                servers = sum(1 for s in pool.servers if name in s.statements.names)
                rows.append([pool.database, pool.user, name[8:].decode("ascii", "replace"),
                             name.decode("ascii", "replace"), stmt.query, servers])
        return Result("SHOW", [("database", "s"), ("user", "s"), ("hash", "s"), ("name", "s"),
                               ("query", "s"), ("servers", "i")], rows)

    def show_auth_query(self) -> Result:
        """PgDoorman's SHOW AUTH_QUERY: one row per pool with an auth_query."""
        from pgdoorman.auth import query as _auth_query
        return Result("SHOW", _auth_query.SHOW_COLUMNS,
                      [aq.row() for aq in _auth_query.all_queries(self.pools)])

    def show_startup_parameters(self) -> Result:
        """
        PgDoorman's SHOW STARTUP_PARAMETERS: one row per parameter per pool, with the
        columns of PgDoorman 3.10's admin documentation (user, database, parameter, value,
        source, state).  C{source} is C{general} or C{pool} (the more specific wins per
        key); PgDoorman's third source, an auth_query column with per-user values, is not
        read by pgdoorman, so it never appears.  C{state} is C{applied} for a live pool
        (its next server's StartupMessage carries the value) and C{stale} for a pool that a
        RELOAD replaced or removed and that drains with the values its servers were started
        with.  PgDoorman's C{dropped_due_to_budget} does not occur: pgdoorman sends the whole
        set.
        """
        rows = []
        for pool in self.pools.all_pools():
            s = pool.settings
            sources = s.startup_parameter_sources
            state = "stale" if pool.draining else "applied"
            for key, value in sorted(s.startup_parameters.items()):
                rows.append([pool.user, pool.database, key, value,
                             sources.get(key, "pool"), state])
        return Result("SHOW", [("user", "s"), ("database", "s"), ("parameter", "s"),
                               ("value", "s"), ("source", "s"), ("state", "s")], rows)

    def show_log_level(self) -> Result:
        return Result("SHOW", [("log_level", "s")], [(logs.get_level(),)])

    def show_connections(self) -> Result:
        errs = self.pools.errors
        total_clients = sum(p.stats.client_connect_count for p in self.pools.all_pools())
        return Result("SHOW", [("kind", "s"), ("count", "q")], [
            ("clients", len(self.pools.clients)),
            ("clients_total", total_clients),
            ("servers", self.pools.server_count()),
            ("servers_total", sum(p.stats.server_connects for p in self.pools.all_pools())),
            ("server_connect_errors", sum(p.stats.server_connect_errors
                                          for p in self.pools.all_pools())),
            ("errors", sum(errs.values())),
            ("auth_failures", errs.get(errors.INVALID_PASSWORD, 0)
             + errs.get(errors.INVALID_AUTHORIZATION, 0)),
            ("tls", 0), ("plain", len(self.pools.clients))])

    # -- control ------------------------------------------------------------------------------

    def _database(self, arg: str) -> Optional[str]:
        if not arg:
            return None
        if arg in ("pgdoorman", "pgbouncer"):
            raise AdminError("cannot do that to the admin database: %s" % arg, OBJECT_IN_USE)
        if not self.pools.known_database(arg):
            raise AdminError("no such database: %s" % arg, OBJECT_NOT_FOUND)
        return arg

    def cmd_reload(self, arg: str) -> Result:
        if arg:
            raise AdminError("invalid command 'RELOAD %s', use SHOW HELP;" % arg)
        self.log.info("RELOAD command issued")
        ok, message = self.top.reload_config()
        if not ok:
            raise AdminError("RELOAD failed: %s" % message, CONFIG_FILE_ERROR)
        if getattr(self.top, "worker", None) is not None:
            self.top.worker.tell_others("reload")  # worker_threads: every worker reloads
        return Result("RELOAD")

    def cmd_pause(self, arg: str) -> defer.Deferred:
        db = self._database(arg)
        if self.pools.is_paused(db) and (db is None or db in self.pools.paused_databases):
            raise AdminError("already paused" if db is None else "database %s is already "
                             "paused" % db, OBJECT_IN_USE)
        self.log.info("PAUSE {db} command issued", db=db or "")
        d = self.pools.pause(db)
        worker = getattr(self.top, "worker", None)
        if worker is not None:  # worker_threads: answered once every worker has paused
            others = worker.ask_others("pause", timeout=3600.0, db=db)
            d = defer.gatherResults([d, others], consumeErrors=True)
            d.addErrback(lambda f: f.value.subFailure)
        d.addCallback(lambda _: Result("PAUSE"))
        d.addErrback(_as_admin_error)
        return d

    def cmd_resume(self, arg: str) -> Result:
        db = self._database(arg)
        if db is None and getattr(self.top, "suspended", False):
            self.top.resume_suspended()
        if db is None and not (self.pools.paused_all or self.pools.paused_databases):
            raise AdminError("pooler is not paused", OBJECT_IN_USE)
        if db is not None and db not in self.pools.paused_databases:
            raise AdminError("database %s is not paused" % db, OBJECT_IN_USE)
        self.log.info("RESUME {db} command issued", db=db or "")
        self.pools.resume(db)
        if getattr(self.top, "worker", None) is not None:
            self.top.worker.tell_others("resume", db=db)
        return Result("RESUME")

    def cmd_reconnect(self, arg: str) -> Result:
        db = self._database(arg)
        self.log.info("RECONNECT {db} command issued", db=db or "")
        self.pools.reconnect(db)
        if getattr(self.top, "worker", None) is not None:
            self.top.worker.tell_others("reconnect", db=db)
        return Result("RECONNECT")

    def cmd_kill(self, arg: str) -> Result:
        db = self._database(arg)
        if db is None:
            raise AdminError("KILL needs a database: KILL <db>", SYNTAX_ERROR)
        self.log.info("KILL {db} command issued", db=db)
        self.pools.kill(db)
        if getattr(self.top, "worker", None) is not None:
            self.top.worker.tell_others("kill", db=db)
        return Result("KILL")

    def cmd_shutdown(self, arg: str) -> Result:
        """
        SHUTDOWN (and PgBouncer's SHUTDOWN WAIT_FOR_SERVERS): let running transactions
        finish, then exit.  SHUTDOWN WAIT_FOR_CLIENTS: wait until every client has left.
        Both stop waiting after general.shutdown_timeout.
        """
        mode = arg.strip().lower()
        if mode not in ("", "wait_for_servers", "wait_for_clients"):
            raise AdminError("invalid command 'SHUTDOWN %s', use SHOW HELP;" % arg)
        self.log.info("SHUTDOWN {mode} command issued", mode=mode.upper())
        wait_for = "clients" if mode == "wait_for_clients" else "servers"
        if getattr(self.top, "worker", None) is not None:
            self.top.worker.tell_others("shutdown", wait_for)  # worker_threads: all stop
        self.top.shutdown(wait_for)
        return Result("SHUTDOWN")

    def cmd_upgrade(self, arg: str) -> defer.Deferred:
        """
        Zero-downtime upgrade (L{pgdoorman.upgrade}): answers once the new process accepts
        connections, or with the reason it was refused (this process then keeps serving).
        This console stays on the old process and ends with it.
        """
        if arg:
            raise AdminError("invalid command 'UPGRADE %s', use SHOW HELP;" % arg)
        self.log.info("UPGRADE command issued")

        def answered(result):
            ok, message = result
            if not ok:
                raise AdminError("UPGRADE failed: %s" % message, CONFIG_FILE_ERROR)
            return Result("UPGRADE", notices=[_notice(message)])

        d = self.top.upgrade("admin console UPGRADE")
        d.addCallback(answered)
        d.addErrback(_as_admin_error)
        return d

    def cmd_suspend(self, arg: str) -> defer.Deferred:
        """
        SUSPEND (L{pgdoorman.service.PgDoormanService.suspend}): answers once no connection is
        accepted, no transaction runs and every socket's output has been flushed; RESUME
        undoes it.
        """
        if arg:
            raise AdminError("invalid command 'SUSPEND %s', use SHOW HELP;" % arg)
        if getattr(self.top, "suspended", False):
            raise AdminError("already suspended", OBJECT_IN_USE)
        self.log.info("SUSPEND command issued")
        d = self.top.suspend()
        d.addCallback(lambda _: Result("SUSPEND"))
        d.addErrback(_as_admin_error)
        return d

    def cmd_set(self, key: str, value: Optional[str]) -> Result:
        if key in _FAKE_PARAMS:
            return Result("SET", notices=[_notice("SET ignored")])
        if key == "log_level":
            try:
                logs.set_level(value or "")
            except ValueError as e:
                raise AdminError(str(e), "22023")
            self.log.info("log_level set to {name} from the admin console", name=value)
            return Result("SET log_level=%s" % value)
        raise AdminError("SET %s is not supported: only log_level can be changed here; edit "
                         "the config file and RELOAD for the rest" % key, "55P02")

    # -- plain transaction statements some drivers send -----------------------------------------

    def cmd_begin(self, arg: str) -> Result:
        return Result("BEGIN")

    def cmd_commit(self, arg: str) -> Result:
        return Result("COMMIT")

    def cmd_rollback(self, arg: str) -> Result:
        return Result("ROLLBACK")


def _as_admin_error(failure):
    err = failure.value
    if isinstance(err, AdminError):
        return failure
    if isinstance(err, errors.PgError):
        raise AdminError(err.text, err.sqlstate)
    return failure


def _snap(snapshot) -> list:
    from pgdoorman.stats import SNAPSHOT_FIELDS
    return [int(round(getattr(snapshot, f))) for f in SNAPSHOT_FIELDS]


def _totals_name(n: str) -> str:
    return {"received": "bytes_received", "sent": "bytes_sent"}.get(n, n)


def _merged(hists):
    from pgdoorman.stats import Histogram
    out = Histogram()
    for h in hists:
        out.merge(h)
    return out


def _tls_info(transport) -> str:
    """PgBouncer's C{tls} column: protocol/cipher of an encrypted connection."""
    try:
        conn = transport.getHandle()
        return "%s/%s" % (conn.get_protocol_version_name(), conn.get_cipher_name())
    except Exception:
        return "TLS"


def _buffered(transport) -> int:
    try:
        return len(transport.dataBuffer) + transport._tempDataLen
    except AttributeError:
        return 0


def _login_clients(pools) -> int:
    return sum(p.clients - len(p.members) for p in pools.all_pools())


def _config_text(opt, value, raw: bool = False) -> str:
    if value is None:
        return ""
    if raw:
        return str(value).lower() if isinstance(value, bool) else str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if opt.type in ("duration", "seconds") and isinstance(value, (int, float)):
        return "%gs" % value
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join("%s=%s" % kv for kv in value.items())
    return str(value)


class AdminSession:
    """
    One logged-in admin connection.  It takes over the client connection's C{dataReceived}
    and answers each statement in order; a command that waits (PAUSE, SHUTDOWN) holds the
    statements after it, as PgBouncer does.
    """

    log = Logger()

    def __init__(self, client, console: Optional[AdminConsole] = None):
        self.client = client
        self.console = console or AdminConsole(client.service)
        self.transport = client.transport
        #: whole messages read (protocol.framing), and those waiting behind a slow command.
        self._messages = MessageBuffer(ADMIN_MESSAGE_LIMIT)
        self._pending: deque = deque()
        self._busy = False
        self._skip = False            # after an error in the extended protocol, until Sync
        self._statements: Dict[bytes, str] = {}
        self._portals: Dict[bytes, str] = {}
        self._described: Dict[bytes, Result] = {}
        client.login_done()
        client.enter(self)
        pools = client.service
        version = "pgdoorman %s" % __version__
        for pool in pools.all_pools():
            if pool.server_params and pool.server_params.get("server_version"):
                version = pool.server_params["server_version"]
                break
        out = [messages.parameter_status(k, v) for k, v in (
            ("server_version", version), ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"), ("DateStyle", "ISO"), ("TimeZone", "GMT"),
            ("integer_datetimes", "on"), ("standard_conforming_strings", "on"),
            ("application_name", client.session.startup.get("application_name", "") or ""),
            ("is_superuser", "on"))]
        out.append(messages.backend_key_data(0, 0))
        out.append(messages.ready_for_query(b"I"))
        self.transport.write(b"".join(out))
        self.log.info("admin console: {user} logged in from {peer}",
                      user=client.session.user, peer=client.peer)

    # -- framing ------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            self._pending.extend(self._messages.feed(data))
        except FramingError as e:
            self._fatal("admin command too long" if "too long" in str(e) else str(e))
            return
        self._drain()

    def _drain(self) -> None:
        pending = self._pending
        while pending and not self._busy and not self.client.closed:
            code, payload = pending.popleft()
            try:
                d = self._message(code, payload)
            except AdminError as e:
                self._error(e)
                continue
            except Exception:
                self.log.failure("admin console: command failed")
                self._error(AdminError("internal error in the admin console", "XX000"))
                continue
            if isinstance(d, defer.Deferred):
                self._busy = True
                d.addErrback(self._unexpected)
                d.addBoth(self._resume)

    def _resume(self, _ignored) -> None:
        self._busy = False
        self._drain()

    def _unexpected(self, failure):
        self.log.failure("admin console: command failed", failure)

    def _write(self, data: bytes) -> None:
        if not self.client.closed:
            self.transport.write(data)

    def _fatal(self, text: str) -> None:
        self.client.fatal(errors.PgError(errors.PROTOCOL_VIOLATION, text))

    def _error(self, err: AdminError) -> None:
        self._write(err.to_bytes())
        if self._extended:
            self._skip = True
        else:
            self._write(messages.ready_for_query(b"I"))

    _extended = False

    # -- messages -----------------------------------------------------------------------------

    def _message(self, code: int, payload: bytes):
        if code == messages.TERMINATE:
            self.client.closed = True
            self.transport.loseConnection()
            return None
        if code == messages.QUERY:
            self._extended = False
            return self._query(payload.rstrip(b"\x00").decode("utf-8", "replace"))
        if code == messages.SYNC:
            self._skip = False
            self._extended = False
            self._write(messages.ready_for_query(b"I"))
            return None
        if code == messages.FLUSH:
            return None
        self._extended = True
        if self._skip:
            return None
        if code == messages.PARSE:
            name, rest = payload.split(b"\x00", 1)
            query = rest.split(b"\x00", 1)[0].decode("utf-8", "replace")
            self._statements[name] = query
            self._write(b"1\x00\x00\x00\x04")
            return None
        if code == messages.BIND:
            portal, rest = payload.split(b"\x00", 1)
            stmt = rest.split(b"\x00", 1)[0]
            if stmt not in self._statements:
                raise AdminError('prepared statement "%s" does not exist'
                                 % stmt.decode("utf-8", "replace"), "26000")
            self._portals[portal] = self._statements[stmt]
            self._described.pop(portal, None)
            self._write(b"2\x00\x00\x00\x04")
            return None
        if code == messages.DESCRIBE:
            kind, name = payload[:1], payload[1:].rstrip(b"\x00")
            if kind == b"S":
                # Columns are known only by running the command: describe statements as
                # having no parameters and let the portal Describe give the columns.
                self._write(messages.message(b"t", b"\x00\x00") + messages.message(b"n"))
                return None
            return self._describePortal(name)
        if code == messages.EXECUTE:
            name = payload.split(b"\x00", 1)[0]
            result = self._described.pop(name, None)
            if result is not None:
                self._write(result.to_bytes(describe=False))
                return None
            return self._executePortal(name)
        if code == messages.CLOSE:
            kind, name = payload[:1], payload[1:].rstrip(b"\x00")
            (self._statements if kind == b"S" else self._portals).pop(name, None)
            self._write(b"3\x00\x00\x00\x04")
            return None
        raise AdminError("unsupported message type %r in the admin console" % chr(code),
                         errors.PROTOCOL_VIOLATION)

    def _portalQuery(self, name: bytes) -> str:
        query = self._portals.get(name)
        if query is None:
            raise AdminError('portal "%s" does not exist' % name.decode("utf-8", "replace"),
                             "34000")
        statements = split_statements(query)
        if len(statements) != 1:
            raise AdminError("cannot insert multiple commands into a prepared statement",
                             SYNTAX_ERROR)
        return statements[0]

    def _describePortal(self, name: bytes) -> defer.Deferred:
        d = self.console.run(self._portalQuery(name))

        def done(result):
            self._described[name] = result
            self._write(b"".join(result.notices) + result.row_description())
            result.notices = []

        d.addCallbacks(done, self._failed)
        return d

    def _executePortal(self, name: bytes) -> defer.Deferred:
        d = self.console.run(self._portalQuery(name))
        d.addCallbacks(lambda result: self._write(result.to_bytes(describe=False)),
                       self._failed)
        return d

    def _failed(self, failure) -> None:
        failure.trap(AdminError)
        self._error(failure.value)

    def _query(self, sql: str) -> Optional[defer.Deferred]:
        statements = split_statements(sql)
        if not statements:
            self._write(messages.message(b"I") + messages.ready_for_query(b"I"))
            return None
        return self._runEach(statements)

    @defer.inlineCallbacks
    def _runEach(self, statements: List[str]):
        for statement in statements:
            try:
                result = yield self.console.run(statement)
            except AdminError as e:
                self._write(e.to_bytes())
                break
            except Exception:
                self.log.failure("admin console: {statement} failed", statement=statement)
                self._write(AdminError("internal error in the admin console", "XX000")
                            .to_bytes())
                break
            self._write(result.to_bytes())
        self._write(messages.ready_for_query(b"I"))


def run_command(pools, statement: str) -> defer.Deferred:
    """Run one admin statement outside a connection (the status page, tests)."""
    return AdminConsole(pools).run(statement)
