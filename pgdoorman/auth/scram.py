"""
SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, for both sides of the pooler.

L{ScramServer} lets the pooler verify a client; L{ScramClient} lets it log in to PostgreSQL.
Both take and return the SASL payloads only (the bytes inside SASLInitialResponse, SASLResponse,
AuthenticationSASLContinue and AuthenticationSASLFinal); framing is the protocol's job.

PostgreSQL's dialect (U{https://www.postgresql.org/docs/15/sasl-authentication.html}):
  - the username inside the SCRAM messages is ignored, the startup packet's one counts, so
    clients send C{n=} empty;
  - no authorization identity (C{a=}), and no channel binding here: we only offer
    C{SCRAM-SHA-256}, never C{-PLUS}, so the gs2 header is C{n,,} or C{y,,};
  - the stored secret is C{SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>}.

A pooler that verified a client by SCRAM never sees the password, but the proof yields the
ClientKey, and ClientKey is all a client needs to produce a proof for the same secret.  That is
how PgDoorman logs in to a SCRAM server on behalf of a SCRAM client
(L{ScramServer.client_key} then L{ScramClient}C{(client_key=...)}).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stringprep
import unicodedata
from dataclasses import dataclass

from pgdoorman.auth.md5 import is_md5_hash

__all__ = [
    "MECHANISM", "ScramError", "AuthFailed", "ScramSecret", "parse_scram_secret",
    "make_scram_secret", "secret_from_password", "saslprep", "ScramServer", "ScramClient",
]

MECHANISM = "SCRAM-SHA-256"

# PostgreSQL's defaults (scram-common.h): 16 salt bytes, 18 random nonce bytes, 4096 rounds.
DEFAULT_ITERATIONS = 4096
SALT_LEN = 16
RAW_NONCE_LEN = 18
KEY_LEN = 32  # SHA-256 digest size

# gs2 header -> its base64 form, which the client echoes in the c= attribute of client-final.
_CBIND_ECHO = {b"n,,": b"biws", b"y,,": b"eSws"}


class ScramError(Exception):
    """
    A SCRAM exchange that cannot go on: a malformed or unexpected message.

    C{sqlstate} is what PostgreSQL would put in the ErrorResponse (protocol_violation);
    C{detail}, when set, is its DETAIL line.
    """

    sqlstate = "08P01"

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message if detail is None else "%s: %s" % (message, detail))
        self.message = message
        self.detail = detail


class AuthFailed(ScramError):
    """The client's proof is wrong: the password is wrong (invalid_password, like PostgreSQL)."""

    sqlstate = "28P01"


# -- primitives ------------------------------------------------------------------------------

def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | bytes) -> bytes:
    return base64.b64decode(text, validate=True)


def _new_nonce() -> bytes:
    # base64 never produces ',' so the result is a valid SCRAM nonce as is.
    return base64.b64encode(os.urandom(RAW_NONCE_LEN))


#: RFC 5802 printable: what may be in a nonce (deleted by translate: anything left is not).
_NONCE_CHARS = bytes(c for c in range(0x21, 0x7F) if c != 0x2C)


def _check_nonce(nonce: bytes) -> bytes:
    # RFC 5802: printable = %x21-2B / %x2D-7E, i.e. visible ASCII except ','.
    if not nonce or nonce.translate(None, _NONCE_CHARS):
        raise ScramError("malformed SCRAM message", "non-printable characters in SCRAM nonce")
    return nonce


# Characters SASLprep maps to nothing (RFC 3454 table B.1).
_MAP_TO_NOTHING = frozenset(
    "\u00ad\u034f\u1806\u180b\u180c\u180d\u200b\u200c\u200d\u2060\ufeff"
    + "".join(chr(c) for c in range(0xFE00, 0xFE10)))

_PROHIBITED = (
    stringprep.in_table_a1, stringprep.in_table_c12, stringprep.in_table_c21_c22,
    stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
    stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
    stringprep.in_table_c9,
)


def saslprep(password: str) -> str:
    """
    The password as SCRAM hashes it: SASLprep (RFC 4013), or the raw password when that fails.

    A minimal SASLprep: map non-ASCII spaces to space, drop the map-to-nothing characters,
    NFKC-normalize with unicodedata, and give up on prohibited or unassigned characters (no
    bidirectional check).  Giving up means using the password unchanged, which is what
    PostgreSQL's pg_saslprep() callers do: the server accepts any password, normalizable or not,
    so a client must hash exactly what the server hashed.  Pure ASCII passes through untouched,
    again like PostgreSQL.
    """
    if password.isascii():
        return password
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch
                     for ch in password if ch not in _MAP_TO_NOTHING)
    normalized = unicodedata.normalize("NFKC", mapped)
    if not normalized or any(check(ch) for ch in normalized for check in _PROHIBITED):
        return password
    return normalized


# -- stored secrets --------------------------------------------------------------------------

@dataclass
class ScramSecret:
    """What the server keeps instead of the password: enough to verify, not to impersonate."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __str__(self) -> str:
        return "%s$%d:%s$%s:%s" % (MECHANISM, self.iterations, _b64(self.salt),
                                   _b64(self.stored_key), _b64(self.server_key))


def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)


#: (password, salt, iterations) -> (ClientKey, ServerKey) of server logins done before.
_server_keys: dict = {}
#: Distinct server passwords x salts are few (one per server user); the bound only keeps a
#: config that changes passwords all day from growing it.
_SERVER_KEYS_MAX = 256


def _login_keys(password: str, salt: bytes, iterations: int) -> tuple:
    """
    ClientKey and ServerKey for a server login with a password: 4096 rounds of PBKDF2 (about
    ten milliseconds of CPU, more on PyPy) the first time for this user's salt, a dict look-up
    after that, as PgBouncer keeps them.  Every new server connection used to pay it, so a pool
    growing under load spent most of its CPU there.
    """
    key = (password, salt, iterations)
    keys = _server_keys.get(key)
    if keys is None:
        salted = _salted_password(password, salt, iterations)
        keys = (_hmac(salted, b"Client Key"), _hmac(salted, b"Server Key"))
        if len(_server_keys) >= _SERVER_KEYS_MAX:
            _server_keys.clear()
        _server_keys[key] = keys
    return keys


def secret_from_password(password: str, salt: bytes | None = None,
                         iterations: int = DEFAULT_ITERATIONS) -> ScramSecret:
    """Derive the secret for C{password}, with a fresh random salt unless one is given."""
    if iterations < 1:
        raise ValueError("SCRAM iteration count must be at least 1")
    if salt is None:
        salt = os.urandom(SALT_LEN)
    salted = _salted_password(password, salt, iterations)
    return ScramSecret(iterations, salt, _h(_hmac(salted, b"Client Key")),
                       _hmac(salted, b"Server Key"))


def make_scram_secret(password: str, salt: bytes | None = None,
                      iterations: int = DEFAULT_ITERATIONS) -> str:
    """The secret as PostgreSQL stores it in C{pg_authid.rolpassword}."""
    return str(secret_from_password(password, salt, iterations))


def parse_scram_secret(s: str) -> ScramSecret:
    """
    Parse C{SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>}.

    @raise ValueError: if C{s} is not such a secret.
    """
    try:
        mechanism, params, keys = s.split("$")
        iterations_text, salt_text = params.split(":")
        stored_text, server_text = keys.split(":")
        if mechanism != MECHANISM or not iterations_text.isdigit():
            raise ValueError
        iterations = int(iterations_text)
        salt = _unb64(salt_text)
        stored_key = _unb64(stored_text)
        server_key = _unb64(server_text)
    except (ValueError, binascii.Error):
        raise ValueError("not a %s secret" % MECHANISM) from None
    if iterations < 1 or not salt or len(stored_key) != KEY_LEN or len(server_key) != KEY_LEN:
        raise ValueError("not a %s secret" % MECHANISM)
    return ScramSecret(iterations, salt, stored_key, server_key)


# -- message parsing -------------------------------------------------------------------------

def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("malformed SCRAM message", "invalid UTF-8") from None


def _attribute(part: str, name: str) -> str:
    """The value of C{name=value}, or ScramError naming the attribute PostgreSQL expected."""
    if not part.startswith(name + "="):
        raise ScramError("malformed SCRAM message",
                         'Expected attribute "%s" but found "%s".' % (name, part[:1]))
    return part[len(name) + 1:]


# -- the pooler as SCRAM server --------------------------------------------------------------

class ScramServer:
    """
    One exchange verifying a client: client-first -> server-first, client-final -> server-final.

    After L{handle_client_final} returns, C{client_key} holds the client's ClientKey, which lets
    L{ScramClient} log in with the same secret elsewhere.
    """

    def __init__(self, secret: ScramSecret | str, nonce: bytes | None = None,
                 user: str | None = None):
        """
        @param secret: a L{ScramSecret}, a stored secret string, or a plaintext password (then a
            secret is derived with a random salt and 4096 iterations).  A stored md5 hash cannot
            verify SCRAM; like PostgreSQL, the exchange then runs to the end and fails with
            L{AuthFailed}, so the client learns nothing about how the password is stored.
        @param nonce: the server's part of the nonce (printable ASCII); random by default.
        @param user: only used in the L{AuthFailed} message, which PostgreSQL words with it.
        @raise ValueError: if C{secret} starts like a SCRAM secret but is not one (most likely
            a typo in a config file, better reported than taken as a password).
        """
        self._doomed = False
        if isinstance(secret, str):
            if secret.startswith(MECHANISM + "$"):
                secret = parse_scram_secret(secret)
            elif is_md5_hash(secret):
                self._doomed = True
                secret = secret_from_password(secret)
            else:
                secret = secret_from_password(secret)
        self.secret = secret
        self.user = user
        self._server_nonce = _check_nonce(nonce) if nonce is not None else _new_nonce()
        self._client_first_bare: bytes | None = None
        self._server_first: bytes | None = None
        self._gs2_header: bytes | None = None
        self._nonce: bytes | None = None
        self.client_key: bytes | None = None

    def handle_client_first(self, data: bytes) -> bytes:
        """Take the client-first-message, return the server-first-message."""
        if self._server_first is not None:
            raise ScramError("malformed SCRAM message", "unexpected client-first-message")
        text = _decode(data)
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ScramError("malformed SCRAM message", "Malformed client-first-message.")
        cbind_flag, authzid, bare = parts
        if cbind_flag.startswith("p"):
            raise ScramError(
                "channel binding is not supported",
                "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM "
                "message includes channel binding data.")
        if cbind_flag not in ("n", "y"):
            raise ScramError("malformed SCRAM message",
                             'Unexpected channel-binding flag "%s".' % cbind_flag[:1])
        if authzid:
            raise ScramError("client uses authorization identity, but it is not supported")
        # client-first-message-bare: [reserved-mext ","] username "," nonce ["," extensions]
        fields = bare.split(",")
        if fields[0].startswith("m="):
            raise ScramError("client requires an unsupported SCRAM extension")
        _attribute(fields[0], "n")  # ignored: the startup packet's user is the one that counts
        if len(fields) < 2:
            raise ScramError("malformed SCRAM message", "Malformed client-first-message.")
        client_nonce = _check_nonce(_attribute(fields[1], "r").encode("utf-8"))
        self._gs2_header = ("%s,," % cbind_flag).encode("ascii")
        self._client_first_bare = bare.encode("utf-8")
        self._nonce = client_nonce + self._server_nonce
        self._server_first = b"r=%s,s=%s,i=%d" % (
            self._nonce, base64.b64encode(self.secret.salt), self.secret.iterations)
        return self._server_first

    def handle_client_final(self, data: bytes) -> bytes:
        """
        Take the client-final-message, return the server-final-message.

        @raise AuthFailed: the proof is wrong.
        @raise ScramError: the message is malformed or out of turn.
        """
        if self._server_first is None or self.client_key is not None:
            raise ScramError("malformed SCRAM message", "unexpected client-final-message")
        text = _decode(data)
        cut = text.rfind(",p=")
        if cut < 0:
            raise ScramError("malformed SCRAM message",
                             "Could not find proof in client-final-message.")
        without_proof, proof_text = text[:cut], text[cut + 3:]
        fields = without_proof.split(",")
        if len(fields) < 2:
            raise ScramError("malformed SCRAM message", "Malformed client-final-message.")
        cbind = _attribute(fields[0], "c").encode("ascii", "replace")
        if cbind != _CBIND_ECHO[self._gs2_header]:
            raise ScramError("SCRAM channel binding check failed")
        nonce = _attribute(fields[1], "r").encode("utf-8")
        if not hmac.compare_digest(nonce, self._nonce):
            raise ScramError("malformed SCRAM message", "Nonce does not match.")
        try:
            proof = _unb64(proof_text)
        except (ValueError, binascii.Error):
            proof = b""
        if len(proof) != KEY_LEN:
            raise ScramError("malformed SCRAM message", "Malformed proof in client-final-message.")

        auth_message = b",".join([self._client_first_bare, self._server_first,
                                  without_proof.encode("utf-8")])
        client_key = _xor(proof, _hmac(self.secret.stored_key, auth_message))
        if not hmac.compare_digest(_h(client_key), self.secret.stored_key) or self._doomed:
            raise AuthFailed(
                "password authentication failed"
                + ("" if self.user is None else ' for user "%s"' % self.user),
                None if not self._doomed or self.user is None
                else 'User "%s" does not have a valid SCRAM secret.' % self.user)
        self.client_key = client_key
        return b"v=" + base64.b64encode(_hmac(self.secret.server_key, auth_message))


# -- the pooler as SCRAM client --------------------------------------------------------------

class ScramClient:
    """
    One exchange logging in to PostgreSQL, with the password or with a ClientKey.

    With a ClientKey (recovered by L{ScramServer}) no salted password is needed:
    ClientProof = ClientKey XOR HMAC(H(ClientKey), AuthMessage).  The server's signature can
    then only be checked if C{server_key} is given too (from the same secret); without it the
    check is skipped, as PgDoorman does.
    """

    def __init__(self, password: str | None = None, client_key: bytes | None = None,
                 nonce: bytes | None = None, server_key: bytes | None = None, user: str = ""):
        """
        @param nonce: our part of the nonce (printable ASCII); random by default.
        @param user: the SCRAM username; PostgreSQL ignores it and libpq sends it empty, so the
            default is empty too (other values serve RFC test vectors).
        """
        if (password is None) == (client_key is None):
            raise ValueError("give exactly one of password and client_key")
        self._password = password
        self._client_key = client_key
        self._server_key = server_key
        self._client_nonce = _check_nonce(nonce) if nonce is not None else _new_nonce()
        # RFC 5802 saslname: ',' and '=' are escaped as =2C and =3D.
        username = user.replace("=", "=3D").replace(",", "=2C").encode("utf-8")
        self._client_first_bare = b"n=" + username + b",r=" + self._client_nonce
        self._server_signature: bytes | None = None
        self._sent_first = False
        self.finished = False

    def client_first(self) -> bytes:
        """The client-first-message, for SASLInitialResponse."""
        self._sent_first = True
        return b"n,," + self._client_first_bare

    def handle_server_first(self, data: bytes) -> bytes:
        """Take the server-first-message (SASLContinue), return the client-final-message."""
        if not self._sent_first or self._server_signature is not None:
            raise ScramError("unexpected SCRAM server-first-message")
        text = _decode(data)
        fields = text.split(",")
        if fields and fields[0].startswith("m="):
            raise ScramError("server requires an unsupported SCRAM extension")
        if len(fields) < 3:
            raise ScramError("malformed SCRAM message", "Malformed server-first-message.")
        nonce = _attribute(fields[0], "r").encode("utf-8")
        try:
            salt = _unb64(_attribute(fields[1], "s"))
        except (ValueError, binascii.Error):
            raise ScramError("malformed SCRAM message", "Malformed salt.") from None
        iterations_text = _attribute(fields[2], "i")
        if not iterations_text.isdigit() or int(iterations_text) < 1:
            raise ScramError("malformed SCRAM message", "Invalid iteration count.")
        iterations = int(iterations_text)
        _check_nonce(nonce)
        if not nonce.startswith(self._client_nonce):
            raise ScramError("invalid SCRAM response (nonce mismatch)")

        without_proof = b"c=biws,r=" + nonce
        auth_message = b",".join([self._client_first_bare, data, without_proof])
        if self._password is not None:
            client_key, server_key = _login_keys(self._password, salt, iterations)
        else:
            client_key = self._client_key
            server_key = self._server_key
        proof = _xor(client_key, _hmac(_h(client_key), auth_message))
        self._server_signature = (b"" if server_key is None
                                  else _hmac(server_key, auth_message))
        return without_proof + b",p=" + base64.b64encode(proof)

    def handle_server_final(self, data: bytes) -> None:
        """
        Check the server-final-message (SASLFinal).

        @raise ScramError: the server reported an error, or proved it does not know the secret.
        """
        if self._server_signature is None or self.finished:
            raise ScramError("unexpected SCRAM server-final-message")
        text = _decode(data)
        first = text.split(",", 1)[0]
        if first.startswith("e="):
            raise ScramError("error received from server in SCRAM exchange", first[2:])
        try:
            signature = _unb64(_attribute(first, "v"))
        except (ValueError, binascii.Error):
            raise ScramError("malformed SCRAM message", "Malformed server signature.") from None
        if self._server_signature and not hmac.compare_digest(signature, self._server_signature):
            raise ScramError("incorrect server signature")
        self.finished = True
