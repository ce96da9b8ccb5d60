"""
twistd integration: C{twistd [-n] patroni_proxy -c FILE}.

The plugin in C{twisted/plugins/patroni_proxy_plugin.py} only points here.
"""

from __future__ import annotations

from twisted.python import usage

from pgdoorman import __version__
from pgdoorman.patroni import config as _config
from pgdoorman.patroni.cli import DEFAULT_CONFIG, default_config_path


class Options(usage.Options):
    synopsis = "[-c CONFIG_FILE]"
    longdesc = ("Run patroni_proxy, a role-aware TCP proxy in front of a Patroni cluster. "
                "CONFIG_FILE defaults to $PATRONI_PROXY_CONFIG, then %s." % DEFAULT_CONFIG)
    optParameters = [["config", "c", None, "Configuration file (YAML)."]]

    def opt_version(self):
        print("patroni_proxy (pgdoorman) %s" % __version__)
        raise SystemExit(0)

    def postOptions(self):
        path = self["config"] or default_config_path()
        try:
            self["loaded"] = _config.load(path)
        except _config.ConfigError as e:
            raise usage.UsageError(str(e))


def makeService(options):
    from pgdoorman.patroni.service import make_service
    return make_service(options["loaded"])
