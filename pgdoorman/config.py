"""
Loading and validating pgdoorman's configuration file.

pgdoorman reads the same files PgDoorman reads (YAML or TOML, sections
C{general}, C{pools.<name>}, C{pools.<name>.users[]}), so that switching
poolers is a matter of pointing the new binary at the old file.  Three
promises shape this module:

  - Every key PgDoorman knows is accepted, even where pgdoorman does not act
    on it yet; L{Config.unimplemented_keys} names those so the caller can
    warn instead of the file failing to load.
  - Every mistake is reported with the file, the dotted key path and (for
    YAML) the line, because a pooler that refuses to start must say exactly
    why.
  - L{load} either returns a complete L{Config} or raises L{ConfigError};
    there is no half-configured state for a reload to trip over.

All options live in one table, L{OPTIONS}.  The loader, the defaults and
(later) the annotated reference config and the docs page are all derived
from it, so they cannot disagree.  Defaults are written there the way a user
would write them in the file ("3s", "256MB") and go through the same
conversion as user input.

Units after loading: every duration is a C{float} number of seconds, every
size an C{int} number of bytes.  In the file, a plain number given for a
duration means milliseconds, as in PgDoorman (C{src/config/duration.rs}:
"Plain numbers: interpreted as milliseconds for backward compatibility");
the few TCP options PgDoorman declares as plain seconds (C{tcp_keepalives_idle},
C{tcp_keepalives_interval}, C{tcp_so_linger}, C{tcp_user_timeout}) keep
meaning seconds.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

__all__ = [
    "Option",
    "OPTIONS",
    "ConfigError",
    "Config",
    "GeneralConfig",
    "PoolConfig",
    "UserConfig",
    "AuthQueryConfig",
    "PrometheusConfig",
    "PoolSettings",
    "load",
    "loads",
    "password_kind",
    "parse_duration",
    "parse_size",
]


# ---------------------------------------------------------------------------
# The option table
# ---------------------------------------------------------------------------

SECTIONS = ("general", "pool", "user", "auth_query", "prometheus")

# What each type accepts, for error messages and the generated docs.
TYPE_DESCRIPTIONS = {
    "str": "a string",
    "int": "an integer",
    "workers": 'a number of worker processes, or "auto" (one per core)',
    "bool": "a boolean (true or false)",
    "port": "a port number (1..65535)",
    "duration": 'a duration such as "30s", "5m", "100ms", "1h", "2d" '
    "or a number of milliseconds",
    "seconds": 'a duration such as "30s", "5m" or a number of seconds',
    "size": 'a size such as "64KB", "256MB", "1GB" or a number of bytes',
    "pool_mode": '"transaction" or "session"',
    "session_state_policy": '"pin", "refuse" or "ignore"',
    "mode": 'an octal permission mode as a string, such as "0600"',
    "str_list": "a list of strings",
    "cidr_list": 'a list of CIDR networks such as "10.0.0.0/8"',
    "str_map": "a table of parameter names to string values",
    "pg_hba": "pg_hba.conf content as a string, or a table with "
    "either 'path' or 'content'",
    "auth_query": "a table of auth_query settings",
    "user_list": "a list of users",
}


@dataclass(frozen=True)
class Option:
    """
    One configuration key.

    @ivar name: the key as written in the file (PgDoorman's spelling).
    @ivar section: one of L{SECTIONS}: C{"general"}, C{"pool"} (a
        C{pools.<name>} table), C{"user"} (an entry of C{users}),
        C{"auth_query"} (C{pools.<name>.auth_query}) or C{"prometheus"}.
    @ivar type: a key of L{TYPE_DESCRIPTIONS}.
    @ivar default: the value used when the key is absent, written as in
        the file; C{None} means "not set" (for pool and user options:
        inherit from the enclosing level).
    @ivar help: one or two sentences for the reference config and docs.
    @ivar implemented: C{False} for keys pgdoorman accepts for
        compatibility but does not act on yet.
    @ivar required: the file must set this key.
    @ivar minimum: smallest accepted value for C{int} options (PgDoorman's
        integers are unsigned, hence the default of 0).
    @ivar maximum: largest accepted value for C{int} options, if any.
    @ivar alias_of: for deprecated spellings, the option that receives the
        value.
    """

    name: str
    section: str
    type: str
    default: Any
    help: str
    implemented: bool = True
    required: bool = False
    minimum: Optional[int] = 0
    maximum: Optional[int] = None
    alias_of: Optional[str] = None


def _opts(section: str, *rows: tuple, **common: Any) -> List[Option]:
    return [Option(name, section, type_, default, help_, **dict(common, **extra))
            for (name, type_, default, help_, extra) in rows]


def _r(name: str, type_: str, default: Any, help_: str, **extra: Any) -> tuple:
    return (name, type_, default, help_, extra)


# Defaults: PgDoorman's source, ozontech/pg_doorman src/config/general.rs,
# pool.rs, user.rs, prometheus.rs (serde defaults, i.e. what the binary does
# when a key is absent), and its reference docs documentation/docs/reference/
# general.md and pool.md.  Where the two disagree we follow the binary and say
# so: idle_timeout (code 10m, docs 300000000ms), server_lifetime (code 20m,
# docs 5m), server_idle_check_timeout (code 60s, docs 30s),
# tcp_keepalives_interval (code 5, docs 1).  Exceptions, where the docs,
# the README and the example configs agree against the code: port 6432 (code
# 5432) and log_client_connections/disconnections true (serde's bare
# `default` gives false, General::default() and the docs give true).
OPTIONS: List[Option] = (
    _opts(
        "general",
        # -- listening and admin console
        _r("host", "str", "0.0.0.0", "Address to listen on for clients."),
        _r("port", "port", 6432, "Port to listen on for clients."),
        _r("backlog", "int", 0,
           "TCP listen backlog; 0 means use max_connections."),
        _r("unix_socket_dir", "str", None,
           "Directory for the .s.PGSQL.<port> Unix socket (psql -h DIR); unset "
           "means no Unix socket. pg_hba 'local' rules match its clients."),
        _r("unix_socket_mode", "mode", "0600",
           "Permissions of the Unix socket file."),
        _r("admin_username", "str", "admin",
           "User name for the admin console (database 'pgdoorman')."),
        _r("admin_password", "str", None,
           "Password for the admin console. Required.", required=True),
        _r("max_connections", "int", 8192,
           "Maximum number of client connections; more are refused with "
           "53300 'sorry, too many clients already'.", minimum=1),
        # -- timeouts
        _r("connect_timeout", "duration", "3s",
           "Time allowed to establish a new server connection."),
        _r("query_wait_timeout", "duration", "5s",
           "How long a client may wait for a server connection from the "
           "pool before it gets an error."),
        # PgBouncer's name; PgDoorman has no such key.
        _r("client_login_timeout", "duration", "60s",
           "Time a client has from connecting to finishing TLS, startup and "
           "authentication; slower clients are closed. 0 disables."),
        _r("idle_timeout", "duration", "10m",
           "Close server connections idle for longer than this."),
        _r("server_lifetime", "duration", "20m",
           "Close server connections older than this when they are next "
           "idle."),
        _r("server_idle_check_timeout", "duration", "60s",
           "Check a server connection idle for longer than this with "
           "pooler_check_query before handing it to a client; one that does "
           "not answer within connect_timeout is closed and replaced. 0 "
           "disables."),
        _r("shutdown_timeout", "duration", "10s",
           "On graceful shutdown or binary upgrade, how long to let clients "
           "finish their transactions."),
        _r("proxy_copy_data_timeout", "duration", "15s",
           "Maximum wait for data while proxying COPY.", implemented=False),
        _r("retain_connections_time", "duration", "30s",
           "Interval of the idle connection reaper.", implemented=False),
        _r("retain_connections_max", "int", 3,
           "Idle connections closed per reaper cycle; 0 means all.",
           implemented=False),
        _r("max_concurrent_creates", "int", 4,
           "Server connections a pool may be opening at the same time.",
           minimum=1),
        # -- TCP
        _r("tcp_keepalives_idle", "seconds", 5,
           "TCP keepalive idle time (plain numbers are seconds)."),
        _r("tcp_keepalives_count", "int", 5, "TCP keepalive probe count."),
        _r("tcp_keepalives_interval", "seconds", 5,
           "TCP keepalive probe interval (plain numbers are seconds)."),
        _r("tcp_so_linger", "seconds", 0,
           "SO_LINGER on client sockets; 0 sends RST on close.",
           implemented=False),
        _r("tcp_no_delay", "bool", True,
           "Set TCP_NODELAY (disable Nagle) on sockets."),
        _r("tcp_user_timeout", "seconds", 60,
           "TCP_USER_TIMEOUT for client sockets (Linux; plain numbers are "
           "seconds); 0 means the OS default.", implemented=False),
        _r("tcp_socket_buffer_size", "size", None,
           "SO_SNDBUF/SO_RCVBUF for sockets; unset means the OS default.",
           implemented=False),
        _r("unix_socket_buffer_size", "size", "1MB",
           "Buffer size for Unix socket connections to PostgreSQL.",
           implemented=False),
        # -- logging
        _r("log_client_connections", "bool", True,
           "Log every client connection."),
        _r("log_client_disconnections", "bool", True,
           "Log every client disconnection."),
        _r("syslog_prog_name", "str", None,
           "Log to syslog under this program name instead of stdout."),
        _r("daemon_pid_file", "str", None,
           "Run as a daemon and write the pid here."),
        # -- memory and streaming
        _r("message_size_to_be_stream", "size", "1MB",
           "Server messages larger than this are streamed to the client in "
           "chunks instead of buffered.", implemented=False),
        _r("max_memory_usage", "size", "256MB",
           "Limit on memory used by message buffers of all clients.",
           implemented=False),
        # -- pooling behaviour
        _r("server_round_robin", "bool", False,
           "Hand out idle server connections round robin instead of reusing "
           "the most recently used one (LIFO)."),
        _r("sync_server_parameters", "bool", False,
           "PgDoorman: replay parameters the client SET on other server "
           "connections in transaction mode. pgdoorman always does, whatever this "
           "says: every SET follows its client (see session_state_policy)."),
        _r("listen_fanout", "bool", True,
           "In transaction mode, a client's lone LISTEN/UNLISTEN is answered by "
           "the pooler: one extra server connection per pool LISTENs for all its "
           "clients and hands them their notifications, so a listening client "
           "takes no server (see docs/listen.md). Off: LISTEN goes to the "
           "client's current server like any query."),
        _r("session_state_policy", "session_state_policy", "pin",
           "Transaction mode: what a statement that creates session state (a "
           "temporary table, LISTEN, a session advisory lock, a cursor WITH "
           "HOLD, SET ROLE) does. pin: the client keeps its server connection "
           "until the state is gone; refuse: the client gets an error and the "
           "statement never runs; ignore: the state stays on the server for "
           "its next client (PgBouncer)."),
        _r("pooler_check_query", "str", ";",
           "Query answered by the pooler itself, used for health checks and "
           "server_idle_check_timeout."),
        _r("worker_threads", "workers", 1,
           "Worker processes sharing one listening socket and one pool budget "
           "(pool_size is over all of them); \"auto\" is one per core. 1 is a "
           "single process. PgDoorman's threads, as processes.", minimum=1,
           maximum=126),
        _r("worker_cpu_affinity_pinning", "bool", False,
           "Pin workers to CPUs.", implemented=False),
        _r("tokio_global_queue_interval", "int", None,
           "Tokio runtime knob; accepted and ignored.", implemented=False),
        _r("tokio_event_interval", "int", None,
           "Tokio runtime knob; accepted and ignored.", implemented=False),
        _r("worker_stack_size", "size", None,
           "Tokio runtime knob; accepted and ignored.", implemented=False),
        _r("max_blocking_threads", "int", None,
           "Tokio runtime knob; accepted and ignored.", implemented=False),
        _r("scaling_warm_pool_ratio", "int", 20,
           "Percentage of pool_size opened without throttling.",
           implemented=False, maximum=100),
        _r("scaling_fast_retries", "int", 10,
           "Fast retries while waiting for a connection being created.",
           implemented=False),
        _r("scaling_max_parallel_creates", "int", 2,
           "Hard cap on concurrent connection creates per pool.",
           implemented=False, minimum=1),
        _r("scaling_cooldown_sleep", "duration", None,
           "Sleep between creation retries.", implemented=False),
        # -- prepared statements
        _r("prepared_statements", "bool", True,
           "Cache and remap prepared statements in transaction mode."),
        _r("prepared_statements_cache_size", "int", 8192,
           "Size of each pool's shared prepared statement cache."),
        _r("server_prepared_statements_cache_size", "int", None,
           "Size of each server connection's LRU of prepared statements; "
           "unset means prepared_statements_cache_size."),
        _r("client_anonymous_prepared_cache_size", "int", 256,
           "Per-client LRU of anonymous prepared statements; 0 means "
           "unbounded."),
        _r("client_prepared_statements_cache_size", "int", None,
           "Deprecated name of client_anonymous_prepared_cache_size.",
           alias_of="client_anonymous_prepared_cache_size"),
        # -- client TLS
        _r("tls_certificate", "str", None,
           "Certificate file for client TLS; needs tls_private_key."),
        _r("tls_private_key", "str", None,
           "Private key file for client TLS; needs tls_certificate."),
        _r("tls_ca_cert", "str", None,
           "CA file to verify client certificates (tls_mode verify-full)."),
        _r("tls_ca_file", "str", None, "Old name of tls_ca_cert.",
           alias_of="tls_ca_cert"),
        _r("tls_mode", "str", None,
           "Client TLS: allow, disable, require or verify-full (require and "
           "verify-full apply to TCP clients: Unix-socket clients never use TLS, "
           "as in PostgreSQL and PgBouncer)."),
        _r("tls_rate_limit_per_second", "int", 0,
           "Client TLS handshakes started per second (at least 100, a multiple "
           "of 100, as PgDoorman); clients over the limit wait their turn. 0 "
           "means unlimited."),
        # -- server TLS
        _r("server_tls_mode", "str", "allow",
           "TLS towards PostgreSQL: disable, allow, prefer, require, "
           "verify-ca or verify-full."),
        _r("server_tls_ca_cert", "str", None,
           "CA file to verify PostgreSQL's certificate."),
        _r("server_tls_certificate", "str", None,
           "Client certificate presented to PostgreSQL."),
        _r("server_tls_private_key", "str", None,
           "Key of server_tls_certificate."),
        _r("server_tls", "bool", False,
           "Old PgDoorman switch for server TLS; use server_tls_mode.",
           implemented=False),
        _r("verify_server_certificate", "bool", False,
           "Old PgDoorman switch; use server_tls_mode verify-full.",
           implemented=False),
        # -- access control
        _r("hba", "cidr_list", [],
           "Legacy list of client networks allowed to connect; cannot be "
           "combined with pg_hba."),
        _r("pg_hba", "pg_hba", None,
           "Access rules in pg_hba.conf format: inline text, or "
           "{path: FILE} or {content: TEXT}."),
        # -- server startup
        _r("startup_parameters", "str_map", {},
           "Parameters (GUCs) sent in every server StartupMessage; pools "
           "may override single entries."),
        # -- Patroni-assisted fallback
        _r("patroni_api_urls", "str_list", None,
           "Patroni REST API URLs asked (all at once) for GET /cluster when "
           "a pool's own server refuses connections; unset disables the "
           "fallback (see docs/fallback.md)."),
        _r("patroni_api_timeout", "duration", None,
           "Timeout of each GET /cluster request (unset: 5s)."),
        _r("fallback_cooldown", "duration", None,
           "After the own server refused a connection, new connections go to "
           "a fallback member for this long before it is tried again "
           "(unset: 30s)."),
        _r("fallback_connect_timeout", "duration", None,
           "Login deadline on each fallback candidate, and the base of a "
           "failed candidate's skip period (unset: 5s)."),
        _r("fallback_lifetime", "duration", None,
           "Lifetime of server connections opened on a fallback member "
           "(unset: fallback_cooldown)."),
    )
    + _opts(
        "pool",
        _r("server_host", "str", "127.0.0.1",
           "PostgreSQL host name or address, or a Unix socket directory."),
        _r("server_port", "port", 5432, "PostgreSQL port."),
        _r("server_database", "str", None,
           "Database name on the server; defaults to the pool's name."),
        _r("pool_mode", "pool_mode", "transaction",
           "transaction: a server is held for one transaction; session: "
           "for the whole client session."),
        _r("connect_timeout", "duration", None,
           "Overrides general.connect_timeout for this pool."),
        _r("idle_timeout", "duration", None,
           "Overrides general.idle_timeout for this pool."),
        _r("server_lifetime", "duration", None,
           "Overrides general.server_lifetime for this pool."),
        _r("session_state_policy", "session_state_policy", None,
           "Overrides general.session_state_policy for this pool."),
        _r("cleanup_server_connections", "bool", True,
           "Reset session state (RESET ALL, DEALLOCATE ALL) a client left "
           "on a server connection before reuse."),
        _r("log_client_parameter_status_changes", "bool", False,
           "Log parameters clients change with SET.", implemented=False),
        _r("application_name", "str", None,
           "application_name sent to the server for this pool."),
        _r("prepared_statements_cache_size", "int", None,
           "Overrides general.prepared_statements_cache_size."),
        _r("server_prepared_statements_cache_size", "int", None,
           "Overrides general.server_prepared_statements_cache_size."),
        _r("scaling_warm_pool_ratio", "int", None,
           "Overrides general.scaling_warm_pool_ratio.", implemented=False,
           maximum=100),
        _r("scaling_fast_retries", "int", None,
           "Overrides general.scaling_fast_retries.", implemented=False),
        _r("scaling_cooldown_sleep", "duration", None,
           "Overrides general.scaling_cooldown_sleep.", implemented=False),
        _r("max_db_connections", "int", None,
           "Cap on server connections to this database across all its "
           "users (the pool coordinator). At the cap, a pool that needs a "
           "connection closes an idle one of another user first; unset or 0 "
           "disables."),
        _r("min_connection_lifetime", "duration", None,
           "Connections younger than this are not evicted by the pool "
           "coordinator (unset: 30s)."),
        _r("reserve_pool_size", "int", None,
           "Connections allowed beyond max_db_connections for a client that "
           "waited reserve_pool_timeout at the cap (unset: 0). Needs "
           "max_db_connections."),
        _r("reserve_pool_timeout", "duration", None,
           "How long a client waits at max_db_connections (for an eviction "
           "or a returned connection) before the reserve is used, or, when "
           "the reserve is full, before it gets 'all server connections to "
           "database ... are in use' (unset: 3s)."),
        _r("min_guaranteed_pool_size", "int", None,
           "Connections of each user the coordinator never evicts for "
           "another user (unset: 0); the floor is the larger of this and the "
           "user's min_pool_size. Not a warm-up: see min_pool_size."),
        _r("server_tls_mode", "str", None,
           "Overrides general.server_tls_mode."),
        _r("server_tls_ca_cert", "str", None,
           "Overrides general.server_tls_ca_cert."),
        _r("server_tls_certificate", "str", None,
           "Overrides general.server_tls_certificate."),
        _r("server_tls_private_key", "str", None,
           "Overrides general.server_tls_private_key."),
        _r("startup_parameters", "str_map", {},
           "Merged over general.startup_parameters for this pool."),
        _r("patroni_api_urls", "str_list", None,
           "Overrides general.patroni_api_urls."),
        _r("patroni_api_timeout", "duration", None,
           "Overrides general.patroni_api_timeout."),
        _r("fallback_cooldown", "duration", None,
           "Overrides general.fallback_cooldown."),
        _r("fallback_connect_timeout", "duration", None,
           "Overrides general.fallback_connect_timeout."),
        _r("fallback_lifetime", "duration", None,
           "Overrides general.fallback_lifetime."),
        _r("auth_query", "auth_query", None,
           "Look up passwords of users not listed in users with a query."),
        _r("users", "user_list", [],
           "The users that may connect to this pool; at least one, unless "
           "the pool has an auth_query."),
    )
    + _opts(
        "user",
        _r("username", "str", None, "Name the client logs in with.",
           required=True),
        _r("password", "str", None,
           "Client password: an md5 hash (md5 + 32 hex digits), a SCRAM "
           "secret (SCRAM-SHA-256$...) or plaintext."),
        # PgDoorman's User::default() uses 40; its serde requires the key.
        _r("pool_size", "int", 40,
           "Maximum server connections for this user in this pool.",
           minimum=1),
        _r("min_pool_size", "int", None,
           "Server connections kept open even when idle; at most "
           "pool_size."),
        _r("pool_mode", "pool_mode", None, "Overrides the pool's pool_mode."),
        _r("server_lifetime", "duration", None,
           "Overrides the pool's server_lifetime."),
        _r("server_username", "str", None,
           "User name for PostgreSQL; defaults to username. Without "
           "server_password it logs in by trust, with the md5 hash in "
           "password, or with the client's SCRAM keys."),
        _r("server_password", "str", None,
           "Plaintext password for PostgreSQL; needed when password is a "
           "hash that PostgreSQL does not accept for server_username."),
        _r("auth_pam_service", "str", None,
           "Authenticate this user with this PAM service (the client sends "
           "a cleartext password; use TLS)."),
    )
    + _opts(
        "auth_query",
        _r("query", "str", None,
           "Query returning the md5 or SCRAM secret in a column named "
           "passwd or password (else the last column); $1 is the user name.",
           required=True),
        _r("user", "str", None, "PostgreSQL user that runs the query.",
           required=True),
        _r("password", "str", "",
           "Password of 'user': plaintext, or its md5 hash when PostgreSQL "
           "asks for md5."),
        _r("database", "str", None,
           "Database to run the query in; defaults to the pool's "
           "server_database."),
        _r("workers", "int", 2, "Connections that run auth queries.",
           minimum=1),
        _r("server_user", "str", None,
           "If set, all dynamic users share one pool as this user."),
        _r("server_password", "str", None,
           "Password of server_user; needs server_user."),
        _r("pool_size", "int", 40, "Pool size for dynamic users.",
           minimum=1),
        _r("min_pool_size", "int", 0,
           "Minimum connections per dynamic user pool."),
        _r("cache_ttl", "duration", "1h",
           "How long fetched passwords are cached."),
        _r("cache_failure_ttl", "duration", "30s",
           "How long 'user not found' is cached."),
        _r("min_interval", "duration", "1s",
           "Minimum interval between re-fetches for the same user."),
    )
    + _opts(
        # PgDoorman's exporter is a top-level `prometheus` table
        # (src/config/prometheus.rs), not a general key.
        "prometheus",
        _r("enabled", "bool", False, "Serve Prometheus metrics."),
        _r("host", "str", "0.0.0.0", "Address of the /metrics listener."),
        _r("port", "port", 9127, "Port of the /metrics listener."),
    )
)

# Top-level tables of newer PgDoorman versions that pgdoorman accepts without
# looking inside (web UI, Talos JWT keys).  They are reported by
# unimplemented_keys().
_OPAQUE_TOP_LEVEL = ("web", "talos")
_TOP_LEVEL = ("general", "pools", "prometheus", "include") + _OPAQUE_TOP_LEVEL


def options(section: str) -> Dict[str, Option]:
    """
    The options of one section, by name, in table order.
    """
    return {o.name: o for o in OPTIONS if o.section == section}


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class ConfigError(Exception):
    """
    The configuration file cannot be used.

    The message is complete on its own (file, line when known, key path,
    problem); the parts are also kept as attributes for callers that want to
    format them differently.

    @ivar path: the file name, or C{"<string>"}.
    @ivar key: the dotted key path such as C{pools.mydb.users[0].pool_size},
        or C{None} when the problem is with the file as a whole.
    @ivar line: 1-based line of the key in a YAML file, or C{None}.
    @ivar problem: what is wrong.
    """

    def __init__(self, path: str, problem: str, key: Optional[str] = None,
                 line: Optional[int] = None) -> None:
        self.path = path
        self.key = key
        self.line = line
        self.problem = problem
        where = path if line is None else "%s:%d" % (path, line)
        if key:
            message = "%s: %s: %s" % (where, key, problem)
        else:
            message = "%s: %s" % (where, problem)
        Exception.__init__(self, message)


class _Invalid(Exception):
    """
    A value was rejected; the loader adds file, key and line.
    """


# ---------------------------------------------------------------------------
# Value conversion
# ---------------------------------------------------------------------------

def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "boolean %s" % ("true" if value else "false")
    if isinstance(value, int):
        return "integer %d" % (value,)
    if isinstance(value, float):
        return "number %r" % (value,)
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return "string %r" % (shown,)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _wrong_type(type_: str, value: Any) -> _Invalid:
    return _Invalid("expected %s, got %s" % (TYPE_DESCRIPTIONS[type_],
                                             _describe(value)))


_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
_DURATION_UNITS = {
    "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
}


def parse_duration(value: Any, plain_unit: float = 1e-3) -> float:
    """
    Convert a configured duration to seconds.

    Strings take a unit suffix (C{us}, C{ms}, C{s}, C{m}, C{h}, C{d}, case
    insensitive) as in PgDoorman's C{src/config/duration.rs}.  Plain numbers,
    and strings without a suffix, are in units of C{plain_unit} seconds:
    milliseconds by default, which is what PgDoorman does.

    @raise ValueError: the value is not a non-negative duration.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("not a duration: %s" % (_describe(value),))
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value) * plain_unit
    match = _DURATION_RE.match(value)
    if match is None:
        raise ValueError("invalid duration %r (use a number with a unit "
                         "such as 100ms, 30s, 5m, 1h, 2d)" % (value,))
    number, unit = match.groups()
    if not unit:
        return float(number) * plain_unit
    factor = _DURATION_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError("invalid duration unit %r in %r (use us, ms, s, m, "
                         "h or d)" % (unit, value))
    return float(number) * factor


_SIZE_RE = re.compile(r"^\s*([0-9]+)\s*([a-zA-Z]*)\s*$")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1024,
    "m": 1024 ** 2, "mb": 1024 ** 2,
    "g": 1024 ** 3, "gb": 1024 ** 3,
}


def parse_size(value: Any) -> int:
    """
    Convert a configured size to bytes.

    As in PgDoorman's C{src/config/byte_size.rs}: plain integers are bytes;
    strings take C{B}, C{K}/C{KB}, C{M}/C{MB} or C{G}/C{GB} (binary
    multiples, case insensitive) after a whole number.

    @raise ValueError: the value is not a non-negative size.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("not a size: %s" % (_describe(value),))
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE_RE.match(value)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("invalid size %r (use a whole number with B, KB, "
                         "MB or GB)" % (value,))
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def password_kind(secret: str) -> str:
    """
    Classify a configured password the way PostgreSQL stores them.

    @return: C{"md5"} for C{md5} followed by 32 hex digits (pg_authid's md5
        format), C{"scram"} for a SCRAM-SHA-256 secret, else C{"plain"}.
    """
    if (len(secret) == 35 and secret.startswith("md5")
            and all(c in "0123456789abcdefABCDEF" for c in secret[3:])):
        return "md5"
    if secret.startswith("SCRAM-SHA-256$"):
        return "scram"
    return "plain"


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        problem = _wrong_type("str", value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            problem = _Invalid("%s (put it in quotes)" % (problem,))
        raise problem
    return value


def _as_int(value: Any, opt: Option) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type("int", value)
    if opt.minimum is not None and value < opt.minimum:
        raise _Invalid("must be at least %d, got %d" % (opt.minimum, value))
    if opt.maximum is not None and value > opt.maximum:
        raise _Invalid("must be at most %d, got %d" % (opt.maximum, value))
    return value


# Reserved startup keys, as PgDoorman's src/config/startup_parameters.rs:
# the pooler sets them itself, and PostgreSQL treats them specially.
_RESERVED_STARTUP_KEYS = ("user", "database", "replication", "options")
_GUC_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def _as_str_map(value: Any) -> Dict[str, str]:
    if not isinstance(value, dict):
        raise _wrong_type("str_map", value)
    result = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _GUC_NAME_RE.match(key):
            raise _Invalid("%r is not a valid parameter name" % (key,))
        if key.lower() in _RESERVED_STARTUP_KEYS or key.startswith("_pq_."):
            raise _Invalid("%r is managed by the pooler and cannot be set "
                           "here" % (key,))
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise _Invalid("value of %r: expected a string, got %s%s" % (
                key, _describe(item),
                " (write 'on' or 'off' in quotes)"
                if isinstance(item, bool) else ""))
        item = str(item)
        if "\0" in item:
            raise _Invalid("value of %r contains a NUL byte" % (key,))
        result[key] = item
    return result


def _as_str_list(value: Any) -> List[str]:
    if not isinstance(value, list):
        raise _wrong_type("str_list", value)
    for item in value:
        if not isinstance(item, str):
            raise _Invalid("expected a list of strings, found %s"
                           % (_describe(item),))
    return list(value)


def _as_cidr_list(value: Any) -> List[str]:
    if not isinstance(value, list):
        raise _wrong_type("cidr_list", value)
    for item in value:
        if not isinstance(item, str):
            raise _Invalid("expected CIDR strings, found %s"
                           % (_describe(item),))
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError as e:
            raise _Invalid("%r is not a CIDR network: %s" % (item, e))
    return list(value)


def _as_mode(value: Any) -> int:
    # YAML 1.1 reads an unquoted 0600 as the octal integer 384: that is the
    # mode the user meant, so small integers are taken as the mode itself.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _wrong_type("mode", value)
    if isinstance(value, int):
        mode = value
    else:
        digits = value.strip()
        if digits[:2] in ("0o", "0O"):
            digits = digits[2:]
        try:
            mode = int(digits, 8)
        except ValueError:
            raise _Invalid("%r is not an octal number" % (value,))
    if not 0 <= mode <= 0o777:
        raise _Invalid("mode %r is outside 0..0777" % (value,))
    return mode


def _convert(opt: Option, value: Any) -> Any:
    """
    Check and convert one non-null scalar or list/map option value.

    Nested tables (auth_query, pg_hba, users) are handled by the loader.
    """
    kind = opt.type
    if kind == "str":
        return _as_str(value)
    if kind == "int":
        return _as_int(value, opt)
    if kind == "workers":
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type("workers", value)
        return _as_int(value, opt)
    if kind == "bool":
        if not isinstance(value, bool):
            raise _wrong_type("bool", value)
        return value
    if kind == "port":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type("port", value)
        if not 1 <= value <= 65535:
            raise _Invalid("port must be between 1 and 65535, got %d"
                           % (value,))
        return value
    if kind in ("duration", "seconds"):
        try:
            return parse_duration(value, 1e-3 if kind == "duration" else 1.0)
        except ValueError as e:
            if isinstance(value, (str, int, float)) \
                    and not isinstance(value, bool):
                raise _Invalid(str(e))
            raise _wrong_type(kind, value)
    if kind == "size":
        try:
            return parse_size(value)
        except ValueError as e:
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                raise _Invalid(str(e))
            raise _wrong_type(kind, value)
    if kind == "pool_mode":
        if not isinstance(value, str):
            raise _wrong_type("pool_mode", value)
        if value not in ("transaction", "session"):
            raise _Invalid('pool_mode must be "transaction" or "session", '
                           "got %r" % (value,))
        return value
    if kind == "session_state_policy":
        if value not in ("pin", "refuse", "ignore"):
            raise _Invalid('session_state_policy must be "pin", "refuse" or '
                           '"ignore", got %r' % (value,))
        return value
    if kind == "mode":
        return _as_mode(value)
    if kind == "str_list":
        return _as_str_list(value)
    if kind == "cidr_list":
        return _as_cidr_list(value)
    if kind == "str_map":
        return _as_str_map(value)
    raise AssertionError("no converter for option type %r" % (kind,))


# ---------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------

@dataclass
class GeneralConfig:
    """
    The C{general} section: one attribute per general option in L{OPTIONS}
    (durations in seconds, sizes in bytes, unset optional keys C{None}).
    """

    host: str
    port: int
    backlog: int
    unix_socket_dir: Optional[str]
    unix_socket_mode: int
    admin_username: str
    admin_password: str
    max_connections: int
    connect_timeout: float
    query_wait_timeout: float
    client_login_timeout: float
    idle_timeout: float
    server_lifetime: float
    server_idle_check_timeout: float
    shutdown_timeout: float
    proxy_copy_data_timeout: float
    retain_connections_time: float
    retain_connections_max: int
    max_concurrent_creates: int
    tcp_keepalives_idle: float
    tcp_keepalives_count: int
    tcp_keepalives_interval: float
    tcp_so_linger: float
    tcp_no_delay: bool
    tcp_user_timeout: float
    tcp_socket_buffer_size: Optional[int]
    unix_socket_buffer_size: int
    log_client_connections: bool
    log_client_disconnections: bool
    syslog_prog_name: Optional[str]
    daemon_pid_file: Optional[str]
    message_size_to_be_stream: int
    max_memory_usage: int
    server_round_robin: bool
    sync_server_parameters: bool
    listen_fanout: bool
    session_state_policy: str
    pooler_check_query: str
    worker_threads: Union[int, str]
    worker_cpu_affinity_pinning: bool
    tokio_global_queue_interval: Optional[int]
    tokio_event_interval: Optional[int]
    worker_stack_size: Optional[int]
    max_blocking_threads: Optional[int]
    scaling_warm_pool_ratio: int
    scaling_fast_retries: int
    scaling_max_parallel_creates: int
    scaling_cooldown_sleep: Optional[float]
    prepared_statements: bool
    prepared_statements_cache_size: int
    server_prepared_statements_cache_size: Optional[int]
    client_anonymous_prepared_cache_size: int
    tls_certificate: Optional[str]
    tls_private_key: Optional[str]
    tls_ca_cert: Optional[str]
    tls_mode: Optional[str]
    tls_rate_limit_per_second: int
    server_tls_mode: str
    server_tls_ca_cert: Optional[str]
    server_tls_certificate: Optional[str]
    server_tls_private_key: Optional[str]
    server_tls: bool
    verify_server_certificate: bool
    hba: List[str]
    #: pg_hba.conf text; a {path: FILE} entry is read at load time.
    pg_hba: Optional[str]
    startup_parameters: Dict[str, str]
    patroni_api_urls: Optional[List[str]]
    patroni_api_timeout: Optional[float]
    fallback_cooldown: Optional[float]
    fallback_connect_timeout: Optional[float]
    fallback_lifetime: Optional[float]


@dataclass
class UserConfig:
    """
    One entry of a pool's C{users}.  C{None} means "not set here": the
    effective value comes from L{Config.pool_settings}.
    """

    username: str
    password: Optional[str]
    pool_size: int
    min_pool_size: Optional[int]
    pool_mode: Optional[str]
    server_lifetime: Optional[float]
    server_username: Optional[str]
    server_password: Optional[str]
    auth_pam_service: Optional[str]


@dataclass
class AuthQueryConfig:
    """
    C{pools.<name>.auth_query}: how users not listed in C{users} are looked
    up in PostgreSQL (L{pgdoorman.auth.query}).
    """

    query: str
    user: str
    password: str
    database: Optional[str]
    workers: int
    server_user: Optional[str]
    server_password: Optional[str]
    pool_size: int
    min_pool_size: int
    cache_ttl: float
    cache_failure_ttl: float
    min_interval: float

    def dynamic_user(self, username: str) -> "UserConfig":
        """
        The user entry a looked-up user gets: passthrough (no server_user)
        logs in to PostgreSQL as the user itself, dedicated mode as
        server_user.  The password is not here: it is the looked-up secret.
        """
        return UserConfig(
            username=username, password=None, pool_size=self.pool_size,
            min_pool_size=self.min_pool_size, pool_mode=None,
            server_lifetime=None, server_username=self.server_user,
            server_password=self.server_password, auth_pam_service=None)


@dataclass
class PoolConfig:
    """
    One C{pools.<name>} table.  Timeouts left C{None} inherit from
    C{general}; C{server_database} is already filled in with the pool name
    when the file does not set it.
    """

    name: str
    server_host: str
    server_port: int
    server_database: str
    pool_mode: str
    connect_timeout: Optional[float]
    idle_timeout: Optional[float]
    server_lifetime: Optional[float]
    session_state_policy: Optional[str]
    cleanup_server_connections: bool
    log_client_parameter_status_changes: bool
    application_name: Optional[str]
    prepared_statements_cache_size: Optional[int]
    server_prepared_statements_cache_size: Optional[int]
    scaling_warm_pool_ratio: Optional[int]
    scaling_fast_retries: Optional[int]
    scaling_cooldown_sleep: Optional[float]
    max_db_connections: Optional[int]
    min_connection_lifetime: Optional[float]
    reserve_pool_size: Optional[int]
    reserve_pool_timeout: Optional[float]
    min_guaranteed_pool_size: Optional[int]
    server_tls_mode: Optional[str]
    server_tls_ca_cert: Optional[str]
    server_tls_certificate: Optional[str]
    server_tls_private_key: Optional[str]
    startup_parameters: Dict[str, str]
    patroni_api_urls: Optional[List[str]]
    patroni_api_timeout: Optional[float]
    fallback_cooldown: Optional[float]
    fallback_connect_timeout: Optional[float]
    fallback_lifetime: Optional[float]
    auth_query: Optional[AuthQueryConfig]
    users: List[UserConfig]

    def user(self, name: str) -> Optional[UserConfig]:
        """
        The configured user called C{name}, or C{None}.
        """
        for user in self.users:
            if user.username == name:
                return user
        return None


@dataclass
class PrometheusConfig:
    """
    The top-level C{prometheus} table (PgDoorman's exporter settings).
    """

    enabled: bool
    host: str
    port: int


@dataclass
class PoolSettings:
    """
    The effective settings of one (database, user) pool, with inheritance
    (user, then pool, then general, then default) already applied, so that
    the pooler never has to know where a value came from.

    @ivar server_password: the password to log in to PostgreSQL with:
        C{server_password} if set, else the client password when it is
        plaintext, else C{None}.  C{None} with a hashed C{client_password}
        is PgDoorman's "#1 setup issue": PostgreSQL will reject a login
        made with the hash, and the server side should say so.
    @ivar client_password: the user's C{password} as configured (md5 hash,
        SCRAM secret or plaintext), or C{None}.
    @ivar prepared_statements_cache_size: 0 when
        C{general.prepared_statements} is off.
    """

    pool_name: str
    username: str
    pool_mode: str
    pool_size: int
    min_pool_size: int
    server_host: str
    server_port: int
    server_database: str
    server_username: str
    server_password: Optional[str]
    client_password: Optional[str]
    connect_timeout: float
    idle_timeout: float
    server_lifetime: float
    query_wait_timeout: float
    server_round_robin: bool
    application_name: Optional[str]
    startup_parameters: Dict[str, str]
    cleanup_server_connections: bool
    prepared_statements_cache_size: int
    server_prepared_statements_cache_size: int
    #: where each of C{startup_parameters} came from, C{"general"} or C{"pool"}
    #: (SHOW STARTUP_PARAMETERS's source column).
    startup_parameter_sources: Dict[str, str] = field(default_factory=dict)
    session_state_policy: str = "pin"


@dataclass
class Config:
    """
    A loaded, validated configuration.

    @ivar path: the file it came from (C{"<string>"} for L{loads}).
    @ivar pools: by pool (virtual database) name, in file order.
    """

    path: str
    general: GeneralConfig
    pools: Dict[str, PoolConfig]
    prometheus: PrometheusConfig
    _unimplemented: List[str] = field(default_factory=list, repr=False,
                                      compare=False)

    def unimplemented_keys(self) -> List[str]:
        """
        Dotted paths of the keys this file sets that pgdoorman accepts but
        does not act on yet, in file order, for the caller to warn about.
        """
        return list(self._unimplemented)

    def pool_settings(self, pool_name: str, username: str) -> PoolSettings:
        """
        Resolve the effective settings for C{username} in pool C{pool_name}.

        @raise KeyError: there is no such pool, or no such user in it.
        """
        pool = self.pools[pool_name]
        user = pool.user(username)
        if user is None and pool.auth_query is not None:
            user = pool.auth_query.dynamic_user(username)
        if user is None:
            raise KeyError("no user %r in pool %r" % (username, pool_name))
        general = self.general

        def first(*values: Any) -> Any:
            for value in values:
                if value is not None:
                    return value
            return None

        server_password = user.server_password
        if server_password is None and user.password is not None \
                and password_kind(user.password) == "plain":
            server_password = user.password

        if general.prepared_statements:
            cache_size = first(pool.prepared_statements_cache_size,
                               general.prepared_statements_cache_size)
            server_cache_size = first(
                pool.server_prepared_statements_cache_size,
                general.server_prepared_statements_cache_size, cache_size)
        else:
            cache_size = server_cache_size = 0

        startup_parameters = dict(general.startup_parameters)
        startup_parameters.update(pool.startup_parameters)
        sources = {key: "pool" if key in pool.startup_parameters else "general"
                   for key in startup_parameters}

        return PoolSettings(
            pool_name=pool.name,
            username=user.username,
            pool_mode=first(user.pool_mode, pool.pool_mode),
            pool_size=user.pool_size,
            min_pool_size=first(user.min_pool_size, 0),
            server_host=pool.server_host,
            server_port=pool.server_port,
            server_database=pool.server_database,
            server_username=first(user.server_username, user.username),
            server_password=server_password,
            client_password=user.password,
            connect_timeout=first(pool.connect_timeout,
                                  general.connect_timeout),
            idle_timeout=first(pool.idle_timeout, general.idle_timeout),
            server_lifetime=first(user.server_lifetime, pool.server_lifetime,
                                  general.server_lifetime),
            query_wait_timeout=general.query_wait_timeout,
            server_round_robin=general.server_round_robin,
            application_name=pool.application_name,
            startup_parameters=startup_parameters,
            cleanup_server_connections=pool.cleanup_server_connections,
            prepared_statements_cache_size=cache_size,
            server_prepared_statements_cache_size=server_cache_size,
            startup_parameter_sources=sources,
            session_state_policy=first(pool.session_state_policy,
                                       general.session_state_policy),
        )


def _check_model() -> None:
    # The dataclasses are written out for readability; this keeps them in
    # step with the table, which is the source of truth.
    for cls, section, extra in (
            (GeneralConfig, "general", set()),
            (PoolConfig, "pool", {"name"}),
            (UserConfig, "user", set()),
            (AuthQueryConfig, "auth_query", set()),
            (PrometheusConfig, "prometheus", set())):
        wanted = {o.name for o in OPTIONS
                  if o.section == section and o.alias_of is None} | extra
        have = {f.name for f in fields(cls)}
        if wanted != have:
            raise AssertionError("%s out of step with OPTIONS: missing %s, "
                                 "extra %s" % (cls.__name__,
                                               sorted(wanted - have),
                                               sorted(have - wanted)))


_check_model()


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------

_Path = Tuple[Any, ...]


def _dotted(path: _Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += "[%d]" % (part,)
        else:
            out += ("." if out else "") + str(part)
    return out


class _YAMLLoader(yaml.SafeLoader):
    """
    A safe loader with YAML 1.2 booleans.

    PyYAML follows YAML 1.1, where C{yes}, C{no}, C{on} and C{off} are
    booleans; PgDoorman's parser (serde_yaml, YAML 1.2) takes only
    C{true}/C{false}.  Treating C{yes} as a string makes
    C{prepared_statements: yes} a type error here as it is there, and keeps
    C{password: on} a password.
    """


_YAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for (tag, regexp) in resolvers
            if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))


def _yaml_lines(node: Any, path: _Path, lines: Dict[_Path, int],
                duplicates: List[Tuple[_Path, int]],
                parents: Tuple[int, ...] = ()) -> None:
    """
    Record the 1-based line of every key and list item under C{node}.

    Only plain mappings and sequences are walked; keys reached through
    merge keys still load, they just have no line of their own.  C{parents}
    stops the walk on recursive aliases.
    """
    if id(node) in parents:
        return
    parents = parents + (id(node),)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key_path = path + (key_node.value,)
            if key_path in lines and key_node.value != "<<":
                duplicates.append((key_path, key_node.start_mark.line + 1))
            lines[key_path] = key_node.start_mark.line + 1
            _yaml_lines(value_node, key_path, lines, duplicates,
                        parents)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            item_path = path + (index,)
            lines[item_path] = item.start_mark.line + 1
            _yaml_lines(item, item_path, lines, duplicates, parents)


def _parse_yaml(text: str, path: str) -> Tuple[Any, Dict[_Path, int]]:
    try:
        data = yaml.load(text, Loader=_YAMLLoader)
        root = yaml.compose(text, Loader=_YAMLLoader)
    except yaml.YAMLError as e:
        line = None
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            line = mark.line + 1
        raise ConfigError(path, "not valid YAML: %s" % (e,), line=line)
    lines: Dict[_Path, int] = {}
    duplicates: List[Tuple[_Path, int]] = []
    if root is not None:
        _yaml_lines(root, (), lines, duplicates)
    if duplicates:
        key_path, line = duplicates[0]
        raise ConfigError(path, "key is set twice", key=_dotted(key_path),
                          line=line)
    return data, lines


def _parse_toml(text: str, path: str) -> Tuple[Any, Dict[_Path, int]]:
    try:
        import tomllib  # type: ignore[import-not-found]
    except ImportError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ConfigError(path, "reading TOML needs the 'tomli' package "
                                    "on Python before 3.11")
    try:
        return tomllib.loads(text), {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "not valid TOML: %s" % (e,))


class _Builder:
    """
    Turns parsed YAML/TOML data into a L{Config}, raising L{ConfigError} at
    the first problem.
    """

    def __init__(self, path: str, lines: Dict[_Path, int]) -> None:
        self.path = path
        self.lines = lines
        self.unimplemented: List[str] = []

    def error(self, key_path: _Path, problem: str) -> ConfigError:
        line = None
        probe = key_path
        while probe and line is None:
            line = self.lines.get(probe)
            probe = probe[:-1]
        return ConfigError(self.path, problem, key=_dotted(key_path) or None,
                           line=line)

    def unknown(self, key_path: _Path, key: Any, known: List[str],
                section: str) -> ConfigError:
        if not isinstance(key, str):
            return self.error(key_path, "keys must be strings, got %s"
                              % (_describe(key),))
        problem = "unknown key %r" % (key,)
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        elsewhere = [s for s in ("general", "pool", "user")
                     if s != section and key in options(s)]
        if close:
            problem += " (did you mean %r?)" % (close[0],)
        elif elsewhere:
            where = {"general": "in the general section",
                     "pool": "in a pools.<name> table",
                     "user": "in a users entry"}[elsewhere[0]]
            problem += " (%r is a setting %s)" % (key, where)
        return self.error(key_path, problem)

    def section(self, data: Any, key_path: _Path, section: str,
                ) -> Dict[str, Any]:
        """
        Check and convert one table against the options of C{section};
        return values by option name, defaults filled in.  Nested tables
        (users, auth_query, pg_hba) are returned raw for the caller.
        """
        if not isinstance(data, dict):
            raise self.error(key_path, "expected a table, got %s"
                             % (_describe(data),))
        table = options(section)
        values: Dict[str, Any] = {}
        set_by: Dict[str, str] = {}
        for key, raw in data.items():
            opt = table.get(key) if isinstance(key, str) else None
            if opt is None:
                raise self.unknown(key_path + (key,), key, list(table),
                                   section)
            name = opt.alias_of or opt.name
            if raw is not None and name in set_by:
                raise self.error(key_path + (key,), "%r and %r are the same "
                                 "setting; set only one"
                                 % (set_by[name], key))
            if raw is not None:
                set_by[name] = key
            if raw is None:
                # An explicit null means "not set" (PgDoorman's Option).
                continue
            if not opt.implemented:
                self.unimplemented.append(_dotted(key_path + (key,)))
            if opt.type in ("user_list", "auth_query", "pg_hba"):
                values[name] = raw
                continue
            try:
                values[name] = _convert(opt, raw)
            except _Invalid as e:
                raise self.error(key_path + (key,), str(e))
        for opt in table.values():
            if opt.alias_of is not None or opt.name in values:
                continue
            if opt.required:
                raise self.error(key_path, "missing required key %r"
                                 % (opt.name,))
            default = opt.default
            if default is not None and opt.type not in (
                    "user_list", "auth_query", "pg_hba"):
                default = _convert(opt, default)
            elif isinstance(default, (list, dict)):
                default = type(default)(default)
            values[opt.name] = default
        return values

    def pg_hba(self, raw: Any, key_path: _Path) -> Optional[str]:
        if raw is None or isinstance(raw, str):
            return raw
        if not isinstance(raw, dict):
            raise self.error(key_path, "expected %s, got %s"
                             % (TYPE_DESCRIPTIONS["pg_hba"], _describe(raw)))
        unknown = [k for k in raw if k not in ("path", "content")]
        if unknown:
            raise self.unknown(key_path + (unknown[0],), unknown[0],
                               ["path", "content"], "pg_hba")
        if len(raw) != 1:
            raise self.error(key_path, "set exactly one of 'path' or "
                             "'content'")
        (key, value), = raw.items()
        if not isinstance(value, str):
            raise self.error(key_path + (key,), "expected a string, got %s"
                             % (_describe(value),))
        if key == "content":
            return value
        # Relative to the config file, so the pair can move together.
        base = os.path.dirname(self.path) if self.path != "<string>" else ""
        hba_path = os.path.join(base, os.path.expanduser(value))
        try:
            with open(hba_path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise self.error(key_path + (key,), "cannot read pg_hba file "
                             "%r: %s" % (hba_path, e))

    def general(self, data: Any) -> GeneralConfig:
        key_path: _Path = ("general",)
        values = self.section(data, key_path, "general")
        values["pg_hba"] = self.pg_hba(values["pg_hba"],
                                       key_path + ("pg_hba",))
        if values["hba"] and values["pg_hba"] is not None:
            raise self.error(key_path + ("pg_hba",), "general.hba and "
                             "general.pg_hba cannot both be set; move the "
                             "hba networks into pg_hba rules")
        if (values["tls_certificate"] is None) != \
                (values["tls_private_key"] is None):
            missing = ("tls_private_key" if values["tls_private_key"] is None
                       else "tls_certificate")
            raise self.error(key_path, "tls_certificate and tls_private_key "
                             "must be set together; %r is missing"
                             % (missing,))
        if values["prepared_statements"] and \
                values["prepared_statements_cache_size"] == 0:
            raise self.error(key_path + ("prepared_statements_cache_size",),
                             "must be greater than 0 while "
                             "prepared_statements is true")
        return GeneralConfig(**values)

    def auth_query(self, raw: Any, key_path: _Path) -> AuthQueryConfig:
        values = self.section(raw, key_path, "auth_query")
        if values["server_password"] is not None \
                and values["server_user"] is None:
            raise self.error(key_path + ("server_password",),
                             "server_password needs server_user")
        if values["min_pool_size"] > values["pool_size"]:
            raise self.error(key_path + ("min_pool_size",),
                             "min_pool_size (%d) cannot be larger than "
                             "pool_size (%d)" % (values["min_pool_size"],
                                                 values["pool_size"]))
        return AuthQueryConfig(**values)

    def user(self, raw: Any, key_path: _Path) -> UserConfig:
        values = self.section(raw, key_path, "user")
        if values["min_pool_size"] is not None \
                and values["min_pool_size"] > values["pool_size"]:
            raise self.error(key_path + ("min_pool_size",),
                             "min_pool_size (%d) cannot be larger than "
                             "pool_size (%d)" % (values["min_pool_size"],
                                                 values["pool_size"]))
        # server_username alone is valid (PgDoorman 3.10): the forced user
        # logs in by trust, with the md5 hash, or with the ClientKey of the
        # client's own SCRAM login; server_password alone logs in as
        # username with it.
        return UserConfig(**values)

    def pool(self, name: Any, data: Any) -> PoolConfig:
        key_path: _Path = ("pools", name)
        if not isinstance(name, str) or not name:
            raise self.error(key_path, "pool names must be non-empty "
                             "strings")
        values = self.section(data, key_path, "pool")
        if values["server_database"] is None:
            values["server_database"] = name
        if values["auth_query"] is not None:
            values["auth_query"] = self.auth_query(
                values["auth_query"], key_path + ("auth_query",))

        raw_users = values["users"]
        users_path = key_path + ("users",)
        if isinstance(raw_users, dict):
            # PgDoorman's legacy TOML form: [pools.x.users.0] tables.
            for key in raw_users:
                if not (isinstance(key, str) and key.isdigit()):
                    raise self.error(users_path + (key,), "expected a list "
                                     "of users (or the legacy table with "
                                     "numeric keys), found key %r" % (key,))
            raw_users = list(raw_users.values())
        elif not isinstance(raw_users, list):
            raise self.error(users_path, "expected %s, got %s"
                             % (TYPE_DESCRIPTIONS["user_list"],
                                _describe(raw_users)))
        if not raw_users and values["auth_query"] is None:
            raise self.error(users_path if "users" in data else key_path,
                             "a pool needs at least one user (or an "
                             "auth_query)")
        users = []
        seen = set()
        for index, raw in enumerate(raw_users):
            user = self.user(raw, users_path + (index,))
            if user.username in seen:
                raise self.error(users_path + (index, "username"),
                                 "user %r is listed twice in this pool"
                                 % (user.username,))
            seen.add(user.username)
            users.append(user)
        values["users"] = users
        self.coordinator(values, key_path)
        return PoolConfig(name=name, **values)

    def coordinator(self, values: Dict[str, Any], key_path: _Path) -> None:
        """The pool coordinator's keys agree with each other and with the users."""
        guaranteed = values["min_guaranteed_pool_size"]
        cap = values["max_db_connections"]
        if guaranteed:
            for user in values["users"]:
                if guaranteed > user.pool_size:
                    raise self.error(
                        key_path + ("min_guaranteed_pool_size",),
                        "min_guaranteed_pool_size (%d) cannot be larger than "
                        "the pool_size (%d) of user %r"
                        % (guaranteed, user.pool_size, user.username))
        if cap:
            for index, user in enumerate(values["users"]):
                if user.min_pool_size and user.min_pool_size > cap:
                    raise self.error(
                        key_path + ("users", index, "min_pool_size"),
                        "min_pool_size (%d) cannot be larger than the "
                        "pool's max_db_connections (%d)"
                        % (user.min_pool_size, cap))

    def config(self, data: Any) -> Config:
        if data is None:
            raise ConfigError(self.path, "the file is empty; it needs a "
                              "'general' and a 'pools' section")
        if not isinstance(data, dict):
            raise ConfigError(self.path, "expected a table with 'general' "
                              "and 'pools' at the top, got %s"
                              % (_describe(data),))
        for key in data:
            if key not in _TOP_LEVEL:
                raise self.unknown((key,), key, list(_TOP_LEVEL), "top")
        if "include" in data:
            raise self.error(("include",), "include files are not "
                             "supported by pgdoorman yet; merge them into "
                             "this file")
        for key in _OPAQUE_TOP_LEVEL:
            if data.get(key) is not None:
                if not isinstance(data[key], dict):
                    raise self.error((key,), "expected a table, got %s"
                                     % (_describe(data[key]),))
                self.unimplemented.append(key)
        if data.get("general") is None:
            raise ConfigError(self.path, "missing required section "
                              "'general'")
        general = self.general(data["general"])
        raw_prometheus = data.get("prometheus")
        prometheus = PrometheusConfig(**self.section(
            {} if raw_prometheus is None else raw_prometheus,
            ("prometheus",), "prometheus"))
        if data.get("pools") is None:
            raise ConfigError(self.path, "missing required section 'pools'")
        if not isinstance(data["pools"], dict):
            raise self.error(("pools",), "expected a table of pools, got %s"
                             % (_describe(data["pools"]),))
        pools = {}
        for name, pool_data in data["pools"].items():
            pools[name] = self.pool(name, pool_data)
        return Config(path=self.path, general=general, pools=pools,
                      prometheus=prometheus,
                      _unimplemented=self.unimplemented)


def loads(text: str, fmt: str = "yaml", path: str = "<string>") -> Config:
    """
    Load a configuration from a string.

    @param fmt: C{"yaml"} or C{"toml"}.
    @param path: the name to use in error messages.
    @raise ConfigError: the text is not a valid configuration.
    """
    if fmt == "yaml":
        data, lines = _parse_yaml(text, path)
    elif fmt == "toml":
        data, lines = _parse_toml(text, path)
    else:
        raise ValueError("fmt must be 'yaml' or 'toml', not %r" % (fmt,))
    return _Builder(path, lines).config(data)


def load(path: str) -> Config:
    """
    Load and validate the configuration file at C{path}.

    The format follows the extension: C{.toml} is TOML, C{.yaml}/C{.yml}
    YAML.  Anything else is tried as YAML and, if that does not give a
    table, as TOML (PgDoorman treats unknown extensions as TOML; accepting
    both keeps either kind of file working).

    @raise ConfigError: the file cannot be read or is not a valid
        configuration; the message names the file, key and line.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, "cannot read configuration file: %s"
                          % (e.strerror or e,))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, "not UTF-8 text: %s" % (e,))
    ext = os.path.splitext(path)[1].lower()
    if ext == ".toml":
        return loads(text, "toml", path)
    if ext in (".yaml", ".yml"):
        return loads(text, "yaml", path)
    try:
        data, lines = _parse_yaml(text, path)
    except ConfigError as yaml_error:
        try:
            data, lines = _parse_toml(text, path)
        except ConfigError:
            raise yaml_error
    else:
        if not isinstance(data, dict):
            try:
                data, lines = _parse_toml(text, path)
            except ConfigError:
                pass
    return _Builder(path, lines).config(data)
