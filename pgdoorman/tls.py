"""
TLS for both sides of the pooler.

Clients ask for TLS with an SSLRequest before their startup packet; pgdoorman answers 'S' and
starts TLS on the same connection (L{ClientTLS}).  Towards PostgreSQL pgdoorman sends an
SSLRequest itself and starts TLS when the server answers 'S' (L{ServerTLS}).  Both sides use
PostgreSQL's mode names (PgDoorman's C{tls_mode} and C{server_tls_mode}) and TLS 1.2 at least.

Contexts are built once per configuration: a reload (SIGHUP or the admin console's RELOAD)
hands in a new configuration object, so certificate files are re-read then, for new
connections only; connections already encrypted keep what they negotiated.  A reload whose
files cannot be loaded keeps the previous context and logs why.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

#: Client-facing modes (general.tls_mode).
CLIENT_MODES = ("disable", "allow", "require", "verify-full")
#: Server-facing modes (server_tls_mode), as libpq's sslmode.
SERVER_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


class TLSConfigError(Exception):
    """The certificate, key or CA file cannot be used."""


def _new_context(server_side: bool):
    from OpenSSL import SSL
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    options = SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET
    if server_side:
        options |= SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_ECDH_USE
    ctx.set_options(options)
    return ctx


def _load_pair(ctx, certificate: str, private_key: str) -> None:
    from OpenSSL import SSL
    try:
        ctx.use_certificate_chain_file(certificate.encode())
    except (SSL.Error, OSError) as e:
        raise TLSConfigError("cannot load certificate %s: %s" % (certificate, e))
    try:
        ctx.use_privatekey_file(private_key.encode())
    except (SSL.Error, OSError) as e:
        raise TLSConfigError("cannot load private key %s: %s" % (private_key, e))
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSConfigError("private key %s does not match certificate %s"
                             % (private_key, certificate))


def _load_ca(ctx, ca: str) -> None:
    from OpenSSL import SSL
    try:
        ctx.load_verify_locations(ca.encode())
    except (SSL.Error, OSError) as e:
        raise TLSConfigError("cannot load CA file %s: %s" % (ca, e))


class _ContextFactory:
    """What C{ITLSTransport.startTLS} accepts: an object with C{getContext()}."""

    def __init__(self, ctx):
        self._ctx = ctx

    def getContext(self):
        return self._ctx


# -- the client side (pgdoorman is the TLS server) -----------------------------------------------

def client_mode(general) -> str:
    """The effective C{tls_mode}: unset means allow with a certificate, disable without."""
    mode = general.tls_mode
    if mode is None:
        return "allow" if general.tls_certificate else "disable"
    return mode


def build_client_context(general):
    """An OpenSSL context for clients' TLS; raises L{TLSConfigError}."""
    from OpenSSL import SSL
    if not general.tls_certificate or not general.tls_private_key:
        raise TLSConfigError("tls_mode %s needs tls_certificate and tls_private_key"
                             % client_mode(general))
    ctx = _new_context(server_side=True)
    _load_pair(ctx, general.tls_certificate, general.tls_private_key)
    if client_mode(general) == "verify-full":
        if not general.tls_ca_cert:
            raise TLSConfigError("tls_mode verify-full needs tls_ca_cert")
        _load_ca(ctx, general.tls_ca_cert)
        from OpenSSL import crypto
        with open(general.tls_ca_cert, "rb") as f:
            ca = crypto.load_certificate(crypto.FILETYPE_PEM, f.read())
        ctx.set_client_ca_list([ca.get_subject()])
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                       lambda conn, cert, errno, depth, ok: bool(ok))
    ctx.set_session_id(b"pgdoorman")
    return ctx


class ClientTLS:
    """
    The context for clients, rebuilt when the configuration object changes (a reload).

    C{for_config(general)} returns (mode, context factory or None).  The first build happens
    at the first SSLRequest, so a broken certificate is reported there and by
    C{pgdoorman -t}, never by a crash at start.
    """

    def __init__(self) -> None:
        self._general: Any = None
        self._factory: Optional[_ContextFactory] = None
        self._key: Optional[Tuple] = None

    def for_config(self, general) -> Tuple[str, Optional[_ContextFactory]]:
        mode = client_mode(general)
        if mode == "disable":
            return mode, None
        if general is self._general:
            return mode, self._factory
        key = (mode, general.tls_certificate, general.tls_private_key, general.tls_ca_cert)
        try:
            factory = _ContextFactory(build_client_context(general))
        except (TLSConfigError, OSError, Exception) as e:
            log.error("client TLS: {error}; {what}", error=str(e),
                      what="keeping the previous certificates" if self._factory is not None
                      else "TLS is not offered to clients")
            self._general = general
            return mode, self._factory
        if self._key is not None:
            log.info("client TLS: certificates (re)loaded for new connections")
        self._general, self._factory, self._key = general, factory, key
        return mode, factory


#: The process-wide client context cache.
client_tls = ClientTLS()


def peer_certificate_subject(transport) -> Optional[str]:
    """The common name of the client's certificate, when it sent one."""
    try:
        cert = transport.getPeerCertificate()
    except Exception:
        return None
    if cert is None:
        return None
    return cert.get_subject().commonName


# -- the server side (pgdoorman is the TLS client) -----------------------------------------------

def server_settings(general, pool) -> Dict[str, Optional[str]]:
    """The effective server_tls_* for a pool: the pool's own values over general's."""
    def pick(name):
        value = getattr(pool, name, None) if pool is not None else None
        return value if value is not None else getattr(general, name)
    return {name: pick(name) for name in ("server_tls_mode", "server_tls_ca_cert",
                                          "server_tls_certificate", "server_tls_private_key")}


def build_server_context(mode: str, ca: Optional[str], certificate: Optional[str],
                         private_key: Optional[str], hostname: str):
    """
    A context factory to start TLS towards PostgreSQL at C{hostname}; raises
    L{TLSConfigError}.  C{require} and C{prefer} encrypt without checking the certificate
    (as libpq); C{verify-ca} checks the chain against C{ca}; C{verify-full} also checks that
    the certificate names C{hostname} (a DNS name or an IP address, with service-identity).
    """
    from OpenSSL import SSL
    ctx = _new_context(server_side=False)
    if certificate and private_key:
        _load_pair(ctx, certificate, private_key)
    if mode in ("verify-ca", "verify-full"):
        if not ca:
            raise TLSConfigError("server_tls_mode %s needs server_tls_ca_cert" % mode)
        _load_ca(ctx, ca)
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
    else:
        ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    return _ServerContextFactory(ctx, hostname, mode == "verify-full")


@implementer(IOpenSSLClientConnectionCreator)
class _ServerContextFactory:
    """
    Makes the TLS connection towards PostgreSQL: sets SNI for host names and, for
    verify-full, checks the certificate's names when the handshake is done (as Twisted's own
    C{ClientTLSOptions} does; a mismatch fails the connection before any byte is sent).
    """

    def __init__(self, ctx, hostname: str, check_name: bool):
        self._ctx = ctx
        self.hostname = hostname
        self.check_name = check_name
        self.is_ip = _is_ip(hostname)
        if check_name:
            ctx.set_info_callback(self._info)

    def clientConnectionForTLS(self, tlsProtocol):
        from OpenSSL import SSL
        connection = SSL.Connection(self._ctx, None)
        connection.set_app_data(tlsProtocol)
        if not self.is_ip:
            try:
                connection.set_tlsext_host_name(self.hostname.encode("idna"))
            except Exception:
                pass
        return connection

    def _info(self, connection, where, ret) -> None:
        from OpenSSL import SSL
        if not where & SSL.SSL_CB_HANDSHAKE_DONE:
            return
        problem = self.verify_name(connection)
        if problem is not None:
            from twisted.python.failure import Failure
            connection.get_app_data().failVerification(Failure(TLSConfigError(problem)))

    def verify_name(self, connection) -> Optional[str]:
        """None when the certificate names our host, else why not."""
        from service_identity import VerificationError
        from service_identity.pyopenssl import verify_hostname, verify_ip_address
        try:
            if self.is_ip:
                verify_ip_address(connection, self.hostname)
            else:
                verify_hostname(connection, self.hostname)
        except VerificationError as e:
            return "server certificate does not match host name %r: %s" % (self.hostname, e)
        except Exception as e:
            return "server certificate name check failed for %r: %s" % (self.hostname, e)
        return None


class ServerTLS:
    """Server context factories, cached per (mode, files, host) and configuration object."""

    def __init__(self) -> None:
        self._cache: Dict[Tuple, Tuple[Any, _ServerContextFactory]] = {}

    def factory(self, general, settings: Dict[str, Optional[str]], hostname: str):
        key = (settings["server_tls_mode"], settings["server_tls_ca_cert"],
               settings["server_tls_certificate"], settings["server_tls_private_key"],
               hostname)
        cached = self._cache.get(key)
        if cached is not None and cached[0] is general:
            return cached[1]
        f = build_server_context(key[0], key[1], key[2], key[3], hostname)
        if len(self._cache) > 256:
            self._cache.clear()
        self._cache[key] = (general, f)
        return f


server_tls = ServerTLS()


def _is_ip(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
