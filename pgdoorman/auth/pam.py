"""
PAM authentication (python-pam): a user with C{auth_pam_service}, or a pg_hba rule with
method C{pam}, sends a cleartext password that PAM checks.

PAM modules block (pam_unix even sleeps after a failure, pam_faildelay), so the check runs in
the reactor's thread pool and the caller gets a Deferred.  Each call makes its own PAM handle:
handles are not shared between threads.
"""

from __future__ import annotations

from typing import Tuple

from twisted.internet import threads

#: PostgreSQL's default service name for the pam method (pamservice=...).
DEFAULT_SERVICE = "postgresql"


def available() -> bool:
    try:
        import pam  # noqa: F401
    except Exception:
        return False
    return True


def authenticate(service: str, user: str, password: str) -> Tuple[bool, str]:
    """Blocking PAM check; returns (ok, PAM's reason)."""
    try:
        import pam
    except ImportError as e:
        return False, "python-pam is not installed (%s)" % e
    handle = pam.pam()
    try:
        ok = bool(handle.authenticate(user, password, service=service, resetcreds=False))
    except Exception as e:  # a broken module or service file must not take us down
        return False, "PAM error: %s" % e
    return ok, "%s (%s)" % (getattr(handle, "reason", ""), getattr(handle, "code", ""))


def authenticate_deferred(service: str, user: str, password: str):
    """L{authenticate} in a thread; fires with (ok, reason)."""
    return threads.deferToThread(authenticate, service, user, password)
