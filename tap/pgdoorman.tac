# twistd -y tap/pgdoorman.tac — the same service as `twistd pgdoorman -c FILE`, for people who
# prefer .tac files.  The config path comes from $CONFIG_FILE (default
# /etc/pgdoorman/pgdoorman.yaml).
from twisted.application import service

from pgdoorman import config
from pgdoorman.service import make_service
from pgdoorman.tap import default_config_path

application = service.Application("pgdoorman")
make_service(config.load(default_config_path())).setServiceParent(application)
