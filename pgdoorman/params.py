"""
Session parameters that follow a client from one server connection to the next.

In transaction mode a client's consecutive transactions run on different server connections,
yet it must see the client_encoding, DateStyle, TimeZone... it asked for.  The pooler keeps the
values of a few parameters per client and per server and, when a client lands on a server whose
values differ, puts SET statements ahead of the client's query (their replies are swallowed).
Two kinds are tracked:

 - parameters PostgreSQL reports with ParameterStatus (GUC_REPORT): the pooler sees every
   change, whether the client sent SET or the value came from the startup packet;
 - parameters it does not report but that drivers send at startup (search_path,
   extra_float_digits): their value is what the startup packet said; a later SET by the client
   is invisible to the pooler, as it is to PgBouncer.
"""

from __future__ import annotations

import re
from typing import Dict, Optional

#: Reported by PostgreSQL 15 (GUC_REPORT) and meaningful per session.
REPORTED = ("client_encoding", "DateStyle", "TimeZone", "IntervalStyle",
            "standard_conforming_strings", "application_name")
#: Not reported, but set by drivers in the startup packet.
STARTUP_ONLY = ("search_path", "extra_float_digits")
TRACKED = REPORTED + STARTUP_ONLY

#: GUC names are case-insensitive; startup packets may use any case.
CANONICAL = {name.lower(): name for name in TRACKED}


def from_server(startup_params: Dict[str, str]) -> Dict[str, Optional[str]]:
    """A server's tracked values from its login ParameterStatus messages."""
    params: Dict[str, Optional[str]] = {k: startup_params.get(k) for k in REPORTED}
    for k in STARTUP_ONLY:
        params[k] = None  # None: the server's default, never SET by us
    return params


def parse_options(options: str) -> Dict[str, str]:
    """
    Decode the startup packet's C{options} ("-c name=value --name=value ..."), as libpq's
    PGOPTIONS sends it.  Backslash escapes a space, as in PostgreSQL's pg_split_opts.
    """
    words, cur, escape = [], [], False
    for ch in options:
        if escape:
            cur.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif ch.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    out: Dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        setting = None
        if w == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 1
        elif w.startswith("-c"):
            setting = w[2:]
        elif w.startswith("--"):
            setting = w[2:]
        if setting and "=" in setting:
            name, value = setting.split("=", 1)
            out[name.replace("-", "_")] = value
        i += 1
    return out


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sync_sql(want: Dict[str, Optional[str]], have: Dict[str, Optional[str]],
             complete: bool = False) -> str:
    """
    SQL that turns a server's values C{have} into the client's C{want}.

    Values go through set_config(), which parses them as the startup packet would: a
    search_path of "a, b" is two schemas there, while SET search_path TO 'a, b' is one.
    With C{complete}, C{want} is all the client has: what only C{have} holds (settings of
    the server's previous client, L{pgdoorman.sessionstate}) is RESET.
    """
    resets, sets = [], []
    if complete:
        for name, value in have.items():
            if value is not None and name not in want:
                resets.append("RESET %s" % name)
    for name, value in want.items():
        if have.get(name) != value:
            if value is None:
                resets.append("RESET %s" % name)
            else:
                sets.append("pg_catalog.set_config(%s, %s, false)"
                            % (quote_literal(name), quote_literal(value)))
    if sets:
        resets.append("SELECT " + ", ".join(sets))
    return ";".join(resets)


_RESET = re.compile(r"^\s*reset\s+(all|[a-z_][a-z0-9_]*)\s*;?\s*$", re.IGNORECASE)


def parse_reset(query: str) -> Optional[str]:
    """For C{RESET name} return the tracked parameter's name, "ALL" for RESET ALL, else None."""
    m = _RESET.match(query)
    if m is None:
        return None
    name = m.group(1)
    if name.lower() == "all":
        return "ALL"
    return CANONICAL.get(name.lower())
