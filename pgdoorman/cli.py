"""
The C{pgdoorman} command.

    pgdoorman [-l LEVEL] [-F text|structured] [-d] [CONFIG_FILE]   run the pooler
    pgdoorman -t [CONFIG_FILE]                                      check a config
    pgdoorman generate ...                                          write a config (generate.py)

It builds the same service as C{twistd pgdoorman} (L{pgdoorman.tap.build_service}) and runs it
on the epoll reactor.  The port is bound before the reactor runs (and, with C{-d}, before the
command returns), so a bad config or a port in use gives a message and exit status 1 instead of
a half-started process.

Exit status: 0 success (or a valid config with C{-t}); 1 the config is invalid or the pooler
could not start (the message names the file, key and line, or the port); 2 bad command line.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import sys
from typing import List, Optional

from pgdoorman import __version__



class StartupError(Exception):
    """The pooler cannot start; the message says why, for a person."""


def _log_level(value: str) -> str:
    from pgdoorman import logs
    try:
        logs.parse_level(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return value.lower()


def _parser() -> argparse.ArgumentParser:
    from pgdoorman.tap import DEFAULT_CONFIG
    p = argparse.ArgumentParser(
        prog="pgdoorman",
        description="PostgreSQL connection pooler (PgDoorman/PgBouncer compatible).",
        epilog="Also: 'pgdoorman generate --help' writes a config from a running PostgreSQL. "
               "Exit status: 0 ok, 1 invalid config or cannot start, 2 bad command line.")
    p.add_argument("config", nargs="?", metavar="CONFIG_FILE",
                   help="configuration file (.yaml/.yml or .toml); default $CONFIG_FILE, "
                        "then %s" % DEFAULT_CONFIG)
    p.add_argument("-t", "--test", action="store_true",
                   help="check the configuration and the files it names, then exit 0 "
                        "(valid) or 1 (invalid, with the reason)")
    p.add_argument("-l", "--log-level", type=_log_level,
                   default=os.environ.get("LOG_LEVEL") or "info",
                   metavar="LEVEL",
                   help="trace, debug, info, warn or error (default $LOG_LEVEL, else info)")
    p.add_argument("-F", "--log-format", choices=["text", "structured"],
                   default=os.environ.get("LOG_FORMAT") or "text",
                   help="text: one readable line per event; structured: one JSON object "
                        "per line (default $LOG_FORMAT, else text)")
    p.add_argument("-d", "--daemon", action="store_true",
                   help="detach and run in the background; needs general.daemon_pid_file; "
                        "logs go to --log-file, else to syslog")
    p.add_argument("--log-file", metavar="FILE",
                   help="append the log to FILE (reopened on SIGHUP) instead of stderr")
    p.add_argument("-V", "--version", action="version", version="pgdoorman %s" % __version__)
    return p


def _load(path: str):
    from pgdoorman import config as _config
    try:
        return _config.load(path)
    except _config.ConfigError as e:
        print("pgdoorman: %s" % e, file=sys.stderr)
        raise SystemExit(1)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "generate":
        from pgdoorman import generate
        raise SystemExit(generate.main(argv[1:]))
    # PGDOORMAN_RUNTIME=auto|pypy: re-exec on PyPy before anything else (not for generate,
    # which needs psycopg, a CPython package here).
    from pgdoorman import runtime
    runtime.select(argv)
    parser = _parser()
    # The environment's LOG_LEVEL is a default, so argparse does not check it: do it here.
    if os.environ.get("LOG_LEVEL"):
        try:
            _log_level(os.environ["LOG_LEVEL"])
        except argparse.ArgumentTypeError as e:
            parser.error("LOG_LEVEL: %s" % e)
    args = parser.parse_args(argv)
    if args.log_format not in ("text", "structured"):
        parser.error("LOG_FORMAT must be text or structured, not %r" % args.log_format)
    from pgdoorman.tap import default_config_path
    path = args.config or default_config_path()
    if args.daemon:
        # The daemon runs in /, and a reload must find the same file.
        path = os.path.abspath(path)
    config = _load(path)
    if args.test:
        raise SystemExit(check(config))
    if args.daemon:
        raise SystemExit(daemon(config, args))
    try:
        run(config, args.log_level, args.log_format, log_file=args.log_file)
    except StartupError as e:
        print("pgdoorman: %s" % e, file=sys.stderr)
        raise SystemExit(1)


# -- pgdoorman -t ---------------------------------------------------------------------------

_TLS_MODES = ("allow", "disable", "require", "verify-full")
_SERVER_TLS_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_HBA_TYPES = ("local", "host", "hostssl", "hostnossl", "hostgssenc", "hostnogssenc")
_HBA_METHODS = ("trust", "reject", "md5", "scram-sha-256", "password", "cert", "pam", "ldap",
                "radius", "gss", "sspi", "ident", "peer", "bsd", "jwt", "talos")


def check(config, out=None, err=None) -> int:
    """
    C{pgdoorman -t}: warn about keys accepted but not implemented, check the files the config
    names; print the verdict.  Returns the exit status (0 valid, 1 invalid).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    for key in config.unimplemented_keys():
        print("pgdoorman: warning: %s: %s is accepted but not implemented yet"
              % (config.path, key), file=err)
    from pgdoorman.coordinator import config_warnings
    for key, problem in config_warnings(config):
        print("pgdoorman: warning: %s: %s %s" % (config.path, key, problem), file=err)
    problems = check_files(config)
    for key, problem in problems:
        print("pgdoorman: %s: %s: %s" % (config.path, key, problem), file=err)
    if problems:
        print("pgdoorman: configuration file %s is not valid" % config.path, file=err)
        return 1
    print("pgdoorman: configuration file %s is valid" % config.path, file=out)
    return 0


def check_files(config) -> List[tuple]:
    """
    What the loader cannot see: TLS files readable and matching, TLS modes known, pg_hba rules
    parseable, the pid file's directory present.  Returns (key, problem) pairs.
    """
    problems: List[tuple] = []
    g = config.general
    if g.tls_mode is not None and g.tls_mode not in _TLS_MODES:
        problems.append(("general.tls_mode", "unknown mode %r (use %s)"
                         % (g.tls_mode, ", ".join(_TLS_MODES))))
    if g.server_tls_mode not in _SERVER_TLS_MODES:
        problems.append(("general.server_tls_mode", "unknown mode %r (use %s)"
                         % (g.server_tls_mode, ", ".join(_SERVER_TLS_MODES))))
    problems += _check_pair("general.tls_certificate", g.tls_certificate,
                            "general.tls_private_key", g.tls_private_key)
    problems += _check_pair("general.server_tls_certificate", g.server_tls_certificate,
                            "general.server_tls_private_key", g.server_tls_private_key)
    for key, path in (("general.tls_ca_cert", g.tls_ca_cert),
                      ("general.server_tls_ca_cert", g.server_tls_ca_cert)):
        problems += _check_ca(key, path)
    for name, pool in config.pools.items():
        prefix = "pools.%s." % name
        if pool.server_tls_mode is not None and pool.server_tls_mode not in _SERVER_TLS_MODES:
            problems.append((prefix + "server_tls_mode", "unknown mode %r (use %s)"
                             % (pool.server_tls_mode, ", ".join(_SERVER_TLS_MODES))))
        problems += _check_pair(prefix + "server_tls_certificate", pool.server_tls_certificate,
                                prefix + "server_tls_private_key", pool.server_tls_private_key)
        problems += _check_ca(prefix + "server_tls_ca_cert", pool.server_tls_ca_cert)
    rate = g.tls_rate_limit_per_second
    if rate and (rate < 100 or rate % 100):
        problems.append(("general.tls_rate_limit_per_second",
                         "must be 0 or a multiple of 100 (at least 100), not %d" % rate))
    if g.pg_hba is not None:
        for lineno, problem in hba_problems(g.pg_hba):
            problems.append(("general.pg_hba", "rule %d: %s" % (lineno, problem)))
    if g.daemon_pid_file:
        directory = os.path.dirname(os.path.abspath(g.daemon_pid_file))
        if not os.path.isdir(directory):
            problems.append(("general.daemon_pid_file", "directory %s does not exist"
                             % directory))
    return problems


def _read(key: str, path: str, problems: List[tuple]) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        problems.append((key, "cannot read %s: %s" % (path, e.strerror or e)))
        return None


def _check_pair(cert_key: str, cert_path: Optional[str], key_key: str,
                key_path: Optional[str]) -> List[tuple]:
    problems: List[tuple] = []
    if cert_path is None and key_path is None:
        return problems
    if cert_path is None or key_path is None:
        missing = cert_key if cert_path is None else key_key
        return [(missing, "must be set together with %s"
                 % (key_key if cert_path is None else cert_key))]
    cert_pem = _read(cert_key, cert_path, problems)
    key_pem = _read(key_key, key_path, problems)
    if problems:
        return problems
    from OpenSSL import SSL, crypto
    try:
        cert = crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem)
    except crypto.Error as e:
        return [(cert_key, "%s is not a PEM certificate: %s" % (cert_path, e))]
    try:
        pkey = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error as e:
        return [(key_key, "%s is not a PEM private key (or it needs a passphrase): %s"
                 % (key_path, e))]
    ctx = SSL.Context(SSL.TLS_METHOD)
    try:
        ctx.use_certificate(cert)
        ctx.use_privatekey(pkey)
        ctx.check_privatekey()
    except SSL.Error:
        return [(key_key, "%s does not match the certificate %s" % (key_path, cert_path))]
    return problems


def _check_ca(key: str, path: Optional[str]) -> List[tuple]:
    problems: List[tuple] = []
    if path is None:
        return problems
    pem = _read(key, path, problems)
    if pem is None:
        return problems
    from OpenSSL import crypto
    try:
        crypto.load_certificate(crypto.FILETYPE_PEM, pem)
    except crypto.Error as e:
        problems.append((key, "%s has no PEM certificate: %s" % (path, e)))
    return problems


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def hba_problems(text: str) -> List[tuple]:
    """
    (line number, problem) for each pg_hba.conf line that does not parse, following
    PostgreSQL's file format (section 21.1 "The pg_hba.conf File"): TYPE DATABASE USER
    [ADDRESS [MASK]] METHOD [OPTIONS].
    """
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        kind = fields[0]
        if kind not in _HBA_TYPES:
            problems.append((lineno, "unknown connection type %r (use %s)"
                             % (kind, ", ".join(_HBA_TYPES))))
            continue
        if kind == "local":
            method_at = 3
        else:
            if len(fields) < 5:
                problems.append((lineno, "%s rules need DATABASE USER ADDRESS METHOD" % kind))
                continue
            address = fields[3]
            method_at = 4
            if "/" in address:
                try:
                    ipaddress.ip_network(address, strict=False)
                except ValueError:
                    problems.append((lineno, "invalid address %r" % address))
                    continue
            elif _is_ip(address):
                if len(fields) > 5 and _is_ip(fields[4]):
                    method_at = 5
                else:
                    problems.append((lineno, "address %r needs a /mask or a MASK field"
                                     % address))
                    continue
        if len(fields) <= method_at:
            problems.append((lineno, "missing authentication method"))
            continue
        method = fields[method_at]
        if method not in _HBA_METHODS:
            problems.append((lineno, "unknown authentication method %r" % method))
    return problems


# -- running --------------------------------------------------------------------------------

def run(config, log_level: str = "info", log_format: str = "text",
        log_file: Optional[str] = None, syslog_name: Optional[str] = None,
        ready=None) -> None:
    """
    Start logging and the service, then run the reactor until shutdown.

    @param ready: called with no arguments once the port is bound (daemon mode uses it to
        let the starting command exit 0).
    @raise StartupError: the port cannot be bound; nothing keeps running.
    """
    if config.general.worker_threads != 1 and not os.environ.get("PGDOORMAN_WORKER"):
        # worker_threads > 1: this process supervises the workers (pgdoorman.workers).
        try:
            from pgdoorman import reactor as _reactor
            _reactor.install()
        except Exception:
            pass
        from pgdoorman import workers
        if workers.count(config) > 1:
            return workers.supervise(config, log_level, log_format, log_file, syslog_name,
                                     ready)
    elif os.environ.get("PGDOORMAN_WORKER"):
        syslog_name = syslog_name or os.environ.get("PGDOORMAN_SYSLOG")
    try:
        from pgdoorman import reactor as _reactor
        _reactor.install()
    except Exception:
        pass  # already installed, or not Linux: the default reactor will do
    from twisted.internet import error, reactor
    from twisted.logger import Logger

    from pgdoorman import logs
    from pgdoorman.tap import build_service

    logs.start(log_format, log_level, path=log_file, syslog_name=syslog_name)
    svc = build_service(config)
    try:
        svc.startService()
    except error.CannotListenError as e:
        reason = e.socketError
        if getattr(reason, "errno", None) == errno.EADDRINUSE:
            reason = "the port is already in use"
        raise StartupError("cannot listen on %s port %s: %s"
                           % (config.general.host, config.general.port, reason))
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    Logger(namespace="pgdoorman").info(
        "pgdoorman {version} listening on {host}:{port}, config {path}",
        version=__version__, host=config.general.host, port=config.general.port,
        path=config.path)
    if ready is not None:
        ready()
    reactor.run()


def daemon(config, args) -> int:
    """
    C{pgdoorman -d}: fork, detach (setsid, second fork), write C{general.daemon_pid_file}, bind
    the port, and only then let the original process exit 0, so that a start script sees
    startup errors (exit 1 and the message on stderr) and never a half-started daemon.
    """
    pid_file = config.general.daemon_pid_file
    if not pid_file:
        print("pgdoorman: %s: general.daemon_pid_file must be set to run as a daemon (-d)"
              % config.path, file=sys.stderr)
        return 1
    pid_file = os.path.abspath(pid_file)
    if os.environ.get("PGDOORMAN_UPGRADE_FDS"):
        return _upgraded_daemon(config, args, pid_file)
    running = _running_pid(pid_file)
    if running:
        print("pgdoorman: already running with pid %d (pid file %s)" % (running, pid_file),
              file=sys.stderr)
        return 1
    log_file = os.path.abspath(args.log_file) if args.log_file else None
    syslog_name = None if log_file else (config.general.syslog_prog_name or "pgdoorman")
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        chunks = []
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_end)
        answer = b"".join(chunks).decode("utf-8", "replace")
        if answer.startswith("OK"):
            return 0
        sys.stderr.write(answer or "pgdoorman: the daemon exited during startup\n")
        return 1
    # First child: a new session without a controlling terminal, then fork again so that the
    # daemon is not a session leader and can never acquire one.
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)
    from pgdoorman import upgrade
    upgrade.start_directory = os.getcwd()  # where a relative path on the command line points
    os.chdir("/")
    try:
        _write_pid_file(pid_file)
    except OSError as e:
        os.write(write_end, ("pgdoorman: cannot write pid file %s: %s\n"
                             % (pid_file, e.strerror)).encode())
        os._exit(1)

    def ready():
        from twisted.internet import reactor
        reactor.addSystemEventTrigger("after", "shutdown", _remove_pid_file, pid_file)
        _detach_stdio()
        os.write(write_end, b"OK\n")
        os.close(write_end)

    try:
        run(config, args.log_level, args.log_format, log_file=log_file,
            syslog_name=syslog_name, ready=ready)
    except StartupError as e:
        _remove_pid_file(pid_file)
        os.write(write_end, ("pgdoorman: %s\n" % e).encode())
        os._exit(1)
    except BaseException as e:
        _remove_pid_file(pid_file)
        os.write(write_end, ("pgdoorman: %s\n" % (e,)).encode())
        os._exit(1)
    return 0


def _upgraded_daemon(config, args, pid_file: str) -> int:
    """
    C{pgdoorman -d} started by a running daemon to replace it (zero-downtime upgrade,
    C{$PGDOORMAN_UPGRADE_FDS}, see L{pgdoorman.upgrade}): it is detached already, so no fork;
    the pid file becomes ours.
    """
    log_file = os.path.abspath(args.log_file) if args.log_file else None
    syslog_name = None if log_file else (config.general.syslog_prog_name or "pgdoorman")
    from pgdoorman import upgrade
    upgrade.start_directory = os.getcwd()  # the old daemon started us there
    os.chdir("/")

    def ready():
        from twisted.internet import reactor
        _write_pid_file(pid_file)
        reactor.addSystemEventTrigger("after", "shutdown", _remove_pid_file, pid_file)

    try:
        run(config, args.log_level, args.log_format, log_file=log_file,
            syslog_name=syslog_name, ready=ready)
    except StartupError as e:
        print("pgdoorman: %s" % e, file=sys.stderr)
        return 1
    return 0


def _running_pid(pid_file: str) -> Optional[int]:
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _write_pid_file(pid_file: str) -> None:
    tmp = "%s.%d.tmp" % (pid_file, os.getpid())
    with open(tmp, "w") as f:
        f.write("%d\n" % os.getpid())
    os.replace(tmp, pid_file)


def _remove_pid_file(pid_file: str) -> None:
    try:
        with open(pid_file) as f:
            if f.read().strip() != str(os.getpid()):
                return  # someone else's now (a binary upgrade took over)
        os.unlink(pid_file)
    except OSError:
        pass


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
