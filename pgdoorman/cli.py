"""
The C{pgdoorman} command: run the pooler in the foreground, or check a config with C{-t}.

It builds the same service as C{twistd pgdoorman} (L{pgdoorman.service}) and runs it on the
epoll reactor; binding the port happens before the reactor runs, so a port in use is reported
as a clear error and a non-zero exit instead of a half-started process.
"""

from __future__ import annotations

import argparse
import os
import sys

from pgdoorman import __version__


def _parser() -> argparse.ArgumentParser:
    from pgdoorman.tap import DEFAULT_CONFIG
    p = argparse.ArgumentParser(
        prog="pgdoorman",
        description="PostgreSQL connection pooler (PgDoorman/PgBouncer compatible).")
    p.add_argument("config", nargs="?", metavar="CONFIG_FILE",
                   help="configuration file (.yaml/.yml or .toml); default $CONFIG_FILE, "
                        "then %s" % DEFAULT_CONFIG)
    p.add_argument("-t", "--test", action="store_true",
                   help="check the configuration and exit 0 (valid) or 1 (invalid)")
    p.add_argument("-l", "--log-level", default=os.environ.get("LOG_LEVEL", "info"),
                   choices=["trace", "debug", "info", "warn", "warning", "error"],
                   help="log level (default info, or $LOG_LEVEL)")
    p.add_argument("-V", "--version", action="version", version="pgdoorman %s" % __version__)
    return p


def _load(path: str):
    from pgdoorman import config as _config
    try:
        return _config.load(path)
    except _config.ConfigError as e:
        print("pgdoorman: %s" % e, file=sys.stderr)
        raise SystemExit(1)


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    from pgdoorman.tap import default_config_path
    path = args.config or default_config_path()
    config = _load(path)
    if args.test:
        for key in config.unimplemented_keys():
            print("pgdoorman: warning: %s: %s is accepted but not implemented yet"
                  % (path, key), file=sys.stderr)
        print("pgdoorman: configuration file %s is valid" % path)
        raise SystemExit(0)
    run(config, args.log_level)


def run(config, log_level: str = "info") -> None:
    try:
        from twisted.internet import epollreactor
        epollreactor.install()
    except Exception:
        pass  # already installed, or not Linux: the default reactor will do
    from twisted.internet import error, reactor
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                globalLogBeginner, textFileLogObserver)

    from pgdoorman.service import make_service

    level = {"trace": "debug", "warning": "warn"}.get(log_level, log_level)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
        redirectStandardIO=False)
    svc = make_service(config)
    try:
        svc.startService()
    except error.CannotListenError as e:
        print("pgdoorman: cannot listen on %s:%s: %s"
              % (config.general.host, config.general.port, e.socketError), file=sys.stderr)
        raise SystemExit(1)
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    from twisted.logger import Logger
    Logger(namespace="pgdoorman").info(
        "pgdoorman {version} listening on {host}:{port}, config {path}",
        version=__version__, host=config.general.host, port=config.general.port,
        path=config.path)
    reactor.run()
