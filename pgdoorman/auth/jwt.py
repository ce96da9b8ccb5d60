"""
JWT authentication, as PgDoorman does it: a user whose configured C{password} is
C{jwt-pkey-fpath:/path/to/public.pem} sends a JWT as its (cleartext) password.  The token
must be signed with RS256 by the key's private half, be within its C{exp} (required) and
C{nbf}, and name the user in its C{preferred_username} claim (PgDoorman's claim; C{sub} is
read when the token has no C{preferred_username}).

The public key is read when first needed and again when the file changes (a rotation by
replacing the file needs no restart; SIGHUP works too).
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

PREFIX = "jwt-pkey-fpath:"
#: Tokens larger than this are refused unread.
MAX_TOKEN = 16384

_keys: Dict[str, Tuple[Tuple[int, int], object]] = {}


def is_jwt_password(password: Optional[str]) -> bool:
    return bool(password) and password.startswith(PREFIX)


def key_path(password: str) -> str:
    return password[len(PREFIX):].strip()


def _public_key(path: str):
    st = os.stat(path)
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _keys.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    with open(path, "rb") as f:
        key = load_pem_public_key(f.read())
    _keys[path] = (stamp, key)
    return key


def verify(password: str, user: str, token: str) -> Optional[str]:
    """None when C{token} lets C{user} in, else why not (for the log, never the client)."""
    try:
        import jwt
    except ImportError as e:
        return "PyJWT is not installed (%s)" % e
    if not token or len(token) > MAX_TOKEN:
        return "token empty or too long"
    path = key_path(password)
    try:
        key = _public_key(path)
    except (OSError, ValueError, TypeError) as e:
        return "cannot read public key %s: %s" % (path, e)
    try:
        claims = jwt.decode(token, key, algorithms=["RS256"],
                            options={"require": ["exp"], "verify_aud": False,
                                     "verify_iss": False})
    except jwt.ExpiredSignatureError:
        return "token expired"
    except jwt.ImmatureSignatureError:
        return "token not valid yet (nbf)"
    except jwt.InvalidTokenError as e:
        return "invalid token: %s" % (e.__class__.__name__ if not str(e) else e)
    except Exception as e:
        return "invalid token: %s" % e.__class__.__name__
    name = claims.get("preferred_username", claims.get("sub"))
    if name != user:
        return "token is for %r, not for this user" % (name,)
    return None
