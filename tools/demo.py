"""
`make run`: pgdoorman in front of a throwaway PostgreSQL 15 cluster, no config to write.

Starts a cluster in a temporary directory with a user "app" (password "app", SCRAM) and a
database "app", writes a config for it next to the cluster, prints how to connect and runs
pgdoorman in the foreground.  Ctrl-C stops pgdoorman and removes the cluster.

pgdoorman runs on PyPy from .venv-pypy (tools/test-deps.sh makes it) when that venv is there and
can import pgdoorman's dependencies: it costs much less CPU per transaction there (bench/run.py
--pypy).  Otherwise on this CPython.  PGDOORMAN_PYTHON=/path/to/python chooses the interpreter.
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
PYPY = os.path.join(ROOT, ".venv-pypy", "bin", "python")
# What pgdoorman imports at start-up (the PyPy venv has no psycopg: `generate` is not needed).
PROBE = ("import twisted.internet.epollreactor, yaml, xxhash, OpenSSL, prometheus_client, "
         "pgdoorman.cli, pgdoorman.service")


def _describe(python):
    out = subprocess.run([python, "-c", "import platform; print(platform.python_implementation(), "
                          "platform.python_version())"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    return out.stdout.strip() or "?"


def runtime():
    """(interpreter, why): PGDOORMAN_PYTHON, else a working .venv-pypy, else this CPython."""
    chosen = os.environ.get("PGDOORMAN_PYTHON")
    if chosen:
        return chosen, "PGDOORMAN_PYTHON"
    if os.access(PYPY, os.X_OK):
        probe = subprocess.run([PYPY, "-c", PROBE], env=dict(os.environ, PYTHONPATH=ROOT),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if probe.returncode == 0:
            return PYPY, ".venv-pypy"
        lines = probe.stdout.strip().splitlines()
        print("(.venv-pypy cannot run pgdoorman: %s; using CPython)"
              % (lines[-1] if lines else "exit %d" % probe.returncode))
        return sys.executable, ".venv"
    return sys.executable, ".venv; `sh tools/test-deps.sh` adds .venv-pypy, used when present"


def _terminate(signum, frame):
    raise KeyboardInterrupt  # clean up the same way for SIGTERM as for Ctrl-C


def main():
    signal.signal(signal.SIGTERM, _terminate)
    python, why = runtime()
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
        print("pgdoorman runs on %s: %s (%s)" % (_describe(python), python, why))
        print()
        print("Connect through pgdoorman with:")
        print("    psql 'postgresql://app:app@127.0.0.1:%d/app'" % PORT)
        print("Press Ctrl-C to stop.")
        print(flush=True)
        env = dict(os.environ, PYTHONPATH=ROOT)
        proc = subprocess.Popen([python, "-m", "pgdoorman", config], env=env)
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
