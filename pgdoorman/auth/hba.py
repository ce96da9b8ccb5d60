"""
Who may connect from where: PgDoorman's C{pg_hba} (pg_hba.conf syntax) and the older
C{hba} list of networks.

Rules follow PostgreSQL's file format (PostgreSQL docs, 21.1 "The pg_hba.conf File"):
C{TYPE DATABASE USER [ADDRESS [MASK]] METHOD [OPTIONS]}.  The first rule whose connection type,
database, user and address match decides; when none does the connection is refused with
PostgreSQL's own message.  pgdoorman listens on TCP only, so C{local} rules never match a
client (they are accepted for compatibility).  Supported methods: trust, reject, md5,
scram-sha-256, password, cert, pam, jwt; others match but refuse the login with a clear
message.

Everything here is a pure function of the rules text and the connection's facts, so the
rules are tested without sockets; L{rules_for} parses a configuration's text once.
"""

from __future__ import annotations

import hmac
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

TYPES = ("local", "host", "hostssl", "hostnossl", "hostgssenc", "hostnogssenc")
METHODS = ("trust", "reject", "md5", "scram-sha-256", "password", "cert", "pam", "jwt",
           "ldap", "radius", "gss", "sspi", "ident", "peer", "bsd", "talos")
#: Methods pgdoorman can carry out; the rest refuse the login.
SUPPORTED = frozenset(("trust", "reject", "md5", "scram-sha-256", "password", "cert", "pam",
                       "jwt"))
#: The method of rules made from the legacy C{general.hba} list: whatever the user's
#: configured password calls for.
ANY = "any"


class HbaError(ValueError):
    """A rule does not parse; C{lineno} says which."""

    def __init__(self, lineno: int, message: str):
        ValueError.__init__(self, "pg_hba line %d: %s" % (lineno, message))
        self.lineno = lineno


@dataclass(frozen=True)
class Rule:
    """One pg_hba line.  C{networks} empty means any address ("all" or a local rule)."""

    lineno: int
    kind: str
    databases: Tuple[str, ...]
    users: Tuple[str, ...]
    networks: Tuple[_Network, ...]
    method: str
    options: Dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    text: str = ""

    def matches(self, ssl: bool, address: Optional[ipaddress._BaseAddress], database: str,
                user: str) -> bool:
        kind = self.kind
        if kind == "local":
            if address is not None:
                return False
        else:
            if address is None:
                return False
            if kind == "hostssl" and not ssl:
                return False
            if kind == "hostnossl" and ssl:
                return False
            if kind == "hostgssenc":
                return False  # GSSAPI encryption is never offered
            if self.networks and not any(address.version == n.version and address in n
                                         for n in self.networks):
                return False
        return _name_matches(self.databases, database, user, is_db=True) and \
            _name_matches(self.users, user, user, is_db=False)


def _name_matches(names: Tuple[str, ...], value: str, user: str, is_db: bool) -> bool:
    for name in names:
        if name == "\x00all":
            return True
        if is_db and name == "\x00sameuser":
            if value == user:
                return True
            continue
        if name.startswith("\x00"):
            continue  # samerole, replication, +group: never true for pgdoorman's clients
        if name.startswith("/"):
            try:
                if re.search(name[1:], value):
                    return True
            except re.error:
                pass
            continue
        if name == value:
            return True
    return False


def _split_list(field_text: str) -> List[str]:
    """A comma-separated DATABASE or USER field; keywords become "\\0keyword"."""
    out = []
    for part in _tokens_in_field(field_text):
        quoted = part.startswith('"')
        name = part.strip('"') if quoted else part
        if not quoted and name in ("all", "sameuser", "samerole", "samegroup", "replication"):
            name = "\x00" + name
        elif not quoted and name.startswith(("+", "@")):
            name = "\x00" + name
        out.append(name)
    return out


def _tokens_in_field(text: str) -> List[str]:
    parts, cur, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            cur += ch
        elif ch == "," and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p]


def _fields(line: str) -> List[str]:
    """Whitespace-separated fields; double quotes keep spaces and # inside."""
    fields, cur, quoted, i = [], "", False, 0
    while i < len(line):
        ch = line[i]
        if ch == '"':
            quoted = not quoted
            cur += ch
        elif ch == "#" and not quoted:
            break
        elif ch.isspace() and not quoted:
            if cur:
                fields.append(cur)
                cur = ""
        else:
            cur += ch
        i += 1
    if cur:
        fields.append(cur)
    return fields


def _network(text: str, mask: Optional[str], lineno: int) -> Tuple[_Network, ...]:
    if text == "all":
        return ()
    if text in ("samehost", "samenet"):
        raise HbaError(lineno, "%s is not supported by pgdoorman; write the networks" % text)
    try:
        if "/" in text:
            return (ipaddress.ip_network(text, strict=False),)
        if mask is not None:
            return (ipaddress.ip_network("%s/%s" % (text, mask), strict=False),)
        addr = ipaddress.ip_address(text)
    except ValueError as e:
        raise HbaError(lineno, "invalid address %r: %s" % (text, e))
    return (ipaddress.ip_network(addr),)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def parse(text: str) -> List[Rule]:
    """The rules of a pg_hba.conf text; raises L{HbaError} for the first bad line."""
    rules = []
    lines = text.splitlines()
    lineno = 0
    while lineno < len(lines):
        raw = lines[lineno]
        lineno += 1
        start = lineno
        while raw.endswith("\\") and lineno < len(lines):  # PostgreSQL 16 continuation lines
            raw = raw[:-1] + " " + lines[lineno]
            lineno += 1
        fields = _fields(raw)
        if not fields:
            continue
        kind = fields[0]
        if kind not in TYPES:
            raise HbaError(start, "unknown connection type %r" % kind)
        if kind == "local":
            if len(fields) < 4:
                raise HbaError(start, "local rules need DATABASE USER METHOD")
            networks: Tuple[_Network, ...] = ()
            at = 3
        else:
            if len(fields) < 5:
                raise HbaError(start, "%s rules need DATABASE USER ADDRESS METHOD" % kind)
            mask = None
            at = 4
            if "/" not in fields[3] and _is_ip(fields[3]) and len(fields) > 5 \
                    and _is_ip(fields[4]):
                mask = fields[4]
                at = 5
            networks = _network(fields[3], mask, start)
        if len(fields) <= at:
            raise HbaError(start, "missing authentication method")
        method = fields[at]
        if method not in METHODS:
            raise HbaError(start, "unknown authentication method %r" % method)
        options = {}
        for opt in fields[at + 1:]:
            k, _, v = opt.partition("=")
            options[k] = v.strip('"')
        rules.append(Rule(start, kind, tuple(_split_list(fields[1])),
                          tuple(_split_list(fields[2])), networks, method, options,
                          raw.strip()))
    return rules


def legacy_rules(networks: Sequence[str]) -> List[Rule]:
    """C{general.hba}: clients from these networks may log in as their user's config says."""
    nets = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
    return [Rule(0, "host", ("\x00all",), ("\x00all",), nets, ANY, {}, "hba")]


def client_address(host: str) -> Optional[ipaddress._BaseAddress]:
    """A peer's address for matching (IPv4-mapped IPv6 counts as IPv4); None if not IP."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class Rules:
    """A parsed rule set; C{match} returns the first matching rule or None."""

    def __init__(self, rules: List[Rule]):
        self.rules = rules

    def match(self, ssl: bool, host: Optional[str], database: str, user: str
              ) -> Optional[Rule]:
        address = client_address(host) if host is not None else None
        for rule in self.rules:
            if rule.matches(ssl, address, database, user):
                return rule
        return None


_cache: Dict[object, Optional[Rules]] = {}


def rules_for(general) -> Optional[Rules]:
    """
    The rules of a configuration's C{general} section, parsed once per text; None when
    neither C{pg_hba} nor C{hba} is set (everyone may try to log in).
    """
    text = general.pg_hba
    if text is not None:
        key: object = ("pg_hba", text)
    elif general.hba:
        key = ("hba", tuple(general.hba))
    else:
        return None
    rules = _cache.get(key)
    if rules is None:
        if len(_cache) > 16:
            _cache.clear()
        rules = Rules(parse(text) if text is not None else legacy_rules(general.hba))
        _cache[key] = rules
    return rules


def refusal(rule: Optional[Rule], host: str, user: str, database: str, ssl: bool) -> str:
    """PostgreSQL's words for a refused connection (no rule, or a reject rule)."""
    enc = "SSL encryption" if ssl else "no encryption"
    if rule is None:
        return 'no pg_hba.conf entry for host "%s", user "%s", database "%s", %s' % (
            host, user, database, enc)
    return 'pg_hba.conf rejects connection for host "%s", user "%s", database "%s", %s' % (
        host, user, database, enc)


# -- the "password" method: a cleartext password checked against the configured secret -----

def password_matches(configured: str, user: str, given: str) -> Tuple[bool, Optional[bytes]]:
    """
    Check a cleartext password against the configured one (plaintext, md5 hash or SCRAM
    secret), in constant time.  Returns (ok, SCRAM ClientKey or None): the ClientKey lets
    pgdoorman log in to a SCRAM server with the client's identity, as after a SCRAM login.
    """
    if configured.startswith("SCRAM-SHA-256$"):
        from pgdoorman.auth import scram
        try:
            secret = scram.parse_scram_secret(configured)
        except ValueError:
            return False, None
        try:
            prepared = scram.saslprep(given)
        except Exception:
            prepared = given
        salted = hashlib.pbkdf2_hmac("sha256", prepared.encode("utf-8"), secret.salt,
                                     secret.iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), secret.stored_key)
        return ok, client_key if ok else None
    if len(configured) == 35 and configured.startswith("md5"):
        digest = "md5" + hashlib.md5((given + user).encode("utf-8")).hexdigest()
        return hmac.compare_digest(digest.encode(), configured.encode()), None
    return hmac.compare_digest(given.encode("utf-8"), configured.encode("utf-8")), None
