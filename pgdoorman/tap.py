"""
twistd integration: C{twistd pgdoorman -c FILE}.

The plugin in C{twisted/plugins/pgdoorman_plugin.py} only points here, so that importing the
plugin (twistd does that for every plugin it lists) costs nothing and the options and service
construction are tested as ordinary code.
"""

from __future__ import annotations

import os

from twisted.python import usage

from pgdoorman import __version__
from pgdoorman import config as _config

DEFAULT_CONFIG = "/etc/pgdoorman/pgdoorman.yaml"


def default_config_path() -> str:
    return os.environ.get("CONFIG_FILE") or DEFAULT_CONFIG


class ConfigFileOptions(usage.Options):
    """
    twistd options of a program that runs from one config file (pgdoorman, patroni_proxy):
    C{-c FILE}, else a default path; the file is loaded here so that a bad config stops
    twistd with the loader's message.  Subclasses name the program, its loader module and
    its default path.
    """

    synopsis = "[-c CONFIG_FILE]"
    optParameters = [["config", "c", None, "Configuration file (.yaml, .yml or .toml)."]]
    program = "pgdoorman"
    config_module = _config

    def default_path(self) -> str:
        return default_config_path()

    def opt_version(self):
        print("%s %s" % (self.program, __version__))
        raise SystemExit(0)

    def postOptions(self):
        path = self["config"] or self.default_path()
        try:
            self["loaded"] = self.config_module.load(path)
        except self.config_module.ConfigError as e:
            raise usage.UsageError(str(e))


class Options(ConfigFileOptions):
    longdesc = ("Run the pgdoorman PostgreSQL connection pooler. CONFIG_FILE defaults to "
                "$CONFIG_FILE, then %s." % DEFAULT_CONFIG)


def build_service(config):
    """
    The pooler's service (L{pgdoorman.service.make_service}) with a L{systemd.Notifier} as its
    last child, so that under systemd C{READY=1} goes out once the listener has bound its port.
    Both twistd and the C{pgdoorman} command run this.
    """
    from pgdoorman import systemd
    from pgdoorman.service import make_service
    svc = make_service(config)
    systemd.Notifier(svc.pools).setServiceParent(svc)
    return svc


def makeService(options):
    config = options["loaded"]
    if config.general.worker_threads != 1:
        from twisted.logger import Logger
        Logger(namespace="pgdoorman").warn(
            "general.worker_threads ({n}) needs the pgdoorman command, which supervises the "
            "workers: under twistd pgdoorman runs as one process",
            n=config.general.worker_threads)
    return build_service(config)
