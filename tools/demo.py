"""
`make run`: pgdoorman in front of a throwaway PostgreSQL 15 cluster, no config to write.

Starts a cluster in a temporary directory with a user "app" (password "app", SCRAM) and a
database "app", writes a config for it next to the cluster, prints how to connect and runs
pgdoorman in the foreground.  Ctrl-C stops pgdoorman and removes the cluster.
"""

import os
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from pgcluster import PgCluster  # noqa: E402

PORT = int(os.environ.get("PGDOORMAN_PORT", "6432"))


def _terminate(signum, frame):
    raise KeyboardInterrupt  # clean up the same way for SIGTERM as for Ctrl-C


def main():
    signal.signal(signal.SIGTERM, _terminate)
    cluster = PgCluster().init().start()
    try:
        cluster.create_user("app", "app")
        cluster.create_database("app", owner="app")
        config = os.path.join(cluster.base_dir, "pgdoorman.yaml")
        with open(config, "w") as f:
            f.write("""\
general:
  host: "127.0.0.1"
  port: %d
  admin_username: "admin"
  admin_password: "admin"

pools:
  app:
    server_host: "127.0.0.1"
    server_port: %d
    pool_mode: "transaction"
    users:
      - username: "app"
        password: "%s"        # the SCRAM secret from pg_authid
        pool_size: 10
        server_username: "app"
        server_password: "app"
""" % (PORT, cluster.port, cluster.password_hash("app")))
        print("PostgreSQL 15 is running on 127.0.0.1:%d (data in %s)" % (
            cluster.port, cluster.data_dir))
        print("pgdoorman config: %s" % config)
        print()
        print("Connect through pgdoorman with:")
        print("    psql 'postgresql://app:app@127.0.0.1:%d/app'" % PORT)
        print("Press Ctrl-C to stop.")
        print(flush=True)
        env = dict(os.environ, PYTHONPATH=ROOT)
        proc = subprocess.Popen([sys.executable, "-m", "pgdoorman", config], env=env)
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
