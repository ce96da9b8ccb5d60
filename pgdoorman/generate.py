"""
C{pgdoorman generate}: write a working configuration from a live PostgreSQL, or the annotated
reference of every option.

From a server (as PgDoorman's C{generate}): the databases that accept connections (templates
left out) become pools, the login roles with a password become the users of every pool, and
each user's client C{password} is PostgreSQL's own md5 or SCRAM hash from C{pg_authid}, so
clients keep logging in with their real passwords.  Reading C{pg_authid} needs a superuser.

C{--reference} needs no server: every option of L{pgdoorman.config.OPTIONS} with its default
and its help line, as YAML (commented out where the default applies) or, with C{--markdown},
as the page C{docs/configuration.md} (C{make docs}).  Both come from the one table, so the
reference, the docs and the loader cannot drift apart.

The server is read with pgdoorman's own small blocking client (L{pgdoorman.blockingclient}),
so generate needs nothing beyond a plain C{pip install}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import sys
from typing import Any, List, Optional, Tuple

from pgdoorman import __version__
from pgdoorman.config import OPTIONS, SECTIONS, TYPE_DESCRIPTIONS, Option, password_kind

__all__ = ["main", "Cluster", "render", "reference_yaml", "reference_markdown", "read_cluster"]

PLACEHOLDER = "CHANGE_ME"


class GenerateError(Exception):
    """Something a person must fix (connection refused, not a superuser, ...)."""


# -- reading the server ---------------------------------------------------------------------

class Cluster:
    """
    What C{generate} learned from the server.

    @ivar users: (role name, password hash) of every login role that has a password.
    @ivar no_password: login roles without a password (left out, with a comment saying why).
    @ivar unusable: (role, reason) for roles whose stored password is not a hash pgdoorman
        can use.
    """

    def __init__(self, server_host: str, server_port: int, databases: List[str],
                 users: List[Tuple[str, str]], no_password: List[str],
                 unusable: Optional[List[Tuple[str, str]]] = None, version: str = "") -> None:
        self.server_host = server_host
        self.server_port = server_port
        self.databases = databases
        self.users = users
        self.no_password = no_password
        self.unusable = unusable or []
        self.version = version


def read_cluster(host: Optional[str], port: Optional[int], user: Optional[str],
                 password: Optional[str], database: Optional[str], ssl: bool) -> Cluster:
    """
    Connect (libpq rules: unset values come from PGHOST, PGPORT, PGUSER, PGPASSWORD,
    ~/.pgpass) and read databases and login roles.

    @raise GenerateError: cannot connect, or the user may not read pg_authid.
    """
    from pgdoorman import blockingclient
    try:
        conn = blockingclient.connect(host=host, port=port, user=user, password=password,
                                      dbname=database or "postgres", connect_timeout=10,
                                      sslmode="require" if ssl else "prefer",
                                      application_name="pgdoorman generate")
    except blockingclient.ConnectError as e:
        raise GenerateError("cannot connect to PostgreSQL: %s" % (str(e).strip(),))
    with conn:
        try:
            return _read(conn, host, port)
        except blockingclient.QueryError as e:
            raise GenerateError("reading the catalogs failed: %s" % (e,))


def _read(conn, host: Optional[str], port: Optional[int]) -> Cluster:
    who, superuser = conn.query(
        "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")[0]
    if superuser != "t":
        raise GenerateError(
            "user %r is not a superuser: reading the password hashes in pg_authid needs "
            "one (run generate as a superuser, for example -u postgres)" % (who,))
    databases = [row[0] for row in conn.query(
        "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
        "ORDER BY datname")]
    users, no_password, unusable = [], [], []
    for name, secret in conn.query(
            "SELECT rolname, rolpassword FROM pg_authid WHERE rolcanlogin ORDER BY rolname"):
        if not secret:
            no_password.append(name)
        elif password_kind(secret) == "plain":
            unusable.append((name, "its stored password is not an md5 or SCRAM hash"))
        else:
            users.append((name, secret))
    version = conn.parameters.get("server_version") or conn.query("SHOW server_version")[0][0]
    return Cluster(host or conn.host, int(port or conn.port), databases, users,
                   no_password, unusable, version)


# -- writing a config -----------------------------------------------------------------------

def _q(value: str) -> str:
    """A double-quoted string valid in both YAML and TOML."""
    return json.dumps(value, ensure_ascii=False)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return _q(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join("%s: %s" % (_q(k), _scalar(v)) for k, v in value.items()) + "}"
    raise TypeError("cannot write %r" % (value,))


def _header_lines(cluster: Cluster, args: argparse.Namespace) -> List[str]:
    lines = [
        "pgdoorman configuration written by 'pgdoorman generate' %s on %s" % (
            __version__, datetime.date.today().isoformat()),
        "from PostgreSQL %s at %s port %d." % (cluster.version or "", cluster.server_host,
                                               cluster.server_port),
        "",
        "Client passwords are PostgreSQL's own md5/SCRAM hashes from pg_authid: clients log in",
        "with their usual passwords, and pgdoorman logs in to PostgreSQL with the md5 hash",
        "(md5 servers) or with the key from the client's own SCRAM login (SCRAM servers).",
        "If pg_hba.conf asks a user for a cleartext password ('password' method), add",
        "server_username and server_password (plaintext) to that user.",
        "Check the file with: pgdoorman -t FILE",
    ]
    if cluster.no_password:
        lines += ["", "Left out, because they have no password (pgdoorman cannot check a",
                  "password it does not know): " + ", ".join(cluster.no_password) + "."]
    for name, reason in cluster.unusable:
        lines += ["", "Left out: %s, because %s." % (name, reason)]
    if not cluster.users:
        lines += ["", "No login role has a password: add users before starting pgdoorman."]
    return lines


def render(cluster: Cluster, args: argparse.Namespace, fmt: str = "yaml",
           admin_password: Optional[str] = None) -> str:
    """The config text for C{cluster} in C{fmt} ("yaml" or "toml")."""
    comments = not getattr(args, "no_comments", False)
    admin_password = admin_password or secrets.token_urlsafe(18)
    mode = "session" if getattr(args, "session_pool_mode", False) else "transaction"
    pool_size = getattr(args, "pool_size", 40)
    general = [("host", "0.0.0.0", None), ("port", 6432, None),
               ("admin_username", "admin", "admin console: psql -p 6432 -U admin pgdoorman"),
               ("admin_password", admin_password, "generated at random; change it if you like")]
    if getattr(args, "ssl", False):
        general.append(("server_tls_mode", "require", "generate connected with --ssl"))
    out: List[str] = []
    if comments:
        out += [("# " + line).rstrip() for line in _header_lines(cluster, args)] + [""]
    toml = fmt == "toml"

    def kv(indent: str, key: str, value: Any, note: Optional[str]) -> str:
        sep = " = " if toml else ": "
        line = "%s%s%s%s" % (indent, key, sep, _scalar(value))
        if note and comments:
            line += "  # " + note
        return line

    out.append("[general]" if toml else "general:")
    for key, value, note in general:
        out.append(kv("" if toml else "  ", key, value, note))
    out.append("")
    if not toml:
        out.append("pools:")
    for db in cluster.databases:
        if toml:
            out.append("[pools.%s]" % _q(db))
        else:
            out.append("  %s:" % _q(db))
        indent = "" if toml else "    "
        out.append(kv(indent, "server_host", cluster.server_host, None))
        out.append(kv(indent, "server_port", cluster.server_port, None))
        out.append(kv(indent, "pool_mode", mode, None))
        if not toml:
            out.append(indent + ("users:" if cluster.users else "users: []"))
        for name, secret in cluster.users:
            kind = "md5 hash" if password_kind(secret) == "md5" else "SCRAM secret"
            if toml:
                out.append("")
                out.append("[[pools.%s.users]]" % _q(db))
                out.append(kv("", "username", name, None))
                out.append(kv("", "password", secret, kind))
                out.append(kv("", "pool_size", pool_size, None))
            else:
                out.append("      - username: %s" % _q(name))
                out.append(kv("        ", "password", secret, kind))
                out.append(kv("        ", "pool_size", pool_size, None))
        out.append("")
    if not cluster.databases and not toml:
        out[-1:] = ["pools: {}", ""]
    return "\n".join(out)


# -- the reference --------------------------------------------------------------------------

_EXAMPLES = {
    ("general", "admin_password"): PLACEHOLDER,
    ("user", "username"): PLACEHOLDER + "_user",
    ("user", "password"): PLACEHOLDER + "_password",
}

#: Options written uncommented in the reference, so that it is a loadable config.
_ACTIVE = {("general", "host"), ("general", "port"), ("general", "admin_username"),
           ("general", "admin_password"), ("pool", "server_host"), ("pool", "server_port"),
           ("pool", "pool_mode"), ("user", "username"), ("user", "password"),
           ("user", "pool_size")}


def _notes(opt: Option) -> str:
    notes = opt.help
    if opt.alias_of:
        notes += " (Old spelling; prefer %s.)" % opt.alias_of
    if not opt.implemented:
        notes += " Not implemented yet: accepted and ignored."
    if opt.required and "Required" not in notes:
        notes += " Required."
    return notes


def _wrap(text: str, width: int) -> List[str]:
    import textwrap
    return textwrap.wrap(text, width, break_on_hyphens=False) or [""]


def _option_lines(opt: Option, indent: str, comments: bool) -> List[str]:
    lines = []
    if comments:
        width = max(60, 92 - len(indent))
        lines += ["%s# %s" % (indent, line) for line in _wrap(_notes(opt), width)]
    value = _EXAMPLES.get((opt.section, opt.name), opt.default)
    if (opt.section, opt.name) in _ACTIVE:
        lines.append("%s%s: %s" % (indent, opt.name, _scalar(value)))
    elif value is None:
        lines.append("%s#%s:" % (indent, opt.name))
    else:
        lines.append("%s#%s: %s" % (indent, opt.name, _scalar(value)))
    return lines


def _section(name: str) -> List[Option]:
    return [o for o in OPTIONS if o.section == name]


def reference_yaml(comments: bool = True) -> str:
    """
    Every option as an annotated YAML config.  Options at their default are commented out
    (C{#name: default}); the few needed for a loadable file are set, with C{CHANGE_ME}
    placeholders where a real value is needed.
    """
    out: List[str] = []
    if comments:
        out += [
            "# pgdoorman %s: reference configuration, every option with its default." % (
                __version__,),
            "# Written by 'pgdoorman generate --reference' from the option table in",
            "# pgdoorman/config.py (docs/configuration.md is the same table).",
            "# '#name: value' lines show the default; remove the '#' to change one.",
            "# Durations: \"100ms\", \"30s\", \"5m\", \"1h\", \"2d\" or milliseconds;"
            " sizes: \"64KB\", \"256MB\", \"1GB\" or bytes.",
            "# Replace the CHANGE_ME placeholders, then check with: pgdoorman -t FILE",
            "",
        ]
    out.append("general:")
    for opt in _section("general"):
        out += _option_lines(opt, "  ", comments)
    out.append("")
    out.append("pools:")
    if comments:
        out.append("  # One table per database name that clients connect to.")
    out.append("  mydb:")
    for opt in _section("pool"):
        if opt.name == "users":
            continue
        if opt.name == "auth_query":
            if comments:
                out += ["    # %s" % line for line in _wrap(_notes(opt), 86)]
            out.append("    #auth_query:")
            for sub in _section("auth_query"):
                # Help lines stay "# ...", option lines lose their own "#": the block
                # uncomments as a whole.
                out += ["    #  " + (line if line.startswith("# ") else line[1:])
                        for line in _option_lines(sub, "", comments)]
            continue
        out += _option_lines(opt, "    ", comments)
    users = next(o for o in _section("pool") if o.name == "users")
    if comments:
        out += ["    # %s" % line for line in _wrap(_notes(users), 86)]
    out.append("    users:")
    first = True
    for opt in _section("user"):
        lines = _option_lines(opt, "        ", comments)
        if first and opt.name == "username":
            for i, line in enumerate(lines):
                if not line.lstrip().startswith("#"):
                    lines[i] = "      - " + line.lstrip()
            first = False
        out += lines
    out.append("")
    out.append("prometheus:")
    for opt in _section("prometheus"):
        out += _option_lines(opt, "  ", comments)
    return "\n".join(out) + "\n"


_SECTION_TITLES = {
    "general": ("`general`", "Listening, limits, timeouts, TLS, logging: one table."),
    "pool": ("`pools.<name>`", "One table per database name clients connect to. Timeouts "
                               "left unset inherit from `general`."),
    "user": ("`pools.<name>.users[]`", "The users of a pool."),
    "auth_query": ("`pools.<name>.auth_query`", "Passwords looked up with a query."),
    "prometheus": ("`prometheus`", "The metrics endpoint."),
}


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


def reference_markdown() -> str:
    """The configuration reference page (C{docs/configuration.md})."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `make docs` (pgdoorman generate --reference --markdown) from the",
        "     option table in pgdoorman/config.py. Do not edit by hand. -->",
        "",
        "pgdoorman reads PgDoorman's configuration files, YAML or TOML (by the file's",
        "extension). `pgdoorman generate --reference` writes this same list as an annotated",
        "YAML file; `pgdoorman -t FILE` checks a file.",
        "",
        "Durations take a unit (`100ms`, `30s`, `5m`, `1h`, `2d`); a plain number is",
        "milliseconds, except where the type says seconds. Sizes take `B`, `KB`, `MB`, `GB`;",
        "a plain number is bytes. Options marked *not implemented* are accepted so that",
        "PgDoorman's files load unchanged, and `pgdoorman -t` names them.",
        "",
        "| Type | Accepts |",
        "|---|---|",
    ]
    out += ["| `%s` | %s |" % (name, _md(text)) for name, text in TYPE_DESCRIPTIONS.items()]
    out.append("")
    for section in SECTIONS:
        title, intro = _SECTION_TITLES[section]
        out += ["## %s" % title, "", intro, "",
                "| Option | Type | Default | Description |", "|---|---|---|---|"]
        for opt in _section(section):
            default = "—" if opt.default is None else "`%s`" % _scalar(opt.default)
            if opt.required:
                default = "required"
            kind = "`%s`" % opt.type
            desc = opt.help
            if opt.alias_of:
                desc += " Old spelling of `%s`." % opt.alias_of
            if not opt.implemented:
                desc += " *Not implemented yet.*"
            out.append("| `%s` | %s | %s | %s |" % (opt.name, _md(kind), _md(default),
                                                     _md(desc)))
        out.append("")
    return "\n".join(out)


# -- the command ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgdoorman generate",
        description="Write a pgdoorman config from a running PostgreSQL (its databases and "
                    "login roles with their password hashes; needs a superuser), or the "
                    "annotated reference of every option (--reference).")
    p.add_argument("--host", help="host name, IP address or Unix socket directory "
                                   "(default: libpq's, $PGHOST)")
    p.add_argument("-p", "--port", type=int, help="port (default $PGPORT or 5432)")
    p.add_argument("-u", "--user", help="superuser to connect as (default $PGUSER)")
    p.add_argument("--password", help="password (default $PGPASSWORD or ~/.pgpass)")
    p.add_argument("-d", "--database", help="database to connect to (default postgres)")
    p.add_argument("--ssl", action="store_true",
                   help="require TLS to PostgreSQL (and set server_tls_mode: require)")
    p.add_argument("--pool-size", type=int, default=40, help="pool_size of each user (40)")
    p.add_argument("-s", "--session-pool-mode", action="store_true",
                   help="pool_mode session instead of transaction")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write here (.toml for TOML, else YAML; mode 0600); default stdout")
    p.add_argument("--no-comments", action="store_true", help="leave out the comments")
    p.add_argument("--reference", action="store_true",
                   help="no connection: every option with its default and what it does")
    p.add_argument("--markdown", action="store_true",
                   help="with --reference: the Markdown page docs/configuration.md")
    return p


def _write(text: str, output: Optional[str]) -> None:
    if not output:
        sys.stdout.write(text)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: Optional[List[str]] = None) -> int:
    """Run C{pgdoorman generate}; returns the exit status (0, 1 error, 2 usage)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.pool_size < 1:
        parser.error("--pool-size must be at least 1")
    if args.markdown and not args.reference:
        parser.error("--markdown goes with --reference")
    fmt = "toml" if (args.output or "").lower().endswith(".toml") else "yaml"
    try:
        if args.reference:
            if fmt == "toml":
                raise GenerateError("--reference is written as YAML; use a .yaml file name")
            text = reference_markdown() if args.markdown else \
                reference_yaml(comments=not args.no_comments)
        else:
            cluster = read_cluster(args.host, args.port, args.user, args.password,
                                   args.database, args.ssl)
            text = render(cluster, args, fmt)
        _write(text, args.output)
    except GenerateError as e:
        print("pgdoorman generate: %s" % e, file=sys.stderr)
        return 1
    except OSError as e:
        print("pgdoorman generate: cannot write %s: %s" % (args.output, e.strerror or e),
              file=sys.stderr)
        return 1
    if args.output:
        print("pgdoorman generate: wrote %s" % args.output, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
