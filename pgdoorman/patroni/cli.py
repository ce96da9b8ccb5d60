"""
The C{patroni_proxy} command: C{patroni_proxy [CONFIG]} runs the proxy in the foreground;
C{-t} checks the file.  SIGHUP re-reads the file (see L{ProxyService.reload}); SIGTERM and
SIGINT stop it.
"""

from __future__ import annotations

import argparse
import os
import sys

from pgdoorman import __version__

DEFAULT_CONFIG = "/etc/pgdoorman/patroni_proxy.yaml"


def default_config_path() -> str:
    return os.environ.get("PATRONI_PROXY_CONFIG") or DEFAULT_CONFIG


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="patroni_proxy",
        description="Role-aware TCP proxy in front of a Patroni cluster.")
    p.add_argument("config", nargs="?", metavar="CONFIG_FILE",
                   help="YAML configuration file; default $PATRONI_PROXY_CONFIG, then %s"
                        % DEFAULT_CONFIG)
    p.add_argument("-t", "--test", action="store_true",
                   help="check the configuration and exit 0 (valid) or 1 (invalid)")
    p.add_argument("-l", "--log-level", default=os.environ.get("LOG_LEVEL", "info"),
                   choices=["trace", "debug", "info", "warn", "warning", "error"],
                   help="log level (default info, or $LOG_LEVEL)")
    p.add_argument("-V", "--version", action="version",
                   version="patroni_proxy (pgdoorman) %s" % __version__)
    return p


def main(argv=None) -> None:
    from pgdoorman.patroni import config as _config
    args = _parser().parse_args(argv)
    path = args.config or default_config_path()
    try:
        config = _config.load(path)
    except _config.ConfigError as e:
        print("patroni_proxy: %s" % e, file=sys.stderr)
        raise SystemExit(1)
    if args.test:
        print("patroni_proxy: configuration file %s is valid" % path)
        raise SystemExit(0)
    run(config, args.log_level)


def run(config, log_level: str = "info") -> None:
    try:
        from twisted.internet import epollreactor
        epollreactor.install()
    except Exception:
        pass  # already installed, or not Linux: the default reactor will do
    from twisted.internet import error, reactor
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate, Logger,
                                globalLogBeginner, textFileLogObserver)

    from pgdoorman.patroni.service import make_service

    level = {"trace": "debug", "warning": "warn"}.get(log_level, log_level)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
        redirectStandardIO=False)
    svc = make_service(config, reactor=reactor)
    try:
        svc.startService()
    except error.CannotListenError as e:
        print("patroni_proxy: cannot listen on %s:%s: %s" % (e.interface, e.port, e.socketError),
              file=sys.stderr)
        raise SystemExit(1)
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    Logger(namespace="patroni_proxy").info(
        "patroni_proxy {version}: API on {api}, {n} cluster(s), config {path}",
        version=__version__, api=config.listen_address, n=len(config.clusters), path=config.path)
    reactor.run()


if __name__ == "__main__":
    main()
