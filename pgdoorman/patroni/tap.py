"""
twistd integration: C{twistd [-n] patroni_proxy -c FILE}.

The plugin in C{twisted/plugins/patroni_proxy_plugin.py} only points here.
"""

from __future__ import annotations

from pgdoorman.patroni import config as _config
from pgdoorman.patroni.cli import DEFAULT_CONFIG, default_config_path
from pgdoorman.tap import ConfigFileOptions


class Options(ConfigFileOptions):
    longdesc = ("Run patroni_proxy, a role-aware TCP proxy in front of a Patroni cluster. "
                "CONFIG_FILE defaults to $PATRONI_PROXY_CONFIG, then %s." % DEFAULT_CONFIG)
    optParameters = [["config", "c", None, "Configuration file (YAML)."]]
    program = "patroni_proxy (pgdoorman)"
    config_module = _config

    def default_path(self) -> str:
        return default_config_path()


def makeService(options):
    from pgdoorman.patroni.service import make_service
    return make_service(options["loaded"])
